use std::path::PathBuf;

use super::bench_report::{
    check_plan, comparable, model_summary, parse_fraction, percent, read_report, regressions,
    time_batch, Report,
};
use clap::Args;
use vit_msn::bundle::{CpuLinears, LoadOptions};
use vit_msn::cpu::{cpu_features_text, Cpu};
use vit_msn::files::{check_replaceable_file, write_result_file};
use vit_msn::manifest::Manifest;
use vit_msn::Bundle;

use super::{device_arg, load_options, resolution_arg, usage, CliResult};

/// Time a bundle's forward pass: median, p90 and fastest latency, images/s and peak
/// RSS per batch size; compare with a saved baseline to catch slowdowns.
#[derive(Args)]
#[command(
    after_help = "Exits 1 when a batch size's median is slower than the baseline's by more than
--max-regression, naming it, and then does not write --save-baseline. A baseline measured
at another dtype, resolution or device, or on a model of another shape, is refused; so is
one that holds none of the batch sizes run (those it lacks are listed and not compared).

Examples:
  vit-msn bench --bundle artifacts/demo --batch 1,8 --save-baseline base.json
  vit-msn bench --bundle artifacts/new --batch 1,8 --baseline base.json --max-regression 10%
  vit-msn bench --bundle artifacts/demo --batch 1,8,32 --iters 50 --threads 2 --json"
)]
pub struct BenchArgs {
    #[arg(long)]
    bundle: PathBuf,
    /// Batch sizes, comma-separated, each at most 65536 (and refused when
    /// the memory available cannot hold it).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<i64>,
    /// Timed forward passes per batch size (1 to 1000000).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed passes first (0 to 1000000).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Resolution to run (N or HxW); default the bundle's first.
    #[arg(long)]
    resolution: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Compare with this saved report.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Save this run's report here.
    #[arg(long)]
    save_baseline: Option<PathBuf>,
    /// Allowed slowdown of a median against the baseline, in percent:
    /// `10`, `10%` and `10.0%` all mean ten percent; `0.5` is half a percent.
    #[arg(long, default_value = "10%")]
    max_regression: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Leave the oneDNN linear weights unpacked (to measure what prepacking gives).
    #[arg(long)]
    no_prepack: bool,
    /// f32 on the CPU: `fused` keeps GELU as the oneDNN linear's post-op,
    /// `split` runs it after the linear; default: split without AVX-512.
    #[arg(long, value_parser = ["fused", "split"])]
    gelu: Option<String>,
    /// f32 and int8 on the CPU: the GEMM for the linears. f32: `onednn` or
    /// `mkl` (oneMKL's packed sgemm, for those without a fused post-op);
    /// default mkl where oneMKL runs its AVX2 kernels on an AMD CPU without
    /// AVX-512, else onednn. int8: `fbgemm` or `onednn` (oneDNN's u8·s8
    /// GEMM from VIT_MSN_INT8_ONEDNN_MIN_ROWS rows, default 1000, fbgemm
    /// below); default onednn without AVX-512, else fbgemm. Or
    /// `VIT_MSN_CPU_LINEARS`.
    #[arg(long, value_parser = ["onednn", "mkl", "fbgemm"])]
    linears: Option<String>,
    /// Replay each batch size's forward as a CUDA graph (CUDA bundles).
    #[arg(long)]
    cuda_graphs: bool,
}

pub fn bench(a: BenchArgs) -> CliResult {
    // Everything that can be refused is refused before the bundle loads.
    check_plan(&a.batch, a.iters, a.warmup).map_err(usage)?;
    let max_regression = parse_fraction(&a.max_regression).map_err(usage)?;
    if let Some(path) = &a.save_baseline {
        // The refusal the write would make, made before the run, not after it.
        check_replaceable_file(path)?;
    }
    let baseline = match &a.baseline {
        Some(path) => Some((path, read_report(path)?)),
        None => None,
    };
    let device = device_arg(&a.device)?;
    let manifest = Manifest::read(&a.bundle)?;
    let (height, width) = match &a.resolution {
        Some(r) => resolution_arg(r)?,
        None => (manifest.artifacts[0].height, manifest.artifacts[0].width),
    };
    // --warmup passes stand in for the load-time ones, and the peak RSS is
    // that of the one artifact timed.
    let options = LoadOptions {
        prepack_linears: !a.no_prepack,
        fused_gelu: a.gelu.as_deref().map(|g| g == "fused"),
        cpu_linears: a.linears.as_deref().and_then(CpuLinears::parse),
        ..load_options(a.cuda_graphs, device)?
    }
    .single_use(&manifest, (height, width))?;
    let bundle = Bundle::load_manifest(&a.bundle, manifest, device, &options)?;
    let m = bundle.manifest();
    for &batch in &a.batch {
        bundle.check_batch(batch, height, width)?;
    }
    let mut report = Report {
        bundle: a.bundle.display().to_string(),
        model: Some(model_summary(&bundle)),
        dtype: m.dtype.clone(),
        device: bundle.device_name(),
        threads: tch::get_num_threads() as i64,
        height,
        width,
        iters: a.iters,
        cpu: (device == tch::Device::Cpu).then(|| Cpu::detect().summary()),
        mkl: (device == tch::Device::Cpu).then(|| vit_msn::mkl::status().describe().to_owned()),
        linears: bundle.cpu_linears().map(|l| l.name().to_owned()),
        cpu_features: m.cpu_features.clone(),
        results: Vec::new(),
    };
    let not_compared = match &baseline {
        Some((path, base)) => comparable(&report, base, &a.batch, path)?,
        None => Vec::new(),
    };
    for &batch in &a.batch {
        let r = time_batch(&bundle, batch, height, width, a.warmup, a.iters)?;
        if !a.json {
            println!(
                "batch {:>4}: median {:>9.2} ms  p90 {:>9.2} ms  min {:>9.2} ms  {:>8.1} images/s  peak RSS {:.0} MiB",
                r.batch,
                r.median_ms,
                r.p90_ms,
                r.min_ms.unwrap_or(f64::NAN),
                r.images_per_s,
                r.peak_rss_mib
            );
        }
        report.results.push(r);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "({} {}x{} on {}, {} threads, {} timed passes each)",
            report.dtype, height, width, report.device, report.threads, a.iters
        );
        if let Some(cpu) = &report.cpu {
            println!("cpu: {cpu}");
            if let Some(mkl) = &report.mkl {
                println!("oneMKL: {mkl}");
            }
            if let Some(linears) = bundle.cpu_linears() {
                println!("linears: {}", linears.describe(&m.dtype));
            }
            println!("bundle uses: {}", cpu_features_text(&m.cpu_features));
        }
    }
    let slower = match &baseline {
        Some((_, base)) => regressions(&report, base, max_regression),
        None => Vec::new(),
    };
    // A run that fails the comparison is not saved: with `--baseline X
    // --save-baseline X`, the slower numbers would become the next reference.
    if let Some(path) = &a.save_baseline {
        if slower.is_empty() {
            write_result_file(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        } else {
            eprintln!(
                "note: not saved to {}, since this run is slower than the baseline",
                path.display()
            );
        }
    }
    if let Some((path, base)) = &baseline {
        // Notes, not errors: comparing a new bundle with an old one's
        // baseline is what a baseline is for.
        if base.threads != report.threads {
            eprintln!(
                "note: the baseline {} was measured with {} threads, this run with {}",
                path.display(),
                base.threads,
                report.threads
            );
        }
        if !not_compared.is_empty() {
            let list: Vec<String> = not_compared.iter().map(|b| b.to_string()).collect();
            eprintln!(
                "note: the baseline {} has no result for batch size(s) {}; not compared",
                path.display(),
                list.join(", ")
            );
        }
        if !slower.is_empty() {
            return Err(format!(
                "slower than the baseline {}: {}",
                path.display(),
                slower.join("; ")
            )
            .into());
        }
        if !a.json {
            println!(
                "no median slower than the baseline {} by more than {}",
                path.display(),
                percent(max_regression)
            );
        }
    }
    Ok(())
}
