//! One image's result from `run --image` (top-k classes, or a summary of
//! its CLS embedding), as a line of text or in `--json`'s report, and the
//! embeddings saved with `--embeddings`.

use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::{Kind, Tensor};
use vit_msn::inputs::write_npy;
use vit_msn::tensors::write_safetensors;

use crate::cli::CliResult;

/// What `run --image --json` prints.
#[derive(Serialize)]
pub struct ImagesReport<'a> {
    pub artifact: Option<&'a Path>,
    pub bundle: Option<&'a Path>,
    pub results: &'a [ImageResult],
}

impl ImagesReport<'_> {
    /// Through a `serde_json::Value`, as earlier versions printed it: keys
    /// in alphabetical order, and each f32 logit written as the f64 it
    /// widens to.
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(&serde_json::to_value(self)?)
    }
}

/// The top `k` classes by probability: softmax over the classes, or a sigmoid
/// of each logit for multi-label and single-logit heads (what transformers'
/// image-classification pipeline means to do; its 4.46.3 code swaps the
/// single-label and multi-label cases).
pub fn classify(
    path: &Path,
    logits: &Tensor,
    labels: &[String],
    k: usize,
    multi_label: bool,
) -> ImageResult {
    let classes = logits.size().last().copied().unwrap_or(0).max(0) as usize;
    let probs = if multi_label || classes == 1 {
        logits.to_kind(Kind::Float).sigmoid()
    } else {
        logits.softmax(-1, Kind::Float)
    };
    // Never more than there are classes: topk would fail.
    let k = k.min(classes) as i64;
    let (p, idx) = probs.topk(k, -1, true, true);
    let top_k = (0..k)
        .map(|j| {
            let index = idx.int64_value(&[j]);
            Class {
                index,
                label: labels
                    .get(index as usize)
                    .cloned()
                    .unwrap_or_else(|| format!("LABEL_{index}")),
                probability: p.double_value(&[j]),
            }
        })
        .collect();
    ImageResult::Classified {
        image: path.to_path_buf(),
        logits: Vec::<f32>::try_from(logits.to_kind(Kind::Float)).unwrap_or_default(),
        top_k,
    }
}

pub fn summarize(path: &Path, cls: &Tensor) -> ImageResult {
    let v = Vec::<f32>::try_from(cls.to_kind(Kind::Float)).unwrap_or_default();
    let l2_norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len().max(1) as f64;
    ImageResult::Embedded {
        image: path.to_path_buf(),
        embedding: EmbeddingSummary {
            dim: v.len(),
            first: v[..v.len().min(4)].to_vec(),
            l2_norm,
            mean,
        },
    }
}

/// One image's result: a line of text, or an entry of `--json`'s `results`
/// (fields in alphabetical order, as earlier versions printed them).
#[derive(Serialize)]
#[serde(untagged)]
pub enum ImageResult {
    Classified {
        image: PathBuf,
        logits: Vec<f32>,
        top_k: Vec<Class>,
    },
    Embedded {
        embedding: EmbeddingSummary,
        image: PathBuf,
    },
}

#[derive(Serialize)]
pub struct Class {
    index: i64,
    label: String,
    probability: f64,
}

#[derive(Serialize)]
pub struct EmbeddingSummary {
    dim: usize,
    first: Vec<f32>,
    l2_norm: f64,
    mean: f64,
}

impl std::fmt::Display for ImageResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageResult::Classified { image, top_k, .. } => {
                let parts: Vec<String> = top_k
                    .iter()
                    .map(|t| format!("{} {:.3}", t.label, t.probability))
                    .collect();
                write!(f, "{}: {}", image.display(), parts.join(", "))
            }
            ImageResult::Embedded {
                image,
                embedding: e,
            } => {
                let first: Vec<String> = e.first.iter().map(|x| format!("{x:.3}")).collect();
                write!(
                    f,
                    "{}: CLS embedding dim {} |x| {:.3} mean {:.4} [{}, ...]",
                    image.display(),
                    e.dim,
                    e.l2_norm,
                    e.mean,
                    first.join(", ")
                )
            }
        }
    }
}

pub fn save_embeddings(path: &Path, all: &Tensor) -> CliResult {
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => write_npy(path, all)?,
        Some("safetensors") => write_safetensors(path, &[("embeddings", all)])?,
        _ => {
            return Err(format!(
                "{}: --embeddings must end in .safetensors or .npy",
                path.display()
            )
            .into())
        }
    }
    Ok(())
}
