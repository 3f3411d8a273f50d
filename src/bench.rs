//! Latency measurement for regression benchmarks (`vit-msn bench`).

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::Bundle;

/// One batch size's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchResult {
    pub batch: i64,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub images_per_s: f64,
    /// Peak resident set size of the process so far (VmHWM), in MiB.
    pub peak_rss_mib: f64,
}

/// A whole run, as printed with `--json` and saved with `--save-baseline`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub bundle: String,
    pub dtype: String,
    pub device: String,
    pub threads: i64,
    pub height: i64,
    pub width: i64,
    pub iters: usize,
    pub results: Vec<BatchResult>,
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
    if batch < 1 || iters == 0 {
        return Err(Error::input(
            "bench",
            "batch sizes and --iters must be at least 1",
        ));
    }
    tch::manual_seed(0);
    let c = bundle.manifest().model.num_channels;
    // On the bundle's device already, so a CUDA figure is the forward pass,
    // not the upload of the batch.
    let px = Tensor::randn([batch, c, height, width], (Kind::Float, tch::Device::Cpu))
        .to_device(bundle.device());
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
                    "batch {}: median {:.2} ms is {:.1}% slower than the baseline's {:.2} ms (allowed {:.1}%)",
                    r.batch,
                    r.median_ms,
                    slower * 100.0,
                    base.median_ms,
                    max_regression * 100.0
                )
            })
        })
        .collect()
}

pub fn read_report(path: &Path) -> Result<Report> {
    let text = crate::fsutil::read_regular_text(path)?;
    serde_json::from_str(&text)
        .map_err(|e| Error::file(path, format!("not a vit-msn bench report: {e}")))
}

/// `10%`, `10` or `0.1` → 0.1.
pub fn parse_fraction(s: &str) -> Result<f64> {
    let bad = || {
        Error::input(
            "max-regression",
            format!("`{s}` is not a percentage like 10%"),
        )
    };
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map_err(|_| bad())? / 100.0,
        None => {
            let v = t.parse::<f64>().map_err(|_| bad())?;
            if v > 1.0 {
                v / 100.0
            } else {
                v
            }
        }
    };
    if !(v.is_finite() && v >= 0.0) {
        return Err(bad());
    }
    Ok(v)
}

/// Physical cores of this machine (distinct core ids per package), the
/// default for intra-op threads; logical CPUs where /proc does not say.
pub fn physical_cores() -> i64 {
    let logical = std::thread::available_parallelism()
        .map(|n| n.get() as i64)
        .unwrap_or(1);
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let mut cores = std::collections::BTreeSet::new();
    let mut package = String::new();
    for line in info.lines() {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim() {
                "physical id" => package = v.trim().to_owned(),
                "core id" => {
                    cores.insert((package.clone(), v.trim().to_owned()));
                }
                _ => {}
            }
        }
    }
    if cores.is_empty() {
        logical
    } else {
        (cores.len() as i64).min(logical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(medians: &[(i64, f64)]) -> Report {
        Report {
            bundle: "b".into(),
            dtype: "f32".into(),
            device: "cpu".into(),
            threads: 2,
            height: 224,
            width: 224,
            iters: 5,
            results: medians
                .iter()
                .map(|&(batch, median_ms)| BatchResult {
                    batch,
                    median_ms,
                    p90_ms: median_ms,
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
        assert_eq!(parse_fraction("10%").unwrap(), 0.1);
        assert_eq!(parse_fraction("0.25").unwrap(), 0.25);
        assert_eq!(parse_fraction("15").unwrap(), 0.15);
        assert!(parse_fraction("fast").is_err());
        assert!(physical_cores() >= 1);
    }
}
