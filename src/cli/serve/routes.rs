//! The REST endpoints of the Open Inference Protocol (KServe v2), Triton's
//! model repository extension, and `GET /metrics`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use super::batcher::Batching;
use super::infer::{prepare, respond};
use super::metrics::Metrics;
use super::model::Model;
use super::protocol::{parse_request, HEADER_LENGTH};

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

/// A refusal: its status and a message naming the input or field at fault.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    fn outcome(&self) -> &'static str {
        match self.status.as_u16() {
            503 => "unavailable",
            400..=499 => "client_error",
            _ => "server_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

type Shared = Arc<Server>;
type Params = Path<HashMap<String, String>>;

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

/// Errors from the layers (tower-http's 413, say) come as plain text; a
/// client of this protocol expects `{"error": ...}` from every endpoint.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let reason = status.canonical_reason().unwrap_or("error");
    let message = if text.is_empty() {
        reason.to_string()
    } else {
        format!("{reason}: {text}")
    };
    ApiError::new(status, message).into_response()
}

fn find_model(s: &Server, p: &HashMap<String, String>) -> Result<Arc<Model>, ApiError> {
    let name = p.get("model").map(String::as_str).unwrap_or_default();
    s.models
        .iter()
        .find(|m| m.name == name)
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("unknown model `{name}`")))
}

/// The model's current version, which a `/versions/{v}` path must name.
fn find_version(
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

fn server_ready(s: &Server) -> Result<(), ApiError> {
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

/// Counts a request (in flight, or arriving at a model's queue) until dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn infer(
    State(s): State<Shared>,
    Path(p): Params,
    headers: HeaderMap,
    body: Body,
) -> Response {
    s.in_flight.fetch_add(1, Ordering::SeqCst);
    let _counted = InFlight(&s.in_flight);
    let started = Instant::now();
    let model = match find_model(&s, &p) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let result = infer_model(&s, &model, &p, &headers, body).await;
    let outcome = match &result {
        Ok(_) => "success",
        Err(e) => e.outcome(),
    };
    s.metrics
        .requests
        .with_label_values(&[&model.name, outcome])
        .inc();
    s.metrics
        .latency
        .with_label_values(&[&model.name])
        .observe(started.elapsed().as_secs_f64());
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn infer_model(
    s: &Server,
    model: &Arc<Model>,
    p: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    server_ready(s)?;
    let (_, version) = find_version(s, p)?;
    s.arriving.fetch_add(1, Ordering::SeqCst);
    let arriving = InFlight(&s.arriving);
    let bytes = read_body(s, body).await?;
    let header_length = match headers.get(HEADER_LENGTH) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::bad("header Inference-Header-Content-Length is not text"))?
                .to_string(),
        ),
        None => None,
    };
    let max_batch = s.batching.max_batch;
    // Parsing, decoding images and building tensors is CPU work: off the
    // async threads.
    let prepared = blocking(move || {
        let request =
            parse_request(&bytes, header_length.as_deref()).map_err(|e| ApiError::bad(e.0))?;
        prepare(&version, request, max_batch)
    })
    .await?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    let (job, wanted, id) = prepared.into_job(model.clone(), reply);
    let queue = s
        .queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
        .ok_or_else(|| ApiError::unavailable("the server is shutting down"))?;
    queue.try_send(job).map_err(|e| match e {
        std::sync::mpsc::TrySendError::Full(_) => ApiError::unavailable(format!(
            "{} requests are queued; try again later",
            super::batcher::QUEUE_CAPACITY
        )),
        std::sync::mpsc::TrySendError::Disconnected(_) => {
            ApiError::unavailable("the server is shutting down")
        }
    })?;
    drop(arriving);
    let done = answer.await.map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the batch worker stopped",
        )
    })?;
    let m = &s.metrics;
    m.queue
        .with_label_values(&[&model.name])
        .observe(done.queued.as_secs_f64());
    m.compute
        .with_label_values(&[&model.name])
        .observe(done.compute.as_secs_f64());
    let name = model.name.clone();
    let (body, header_length) =
        blocking(move || respond(&name, done, &wanted, id.as_deref())).await?;
    let mut response = Response::new(Body::from(body));
    let h = response.headers_mut();
    match header_length {
        Some(n) => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(HEADER_LENGTH, HeaderValue::from(n));
        }
        None => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    Ok(response)
}

/// The whole body, within --max-body-mb and the body timeout: a client that
/// stalls mid-body is dropped, and others are served meanwhile.
async fn read_body(s: &Server, body: Body) -> Result<bytes::Bytes, ApiError> {
    let read = axum::body::to_bytes(body, s.max_body);
    match tokio::time::timeout(s.body_timeout, read).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} ms",
                s.body_timeout.as_millis()
            ),
        )),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = source {
                if err.is::<http_body_util::LengthLimitError>() {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "the request body is over the limit of {} bytes (--max-body-mb)",
                            s.max_body
                        ),
                    ));
                }
                source = err.source();
            }
            Err(ApiError::bad(format!("cannot read the request body: {e}")))
        }
    }
}

/// Runs `f` on tokio's blocking pool; a panic in it is a 500, not a crash.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {e}"),
        )
    })?
}
