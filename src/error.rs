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

/// libtorch messages carry a C++ backtrace after the first line; errors
/// raised inside a TorchScript graph put the cause on the last line of the
/// interpreter's traceback instead (`RuntimeError: ...` from an op,
/// `builtins.ValueError: ...` from a `raise`), which is the one worth showing.
pub fn first_line(message: &str) -> String {
    let first = message.lines().next().unwrap_or("");
    // oneDNN's own words name neither the CPU nor a remedy.
    if message.contains("could not create a primitive descriptor") {
        return format!(
            "oneDNN has no kernel for this artifact's operations in its dtype on this CPU ({}): bf16 and f16 linears need AVX-512 or AVX2-VNNI-2; load it from its bundle, which falls back to aten::linear, or recompile without --linear onednn",
            crate::cpu::Cpu::detect().summary()
        );
    }
    if first.contains("failed in the TorchScript interpreter") {
        if let Some((kind, cause)) = message.lines().rev().find_map(exception_line) {
            let kind = kind.strip_prefix("builtins.").unwrap_or(kind);
            return if kind == "RuntimeError" {
                format!("in the TorchScript graph: {cause}")
            } else {
                format!("in the TorchScript graph: {kind}: {cause}")
            };
        }
    }
    first.to_owned()
}

/// `(kind, message)` of a traceback's exception line, `Kind: message` with a
/// dotted name at the start of the line; traceback lines are indented or
/// start with words ("Traceback of TorchScript, ...").
fn exception_line(line: &str) -> Option<(&str, &str)> {
    let (kind, cause) = line.split_once(": ")?;
    let is_name = kind
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    let is_exception = kind.ends_with("Error") || kind.ends_with("Exception");
    (is_name && is_exception && !cause.trim().is_empty()).then_some((kind, cause.trim()))
}
