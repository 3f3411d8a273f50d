//! `vit-msn`: compile ViT-MSN checkpoints into TorchScript bundles and run them.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::dispatch(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: libtorch's own messages carry backtraces after the first.
            let message = e.to_string();
            eprintln!(
                "error: {}",
                message.lines().next().unwrap_or("unknown error")
            );
            ExitCode::from(1)
        }
    }
}
