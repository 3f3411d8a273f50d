//! Reading and writing named tensors as safetensors files.

use std::path::Path;

use tch::Tensor;

use crate::error::{Error, Result};
use crate::fsutil::{read_regular, write_atomic_with};

/// Every tensor of a safetensors file, on the CPU, in file order.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = read_regular(path)?;
    parse_safetensors(&bytes, path)
}

/// The tensors of safetensors bytes; `path` names them in errors. The header
/// is validated (offsets, sizes, dtypes) before any tensor is built.
pub fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<Vec<(String, Tensor)>> {
    vit_msn_format::read_safetensors(bytes).map_err(|m| Error::file(path, m))
}

/// Writes named tensors to `path` atomically (a temporary file beside it, then a rename).
pub fn write_safetensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        Tensor::write_safetensors(tensors, tmp).map_err(|e| Error::file(path, e.to_string()))
    })
}
