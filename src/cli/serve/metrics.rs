//! `GET /metrics`: per-model counters and histograms in the Prometheus text
//! format, through the `prometheus` crate.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Requests by model and outcome (`success`, `client_error`, `unavailable`, `server_error`).
    pub requests: IntCounterVec,
    /// From the body read to the response, seconds.
    pub latency: HistogramVec,
    /// From the request's arrival at its model's queue to its batch's start.
    pub queue: HistogramVec,
    /// The forward pass of the batch a request ran in.
    pub compute: HistogramVec,
    /// Samples per forward pass.
    pub batch_size: HistogramVec,
    /// The version now serving (1 for the first load, +1 per swap; 0 while none is).
    pub version: IntGaugeVec,
}

fn seconds() -> Vec<f64> {
    prometheus::exponential_buckets(0.0005, 2.0, 16).unwrap_or_default()
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let model = &["model"];
        let requests = IntCounterVec::new(
            Opts::new("vit_msn_requests_total", "Inference requests by outcome"),
            &["model", "outcome"],
        )?;
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), model)
        };
        let latency = histogram(
            "vit_msn_request_duration_seconds",
            "Inference request latency, from the body read to the response",
            seconds(),
        )?;
        let queue = histogram(
            "vit_msn_queue_duration_seconds",
            "Time a request waited for its batch to start",
            seconds(),
        )?;
        let compute = histogram(
            "vit_msn_compute_duration_seconds",
            "Forward pass time of the batch a request ran in",
            seconds(),
        )?;
        let batch_size = histogram(
            "vit_msn_batch_size",
            "Samples per forward pass",
            prometheus::exponential_buckets(1.0, 2.0, 11).unwrap_or_default(),
        )?;
        let version = IntGaugeVec::new(
            Opts::new("vit_msn_model_version", "The model version now serving"),
            model,
        )?;
        for c in [&latency, &queue, &compute, &batch_size] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(version.clone()))?;
        Ok(Self {
            registry,
            requests,
            latency,
            queue,
            compute,
            batch_size,
            version,
        })
    }

    /// Every metric, as `GET /metrics` returns it.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec fails only on a metric with invalid labels,
        // which `new` would have refused.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
