//! TorchScript files that people already have, outside any bundle: most often
//! `torch.jit.trace(model, pixel_values)` of a transformers ViT-MSN, whose
//! forward takes only `pixel_values` and returns a tuple or a dict.
//!
//! Supported: a forward of one tensor (`pixel_values`) or of vit-msn's three
//! (`pixel_values, bool_masked_pos, head_mask`), returning a tensor, a tuple or
//! list whose first element is the primary output, or a dict with `logits` or
//! `last_hidden_state`. 2-D primary outputs are logits, 3-D ones hidden states.

use std::path::{Path, PathBuf};

use tch::{CModule, Device, IValue, Kind, Tensor};

use crate::bundle::first_line;
use crate::cpu::Cpu;
use crate::describe::describe;
use crate::describe::ArtifactDescription;
use crate::error::{Error, Result};
use crate::fsutil::{check_regular_file, read_regular_text};
use crate::image::Preprocessing;
use vit_msn_format::bounds::{MAX_CHANNELS, MAX_HEADS, MAX_LAYERS, MAX_SIDE};

pub struct BareArtifact {
    path: PathBuf,
    module: CModule,
    /// 1 (pixel_values) or 3 (with bool_masked_pos and head_mask).
    arity: usize,
    /// The file's own description, when vit-msn wrote it.
    pub description: Option<ArtifactDescription>,
}

/// What a bare artifact returned.
pub enum Primary {
    Logits(Tensor),
    LastHiddenState(Tensor),
}

/// Tensor arguments of a forward schema, `self` excluded.
fn arity(schema: &str) -> usize {
    let args = schema
        .split_once('(')
        .and_then(|(_, rest)| rest.rsplit_once(") ->"))
        .map(|(a, _)| a)
        .unwrap_or("");
    args.split(',')
        .filter(|a| a.trim_start().starts_with("Tensor"))
        .count()
}

/// A vit-msn artifact whose kernels need a CPU feature this CPU lacks is
/// refused at load: a bundle rewrites such linears at load, a bare file
/// cannot be.
fn check_cpu_features(path: &Path, description: Option<&ArtifactDescription>) -> Result<()> {
    let wanted = description.map_or(&[][..], |d| d.cpu_features.as_slice());
    match Cpu::detect().missing(wanted).first() {
        None => Ok(()),
        Some(f) => Err(Error::Artifact {
            path: path.display().to_string(),
            message: format!(
                "compiled with {f}, which needs {}, and this CPU lacks it ({}): run it from its bundle (`vit-msn run --bundle`), which falls back to aten::linear, or recompile with --linear aten",
                f.needs(),
                Cpu::detect().summary()
            ),
        }),
    }
}

impl BareArtifact {
    pub fn load(path: &Path) -> Result<Self> {
        let d = describe(path)?;
        let arity = arity(&d.forward_schema);
        if arity != 1 && arity != 3 {
            return Err(Error::Artifact {
                path: path.display().to_string(),
                message: format!(
                    "unsupported forward `{}`: expected (pixel_values) or (pixel_values, bool_masked_pos, head_mask)",
                    d.forward_schema
                ),
            });
        }
        check_cpu_features(path, d.vit_msn.as_ref())?;
        check_regular_file(path)?;
        // From the path: libtorch reads the archive record by record, where
        // tch's load-from-buffer would hold extra copies of the file.
        let module = CModule::load_on_device(path, Device::Cpu).map_err(|e| Error::Artifact {
            path: path.display().to_string(),
            message: first_line(&e.to_string()),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            module,
            arity,
            description: d.vit_msn,
        })
    }

    /// Whether the forward takes a mask and a head mask.
    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn takes_masks(&self) -> bool {
        self.arity == 3
    }

    /// Runs `pixel_values` (B, C, H, W) f32; masks only where the file takes them.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        bool_masked_pos: Option<&Tensor>,
        head_mask: Option<&Tensor>,
    ) -> Result<Primary> {
        if self.arity == 1 && (bool_masked_pos.is_some() || head_mask.is_some()) {
            return Err(Error::input(
                if bool_masked_pos.is_some() {
                    "bool_masked_pos"
                } else {
                    "head_mask"
                },
                format!(
                    "{} takes only pixel_values: it has no mask or head-mask input",
                    self.path.display()
                ),
            ));
        }
        let mut inputs = vec![IValue::Tensor(pixel_values.shallow_clone())];
        if self.arity == 3 {
            let b = pixel_values.size()[0];
            let spec = |name: &str| {
                self.description
                    .as_ref()?
                    .inputs
                    .iter()
                    .find(|i| i.name == name)
                    .map(|i| i.shape.clone())
            };
            let mask = match bool_masked_pos {
                Some(m) => m.ne(0),
                None => {
                    let n = spec("bool_masked_pos")
                        .and_then(|s| s.last().copied())
                        .ok_or_else(|| {
                            Error::input(
                                "bool_masked_pos",
                                "the file does not say its patch count; pass a mask",
                            )
                        })?;
                    Tensor::zeros([b, n], (Kind::Bool, Device::Cpu))
                }
            };
            let hm = match head_mask {
                Some(h) => h.shallow_clone(),
                None => {
                    let s = spec("head_mask").ok_or_else(|| {
                        Error::input(
                            "head_mask",
                            "the file does not say its head-mask shape; pass one",
                        )
                    })?;
                    Tensor::ones(s.as_slice(), (Kind::Float, Device::Cpu))
                }
            };
            inputs.push(IValue::Tensor(mask));
            inputs.push(IValue::Tensor(hm));
        }
        let out = tch::no_grad(|| self.module.forward_is(&inputs))
            .map_err(|e| Error::Forward(first_line(&e.to_string())))?;
        let primary = match out {
            IValue::Tensor(t) => Some(t),
            IValue::Tuple(items) | IValue::GenericList(items) => {
                items.into_iter().find_map(|v| match v {
                    IValue::Tensor(t) => Some(t),
                    _ => None,
                })
            }
            IValue::GenericDict(items) => {
                let mut found = None;
                for (k, v) in items {
                    if let (IValue::String(k), IValue::Tensor(t)) = (k, v) {
                        if k == "logits" || k == "last_hidden_state" {
                            found = Some(t);
                            break;
                        }
                    }
                }
                found
            }
            _ => None,
        }
        .ok_or_else(|| Error::Forward(format!("{}: returned no tensor", self.path.display())))?;
        let primary = primary.to_kind(Kind::Float);
        let (name, dims): (&str, &[&str]) = match primary.dim() {
            2 => ("logits", &["batch", "classes"]),
            3 => ("last_hidden_state", &["batch", "tokens", "hidden size"]),
            d => {
                return Err(Error::Forward(format!(
                    "{}: primary output has {d} dimensions; expected 2 (logits) or 3",
                    self.path.display()
                )))
            }
        };
        // Callers index one row per image and the CLS token (or the top
        // classes): a file that returns another batch or an empty dimension
        // is refused here rather than indexed out of range.
        let size = primary.size();
        let batch = pixel_values.size().first().copied().unwrap_or(0);
        if size[0] != batch {
            return Err(Error::Forward(format!(
                "{}: output `{name}` has shape {size:?} for a batch of {batch}",
                self.path.display()
            )));
        }
        if let Some(empty) = size.iter().position(|&d| d == 0) {
            return Err(Error::Forward(format!(
                "{}: output `{name}` has no {} (shape {size:?})",
                self.path.display(),
                dims[empty]
            )));
        }
        Ok(if name == "logits" {
            Primary::Logits(primary)
        } else {
            Primary::LastHiddenState(primary)
        })
    }
}

/// What running images through a bare artifact needs to know of its model:
/// from the Hugging Face folder it was traced from when one is given, else
/// ViT-MSN's defaults. Sizes are bounded as a bundle manifest's are, since
/// mask and head-mask sizes are computed from them.
pub struct ModelFacts {
    /// `labels` (a JSON list, map or config), else the folder's `id2label`.
    pub labels: Vec<String>,
    /// The folder's `preprocessor_config.json`, else ViT-MSN's at its `image_size`.
    pub preprocessing: Preprocessing,
    pub channels: i64,
    pub patch_size: Option<i64>,
    /// (layers, heads), where the config gives both.
    pub heads: Option<(i64, i64)>,
    /// `problem_type` is multi_label_classification.
    pub multi_label: bool,
}

impl ModelFacts {
    pub fn read(model_dir: Option<&Path>, labels: Option<&Path>) -> Result<Self> {
        let config_path = model_dir.map(|d| d.join("config.json"));
        let config = match &config_path {
            Some(p) => Some(read_json(p)?),
            None => None,
        };
        let has_id2label = config.as_ref().is_some_and(|c| c.get("id2label").is_some());
        let labels = match (labels, &config_path) {
            (Some(file), _) => read_labels(file)?,
            // A backbone's config may have no id2label: then no names.
            (None, Some(path)) if has_id2label => read_labels(path)?,
            _ => Vec::new(),
        };
        let int = |key: &str, max: i64| -> Result<Option<i64>> {
            let (Some(v), Some(path)) = (config.as_ref().and_then(|c| c.get(key)), &config_path)
            else {
                return Ok(None);
            };
            // Sizes may be a square [height, width] list, as transformers takes them.
            let n = match v.as_array().map(Vec::as_slice) {
                Some([h, w]) if matches!(key, "image_size" | "patch_size") && h == w => h.as_i64(),
                _ => v.as_i64(),
            };
            // A model may have no layers, as in transformers.
            let min = if key == "num_hidden_layers" { 0 } else { 1 };
            match n {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(Error::file(
                    path,
                    format!("`{key}` must be an integer in {min}..={max}, found {v}"),
                )),
            }
        };
        let side = i64::from(MAX_SIDE);
        // In 1..=MAX_SIDE, so the cast is exact.
        let image_size = int("image_size", side)?.unwrap_or(224) as u32;
        let preprocessor = model_dir
            .map(|d| d.join("preprocessor_config.json"))
            .filter(|p| p.is_file());
        let preprocessing = match preprocessor {
            Some(p) => Preprocessing::from_json(&read_json(&p)?)?,
            None => Preprocessing {
                height: image_size,
                width: image_size,
                ..Preprocessing::vit_msn_default()
            },
        };
        let heads = match (
            int("num_hidden_layers", MAX_LAYERS)?,
            int("num_attention_heads", MAX_HEADS)?,
        ) {
            (Some(l), Some(h)) => Some((l, h)),
            _ => None,
        };
        Ok(ModelFacts {
            labels,
            preprocessing,
            channels: int("num_channels", MAX_CHANNELS)?.unwrap_or(3),
            patch_size: int("patch_size", side)?,
            heads,
            multi_label: config
                .as_ref()
                .and_then(|c| c.get("problem_type")?.as_str())
                == Some("multi_label_classification"),
        })
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = read_regular_text(path)?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))
}

/// Class names from a JSON file: a list, an `{"0": "cat"}` map, or a
/// transformers config with `id2label`.
pub fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = read_regular_text(path)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
    let v = v.get("id2label").cloned().unwrap_or(v);
    let bad = || {
        Error::file(
            path,
            "expected a list of names, an {\"0\": name} map, or a config with id2label",
        )
    };
    match v {
        serde_json::Value::Array(items) => items
            .iter()
            .map(|x| x.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        serde_json::Value::Object(map) => {
            let mut pairs: Vec<(usize, String)> = map
                .iter()
                .map(|(k, x)| {
                    Ok((
                        k.parse::<usize>().map_err(|_| bad())?,
                        x.as_str().ok_or_else(bad)?.to_owned(),
                    ))
                })
                .collect::<Result<_>>()?;
            pairs.sort();
            if pairs.iter().enumerate().any(|(i, (k, _))| i != *k) {
                return Err(bad());
            }
            Ok(pairs.into_iter().map(|(_, n)| n).collect())
        }
        _ => Err(bad()),
    }
}
