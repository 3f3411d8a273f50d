//! The one safetensors reader: checkpoints (compiler) and tensor files
//! (runtime) alike.

use safetensors::{Dtype, SafeTensors};
use tch::{Kind, Tensor};

/// The safetensors name of a kind this reader produces (`I32` for `Int`).
pub fn safetensors_dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "F32",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Double => "F64",
        Kind::Bool => "BOOL",
        Kind::Uint8 => "U8",
        Kind::Int8 => "I8",
        Kind::Int16 => "I16",
        Kind::Int => "I32",
        Kind::Int64 => "I64",
        _ => "?",
    }
}

/// Every tensor of safetensors bytes, on the CPU, in file order. The header
/// is validated (offsets, sizes, dtypes) before any tensor is built. The
/// error is a message without the file's name, which the caller adds.
pub fn read_safetensors(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("invalid safetensors: {e}"))?;
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
            other => return Err(format!("tensor `{name}` has unsupported dtype {other:?}")),
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        out.push((name.to_string(), t));
    }
    Ok(out)
}
