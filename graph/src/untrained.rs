//! Deterministic, untrained checkpoints in Hugging Face format, for the demo,
//! benchmarks and tests. Their outputs mean nothing: no pretrained weights can
//! be downloaded where this runs.

use std::path::Path;

use serde_json::Value;
use tch::{nn, Device, Kind, Tensor};

use crate::config::{Config, Task};
use crate::model::VitMsnModel;
use crate::Error;

/// Writes `config.json` and `model.safetensors` to `dir`, with weights drawn
/// from libtorch's generator seeded with `seed`, at scales that keep the
/// activations O(1). `config` is a transformers config; its `architectures`
/// picks backbone or classifier, and a classifier's backbone is saved under
/// `vit.` as transformers does.
pub fn write_untrained_checkpoint(dir: &Path, config: &Value, seed: i64) -> Result<(), Error> {
    let cfg = Config::from_value(config.clone())?;
    let task = cfg.task_from_architectures().unwrap_or(Task::Backbone);
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _vit = VitMsnModel::new(&root, &cfg)?;
    if task == Task::Classification {
        let _ = nn::linear(
            &root / "classifier",
            cfg.hidden_size,
            cfg.num_labels(),
            Default::default(),
        );
    }
    tch::manual_seed(seed);
    let variables = vs.variables();
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    let mut named = Vec::new();
    for name in names {
        // transformers' classifier has no mask token; its backbone keeps one
        // (loaded with use_mask_token=True).
        if task == Task::Classification && name == "embeddings.mask_token" {
            continue;
        }
        let shape = variables[name].size();
        let randn = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
        let value = if name.contains("token") || name.contains("position_embeddings") {
            randn
        } else if shape.len() >= 2 {
            let fan_in: i64 = shape[1..].iter().product();
            randn * (1.5 / (fan_in as f64).sqrt())
        } else if name.contains("layernorm") && name.ends_with("weight") {
            randn * 0.3 + 1.0
        } else {
            randn * 0.3
        };
        let saved_name = match task {
            Task::Classification if !name.starts_with("classifier.") => format!("vit.{name}"),
            _ => name.clone(),
        };
        named.push((saved_name, value));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_hf_safetensors(&dir.join("model.safetensors"), &named)?;
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(dir.join("config.json"), text).map_err(|e| Error::io(dir, e))?;
    Ok(())
}

/// Writes f32 tensors as transformers saves them: with `{"format": "pt"}` in
/// the header metadata, which `from_pretrained` requires.
fn write_hf_safetensors(path: &Path, named: &[(String, Tensor)]) -> Result<(), Error> {
    let mut buffers = Vec::with_capacity(named.len());
    for (name, t) in named {
        let t = t.to_kind(Kind::Float).contiguous();
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let values = Vec::<f32>::try_from(t.flatten(0, -1))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        buffers.push((name.clone(), shape, bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Weights(format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize_to_file(views, &metadata, path)
        .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))
}
