//! `encoder.layer.N`: pre-norm transformer layers.

use tch::{nn, Kind, Tensor};

use crate::trace::{linear_pointwise, PostOp};
use crate::{activation::Activation, Config, Error};

/// Which GEMM the linears record into the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinearBackend {
    /// `aten::linear` (MKL on CPU, cuBLAS on CUDA).
    #[default]
    Aten,
    /// oneDNN's `mkldnn::_linear_pointwise` on dense tensors, CPU only:
    /// faster than MKL's GEMM on these shapes here, and it fuses GELU.
    OneDnn,
}

/// `x · wᵀ + b`, then `post`, with the chosen backend.
fn project(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    backend: LinearBackend,
    post: PostOp,
) -> Result<Tensor, Error> {
    match backend {
        LinearBackend::OneDnn => linear_pointwise(x, w, b, post),
        LinearBackend::Aten => {
            let y = x.linear(w, b);
            Ok(match post {
                PostOp::None => y,
                PostOp::Gelu => y.gelu("none"),
                PostOp::GeluTanh => y.gelu("tanh"),
            })
        }
    }
}

/// `attention.attention`: separate query/key/value linears in the checkpoint,
/// fused into one projection before tracing.
pub struct SelfAttention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    qkv: Option<(Tensor, Option<Tensor>)>,
    backend: LinearBackend,
    heads: i64,
    head_dim: i64,
}

/// What one attention call computed.
pub struct AttentionOutput {
    pub context: Tensor,
    /// Softmax probabilities after the head mask, when asked for.
    pub probs: Option<Tensor>,
}

impl SelfAttention {
    pub fn new(p: &nn::Path, cfg: &Config) -> Self {
        let d = cfg.hidden_size;
        let lin = nn::LinearConfig {
            bias: cfg.qkv_bias,
            ..Default::default()
        };
        Self {
            query: nn::linear(p / "query", d, d, lin),
            key: nn::linear(p / "key", d, d, lin),
            value: nn::linear(p / "value", d, d, lin),
            qkv: None,
            backend: LinearBackend::Aten,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        }
    }

    /// Concatenates the three projections, once the weights are loaded.
    pub fn fuse(&mut self, backend: LinearBackend) {
        self.backend = backend;
        let weight = Tensor::cat(&[&self.query.ws, &self.key.ws, &self.value.ws], 0);
        let bias = match (&self.query.bs, &self.key.bs, &self.value.bs) {
            (Some(q), Some(k), Some(v)) => Some(Tensor::cat(&[q, k, v], 0)),
            _ => None,
        };
        self.qkv = Some((weight, bias));
    }

    /// `x` (B, T, D), `head_mask` (heads,) → context (B, T, D).
    ///
    /// The head mask scales each head's probabilities in the reference; since
    /// it is one scalar per head, scaling each head's context is the same and
    /// lets scaled_dot_product_attention run when probabilities are not wanted.
    pub fn forward(
        &self,
        x: &Tensor,
        head_mask: &Tensor,
        want_probs: bool,
    ) -> Result<AttentionOutput, Error> {
        let (weight, bias) = self
            .qkv
            .as_ref()
            .ok_or_else(|| Error::Trace("SelfAttention::fuse must run before forward".into()))?;
        let tokens = x.size()[1];
        let qkv = project(x, weight, bias.as_ref(), self.backend, PostOp::None)?
            .view([-1, tokens, 3, self.heads, self.head_dim])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let per_head = head_mask.view([1, self.heads, 1, 1]);
        let (context, probs) = if want_probs {
            let scores = q.matmul(&k.transpose(-1, -2)) / (self.head_dim as f64).sqrt();
            let probs = scores.softmax(-1, Kind::Float).type_as(&q) * &per_head;
            (probs.matmul(&v), Some(probs))
        } else {
            let context = Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, false, None, false,
            );
            (context * &per_head, None)
        };
        let context =
            context
                .permute([0, 2, 1, 3])
                .reshape([-1, tokens, self.heads * self.head_dim]);
        Ok(AttentionOutput { context, probs })
    }
}

/// `encoder.layer.N`.
pub struct Layer {
    layernorm_before: nn::LayerNorm,
    attention: SelfAttention,
    attention_output: nn::Linear,
    layernorm_after: nn::LayerNorm,
    intermediate: nn::Linear,
    output: nn::Linear,
    act: Activation,
    backend: LinearBackend,
}

impl Layer {
    pub fn new(p: &nn::Path, cfg: &Config, act: Activation) -> Self {
        let d = cfg.hidden_size;
        let ln = nn::LayerNormConfig {
            eps: cfg.layer_norm_eps,
            ..Default::default()
        };
        let lin = Default::default();
        Self {
            layernorm_before: nn::layer_norm(p / "layernorm_before", vec![d], ln),
            attention: SelfAttention::new(&(p / "attention" / "attention"), cfg),
            attention_output: nn::linear(p / "attention" / "output" / "dense", d, d, lin),
            layernorm_after: nn::layer_norm(p / "layernorm_after", vec![d], ln),
            intermediate: nn::linear(p / "intermediate" / "dense", d, cfg.intermediate_size, lin),
            output: nn::linear(p / "output" / "dense", cfg.intermediate_size, d, lin),
            act,
            backend: LinearBackend::Aten,
        }
    }

    pub fn fuse(&mut self, backend: LinearBackend) {
        self.backend = backend;
        self.attention.fuse(backend);
    }

    fn dense(&self, x: &Tensor, lin: &nn::Linear, post: PostOp) -> Result<Tensor, Error> {
        project(x, &lin.ws, lin.bs.as_ref(), self.backend, post)
    }

    pub fn forward(
        &self,
        x: &Tensor,
        head_mask: &Tensor,
        want_probs: bool,
    ) -> Result<LayerOutput, Error> {
        let attn =
            self.attention
                .forward(&x.apply(&self.layernorm_before), head_mask, want_probs)?;
        let h = x + self.dense(&attn.context, &self.attention_output, PostOp::None)?;
        let normed = h.apply(&self.layernorm_after);
        // GELU rides along with oneDNN's GEMM as a post-op; others run after.
        let mlp = match (self.backend, self.act) {
            (LinearBackend::OneDnn, Activation::Gelu) => {
                self.dense(&normed, &self.intermediate, PostOp::Gelu)?
            }
            (LinearBackend::OneDnn, Activation::GeluPytorchTanh) => {
                self.dense(&normed, &self.intermediate, PostOp::GeluTanh)?
            }
            _ => self
                .act
                .forward(&self.dense(&normed, &self.intermediate, PostOp::None)?),
        };
        let y = &h + self.dense(&mlp, &self.output, PostOp::None)?;
        Ok(LayerOutput {
            hidden: y,
            probs: attn.probs,
        })
    }
}

/// `encoder`.
pub struct Encoder {
    layers: Vec<Layer>,
}

/// What one layer computed.
pub struct LayerOutput {
    pub hidden: Tensor,
    /// Its attention probabilities after the head mask, when asked for.
    pub probs: Option<Tensor>,
}

pub struct EncoderOutput {
    pub last: Tensor,
    /// The input, then each layer's output, when asked for.
    pub hidden_states: Vec<Tensor>,
    pub attentions: Vec<Tensor>,
}

impl Encoder {
    pub fn new(p: &nn::Path, cfg: &Config, act: Activation) -> Self {
        let p = p / "layer";
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(&(&p / i), cfg, act))
            .collect();
        Self { layers }
    }

    pub fn fuse(&mut self, backend: LinearBackend) {
        self.layers.iter_mut().for_each(|l| l.fuse(backend));
    }

    /// `head_mask` is (layers, heads).
    pub fn forward(
        &self,
        x: Tensor,
        head_mask: &Tensor,
        want_hidden: bool,
        want_probs: bool,
    ) -> Result<EncoderOutput, Error> {
        let mut hidden_states = Vec::new();
        let mut attentions = Vec::new();
        let mut x = x;
        for (i, layer) in self.layers.iter().enumerate() {
            if want_hidden {
                hidden_states.push(x.shallow_clone());
            }
            let out = layer.forward(&x, &head_mask.get(i as i64), want_probs)?;
            attentions.extend(out.probs);
            x = out.hidden;
        }
        if want_hidden {
            hidden_states.push(x.shallow_clone());
        }
        Ok(EncoderOutput {
            last: x,
            hidden_states,
            attentions,
        })
    }
}
