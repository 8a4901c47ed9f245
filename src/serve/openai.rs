//! OpenAI's API: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, with
//! server-sent events when `"stream": true` (`data: {...}` chunks, then `data: [DONE]`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{collect, event_stream, note_summary, parse_body, ApiError, AppState};
use super::api::{OneOrMany, OpenAiError, SamplingFields};
use super::log::LogNote;
use super::model_info::unix_now;
use super::worker::{Event, Summary};
use crate::chat::Message;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
}

fn model_object(st: &AppState) -> Value {
    json!({ "id": st.info.name, "object": "model", "created": st.info.modified_unix, "owned_by": "hypura" })
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "object": "list", "data": [model_object(&st)] }))
}

async fn model(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    st.check_model(Some(&id))?;
    Ok(Json(model_object(&st)))
}

/// Message content: a string, or a list of parts of which only text is supported.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    stop: OneOrMany,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u64>,
    response_format: Option<Value>,
    logprobs: Option<Value>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    tools: Option<Vec<Value>>,
    #[serde(flatten)]
    common: Common,
}

/// A prompt: a string, a list of one string, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(default)]
    echo: bool,
    #[serde(flatten)]
    common: Common,
}

fn next_id(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{:x}{:06x}",
        unix_now(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn content_text(c: Option<Content>) -> Result<String, ApiError> {
    match c {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t),
        Some(Content::Parts(parts)) => parts
            .into_iter()
            .map(|p| match (p.kind.as_str(), p.text) {
                ("text", Some(t)) => Ok(t),
                (k, _) => Err(ApiError::bad_request(format!(
                    "content parts of type '{k}' are not supported (only text)"
                ))),
            })
            .collect(),
    }
}

/// The job of a request's common fields; `default_max` is the token limit when none is given.
fn prepare(
    st: &AppState,
    c: &Common,
    tokens: Vec<u32>,
    default_max: Option<usize>,
) -> Result<super::worker::Job, ApiError> {
    st.check_model(c.model.as_deref())?;
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(
            "n must be 1: hypura serve returns one choice",
        ));
    }
    let format = c.response_format.as_ref().and_then(|f| f["type"].as_str());
    if format.is_some_and(|t| t != "text") {
        return Err(ApiError::bad_request(
            "response_format (constrained output) is not supported by hypura serve",
        ));
    }
    if !matches!(
        c.logprobs,
        None | Some(Value::Null) | Some(Value::Bool(false))
    ) {
        return Err(ApiError::bad_request(
            "logprobs are not supported by hypura serve",
        ));
    }
    let max = c
        .max_completion_tokens
        .or(c.max_tokens)
        .map(|m| usize::try_from(m).unwrap_or(usize::MAX))
        .or(default_max);
    st.job(
        tokens,
        c.sampling.params(st.info.n_ctx)?,
        max,
        c.stop.clone().into_vec(),
    )
}

fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.n_prompt,
        "completion_tokens": s.generated.len(),
        "total_tokens": s.n_prompt + s.generated.len(),
        "prompt_tokens_details": { "cached_tokens": s.n_cached },
    })
}

async fn chat(
    State(st): State<Arc<AppState>>,
    Extension(note): Extension<LogNote>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let started = Instant::now();
    let req: ChatRequest = parse_body(body)?;
    st.check_model(req.common.model.as_deref())?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::bad_request("tools are not supported by hypura serve").into());
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").into());
    }
    let mut msgs = Vec::with_capacity(req.messages.len());
    for m in req.messages {
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role
        };
        msgs.push(Message::new(&role, content_text(m.content)?));
    }
    let job = prepare(&st, &req.common, st.chat_tokens(&msgs)?, None)?;
    let rx = st.submit(job)?;
    let (id, created, model) = (next_id("chatcmpl"), unix_now(), st.info.name.clone());
    let head = json!({ "id": id, "created": created, "model": model, "system_fingerprint": fingerprint() });
    if !req.common.stream {
        let (text, s) = collect(rx).await?;
        note_summary(&note, &s, started);
        let mut v = head;
        v["object"] = json!("chat.completion");
        v["choices"] = json!([{
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "logprobs": null,
            "finish_reason": s.finish.as_str(),
        }]);
        v["usage"] = usage(&s);
        return Ok(Json(v).into_response());
    }
    let include_usage = req.common.stream_options.is_some_and(|o| o.include_usage);
    let chunk = move |delta: Value, finish: Value| {
        let mut v = head.clone();
        v["object"] = json!("chat.completion.chunk");
        v["choices"] =
            json!([{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }]);
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    let first = chunk(json!({ "role": "assistant", "content": "" }), Value::Null);
    Ok(sse(
        rx,
        note,
        started,
        include_usage,
        first,
        chunk,
        |t| json!({ "content": t }),
    ))
}

async fn completions(
    State(st): State<Arc<AppState>>,
    Extension(note): Extension<LogNote>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let started = Instant::now();
    let req: CompletionRequest = parse_body(body)?;
    st.check_model(req.common.model.as_deref())?;
    let (text, tokens) = match req.prompt {
        Prompt::Text(t) => (t.clone(), st.raw_tokens(&t)?),
        Prompt::Texts(v) if v.len() == 1 => (v[0].clone(), st.raw_tokens(&v[0])?),
        Prompt::Texts(_) => {
            return Err(ApiError::bad_request("prompt: send one prompt per request").into())
        }
        Prompt::Tokens(ids) => {
            let t = st
                .tokenizer
                .decode(&ids)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            (t, ids)
        }
    };
    // OpenAI's default for this endpoint is 16 tokens.
    let job = prepare(&st, &req.common, tokens, Some(16))?;
    let rx = st.submit(job)?;
    let (id, created, model) = (next_id("cmpl"), unix_now(), st.info.name.clone());
    let head = json!({ "id": id, "object": "text_completion", "created": created, "model": model,
                       "system_fingerprint": fingerprint() });
    let echo = if req.echo { text } else { String::new() };
    if !req.common.stream {
        let (out, s) = collect(rx).await?;
        note_summary(&note, &s, started);
        let mut v = head;
        v["choices"] = json!([{
            "text": echo + &out, "index": 0, "logprobs": null, "finish_reason": s.finish.as_str(),
        }]);
        v["usage"] = usage(&s);
        return Ok(Json(v).into_response());
    }
    let include_usage = req.common.stream_options.is_some_and(|o| o.include_usage);
    let chunk = move |text: Value, finish: Value| {
        let mut v = head.clone();
        v["choices"] =
            json!([{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish }]);
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    let first = chunk(json!(echo), Value::Null);
    Ok(sse(rx, note, started, include_usage, first, chunk, |t| {
        json!(t)
    }))
}

fn fingerprint() -> String {
    concat!("hypura-", env!("CARGO_PKG_VERSION")).to_string()
}

/// A streamed reply as server-sent events: `first`, a chunk per piece of text, the chunk with
/// the finish reason, the usage chunk if asked for, then `[DONE]`.
fn sse(
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    note: LogNote,
    started: Instant,
    include_usage: bool,
    first: Value,
    chunk: impl Fn(Value, Value) -> Value + Send + 'static,
    piece: impl Fn(String) -> Value + Send + 'static,
) -> Response {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let done = || SseEvent::default().data("[DONE]");
    let mut first = Some(first);
    let stream = event_stream(rx, move |ev| {
        let mut out: Vec<SseEvent> = first.take().map(data).into_iter().collect();
        match ev {
            Event::Text(t) => out.push(data(chunk(piece(t), Value::Null))),
            Event::Done(s) => {
                note_summary(&note, &s, started);
                let empty = match piece(String::new()) {
                    Value::Object(_) => json!({}),
                    v => v,
                };
                out.push(data(chunk(empty, json!(s.finish.as_str()))));
                if include_usage {
                    let mut u = chunk(Value::Null, Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&s);
                    out.push(data(u));
                }
                out.push(done());
            }
            Event::Failed(e) => {
                let err = ApiError::internal(format!("generation failed: {e}"));
                out.push(data(OpenAiError::body(&err)));
                out.push(done());
            }
        }
        out
    });
    Sse::new(stream).into_response()
}
