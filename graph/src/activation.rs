//! The `hidden_act` functions transformers 4.46.3 accepts (`ACT2CLS`), plus
//! `selu`, which its documentation promises.

use std::f64::consts::PI;

use tch::Tensor;

use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// Exact GELU (erf); also `gelu_python`, the same function written out.
    Gelu,
    /// `gelu_10`: exact GELU clipped to [-10, 10].
    Gelu10,
    /// `gelu_new` and `gelu_accurate`: the tanh approximation written out.
    GeluNew,
    /// `gelu_fast`: the tanh approximation with x·(1 + 0.044715·x²) factored.
    GeluFast,
    /// `gelu_pytorch_tanh`: torch's own tanh approximation.
    GeluPytorchTanh,
    QuickGelu,
    Laplace,
    LeakyRelu,
    Linear,
    Mish,
    Relu,
    Relu2,
    Relu6,
    Selu,
    Sigmoid,
    Silu,
    Tanh,
}

pub const NAMES: &[&str] = &[
    "gelu",
    "gelu_10",
    "gelu_fast",
    "gelu_new",
    "gelu_python",
    "gelu_pytorch_tanh",
    "gelu_accurate",
    "laplace",
    "leaky_relu",
    "linear",
    "mish",
    "quick_gelu",
    "relu",
    "relu2",
    "relu6",
    "selu",
    "sigmoid",
    "silu",
    "swish",
    "tanh",
];

impl std::str::FromStr for Activation {
    type Err = Error;
    fn from_str(name: &str) -> Result<Self, Error> {
        Ok(match name {
            "gelu" | "gelu_python" => Activation::Gelu,
            "gelu_10" => Activation::Gelu10,
            "gelu_new" | "gelu_accurate" => Activation::GeluNew,
            "gelu_fast" => Activation::GeluFast,
            "gelu_pytorch_tanh" => Activation::GeluPytorchTanh,
            "quick_gelu" => Activation::QuickGelu,
            "laplace" => Activation::Laplace,
            "leaky_relu" => Activation::LeakyRelu,
            "linear" => Activation::Linear,
            "mish" => Activation::Mish,
            "relu" => Activation::Relu,
            "relu2" => Activation::Relu2,
            "relu6" => Activation::Relu6,
            "selu" => Activation::Selu,
            "sigmoid" => Activation::Sigmoid,
            "silu" | "swish" => Activation::Silu,
            "tanh" => Activation::Tanh,
            other => {
                return Err(Error::Config(format!(
                    "unknown `hidden_act` `{other}`; supported: {}",
                    NAMES.join(", ")
                )))
            }
        })
    }
}

impl Activation {
    /// [`Activation::forward`], writing into `x` where torch has the in-place
    /// op (the GELUs, ReLU, SiLU): for a GEMM's fresh output nothing else reads.
    pub fn forward_in_place(self, mut x: Tensor) -> Tensor {
        match self {
            Activation::Gelu => x.gelu_("none"),
            Activation::GeluPytorchTanh => x.gelu_("tanh"),
            Activation::Relu => x.relu_(),
            Activation::Silu => x.silu_(),
            _ => self.forward(&x),
        }
    }

    pub fn forward(self, x: &Tensor) -> Tensor {
        let tanh_approx = |inner: Tensor| (inner.tanh() + 1.0) * x * 0.5;
        match self {
            Activation::Gelu => x.gelu("none"),
            Activation::Gelu10 => x.gelu("none").clamp(-10.0, 10.0),
            Activation::GeluNew => {
                tanh_approx((x + x.pow_tensor_scalar(3.0) * 0.044715) * (2.0 / PI).sqrt())
            }
            Activation::GeluFast => tanh_approx(x * 0.7978845608 * ((x * x) * 0.044715 + 1.0)),
            Activation::GeluPytorchTanh => x.gelu("tanh"),
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            // mu = 0.707107 and sigma = 0.282095 as transformers writes them.
            #[allow(clippy::approx_constant)]
            Activation::Laplace => (((x - 0.707107) / (0.282095 * 2f64.sqrt())).erf() + 1.0) * 0.5,
            Activation::LeakyRelu => x.leaky_relu(),
            Activation::Linear => x.shallow_clone(),
            Activation::Mish => x.mish(),
            Activation::Relu => x.relu(),
            Activation::Relu2 => x.relu().square(),
            Activation::Relu6 => x.clamp(0.0, 6.0),
            Activation::Selu => x.selu(),
            Activation::Sigmoid => x.sigmoid(),
            Activation::Silu => x.silu(),
            Activation::Tanh => x.tanh(),
        }
    }
}
