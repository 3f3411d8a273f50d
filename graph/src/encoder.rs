//! `encoder.layer.N`: pre-norm transformer layers.

use tch::{nn, Kind, Tensor};

use crate::trace::{linear_dynamic_int8, linear_pointwise, PostOp};
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
    /// `quantized::linear_dynamic`, CPU only: int8 weights with one scale per
    /// output channel, activations quantized on each call (fbgemm on x86).
    /// f32 in and out; what `--dtype int8` compiles.
    DynamicInt8,
}

/// `x · wᵀ + b`, then `post`, with the chosen backend.
pub(crate) fn project(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    backend: LinearBackend,
    post: PostOp,
) -> Result<Tensor, Error> {
    let y = match backend {
        LinearBackend::OneDnn => return linear_pointwise(x, w, b, post),
        LinearBackend::Aten => x.linear(w, b),
        LinearBackend::DynamicInt8 => linear_dynamic_int8(x, w, b)?,
    };
    Ok(match post {
        PostOp::None => y,
        PostOp::Gelu => y.gelu("none"),
        PostOp::GeluTanh => y.gelu("tanh"),
    })
}

/// A weight and its bias, concatenated from several checkpoint linears.
type FusedLinear = (Tensor, Option<Tensor>);

/// The attention implementations transformers offers (`attn_implementation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Explicit softmax(q·kᵀ/√d)·v: returns the probabilities.
    Eager,
    /// `scaled_dot_product_attention`: no probabilities, less memory.
    Sdpa,
    /// softmax(q·kᵀ/√d)·v as two batched matmuls with the softmax in the
    /// artifact dtype, probabilities not kept: what the compiler picks for bf16
    /// with oneDNN's linears at up to [`EXPLICIT_MAX_TOKENS`] tokens, where
    /// libtorch's CPU flash kernel is about twice as slow in bf16.
    Explicit,
}

/// The most tokens for which [`AttentionImpl::Explicit`] beat SDPA in bf16
/// on an AVX512-BF16 CPU at batch 1 and 8 (Zen 4: 197 and 257 tokens 1.5–2×
/// faster; 401 tokens faster at batch 1 but slower at batch 8; 1025 slower).
pub const EXPLICIT_MAX_TOKENS: i64 = 257;

/// Multi-head attention of (B, heads, rows, head_dim) queries, keys and
/// values, each head scaled by `per_head` (1, heads, 1, 1). The head mask
/// scales each head's probabilities in the reference; since it is one scalar
/// per head, scaling each head's context is the same, which lets SDPA run.
/// Returns the context, and the probabilities after the head mask for eager.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    per_head: &Tensor,
    imp: AttentionImpl,
) -> (Tensor, Option<Tensor>) {
    match imp {
        AttentionImpl::Eager => {
            let head_dim = q.size()[3];
            let scores = q.matmul(&k.transpose(-1, -2)) / (head_dim as f64).sqrt();
            let probs = scores.softmax(-1, Kind::Float).type_as(q) * per_head;
            (probs.matmul(v), Some(probs))
        }
        AttentionImpl::Explicit => {
            let scale = 1.0 / (q.size()[3] as f64).sqrt();
            // Scaling q (rows × head_dim) costs less than scaling the scores.
            let (q, k, v) = if q.kind() == Kind::Float {
                (q * scale, k.shallow_clone(), v.shallow_clone())
            } else {
                // q, k and v are strided views of one projection, which both
                // matmuls would copy; copied once up front (q scaled in its
                // copy), bf16 attention gives the same numbers 3–6% faster on
                // Zen 4 (benches/op_profile.py). In f32 it measured level.
                let q = q.contiguous().g_mul_scalar_(scale);
                (q, k.contiguous(), v.contiguous())
            };
            let scores = q.matmul(&k.transpose(-1, -2));
            let mut context = scores.softmax(-1, q.kind()).matmul(&v);
            (context.g_mul_(per_head), None)
        }
        AttentionImpl::Sdpa => {
            let mut context = Tensor::scaled_dot_product_attention::<Tensor>(
                q, k, v, None, 0.0, false, None, false,
            );
            // In place, like the residual adds in `FusedLayer::forward`.
            (context.g_mul_(per_head), None)
        }
    }
}

/// What a traced forward computes, decided once from the task and the
/// outputs asked for, and handed down from the model to each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Return every layer's input and the last layer's output.
    pub hidden_states: bool,
    /// Eager attention, returning its probabilities, or SDPA or explicit.
    pub attention: AttentionImpl,
    /// The last layer computes the CLS token's row only (a classifier
    /// without optional outputs reads nothing else).
    pub cls_only_last: bool,
}

/// `attention.attention`: separate query/key/value linears in the checkpoint.
pub struct SelfAttention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    heads: i64,
    head_dim: i64,
}

/// A [`SelfAttention`] as it is traced: its projections fused into one GEMM.
pub struct FusedSelfAttention<'a> {
    loaded: &'a SelfAttention,
    /// query|key|value, for every token.
    qkv: FusedLinear,
    /// key|value, for the layer that computes the query of the CLS token only.
    kv: FusedLinear,
    backend: LinearBackend,
}

/// What one attention call computed.
pub struct AttentionOutput {
    pub context: Tensor,
    /// Softmax probabilities after the head mask, for eager attention.
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
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        }
    }

    /// The traced form, from the loaded (and cast) weights. Only the tensors
    /// a trace uses become constants of the artifact.
    pub fn fused(&self, backend: LinearBackend) -> FusedSelfAttention<'_> {
        FusedSelfAttention {
            loaded: self,
            qkv: concat(&[&self.query, &self.key, &self.value]),
            kv: concat(&[&self.key, &self.value]),
            backend,
        }
    }
}

impl FusedSelfAttention<'_> {
    /// `x` (B, T, D), `head_mask` (heads,) → context (B, Q, D), where the
    /// queries Q are all T tokens, or only the CLS token when `cls_only`.
    pub fn forward(
        &self,
        x: &Tensor,
        head_mask: &Tensor,
        imp: AttentionImpl,
        cls_only: bool,
    ) -> Result<AttentionOutput, Error> {
        let a = self.loaded;
        let tokens = x.size()[1];
        // (B, rows, n·D) → n tensors of (B, heads, rows, head_dim).
        let split = |y: Tensor, rows: i64, n: i64| {
            y.view([-1, rows, n, a.heads, a.head_dim])
                .permute([2, 0, 3, 1, 4])
        };
        let proj = |x: &Tensor, (w, b): (&Tensor, Option<&Tensor>)| {
            project(x, w, b, self.backend, PostOp::None)
        };
        let (q, k, v) = if cls_only {
            let q = proj(&x.narrow(1, 0, 1), (&a.query.ws, a.query.bs.as_ref()))?;
            let kv = split(proj(x, (&self.kv.0, self.kv.1.as_ref()))?, tokens, 2);
            (split(q, 1, 1).get(0), kv.get(0), kv.get(1))
        } else {
            let qkv = split(proj(x, (&self.qkv.0, self.qkv.1.as_ref()))?, tokens, 3);
            (qkv.get(0), qkv.get(1), qkv.get(2))
        };
        let queries = q.size()[2];
        let per_head = head_mask.view([1, a.heads, 1, 1]);
        let (context, probs) = attention(&q, &k, &v, &per_head, imp);
        let context = context
            .permute([0, 2, 1, 3])
            .reshape([-1, queries, a.heads * a.head_dim]);
        Ok(AttentionOutput { context, probs })
    }
}

/// The linears' weights (and biases, if all have one) stacked along the output.
fn concat(linears: &[&nn::Linear]) -> FusedLinear {
    let weights: Vec<&Tensor> = linears.iter().map(|l| &l.ws).collect();
    let biases: Option<Vec<&Tensor>> = linears.iter().map(|l| l.bs.as_ref()).collect();
    (Tensor::cat(&weights, 0), biases.map(|b| Tensor::cat(&b, 0)))
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
}

/// A [`Layer`] as it is traced.
pub struct FusedLayer<'a> {
    loaded: &'a Layer,
    attention: FusedSelfAttention<'a>,
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
        }
    }

    pub fn fused(&self, backend: LinearBackend) -> FusedLayer<'_> {
        FusedLayer {
            loaded: self,
            attention: self.attention.fused(backend),
            backend,
        }
    }
}

impl FusedLayer<'_> {
    fn dense(&self, x: &Tensor, lin: &nn::Linear, post: PostOp) -> Result<Tensor, Error> {
        project(x, &lin.ws, lin.bs.as_ref(), self.backend, post)
    }

    /// `x` (B, T, D) → (B, T, D), or (B, 1, D) for the CLS token only when
    /// `cls_only`: every token still feeds the keys and values, but only the
    /// CLS row goes on through the attention output and the MLP.
    pub fn forward(
        &self,
        x: &Tensor,
        head_mask: &Tensor,
        imp: AttentionImpl,
        cls_only: bool,
    ) -> Result<LayerOutput, Error> {
        let l = self.loaded;
        let attn =
            self.attention
                .forward(&x.apply(&l.layernorm_before), head_mask, imp, cls_only)?;
        let residual = if cls_only {
            x.narrow(1, 0, 1)
        } else {
            x.shallow_clone()
        };
        // The residual adds (and the activation and head-mask scale) write into
        // the fresh output they follow instead of a new tensor: at batch 8 an
        // int8 pass is about 3% faster (fewer bytes through the caches).
        let h = self
            .dense(&attn.context, &l.attention_output, PostOp::None)?
            .g_add_(&residual);
        let normed = h.apply(&l.layernorm_after);
        // GELU rides along with oneDNN's GEMM as a post-op; others run after.
        let mlp = match (self.backend, l.act) {
            (LinearBackend::OneDnn, Activation::Gelu) => {
                self.dense(&normed, &l.intermediate, PostOp::Gelu)?
            }
            (LinearBackend::OneDnn, Activation::GeluPytorchTanh) => {
                self.dense(&normed, &l.intermediate, PostOp::GeluTanh)?
            }
            _ => l
                .act
                .forward_in_place(self.dense(&normed, &l.intermediate, PostOp::None)?),
        };
        let y = self.dense(&mlp, &l.output, PostOp::None)?.g_add_(&h);
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

/// An [`Encoder`] as it is traced.
pub struct FusedEncoder<'a> {
    layers: Vec<FusedLayer<'a>>,
}

/// What one layer computed.
pub struct LayerOutput {
    pub hidden: Tensor,
    /// Its attention probabilities after the head mask, for eager attention.
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

    pub fn fused(&self, backend: LinearBackend) -> FusedEncoder<'_> {
        FusedEncoder {
            layers: self.layers.iter().map(|l| l.fused(backend)).collect(),
        }
    }
}

impl FusedEncoder<'_> {
    /// `head_mask` is (layers, heads).
    pub fn forward(
        &self,
        x: Tensor,
        head_mask: &Tensor,
        plan: Plan,
    ) -> Result<EncoderOutput, Error> {
        let mut hidden_states = Vec::new();
        let mut attentions = Vec::new();
        let mut x = x;
        for (i, layer) in self.layers.iter().enumerate() {
            if plan.hidden_states {
                hidden_states.push(x.shallow_clone());
            }
            let last = i + 1 == self.layers.len();
            let out = layer.forward(
                &x,
                &head_mask.get(i as i64),
                plan.attention,
                plan.cls_only_last && last,
            )?;
            attentions.extend(out.probs);
            x = out.hidden;
        }
        if plan.hidden_states {
            hidden_states.push(x.shallow_clone());
        }
        Ok(EncoderOutput {
            last: x,
            hidden_states,
            attentions,
        })
    }
}
