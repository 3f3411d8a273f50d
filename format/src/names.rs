//! The names a manifest and an artifact description use for tasks, dtypes
//! and devices.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

/// Whether an artifact ends at the backbone or goes on to the classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// `ViTMSNModel`: outputs `last_hidden_state`.
    Backbone,
    /// `ViTMSNForImageClassification`: outputs `logits`.
    Classification,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Backbone => "backbone",
            Task::Classification => "classification",
        }
    }

    /// `backbone`, `classification` (or `classifier`).
    pub fn parse(s: &str) -> Option<Task> {
        match s {
            "backbone" => Some(Task::Backbone),
            "classification" | "classifier" => Some(Task::Classification),
            _ => None,
        }
    }
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Task::parse(s)
            .ok_or_else(|| format!("unknown task `{s}` (expected backbone or classification)"))
    }
}

/// What an artifact computes in: the dtype of its floating-point tensors,
/// or `int8`, whose tensors are f32 and whose linears run on int8 weights
/// with activations quantized on each call (PyTorch's dynamic quantization).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    Int8,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::Int8 => "int8",
        }
    }

    /// `f32`, `f16`, `bf16` (or `float32`, `float16`, `bfloat16`), `int8`.
    pub fn parse(s: &str) -> Option<Dtype> {
        match s {
            "f32" | "float32" => Some(Dtype::F32),
            "f16" | "float16" => Some(Dtype::F16),
            "bf16" | "bfloat16" => Some(Dtype::Bf16),
            "int8" => Some(Dtype::Int8),
            _ => None,
        }
    }

    /// The kind of its floating-point tensors (inputs, outputs, head mask).
    pub fn kind(self) -> Kind {
        match self {
            Dtype::F32 | Dtype::Int8 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::Bf16 => Kind::BFloat16,
        }
    }

    /// The name of a tensor kind as specs write it: the three float dtypes,
    /// `bool`, else `f32`.
    pub fn name_of(kind: Kind) -> &'static str {
        match kind {
            Kind::Half => "f16",
            Kind::BFloat16 => "bf16",
            Kind::Bool => "bool",
            _ => "f32",
        }
    }
}

/// `cpu` or `cuda:N`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}
