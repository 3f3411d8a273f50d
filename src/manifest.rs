//! `manifest.json`: what a bundle holds and how to call it.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cpu::CpuFeature;
use crate::error::{Error, Result};
use crate::image::MAX_TARGET_SIDE;

/// Bounds on the model facts a manifest may state; see `Manifest::validate`.
pub use vit_msn_format::bounds::{MAX_CHANNELS, MAX_HEADS, MAX_HIDDEN_SIZE, MAX_LAYERS};
pub use vit_msn_format::{Attention, TensorSpec};

/// The manifest format this program writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";

/// See [`Manifest::image_resolution`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageResolution {
    /// The preprocessing's (height, width), which the bundle was compiled for.
    Preprocessing((i64, i64)),
    /// The bundle's only resolution, which is not the preprocessing's size.
    OnlyCompiled {
        size: (i64, i64),
        preprocessing: (i64, i64),
    },
    /// Neither: the caller must pick one of [`Manifest::resolutions`].
    Ambiguous { preprocessing: (i64, i64) },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// The program and version that compiled the bundle.
    pub compiler: String,
    /// `backbone` or `classification`.
    pub task: String,
    pub model: ModelInfo,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// CPU features the artifacts' kernels use (see [`crate::cpu`]); empty
    /// for artifacts that run on every x86-64 CPU. The runtime falls back to
    /// portable kernels on a CPU that lacks one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_features: Vec<CpuFeature>,
    /// How images are turned into `pixel_values` for this bundle, when known.
    #[serde(default)]
    pub preprocessing: Option<Value>,
    pub artifacts: Vec<ArtifactEntry>,
    pub source: Source,
    /// The model's `config.json` as it was read.
    pub config: Value,
    /// How a few-shot head was fitted, for bundles `vit-msn fewshot fit` wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fewshot: Option<Value>,
}

/// The model facts the runtime needs, taken from `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_channels: i64,
    pub patch_size: i64,
    pub image_size: i64,
    /// Class names by index (classification only; empty for a backbone).
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub problem_type: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactEntry {
    pub height: i64,
    pub width: i64,
    /// File name inside the bundle.
    pub file: String,
    pub sha256: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// How the artifact computes attention, as its description says; absent
    /// in manifests written before it was recorded (see `memory.rs` for how
    /// those are read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<Attention>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Source {
    /// Weight files compiled from, with their sha256.
    pub weights: Vec<FileDigest>,
    /// Checkpoint tensors the model did not use.
    #[serde(default)]
    pub unused_tensors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileDigest {
    pub file: String,
    pub sha256: String,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        // A manifest is kilobytes (the config inside it included); bound the read.
        const MAX_BYTES: u64 = 64 << 20;
        let len = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        if len > MAX_BYTES {
            return Err(Error::Manifest {
                path: path.display().to_string(),
                message: format!("{len} bytes is too large for a manifest"),
            });
        }
        let text = crate::fsutil::read_regular_text(&path)?;
        Self::parse(&text, &path)
    }

    /// Parses and checks a manifest's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let bad = |message: String| Error::Manifest {
            path: path.display().to_string(),
            message,
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        // Check the version first, so a newer format gets the right message.
        match value.get("format_version").and_then(Value::as_u64) {
            None => return Err(bad("no `format_version`".into())),
            Some(v) if v > FORMAT_VERSION as u64 => {
                return Err(bad(format!(
                    "format version {v} is newer than this program reads ({FORMAT_VERSION}); upgrade vit-msn"
                )))
            }
            Some(_) => {}
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| bad(format!("invalid manifest: {e}")))?;
        manifest.validate().map_err(bad)?;
        Ok(manifest)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if !matches!(self.task.as_str(), "backbone" | "classification") {
            return Err(format!("unknown task `{}`", self.task));
        }
        if !matches!(self.dtype.as_str(), "f32" | "f16" | "bf16" | "int8") {
            return Err(format!("unknown dtype `{}`", self.dtype));
        }
        let m = &self.model;
        let side = i64::from(MAX_TARGET_SIDE);
        // Loading allocates from these numbers (warm-up inputs, head masks,
        // memory estimates), so a hand-edited manifest must not reach
        // absurd ones.
        // A model may have no layers (its output is the layer-normed embeddings).
        for (name, v, min, max) in [
            ("hidden_size", m.hidden_size, 1, MAX_HIDDEN_SIZE),
            ("num_hidden_layers", m.num_hidden_layers, 0, MAX_LAYERS),
            ("num_attention_heads", m.num_attention_heads, 1, MAX_HEADS),
            ("num_channels", m.num_channels, 1, MAX_CHANNELS),
            ("patch_size", m.patch_size, 1, side),
            ("image_size", m.image_size, 1, side),
        ] {
            if !(min..=max).contains(&v) {
                return Err(format!(
                    "`model.{name}` must be in {min}..={max}, found {v}"
                ));
            }
        }
        if self.artifacts.is_empty() {
            return Err("no artifacts".into());
        }
        for a in &self.artifacts {
            // Artifact files live in the bundle folder itself.
            if a.file.is_empty() || a.file.contains(['/', '\\']) || a.file.starts_with('.') {
                return Err(format!(
                    "artifact file name `{}` is not a plain file name",
                    a.file
                ));
            }
            let bad = |message: String| format!("artifact `{}`: {message}", a.file);
            // At least one patch; at most what the image code resizes to,
            // so no compiled resolution can be larger.
            for (name, v) in [("height", a.height), ("width", a.width)] {
                if !(m.patch_size..=side).contains(&v) {
                    return Err(bad(format!(
                        "`{name}` must be in {}..={side}, found {v}",
                        m.patch_size
                    )));
                }
            }
            self.validate_specs(a).map_err(bad)?;
        }
        Ok(())
    }

    /// The artifact's input and output specs against the model facts: the
    /// runtime builds its inputs from the facts, and names classes by
    /// `labels`, so a hand edit to one side only is refused here.
    fn validate_specs(&self, a: &ArtifactEntry) -> std::result::Result<(), String> {
        let m = &self.model;
        let spec = |list: &[TensorSpec], name: &str| -> Option<Vec<i64>> {
            list.iter()
                .find(|s| s.name == name)
                .map(|s| s.shape.clone())
        };
        let patches = (a.height / m.patch_size) * (a.width / m.patch_size);
        for (name, want) in [
            ("pixel_values", vec![-1, m.num_channels, a.height, a.width]),
            ("bool_masked_pos", vec![-1, patches]),
            (
                "head_mask",
                vec![m.num_hidden_layers, m.num_attention_heads],
            ),
        ] {
            match spec(&a.inputs, name) {
                None => return Err(format!("the manifest lists no `{name}` input")),
                Some(found) if found != want => {
                    return Err(format!(
                        "input `{name}` has shape {found:?}, but `model` implies {want:?}"
                    ))
                }
                Some(_) => {}
            }
        }
        if self.is_classifier() {
            let width = spec(&a.outputs, "logits")
                .ok_or("a classifier's artifact must list a `logits` output")?;
            let classes = i64::try_from(m.labels.len()).unwrap_or(i64::MAX);
            if classes == 0 {
                return Err("`model.labels` is empty; a classifier names its classes".into());
            }
            if width != [-1, classes] {
                return Err(format!(
                    "output `logits` has shape {width:?}, but `model.labels` names {classes} classes"
                ));
            }
        }
        Ok(())
    }

    /// How images become `pixel_values` for this bundle: what it was compiled
    /// with, else ViT-MSN's default at the trained size.
    pub fn preprocessing(&self) -> Result<crate::image::Preprocessing> {
        match &self.preprocessing {
            Some(v) => crate::image::Preprocessing::from_json(v),
            None => {
                let size = u32::try_from(self.model.image_size)
                    .ok()
                    .filter(|s| (1..=MAX_TARGET_SIDE).contains(s))
                    .ok_or_else(|| Error::Manifest {
                        path: MANIFEST_FILE.into(),
                        message: format!(
                            "`model.image_size` must be in 1..={MAX_TARGET_SIDE}, found {}",
                            self.model.image_size
                        ),
                    })?;
                let mut pp = crate::image::Preprocessing::vit_msn_default();
                pp.height = size;
                pp.width = size;
                Ok(pp)
            }
        }
    }

    /// The resolution images run at when the caller names none: the
    /// preprocessing's size where the bundle was compiled for it, else its
    /// only compiled resolution (a bundle compiled for 448 alone is meant to
    /// run at 448), else the caller must choose.
    pub fn image_resolution(&self) -> Result<ImageResolution> {
        let pp = self.preprocessing()?;
        let preprocessing = (i64::from(pp.height), i64::from(pp.width));
        if self.has_resolution(preprocessing.0, preprocessing.1) {
            return Ok(ImageResolution::Preprocessing(preprocessing));
        }
        Ok(match self.artifacts.as_slice() {
            [only] => ImageResolution::OnlyCompiled {
                size: (only.height, only.width),
                preprocessing,
            },
            _ => ImageResolution::Ambiguous { preprocessing },
        })
    }

    pub fn is_classifier(&self) -> bool {
        self.task == "classification"
    }

    /// Sizes as `HxW`, for messages.
    /// Whether an artifact was compiled at `height`×`width`.
    pub fn has_resolution(&self, height: i64, width: i64) -> bool {
        self.artifacts
            .iter()
            .any(|a| (a.height, a.width) == (height, width))
    }

    /// What to say when `height`×`width` was asked for and not compiled.
    pub fn not_compiled(&self, height: i64, width: i64) -> String {
        format!(
            "resolution {height}x{width} was not compiled; this bundle has {}",
            self.resolutions().join(", ")
        )
    }

    pub fn resolutions(&self) -> Vec<String> {
        self.artifacts
            .iter()
            .map(|a| format!("{}x{}", a.height, a.width))
            .collect()
    }
}

/// `224` → (224, 224); `160x192` → height 160, width 192.
pub fn parse_resolution(s: &str) -> Result<(i64, i64)> {
    let bad = || {
        Error::input(
            "resolution",
            format!("`{s}` is not N or HxW with positive integers"),
        )
    };
    let (h, w) = match s.trim().split_once(['x', 'X']) {
        Some((h, w)) => (h.trim(), w.trim()),
        None => (s.trim(), s.trim()),
    };
    let h: i64 = h.parse().map_err(|_| bad())?;
    let w: i64 = w.parse().map_err(|_| bad())?;
    if h <= 0 || w <= 0 {
        return Err(bad());
    }
    let max = i64::from(MAX_TARGET_SIDE);
    if h > max || w > max {
        return Err(Error::input(
            "resolution",
            format!("`{s}`: each side must be at most {max} pixels"),
        ));
    }
    Ok((h, w))
}
