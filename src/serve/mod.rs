//! `hypura serve`: one loaded model behind Ollama's and OpenAI's HTTP APIs (feature `server`).
//!
//! ```text
//! HTTP (axum on tokio) ── handler: parse, check the model name, render the chat template,
//!   │                      tokenize, check the context ──► worker::Queue (FIFO, bounded)
//!   │                                                          │
//!   ◄── NDJSON / SSE / JSON ◄── per-request channel of Events ◄── worker thread: owns the model,
//!                                                                  runs one job at a time
//! ```
//! The model is not `Sync`, so it lives on one thread ([`worker`]) that runs jobs in the order
//! they arrived. Between jobs the KV cache is emptied, unless the new prompt extends what it
//! holds (the previous prompt and reply, as in a chat that goes on): then only the new tokens
//! are computed. A client that disconnects closes its channel, and its job stops at the next
//! token (or never starts). Every request logs one line on stderr.

mod api;
mod log;
mod model_info;
mod ollama;
mod openai;
mod stop;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::serve::ListenerExt;
use axum::Router;

pub use model_info::ModelInfo;
pub use stop::StopMatcher;
pub use worker::{WorkerOptions, WorkerStats};

use crate::chat::{ChatTemplate, TemplateSource};
use crate::error::{Error, Result};
use crate::loader::LoadedModel;
use api::{ApiError, AppState};

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Address to listen on, `host:port` (port 0: any free port; see [`Server::addr`]).
    pub addr: String,
    /// The `-m` argument as typed (requests may name the model by it).
    pub reference: Option<String>,
    /// More names the model answers to; the first is the name listed.
    pub aliases: Vec<String>,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Log one line per request on stderr.
    pub log: bool,
    /// Stop on Ctrl-C (SIGINT): end the running reply at its next token, refuse the waiting
    /// ones, let the worker save what it learned; a second Ctrl-C exits at once.
    pub ctrl_c: bool,
    pub worker: WorkerOptions,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            addr: "127.0.0.1:8080".into(),
            reference: None,
            aliases: Vec::new(),
            max_body_bytes: 8 << 20,
            log: true,
            ctrl_c: false,
            worker: WorkerOptions::default(),
        }
    }
}

/// A running server: the HTTP thread (a small tokio runtime) and the model's worker thread.
/// Dropping it shuts both down.
pub struct Server {
    addr: SocketAddr,
    info: ModelInfo,
    /// The worker's counters (not a queue handle: the worker ends when the last one goes).
    control: worker::Control,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<JoinHandle<std::io::Result<()>>>,
    worker: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `opts.addr` and starts serving `model` with `template`.
    pub fn start(model: LoadedModel, template: ChatTemplate, opts: ServeOptions) -> Result<Self> {
        let server_err = |what: &str, e: std::io::Error| {
            Error::InvalidRequest(format!("{what} {}: {e}", opts.addr))
        };
        let listener =
            std::net::TcpListener::bind(&opts.addr).map_err(|e| server_err("binding", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| server_err("configuring", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| server_err("reading the address of", e))?;
        let info = ModelInfo::new(&model, opts.reference.as_deref(), &opts.aliases);
        let tokenizer = model.tokenizer.clone();
        let (queue, worker) = worker::spawn(model, opts.worker.clone())?;
        let control = queue.control();
        let state = Arc::new(AppState {
            info: info.clone(),
            tokenizer,
            has_file_template: template.source() == TemplateSource::Gguf,
            template,
            queue,
        });
        let app = router(state, opts.max_body_bytes, opts.log);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hypura-http")
            .enable_io()
            .build()
            .map_err(|e| server_err("starting the HTTP runtime for", e))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let ctrl_c = opts.ctrl_c;
        let on_ctrl_c = control.clone();
        let http = std::thread::Builder::new()
            .name("hypura-serve".into())
            .spawn(move || {
                rt.block_on(async move {
                    // Streamed replies are many small writes: send each at once (no Nagle).
                    let listener = tokio::net::TcpListener::from_std(listener)?.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    let app = app.into_make_service_with_connect_info::<SocketAddr>();
                    let interrupted = async move {
                        if !ctrl_c || tokio::signal::ctrl_c().await.is_err() {
                            return std::future::pending::<()>().await;
                        }
                        eprintln!("hypura serve: stopping (Ctrl-C again quits at once)");
                        on_ctrl_c.stop();
                        tokio::spawn(async {
                            let _ = tokio::signal::ctrl_c().await;
                            std::process::exit(130);
                        });
                    };
                    let stop = futures_util::future::select(Box::pin(rx), Box::pin(interrupted));
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            stop.await;
                        })
                        .await
                })
            })
            .map_err(|e| server_err("starting the HTTP thread for", e))?;
        Ok(Server {
            addr,
            info,
            control,
            shutdown: Some(tx),
            http: Some(http),
            worker: Some(worker),
        })
    }

    /// The address the server listens on (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the server says about its model (its names, sizes).
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// What the model worker has done so far (jobs, tokens), and how many jobs wait.
    pub fn stats(&self) -> WorkerStats {
        self.control.read()
    }

    /// Blocks until the server stops (it runs until shut down or an I/O error).
    pub fn wait(mut self) -> Result<()> {
        let r = self.http.take().map(JoinHandle::join);
        self.stop();
        match r {
            Some(Ok(Err(e))) => Err(Error::InvalidRequest(format!("server {}: {e}", self.addr))),
            Some(Err(_)) => Err(Error::InvalidRequest(format!(
                "server {}: the HTTP thread panicked",
                self.addr
            ))),
            _ => Ok(()),
        }
    }

    /// Stops accepting connections, ends the running reply at its next token (its client gets
    /// an error), refuses the waiting ones, and ends the worker.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            self.control.stop();
            let _ = tx.send(());
        }
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
        // The HTTP side held the last queue handles: the worker ends once they are gone.
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every route, the body limit, the request log and the JSON 404 for unknown paths.
fn router(state: Arc<AppState>, max_body_bytes: usize, log: bool) -> Router {
    Router::new()
        .merge(ollama::routes())
        .merge(openai::routes())
        .fallback(not_found)
        .with_state(state)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(log, log::log_requests))
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: axum::http::StatusCode::NOT_FOUND,
        message: format!(
            "no endpoint {method} {}: hypura serve implements GET /, /api/version, /api/tags, /api/ps, \
             POST /api/show, /api/generate, /api/chat, GET /v1/models, POST /v1/chat/completions, \
             /v1/completions",
            uri.path()
        ),
    }
}
