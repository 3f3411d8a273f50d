use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use vit_msn::compiler::compile_bundle;
use vit_msn::device;
use vit_msn_graph::encoder::{AttentionImpl, LinearBackend};
use vit_msn_graph::{CompileOptions, Task, Wanted};

use super::{device_arg, resolution_arg, usage, CliResult};

/// Compile a Hugging Face ViT-MSN folder into a bundle of TorchScript artifacts.
#[derive(Args)]
#[command(after_help = "Examples:
  vit-msn compile --model vit-msn-small --out artifacts/small
  vit-msn compile --model my-finetuned --out artifacts/ft --resolutions 224,384,160x192 --dtype bf16
  vit-msn compile --model vit-msn-small --out artifacts/small-att --outputs hidden_states,attentions")]
pub struct CompileArgs {
    /// Folder with config.json and model.safetensors or pytorch_model.bin.
    #[arg(long)]
    model: PathBuf,
    /// Bundle folder to write (replaced atomically if it exists).
    #[arg(long)]
    out: PathBuf,
    /// Comma-separated N or HxW; default the trained resolution.
    #[arg(long, value_delimiter = ',')]
    resolutions: Vec<String>,
    /// Optional outputs: hidden_states, attentions.
    #[arg(long, value_delimiter = ',')]
    outputs: Vec<String>,
    /// f32, f16, bf16, or int8: f32 tensors in and out, linears on int8
    /// weights (one scale per output channel) with activations quantized on
    /// each call, as PyTorch's dynamic quantization; CPU only.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// backbone or classification; default from the config's `architectures`.
    #[arg(long)]
    task: Option<String>,
    /// GEMM for the linears: onednn (fuses GELU; the default on the CPU in
    /// f32, and in bf16 where this CPU has oneDNN's bf16 kernel, AVX-512 or
    /// AVX2-VNNI-2) or aten (MKL/cuBLAS; runs on every CPU, and the default
    /// otherwise).
    #[arg(long)]
    linear: Option<String>,
    /// Attention where the attentions are not returned: sdpa
    /// (scaled_dot_product_attention, in blocks) or explicit (two batched
    /// matmuls around a softmax; the default in bf16 with oneDNN's linears
    /// at up to 257 tokens, where it is faster). `--outputs attentions`
    /// computes transformers' eager attention instead.
    #[arg(long)]
    attention: Option<String>,
}

pub fn compile(a: CompileArgs) -> CliResult {
    let mut wanted = Wanted::default();
    for o in &a.outputs {
        match o.trim() {
            "hidden_states" => wanted.hidden_states = true,
            "attentions" => wanted.attentions = true,
            "" => {}
            other => {
                return Err(usage(format!(
                    "--outputs: unknown output `{other}` (expected hidden_states, attentions)"
                )))
            }
        }
    }
    let resolutions = a
        .resolutions
        .iter()
        .map(|r| resolution_arg(r))
        .collect::<Result<Vec<_>, _>>()?;
    let int8 = vit_msn_format::Dtype::parse(&a.dtype) == Some(vit_msn_format::Dtype::Int8);
    if int8 && a.linear.is_some() {
        return Err(usage(
            "--linear does not apply to --dtype int8, whose linears are fbgemm's int8 ones",
        ));
    }
    if int8 && a.device.trim() != "cpu" {
        return Err(vit_msn::compiler::int8_on_cuda().into());
    }
    let attention = match a.attention.as_deref() {
        None => None,
        Some(_) if wanted.attentions => return Err(usage(
            "--attention does not apply with --outputs attentions, which computes eager attention",
        )),
        Some("sdpa") => Some(AttentionImpl::Sdpa),
        Some("explicit") => Some(AttentionImpl::Explicit),
        Some(other) => {
            return Err(usage(format!(
                "--attention: unknown implementation `{other}` (expected sdpa or explicit)"
            )))
        }
    };
    let opts = CompileOptions {
        resolutions,
        wanted,
        kind: device::parse_dtype(&a.dtype).map_err(usage)?,
        device: device_arg(&a.device)?,
        task: a
            .task
            .as_deref()
            .map(str::parse::<Task>)
            .transpose()
            .map_err(usage)?,
        linear: match a.linear.as_deref() {
            None if int8 => Some(LinearBackend::DynamicInt8),
            None => None,
            Some("aten") => Some(LinearBackend::Aten),
            Some("onednn") => Some(LinearBackend::OneDnn),
            Some(other) => {
                return Err(usage(format!(
                    "--linear: unknown backend `{other}` (expected aten or onednn)"
                )))
            }
        },
        attention,
        cpu_features: Vec::new(),
    };
    // Tracing a large model takes a while: show that it is working, on a terminal.
    let spinner = if std::io::stderr().is_terminal() {
        let s = indicatif::ProgressBar::new_spinner();
        s.set_message(format!(
            "compiling {} ({} resolution(s))",
            a.model.display(),
            opts.resolutions.len().max(1)
        ));
        s.enable_steady_tick(std::time::Duration::from_millis(120));
        s
    } else {
        indicatif::ProgressBar::hidden()
    };
    let report = compile_bundle(&a.model, &a.out, &opts);
    spinner.finish_and_clear();
    let report = report?;
    if !report.source.unused_tensors.is_empty() {
        eprintln!(
            "warning: {} checkpoint tensor(s) not used by the {} model: {}",
            report.source.unused_tensors.len(),
            report.task,
            report.source.unused_tensors.join(", ")
        );
    }
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
