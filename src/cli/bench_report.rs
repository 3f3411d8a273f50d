//! Latency measurement for regression benchmarks (`vit-msn bench`).

use std::path::Path;
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

/// The batch sizes whose median is slower than the baseline's by more than
/// `max_regression` (0.1 = 10%), as messages; empty when none is.
pub fn regressions(current: &Report, baseline: &Report, max_regression: f64) -> Vec<String> {
    current
        .results
        .iter()
        .filter_map(|r| {
            let base = baseline.results.iter().find(|b| b.batch == r.batch)?;
            let slower = r.median_ms / base.median_ms - 1.0;
            (slower > max_regression).then(|| {
                format!(
                    "batch {}: median {:.2} ms is {:.1}% slower than the baseline's {:.2} ms (allowed {})",
                    r.batch,
                    r.median_ms,
                    slower * 100.0,
                    base.median_ms,
                    percent(max_regression)
                )
            })
        })
        .collect()
}

/// Reads a saved report, refusing one no comparison could use: medians must
/// be positive and finite, each batch size listed once.
pub fn read_report(path: &Path) -> Result<Report> {
    let text = vit_msn::files::read_input_text(path)?;
    let report: Report = serde_json::from_str(&text)
        .map_err(|e| Error::file(path, format!("not a vit-msn bench report: {e}")))?;
    for (i, r) in report.results.iter().enumerate() {
        if !(r.median_ms.is_finite() && r.median_ms > 0.0) {
            return Err(Error::file(
                path,
                format!(
                    "batch {}: median {} ms is not a positive time",
                    r.batch, r.median_ms
                ),
            ));
        }
        if report.results[..i].iter().any(|o| o.batch == r.batch) {
            return Err(Error::file(
                path,
                format!("batch {} is listed more than once", r.batch),
            ));
        }
    }
    Ok(report)
}

/// Errors unless `baseline` measured the same thing as `current` (dtype,
/// resolution, device, and the model's shape where both record it) and
/// holds at least one of `batches`; returns the batch sizes it lacks,
/// which are not compared. `current.results` may still be empty.
pub fn comparable(
    current: &Report,
    baseline: &Report,
    batches: &[i64],
    path: &Path,
) -> Result<Vec<i64>> {
    let mismatch = |what: &str, theirs: &str, ours: &str| {
        Err(Error::file(
            path,
            format!("the baseline was measured with {what} {theirs}, this run uses {ours}; compare like with like"),
        ))
    };
    if baseline.dtype != current.dtype {
        return mismatch("dtype", &baseline.dtype, &current.dtype);
    }
    if (baseline.height, baseline.width) != (current.height, current.width) {
        let res = |r: &Report| format!("{}x{}", r.height, r.width);
        return mismatch("resolution", &res(baseline), &res(current));
    }
    if baseline.device != current.device {
        return mismatch("device", &baseline.device, &current.device);
    }
    if let (Some(theirs), Some(ours)) = (&baseline.cpu, &current.cpu) {
        // Only a note: a baseline is often carried to a similar machine.
        if theirs != ours {
            eprintln!(
                "note: the baseline was measured on another CPU ({theirs}); this one is {ours}"
            );
        }
    }
    if let (Some(theirs), Some(ours)) = (&baseline.model, &current.model) {
        if theirs != ours {
            return Err(Error::file(
                path,
                format!("the baseline was measured on another model ({theirs}); this bundle is a {ours}; compare like with like"),
            ));
        }
    }
    fn list(batches: impl Iterator<Item = i64>) -> String {
        batches
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
    let missing: Vec<i64> = batches
        .iter()
        .copied()
        .filter(|b| !baseline.results.iter().any(|r| r.batch == *b))
        .collect();
    if missing.len() == batches.len() {
        let has = if baseline.results.is_empty() {
            "no results".to_owned()
        } else {
            format!(
                "only batch size(s) {}",
                list(baseline.results.iter().map(|r| r.batch))
            )
        };
        return Err(Error::file(
            path,
            format!(
                "the baseline holds no result for batch size(s) {} (it has {has}); nothing to compare",
                list(missing.iter().copied())
            ),
        ));
    }
    Ok(missing)
}

/// A threshold given as a percentage: `10`, `10%` and `10.0 %` are all
/// ten percent (→ 0.1); `0.5` is half a percent.
pub fn parse_fraction(s: &str) -> Result<f64> {
    let bad = || {
        Error::input(
            "max-regression",
            format!("`{s}` is not a percentage like 10 or 10% (a number >= 0)"),
        )
    };
    let t = s.trim();
    let number = t.strip_suffix('%').unwrap_or(t).trim();
    let v = number.parse::<f64>().map_err(|_| bad())?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(bad());
    }
    Ok(v / 100.0)
}

/// A fraction as a percentage for messages, with no more digits than it
/// needs: 0.1 → `10%`, 0.005 → `0.5%`.
pub fn percent(fraction: f64) -> String {
    let s = format!("{:.3}", fraction * 100.0);
    format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(medians: &[(i64, f64)]) -> Report {
        Report {
            bundle: "b".into(),
            model: None,
            dtype: "f32".into(),
            device: "cpu".into(),
            threads: 2,
            height: 224,
            width: 224,
            iters: 5,
            cpu: None,
            cpu_features: Vec::new(),
            results: medians
                .iter()
                .map(|&(batch, median_ms)| BatchResult {
                    batch,
                    median_ms,
                    p90_ms: median_ms,
                    min_ms: None,
                    images_per_s: 0.0,
                    peak_rss_mib: 0.0,
                })
                .collect(),
        }
    }

    #[test]
    fn regression_names_the_batch() {
        let base = report(&[(1, 10.0), (8, 80.0)]);
        let now = report(&[(1, 10.5), (8, 100.0)]);
        let r = regressions(&now, &base, 0.1);
        assert_eq!(r.len(), 1);
        assert!(
            r[0].starts_with("batch 8: median 100.00 ms is 25.0% slower"),
            "{}",
            r[0]
        );
        assert!(regressions(&now, &base, 0.3).is_empty());
    }

    #[test]
    fn quantiles_and_fractions() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(quantile(&v, 0.5), 5.0);
        assert_eq!(quantile(&v, 0.9), 9.0);
        // One rule: a number, with or without `%`, is a percentage.
        assert_eq!(parse_fraction("10%").unwrap(), 0.1);
        assert_eq!(parse_fraction("10").unwrap(), 0.1);
        assert_eq!(parse_fraction("1").unwrap(), 0.01);
        assert_eq!(parse_fraction("1.0").unwrap(), 0.01);
        assert_eq!(parse_fraction("1.5").unwrap(), 0.015);
        assert_eq!(parse_fraction("0.5 %").unwrap(), 0.005);
        assert!(parse_fraction("fast").is_err());
        assert!(parse_fraction("-1").is_err());
        assert!(parse_fraction("inf").is_err());
        assert_eq!(percent(parse_fraction("1.5").unwrap()), "1.5%");
        assert_eq!(percent(0.1), "10%");
    }
}
