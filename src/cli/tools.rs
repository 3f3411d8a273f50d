//! `preprocess` and `inspect`.

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;
use tch::Tensor;
use vit_msn::bundle::sha256_hex;
use vit_msn::cpu::{cpu_features_text, Cpu};
use vit_msn::describe::describe;
use vit_msn::image::{preprocess_path, Preprocessing};
use vit_msn::inputs::collect_images;
use vit_msn::manifest::MANIFEST_FILE;
use vit_msn::tensors::write_safetensors;
use vit_msn::{Error, Manifest};

use super::{resolution_arg, CliResult};

/// Write the pixel_values the runtime would feed for some images.
#[derive(Args)]
#[command(
    after_help = "The preprocessing is the bundle's (as compiled), else the model folder's
preprocessor_config.json, else ViT-MSN's default: resize to the model folder's image_size
(224x224 without --model) with PIL's bilinear filter, rescale by 1/255, normalize with the
ImageNet mean and std. --resolution overrides the size.

Examples:
  vit-msn preprocess --image cat.jpg --bundle artifacts/demo --output px.safetensors
  vit-msn preprocess --image photos/ --model vit-msn-small --output px.safetensors"
)]
pub struct PreprocessArgs {
    /// Image files or folders; several make a batch.
    #[arg(long, num_args = 1.., required = true)]
    image: Vec<PathBuf>,
    /// A Hugging Face model folder to take the preprocessing from.
    #[arg(long, conflicts_with = "bundle")]
    model: Option<PathBuf>,
    /// A bundle to take the preprocessing from.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Resize to N or HxW instead.
    #[arg(long)]
    resolution: Option<String>,
    /// Where to write `pixel_values` (safetensors, f32, B×C×H×W).
    #[arg(long)]
    output: PathBuf,
}

pub fn preprocess(a: PreprocessArgs) -> CliResult {
    let (mut pp, channels) = match (&a.bundle, &a.model) {
        (Some(b), _) => {
            let m = Manifest::read(b)?;
            (m.preprocessing()?, m.model.num_channels)
        }
        (None, Some(dir)) => model_preprocessing(dir)?,
        (None, None) => (Preprocessing::vit_msn_default(), 3),
    };
    if let Some(r) = &a.resolution {
        let (h, w) = resolution_arg(r)?;
        (pp.height, pp.width) = (h as u32, w as u32);
    }
    let inputs: Vec<&Path> = a.image.iter().map(PathBuf::as_path).collect();
    vit_msn::fsutil::check_output_file(&a.output, &inputs)?;
    let images = collect_images(&a.image)?;
    let px = images
        .iter()
        .map(|p| preprocess_path(p, &pp, channels))
        .collect::<Result<Vec<_>, _>>()?;
    write_safetensors(&a.output, &[("pixel_values", &Tensor::stack(&px, 0))])?;
    eprintln!(
        "wrote pixel_values {:?} to {}",
        [px.len() as i64, channels, pp.height as i64, pp.width as i64],
        a.output.display()
    );
    Ok(())
}

/// What ViTImageProcessor would use for a Hugging Face folder.
fn model_preprocessing(dir: &Path) -> Result<(Preprocessing, i64), Box<dyn std::error::Error>> {
    let read = |name: &str| -> Result<Option<serde_json::Value>, Box<dyn std::error::Error>> {
        let path = dir.join(name);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Some(serde_json::from_str(&text).map_err(|e| {
            Error::file(&path, format!("not valid JSON: {e}"))
        })?))
    };
    let config =
        read("config.json")?.ok_or_else(|| Error::file(&dir.join("config.json"), "missing"))?;
    let channels = config
        .get("num_channels")
        .and_then(|v| v.as_i64())
        .unwrap_or(3);
    let pp = match read("preprocessor_config.json")? {
        Some(v) => Preprocessing::from_json(&v)?,
        None => {
            let size = config
                .get("image_size")
                .and_then(|v| v.as_u64())
                .unwrap_or(224) as u32;
            Preprocessing {
                height: size,
                width: size,
                ..Preprocessing::vit_msn_default()
            }
        }
    };
    Ok((pp, channels))
}

/// Show a bundle's manifest, or a TorchScript file's forward schema.
#[derive(Args)]
#[command(after_help = "Examples:
  vit-msn inspect artifacts/demo
  vit-msn inspect artifacts/demo --json
  vit-msn inspect artifacts/demo/model_224x224.pt")]
pub struct InspectArgs {
    /// A bundle folder or a .pt file.
    path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn inspect(a: InspectArgs) -> CliResult {
    if a.path.is_dir() {
        return inspect_bundle(&a.path, a.json);
    }
    let d = describe(&a.path)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "file": a.path, "forward": d.forward_schema, "vit_msn": d.vit_msn })
            )?
        );
        return Ok(());
    }
    println!("file:    {}", a.path.display());
    println!("forward: {}", d.forward_schema);
    match d.vit_msn {
        Some(v) => println!("vit-msn artifact: {}", serde_json::to_string_pretty(&v)?),
        None => println!("(not written by vit-msn: no embedded description)"),
    }
    Ok(())
}

fn inspect_bundle(dir: &Path, as_json: bool) -> CliResult {
    let m = Manifest::read(dir)?;
    let digests: Vec<(String, bool)> = m
        .artifacts
        .iter()
        .map(|a| {
            let ok = std::fs::read(dir.join(&a.file))
                .map(|b| sha256_hex(&b) == a.sha256)
                .unwrap_or(false);
            (a.file.clone(), ok)
        })
        .collect();
    if as_json {
        let mut v = serde_json::to_value(&m)?;
        v["this_cpu"] = json!(Cpu::detect().summary());
        v["digests_ok"] = json!(digests
            .iter()
            .map(|(f, ok)| json!({ "file": f, "ok": ok }))
            .collect::<Vec<_>>());
        println!("{}", serde_json::to_string_pretty(&v)?);
        return digests_verified(dir, &digests);
    }
    println!(
        "bundle:   {} ({} format {})",
        dir.join(MANIFEST_FILE).display(),
        m.compiler,
        m.format_version
    );
    println!("task:     {}", m.task);
    let md = &m.model;
    println!(
        "model:    hidden {} · layers {} · heads {} · patch {} · channels {} · trained at {}",
        md.hidden_size,
        md.num_hidden_layers,
        md.num_attention_heads,
        md.patch_size,
        md.num_channels,
        md.image_size
    );
    println!("dtype:    {}    device: {}", m.dtype, m.device);
    println!("cpu features used: {}", cpu_features_text(&m.cpu_features));
    println!("this cpu: {}", Cpu::detect().summary());
    if !md.labels.is_empty() {
        println!(
            "labels:   {} ({})",
            md.labels.len(),
            md.labels
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(p) = &m.preprocessing {
        println!("preprocessing: {p}");
    }
    for (a, (_, ok)) in m.artifacts.iter().zip(&digests) {
        println!(
            "{}x{}: {}  sha256 {} ({})",
            a.height,
            a.width,
            a.file,
            &a.sha256[..a.sha256.len().min(16)],
            if *ok { "verified" } else { "MISMATCH" }
        );
        for s in &a.inputs {
            println!("    in  {:<16} {:<5} {:?}", s.name, s.dtype, s.shape);
        }
        for s in &a.outputs {
            println!("    out {:<16} {:<5} {:?}", s.name, s.dtype, s.shape);
        }
    }
    for w in &m.source.weights {
        println!("source:   {} sha256 {}", w.file, w.sha256);
    }
    digests_verified(dir, &digests)
}

/// After the listing: an artifact that differs from its manifest entry is a
/// failure, as it is for `run`, which refuses to load it.
fn digests_verified(dir: &Path, digests: &[(String, bool)]) -> CliResult {
    let bad: Vec<&str> = digests
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(f, _)| f.as_str())
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(Error::file(
        dir,
        format!(
            "sha256 of {} does not match the manifest (or the file cannot be read)",
            bad.join(", ")
        ),
    )
    .into())
}
