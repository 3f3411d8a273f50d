//! Reading and writing named tensors as safetensors files.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use tch::{Kind, Tensor};

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
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::file(path, format!("invalid safetensors: {e}")))?;
    let mut out = Vec::new();
    for (name, view) in st.iter() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            Dtype::BOOL => Kind::Bool,
            Dtype::U8 => Kind::Uint8,
            Dtype::I8 => Kind::Int8,
            Dtype::I16 => Kind::Int16,
            Dtype::I32 => Kind::Int,
            Dtype::I64 => Kind::Int64,
            other => {
                return Err(Error::file(
                    path,
                    format!("tensor `{name}` has unsupported dtype {other:?}"),
                ))
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
        out.push((name.to_string(), t));
    }
    Ok(out)
}

/// Writes named tensors to `path` atomically (a temporary file beside it, then a rename).
pub fn write_safetensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        Tensor::write_safetensors(tensors, tmp).map_err(|e| Error::file(path, e.to_string()))
    })
}
