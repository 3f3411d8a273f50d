//! The vit-msn bundle format, defined once. The compiler (`vit-msn-graph`)
//! writes it and the runtime (`vit-msn`) reads it; both depend on this crate,
//! and the runtime never depends on the compiler.
//!
//! - [`TensorSpec`] and [`ArtifactDescription`]: an artifact's signature, and
//!   the `extra/vit_msn.json` stored inside every `.pt` file vit-msn writes;
//!   [`Attention`]: how it computes attention.
//! - [`Task`], [`Dtype`], [`CpuFeature`] and [`device_name`]: the names the
//!   manifest and the descriptions use.
//! - [`bounds`]: the limits both sides enforce.
//! - [`sha256_hex`] and [`read_safetensors`]: digests and the one safetensors reader.
//!
//! The manifest itself (`manifest.json`) is `vit_msn::manifest`.

pub mod bounds;
mod cpu_feature;
mod names;
mod tensors;

pub use cpu_feature::CpuFeature;
pub use names::{device_name, Dtype, Task};
pub use tensors::{read_safetensors, safetensors_dtype_name};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Name of the JSON file stored inside each vit-msn artifact (`extra/` in
/// the TorchScript archive).
pub const ARTIFACT_EXTRA_FILE: &str = "vit_msn.json";

/// One input or output of an artifact. `-1` in `shape` is the batch dimension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
}

/// What an artifact says about itself (its `extra/vit_msn.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactDescription {
    /// The program and version that wrote it.
    pub producer: String,
    pub task: Task,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// CPU features its kernels use; none for portable ones.
    #[serde(default)]
    pub cpu_features: Vec<CpuFeature>,
    pub height: i64,
    pub width: i64,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// How it computes attention; absent in files written before it was
    /// recorded, and in files whose producer does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<Attention>,
}

/// How an artifact computes attention, which decides how much memory a
/// forward pass holds at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// Each layer holds its heads × tokens² attention scores at once:
    /// transformers' eager attention (what graph/python/export.py traces),
    /// the compiler's for artifacts that return `attentions`, and its two
    /// matmuls for bf16 CPU artifacts of at most 257 tokens.
    Eager,
    /// Scaled dot-product attention, worked in blocks: no layer holds the
    /// whole score matrix.
    Sdpa,
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
