//! Low-shot classification on a backbone bundle: embed labelled images (CLS
//! token after the final layernorm, L2-normalised), fit a head, and compile
//! backbone + head into one classification bundle.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_char, c_int, CString};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

use crate::artifact::take_error;
use crate::bundle::sha256_hex;
use crate::error::{Error, Result};
use crate::fsutil::{
    check_output_dir, remove_stale_siblings, resolve_output_dir, sibling_tmp, write_atomic,
    OutputDir,
};
use crate::image::{is_image_path, preprocess_path};
use crate::manifest::{ArtifactEntry, Manifest, TensorSpec, MANIFEST_FILE};
use crate::tensors::{parse_safetensors, write_safetensors};
use crate::Bundle;

extern "C" {
    fn vmsn_rt_compose_classifier(
        backbone_path: *const c_char,
        weight: *const torch_sys::C_tensor,
        bias: *const torch_sys::C_tensor,
        scale: f64,
        out_path: *const c_char,
        extra_name: *const c_char,
        extra_contents: *const c_char,
        err: *mut *mut c_char,
    ) -> c_int;
}

/// An ImageFolder: one sub-folder per class, named for it.
pub struct LabelledImages {
    pub classes: Vec<String>,
    /// (path, class index), in class then name order.
    pub items: Vec<(PathBuf, i64)>,
}

impl LabelledImages {
    /// Reads `dir`; it needs at least one class folder with images (`fit`
    /// needs two, checked there).
    pub fn read(dir: &Path) -> Result<Self> {
        let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        classes.sort();
        let mut items = Vec::new();
        let mut names = Vec::new();
        for class_dir in &classes {
            let mut files: Vec<PathBuf> = std::fs::read_dir(class_dir)
                .map_err(|e| Error::io(class_dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image_path(p))
                .collect();
            if files.is_empty() {
                continue;
            }
            files.sort();
            // A lossy conversion would give two folders (`caf\xe9`, `caf\xe8`) one label.
            let Some(name) = class_dir.file_name().and_then(|n| n.to_str()) else {
                return Err(Error::file(
                    class_dir,
                    "the class folder's name is not valid UTF-8; labels must be text (rename the folder)",
                ));
            };
            let index = names.len() as i64;
            names.push(name.to_string());
            items.extend(files.into_iter().map(|f| (f, index)));
        }
        if names.is_empty() {
            return Err(Error::file(
                dir,
                "holds no class folders with images (the ImageFolder layout: one sub-folder of images per class)",
            ));
        }
        Ok(Self {
            classes: names,
            items,
        })
    }

    pub fn labels(&self) -> Tensor {
        Tensor::from_slice(&self.items.iter().map(|(_, c)| *c).collect::<Vec<_>>())
    }
}

/// CLS embeddings (N, D) of `paths` through a backbone bundle, L2-normalised,
/// cached in the bundle folder by image content and bundle, so a second fit
/// does not embed again. `progress` is called with the number done.
pub fn embed(
    bundle: &Bundle,
    paths: &[PathBuf],
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Tensor> {
    let m = bundle.manifest();
    if m.is_classifier() {
        return Err(Error::file(
            bundle.dir(),
            "is a classifier bundle; few-shot needs a backbone",
        ));
    }
    let pp = m.preprocessing()?;
    let fingerprint = sha256_hex(
        format!(
            "{}|{}",
            m.artifacts
                .iter()
                .map(|a| a.sha256.as_str())
                .collect::<Vec<_>>()
                .join(","),
            serde_json::to_string(&m.preprocessing).unwrap_or_default()
        )
        .as_bytes(),
    );
    let cache_path = bundle
        .dir()
        .join("cache")
        .join(format!("embeddings-{}.safetensors", &fingerprint[..16]));
    let hidden = m.model.hidden_size;
    // The cache is only an optimisation: one that does not parse is ignored,
    // and a damaged entry is a miss, embedded again and overwritten.
    let mut cache: BTreeMap<String, Tensor> = match std::fs::read(&cache_path) {
        Ok(bytes) => parse_safetensors(&bytes, &cache_path)
            .map(|v| {
                v.into_iter()
                    .filter(|(_, t)| is_embedding(t, hidden))
                    .collect()
            })
            .unwrap_or_default(),
        Err(_) => BTreeMap::new(),
    };
    let keys: Vec<String> = paths
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(|b| sha256_hex(&b))
                .map_err(|e| Error::io(p, e))
        })
        .collect::<Result<_>>()?;
    let missing: Vec<usize> = (0..paths.len())
        .filter(|&i| !cache.contains_key(&keys[i]))
        .collect();
    let mut done = paths.len() - missing.len();
    progress(done);
    for chunk in missing.chunks(batch.max(1)) {
        let px = chunk
            .iter()
            .map(|&i| preprocess_path(&paths[i], &pp, m.model.num_channels))
            .collect::<Result<Vec<_>>>()?;
        let out = bundle.forward(&Tensor::stack(&px, 0), None, None)?;
        let lhs = out
            .last_hidden_state
            .ok_or_else(|| Error::Forward("the backbone returned no last_hidden_state".into()))?;
        let shape = lhs.size();
        if shape.len() != 3 || shape[0] != chunk.len() as i64 || shape[2] != hidden {
            return Err(Error::Forward(format!(
                "the backbone's last_hidden_state has shape {shape:?}, expected [{}, tokens, {hidden}]",
                chunk.len()
            )));
        }
        for (j, &i) in chunk.iter().enumerate() {
            cache.insert(keys[i].clone(), lhs.get(j as i64).get(0).copy());
        }
        done += chunk.len();
        progress(done);
    }
    if !missing.is_empty() {
        if let Some(dir) = cache_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let named: Vec<(&str, &Tensor)> = cache.iter().map(|(k, v)| (k.as_str(), v)).collect();
        write_safetensors(&cache_path, &named)?;
    }
    let rows = keys
        .iter()
        .zip(paths)
        .map(|(k, p)| {
            cache
                .get(k)
                .map(|t| t.to_kind(Kind::Float))
                .ok_or_else(|| Error::file(p, "no embedding was made for this image"))
        })
        .collect::<Result<Vec<_>>>()?;
    let x = Tensor::f_stack(&rows, 0)
        .map_err(|e| Error::Forward(format!("cannot stack the embeddings: {e}")))?;
    Ok(normalize(&x))
}

/// Whether a cache entry can stand for an embedding: a finite (hidden,) float row.
fn is_embedding(t: &Tensor, hidden: i64) -> bool {
    t.size() == [hidden]
        && matches!(
            t.kind(),
            Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
        )
        && all_finite(t)
}

fn all_finite(t: &Tensor) -> bool {
    t.f_isfinite()
        .and_then(|f| f.f_all())
        .and_then(bool::try_from)
        .unwrap_or(false)
}

pub fn normalize(x: &Tensor) -> Tensor {
    let x = x.to_kind(Kind::Float);
    &x / x
        .norm_scalaropt_dim(2, [-1].as_slice(), true)
        .clamp_min(1e-12)
}

/// Beyond these a fit runs for hours without changing the head, or the head's
/// logits overflow (float16 bundles hold at most 65504).
pub const MAX_EPOCHS: usize = 100_000;
pub const MAX_WEIGHT_DECAY: f64 = 1e6;
pub const MAX_TEMPERATURE: f64 = 1e4;

/// Why `epochs` cannot be fitted with, if it cannot (the caller names the setting).
pub fn check_epochs(epochs: usize) -> std::result::Result<(), String> {
    if (1..=MAX_EPOCHS).contains(&epochs) {
        Ok(())
    } else {
        Err(format!("must be in 1..={MAX_EPOCHS}, found {epochs}"))
    }
}

/// Why `weight_decay` cannot be fitted with, if it cannot.
pub fn check_weight_decay(weight_decay: f64) -> std::result::Result<(), String> {
    if (0.0..=MAX_WEIGHT_DECAY).contains(&weight_decay) {
        Ok(())
    } else {
        Err(format!(
            "must be finite and in [0, {MAX_WEIGHT_DECAY}], found {weight_decay:?}"
        ))
    }
}

/// Why `temperature` cannot scale a head, if it cannot: zero gives every class
/// the same logit and a negative one predicts the farthest class.
pub fn check_temperature(temperature: f64) -> std::result::Result<(), String> {
    if temperature > 0.0 && temperature <= MAX_TEMPERATURE {
        Ok(())
    } else {
        Err(format!(
            "must be finite and in (0, {MAX_TEMPERATURE}], found {temperature:?}"
        ))
    }
}

/// A linear head: logits = scale · x · Wᵀ + b on normalised embeddings.
pub struct Head {
    pub weight: Tensor,
    pub bias: Tensor,
    pub scale: f64,
}

impl Head {
    pub fn logits(&self, x: &Tensor) -> Tensor {
        x.matmul(&self.weight.tr()) * self.scale + &self.bias
    }

    pub fn predict(&self, x: &Tensor) -> Tensor {
        self.logits(x).argmax(-1, false)
    }
}

/// Multinomial logistic regression, full batch, minimising mean cross-entropy
/// + weight_decay/2 · ‖W‖² (scikit-learn's objective with C = 1/(weight_decay·N)).
pub fn fit_linear(
    x: &Tensor,
    y: &Tensor,
    classes: i64,
    weight_decay: f64,
    epochs: usize,
    seed: i64,
) -> Result<Head> {
    check_weight_decay(weight_decay).map_err(|m| Error::input("weight_decay", m))?;
    check_epochs(epochs).map_err(|m| Error::input("epochs", m))?;
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let d = x.size()[1];
    let w = vs.root().zeros("weight", &[classes, d]);
    let b = vs.root().zeros("bias", &[classes]);
    let mut opt = nn::Adam::default()
        .build(&vs, 0.05)
        .map_err(|e| Error::Forward(format!("cannot build the optimizer: {e}")))?;
    for _ in 0..epochs {
        let logits = x.matmul(&w.tr()) + &b;
        let loss =
            logits.cross_entropy_for_logits(y) + (&w * &w).sum(Kind::Float) * (weight_decay / 2.0);
        opt.backward_step(&loss);
    }
    Ok(Head {
        weight: w.detach().copy(),
        bias: b.detach().copy(),
        scale: 1.0,
    })
}

/// Class means of the normalised embeddings, normalised: cosine similarity
/// times `temperature`.
pub fn fit_prototype(x: &Tensor, y: &Tensor, classes: i64, temperature: f64) -> Result<Head> {
    check_temperature(temperature).map_err(|m| Error::input("temperature", m))?;
    let rows: Vec<Tensor> = (0..classes)
        .map(|c| {
            x.index_select(0, &y.eq(c).nonzero().squeeze_dim(1))
                .mean_dim(0, false, Kind::Float)
        })
        .collect();
    Ok(Head {
        weight: normalize(&Tensor::stack(&rows, 0)),
        bias: Tensor::zeros([classes], (Kind::Float, Device::Cpu)),
        scale: temperature,
    })
}

pub fn accuracy(pred: &Tensor, y: &Tensor) -> f64 {
    pred.eq_tensor(y)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
}

/// What `fit` did, recorded in the classifier's manifest.
#[derive(Debug, Clone, Serialize)]
pub struct FitReport {
    pub method: String,
    pub classes: Vec<String>,
    pub train_images: usize,
    pub weight_decay: Option<f64>,
    pub weight_decay_chosen_on_validation: bool,
    pub validation_accuracy: Option<f64>,
    pub temperature: Option<f64>,
    pub epochs: usize,
    pub seed: i64,
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::input("path", format!("`{s}` contains a NUL byte")))
}

/// Writes a classification bundle at `out`: for every resolution of the
/// backbone bundle, its artifact composed with the head into one TorchScript
/// module; the manifest gets the task, labels and outputs. Staged and renamed.
pub fn write_classifier(
    backbone: &Bundle,
    head: &Head,
    labels: &[String],
    report: &FitReport,
    out: &Path,
) -> Result<()> {
    let out = &resolve_output_dir(out);
    check_output_dir(out, OutputDir::Bundle, &[backbone.dir()])?;
    let m = backbone.manifest();
    let mut seen = BTreeSet::new();
    if let Some(twice) = labels.iter().find(|l| !seen.insert(l.as_str())) {
        return Err(Error::input(
            "labels",
            format!("`{twice}` is named more than once; each class needs its own label"),
        ));
    }
    let classes = labels.len() as i64;
    if head.weight.size() != [classes, m.model.hidden_size] || head.bias.size() != [classes] {
        return Err(Error::input(
            "head",
            format!(
                "weight {:?} and bias {:?} do not fit {classes} labels on a backbone of width {}",
                head.weight.size(),
                head.bias.size(),
                m.model.hidden_size
            ),
        ));
    }
    check_temperature(head.scale).map_err(|m| Error::input("scale", m))?;
    let kind = crate::device::parse_dtype(&m.dtype)?;
    let weight = head.weight.to_kind(kind).contiguous();
    let bias = head.bias.to_kind(kind).contiguous();
    // Checked in the bundle's dtype: a float32 head can still overflow float16.
    if !all_finite(&weight) || !all_finite(&bias) {
        return Err(Error::file(
            out,
            format!(
                "the fit diverged: the head's weights or bias are not all finite in {}; refusing to write it (a smaller weight decay or fewer epochs may help)",
                m.dtype
            ),
        ));
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    remove_stale_siblings(out);
    let staged = sibling_tmp(out);
    std::fs::create_dir_all(&staged).map_err(|e| Error::io(&staged, e))?;
    let result = (|| {
        let mut manifest: Manifest = m.clone();
        manifest.task = "classification".into();
        manifest.model.labels = labels.to_vec();
        manifest.model.problem_type = Some("single_label_classification".into());
        manifest.compiler = concat!("vit-msn ", env!("CARGO_PKG_VERSION"), " fewshot").into();
        manifest.fewshot =
            Some(serde_json::to_value(report).map_err(|e| Error::file(out, e.to_string()))?);
        let mut artifacts = Vec::new();
        for entry in &m.artifacts {
            let target = staged.join(&entry.file);
            let outputs = vec![TensorSpec {
                name: "logits".into(),
                dtype: m.dtype.clone(),
                shape: vec![-1, labels.len() as i64],
            }];
            let extra = crate::describe::ArtifactDescription {
                producer: manifest.compiler.clone(),
                task: vit_msn_format::Task::Classification,
                dtype: m.dtype.clone(),
                device: m.device.clone(),
                cpu_features: m.cpu_features.clone(),
                height: entry.height,
                width: entry.width,
                inputs: entry.inputs.clone(),
                outputs: outputs.clone(),
            };
            let extra =
                serde_json::to_string(&extra).map_err(|e| Error::file(out, e.to_string()))?;
            let (src, dst) = (
                cstring(&backbone.dir().join(&entry.file).to_string_lossy())?,
                cstring(&target.to_string_lossy())?,
            );
            let (name, contents) = (
                cstring(crate::describe::ARTIFACT_EXTRA_FILE)?,
                cstring(&extra)?,
            );
            let mut err: *mut c_char = std::ptr::null_mut();
            // SAFETY: live tensors and NUL-terminated strings for the duration of the call.
            let rc = unsafe {
                vmsn_rt_compose_classifier(
                    src.as_ptr(),
                    weight.as_ptr(),
                    bias.as_ptr(),
                    head.scale,
                    dst.as_ptr(),
                    name.as_ptr(),
                    contents.as_ptr(),
                    &mut err,
                )
            };
            if rc != 0 {
                let message = take_error(err);
                return Err(Error::Artifact {
                    path: entry.file.clone(),
                    message,
                });
            }
            let bytes = std::fs::read(&target).map_err(|e| Error::io(&target, e))?;
            artifacts.push(ArtifactEntry {
                sha256: sha256_hex(&bytes),
                outputs,
                ..entry.clone()
            });
        }
        manifest.artifacts = artifacts;
        let text =
            serde_json::to_string_pretty(&manifest).map_err(|e| Error::file(out, e.to_string()))?;
        write_atomic(&staged.join(MANIFEST_FILE), text.as_bytes())?;
        crate::bundle::replace_bundle_dir(&staged, out)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staged);
    }
    result
}
