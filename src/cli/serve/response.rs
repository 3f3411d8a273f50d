//! The inference response: JSON, or with Triton's binary tensor data
//! extension, the JSON part followed by the outputs' raw bytes.

use serde::Serialize;
use serde_json::Value;

/// One output's values in the response.
pub enum OutputData {
    Fp32(Vec<f32>),
    Bytes(Vec<String>),
}

pub struct ResponseOutput {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: OutputData,
    pub binary: bool,
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    parameters: Value,
    outputs: Vec<Value>,
}

/// A response body, and the JSON part's length when binary data follows it.
pub fn write_response(
    model_name: &str,
    model_version: u64,
    id: Option<&str>,
    parameters: Value,
    outputs: Vec<ResponseOutput>,
) -> (Vec<u8>, Option<usize>) {
    let mut binary = Vec::new();
    let mut listed = Vec::with_capacity(outputs.len());
    for o in outputs {
        let datatype = match o.data {
            OutputData::Fp32(_) => "FP32",
            OutputData::Bytes(_) => "BYTES",
        };
        let mut entry =
            serde_json::json!({ "name": o.name, "datatype": datatype, "shape": o.shape });
        if o.binary {
            let start = binary.len();
            match &o.data {
                OutputData::Fp32(v) => v
                    .iter()
                    .for_each(|x| binary.extend_from_slice(&x.to_le_bytes())),
                OutputData::Bytes(v) => v.iter().for_each(|s| {
                    binary.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    binary.extend_from_slice(s.as_bytes());
                }),
            }
            entry["parameters"] = serde_json::json!({ "binary_data_size": binary.len() - start });
        } else {
            entry["data"] = match o.data {
                // NaN and infinities have no JSON form; the runtime refuses
                // non-finite inputs, so they only come from the weights.
                OutputData::Fp32(v) => Value::Array(
                    v.into_iter()
                        .map(|x| {
                            serde_json::Number::from_f64(f64::from(x))
                                .map_or(Value::Null, Value::Number)
                        })
                        .collect(),
                ),
                OutputData::Bytes(v) => Value::Array(v.into_iter().map(Value::String).collect()),
            };
        }
        listed.push(entry);
    }
    let json = ResponseJson {
        model_name,
        model_version: model_version.to_string(),
        id,
        parameters,
        outputs: listed,
    };
    // Serializing plain values into a Vec cannot fail.
    let mut body = serde_json::to_vec(&json).unwrap_or_default();
    if binary.is_empty() {
        return (body, None);
    }
    let header = body.len();
    body.extend_from_slice(&binary);
    (body, Some(header))
}
