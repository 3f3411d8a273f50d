//! Latency measurement for regression benchmarks (`vit-msn bench`): the
//! report, and timing a batch size. Comparing with a saved baseline is in
//! bench_report/baseline.rs.

mod baseline;

pub use baseline::{comparable, parse_fraction, percent, read_report, regressions};

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use vit_msn::error::{Error, Result};
use vit_msn::Bundle;

/// One batch size's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchResult {
    pub batch: i64,
    pub median_ms: f64,
    pub p90_ms: f64,
    /// The fastest pass: on a shared machine, the figure least touched by
    /// other work. Absent in baselines saved before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ms: Option<f64>,
    pub images_per_s: f64,
    /// Peak resident set size of the process so far (VmHWM), in MiB.
    pub peak_rss_mib: f64,
}

/// A whole run, as printed with `--json` and saved with `--save-baseline`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub bundle: String,
    /// The model's shape ([`model_summary`]); absent in baselines saved
    /// before it was recorded, which are compared without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub dtype: String,
    pub device: String,
    pub threads: i64,
    pub height: i64,
    pub width: i64,
    pub iters: usize,
    /// The CPU it ran on ([`vit_msn::cpu::Cpu::summary`]); absent in older baselines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Which kernels oneMKL runs ([`vit_msn::mkl::MklKernels::describe`]),
    /// on the CPU; absent in older baselines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mkl: Option<String>,
    /// The GEMM behind an f32 or int8 bundle's linears on the CPU (`onednn`,
    /// `mkl` or `fbgemm`, [`vit_msn::bundle::CpuLinears`]); absent in older
    /// baselines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linears: Option<String>,
    /// The CPU features the bundle's kernels use (the manifest's).
    #[serde(default)]
    pub cpu_features: Vec<vit_msn::cpu::CpuFeature>,
    pub results: Vec<BatchResult>,
}

/// Largest batch size `bench` runs: far past any latency worth measuring,
/// and small enough that its arithmetic cannot overflow.
pub const MAX_BATCH: i64 = 65536;
/// Largest `--iters` and `--warmup`: the timings are held in memory.
pub const MAX_PASSES: usize = 1_000_000;

/// Refuses batch sizes and pass counts out of range, before anything is
/// loaded or allocated.
pub fn check_plan(batches: &[i64], iters: usize, warmup: usize) -> Result<()> {
    if batches.is_empty() {
        return Err(Error::input("batch", "give at least one batch size"));
    }
    if let Some(b) = batches.iter().find(|&&b| !(1..=MAX_BATCH).contains(&b)) {
        return Err(Error::input(
            "batch",
            format!("batch size {b} is not in 1..={MAX_BATCH}"),
        ));
    }
    if !(1..=MAX_PASSES).contains(&iters) {
        return Err(Error::input(
            "iters",
            format!("{iters} is not in 1..={MAX_PASSES}"),
        ));
    }
    if warmup > MAX_PASSES {
        return Err(Error::input(
            "warmup",
            format!("{warmup} is not in 0..={MAX_PASSES}"),
        ));
    }
    Ok(())
}

/// The model facts that decide a forward pass's cost, to tell a baseline
/// of another model from one of the same model compiled again.
pub fn model_summary(bundle: &Bundle) -> String {
    let m = bundle.manifest();
    let i = &m.model;
    format!(
        "{} with hidden size {}, {} layers, {} heads, patch {}, {} channel(s)",
        m.task,
        i.hidden_size,
        i.num_hidden_layers,
        i.num_attention_heads,
        i.patch_size,
        i.num_channels
    )
}

/// The `q`-quantile (0..=1) of sorted samples, by the nearest-rank rule.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Peak resident set size of this process in MiB, from /proc (0 where unknown).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Times `iters` forward passes at `batch` after `warmup` untimed ones, on
/// seeded random inputs of the given resolution.
pub fn time_batch(
    bundle: &Bundle,
    batch: i64,
    height: i64,
    width: i64,
    warmup: usize,
    iters: usize,
) -> Result<BatchResult> {
    check_plan(&[batch], iters, warmup)?;
    // Refused here, before the input is allocated, as a forward would refuse it.
    bundle.check_batch(batch, height, width)?;
    tch::manual_seed(0);
    let c = bundle.manifest().model.num_channels;
    let failed = |e: tch::TchError| {
        Error::input(
            "batch",
            format!(
                "cannot allocate a batch of {batch} at {height}x{width}: {}",
                vit_msn::bundle::first_line(&e.to_string())
            ),
        )
    };
    // On the bundle's device already, so a CUDA figure is the forward pass,
    // not the upload of the batch.
    let px = Tensor::f_randn([batch, c, height, width], (Kind::Float, tch::Device::Cpu))
        .and_then(|t| t.f_to_device(bundle.device()))
        .map_err(failed)?;
    for _ in 0..warmup {
        bundle.forward(&px, None, None)?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        bundle.forward(&px, None, None)?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let median_ms = quantile(&times, 0.5);
    Ok(BatchResult {
        batch,
        median_ms,
        p90_ms: quantile(&times, 0.9),
        min_ms: times.first().copied(),
        images_per_s: batch as f64 * 1000.0 / median_ms,
        peak_rss_mib: peak_rss_mib(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(quantile(&v, 0.5), 5.0);
        assert_eq!(quantile(&v, 0.9), 9.0);
    }
}
