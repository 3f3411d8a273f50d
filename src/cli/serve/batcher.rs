//! Dynamic batching: one worker thread per model takes the requests queued
//! and those arriving within the queue delay, runs those with the same
//! resolution and head mask as one forward pass of at most `max_batch`
//! samples, and hands each request its own rows. The delay is spent only
//! while other requests are being read: one client alone never waits.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use tokio::sync::oneshot;
use vit_msn::{Error, Output};

use super::metrics::Metrics;
use super::model::{Model, Version};

/// Requests that may wait in one model's queue; past this, a request is
/// refused with 503 rather than queued without bound.
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

pub struct Job {
    pub pixel_values: Tensor,
    pub bool_masked_pos: Option<Tensor>,
    pub head_mask: Option<Tensor>,
    pub key: BatchKey,
    pub arrived: Instant,
    pub reply: oneshot::Sender<Done>,
}

impl Job {
    fn batch(&self) -> i64 {
        self.pixel_values.size()[0]
    }
}

/// A request's share of a batch's forward pass.
pub struct Done {
    /// The version that answered; `None` when the model was unloaded.
    pub version: Option<Arc<Version>>,
    pub result: Result<Output, Error>,
    pub queued: Duration,
    pub compute: Duration,
}

/// Runs until every sender of `queue` is gone, then finishes what is queued.
pub fn work(model: Arc<Model>, queue: Receiver<Job>, batching: Batching, metrics: Arc<Metrics>) {
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
                    if left.is_zero() || model.arriving.load(Ordering::SeqCst) == 0 {
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
        // One version for the whole round: a swap lands between batches.
        let version = model.current();
        for group in group_by_key(jobs) {
            run_group(&model.name, version.clone(), group, &metrics);
        }
    }
}

/// Jobs with equal keys, each group in arrival order.
fn group_by_key(jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<Vec<Job>> = Vec::new();
    for job in jobs {
        match groups.iter_mut().find(|g| g[0].key == job.key) {
            Some(g) => g.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

fn run_group(name: &str, version: Option<Arc<Version>>, group: Vec<Job>, metrics: &Metrics) {
    let started = Instant::now();
    let Some(v) = version else {
        for job in group {
            let queued = started - job.arrived;
            let _ = job.reply.send(Done {
                version: None,
                result: Err(Error::Forward("the model is not loaded".into())),
                queued,
                compute: Duration::ZERO,
            });
        }
        return;
    };
    let result = forward_group(&v, &group);
    let compute = started.elapsed();
    match result {
        Ok(out) => {
            metrics
                .batch_size
                .with_label_values(&[name])
                .observe(group.iter().map(Job::batch).sum::<i64>() as f64);
            let mut offset = 0;
            for job in group {
                let b = job.batch();
                let rows = rows_of(&out, offset, b);
                offset += b;
                let _ = job.reply.send(Done {
                    version: Some(v.clone()),
                    result: rows,
                    queued: started - job.arrived,
                    compute,
                });
            }
        }
        // A batch that fails (memory, say) is retried request by request,
        // so each gets its own answer.
        Err(_) if group.len() > 1 => {
            for job in group {
                run_group(name, Some(v.clone()), vec![job], metrics);
            }
        }
        Err(e) => {
            if let Some(job) = group.into_iter().next() {
                let _ = job.reply.send(Done {
                    version: Some(v.clone()),
                    result: Err(e),
                    queued: started - job.arrived,
                    compute,
                });
            }
        }
    }
}

fn forward_group(v: &Version, group: &[Job]) -> Result<Output, Error> {
    let torch = |e: tch::TchError| Error::Forward(vit_msn::error::first_line(&e.to_string()));
    if let [job] = group {
        return v.bundle.forward(
            &job.pixel_values,
            job.bool_masked_pos.as_ref(),
            job.head_mask.as_ref(),
        );
    }
    let pixels: Vec<&Tensor> = group.iter().map(|j| &j.pixel_values).collect();
    let pixel_values = Tensor::f_cat(&pixels, 0).map_err(torch)?;
    let mask = if group.iter().any(|j| j.bool_masked_pos.is_some()) {
        let parts = group
            .iter()
            .map(|j| match &j.bool_masked_pos {
                Some(m) => m.f_to_kind(Kind::Bool),
                None => Tensor::f_zeros([j.batch(), j.key.patches], (Kind::Bool, tch::Device::Cpu)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(torch)?;
        Some(Tensor::f_cat(&parts, 0).map_err(torch)?)
    } else {
        None
    };
    v.bundle
        .forward(&pixel_values, mask.as_ref(), group[0].head_mask.as_ref())
}

/// Rows `offset..offset + len` of every output (the batch is dim 1 of the
/// stacked hidden states and attentions, dim 0 of the rest).
fn rows_of(out: &Output, offset: i64, len: i64) -> Result<Output, Error> {
    let take = |t: &Option<Tensor>, dim: i64| -> Result<Option<Tensor>, Error> {
        t.as_ref()
            .map(|t| t.f_narrow(dim, offset, len))
            .transpose()
            .map_err(|e| Error::Forward(e.to_string()))
    };
    Ok(Output {
        last_hidden_state: take(&out.last_hidden_state, 0)?,
        logits: take(&out.logits, 0)?,
        hidden_states: take(&out.hidden_states, 1)?,
        attentions: take(&out.attentions, 1)?,
    })
}
