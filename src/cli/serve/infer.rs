//! `POST /v2/models/{m}[/versions/{v}]/infer`: the body read within its
//! limits, parsed and checked off the async threads, queued for the batcher,
//! and the answer written back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::errors::ApiError;
use super::model::Model;
use super::protocol::{parse_request, HEADER_LENGTH};
use super::request::{prepare, respond};
use super::routes::{find_model, find_version, server_ready, Params, Server, Shared};

/// Counts a request (in flight, or arriving at a model's queue) until dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub async fn infer(
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
