//! The command line. Exit codes: 0 success, 1 failure, 2 usage error.

mod attention;
mod attention_map;
mod bench;
mod bench_report;
mod bundle;
mod compile;
mod demo;
mod fewshot;
mod fewshot_fit;
mod init;
mod run;
mod run_images;
mod serve;
mod tools;

use clap::{Parser, Subcommand};

pub type CliResult = Result<(), Box<dyn std::error::Error>>;

/// A command line that asks for something impossible, found after clap's
/// own checks (a missing input, a number out of range): exit code 2, as for
/// clap's errors.
#[derive(Debug)]
pub struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A [`Usage`] error, boxed as the commands return it.
pub fn usage(message: impl std::fmt::Display) -> Box<dyn std::error::Error> {
    Box::new(Usage(message.to_string()))
}

/// `--device`: a name that is no device is a usage error; a device this
/// machine lacks is not.
pub fn device_arg(name: &str) -> Result<tch::Device, Box<dyn std::error::Error>> {
    let device = vit_msn::device::parse_device_name(name).map_err(usage)?;
    vit_msn::device::check_available(device)?;
    Ok(device)
}

/// Load options for `--cuda-graphs`, which only a CUDA device can take.
pub fn load_options(
    cuda_graphs: bool,
    device: tch::Device,
) -> Result<vit_msn::bundle::LoadOptions, Box<dyn std::error::Error>> {
    if cuda_graphs && !matches!(device, tch::Device::Cuda(_)) {
        return Err(usage("--cuda-graphs needs --device cuda (or cuda:N)"));
    }
    Ok(vit_msn::bundle::LoadOptions {
        cuda_graphs,
        ..Default::default()
    })
}

/// `--resolution(s)`: `N` or `HxW`.
pub fn resolution_arg(text: &str) -> Result<(i64, i64), Box<dyn std::error::Error>> {
    vit_msn::manifest::parse_resolution(text).map_err(usage)
}

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
    Serve(serve::ServeArgs),
}

const MAX_THREADS: i32 = 1024;

pub fn dispatch(cli: Cli) -> CliResult {
    let threads = match cli.threads {
        Some(n) if n < 1 => return Err(usage("--threads must be at least 1")),
        // More would only oversubscribe; tens of thousands crash OpenMP itself.
        Some(n) if n > MAX_THREADS => {
            return Err(usage(format!("--threads must be at most {MAX_THREADS}")))
        }
        Some(n) => n,
        None => vit_msn::cpu::physical_cores() as i32,
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
        Command::Serve(a) => serve::serve(a),
    }
}
