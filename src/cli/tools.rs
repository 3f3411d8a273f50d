//! `preprocess`, and `inspect` (in tools/inspect.rs).

mod inspect;

use std::path::{Path, PathBuf};

use clap::Args;
use tch::Tensor;
use vit_msn::image::{preprocess_path, Preprocessing};
use vit_msn::inputs::collect_images;
use vit_msn::tensors::write_safetensors;
use vit_msn::{Error, Manifest};

pub use inspect::{inspect, InspectArgs};

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
    vit_msn::files::check_result_file(&a.output, &inputs)?;
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
