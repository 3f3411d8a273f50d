//! The command line. Exit codes: 0 success, 1 failure, 2 usage error.

mod compile;
mod demo;
mod run;

use clap::{Parser, Subcommand};

pub type CliResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    name = "vit-msn",
    version,
    about = "Compile ViT-MSN checkpoints into TorchScript bundles, and run them"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Compile(compile::CompileArgs),
    Run(run::RunArgs),
    Inspect(run::InspectArgs),
    Demo(demo::DemoArgs),
}

pub fn dispatch(cli: Cli) -> CliResult {
    match cli.command {
        Command::Compile(a) => compile::compile(a),
        Command::Run(a) => run::run(a),
        Command::Inspect(a) => run::inspect(a),
        Command::Demo(a) => demo::demo(a),
    }
}
