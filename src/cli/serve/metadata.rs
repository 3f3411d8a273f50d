//! `GET /v2/models/{m}`: a version's inputs and outputs with their
//! datatypes and shapes (-1 where they vary), and what identifies it.

use serde_json::{json, Value};
use vit_msn::Bundle;

/// The dimension every artifact agrees on, else -1 (variable).
fn common(dims: impl Iterator<Item = i64>) -> i64 {
    let mut found = None;
    for d in dims {
        match found {
            None => found = Some(d),
            Some(f) if f != d => return -1,
            _ => {}
        }
    }
    found.unwrap_or(-1)
}

pub fn metadata(name: &str, number: u64, manifest_sha256: &str, bundle: &Bundle) -> Value {
    let m = bundle.manifest();
    let entries = &m.artifacts;
    let height = common(entries.iter().map(|e| e.height));
    let width = common(entries.iter().map(|e| e.width));
    let p = m.model.patch_size.max(1);
    let patches = common(entries.iter().map(|e| (e.height / p) * (e.width / p)));
    let (layers, heads) = (m.model.num_hidden_layers, m.model.num_attention_heads);
    let inputs = json!([
        { "name": "pixel_values", "datatype": "FP32", "shape": [-1, m.model.num_channels, height, width] },
        { "name": "image", "datatype": "BYTES", "shape": [-1] },
        { "name": "bool_masked_pos", "datatype": "BOOL", "shape": [-1, patches], "optional": true },
        { "name": "head_mask", "datatype": "FP32", "shape": [layers, heads], "optional": true },
    ]);
    let mut outputs = Vec::new();
    if let Some(first) = entries.first() {
        for (i, spec) in first.outputs.iter().enumerate() {
            let shape: Vec<i64> = (0..spec.shape.len())
                .map(|d| {
                    common(
                        entries
                            .iter()
                            .filter_map(|e| e.outputs.get(i))
                            .map(|s| s.shape.get(d).copied().unwrap_or(-1)),
                    )
                })
                .collect();
            outputs.push(json!({ "name": spec.name, "datatype": "FP32", "shape": shape }));
            if spec.name == "last_hidden_state" {
                outputs.push(json!({ "name": "embedding", "datatype": "FP32", "shape": [-1, m.model.hidden_size] }));
            }
        }
    }
    json!({
        "name": name,
        "versions": [number.to_string()],
        "platform": "vit_msn_torchscript",
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {
            "manifest_sha256": manifest_sha256,
            "task": m.task,
            "dtype": m.dtype,
            "device": bundle.device_name(),
            "resolutions": m.resolutions(),
            "labels": m.model.labels,
        }
    })
}
