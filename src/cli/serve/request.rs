//! One inference request's contents: its inputs checked against the model
//! and turned into a batcher job, and the job's outputs into the response.
//!
//! Nothing here calls libtorch: tensors are built, checked and read back on
//! the model's worker thread (batcher.rs). libtorch parallelises large
//! element-wise ops with OpenMP, and each thread that calls it gets a team
//! of its own, whose spinning threads would slow the forward pass down.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;
use vit_msn::image::{decode_bytes, preprocess_image_values};
use vit_msn::Error;

use super::batcher::{BatchKey, Done, Job, JobInputs, Values as Plain};
use super::errors::ApiError;
use super::model::{Model, Version};
use super::protocol::{Input, Request, Values, Wanted};
use super::response::{write_response, OutputData, ResponseOutput};

/// A checked request, ready to queue.
pub struct Prepared {
    inputs: JobInputs,
    key: BatchKey,
    wanted: Vec<Wanted>,
    id: Option<String>,
}

impl Prepared {
    pub fn into_job(
        self,
        model: Arc<Model>,
        reply: oneshot::Sender<Done>,
    ) -> (Job, Vec<Wanted>, Option<String>) {
        let job = Job {
            model,
            inputs: self.inputs,
            outputs: self.wanted.iter().map(|w| w.name.clone()).collect(),
            key: self.key,
            arrived: Instant::now(),
            reply,
        };
        (job, self.wanted, self.id)
    }
}

const INPUTS: &str = "pixel_values or image, and optionally bool_masked_pos and head_mask";

fn datatype(v: &Values) -> &'static str {
    match v {
        Values::Fp32(_) => "FP32",
        Values::Bool(_) => "BOOL",
        Values::Bytes(_) => "BYTES",
    }
}

fn wrong_type(input: &Input, want: &str) -> ApiError {
    ApiError::bad(format!(
        "input `{}`: expected datatype {want}, found {}",
        input.name,
        datatype(&input.values)
    ))
}

fn fp32(input: Input) -> Result<Plain<f32>, ApiError> {
    match input.values {
        Values::Fp32(values) => Ok(Plain {
            values,
            shape: input.shape,
        }),
        _ => Err(wrong_type(&input, "FP32")),
    }
}

/// The model's error for an input, as a 400 (a refusal) or a 500.
pub fn runtime_error(e: Error) -> ApiError {
    match e {
        Error::Input { .. } | Error::Image { .. } => ApiError::bad(e.to_string()),
        other => ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            other.to_string(),
        ),
    }
}

/// Encoded images as `pixel_values`, as `vit-msn run --image` preprocesses them.
fn images(v: &Version, input: &Input) -> Result<Plain<f32>, ApiError> {
    let Values::Bytes(items) = &input.values else {
        return Err(wrong_type(input, "BYTES (encoded images)"));
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
    let mut values = Vec::new();
    let mut size = None;
    for (i, bytes) in items.iter().enumerate() {
        let name = format!("input `image`[{i}]");
        let img =
            decode_bytes(bytes, Path::new(&name), m.model.num_channels).map_err(runtime_error)?;
        let (pixels, chw) = preprocess_image_values(&img, &pp).map_err(runtime_error)?;
        match size {
            None => size = Some(chw),
            // Only a preprocessing that does not resize keeps each image's size.
            Some(first) if first != chw => {
                return Err(ApiError::bad(format!(
                    "input `image`: the preprocessing does not resize, and the images' sizes differ ({first:?} and {chw:?})"
                )))
            }
            Some(_) => {}
        }
        values.extend_from_slice(&pixels);
    }
    let [c, h, w] = size.ok_or_else(|| ApiError::bad("input `image`: the batch is empty"))?;
    Ok(Plain {
        values,
        shape: vec![items.len() as i64, c, h, w],
    })
}

pub fn prepare(v: &Arc<Version>, request: Request, max_batch: i64) -> Result<Prepared, ApiError> {
    let mut pixel_values = None;
    let mut bool_masked_pos = None;
    let mut head_mask = None;
    for input in request.inputs {
        match input.name.as_str() {
            "pixel_values" | "image" if pixel_values.is_some() => {
                return Err(ApiError::bad("give pixel_values or image, not both"))
            }
            "pixel_values" => {
                if input.shape.len() != 4 {
                    return Err(ApiError::bad(format!(
                        "input `pixel_values`: expected rank 4 [batch, channels, height, width], found shape {:?}",
                        input.shape
                    )));
                }
                pixel_values = Some(fp32(input)?);
            }
            "image" => pixel_values = Some(images(v, &input)?),
            "bool_masked_pos" => match input.values {
                Values::Bool(values) => {
                    bool_masked_pos = Some(Plain {
                        values,
                        shape: input.shape,
                    })
                }
                _ => return Err(wrong_type(&input, "BOOL")),
            },
            "head_mask" => head_mask = Some(fp32(input)?),
            other => {
                return Err(ApiError::bad(format!(
                    "unknown input `{other}` (the model takes {INPUTS})"
                )))
            }
        }
    }
    let pixel_values =
        pixel_values.ok_or_else(|| ApiError::bad(format!("no input: the model takes {INPUTS}")))?;
    let (batch, height, width) = (
        pixel_values.shape[0],
        pixel_values.shape[2],
        pixel_values.shape[3],
    );
    if batch > max_batch {
        return Err(ApiError::bad(format!(
            "a batch of {batch} is over this server's --max-batch {max_batch}"
        )));
    }
    // The rest (channels, resolution, values, mask and head-mask shapes) is
    // checked by the runtime itself, on the worker, with its own messages.
    let p = v.bundle.manifest().model.patch_size.max(1);
    let key = BatchKey {
        height,
        width,
        patches: (height / p) * (width / p),
        head_mask: head_mask.as_ref().map(|h| {
            (
                h.shape.clone(),
                h.values.iter().map(|x| x.to_bits()).collect(),
            )
        }),
    };
    let wanted = wanted_outputs(v, request.outputs, request.binary_default)?;
    Ok(Prepared {
        inputs: JobInputs {
            pixel_values,
            bool_masked_pos,
            head_mask,
        },
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

/// Triton's classification form: per sample, the k largest values as
/// "score:index:label" (or "score:index" without labels), score as C++'s
/// std::to_string prints a float.
fn classify(out: &Plain<f32>, k: usize, labels: &[String]) -> (Vec<i64>, Vec<String>) {
    let rows = out.shape.first().copied().unwrap_or(0).max(0) as usize;
    let classes = out.values.len().checked_div(rows).unwrap_or(0);
    let k = k.min(classes);
    let mut strings = Vec::with_capacity(rows * k);
    for row in out.values.chunks(classes.max(1)) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        for &i in order.iter().take(k) {
            strings.push(match labels.get(i) {
                Some(label) => format!("{:.6}:{i}:{label}", row[i]),
                None => format!("{:.6}:{i}", row[i]),
            });
        }
    }
    (vec![rows as i64, k as i64], strings)
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
    let mut computed = done.result.map_err(runtime_error)?;
    let mut outputs = Vec::with_capacity(wanted.len());
    for (w, out) in wanted.iter().zip(computed.iter_mut()) {
        let out = std::mem::take(out);
        let (shape, data) = match w.classification {
            Some(k) => {
                let (shape, strings) = classify(&out, k, &version.bundle.manifest().model.labels);
                (shape, OutputData::Bytes(strings))
            }
            None => (out.shape, OutputData::Fp32(out.values)),
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
