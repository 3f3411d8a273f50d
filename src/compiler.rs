//! Compiling a Hugging Face folder into a bundle: the graph crate traces the
//! artifacts, and this module writes the manifest beside them. Only with the
//! `compiler` feature; the runtime itself never needs it.

use std::path::Path;

use crate::bundle::sha256_hex;
use crate::cpu::{Cpu, CpuFeature};
use crate::device;
use crate::error::{Error, Result};
use crate::fsutil::{
    check_output_dir, remove_stale_siblings, resolve_output_dir, sibling_tmp, write_atomic,
    OutputDir,
};
use crate::image::Preprocessing;
use crate::manifest::{
    ArtifactEntry, FileDigest, Manifest, ModelInfo, Source, FORMAT_VERSION, MANIFEST_FILE,
};
use vit_msn_graph::compile::dtype_name;
use vit_msn_graph::encoder::LinearBackend;
use vit_msn_graph::{CompileOptions, Task};

/// Compiles `model_dir` into a bundle at `out`, staged in a temporary folder
/// beside it and renamed into place, so `out` is never half-written.
pub fn compile_bundle(model_dir: &Path, out: &Path, opts: &CompileOptions) -> Result<Manifest> {
    let out = &resolve_output_dir(out);
    if !model_dir.is_dir() {
        return Err(Error::file(model_dir, "not a model folder"));
    }
    check_output_dir(out, OutputDir::Bundle, &[model_dir])?;
    // Loads libtorch's CUDA support first when compiling for CUDA.
    device::check_available(opts.device)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    remove_stale_siblings(out);
    let staged = sibling_tmp(out);
    std::fs::create_dir_all(&staged).map_err(|e| Error::io(&staged, e))?;
    let result = build_bundle(model_dir, &staged, opts)
        .and_then(|manifest| crate::bundle::replace_bundle_dir(&staged, out).map(|()| manifest));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staged);
    }
    result
}

/// The GEMM the linears use, and the CPU features that ties the artifacts
/// to. By default: oneDNN in f32, whose kernels run on every x86-64 CPU;
/// oneDNN in bf16 where this CPU has its bf16 inner product (AVX-512 or
/// AVX2-VNNI-2), recorded, so that a runtime on a CPU without it falls back
/// to aten::linear; aten::linear otherwise (f16, CUDA, AVX2-only CPUs).
/// `--linear onednn` in bf16 or f16 is refused where this CPU cannot trace
/// it, before anything loads.
fn resolve_linear(opts: &CompileOptions) -> Result<(LinearBackend, Vec<CpuFeature>)> {
    let dtype = dtype_name(opts.kind);
    let on_cpu = opts.device == tch::Device::Cpu;
    let cpu = Cpu::detect();
    let backend = opts.linear.unwrap_or(match dtype {
        "f32" if on_cpu => LinearBackend::OneDnn,
        "bf16" if on_cpu && cpu.has(CpuFeature::OnednnBf16) => LinearBackend::OneDnn,
        _ => LinearBackend::Aten,
    });
    if backend != LinearBackend::OneDnn {
        return Ok((backend, Vec::new()));
    }
    if !on_cpu {
        return Err(Error::input(
            "linear",
            "the oneDNN linear runs on the CPU only; CUDA artifacts use aten",
        ));
    }
    let Some(feature) = CpuFeature::for_onednn_linear(dtype) else {
        return Ok((backend, Vec::new()));
    };
    if !cpu.has(feature) {
        return Err(Error::input(
            "linear",
            format!(
                "oneDNN's {dtype} linear needs {}, which this CPU lacks ({}); leave out --linear onednn: the default, aten, runs on every CPU",
                feature.needs(),
                cpu.summary()
            ),
        ));
    }
    Ok((backend, vec![feature]))
}

fn build_bundle(model_dir: &Path, staged: &Path, opts: &CompileOptions) -> Result<Manifest> {
    let (linear, cpu_features) = resolve_linear(opts)?;
    if opts.device == tch::Device::Cpu {
        crate::cpu::warn_if_slow(dtype_name(opts.kind), None);
    }
    let opts = &CompileOptions {
        linear: Some(linear),
        cpu_features: cpu_features.clone(),
        ..opts.clone()
    };
    let compiled = vit_msn_graph::compile(model_dir, staged, opts)?;
    let model = &compiled.model;
    let mut artifacts = Vec::new();
    for art in &compiled.artifacts {
        let path = staged.join(&art.file);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        artifacts.push(ArtifactEntry {
            height: art.height,
            width: art.width,
            file: art.file.clone(),
            sha256: sha256_hex(&bytes),
            inputs: art.inputs.clone(),
            outputs: art.outputs.clone(),
        });
    }
    let cfg = &model.config;
    let classifier = model.task == Task::Classification;
    // What ViTImageProcessor would do for this model, normalised, so the
    // runtime preprocesses exactly as the bundle was compiled for.
    let preprocessing = match read_json_if_present(&model_dir.join("preprocessor_config.json"))? {
        Some(v) => Preprocessing::from_json(&v)
            .map_err(|e| Error::file(&model_dir.join("preprocessor_config.json"), e.to_string()))?,
        None => {
            let mut pp = Preprocessing::vit_msn_default();
            pp.height = cfg.image_size as u32;
            pp.width = cfg.image_size as u32;
            pp
        }
    };
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        compiler: concat!("vit-msn ", env!("CARGO_PKG_VERSION")).into(),
        task: if classifier {
            "classification"
        } else {
            "backbone"
        }
        .into(),
        model: ModelInfo {
            hidden_size: cfg.hidden_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            num_channels: cfg.num_channels,
            patch_size: cfg.patch_size,
            image_size: cfg.image_size,
            labels: if classifier {
                cfg.id2label.clone()
            } else {
                Vec::new()
            },
            problem_type: cfg.problem_type.clone(),
        },
        dtype: dtype_name(opts.kind).into(),
        device: device::device_name(opts.device),
        cpu_features,
        preprocessing: Some(preprocessing.to_json()),
        artifacts,
        source: Source {
            weights: model
                .weight_files
                .iter()
                .map(|(f, h)| FileDigest {
                    file: f.clone(),
                    sha256: h.clone(),
                })
                .collect(),
            unused_tensors: model.unused_tensors.clone(),
        },
        config: cfg.raw.clone(),
        fewshot: None,
    };
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|e| Error::file(staged, e.to_string()))?;
    write_atomic(&staged.join(MANIFEST_FILE), text.as_bytes())?;
    Ok(manifest)
}

fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value = serde_json::from_str(&text)
        .map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
    Ok(Some(value))
}
