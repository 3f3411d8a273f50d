//! Compiling a Hugging Face folder into a bundle: the graph crate traces the
//! artifacts, and this module writes the manifest beside them. Only with the
//! `compiler` feature; the runtime itself never needs it.

use std::path::Path;

use crate::cpu::{Cpu, CpuFeature};
use crate::device;
use crate::error::{Error, Result};
use crate::image::Preprocessing;
use crate::manifest::{ArtifactEntry, FileDigest, Manifest, ModelInfo, Source, FORMAT_VERSION};
use crate::writer::BundleWriter;
use vit_msn_graph::compile::{artifact_dtype, dtype_name};
use vit_msn_graph::encoder::LinearBackend;
use vit_msn_graph::{CompileOptions, Task};

/// Compiles `model_dir` into a bundle at `out`, through the bundle writer
/// (staged beside it and renamed into place, so `out` is never half-written).
pub fn compile_bundle(model_dir: &Path, out: &Path, opts: &CompileOptions) -> Result<Manifest> {
    if !model_dir.is_dir() {
        return Err(Error::file(model_dir, "not a model folder"));
    }
    if opts.linear == Some(LinearBackend::DynamicInt8) && opts.device != tch::Device::Cpu {
        return Err(int8_on_cuda());
    }
    let mut writer = BundleWriter::create(out, &[model_dir])?;
    // Loads libtorch's CUDA support first when compiling for CUDA.
    device::check_available(opts.device)?;
    let manifest = build_bundle(model_dir, &mut writer, opts)?;
    writer.finish(manifest)
}

/// Packs TorchScript files traced elsewhere (graph/python/export.py), each
/// carrying its own `vit_msn.json` description, into a bundle at `out` for
/// the model in `model_dir`, through the same writer and manifest as
/// [`compile_bundle`]. `producer` is recorded as the manifest's `compiler`.
pub fn pack_bundle(
    model_dir: &Path,
    artifacts_dir: &Path,
    out: &Path,
    producer: &str,
) -> Result<Manifest> {
    if !model_dir.is_dir() {
        return Err(Error::file(model_dir, "not a model folder"));
    }
    let cfg = vit_msn_graph::Config::from_file(&model_dir.join("config.json"))?;
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(artifacts_dir)
        .map_err(|e| Error::io(artifacts_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pt"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::file(artifacts_dir, "holds no .pt files to pack"));
    }
    let mut described = Vec::new();
    for path in files {
        crate::fsutil::check_regular_file(&path)?;
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let d = crate::describe::embedded_description(&file).ok_or_else(|| {
            Error::file(&path, "has no readable extra/vit_msn.json description; pack takes files that describe themselves")
        })?;
        described.push((d, path));
    }
    // The trained resolution first, as compile lists it; then by file name.
    let trained = (cfg.image_size, cfg.image_size);
    described.sort_by_key(|(d, path)| ((d.height, d.width) != trained, path.clone()));
    // The first file sets the task, dtype and device; `files` is not empty.
    let (task, dtype, device) = {
        let f = &described[0].0;
        (f.task, f.dtype.clone(), f.device.clone())
    };
    let mut writer = BundleWriter::create(out, &[model_dir, artifacts_dir])?;
    let mut cpu_features = Vec::new();
    for (d, path) in described {
        if (d.task, &d.dtype, &d.device) != (task, &dtype, &device) {
            return Err(Error::file(
                &path,
                format!(
                    "is a {} {} artifact for {}, the first one a {} {dtype} artifact for {device}; a bundle has one task, dtype and device",
                    d.task.name(), d.dtype, d.device, task.name()
                ),
            ));
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::file(&path, "the file name is not valid UTF-8"))?;
        writer.write_artifact(
            ArtifactEntry {
                height: d.height,
                width: d.width,
                file: name.to_owned(),
                sha256: String::new(),
                inputs: d.inputs.clone(),
                outputs: d.outputs.clone(),
                attention: d.attention,
            },
            &bytes,
        )?;
        cpu_features.extend(d.cpu_features.iter().copied());
    }
    let weights = vit_msn_graph::weights::weight_files(model_dir)?
        .iter()
        .map(|p| {
            let bytes = crate::fsutil::read_regular(p)?;
            Ok(FileDigest {
                file: p
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                sha256: vit_msn_format::sha256_hex(&bytes),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut manifest = manifest_for(model_dir, &cfg, task, (&dtype, device), weights)?;
    manifest.compiler = producer.to_owned();
    cpu_features.sort();
    cpu_features.dedup();
    manifest.cpu_features = cpu_features;
    writer.finish(manifest)
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
    if backend == LinearBackend::DynamicInt8 && !on_cpu {
        return Err(int8_on_cuda());
    }
    // fbgemm packs int8 weights for the CPU each artifact loads on: nothing to record.
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

/// The refusal of int8 for CUDA, before anything looks for a CUDA device.
pub fn int8_on_cuda() -> Error {
    Error::input(
        "dtype",
        "int8 artifacts run on the CPU only (fbgemm's int8 kernels); compile CUDA artifacts in f32, f16 or bf16",
    )
}

/// Traces the artifacts into the writer's staging folder, records them, and
/// returns the manifest to finish with.
fn build_bundle(
    model_dir: &Path,
    writer: &mut BundleWriter,
    opts: &CompileOptions,
) -> Result<Manifest> {
    let (linear, cpu_features) = resolve_linear(opts)?;
    if opts.device == tch::Device::Cpu {
        crate::cpu::warn_if_slow(dtype_name(opts.kind), None);
    }
    let opts = &CompileOptions {
        linear: Some(linear),
        cpu_features: cpu_features.clone(),
        ..opts.clone()
    };
    let compiled = vit_msn_graph::compile(model_dir, writer.staging(), opts)?;
    let model = &compiled.model;
    for art in &compiled.artifacts {
        writer.add_artifact(ArtifactEntry {
            height: art.height,
            width: art.width,
            file: art.file.clone(),
            sha256: String::new(),
            inputs: art.inputs.clone(),
            outputs: art.outputs.clone(),
            attention: Some(art.attention),
        })?;
    }
    let mut manifest = manifest_for(
        model_dir,
        &model.config,
        model.task,
        (artifact_dtype(opts), device::device_name(opts.device)),
        model
            .weight_files
            .iter()
            .map(|(f, h)| FileDigest {
                file: f.clone(),
                sha256: h.clone(),
            })
            .collect(),
    )?;
    manifest.cpu_features = cpu_features;
    manifest.source.unused_tensors = model.unused_tensors.clone();
    Ok(manifest)
}

/// A manifest for artifacts made from `model_dir` (their entries are the
/// writer's): the model facts from its config, and the preprocessing
/// ViTImageProcessor would do for it, normalised, so the runtime
/// preprocesses exactly as the bundle was made for.
fn manifest_for(
    model_dir: &Path,
    cfg: &vit_msn_graph::Config,
    task: Task,
    (dtype, device): (&str, String),
    weights: Vec<FileDigest>,
) -> Result<Manifest> {
    let classifier = task == Task::Classification;
    let pp_path = model_dir.join("preprocessor_config.json");
    let preprocessing = match read_json_if_present(&pp_path)? {
        Some(v) => {
            Preprocessing::from_json(&v).map_err(|e| Error::file(&pp_path, e.to_string()))?
        }
        None => {
            let mut pp = Preprocessing::vit_msn_default();
            pp.height = cfg.image_size as u32;
            pp.width = cfg.image_size as u32;
            pp
        }
    };
    Ok(Manifest {
        format_version: FORMAT_VERSION,
        compiler: concat!("vit-msn ", env!("CARGO_PKG_VERSION")).into(),
        task: task.name().into(),
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
        dtype: dtype.into(),
        device,
        cpu_features: Vec::new(),
        preprocessing: Some(preprocessing.to_json()),
        artifacts: Vec::new(),
        source: Source {
            weights,
            unused_tensors: Vec::new(),
        },
        config: cfg.raw.clone(),
        fewshot: None,
    })
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
