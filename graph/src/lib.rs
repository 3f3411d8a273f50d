//! ViT-MSN as a libtorch graph written with tch-rs, and the compiler that
//! traces it into TorchScript artifacts.
//!
//! Module structs mirror the checkpoint's parameter names
//! (`embeddings.patch_embeddings.projection`, `encoder.layer.N.attention.attention.query`),
//! so loading weights is a walk over `nn::VarStore` paths.

pub mod activation;
pub mod compile;
pub mod config;
pub mod embeddings;
pub mod encoder;
pub mod model;
pub mod trace;
pub mod untrained;
pub mod weights;

pub use compile::{compile, CompileOptions, Compiled};
pub use config::{Config, Task};
pub use model::{Model, Wanted};

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("weights: tensor `{name}` is missing (expected shape {expected:?})")]
    MissingTensor { name: String, expected: Vec<i64> },
    #[error("weights: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("tracing: {0}")]
    Trace(String),
    #[error("{0}")]
    Invalid(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// The message without the category prefix.
    pub fn message(&self) -> String {
        match self {
            Error::Config(m) | Error::Weights(m) | Error::Trace(m) | Error::Invalid(m) => m.clone(),
            other => other.to_string(),
        }
    }
}

/// Reads a whole file, refusing anything but a regular file before opening
/// it: a FIFO or a device in its place would block the read.
pub(crate) fn read_regular(path: &Path) -> Result<Vec<u8>, Error> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Invalid(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}
