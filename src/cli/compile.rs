use std::path::{Path, PathBuf};

use clap::Args;
use vit_msn::bundle::sha256_hex;
use vit_msn::fsutil::{replace_dir, sibling_tmp, write_atomic};
use vit_msn::manifest::{ArtifactEntry, FileDigest, Manifest, ModelInfo, Source, TensorSpec, FORMAT_VERSION, MANIFEST_FILE};
use vit_msn::{device, Error};
use vit_msn_graph::compile::{dtype_name, parse_resolution};
use vit_msn_graph::{CompileOptions, Task, Wanted};

use super::CliResult;

/// Compile a Hugging Face ViT-MSN folder into a bundle of TorchScript artifacts.
#[derive(Args)]
#[command(after_help = "Examples:
  vit-msn compile --model vit-msn-small --out artifacts/small
  vit-msn compile --model my-finetuned --out artifacts/ft --resolutions 224,384,160x192 --dtype bf16
  vit-msn compile --model vit-msn-small --out artifacts/small-att --outputs hidden_states,attentions")]
pub struct CompileArgs {
    /// Folder with config.json and model.safetensors or pytorch_model.bin.
    #[arg(long)]
    model: PathBuf,
    /// Bundle folder to write (replaced atomically if it exists).
    #[arg(long)]
    out: PathBuf,
    /// Comma-separated N or HxW; default the trained resolution.
    #[arg(long, value_delimiter = ',')]
    resolutions: Vec<String>,
    /// Optional outputs: hidden_states, attentions.
    #[arg(long, value_delimiter = ',')]
    outputs: Vec<String>,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// backbone or classification; default from the config's `architectures`.
    #[arg(long)]
    task: Option<String>,
}

pub fn compile(a: CompileArgs) -> CliResult {
    let mut wanted = Wanted::default();
    for o in &a.outputs {
        match o.trim() {
            "hidden_states" => wanted.hidden_states = true,
            "attentions" => wanted.attentions = true,
            "" => {}
            other => return Err(format!("--outputs: unknown output `{other}` (expected hidden_states, attentions)").into()),
        }
    }
    let resolutions = a.resolutions.iter().map(|r| parse_resolution(r)).collect::<Result<Vec<_>, _>>()?;
    let opts = CompileOptions {
        resolutions,
        wanted,
        kind: device::parse_dtype(&a.dtype)?,
        device: device::parse_device(&a.device)?,
        task: a.task.as_deref().map(str::parse::<Task>).transpose()?,
    };
    if !a.model.is_dir() {
        return Err(format!("{}: not a model folder", a.model.display()).into());
    }
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let staged = sibling_tmp(&a.out);
    let _ = std::fs::remove_dir_all(&staged);
    std::fs::create_dir_all(&staged).map_err(|e| Error::io(&staged, e))?;
    let result = build_bundle(&a.model, &staged, &opts).and_then(|()| Ok(replace_dir(&staged, &a.out)?));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staged);
    }
    result?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn build_bundle(model_dir: &Path, staged: &Path, opts: &CompileOptions) -> CliResult {
    let compiled = vit_msn_graph::compile(model_dir, staged, opts)?;
    let model = &compiled.model;
    if !model.unused_tensors.is_empty() {
        eprintln!(
            "warning: {} checkpoint tensor(s) not used by the {} model: {}",
            model.unused_tensors.len(),
            serde_json::to_value(model.task)?.as_str().unwrap_or(""),
            model.unused_tensors.join(", ")
        );
    }
    let specs = |v: &[vit_msn_graph::compile::TensorSpec]| -> Vec<TensorSpec> {
        v.iter().map(|s| TensorSpec { name: s.name.clone(), dtype: s.dtype.clone(), shape: s.shape.clone() }).collect()
    };
    let mut artifacts = Vec::new();
    for art in &compiled.artifacts {
        let path = staged.join(&art.file);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        artifacts.push(ArtifactEntry {
            height: art.height,
            width: art.width,
            file: art.file.clone(),
            sha256: sha256_hex(&bytes),
            inputs: specs(&art.inputs),
            outputs: specs(&art.outputs),
        });
    }
    let cfg = &model.config;
    let classifier = model.task == Task::Classification;
    let preprocessing = read_json_if_present(&model_dir.join("preprocessor_config.json"))?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        compiler: concat!("vit-msn ", env!("CARGO_PKG_VERSION")).into(),
        task: if classifier { "classification" } else { "backbone" }.into(),
        model: ModelInfo {
            hidden_size: cfg.hidden_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            num_channels: cfg.num_channels,
            patch_size: cfg.patch_size,
            image_size: cfg.image_size,
            labels: if classifier { cfg.id2label.clone() } else { Vec::new() },
            problem_type: cfg.problem_type.clone(),
        },
        dtype: dtype_name(opts.kind).into(),
        device: device::device_name(opts.device),
        preprocessing,
        artifacts,
        source: Source {
            weights: model.weight_files.iter().map(|(f, h)| FileDigest { file: f.clone(), sha256: h.clone() }).collect(),
            unused_tensors: model.unused_tensors.clone(),
        },
        config: cfg.raw.clone(),
    };
    let text = serde_json::to_string_pretty(&manifest)?;
    write_atomic(&staged.join(MANIFEST_FILE), text.as_bytes())?;
    Ok(())
}

fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>, Box<dyn std::error::Error>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value = serde_json::from_str(&text).map_err(|e| format!("{}: not valid JSON: {e}", path.display()))?;
    Ok(Some(value))
}
