use std::path::PathBuf;

use clap::Args;
use vit_msn::bench::{parse_fraction, read_report, regressions, time_batch, Report};
use vit_msn::bundle::LoadOptions;
use vit_msn::fsutil::write_atomic;
use vit_msn::manifest::parse_resolution;
use vit_msn::{parse_device, Bundle};

use super::CliResult;

/// Time a bundle's forward pass: median and p90 latency, images/s and peak
/// RSS per batch size; compare with a saved baseline to catch slowdowns.
#[derive(Args)]
#[command(
    after_help = "Exits 1 when a batch size's median is slower than the baseline's by more than
--max-regression, naming it.

Examples:
  vit-msn bench --bundle artifacts/demo --batch 1,8 --save-baseline base.json
  vit-msn bench --bundle artifacts/new --batch 1,8 --baseline base.json --max-regression 10%
  vit-msn bench --bundle artifacts/demo --batch 1,8,32 --iters 50 --threads 2 --json"
)]
pub struct BenchArgs {
    #[arg(long)]
    bundle: PathBuf,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<i64>,
    /// Timed forward passes per batch size.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed passes first.
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
    /// Allowed slowdown of a median against the baseline.
    #[arg(long, default_value = "10%")]
    max_regression: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Leave the oneDNN linear weights unpacked (to measure what prepacking gives).
    #[arg(long)]
    no_prepack: bool,
}

pub fn bench(a: BenchArgs) -> CliResult {
    let max_regression = parse_fraction(&a.max_regression)?;
    let baseline = a.baseline.as_deref().map(read_report).transpose()?;
    let options = LoadOptions {
        prepack_linears: !a.no_prepack,
    };
    let bundle = Bundle::load_with(&a.bundle, parse_device(&a.device)?, &options)?;
    let m = bundle.manifest();
    let (height, width) = match &a.resolution {
        Some(r) => parse_resolution(r)?,
        None => (m.artifacts[0].height, m.artifacts[0].width),
    };
    let mut report = Report {
        bundle: a.bundle.display().to_string(),
        dtype: m.dtype.clone(),
        device: bundle.device_name(),
        threads: tch::get_num_threads() as i64,
        height,
        width,
        iters: a.iters,
        results: Vec::new(),
    };
    for &batch in &a.batch {
        let r = time_batch(&bundle, batch, height, width, a.warmup, a.iters)?;
        if !a.json {
            println!(
                "batch {:>4}: median {:>9.2} ms  p90 {:>9.2} ms  {:>8.1} images/s  peak RSS {:.0} MiB",
                r.batch, r.median_ms, r.p90_ms, r.images_per_s, r.peak_rss_mib
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
    }
    if let Some(path) = &a.save_baseline {
        write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if let (Some(base), Some(path)) = (&baseline, &a.baseline) {
        let slower = regressions(&report, base, max_regression);
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
                "no median slower than the baseline {} by more than {:.1}%",
                path.display(),
                max_regression * 100.0
            );
        }
    }
    Ok(())
}
