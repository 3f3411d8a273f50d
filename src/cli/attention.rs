use std::path::{Path, PathBuf};

use super::attention_map::{cls_attention, colormap, heat_grid, HeadChoice, LayerChoice};
use clap::Args;
use vit_msn::bundle::LoadOptions;
use vit_msn::files::{check_result_file, write_result_file_with};
use vit_msn::image::{load_image, preprocess_image};
use vit_msn::{Bundle, Error};

use super::{device_arg, usage, CliResult};

/// Draw where the CLS token looks: a heat map of its attention over the patches,
/// on the image at the image's own size (PNG). The bundle must be compiled with
/// `--outputs attentions`.
#[derive(Args)]
#[command(after_help = "Examples:
  vit-msn attention --bundle artifacts/demo --image cat.jpg --out cat-attention.png
  vit-msn attention --bundle artifacts/demo --image cat.jpg --out l3h2.png --layer 3 --head 2
  vit-msn attention --bundle artifacts/demo --image cat.jpg --out rollout.png --layer rollout")]
pub struct AttentionArgs {
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    image: PathBuf,
    /// Where to write the PNG.
    #[arg(long)]
    out: PathBuf,
    /// A layer index, `last`, or `rollout` (attention rollout across layers).
    #[arg(long, default_value = "last")]
    layer: String,
    /// A head index, or `mean` of the heads.
    #[arg(long, default_value = "mean")]
    head: String,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn attention(a: AttentionArgs) -> CliResult {
    let layer: LayerChoice = a.layer.parse().map_err(usage)?;
    let head: HeadChoice = a.head.parse().map_err(usage)?;
    let device = device_arg(&a.device)?;
    let bundle = vit_msn::Bundle::load_for_images(&a.bundle, device, LoadOptions::default())?;
    // An index past the model's layers or heads is a usage error, as for --head-mask.
    let model = &bundle.manifest().model;
    if let LayerChoice::Index(l) = layer {
        if !(0..model.num_hidden_layers).contains(&l) {
            return Err(usage(format!(
                "--layer {l} is not in 0..{}",
                model.num_hidden_layers
            )));
        }
    }
    if let HeadChoice::Index(h) = head {
        if !(0..model.num_attention_heads).contains(&h) {
            return Err(usage(format!(
                "--head {h} is not in 0..{}",
                model.num_attention_heads
            )));
        }
    }
    check_result_file(&a.out, &[&a.image])?;
    write_attention_map(&bundle, &a.image, &a.out, layer, head)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// Runs one image and writes its attention map to `out`.
pub fn write_attention_map(
    bundle: &Bundle,
    image: &Path,
    out: &Path,
    layer: LayerChoice,
    head: HeadChoice,
) -> CliResult {
    let m = bundle.manifest();
    let has_attentions = m
        .artifacts
        .iter()
        .all(|a| a.outputs.iter().any(|o| o.name == "attentions"));
    if !has_attentions {
        return Err(format!(
            "{}: compiled without attentions; compile with --outputs attentions",
            bundle.dir().display()
        )
        .into());
    }
    let pp = m.preprocessing()?;
    let decoded = load_image(image, m.model.num_channels)?;
    let px = preprocess_image(&decoded, &pp)?.unsqueeze(0);
    let attentions = bundle
        .forward(&px, None, None)?
        .attentions
        .ok_or("the bundle returned no attentions")?;
    let scores = cls_attention(&attentions, 0, layer, head)?;
    let (gh, gw) = (
        pp.height as i64 / m.model.patch_size,
        pp.width as i64 / m.model.patch_size,
    );
    let (w, h) = (decoded.width(), decoded.height());
    let heat = heat_grid(&scores, gh, gw, h as i64, w as i64);
    let heat = Vec::<f32>::try_from(heat.flatten(0, -1)).map_err(|e| e.to_string())?;
    let channels = decoded.channels() as usize;
    let mut rgb = Vec::with_capacity(heat.len() * 3);
    for (i, v) in heat.iter().enumerate() {
        let color = colormap(*v);
        for (c, tint) in color.iter().enumerate() {
            let base = decoded.pixels()[i * channels + if channels == 3 { c } else { 0 }];
            rgb.push(((base as f32) * 0.45 + (*tint as f32) * 0.55).round() as u8);
        }
    }
    let img =
        image::RgbImage::from_raw(w, h, rgb).ok_or("attention map buffer has the wrong size")?;
    write_result_file_with(out, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
            .map_err(|e| Error::file(out, e.to_string()))
    })?;
    Ok(())
}
