//! Low-shot classification on a backbone bundle: embed labelled images (CLS
//! token after the final layernorm, L2-normalised), fit a head, and compile
//! backbone + head into one classification bundle.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, CString};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

use crate::artifact::take_error;
use crate::bundle::sha256_hex;
use crate::error::{Error, Result};
use crate::fsutil::{
    check_output_dir, remove_stale_siblings, replace_dir, sibling_tmp, write_atomic, OutputDir,
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
            let index = names.len() as i64;
            names.push(
                class_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            items.extend(files.into_iter().map(|f| (f, index)));
        }
        if names.len() < 2 {
            return Err(Error::file(
                dir,
                "needs at least two class folders with images (the ImageFolder layout)",
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
    let mut cache: BTreeMap<String, Tensor> = match std::fs::read(&cache_path) {
        Ok(bytes) => parse_safetensors(&bytes, &cache_path)
            .map(|v| v.into_iter().collect())
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
    let rows: Vec<Tensor> = keys.iter().map(|k| cache[k].shallow_clone()).collect();
    Ok(normalize(&Tensor::stack(&rows, 0)))
}

pub fn normalize(x: &Tensor) -> Tensor {
    let x = x.to_kind(Kind::Float);
    &x / x
        .norm_scalaropt_dim(2, [-1].as_slice(), true)
        .clamp_min(1e-12)
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
pub fn fit_prototype(x: &Tensor, y: &Tensor, classes: i64, temperature: f64) -> Head {
    let rows: Vec<Tensor> = (0..classes)
        .map(|c| {
            x.index_select(0, &y.eq(c).nonzero().squeeze_dim(1))
                .mean_dim(0, false, Kind::Float)
        })
        .collect();
    Head {
        weight: normalize(&Tensor::stack(&rows, 0)),
        bias: Tensor::zeros([classes], (Kind::Float, Device::Cpu)),
        scale: temperature,
    }
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
    check_output_dir(out, OutputDir::Bundle, &[backbone.dir()])?;
    let m = backbone.manifest();
    let kind = crate::device::parse_dtype(&m.dtype)?;
    let weight = head.weight.to_kind(kind).contiguous();
    let bias = head.bias.to_kind(kind).contiguous();
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
            let extra = serde_json::json!({
                "producer": manifest.compiler, "task": "classification", "dtype": m.dtype, "device": m.device,
                "height": entry.height, "width": entry.width, "inputs": entry.inputs, "outputs": outputs,
            })
            .to_string();
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
        replace_dir(&staged, out)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staged);
    }
    result
}
