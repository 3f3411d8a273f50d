//! Classification bundles made from a backbone bundle and a linear head
//! (what `vit-msn fewshot fit` writes): each backbone artifact composed with
//! the head into one TorchScript module by the runtime's shim, on the
//! normalised CLS token or, for MSN's protocol, on the centred and
//! normalised CLS token before the final layer norm.

use std::collections::BTreeSet;
use std::ffi::{c_char, c_int, CString};
use std::path::Path;

use serde::Serialize;
use tch::Tensor;

use crate::artifact::take_error;
use crate::error::{Error, Result};
use crate::fsutil::resolve_output_dir;
use crate::image::Preprocessing;
use crate::manifest::{ArtifactEntry, Manifest, TensorSpec};
use crate::writer::BundleWriter;
use crate::Bundle;

extern "C" {
    fn vmsn_rt_compose_classifier(
        backbone_path: *const c_char,
        weight: *const torch_sys::C_tensor,
        bias: *const torch_sys::C_tensor,
        scale: f64,
        features: c_int,
        out_path: *const c_char,
        extra_name: *const c_char,
        extra_contents: *const c_char,
        err: *mut *mut c_char,
    ) -> c_int;
}

/// Beyond this the head's logits overflow (float16 bundles hold at most 65504).
pub const MAX_TEMPERATURE: f64 = 1e4;

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

/// What the head of a classification bundle reads from the backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Features {
    /// The CLS token after the final layer norm, L2-normalised.
    Normalized,
    /// MSN's low-shot evaluation: the CLS token before the final layer norm,
    /// centred on its own mean, then L2-normalised.
    MsnCentred,
}

/// Writes a classification bundle at `out`: for every resolution of the
/// backbone bundle, its artifact composed with the head into one TorchScript
/// module; the manifest gets the task, labels and outputs (and `report` as
/// its `fewshot` field). Staged and renamed.
pub fn write_classifier(
    backbone: &Bundle,
    head: &Head,
    labels: &[String],
    report: &impl Serialize,
    out: &Path,
) -> Result<()> {
    write(
        backbone,
        head,
        Features::Normalized,
        None,
        labels,
        report,
        out,
    )
}

/// [`write_classifier`] for MSN's low-shot protocol: the head reads the CLS
/// token before the final layer norm (see
/// [`crate::bundle::LoadOptions::pre_layernorm_cls`]), centred on its own
/// mean and L2-normalised inside the artifact, and the manifest records
/// `preprocessing` (the protocol's Resize + CenterCrop), so whatever runs
/// the bundle preprocesses as the fit did.
pub fn write_msn_classifier(
    backbone: &Bundle,
    head: &Head,
    labels: &[String],
    report: &impl Serialize,
    preprocessing: &Preprocessing,
    out: &Path,
) -> Result<()> {
    let features = Features::MsnCentred;
    write(
        backbone,
        head,
        features,
        Some(preprocessing),
        labels,
        report,
        out,
    )
}

fn write(
    backbone: &Bundle,
    head: &Head,
    features: Features,
    preprocessing: Option<&Preprocessing>,
    labels: &[String],
    report: &impl Serialize,
    out: &Path,
) -> Result<()> {
    let out = &resolve_output_dir(out);
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
    let mut writer = BundleWriter::create(out, &[backbone.dir()])?;
    let mut manifest: Manifest = m.clone();
    manifest.task = "classification".into();
    manifest.model.labels = labels.to_vec();
    manifest.model.problem_type = Some("single_label_classification".into());
    manifest.compiler = concat!("vit-msn ", env!("CARGO_PKG_VERSION"), " fewshot").into();
    manifest.fewshot =
        Some(serde_json::to_value(report).map_err(|e| Error::file(out, e.to_string()))?);
    if let Some(pp) = preprocessing {
        manifest.preprocessing = Some(pp.to_json());
    }
    for entry in &m.artifacts {
        let target = writer.artifact_path(&entry.file)?;
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
            attention: entry.attention,
        };
        let extra = serde_json::to_string(&extra).map_err(|e| Error::file(out, e.to_string()))?;
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
                match features {
                    Features::Normalized => 0,
                    Features::MsnCentred => 1,
                },
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
        writer.add_artifact(ArtifactEntry {
            outputs,
            ..entry.clone()
        })?;
    }
    writer.finish(manifest).map(|_| ())
}

/// Whether every element is finite.
pub fn all_finite(t: &Tensor) -> bool {
    t.f_isfinite()
        .and_then(|f| f.f_all())
        .and_then(bool::try_from)
        .unwrap_or(false)
}
