//! `vit-msn run --image`: images through a bundle or a bare artifact, in
//! batches, to top-k labels or CLS embeddings.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;
use tch::{Kind, Tensor};
use vit_msn::bare::{BareArtifact, ModelFacts, Primary};
use vit_msn::image::{preprocess_path, Preprocessing, MAX_TARGET_SIDE};
use vit_msn::inputs::{parse_head_mask, random_mask, write_npy};
use vit_msn::tensors::{read_safetensors, write_safetensors};
use vit_msn::{Bundle, Error};

use super::run::RunArgs;
use super::{resolution_arg, usage, CliResult};

type Forward<'a> = Box<
    dyn Fn(
            &Tensor,
            Option<&Tensor>,
            Option<&Tensor>,
        ) -> Result<(Option<Tensor>, Option<Tensor>), Box<dyn std::error::Error>>
        + 'a,
>;

/// What `run --image` needs of a bundle or a bare artifact.
pub struct Target<'a> {
    labels: Vec<String>,
    preprocessing: Preprocessing,
    channels: i64,
    patch_size: Option<i64>,
    /// (layers, heads), where known.
    heads: Option<(i64, i64)>,
    classifier: Option<bool>,
    /// `problem_type` is multi_label_classification: each class gets its own
    /// sigmoid probability.
    multi_label: bool,
    /// (logits, last_hidden_state) of a batch.
    forward: Forward<'a>,
}

impl<'a> Target<'a> {
    pub fn bundle(bundle: &'a Bundle) -> Result<Self, Box<dyn std::error::Error>> {
        let m = bundle.manifest();
        Ok(Target {
            labels: m.model.labels.clone(),
            preprocessing: m.preprocessing()?,
            channels: m.model.num_channels,
            patch_size: Some(m.model.patch_size),
            heads: Some((m.model.num_hidden_layers, m.model.num_attention_heads)),
            classifier: Some(m.is_classifier()),
            multi_label: m.model.problem_type.as_deref() == Some("multi_label_classification"),
            forward: Box::new(move |px, mask, hm| {
                let out = bundle.forward(px, mask, hm)?;
                Ok((out.logits, out.last_hidden_state))
            }),
        })
    }

    pub fn bare(bare: &'a BareArtifact, a: &RunArgs) -> Result<Self, Box<dyn std::error::Error>> {
        let facts = ModelFacts::read(a.model.as_deref(), a.labels.as_deref())?;
        // A file traced at another size fails inside its graph, with a
        // message about tensor sizes; say where the size came from.
        let size_note = if a.model.is_none() && a.resolution.is_none() {
            " (ViT-MSN's default size; give --resolution or --model for the size the file was traced at)"
        } else {
            ""
        };
        Ok(Target {
            labels: facts.labels,
            preprocessing: facts.preprocessing,
            channels: facts.channels,
            patch_size: facts.patch_size,
            heads: facts.heads,
            classifier: None,
            multi_label: facts.multi_label,
            forward: Box::new(move |px, mask, hm| {
                let out = bare.forward(px, mask, hm).map_err(|e| match e {
                    Error::Forward(_) => {
                        let size = px.size();
                        let at = format!("{}x{}", size[2], size[3]);
                        format!("{}, images at {at}{size_note}: {e}", bare.path().display()).into()
                    }
                    other => Box::<dyn std::error::Error>::from(other),
                })?;
                Ok(match out {
                    Primary::Logits(t) => (Some(t), None),
                    Primary::LastHiddenState(t) => (None, Some(t)),
                })
            }),
        })
    }
}

fn head_mask_of(
    target: &Target,
    a: &RunArgs,
) -> Result<Option<Tensor>, Box<dyn std::error::Error>> {
    if let Some(spec) = &a.head_mask {
        let (layers, heads) = target.heads.ok_or_else(|| {
            usage("--head-mask needs the layer and head counts: give --model with the artifact")
        })?;
        return Ok(Some(parse_head_mask(spec, layers, heads).map_err(usage)?));
    }
    if let Some(file) = &a.head_mask_file {
        return Ok(Some(single_tensor(file, "head_mask")?));
    }
    Ok(None)
}

/// The tensor named `name` in a safetensors file, or its only tensor.
fn single_tensor(file: &Path, name: &str) -> Result<Tensor, Box<dyn std::error::Error>> {
    let mut tensors = read_safetensors(file)?;
    if let Some(i) = tensors.iter().position(|(n, _)| n == name) {
        return Ok(tensors.swap_remove(i).1);
    }
    match tensors.len() {
        1 => Ok(tensors.swap_remove(0).1),
        _ => Err(Error::file(file, format!("no tensor named `{name}`")).into()),
    }
}

/// A size to resize images to, within what the image code resizes to.
fn target_side(v: i64, what: &str) -> Result<u32, Box<dyn std::error::Error>> {
    u32::try_from(v)
        .ok()
        .filter(|s| (1..=MAX_TARGET_SIDE).contains(s))
        .ok_or_else(|| format!("{what}: {v} is not in 1..={MAX_TARGET_SIDE}").into())
}

/// Without `--resolution`, images are resized as the bundle's preprocessing
/// says. When it was not compiled at that size: its only resolution, if it
/// has just one (a bundle compiled for 448 alone is meant to run at 448),
/// else an error listing them.
pub fn compiled_size_for_images(
    m: &vit_msn::manifest::Manifest,
) -> Result<Option<(i64, i64)>, Box<dyn std::error::Error>> {
    let pp = m.preprocessing()?;
    let (h, w) = (i64::from(pp.height), i64::from(pp.width));
    if m.has_resolution(h, w) {
        return Ok(None);
    }
    match m.artifacts.as_slice() {
        [only] => {
            eprintln!(
                "note: images are resized to {}x{}, the only compiled resolution (the preprocessing says {h}x{w})",
                only.height, only.width
            );
            Ok(Some((only.height, only.width)))
        }
        _ => Err(usage(format!(
            "the preprocessing resizes images to {h}x{w}, which this bundle was not compiled for; \
             give --resolution, one of {}",
            m.resolutions().join(", ")
        ))),
    }
}

pub fn run_images(
    target: &Target,
    images: &[PathBuf],
    a: &RunArgs,
    size: Option<(i64, i64)>,
) -> CliResult {
    let mut pp = target.preprocessing.clone();
    let size = match &a.resolution {
        Some(r) => Some(resolution_arg(r)?),
        None => size,
    };
    if let Some((h, w)) = size {
        pp.height = target_side(h, "--resolution")?;
        pp.width = target_side(w, "--resolution")?;
    }
    let (h, w) = (pp.height as i64, pp.width as i64);
    let patches = target.patch_size.map(|p| (h / p) * (w / p));
    let need_patches = || {
        patches.ok_or_else(|| usage("masking needs the patch size: give --model with the artifact"))
    };
    let head_mask = head_mask_of(target, a)?;
    let file_mask = match &a.mask_file {
        Some(f) => Some(single_tensor(f, "bool_masked_pos")?),
        None => None,
    };
    if a.embeddings.is_some() && target.classifier == Some(true) {
        return Err(usage(
            "--embeddings needs a backbone bundle (this one is a classifier)",
        ));
    }
    let progress = progress_bar(images.len() as u64, a.json);
    let mut results = Vec::new();
    let mut embeddings = Vec::new();
    for (chunk_index, chunk) in images.chunks(a.batch_size).enumerate() {
        let start = chunk_index * a.batch_size;
        let pixel_values = Tensor::stack(
            &chunk
                .iter()
                .map(|p| preprocess_path(p, &pp, target.channels))
                .collect::<Result<Vec<_>, _>>()?,
            0,
        );
        let n = chunk.len() as i64;
        let mask = match (&file_mask, a.mask_ratio) {
            (Some(m), _) if m.dim() == 1 => Some(m.unsqueeze(0).expand([n, m.size()[0]], false)),
            (Some(m), _) if m.dim() == 2 && m.size()[0] == images.len() as i64 => {
                Some(m.narrow(0, start as i64, n))
            }
            (Some(m), _) => {
                return Err(Error::input(
                    "bool_masked_pos",
                    format!(
                        "--mask-file holds shape {:?}; expected [patches] or [{}, patches]",
                        m.size(),
                        images.len()
                    ),
                )
                .into())
            }
            // One draw over all images, so results do not depend on --batch-size.
            (None, Some(ratio)) => Some(
                random_mask(images.len() as i64, need_patches()?, ratio, a.seed)?.narrow(
                    0,
                    start as i64,
                    n,
                ),
            ),
            (None, None) => None,
        };
        let (logits, last_hidden_state) =
            (target.forward)(&pixel_values, mask.as_ref(), head_mask.as_ref())?;
        if a.embeddings.is_some() && logits.is_some() {
            return Err(usage(
                "--embeddings needs a backbone (this model returns logits)",
            ));
        }
        // A bundle's labels are checked at load; names given with --artifact
        // are checked here, against what the file returns.
        if let Some(classes) = logits.as_ref().and_then(|l| l.size().last().copied()) {
            if !target.labels.is_empty() && target.labels.len() as i64 != classes {
                return Err(format!(
                    "{} label names were given, but the model returns {classes} logits",
                    target.labels.len()
                )
                .into());
            }
        }
        for (i, path) in chunk.iter().enumerate() {
            let i = i as i64;
            results.push(match (&logits, &last_hidden_state) {
                (Some(logits), _) => classify(
                    path,
                    &logits.get(i),
                    &target.labels,
                    a.top_k,
                    target.multi_label,
                ),
                (None, Some(lhs)) => {
                    let cls = lhs.get(i).get(0);
                    embeddings.push(cls.shallow_clone());
                    summarize(path, &cls)
                }
                (None, None) => {
                    return Err("the bundle returned neither logits nor last_hidden_state".into())
                }
            });
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    if let Some(path) = &a.embeddings {
        let all = Tensor::stack(&embeddings, 0);
        save_embeddings(path, &all)?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "bundle": a.bundle, "artifact": a.artifact, "results": results })
            )?
        );
    } else {
        for r in &results {
            println!("{r}");
        }
        if let Some(path) = &a.embeddings {
            println!(
                "saved {} embeddings to {}",
                embeddings.len(),
                path.display()
            );
        }
    }
    Ok(())
}

fn progress_bar(len: u64, json: bool) -> indicatif::ProgressBar {
    if json || !std::io::stderr().is_terminal() || len < 2 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} images {elapsed_precise}")
    {
        bar.set_style(style);
    }
    bar
}

/// The top `k` classes by probability: softmax over the classes, or a sigmoid
/// of each logit for multi-label and single-logit heads (what transformers'
/// image-classification pipeline means to do; its 4.46.3 code swaps the
/// single-label and multi-label cases).
fn classify(
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

fn summarize(path: &Path, cls: &Tensor) -> ImageResult {
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
enum ImageResult {
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
struct Class {
    index: i64,
    label: String,
    probability: f64,
}

#[derive(Serialize)]
struct EmbeddingSummary {
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

fn save_embeddings(path: &Path, all: &Tensor) -> CliResult {
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
