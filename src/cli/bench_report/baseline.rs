//! Comparing a `vit-msn bench` run with a saved baseline: reading one,
//! checking that it measured the same thing, and the batch sizes that got
//! slower.

use std::path::Path;

use vit_msn::error::{Error, Result};

use super::Report;

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
    if let (Some(theirs), Some(ours)) = (&baseline.mkl, &current.mkl) {
        if theirs != ours {
            eprintln!("note: the baseline's oneMKL ran {theirs}; this run's runs {ours}");
        }
    }
    if let (Some(theirs), Some(ours)) = (&baseline.linears, &current.linears) {
        if theirs != ours {
            eprintln!("note: the baseline's linears ran on {theirs}; this run's run on {ours}");
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
    use super::super::BatchResult;
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
            mkl: None,
            linears: None,
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
    fn fractions() {
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
