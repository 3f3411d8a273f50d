//! The Open Inference Protocol's (KServe v2) inference request, with
//! Triton's binary tensor data and classification extensions (the response
//! is in response.rs).
//!
//! A request body is JSON, or, with the `Inference-Header-Content-Length`
//! header, that many bytes of JSON followed by the inputs' raw data in the
//! order they are listed (each input with `parameters.binary_data_size`).

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::flat::Flat;

/// The header naming the JSON part's length in a binary request or response.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// A request refused before it reaches a model: a 400 with this message.
#[derive(Debug)]
pub struct BadRequest(pub String);

impl<T: Into<String>> From<T> for BadRequest {
    fn from(message: T) -> Self {
        BadRequest(message.into())
    }
}

#[derive(Deserialize)]
struct RequestJson {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Option<Vec<OutputJson>>,
}

#[derive(Deserialize)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    data: Option<Flat>,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// One input's values, decoded and checked against its shape.
#[derive(Debug)]
pub enum Values {
    Fp32(Vec<f32>),
    Bool(Vec<bool>),
    Bytes(Vec<Vec<u8>>),
}

#[derive(Debug)]
pub struct Input {
    pub name: String,
    pub shape: Vec<i64>,
    pub values: Values,
}

/// An output the client asked for, and how it wants it.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub name: String,
    pub binary: bool,
    /// Triton's classification extension: the top k as "score:index:label".
    pub classification: Option<usize>,
}

/// A parsed inference request.
#[derive(Debug)]
pub struct Request {
    pub id: Option<String>,
    pub inputs: Vec<Input>,
    /// `None`: every output, in the binary form if `binary_default`.
    pub outputs: Option<Vec<Wanted>>,
    pub binary_default: bool,
}

/// Elements a request may declare in one input: well past the largest
/// batch of pixels a body under the size limit can hold, and small enough
/// that counting bytes for it cannot overflow.
const MAX_ELEMENTS: i64 = 1 << 40;

fn element_count(name: &str, shape: &[i64]) -> Result<usize, BadRequest> {
    let mut n: i64 = 1;
    for &d in shape {
        if d < 0 {
            return Err(format!("input `{name}`: shape {shape:?} has a negative dimension").into());
        }
        n = n
            .checked_mul(d)
            .filter(|&n| n <= MAX_ELEMENTS)
            .ok_or_else(|| format!("input `{name}`: shape {shape:?} is too large"))?;
    }
    Ok(n as usize)
}

fn flag(parameters: &Option<Map<String, Value>>, key: &str) -> Result<Option<bool>, BadRequest> {
    match parameters.as_ref().and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(format!("parameter `{key}` must be a boolean, found {other}").into()),
    }
}

fn size_parameter(
    parameters: &Option<Map<String, Value>>,
    key: &str,
    what: &str,
) -> Result<Option<u64>, BadRequest> {
    match parameters.as_ref().and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            format!("{what}: `{key}` must be a non-negative integer, found {v}").into()
        }),
    }
}

/// Parses a request body; `header_length` is the `Inference-Header-Content-Length`
/// header's value, when the request has one.
pub fn parse_request(body: &[u8], header_length: Option<&str>) -> Result<Request, BadRequest> {
    let (json, mut binary) = match header_length {
        None => (body, &[][..]),
        Some(text) => {
            let n: usize = text.trim().parse().map_err(|_| {
                format!("header Inference-Header-Content-Length: `{text}` is not a length")
            })?;
            if n > body.len() {
                return Err(format!(
                    "header Inference-Header-Content-Length is {n}, but the body holds {} bytes",
                    body.len()
                )
                .into());
            }
            body.split_at(n)
        }
    };
    let request: RequestJson = serde_json::from_slice(json)
        .map_err(|e| format!("the request is not a valid inference request: {e}"))?;
    let binary_default = flag(&request.parameters, "binary_data_output")?.unwrap_or(false);
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        if inputs.iter().any(|i: &Input| i.name == input.name) {
            return Err(format!("input `{}` is given twice", input.name).into());
        }
        let what = format!("input `{}`", input.name);
        let count = element_count(&input.name, &input.shape)?;
        let values = match size_parameter(&input.parameters, "binary_data_size", &what)? {
            Some(size) => {
                if input.data.is_some() {
                    return Err(format!("{what}: has both `data` and `binary_data_size`").into());
                }
                let size = usize::try_from(size)
                    .ok()
                    .filter(|&s| s <= binary.len())
                    .ok_or_else(|| {
                        format!(
                            "{what}: binary_data_size {size} runs past the end of the body ({} bytes left)",
                            binary.len()
                        )
                    })?;
                let (raw, rest) = binary.split_at(size);
                binary = rest;
                from_binary(&what, &input.datatype, raw, count)?
            }
            None => {
                let data = input
                    .data
                    .ok_or_else(|| format!("{what}: has neither `data` nor `binary_data_size`"))?;
                from_json(&what, &input.datatype, data, count)?
            }
        };
        inputs.push(Input {
            name: input.name,
            shape: input.shape,
            values,
        });
    }
    if !binary.is_empty() {
        return Err(format!(
            "{} bytes of binary data follow the inputs' binary_data_size",
            binary.len()
        )
        .into());
    }
    let outputs = match request.outputs {
        None => None,
        Some(list) => {
            let mut wanted: Vec<Wanted> = Vec::with_capacity(list.len());
            for o in list {
                let what = format!("output `{}`", o.name);
                if wanted.iter().any(|w| w.name == o.name) {
                    return Err(format!("{what} is requested twice").into());
                }
                let classification = size_parameter(&o.parameters, "classification", &what)?
                    .filter(|&k| k > 0)
                    .map(|k| usize::try_from(k).unwrap_or(usize::MAX));
                wanted.push(Wanted {
                    binary: flag(&o.parameters, "binary_data")?.unwrap_or(binary_default),
                    name: o.name,
                    classification,
                });
            }
            Some(wanted)
        }
    };
    Ok(Request {
        id: request.id,
        inputs,
        outputs,
        binary_default,
    })
}

fn element_size(what: &str, datatype: &str) -> Result<usize, BadRequest> {
    match datatype {
        "FP32" => Ok(4),
        "BOOL" => Ok(1),
        "BYTES" => Ok(0),
        other => Err(format!(
            "{what}: datatype {other} is not accepted (FP32 pixel_values and head_mask, BOOL bool_masked_pos, BYTES image)"
        )
        .into()),
    }
}

fn from_binary(what: &str, datatype: &str, raw: &[u8], count: usize) -> Result<Values, BadRequest> {
    let size = element_size(what, datatype)?;
    if size == 0 {
        // BYTES: each element a 4-byte little-endian length, then its bytes.
        let mut items = Vec::new();
        let mut rest = raw;
        while !rest.is_empty() {
            let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(|| {
                format!("{what}: the binary data ends inside an element's length")
            })?;
            let len = u32::from_le_bytes(*len) as usize;
            if len > tail.len() {
                return Err(format!(
                    "{what}: element {} says {len} bytes, but {} are left",
                    items.len(),
                    tail.len()
                )
                .into());
            }
            let (item, tail) = tail.split_at(len);
            items.push(item.to_vec());
            rest = tail;
        }
        check_count(what, items.len(), count)?;
        return Ok(Values::Bytes(items));
    }
    if raw.len() != count * size {
        return Err(format!(
            "{what}: the shape holds {count} elements ({} bytes of {datatype}), but binary_data_size is {}",
            count * size,
            raw.len()
        )
        .into());
    }
    Ok(match datatype {
        "FP32" => Values::Fp32(
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        _ => Values::Bool(raw.iter().map(|&b| b != 0).collect()),
    })
}

fn check_count(what: &str, found: usize, count: usize) -> Result<(), BadRequest> {
    if found != count {
        return Err(
            format!("{what}: the shape holds {count} elements, but the data has {found}").into(),
        );
    }
    Ok(())
}

fn from_json(what: &str, datatype: &str, data: Flat, count: usize) -> Result<Values, BadRequest> {
    element_size(what, datatype)?;
    check_count(what, data.len(), count)?;
    Ok(match (datatype, data) {
        (_, Flat::Empty) => match datatype {
            "FP32" => Values::Fp32(Vec::new()),
            "BOOL" => Values::Bool(Vec::new()),
            _ => Values::Bytes(Vec::new()),
        },
        ("FP32", Flat::Numbers(v)) => Values::Fp32(v.into_iter().map(|x| x as f32).collect()),
        ("BOOL", Flat::Bools(v)) => Values::Bool(v),
        // JSON cannot hold raw bytes: an encoded image travels as base64.
        ("BYTES", Flat::Strings(v)) => Values::Bytes(
            v.iter()
                .enumerate()
                .map(|(i, text)| {
                    base64::engine::general_purpose::STANDARD
                        .decode(text)
                        .map_err(|e| BadRequest(format!("{what}: element {i} is not base64: {e}")))
                })
                .collect::<Result<_, _>>()?,
        ),
        (_, found) => {
            let want = match datatype {
                "FP32" => "numbers",
                "BOOL" => "true or false",
                _ => "base64 strings",
            };
            return Err(format!(
                "{what}: {datatype} data must be {want}, found {}",
                found.kind()
            )
            .into());
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_json_inputs_agree() {
        let json = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1.5,-2]}]}"#;
        let a = parse_request(json, None).unwrap_or_else(|e| panic!("{}", e.0));
        let header = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&1.5f32.to_le_bytes());
        body.extend_from_slice(&(-2f32).to_le_bytes());
        let b = parse_request(&body, Some(&header.len().to_string()))
            .unwrap_or_else(|e| panic!("{}", e.0));
        match (&a.inputs[0].values, &b.inputs[0].values) {
            (Values::Fp32(x), Values::Fp32(y)) => assert_eq!(x, y),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals_name_the_input() {
        let cases: &[(&[u8], Option<&str>, &str)] = &[
            (b"[1]", None, "not a valid inference request"),
            (br#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#, None, "holds 3 elements"),
            (br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1,2]}]}"#, None, "holds 1 elements"),
            (br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[true,false]}]}"#, None, "must be numbers"),
            (br#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[]}]}"#, None, "negative"),
            (br#"{"inputs":[{"name":"x","shape":[4294967296,4294967296],"datatype":"FP32","data":[]}]}"#, None, "too large"),
            (br#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[1]}]}"#, None, "INT8"),
            (br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#, Some("91"), "runs past"),
            (br#"{"inputs":[]}"#, Some("999"), "holds"),
        ];
        for (body, header, want) in cases {
            match parse_request(body, *header) {
                Ok(_) => panic!("accepted {}", String::from_utf8_lossy(body)),
                Err(e) => assert!(e.0.contains(want), "{}: {}", want, e.0),
            }
        }
    }
}
