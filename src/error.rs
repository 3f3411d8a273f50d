use std::path::Path;

/// Everything the runtime can refuse, each naming the file or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Manifest { path: String, message: String },
    #[error("{path}: sha256 is {found}, the manifest says {expected}; refusing to load a modified artifact")]
    Digest {
        path: String,
        expected: String,
        found: String,
    },
    #[error("{path}: cannot load TorchScript: {message}")]
    Artifact { path: String, message: String },
    #[error("input `{name}`: {message}")]
    Input { name: String, message: String },
    #[error("device: {0}")]
    Device(String),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{path}: {message}")]
    Image { path: String, message: String },
    #[error("forward failed: {0}")]
    Forward(String),
    /// The compiler's refusal (config, weights, tracing), as its message;
    /// present whatever the features, so the type does not change with them.
    #[error("{0}")]
    Compile(String),
}

#[cfg(feature = "compiler")]
impl From<vit_msn_graph::Error> for Error {
    fn from(e: vit_msn_graph::Error) -> Self {
        Error::Compile(e.to_string())
    }
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub fn input(name: &str, message: impl Into<String>) -> Self {
        Error::Input {
            name: name.into(),
            message: message.into(),
        }
    }

    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        Error::File {
            path: path.display().to_string(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
