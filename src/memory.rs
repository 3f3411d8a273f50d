//! Whether a batch fits: a rough estimate of what a forward pass holds at
//! once, against the memory the system says is available, so that a batch
//! too large is refused before anything is allocated.

use tch::{Device, Kind};

use crate::error::{Error, Result};
use crate::manifest::{ArtifactEntry, Attention, Manifest};

/// A rough peak working set of one sample through `entry`, in bytes: the
/// input and its cast, one layer's activations (q/k/v, MLP, residuals,
/// and the heads × tokens² attention scores where the graph holds them)
/// and every output with its f32 copy. Saturating
/// u128 arithmetic: `intermediate_size` and the output shapes come from
/// the manifest unchecked, and an absurd estimate must refuse, not wrap.
fn bytes_per_sample(manifest: &Manifest, entry: &ArtifactEntry, kind: Kind) -> u128 {
    let n = |v: i64| u128::try_from(v.max(1)).unwrap_or(1);
    let m = &manifest.model;
    let tokens = n(entry.height / m.patch_size) * n(entry.width / m.patch_size) + 1;
    let d = n(m.hidden_size);
    let inter = manifest
        .config
        .get("intermediate_size")
        .and_then(|v| v.as_i64())
        .map_or(4 * d, n);
    let elem = if kind == Kind::Float { 4 } else { 2 };
    let pixels = n(m.num_channels) * n(entry.height) * n(entry.width) * (4 + elem);
    let holds_scores = match entry.attention {
        Some(attention) => attention == Attention::Eager,
        // The legacy path, for manifests written before artifacts recorded
        // their attention: the compiler's graphs used eager attention exactly
        // when they return the scores, and export.py (named in `compiler`)
        // always traced eager attention.
        None => {
            entry.outputs.iter().any(|o| o.name == "attentions")
                || manifest.compiler.contains("export.py")
        }
    };
    let scores = if holds_scores {
        n(m.num_attention_heads)
            .saturating_mul(tokens)
            .saturating_mul(tokens)
    } else {
        0
    };
    let layer = tokens
        .saturating_mul((7 * d).saturating_add(inter))
        .saturating_add(scores);
    let outputs = entry
        .outputs
        .iter()
        .map(|o| {
            o.shape
                .iter()
                .fold(1u128, |acc, &x| acc.saturating_mul(n(x)))
        })
        .fold(0u128, u128::saturating_add);
    pixels
        .saturating_add(layer.saturating_mul(elem))
        .saturating_add(outputs.saturating_mul(elem + 4))
}

/// Refuses a batch whose estimated working set exceeds the memory the
/// system says is available (CPU only).
pub(crate) fn check_memory(
    manifest: &Manifest,
    entry: &ArtifactEntry,
    (kind, device): (Kind, Device),
    batch: i64,
) -> Result<()> {
    if device != Device::Cpu {
        return Ok(());
    }
    let need =
        bytes_per_sample(manifest, entry, kind).saturating_mul(u128::try_from(batch).unwrap_or(0));
    // Ordinary batches skip the /proc read on the forward path.
    if need < 1 << 29 {
        return Ok(());
    }
    let Some(available) = available_memory() else {
        return Ok(());
    };
    if need > available as u128 {
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        return Err(Error::input(
            "pixel_values",
            format!(
                "a batch of {batch} needs about {:.1} GiB and {:.1} GiB is available; use smaller batches",
                gib(need),
                gib(available as u128)
            ),
        ));
    }
    Ok(())
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ModelInfo, Source, TensorSpec};

    fn manifest(compiler: &str) -> Manifest {
        Manifest {
            format_version: 1,
            compiler: compiler.into(),
            task: "backbone".into(),
            model: ModelInfo {
                hidden_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_channels: 3,
                patch_size: 16,
                image_size: 224,
                labels: Vec::new(),
                problem_type: None,
            },
            dtype: "f32".into(),
            device: "cpu".into(),
            cpu_features: Vec::new(),
            preprocessing: None,
            artifacts: Vec::new(),
            source: Source::default(),
            config: serde_json::json!({}),
            fewshot: None,
        }
    }

    fn entry(attention: Option<Attention>, outputs: &[&str]) -> ArtifactEntry {
        ArtifactEntry {
            height: 224,
            width: 224,
            file: "model_224x224.pt".into(),
            sha256: String::new(),
            inputs: Vec::new(),
            outputs: outputs
                .iter()
                .map(|name| TensorSpec {
                    name: (*name).into(),
                    dtype: "f32".into(),
                    shape: vec![-1, 197, 64],
                })
                .collect(),
            attention,
        }
    }

    /// The recorded attention decides; without it (older manifests), the
    /// legacy rule: scores are held by artifacts that return them, and by
    /// everything export.py traced.
    #[test]
    fn attention_scores_counted_as_recorded_else_as_before() {
        let size = |compiler: &str, attention, outputs: &[&str]| {
            bytes_per_sample(&manifest(compiler), &entry(attention, outputs), Kind::Float)
        };
        let sdpa = size(
            "vit-msn 0.1.0",
            Some(Attention::Sdpa),
            &["last_hidden_state"],
        );
        let eager = size(
            "vit-msn 0.1.0",
            Some(Attention::Eager),
            &["last_hidden_state"],
        );
        // 4 heads × 197² scores of 4 bytes.
        assert_eq!(eager - sdpa, 4 * 197 * 197 * 4);
        assert_eq!(
            size(
                "vit-msn export.py (torch 2)",
                Some(Attention::Sdpa),
                &["last_hidden_state"]
            ),
            sdpa
        );
        assert_eq!(size("vit-msn 0.1.0", None, &["last_hidden_state"]), sdpa);
        assert_eq!(
            size("vit-msn export.py (torch 2)", None, &["last_hidden_state"]),
            eager
        );
        let with_attentions = &["last_hidden_state", "attentions"];
        assert!(
            size("vit-msn 0.1.0", None, with_attentions)
                > size("vit-msn 0.1.0", Some(Attention::Sdpa), with_attentions)
        );
    }
}
