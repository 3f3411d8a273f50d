use std::path::PathBuf;

use clap::{Args, Subcommand};
use vit_msn::bundle::replace_artifact;
use vit_msn::manifest::parse_resolution;

use super::CliResult;

/// Change a compiled bundle.
#[derive(Args)]
pub struct BundleArgs {
    #[command(subcommand)]
    command: BundleCommand,
}

#[derive(Subcommand)]
enum BundleCommand {
    Replace(ReplaceArgs),
}

/// Swap one resolution's artifact for a new TorchScript file (e.g. one exported
/// from a fine-tuned model by graph/python/export.py). The new file must load,
/// accept the bundle's inputs and return the manifest's outputs at their shapes
/// (checked with a probe run); otherwise the bundle is left untouched.
#[derive(Args)]
#[command(after_help = "Examples:
  vit-msn bundle replace --bundle artifacts/small --resolution 224 --artifact finetuned/model_224x224.pt")]
struct ReplaceArgs {
    #[arg(long)]
    bundle: PathBuf,
    /// The resolution to replace (N or HxW).
    #[arg(long)]
    resolution: String,
    /// The new TorchScript file.
    #[arg(long)]
    artifact: PathBuf,
}

pub fn bundle(a: BundleArgs) -> CliResult {
    match a.command {
        BundleCommand::Replace(r) => {
            let (h, w) = parse_resolution(&r.resolution)?;
            replace_artifact(&r.bundle, h, w, &r.artifact)?;
            eprintln!("replaced {h}x{w} in {}", r.bundle.display());
            Ok(())
        }
    }
}
