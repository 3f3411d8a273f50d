//! `vit-msn serve`: bundles behind the Open Inference Protocol (KServe v2
//! REST, as Triton speaks it), with dynamic batching, hot swap and metrics.
//!
//! - `routes.rs`: the endpoints, `infer.rs` the inference one, `errors.rs`
//!   every refusal as JSON.
//! - `protocol.rs` and `response.rs`: the request and response formats
//!   (`flat.rs`: JSON tensor data); `request.rs`: one request's inputs and
//!   outputs; `metadata.rs`: a model's metadata.
//! - `batcher.rs`: one worker thread runs every model's forward passes.
//! - `model.rs`: the version serving, and how a replacement is swapped in.

mod batcher;
mod errors;
mod flat;
mod infer;
mod metadata;
mod metrics;
mod model;
mod protocol;
mod request;
mod response;
mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::{device_arg, usage, CliResult};
use batcher::Batching;
use model::Model;
use routes::Server;

/// Requests handled at once; more wait for a slot before their bodies are
/// read (back-pressure), which bounds the memory bodies can take to about
/// this many times --max-body-mb. The batcher's queue is bounded as well
/// (batcher::QUEUE_CAPACITY).
pub const MAX_CONCURRENT_REQUESTS: usize = 128;

/// Serve bundles over HTTP with the Open Inference Protocol (KServe v2 / Triton)
#[derive(Args)]
#[command(
    after_help = "Endpoints (KServe v2 REST, with Triton's binary tensor data, classification
and model repository extensions):
  GET  /v2/health/live, /v2/health/ready, /v2, /metrics
  GET  /v2/models/NAME[/versions/V], /v2/models/NAME[/versions/V]/ready
  POST /v2/models/NAME[/versions/V]/infer
  POST /v2/repository/index, /v2/repository/models/NAME/load, .../unload

Each bundle folder is watched: a `vit-msn bundle replace`, `compile` or `fewshot fit`
into it is loaded, verified and warmed up beside the serving version, then swapped in.

Examples:
  vit-msn serve --bundle small=artifacts/small
  vit-msn serve --bundle cls=artifacts/cls --bundle emb=artifacts/small --port 8001 --max-batch 16"
)]
pub struct ServeArgs {
    /// A model to serve, as NAME=DIR (repeat for more).
    #[arg(long = "bundle", value_name = "NAME=DIR", required = true)]
    bundles: Vec<String>,
    /// Address to listen on (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Most samples in one forward pass.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(i64).range(1..=4096))]
    max_batch: i64,
    /// How long a request may wait for others to share its forward pass.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=60000))]
    max_queue_delay_ms: u64,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=16384))]
    max_body_mb: u64,
    /// A request body must arrive within this many milliseconds.
    #[arg(long, default_value_t = 30000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    body_timeout_ms: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Do not watch the bundle folders; reload only on POST /v2/repository/models/NAME/load.
    #[arg(long)]
    no_watch: bool,
}

/// One lifecycle line on stderr.
pub fn log(message: &str) {
    eprintln!("vit-msn serve: {message}");
}

fn parse_bundles(
    specs: &[String],
    device: tch::Device,
) -> Result<Vec<Arc<Model>>, Box<dyn std::error::Error>> {
    let mut models: Vec<Arc<Model>> = Vec::new();
    for spec in specs {
        let (name, dir) = spec
            .split_once('=')
            .ok_or_else(|| usage(format!("--bundle {spec}: expected NAME=DIR")))?;
        let valid = !name.is_empty()
            && name.len() <= 128
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid {
            return Err(usage(format!(
                "--bundle {spec}: a model name is 1 to 128 letters, digits, '-', '_' or '.'"
            )));
        }
        if models.iter().any(|m| m.name == name) {
            return Err(usage(format!("--bundle: model `{name}` is given twice")));
        }
        if dir.is_empty() {
            return Err(usage(format!("--bundle {spec}: no folder given")));
        }
        models.push(Arc::new(Model::new(
            name.into(),
            PathBuf::from(dir),
            device,
        )));
    }
    Ok(models)
}

async fn shutdown_signal(failed: tokio::sync::oneshot::Receiver<()>) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
        // The loader gave up: stop serving (the error is returned).
        Ok(()) = failed => {}
    }
}

pub fn serve(a: ServeArgs) -> CliResult {
    let device = device_arg(&a.device)?;
    let models = parse_bundles(&a.bundles, device)?;
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (a.host.as_str(), a.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .ok_or(())
        })
        .map_err(|()| {
            usage(format!(
                "--host {}: not an address this machine can listen on",
                a.host
            ))
        })?;
    // A client closing its socket early must not end the process.
    // SAFETY: one signal's disposition, set before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let metrics = Arc::new(metrics::Metrics::new()?);
    let server = Arc::new(Server {
        models: models.clone(),
        metrics: metrics.clone(),
        batching: Batching {
            max_batch: a.max_batch,
            delay: Duration::from_millis(a.max_queue_delay_ms),
        },
        max_body: (a.max_body_mb << 20) as usize,
        body_timeout: Duration::from_millis(a.body_timeout_ms),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        arriving: Arc::new(AtomicUsize::new(0)),
        queue: std::sync::Mutex::new(None),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    log(&format!("listening on http://{bound}"));

    let (tx, rx) = std::sync::mpsc::sync_channel(batcher::QUEUE_CAPACITY);
    *server
        .queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
    let worker = {
        let (arriving, metrics, batching) =
            (server.arriving.clone(), metrics.clone(), server.batching);
        std::thread::spawn(move || batcher::work(rx, arriving, batching, metrics))
    };

    // Loading runs beside the listener: /v2/health/live answers meanwhile,
    // and /v2/health/ready once every bundle is loaded and warmed up.
    let stop = Arc::new(AtomicBool::new(false));
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
    let (watch_done_tx, watch_done_rx) = std::sync::mpsc::channel::<()>();
    let startup_error = Arc::new(std::sync::Mutex::new(None::<String>));
    {
        let (server, stop, startup_error, watch) = (
            server.clone(),
            stop.clone(),
            startup_error.clone(),
            !a.no_watch,
        );
        std::thread::spawn(move || {
            for m in &server.models {
                if let Err(message) = m.reload(true, &server.metrics.version) {
                    let message = format!("model {}: {message}", m.name);
                    *startup_error
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(message);
                    let _ = failed_tx.send(());
                    return;
                }
            }
            server.ready.store(true, Ordering::SeqCst);
            log(&format!(
                "ready: {} model(s) on http://{bound}",
                server.models.len()
            ));
            if watch {
                model::watch(
                    server.models.clone(),
                    stop,
                    server.metrics.version.clone(),
                    watch_done_tx,
                );
            }
        });
    }

    let app = routes::router(server.clone());
    let draining = {
        let server = server.clone();
        async move {
            shutdown_signal(failed_rx).await;
            server.draining.store(true, Ordering::SeqCst);
            log(&format!(
                "draining: finishing {} request(s) in flight",
                server.in_flight.load(Ordering::SeqCst)
            ));
        }
    };
    runtime.block_on(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(draining)
            .await
    })?;

    // Every handler is done: closing the queue lets the worker finish and exit.
    stop.store(true, Ordering::SeqCst);
    server
        .queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let _ = worker.join();
    // The watcher notices `stop` within one interval (or never started).
    let _ = watch_done_rx.recv_timeout(model::WATCH_INTERVAL * 4);
    drop(runtime);
    if let Some(message) = startup_error
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
    {
        return Err(message.into());
    }
    log("stopped");
    Ok(())
}
