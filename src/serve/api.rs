//! What the Ollama and OpenAI handlers share: the server state, errors, request bodies, turning
//! a prompt into a job, and turning the worker's events into a response.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedReceiver;

use super::log::LogNote;
use super::model_info::ModelInfo;
use super::worker::{Event, Job, Queue, Refused, Summary};
use crate::chat::{encode_prompt, ChatTemplate, Message};
use crate::generate::SamplingParams;
use crate::tokenizer::Tokenizer;

/// Everything the handlers read; the model itself lives on the worker thread.
pub struct AppState {
    pub info: ModelInfo,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Whether the file has its own chat template (Ollama's `/api/generate` then applies it).
    pub has_file_template: bool,
    pub queue: Queue,
}

/// An error answer: a status and a message. As a response it is Ollama's `{"error": "..."}`;
/// [`OpenAiError`] gives OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

/// [`ApiError`] in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl OpenAiError {
    pub fn body(e: &ApiError) -> serde_json::Value {
        let kind = match e.status {
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::SERVICE_UNAVAILABLE => "server_busy",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        serde_json::json!({
            "error": { "message": e.message, "type": kind, "param": null, "code": null }
        })
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        (self.0.status, axum::Json(Self::body(&self.0))).into_response()
    }
}

/// Parses a JSON request body. Any content type is accepted (curl's `-d` sends a form type);
/// a body that is not the expected JSON is a 400, one over the size limit a 413.
pub fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| ApiError {
        status: r.status(),
        message: format!("reading the request body: {}", r.body_text()),
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON request body: {e}")))
}

impl AppState {
    /// 404 unless `model` names the loaded model.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        let m = model.unwrap_or("");
        if self.info.accepts(m) {
            return Ok(());
        }
        Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "model '{m}' not found: this server runs '{}' (also accepted: {})",
                self.info.name,
                self.info.names().join(", ")
            ),
        })
    }

    /// Tokens of a chat rendered with the template, ready for the assistant's reply.
    pub fn chat_tokens(&self, messages: &[Message]) -> Result<Vec<u32>, ApiError> {
        let text = self
            .template
            .render(messages, true)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        encode_prompt(&self.tokenizer, &text).map_err(|e| ApiError::bad_request(e.to_string()))
    }

    /// Tokens of a raw prompt (BOS added if the model wants it; special-token text parsed).
    pub fn raw_tokens(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        encode_prompt(&self.tokenizer, text).map_err(|e| ApiError::bad_request(e.to_string()))
    }

    /// A job for `tokens`, checked against the context: `max_tokens` `None` means until the
    /// context is full.
    pub fn job(
        &self,
        tokens: Vec<u32>,
        sampling: SamplingParams,
        max_tokens: Option<usize>,
        stop: Vec<String>,
    ) -> Result<Job, ApiError> {
        let n_ctx = self.info.n_ctx;
        if tokens.is_empty() {
            return Err(ApiError::bad_request("the prompt has no tokens"));
        }
        if tokens.len() > n_ctx {
            return Err(ApiError::bad_request(format!(
                "the prompt has {} tokens, more than the context of {n_ctx} tokens \
                 (start the server with a larger --ctx-size, or send less)",
                tokens.len()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.info.n_vocab) {
            return Err(ApiError::bad_request(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.info.n_vocab
            )));
        }
        let room = n_ctx - tokens.len() + 1;
        Ok(Job {
            max_tokens: max_tokens.unwrap_or(room).min(room),
            tokens,
            sampling,
            stop,
        })
    }

    /// Queues `job`: 503 when the queue is full.
    pub fn submit(&self, job: Job) -> Result<UnboundedReceiver<Event>, ApiError> {
        self.queue.submit(job).map_err(|r| ApiError {
            status: match r {
                Refused::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
                Refused::Stopped => StatusCode::INTERNAL_SERVER_ERROR,
            },
            message: r.to_string(),
        })
    }
}

/// The whole reply of a job (non-streaming answers).
pub async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<(String, Summary), ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text += &t,
            Event::Done(s) => return Ok((text, s)),
            Event::Failed(e) => return Err(ApiError::internal(format!("generation failed: {e}"))),
        }
    }
    Err(ApiError::internal("the model worker stopped"))
}

/// The worker's events as a stream of response items: `render` turns each event into the items
/// it sends (none, one, or several). The stream ends after `Done` or `Failed`; a worker that
/// vanished reads as `Failed`. Dropping the stream (the client went away) cancels the job.
pub fn event_stream<T, F>(
    rx: UnboundedReceiver<Event>,
    render: F,
) -> impl Stream<Item = Result<T, Infallible>> + Send
where
    T: Send + 'static,
    F: FnMut(Event) -> Vec<T> + Send + 'static,
{
    struct St<T, F> {
        rx: UnboundedReceiver<Event>,
        render: F,
        pending: VecDeque<T>,
        done: bool,
    }
    let st = St {
        rx,
        render,
        pending: VecDeque::new(),
        done: false,
    };
    futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(item) = st.pending.pop_front() {
                return Some((Ok(item), st));
            }
            if st.done {
                return None;
            }
            let ev = st
                .rx
                .recv()
                .await
                .unwrap_or_else(|| Event::Failed("the model worker stopped".into()));
            st.done = matches!(ev, Event::Done(_) | Event::Failed(_));
            let items = (st.render)(ev);
            st.pending.extend(items);
        }
    })
}

/// What the request log says about a finished job.
pub fn note_summary(note: &LogNote, s: &Summary, started: Instant) {
    note.set(format!(
        "prompt {} tokens ({} cached), {} generated, {}; queued {:.2} s, total {:.2} s",
        s.n_prompt,
        s.n_cached,
        s.generated.len(),
        s.finish.as_str(),
        s.queued_seconds,
        started.elapsed().as_secs_f64()
    ));
}

/// `stop` as OpenAI sends it: a string or a list of strings.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A sampling value that must be a finite number.
pub fn finite(name: &str, v: Option<f32>) -> Result<Option<f32>, ApiError> {
    match v {
        Some(x) if !x.is_finite() => Err(ApiError::bad_request(format!(
            "{name} must be a finite number"
        ))),
        _ => Ok(v),
    }
}

/// The sampling fields both APIs accept (OpenAI's `temperature`, `top_p`, `seed`; Ollama's
/// `options` and llama.cpp's extensions `top_k`, `min_p`, `repeat_penalty`, `repeat_last_n`).
/// Unset fields take `hypura run`'s defaults.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i64>,
}

impl SamplingFields {
    /// The sampler's parameters; `repeat_last_n` -1 means the whole context (Ollama), a
    /// negative seed a random one.
    pub fn params(&self, n_ctx: usize) -> Result<SamplingParams, ApiError> {
        let d = SamplingParams::default();
        Ok(SamplingParams {
            temperature: finite("temperature", self.temperature)?.unwrap_or(d.temperature),
            top_k: self.top_k.map_or(d.top_k, |k| k.max(0) as usize),
            top_p: finite("top_p", self.top_p)?.unwrap_or(d.top_p),
            min_p: finite("min_p", self.min_p)?.unwrap_or(d.min_p),
            repeat_penalty: finite("repeat_penalty", self.repeat_penalty)?
                .unwrap_or(d.repeat_penalty),
            repeat_last_n: match self.repeat_last_n {
                None => d.repeat_last_n,
                Some(n) if n < 0 => n_ctx,
                Some(n) => n as usize,
            },
            seed: self.seed.and_then(|s| u64::try_from(s).ok()),
        })
    }
}
