use std::path::PathBuf;

use clap::Args;
use vit_msn::files::{check_new_folder, read_input_file, write_new_folder};
use vit_msn::Error;
use vit_msn_graph::untrained::write_untrained_checkpoint;

use super::CliResult;

/// Write a Hugging Face model folder with deterministic UNTRAINED weights for
/// a config.json: a model of any shape to benchmark or test with, where no
/// weights can be downloaded.
#[derive(Args)]
#[command(
    after_help = "The weights are random (seeded), so predictions are meaningless.

Examples:
  vit-msn init --config vit-b16.json --out models/vit-b16-untrained
  vit-msn init --config config.json --out /tmp/m --seed 7"
)]
pub struct InitArgs {
    /// A transformers ViT-MSN config.json (its `architectures` picks backbone or classifier).
    #[arg(long)]
    config: PathBuf,
    /// Folder to write config.json and model.safetensors into; it must not exist, or be empty.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

pub fn init(mut a: InitArgs) -> CliResult {
    // Never over a folder with anything in it: it may hold a trained model.
    a.out = check_new_folder(&a.out, &[&a.config])?;
    // As the compiler reads config.json: 16 MiB at most.
    let len = std::fs::metadata(&a.config)
        .map_err(|e| Error::io(&a.config, e))?
        .len();
    if len > 16 << 20 {
        return Err(
            Error::file(&a.config, format!("{len} bytes is too large for a config")).into(),
        );
    }
    let bytes = read_input_file(&a.config)?;
    let config: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::file(&a.config, format!("not JSON: {e}")))?;
    write_new_folder(&a.out, |staged| {
        write_untrained_checkpoint(staged, &config, a.seed)
            .map_err(|e| Error::file(&a.config, e.to_string()))
    })?;
    println!(
        "wrote {} (UNTRAINED weights, seed {})",
        a.out.display(),
        a.seed
    );
    Ok(())
}
