use std::path::PathBuf;

use clap::Args;
use tch::Tensor;
use vit_msn::tensors::{read_safetensors, write_safetensors};
use vit_msn::{loss::loss, parse_device, Bundle, Manifest};

use super::CliResult;

/// Run a bundle on tensors from a safetensors file.
#[derive(Args)]
#[command(
    after_help = "IN holds pixel_values (f32, B×C×H×W) and optionally bool_masked_pos (bool or u8, B×N),
head_mask (f32, heads or layers×heads) and labels. OUT gets last_hidden_state or logits, any
compiled hidden_states / attentions (stacked), and loss when labels were given, all as f32.

Examples:
  vit-msn run --bundle artifacts/small --inputs in.safetensors --output out.safetensors
  vit-msn run --bundle artifacts/small --inputs in.safetensors --output out.safetensors --device cuda"
)]
pub struct RunArgs {
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    inputs: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: RunArgs) -> CliResult {
    let device = parse_device(&a.device)?;
    let bundle = Bundle::load(&a.bundle, device)?;
    let tensors = read_safetensors(&a.inputs)?;
    let get = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t);
    let pixel_values = get("pixel_values")
        .ok_or_else(|| format!("{}: no `pixel_values` tensor", a.inputs.display()))?;
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
    write_safetensors(&a.output, &named)?;
    Ok(())
}

/// Show a bundle's manifest.
#[derive(Args)]
pub struct InspectArgs {
    /// Bundle folder.
    bundle: PathBuf,
}

pub fn inspect(a: InspectArgs) -> CliResult {
    let m = Manifest::read(&a.bundle)?;
    println!("{}", serde_json::to_string_pretty(&m)?);
    Ok(())
}
