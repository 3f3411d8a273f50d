//! Dynamic batching: one worker thread takes the requests queued and those
//! arriving within the queue delay, runs those for the same model with the
//! same resolution and head mask as one forward pass of at most `max_batch`
//! samples, and hands each request its own rows. The delay is spent only
//! while other requests are being read: one client alone never waits.
//!
//! One thread runs every libtorch call of the server's requests, for all
//! models: each thread that calls libtorch gets an OpenMP team of its own,
//! and with two teams alive libgomp stops spinning between parallel
//! regions, which makes the forward pass about 20% slower.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use tokio::sync::oneshot;
use vit_msn::{Error, Output};

use super::metrics::Metrics;
use super::model::{Model, Version};

/// Requests that may wait in the queue; past this, a request is refused
/// with 503 rather than queued without bound.
pub const QUEUE_CAPACITY: usize = 4096;

/// How often a batch being gathered looks again at requests still arriving.
const POLL: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub max_batch: i64,
    pub delay: Duration,
}

/// What may share a forward pass: the artifact (by resolution) and the head
/// mask, by its exact values. Masks need not match: a request without one
/// runs with no patch masked, which is what the runtime does.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchKey {
    pub height: i64,
    pub width: i64,
    pub patches: i64,
    pub head_mask: Option<(Vec<i64>, Vec<u32>)>,
}

/// A tensor's values, row-major, and its shape.
#[derive(Debug, Clone, Default)]
pub struct Values<T> {
    pub values: Vec<T>,
    pub shape: Vec<i64>,
}

/// A request's inputs as the protocol gave them, before any tensor is built.
pub struct JobInputs {
    pub pixel_values: Values<f32>,
    pub bool_masked_pos: Option<Values<bool>>,
    pub head_mask: Option<Values<f32>>,
}

pub struct Job {
    pub model: Arc<Model>,
    pub inputs: JobInputs,
    /// The outputs to hand back, by name, in this order.
    pub outputs: Vec<String>,
    pub key: BatchKey,
    pub arrived: Instant,
    pub reply: oneshot::Sender<Done>,
}

impl Job {
    fn batch(&self) -> i64 {
        self.inputs.pixel_values.shape[0]
    }
}

/// A request's share of a batch's forward pass.
pub struct Done {
    /// The version that answered; `None` when the model was unloaded.
    pub version: Option<Arc<Version>>,
    /// The job's outputs, in the order it asked for them.
    pub result: Result<Vec<Values<f32>>, Error>,
    pub queued: Duration,
    pub compute: Duration,
}

/// A job's inputs as tensors, checked by the runtime as its forward would.
struct Tensors {
    pixel_values: Tensor,
    bool_masked_pos: Option<Tensor>,
    head_mask: Option<Tensor>,
}

fn torch(e: tch::TchError) -> Error {
    Error::Forward(vit_msn::error::first_line(&e.to_string()))
}

fn tensor<T: tch::kind::Element>(v: &Values<T>) -> Result<Tensor, Error> {
    Tensor::f_from_slice(&v.values)
        .and_then(|t| t.f_reshape(&v.shape))
        .map_err(torch)
}

fn tensors(v: &Version, inputs: &JobInputs) -> Result<Tensors, Error> {
    let t = Tensors {
        pixel_values: tensor(&inputs.pixel_values)?,
        bool_masked_pos: inputs.bool_masked_pos.as_ref().map(tensor).transpose()?,
        head_mask: inputs.head_mask.as_ref().map(tensor).transpose()?,
    };
    v.bundle.check_inputs(
        &t.pixel_values,
        t.bool_masked_pos.as_ref(),
        t.head_mask.as_ref(),
    )?;
    Ok(t)
}

/// Runs until every sender of `queue` is gone, then finishes what is queued.
pub fn work(
    queue: Receiver<Job>,
    arriving: Arc<AtomicUsize>,
    batching: Batching,
    metrics: Arc<Metrics>,
) {
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let deadline = Instant::now() + batching.delay;
        let mut samples = first.batch();
        let mut jobs = vec![first];
        // Take what is queued; wait (up to the delay) only while more
        // requests are on their way in, so a lone request never waits.
        while samples < batching.max_batch {
            let next = match queue.try_recv() {
                Ok(job) => Some(job),
                Err(TryRecvError::Disconnected) => None,
                Err(TryRecvError::Empty) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || arriving.load(Ordering::SeqCst) == 0 {
                        None
                    } else {
                        match queue.recv_timeout(left.min(POLL)) {
                            Ok(job) => Some(job),
                            Err(RecvTimeoutError::Timeout) => continue,
                            Err(RecvTimeoutError::Disconnected) => None,
                        }
                    }
                }
            };
            let Some(job) = next else { break };
            if samples + job.batch() > batching.max_batch {
                carried = Some(job);
                break;
            }
            samples += job.batch();
            jobs.push(job);
        }
        // One version per model for the whole round: a swap lands between
        // batches, so no batch mixes two.
        for group in group_by_key(jobs) {
            let model = group[0].model.clone();
            run_group(&model.name, model.current(), group, &metrics);
        }
    }
}

/// Jobs with equal keys, each group in arrival order.
fn group_by_key(jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<Vec<Job>> = Vec::new();
    for job in jobs {
        let same = |g: &&mut Vec<Job>| Arc::ptr_eq(&g[0].model, &job.model) && g[0].key == job.key;
        match groups.iter_mut().find(same) {
            Some(g) => g.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

fn reply(
    job: Job,
    version: Option<Arc<Version>>,
    result: Result<Vec<Values<f32>>, Error>,
    started: Instant,
    compute: Duration,
) {
    let queued = started.saturating_duration_since(job.arrived);
    // A client that went away no longer waits for its answer.
    let _ = job.reply.send(Done {
        version,
        result,
        queued,
        compute,
    });
}

fn run_group(name: &str, version: Option<Arc<Version>>, group: Vec<Job>, metrics: &Metrics) {
    let started = Instant::now();
    let Some(v) = version else {
        for job in group {
            let refused = Err(Error::Forward("the model is not loaded".into()));
            reply(job, None, refused, started, Duration::ZERO);
        }
        return;
    };
    // A request the runtime refuses is answered alone; the rest run together.
    let mut ready = Vec::with_capacity(group.len());
    for job in group {
        match tensors(&v, &job.inputs) {
            Ok(t) => ready.push((job, t)),
            Err(e) => reply(job, Some(v.clone()), Err(e), started, Duration::ZERO),
        }
    }
    if ready.is_empty() {
        return;
    }
    let result = forward_group(&v, &ready);
    let compute = started.elapsed();
    match result {
        Ok(out) => {
            metrics
                .batch_size
                .with_label_values(&[name])
                .observe(ready.iter().map(|(j, _)| j.batch()).sum::<i64>() as f64);
            let mut offset = 0;
            for (job, _) in ready {
                let b = job.batch();
                let values = outputs_of(&out, offset, b, &job.outputs);
                offset += b;
                reply(job, Some(v.clone()), values, started, compute);
            }
        }
        // A batch that fails (memory, say) is retried request by request,
        // so each gets its own answer.
        Err(_) if ready.len() > 1 => {
            for (job, _) in ready {
                run_group(name, Some(v.clone()), vec![job], metrics);
            }
        }
        Err(e) => {
            if let Some((job, _)) = ready.into_iter().next() {
                reply(job, Some(v.clone()), Err(e), started, compute);
            }
        }
    }
}

fn forward_group(v: &Version, group: &[(Job, Tensors)]) -> Result<Output, Error> {
    if let [(_, t)] = group {
        return v.bundle.forward(
            &t.pixel_values,
            t.bool_masked_pos.as_ref(),
            t.head_mask.as_ref(),
        );
    }
    let pixels: Vec<&Tensor> = group.iter().map(|(_, t)| &t.pixel_values).collect();
    let pixel_values = Tensor::f_cat(&pixels, 0).map_err(torch)?;
    let mask = if group.iter().any(|(_, t)| t.bool_masked_pos.is_some()) {
        let parts = group
            .iter()
            .map(|(j, t)| match &t.bool_masked_pos {
                Some(m) => Ok(m.shallow_clone()),
                // No mask: no patch masked, as the runtime runs it alone.
                None => Tensor::f_zeros([j.batch(), j.key.patches], (Kind::Bool, tch::Device::Cpu)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(torch)?;
        Some(Tensor::f_cat(&parts, 0).map_err(torch)?)
    } else {
        None
    };
    v.bundle
        .forward(&pixel_values, mask.as_ref(), group[0].1.head_mask.as_ref())
}

/// The named outputs for rows `offset..offset + len` of a batch's outputs
/// (the batch is dim 1 of the stacked hidden states and attentions, dim 0
/// of the rest; `embedding` is the CLS row of `last_hidden_state`).
fn outputs_of(
    out: &Output,
    offset: i64,
    len: i64,
    names: &[String],
) -> Result<Vec<Values<f32>>, Error> {
    names
        .iter()
        .map(|name| {
            let (t, dim) = match name.as_str() {
                "last_hidden_state" | "embedding" => (&out.last_hidden_state, 0),
                "logits" => (&out.logits, 0),
                "hidden_states" => (&out.hidden_states, 1),
                "attentions" => (&out.attentions, 1),
                _ => (&None, 0),
            };
            let t = t
                .as_ref()
                .ok_or_else(|| Error::Forward(format!("the model did not return `{name}`")))?;
            let mut rows = t.f_narrow(dim, offset, len).map_err(torch)?;
            if name == "embedding" {
                rows = rows.f_select(1, 0).map_err(torch)?;
            }
            let shape = rows.size();
            let flat = rows
                .f_contiguous()
                .and_then(|r| r.f_flatten(0, -1))
                .map_err(torch)?;
            let values = Vec::<f32>::try_from(&flat).map_err(torch)?;
            Ok(Values { values, shape })
        })
        .collect()
}
