//! The compiler: a Hugging Face folder in, one TorchScript artifact per
//! resolution out.

use std::path::Path;

use tch::{Device, Kind, Tensor};
use vit_msn_format::bounds::{MAX_PATCHES, MAX_SIDE};
pub use vit_msn_format::{
    ArtifactDescription, Attention, CpuFeature, TensorSpec, ARTIFACT_EXTRA_FILE,
};

use crate::config::Task;
use crate::encoder::{AttentionImpl, LinearBackend, EXPLICIT_MAX_TOKENS};
use crate::model::{Model, Wanted};
use crate::trace::trace_and_save;
use crate::Error;

#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// (height, width) pairs; empty means the trained resolution only.
    pub resolutions: Vec<(i64, i64)>,
    pub wanted: Wanted,
    pub kind: Kind,
    pub device: Device,
    /// Overrides the task that `architectures` names.
    pub task: Option<Task>,
    /// GEMM backend for the linears; `None` picks oneDNN on the CPU in f32
    /// (its kernels run on every x86-64 CPU), else aten.
    pub linear: Option<LinearBackend>,
    /// How attention is computed where the attentions are not returned;
    /// `None` picks [`AttentionImpl::Explicit`] for bf16 with oneDNN's
    /// linears at up to [`EXPLICIT_MAX_TOKENS`] tokens, else SDPA (see
    /// [`attention_for`]). Eager, which returns the probabilities, is the
    /// one for `wanted.attentions`.
    pub attention: Option<AttentionImpl>,
    /// CPU features the chosen kernels need, recorded in each artifact's
    /// description (`vit_msn::compiler` works them out).
    pub cpu_features: Vec<CpuFeature>,
}

#[derive(Debug, Clone)]
pub struct Artifact {
    pub height: i64,
    pub width: i64,
    pub file: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// How its graph computes attention (recorded in its description and
    /// the manifest, for the runtime's memory estimate).
    pub attention: Attention,
}

pub struct Compiled {
    pub model: Model,
    pub artifacts: Vec<Artifact>,
}

/// `f32`, `f16`, `bf16` or `bool`, as specs name a tensor kind.
pub fn dtype_name(kind: Kind) -> &'static str {
    vit_msn_format::Dtype::name_of(kind)
}

/// The dtype the artifacts record: their tensors' kind, or `int8` for
/// int8 linears (whose tensors are f32).
pub fn artifact_dtype(opts: &CompileOptions) -> &'static str {
    match opts.linear {
        Some(LinearBackend::DynamicInt8) => vit_msn_format::Dtype::Int8.name(),
        _ => dtype_name(opts.kind),
    }
}

/// Loads `model_dir` and writes one artifact per resolution into `out_dir`.
/// For CUDA, libtorch's CUDA support must already be loaded (the `vit-msn`
/// crate's `device::check_available` does it).
pub fn compile(model_dir: &Path, out_dir: &Path, opts: &CompileOptions) -> Result<Compiled, Error> {
    if let Device::Cuda(i) = opts.device {
        if !tch::Cuda::is_available() || i >= tch::Cuda::device_count() as usize {
            return Err(Error::Invalid(format!(
                "cuda:{i} was asked for, but this machine has no such CUDA device"
            )));
        }
    }
    if !matches!(opts.kind, Kind::Float | Kind::Half | Kind::BFloat16) {
        return Err(Error::Invalid(
            "the artifact dtype must be f32, f16 or bf16".into(),
        ));
    }
    if opts.linear == Some(LinearBackend::DynamicInt8)
        && (opts.device != Device::Cpu || opts.kind != Kind::Float)
    {
        return Err(Error::Invalid(
            "int8 artifacts run on the CPU only (fbgemm's int8 kernels), with f32 tensors in and out"
                .into(),
        ));
    }
    let mut model = Model::from_dir(model_dir, opts.task, opts.device)?;
    let cfg = model.config.clone();
    let mut resolutions = opts.resolutions.clone();
    if resolutions.is_empty() {
        resolutions.push((cfg.image_size, cfg.image_size));
    }
    for &(h, w) in &resolutions {
        if h < cfg.patch_size || w < cfg.patch_size {
            return Err(Error::Invalid(format!(
                "resolution {h}x{w} is smaller than one {p}x{p} patch",
                p = cfg.patch_size
            )));
        }
        let max_side = i64::from(MAX_SIDE);
        if h > max_side || w > max_side {
            return Err(Error::Invalid(format!(
                "resolution {h}x{w}: each side must be at most {max_side} pixels"
            )));
        }
        let patches = (h / cfg.patch_size) * (w / cfg.patch_size);
        if patches > MAX_PATCHES {
            return Err(Error::Invalid(format!(
                "resolution {h}x{w} makes {patches} patches of {p}x{p}; at most {MAX_PATCHES} are supported",
                p = cfg.patch_size
            )));
        }
    }
    resolutions.dedup();
    // Position tables in f32 from the f32 weights, before any cast.
    let tables: Vec<Tensor> = resolutions
        .iter()
        .map(|&(h, w)| tch::no_grad(|| model.vit.embeddings.position_table(h, w)))
        .collect();
    model.vs.set_kind(opts.kind);
    // oneDNN's bf16 and f16 inner products need AVX-512 (or AVX2-VNNI-2);
    // its f32 one runs on every x86-64 CPU.
    let backend = opts.linear.unwrap_or(match (opts.device, opts.kind) {
        (Device::Cpu, Kind::Float) => LinearBackend::OneDnn,
        _ => LinearBackend::Aten,
    });
    if backend == LinearBackend::OneDnn && opts.device != Device::Cpu {
        return Err(Error::Invalid(
            "the oneDNN linear runs on the CPU only".into(),
        ));
    }
    let traced = model.fused(backend);

    let dtype = dtype_name(opts.kind);
    let (layers, heads) = (cfg.num_hidden_layers, cfg.num_attention_heads);
    let mut artifacts = Vec::new();
    for (&(h, w), table) in resolutions.iter().zip(tables) {
        let table = table.to_kind(opts.kind).to_device(opts.device);
        let (gh, gw) = (h / cfg.patch_size, w / cfg.patch_size);
        let (patches, tokens) = (gh * gw, gh * gw + 1);
        let imp = attention_for(opts, backend, tokens);
        // Explicit attention holds the scores, as eager does.
        let attention = match model.plan(opts.wanted, imp).attention {
            AttentionImpl::Eager | AttentionImpl::Explicit => Attention::Eager,
            AttentionImpl::Sdpa => Attention::Sdpa,
        };
        let spec = |name: &str, dtype: &str, shape: Vec<i64>| TensorSpec {
            name: name.into(),
            dtype: dtype.into(),
            shape,
        };
        let inputs = vec![
            spec("pixel_values", dtype, vec![-1, cfg.num_channels, h, w]),
            spec("bool_masked_pos", "bool", vec![-1, patches]),
            spec("head_mask", dtype, vec![layers, heads]),
        ];
        let mut outputs = vec![match model.task {
            Task::Classification => spec("logits", dtype, vec![-1, cfg.num_labels()]),
            Task::Backbone => spec(
                "last_hidden_state",
                dtype,
                vec![-1, tokens, cfg.hidden_size],
            ),
        }];
        if opts.wanted.hidden_states {
            outputs.push(spec(
                "hidden_states",
                dtype,
                vec![layers + 1, -1, tokens, cfg.hidden_size],
            ));
        }
        if opts.wanted.attentions {
            outputs.push(spec(
                "attentions",
                dtype,
                vec![layers, -1, heads, tokens, tokens],
            ));
        }
        let artifact = Artifact {
            height: h,
            width: w,
            file: format!("model_{h}x{w}.pt"),
            inputs,
            outputs,
            attention,
        };

        // Example inputs; batch 2 so nothing can specialise on batch 1.
        let opts_f = (opts.kind, opts.device);
        let pixel_values = Tensor::randn([2, cfg.num_channels, h, w], opts_f);
        let bool_masked_pos = Tensor::zeros([2, patches], (Kind::Bool, opts.device));
        let head_mask = Tensor::ones([layers, heads], opts_f);
        let extra = ArtifactDescription {
            producer: concat!("vit-msn-graph ", env!("CARGO_PKG_VERSION")).into(),
            task: model.task,
            dtype: artifact_dtype(opts).into(),
            device: device_name(opts.device),
            cpu_features: opts.cpu_features.clone(),
            height: h,
            width: w,
            inputs: artifact.inputs.clone(),
            outputs: artifact.outputs.clone(),
            attention: Some(attention),
        };
        let extra = serde_json::to_string(&extra).map_err(|e| Error::Invalid(e.to_string()))?;
        tch::no_grad(|| {
            trace_and_save(
                &out_dir.join(&artifact.file),
                &[
                    ("pixel_values", &pixel_values),
                    ("bool_masked_pos", &bool_masked_pos),
                    ("head_mask", &head_mask),
                ],
                || {
                    traced.forward(
                        &pixel_values,
                        &bool_masked_pos,
                        &head_mask,
                        &table,
                        opts.wanted,
                        imp,
                    )
                },
                ARTIFACT_EXTRA_FILE,
                &extra,
            )
        })?;
        artifacts.push(artifact);
    }
    Ok(Compiled { model, artifacts })
}

/// The attention an artifact of `tokens` tokens computes when its
/// attentions are not returned: `opts.attention`, or by default explicit
/// matmuls for bf16 with oneDNN's linears at up to [`EXPLICIT_MAX_TOKENS`]
/// tokens (faster there than libtorch's CPU flash kernel), else SDPA.
pub fn attention_for(opts: &CompileOptions, backend: LinearBackend, tokens: i64) -> AttentionImpl {
    opts.attention.unwrap_or(
        if opts.kind == Kind::BFloat16
            && backend == LinearBackend::OneDnn
            && tokens <= EXPLICIT_MAX_TOKENS
        {
            AttentionImpl::Explicit
        } else {
            AttentionImpl::Sdpa
        },
    )
}

pub use vit_msn_format::device_name;
