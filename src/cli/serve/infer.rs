//! One inference request: its inputs checked against the model and turned
//! into a batcher job, and the job's outputs turned into the response.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tch::{Kind, Tensor};
use tokio::sync::oneshot;
use vit_msn::image::{decode_bytes, preprocess_image};
use vit_msn::{Error, Output};

use super::batcher::{BatchKey, Done, Job};
use super::model::Version;
use super::protocol::{write_response, Input, OutputData, Request, ResponseOutput, Values, Wanted};
use super::routes::ApiError;

/// A checked request, ready to queue.
pub struct Prepared {
    pixel_values: Tensor,
    bool_masked_pos: Option<Tensor>,
    head_mask: Option<Tensor>,
    key: BatchKey,
    wanted: Vec<Wanted>,
    id: Option<String>,
}

impl Prepared {
    pub fn into_job(self, reply: oneshot::Sender<Done>) -> (Job, Vec<Wanted>, Option<String>) {
        let job = Job {
            pixel_values: self.pixel_values,
            bool_masked_pos: self.bool_masked_pos,
            head_mask: self.head_mask,
            key: self.key,
            arrived: Instant::now(),
            reply,
        };
        (job, self.wanted, self.id)
    }
}

const INPUTS: &str = "pixel_values or image, and optionally bool_masked_pos and head_mask";

fn torch(e: tch::TchError) -> ApiError {
    ApiError::bad(vit_msn::error::first_line(&e.to_string()))
}

fn tensor_of(input: &Input, want: &str) -> Result<Tensor, ApiError> {
    let t = match (&input.values, want) {
        (Values::Fp32(v), "FP32") => Tensor::f_from_slice(v),
        (Values::Bool(v), "BOOL") => Tensor::f_from_slice(v),
        (found, _) => {
            let found = match found {
                Values::Fp32(_) => "FP32",
                Values::Bool(_) => "BOOL",
                Values::Bytes(_) => "BYTES",
            };
            return Err(ApiError::bad(format!(
                "input `{}`: expected datatype {want}, found {found}",
                input.name
            )));
        }
    };
    t.and_then(|t| t.f_reshape(&input.shape)).map_err(torch)
}

/// The model's error for an input, as a 400 (a refusal) or a 500.
fn runtime_error(e: Error) -> ApiError {
    match e {
        Error::Input { .. } | Error::Image { .. } => ApiError::bad(e.to_string()),
        other => ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            other.to_string(),
        ),
    }
}

/// Encoded images as `pixel_values`, as `vit-msn run --image` preprocesses them.
fn images(v: &Version, input: &Input) -> Result<Tensor, ApiError> {
    let Values::Bytes(items) = &input.values else {
        return Err(ApiError::bad(
            "input `image`: expected datatype BYTES (encoded images)",
        ));
    };
    if !matches!(input.shape.as_slice(), [_] | [_, 1]) {
        return Err(ApiError::bad(format!(
            "input `image`: expected shape [batch] or [batch, 1], found {:?}",
            input.shape
        )));
    }
    let (height, width) = v.image_size.clone().map_err(ApiError::bad)?;
    let m = v.bundle.manifest();
    let mut pp = m.preprocessing().map_err(runtime_error)?;
    pp.height = height as u32;
    pp.width = width as u32;
    let mut pixels = Vec::with_capacity(items.len());
    for (i, bytes) in items.iter().enumerate() {
        let name = format!("input `image`[{i}]");
        let img =
            decode_bytes(bytes, Path::new(&name), m.model.num_channels).map_err(runtime_error)?;
        pixels.push(preprocess_image(&img, &pp).map_err(runtime_error)?);
    }
    if let Some(first) = pixels.first() {
        if let Some(other) = pixels.iter().find(|p| p.size() != first.size()) {
            return Err(ApiError::bad(format!(
                "input `image`: the preprocessing does not resize, and the images' sizes differ ({:?} and {:?})",
                first.size(),
                other.size()
            )));
        }
    }
    Tensor::f_stack(&pixels, 0).map_err(torch)
}

pub fn prepare(v: &Arc<Version>, request: Request, max_batch: i64) -> Result<Prepared, ApiError> {
    let mut pixel_values = None;
    let mut bool_masked_pos = None;
    let mut head_mask = None;
    for input in &request.inputs {
        let slot = match input.name.as_str() {
            "pixel_values" | "image" => &mut pixel_values,
            "bool_masked_pos" => &mut bool_masked_pos,
            "head_mask" => &mut head_mask,
            other => {
                return Err(ApiError::bad(format!(
                    "unknown input `{other}` (the model takes {INPUTS})"
                )))
            }
        };
        if slot.is_some() {
            return Err(ApiError::bad("give pixel_values or image, not both"));
        }
        *slot = Some(match input.name.as_str() {
            "pixel_values" => {
                if input.shape.len() != 4 {
                    return Err(ApiError::bad(format!(
                        "input `pixel_values`: expected rank 4 [batch, channels, height, width], found shape {:?}",
                        input.shape
                    )));
                }
                tensor_of(input, "FP32")?
            }
            "image" => images(v, input)?,
            "bool_masked_pos" => tensor_of(input, "BOOL")?,
            _ => tensor_of(input, "FP32")?,
        });
    }
    let pixel_values =
        pixel_values.ok_or_else(|| ApiError::bad(format!("no input: the model takes {INPUTS}")))?;
    let size = pixel_values.size();
    if size[0] > max_batch {
        return Err(ApiError::bad(format!(
            "a batch of {} is over this server's --max-batch {max_batch}",
            size[0]
        )));
    }
    v.bundle
        .check_inputs(&pixel_values, bool_masked_pos.as_ref(), head_mask.as_ref())
        .map_err(runtime_error)?;
    let (height, width) = (size[2], size[3]);
    let p = v.bundle.manifest().model.patch_size.max(1);
    let key = BatchKey {
        height,
        width,
        patches: (height / p) * (width / p),
        head_mask: match &head_mask {
            Some(h) => Some((
                h.size(),
                Vec::<f32>::try_from(h.flatten(0, -1))
                    .map_err(torch)?
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )),
            None => None,
        },
    };
    let wanted = wanted_outputs(v, request.outputs, request.binary_default)?;
    Ok(Prepared {
        pixel_values,
        bool_masked_pos,
        head_mask,
        key,
        wanted,
        id: request.id,
    })
}

fn wanted_outputs(
    v: &Version,
    asked: Option<Vec<Wanted>>,
    binary: bool,
) -> Result<Vec<Wanted>, ApiError> {
    let names = v.output_names();
    let Some(asked) = asked else {
        return Ok(names
            .into_iter()
            .map(|name| Wanted {
                name,
                binary,
                classification: None,
            })
            .collect());
    };
    for w in &asked {
        if !names.contains(&w.name) {
            return Err(ApiError::bad(format!(
                "unknown output `{}` (this model returns {})",
                w.name,
                names.join(", ")
            )));
        }
        if w.classification.is_some() && !matches!(w.name.as_str(), "logits" | "embedding") {
            return Err(ApiError::bad(format!(
                "output `{}`: classification needs a [batch, classes] output (logits)",
                w.name
            )));
        }
    }
    Ok(asked)
}

fn named(out: &Output, name: &str) -> Option<Tensor> {
    match name {
        "embedding" => out.last_hidden_state.as_ref().map(|t| t.select(1, 0)),
        "last_hidden_state" => out.last_hidden_state.as_ref().map(Tensor::shallow_clone),
        "logits" => out.logits.as_ref().map(Tensor::shallow_clone),
        "hidden_states" => out.hidden_states.as_ref().map(Tensor::shallow_clone),
        "attentions" => out.attentions.as_ref().map(Tensor::shallow_clone),
        _ => None,
    }
}

/// Triton's classification form: per sample, the k largest values as
/// "score:index:label" (or "score:index" without labels), score as C++'s
/// std::to_string prints a float.
fn classify(t: &Tensor, k: usize, labels: &[String]) -> Result<(Vec<i64>, Vec<String>), ApiError> {
    let size = t.size();
    let (rows, classes) = (size[0] as usize, size[1] as usize);
    let values = Vec::<f32>::try_from(t.flatten(0, -1)).map_err(torch)?;
    let k = k.min(classes);
    let mut out = Vec::with_capacity(rows * k);
    for row in values.chunks(classes.max(1)) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        for &i in order.iter().take(k) {
            out.push(match labels.get(i) {
                Some(label) => format!("{:.6}:{i}:{label}", row[i]),
                None => format!("{:.6}:{i}", row[i]),
            });
        }
    }
    Ok((vec![rows as i64, k as i64], out))
}

/// The response body for one request's share of a batch.
pub fn respond(
    model: &str,
    done: Done,
    wanted: &[Wanted],
    id: Option<&str>,
) -> Result<(Vec<u8>, Option<usize>), ApiError> {
    let version = done.version.ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("model `{model}` is not loaded"),
        )
    })?;
    let out = done.result.map_err(runtime_error)?;
    let mut outputs = Vec::with_capacity(wanted.len());
    for w in wanted {
        let t = named(&out, &w.name).ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("version {} did not return `{}`", version.number, w.name),
            )
        })?;
        let (shape, data) = match w.classification {
            Some(k) => {
                let (shape, strings) = classify(&t, k, &version.bundle.manifest().model.labels)?;
                (shape, OutputData::Bytes(strings))
            }
            None => {
                let flat = t
                    .f_to_kind(Kind::Float)
                    .and_then(|t| t.f_flatten(0, -1))
                    .map_err(torch)?;
                (
                    t.size(),
                    OutputData::Fp32(Vec::<f32>::try_from(&flat).map_err(torch)?),
                )
            }
        };
        outputs.push(ResponseOutput {
            name: w.name.clone(),
            shape,
            data,
            binary: w.binary,
        });
    }
    let parameters = serde_json::json!({ "manifest_sha256": version.manifest_sha256 });
    Ok(write_response(
        model,
        version.number,
        id,
        parameters,
        outputs,
    ))
}
