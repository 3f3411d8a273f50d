//! `ViTMSNModel` and `ViTMSNForImageClassification`.

use std::path::Path;

use tch::{nn, Device, Tensor};

use crate::config::{Config, Task};
use crate::embeddings::Embeddings;
use crate::encoder::{project, AttentionImpl, Encoder, FusedEncoder, LinearBackend, Plan};
use crate::trace::PostOp;
use crate::weights::Checkpoint;
use crate::Error;

/// `ViTMSNModel`: embeddings, encoder, final `layernorm`. No pooler.
pub struct VitMsnModel {
    pub embeddings: Embeddings,
    encoder: Encoder,
    layernorm: nn::LayerNorm,
}

/// What the graph returns, by the reference's output names.
pub struct ModelOutput {
    /// (B, T, D), or (B, 1, D) when only the CLS token was asked for.
    pub last_hidden_state: Tensor,
    pub hidden_states: Vec<Tensor>,
    pub attentions: Vec<Tensor>,
}

/// Which optional outputs to compute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wanted {
    pub hidden_states: bool,
    pub attentions: bool,
}

impl VitMsnModel {
    pub fn new(p: &nn::Path, cfg: &Config) -> Result<Self, Error> {
        let ln = nn::LayerNormConfig {
            eps: cfg.layer_norm_eps,
            ..Default::default()
        };
        Ok(Self {
            embeddings: Embeddings::new(&(p / "embeddings"), cfg),
            encoder: Encoder::new(&(p / "encoder"), cfg, cfg.activation()?),
            layernorm: nn::layer_norm(p / "layernorm", vec![cfg.hidden_size], ln),
        })
    }

    /// The traced form, from the loaded (and cast) weights: each layer's
    /// query/key/value projections fused, the linears on `backend`.
    pub fn fused(&self, backend: LinearBackend) -> FusedVitMsnModel<'_> {
        FusedVitMsnModel {
            loaded: self,
            encoder: self.encoder.fused(backend),
        }
    }
}

/// A [`VitMsnModel`] as it is traced.
pub struct FusedVitMsnModel<'a> {
    loaded: &'a VitMsnModel,
    encoder: FusedEncoder<'a>,
}

impl FusedVitMsnModel<'_> {
    /// With `plan.cls_only_last`, `last_hidden_state` holds the CLS token
    /// only, and the last layer skips the work that only the other tokens'
    /// outputs need.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        bool_masked_pos: &Tensor,
        head_mask: &Tensor,
        position_table: &Tensor,
        plan: Plan,
    ) -> Result<ModelOutput, Error> {
        let m = self.loaded;
        let x = m
            .embeddings
            .forward(pixel_values, bool_masked_pos, position_table);
        let enc = self.encoder.forward(x, head_mask, plan)?;
        Ok(ModelOutput {
            last_hidden_state: enc.last.apply(&m.layernorm),
            hidden_states: enc.hidden_states,
            attentions: enc.attentions,
        })
    }
}

/// A loaded checkpoint, as a backbone or a classifier.
pub struct Model {
    pub vs: nn::VarStore,
    pub config: Config,
    pub task: Task,
    pub vit: VitMsnModel,
    /// `classifier`, on the CLS token after the final layernorm.
    pub classifier: Option<nn::Linear>,
    /// Checkpoint tensors that the model did not use.
    pub unused_tensors: Vec<String>,
    /// Weight files read, with their sha256.
    pub weight_files: Vec<(String, String)>,
}

impl Model {
    /// Reads `config.json` and the weights of a Hugging Face model folder.
    /// `task` overrides what `architectures` says.
    pub fn from_dir(dir: &Path, task: Option<Task>, device: Device) -> Result<Self, Error> {
        let config = Config::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::from_dir(dir)?;
        let task = task.or_else(|| config.task_from_architectures()).unwrap_or(
            if ckpt.contains("classifier.weight") {
                Task::Classification
            } else {
                Task::Backbone
            },
        );
        if task == Task::Classification && config.num_labels() == 0 {
            return Err(Error::Config(
                "`id2label` is empty: a classifier without labels (transformers' identity head) \
                 is not supported; compile it with --task backbone"
                    .into(),
            ));
        }
        // The model is allocated before its tensors are compared with the
        // checkpoint's; a config far larger than the weights is refused first.
        let held: i64 = ckpt
            .tensors
            .values()
            .map(Tensor::numel)
            .map(|n| n as i64)
            .sum();
        let described = config
            .parameter_count(task == Task::Classification)
            .unwrap_or(i64::MAX);
        if described > held.saturating_mul(2).saturating_add(1 << 20) {
            return Err(Error::Config(format!(
                "config.json describes a model of {described} parameters, but the checkpoint \
                 holds {held} values: its sizes do not match the weights"
            )));
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let vit = VitMsnModel::new(&root, &config)?;
        let classifier = (task == Task::Classification).then(|| {
            nn::linear(
                &root / "classifier",
                config.hidden_size,
                config.num_labels(),
                Default::default(),
            )
        });
        let unused_tensors = ckpt.load_into(&vs, &["embeddings.mask_token"])?;
        let mut vs = vs;
        // Weights are constants of the trace; a tensor that requires grad cannot be one.
        vs.freeze();
        Ok(Self {
            vs,
            config,
            task,
            vit,
            classifier,
            unused_tensors,
            weight_files: ckpt.files,
        })
    }

    /// What a trace computes for `wanted`, with `attention` unless the
    /// attentions are returned (which needs eager): a classifier reads the
    /// CLS token alone, so unless every token's states or attentions are
    /// returned, the last layer computes only it.
    pub fn plan(&self, wanted: Wanted, attention: AttentionImpl) -> Plan {
        Plan {
            hidden_states: wanted.hidden_states,
            attention: if wanted.attentions {
                AttentionImpl::Eager
            } else {
                attention
            },
            cls_only_last: self.classifier.is_some() && !wanted.hidden_states && !wanted.attentions,
        }
    }

    /// The traced form (see [`VitMsnModel::fused`]).
    pub fn fused(&self, backend: LinearBackend) -> FusedModel<'_> {
        FusedModel {
            loaded: self,
            vit: self.vit.fused(backend),
            backend,
        }
    }
}

/// A [`Model`] as it is traced.
pub struct FusedModel<'a> {
    loaded: &'a Model,
    vit: FusedVitMsnModel<'a>,
    backend: LinearBackend,
}

impl FusedModel<'_> {
    /// The primary output (`last_hidden_state` or `logits`) and the optional
    /// ones; attention as [`Model::plan`] decides from `attention`.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        bool_masked_pos: &Tensor,
        head_mask: &Tensor,
        position_table: &Tensor,
        wanted: Wanted,
        attention: AttentionImpl,
    ) -> Result<Vec<(&'static str, Tensor)>, Error> {
        let m = self.loaded;
        let out = self.vit.forward(
            pixel_values,
            bool_masked_pos,
            head_mask,
            position_table,
            m.plan(wanted, attention),
        )?;
        let attentions = wanted.attentions.then(|| match out.attentions.as_slice() {
            [] => no_attentions(&out.last_hidden_state, m.config.num_attention_heads),
            layers => Tensor::stack(layers, 0),
        });
        let mut named = Vec::new();
        match &m.classifier {
            Some(classifier) => {
                let cls = out.last_hidden_state.select(1, 0);
                // The head is quantized too in int8, as PyTorch's and ONNX
                // Runtime's dynamic quantization quantize every linear.
                let logits = match self.backend {
                    LinearBackend::DynamicInt8 => project(
                        &cls,
                        &classifier.ws,
                        classifier.bs.as_ref(),
                        self.backend,
                        PostOp::None,
                    )?,
                    _ => cls.apply(classifier),
                };
                named.push(("logits", logits))
            }
            None => named.push(("last_hidden_state", out.last_hidden_state)),
        }
        if wanted.hidden_states {
            named.push(("hidden_states", Tensor::stack(&out.hidden_states, 0)));
        }
        if let Some(attentions) = attentions {
            named.push(("attentions", attentions));
        }
        Ok(named)
    }
}

/// The attentions of a model without layers: (0, B, heads, T, T), shaped
/// from the (B, T, D) states by views, so that the trace keeps B dynamic.
fn no_attentions(states: &Tensor, heads: i64) -> Tensor {
    let tokens = states.size()[1];
    states
        .narrow(2, 0, 1)
        .unsqueeze(1)
        .expand([-1, heads, -1, tokens], false)
        .unsqueeze(0)
        .narrow(0, 0, 0)
}
