//! `vit-msn run --image`: images through a bundle or a bare artifact, in
//! batches, to top-k labels or CLS embeddings (what each image's result is,
//! and how it is printed or saved, is in run_images/results.rs; the masks
//! given on the command line are read in run_images/masks.rs).

mod masks;
mod results;

use std::io::IsTerminal;
use std::path::PathBuf;

use tch::Tensor;
use vit_msn::bare::{BareArtifact, ModelFacts, Primary};
use vit_msn::image::{preprocess_path, Preprocessing, MAX_TARGET_SIDE};
use vit_msn::manifest::ImageResolution;
use vit_msn::{Bundle, Error};

use masks::{head_mask_of, PatchMasks};
use results::{classify, save_embeddings, summarize, ImagesReport};

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
    match m.image_resolution()? {
        ImageResolution::Preprocessing(_) => Ok(None),
        ImageResolution::OnlyCompiled {
            size,
            preprocessing: (h, w),
        } => {
            eprintln!(
                "note: images are resized to {}x{}, the only compiled resolution (the preprocessing says {h}x{w})",
                size.0, size.1
            );
            Ok(Some(size))
        }
        ImageResolution::Ambiguous {
            preprocessing: (h, w),
        } => Err(usage(format!(
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
    let head_mask = head_mask_of(target, a)?;
    let masks = PatchMasks::read(a, patches, images.len())?;
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
        let mask = masks.for_images(start, chunk.len())?;
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
        let report = ImagesReport {
            artifact: a.artifact.as_deref(),
            bundle: a.bundle.as_deref(),
            results: &results,
        };
        println!("{}", report.to_json()?);
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
