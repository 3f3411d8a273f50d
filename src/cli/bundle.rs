use std::path::PathBuf;

use clap::{Args, Subcommand};
use vit_msn::bundle::replace_artifact_waiting;

use super::{resolution_arg, CliResult};

/// Change a compiled bundle, or pack traced files into one.
#[derive(Args)]
pub struct BundleArgs {
    #[command(subcommand)]
    command: BundleCommand,
}

#[derive(Subcommand)]
enum BundleCommand {
    Replace(ReplaceArgs),
    Pack(PackArgs),
}

/// Pack TorchScript files traced elsewhere into a bundle: each `.pt` in
/// --artifacts must carry vit-msn's `extra/vit_msn.json` description (as
/// graph/python/export.py writes it); the manifest is made from the model
/// folder, exactly as `vit-msn compile` makes it.
#[derive(Args)]
#[command(after_help = "Examples:
  vit-msn bundle pack --model my-finetuned --artifacts traced/ --out artifacts/ft")]
struct PackArgs {
    /// The Hugging Face folder the files were traced from (config.json, weights).
    #[arg(long)]
    model: PathBuf,
    /// Folder of traced .pt files, one per resolution.
    #[arg(long)]
    artifacts: PathBuf,
    /// Bundle folder to write (replaced atomically if it exists).
    #[arg(long)]
    out: PathBuf,
    /// What made the files, recorded as the manifest's `compiler`.
    #[arg(long, default_value = "vit-msn bundle pack")]
    producer: String,
}

/// Swap one resolution's artifact for a new TorchScript file (e.g. one exported
/// from a fine-tuned model by graph/python/export.py). The new file must load,
/// accept the bundle's inputs and return the manifest's outputs at their shapes
/// (checked with a probe run), and, where it describes itself, have been
/// compiled for this resolution and dtype; otherwise the bundle is left
/// untouched. Everything else in the bundle folder (e.g. `cache/`) is kept.
#[derive(Args)]
#[command(
    after_help = "One change at a time: while another `bundle replace` is changing the same bundle,
this one waits for it (up to --wait seconds, then fails with \"another process is changing
this bundle\").

Examples:
  vit-msn bundle replace --bundle artifacts/small --resolution 224 --artifact finetuned/model_224x224.pt"
)]
struct ReplaceArgs {
    #[arg(long)]
    bundle: PathBuf,
    /// The resolution to replace (N or HxW).
    #[arg(long)]
    resolution: String,
    /// The new TorchScript file.
    #[arg(long)]
    artifact: PathBuf,
    /// Seconds to wait while another process changes the bundle (0: fail at once).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..=86400))]
    wait: u64,
}

pub fn bundle(a: BundleArgs) -> CliResult {
    match a.command {
        BundleCommand::Replace(r) => {
            let (h, w) = resolution_arg(&r.resolution)?;
            let wait = std::time::Duration::from_secs(r.wait);
            replace_artifact_waiting(&r.bundle, h, w, &r.artifact, wait)?;
            eprintln!("replaced {h}x{w} in {}", r.bundle.display());
            Ok(())
        }
        BundleCommand::Pack(p) => {
            vit_msn::compiler::pack_bundle(&p.model, &p.artifacts, &p.out, &p.producer)?;
            eprintln!("wrote {}", p.out.display());
            Ok(())
        }
    }
}
