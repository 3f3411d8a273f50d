use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;
use tch::{Kind, Tensor};
use vit_msn::bare::{read_labels, BareArtifact, Primary};
use vit_msn::bundle::LoadOptions;
use vit_msn::image::{preprocess_path, Preprocessing, MAX_TARGET_SIDE};
use vit_msn::inputs::{collect_images, parse_head_mask, random_mask, write_npy};
use vit_msn::manifest::{Manifest, MAX_CHANNELS, MAX_HEADS, MAX_LAYERS};
use vit_msn::tensors::{read_safetensors, write_safetensors};
use vit_msn::{loss::loss, Bundle, Error};

use super::{device_arg, load_options, one_resolution, resolution_arg, usage, CliResult};

/// Run a bundle on images, or on tensors from a safetensors file.
#[derive(Args)]
#[command(
    after_help = "With --image, images (and folders, walked in name order) are preprocessed as the
bundle was compiled for, and run in batches. A classifier prints the top-k labels; a
backbone prints a summary of each CLS embedding (--embeddings saves them all).

With --inputs, IN holds pixel_values (f32, B×C×H×W) and optionally bool_masked_pos
(bool or u8, B×N), head_mask (f32, heads or layers×heads) and labels; OUT gets
last_hidden_state or logits, any compiled hidden_states / attentions (stacked), and
loss when labels were given, all as f32.

--head-mask lists heads to REMOVE: LAYER:HEADS groups joined by ';', HEADS a comma
list or '*', LAYER an index or '*'. \"0:1,3;5:*\" removes heads 1 and 3 of layer 0 and
all heads of layer 5.

Examples:
  vit-msn run --bundle artifacts/demo --image cat.jpg photos/ --top-k 3
  vit-msn run --bundle artifacts/small --image photos/ --embeddings emb.npy --json
  vit-msn run --bundle artifacts/small --image a.png --mask-ratio 0.3 --seed 7 --head-mask \"0:1,3;5:*\"
  vit-msn run --bundle artifacts/small --inputs in.safetensors --output out.safetensors"
)]
pub struct RunArgs {
    /// Bundle folder.
    #[arg(
        long,
        required_unless_present = "artifact",
        conflicts_with = "artifact"
    )]
    bundle: Option<PathBuf>,
    /// A bare TorchScript file instead of a bundle: forward(pixel_values) or
    /// vit-msn's three inputs, returning a tensor, tuple or dict (see README).
    #[arg(long, conflicts_with = "inputs")]
    artifact: Option<PathBuf>,
    /// Class names for --artifact: a JSON list, an {"0": name} map, or a config
    /// with id2label (they win over --model's).
    #[arg(long, requires = "artifact", conflicts_with = "bundle")]
    labels: Option<PathBuf>,
    /// A Hugging Face folder giving --artifact its labels (id2label, if the
    /// config has one), preprocessing and sizes.
    #[arg(long, requires = "artifact", conflicts_with = "bundle")]
    model: Option<PathBuf>,
    /// Image files or folders.
    #[arg(long, num_args = 1.., conflicts_with = "inputs")]
    image: Vec<PathBuf>,
    /// Tensor inputs (safetensors).
    #[arg(long, requires = "output")]
    inputs: Option<PathBuf>,
    /// Where --inputs mode writes the outputs (safetensors).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Labels to print per image (classifiers).
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Print JSON on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Mask this fraction of each image's patches with the mask token.
    #[arg(long, conflicts_with = "mask_file")]
    mask_ratio: Option<f64>,
    /// Seed for --mask-ratio.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// bool_masked_pos from a safetensors file: (N,) for every image, or (images, N).
    #[arg(long)]
    mask_file: Option<PathBuf>,
    /// Heads to remove, e.g. "0:1,3;5:*".
    #[arg(long, conflicts_with = "head_mask_file")]
    head_mask: Option<String>,
    /// head_mask from a safetensors file: (heads,) or (layers, heads).
    #[arg(long)]
    head_mask_file: Option<PathBuf>,
    /// Save the CLS embeddings (backbone bundles) as .safetensors or .npy.
    #[arg(long)]
    embeddings: Option<PathBuf>,
    /// Preprocess to this compiled resolution (N or HxW) instead of the bundle's default.
    #[arg(long)]
    resolution: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Replay each batch shape's forward as a CUDA graph (CUDA bundles).
    #[arg(long, conflicts_with = "artifact")]
    cuda_graphs: bool,
}

pub fn run(a: RunArgs) -> CliResult {
    let device = device_arg(&a.device)?;
    let options = load_options(a.cuda_graphs, device)?;
    if let Some(inputs) = &a.inputs {
        let output = a
            .output
            .as_ref()
            .ok_or_else(|| usage("--inputs needs --output"))?;
        let dir = a
            .bundle
            .as_ref()
            .ok_or_else(|| usage("--inputs needs --bundle"))?;
        vit_msn::fsutil::check_output_file(output, &[inputs])?;
        return run_tensors(dir, device, options, inputs, output);
    }
    if a.image.is_empty() {
        return Err(usage(
            "give --image FILES/FOLDERS, or --inputs IN.safetensors --output OUT.safetensors",
        ));
    }
    if a.batch_size == 0 {
        return Err(usage("--batch-size must be at least 1"));
    }
    if let Some(ratio) = a.mask_ratio {
        if !(0.0..=1.0).contains(&ratio) {
            return Err(usage(format!("--mask-ratio {ratio} is not in [0, 1]")));
        }
    }
    if let Some(path) = &a.embeddings {
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("npy" | "safetensors")
        ) {
            return Err(usage(format!(
                "{}: --embeddings must end in .safetensors or .npy",
                path.display()
            )));
        }
        let inputs: Vec<&Path> = a.image.iter().map(PathBuf::as_path).collect();
        vit_msn::fsutil::check_output_file(path, &inputs)?;
    }
    let images = collect_images(&a.image)?;
    match (&a.bundle, &a.artifact) {
        (Some(dir), _) => {
            // Before the (possibly long) load: the size the images will have.
            let manifest = Manifest::read(dir)?;
            let size = match &a.resolution {
                Some(_) => None,
                None => compiled_size_for_images(&manifest)?,
            };
            let at = match (&a.resolution, size) {
                (Some(r), _) => resolution_arg(r)?,
                (None, Some(size)) => size,
                (None, None) => {
                    let pp = manifest.preprocessing()?;
                    (i64::from(pp.height), i64::from(pp.width))
                }
            };
            let options = one_resolution(options, &manifest, at)?;
            let bundle = Bundle::load_with(dir, device, &options)?;
            let target = Target::bundle(&bundle)?;
            run_images(&target, &images, &a, size)
        }
        (None, Some(file)) => {
            if !matches!(device, tch::Device::Cpu) {
                return Err(usage(
                    "--artifact runs on the CPU; compile a bundle for CUDA",
                ));
            }
            let bare = BareArtifact::load(file)?;
            let target = Target::bare(&bare, &a)?;
            run_images(&target, &images, &a, None)
        }
        (None, None) => Err(usage("give --bundle DIR or --artifact FILE.pt")),
    }
}

type Forward<'a> = Box<
    dyn Fn(
            &Tensor,
            Option<&Tensor>,
            Option<&Tensor>,
        ) -> Result<(Option<Tensor>, Option<Tensor>), Box<dyn std::error::Error>>
        + 'a,
>;

/// What `run --image` needs of a bundle or a bare artifact.
struct Target<'a> {
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
    fn bundle(bundle: &'a Bundle) -> Result<Self, Box<dyn std::error::Error>> {
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

    fn bare(bare: &'a BareArtifact, a: &RunArgs) -> Result<Self, Box<dyn std::error::Error>> {
        let config = match &a.model {
            Some(dir) => Some(read_json(&dir.join("config.json"))?),
            None => None,
        };
        let has_id2label = config.as_ref().is_some_and(|c| c.get("id2label").is_some());
        let labels = match (&a.labels, &a.model) {
            (Some(file), _) => read_labels(file)?,
            // A backbone's config may have no id2label: then no names.
            (None, Some(dir)) if has_id2label => read_labels(&dir.join("config.json"))?,
            _ => Vec::new(),
        };
        // Sizes from the config are bounded as a bundle's manifest is: mask
        // and head-mask sizes are computed from them.
        let int = |key: &str, max: i64| -> Result<Option<i64>, Box<dyn std::error::Error>> {
            let Some(v) = config.as_ref().and_then(|c| c.get(key)) else {
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
                _ => Err(format!(
                    "`{key}` in --model's config.json must be an integer in {min}..={max}, found {v}"
                )
                .into()),
            }
        };
        let side = i64::from(MAX_TARGET_SIDE);
        let image_size = target_side(int("image_size", side)?.unwrap_or(224), "image_size")?;
        let preprocessing = match a
            .model
            .as_ref()
            .map(|d| d.join("preprocessor_config.json"))
            .filter(|p| p.is_file())
        {
            Some(p) => Preprocessing::from_json(&read_json(&p)?)?,
            None => Preprocessing {
                height: image_size,
                width: image_size,
                ..Preprocessing::vit_msn_default()
            },
        };
        // A file traced at another size fails inside its graph, with a
        // message about tensor sizes; say where the size came from.
        let size_note = if a.model.is_none() && a.resolution.is_none() {
            " (ViT-MSN's default size; give --resolution or --model for the size the file was traced at)"
        } else {
            ""
        };
        let heads = match (
            int("num_hidden_layers", MAX_LAYERS)?,
            int("num_attention_heads", MAX_HEADS)?,
        ) {
            (Some(l), Some(h)) => Some((l, h)),
            _ => None,
        };
        Ok(Target {
            labels,
            preprocessing,
            channels: int("num_channels", MAX_CHANNELS)?.unwrap_or(3),
            patch_size: int("patch_size", side)?,
            heads,
            classifier: None,
            multi_label: config
                .as_ref()
                .and_then(|c| c.get("problem_type")?.as_str())
                == Some("multi_label_classification"),
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

fn read_json(path: &Path) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let text = vit_msn::fsutil::read_regular_text(path)?;
    Ok(serde_json::from_str(&text)
        .map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?)
}

fn run_tensors(
    dir: &Path,
    device: tch::Device,
    options: LoadOptions,
    inputs: &Path,
    output: &Path,
) -> CliResult {
    let tensors = read_safetensors(inputs)?;
    let get = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t);
    let pixel_values = get("pixel_values")
        .ok_or_else(|| format!("{}: no `pixel_values` tensor", inputs.display()))?;
    let options = match pixel_values.size()[..] {
        [_, _, h, w] => one_resolution(options, &Manifest::read(dir)?, (h, w))?,
        _ => options,
    };
    let bundle = Bundle::load_with(dir, device, &options)?;
    let out = bundle.forward(pixel_values, get("bool_masked_pos"), get("head_mask"))?;
    let mut named: Vec<(&str, &Tensor)> = out.named();
    let loss_value;
    if let (Some(labels), Some(logits)) = (get("labels"), out.logits.as_ref()) {
        loss_value = loss(
            logits,
            labels,
            bundle.manifest().model.problem_type.as_deref(),
        )?;
        named.push(("loss", &loss_value));
    }
    write_safetensors(output, &named)?;
    Ok(())
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

/// Without `--resolution`, images are resized as the bundle's preprocessing
/// says. When it was not compiled at that size: its only resolution, if it
/// has just one (a bundle compiled for 448 alone is meant to run at 448),
/// else an error listing them.
fn compiled_size_for_images(
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

fn run_images(
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
            print_result(r);
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
) -> serde_json::Value {
    let classes = logits.size().last().copied().unwrap_or(0).max(0) as usize;
    let probs = if multi_label || classes == 1 {
        logits.to_kind(Kind::Float).sigmoid()
    } else {
        logits.softmax(-1, Kind::Float)
    };
    // Never more than there are classes: topk would fail.
    let k = k.min(classes) as i64;
    let (p, idx) = probs.topk(k, -1, true, true);
    let top: Vec<_> = (0..k)
        .map(|j| {
            let index = idx.int64_value(&[j]);
            json!({
                "label": labels.get(index as usize).cloned().unwrap_or_else(|| format!("LABEL_{index}")),
                "index": index,
                "probability": p.double_value(&[j]),
            })
        })
        .collect();
    let logits = Vec::<f32>::try_from(logits.to_kind(Kind::Float)).unwrap_or_default();
    json!({ "image": path, "top_k": top, "logits": logits })
}

fn summarize(path: &Path, cls: &Tensor) -> serde_json::Value {
    let v = Vec::<f32>::try_from(cls.to_kind(Kind::Float)).unwrap_or_default();
    let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len().max(1) as f64;
    json!({
        "image": path,
        "embedding": { "dim": v.len(), "l2_norm": norm, "mean": mean, "first": &v[..v.len().min(4)] },
    })
}

fn print_result(r: &serde_json::Value) {
    let image = r["image"].as_str().unwrap_or("?");
    if let Some(top) = r["top_k"].as_array() {
        let parts: Vec<String> = top
            .iter()
            .map(|t| {
                format!(
                    "{} {:.3}",
                    t["label"].as_str().unwrap_or("?"),
                    t["probability"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        println!("{image}: {}", parts.join(", "));
    } else {
        let e = &r["embedding"];
        let first: Vec<String> = e["first"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| format!("{:.3}", x.as_f64().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{image}: CLS embedding dim {} |x| {:.3} mean {:.4} [{}, ...]",
            e["dim"],
            e["l2_norm"].as_f64().unwrap_or(0.0),
            e["mean"].as_f64().unwrap_or(0.0),
            first.join(", ")
        );
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
