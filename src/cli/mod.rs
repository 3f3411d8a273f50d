//! The command line. Exit codes: 0 success, 1 failure, 2 usage error.

mod attention;
mod bench;
mod bundle;
mod compile;
mod demo;
mod fewshot;
mod init;
mod run;
mod tools;

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
    /// Intra-op threads for libtorch (default: the machine's physical cores).
    #[arg(long, global = true)]
    threads: Option<i32>,
}

#[derive(Subcommand)]
enum Command {
    Compile(compile::CompileArgs),
    Run(run::RunArgs),
    Inspect(tools::InspectArgs),
    Preprocess(tools::PreprocessArgs),
    Attention(attention::AttentionArgs),
    Demo(demo::DemoArgs),
    Bench(bench::BenchArgs),
    Bundle(bundle::BundleArgs),
    Fewshot(fewshot::FewshotArgs),
    Init(init::InitArgs),
}

const MAX_THREADS: i32 = 1024;

pub fn dispatch(cli: Cli) -> CliResult {
    let threads = match cli.threads {
        Some(n) if n < 1 => return Err("--threads must be at least 1".into()),
        // More would only oversubscribe; tens of thousands crash OpenMP itself.
        Some(n) if n > MAX_THREADS => {
            return Err(format!("--threads must be at most {MAX_THREADS}").into())
        }
        Some(n) => n,
        None => vit_msn::bench::physical_cores() as i32,
    };
    tch::set_num_threads(threads);
    match cli.command {
        Command::Compile(a) => compile::compile(a),
        Command::Run(a) => run::run(a),
        Command::Inspect(a) => tools::inspect(a),
        Command::Preprocess(a) => tools::preprocess(a),
        Command::Attention(a) => attention::attention(a),
        Command::Demo(a) => demo::demo(a),
        Command::Bench(a) => bench::bench(a),
        Command::Bundle(a) => bundle::bundle(a),
        Command::Fewshot(a) => fewshot::fewshot(a),
        Command::Init(a) => init::init(a),
    }
}
