//! The REST endpoints of the Open Inference Protocol (KServe v2), Triton's
//! model repository extension, and `GET /metrics` (inference itself is in
//! infer.rs).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use super::batcher::Batching;
use super::errors::{json_errors, ApiError};
use super::infer::infer;
use super::metrics::Metrics;
use super::model::Model;

/// Everything the handlers share.
pub struct Server {
    pub models: Vec<Arc<Model>>,
    pub metrics: Arc<Metrics>,
    pub batching: Batching,
    pub max_body: usize,
    pub body_timeout: Duration,
    /// Every bundle loaded, verified and warmed up.
    pub ready: AtomicBool,
    /// SIGTERM or Ctrl-C seen: finishing what is in flight.
    pub draining: AtomicBool,
    pub in_flight: AtomicUsize,
    /// Requests being read and checked, not yet queued: the batcher waits
    /// for them (up to the queue delay), and for nothing else.
    pub arriving: Arc<AtomicUsize>,
    /// The batcher's queue; `None` once every handler is done.
    pub queue: std::sync::Mutex<Option<std::sync::mpsc::SyncSender<super::batcher::Job>>>,
}

pub type Shared = Arc<Server>;
pub type Params = Path<HashMap<String, String>>;

pub fn router(server: Shared) -> Router {
    let max_body = server.max_body;
    let model = |rest: &str| {
        [
            format!("/v2/models/{{model}}{rest}"),
            format!("/v2/models/{{model}}/versions/{{version}}{rest}"),
        ]
    };
    let mut r = Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(load))
        .route("/v2/repository/models/{model}/unload", post(unload))
        .route("/metrics", get(metrics));
    for path in model("") {
        r = r.route(&path, get(model_metadata));
    }
    for path in model("/ready") {
        r = r.route(&path, get(model_ready));
    }
    for path in model("/infer") {
        r = r.route(&path, post(infer));
    }
    r.fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
            )
        })
        // Bodies past --max-body-mb: refused on their Content-Length, or
        // when the stream passes the limit (see `read_body`). The limit
        // holds for the body as decompressed, so a small gzip bomb is refused too.
        .layer(tower_http::decompression::RequestDecompressionLayer::new())
        .layer(tower_http::limit::RequestBodyLimitLayer::new(max_body))
        // Content-Encoding gzip or deflate, as tritonclient's
        // request_compression_algorithm and response_compression_algorithm.
        .layer(tower_http::compression::CompressionLayer::new())
        .layer(axum::middleware::map_response(json_errors))
        .layer(tower::limit::ConcurrencyLimitLayer::new(
            super::MAX_CONCURRENT_REQUESTS,
        ))
        .with_state(server)
}

pub fn find_model(s: &Server, p: &HashMap<String, String>) -> Result<Arc<Model>, ApiError> {
    let name = p.get("model").map(String::as_str).unwrap_or_default();
    s.models
        .iter()
        .find(|m| m.name == name)
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("unknown model `{name}`")))
}

/// The model's current version, which a `/versions/{v}` path must name.
pub fn find_version(
    s: &Server,
    p: &HashMap<String, String>,
) -> Result<(Arc<Model>, Arc<super::model::Version>), ApiError> {
    let model = find_model(s, p)?;
    let version = model
        .current()
        .ok_or_else(|| ApiError::unavailable(format!("model `{}` is not loaded", model.name)))?;
    if let Some(v) = p.get("version") {
        if *v != version.number.to_string() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "model `{}` has no version `{v}` (version {} is serving)",
                    model.name, version.number
                ),
            ));
        }
    }
    Ok((model, version))
}

async fn live() -> Response {
    axum::Json(json!({ "live": true })).into_response()
}

pub fn server_ready(s: &Server) -> Result<(), ApiError> {
    if s.draining.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    if !s.ready.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is loading its models"));
    }
    Ok(())
}

async fn ready(State(s): State<Shared>) -> Response {
    match server_ready(&s) {
        Ok(()) => axum::Json(json!({ "ready": true })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "vit-msn",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "classification", "model_repository"],
    }))
    .into_response()
}

async fn model_metadata(State(s): State<Shared>, Path(p): Params) -> Response {
    match find_version(&s, &p) {
        Ok((_, v)) => axum::Json(v.metadata.clone()).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn model_ready(State(s): State<Shared>, Path(p): Params) -> Response {
    match server_ready(&s).and_then(|()| find_version(&s, &p)) {
        Ok((m, v)) => {
            axum::Json(json!({ "name": m.name, "version": v.number.to_string(), "ready": true }))
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn repository_index(State(s): State<Shared>) -> Response {
    let list: Vec<Value> = s
        .models
        .iter()
        .map(|m| match m.current() {
            Some(v) => json!({ "name": m.name, "version": v.number.to_string(), "state": "READY" }),
            None => json!({ "name": m.name, "state": "UNAVAILABLE", "reason": "unloaded" }),
        })
        .collect();
    axum::Json(list).into_response()
}

async fn load(State(s): State<Shared>, Path(p): Params) -> Response {
    let model = match find_model(&s, &p) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let gauge = s.metrics.version.clone();
    let forced = model.current().is_none();
    match tokio::task::spawn_blocking(move || model.reload(forced, &gauge)).await {
        Ok(Ok(_)) => axum::Json(json!({})).into_response(),
        Ok(Err(message)) => ApiError::bad(format!("load refused: {message}")).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("load failed: {e}"),
        )
        .into_response(),
    }
}

async fn unload(State(s): State<Shared>, Path(p): Params) -> Response {
    match find_model(&s, &p) {
        Ok(m) => {
            m.unload(&s.metrics.version);
            axum::Json(json!({})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(s): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}
