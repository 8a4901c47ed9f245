//! Ollama's API: `/`, `/api/version`, `/api/tags`, `/api/ps`, `/api/show`, `/api/generate`,
//! `/api/chat`. Generation streams NDJSON (one JSON object per line) unless `"stream": false`.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::SamplingFields;
use super::api::{collect, event_stream, note_summary, parse_body, ApiError, AppState};
use super::log::LogNote;
use super::model_info::rfc3339;
use super::worker::{Event, Summary};
use crate::chat::Message;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(|| async { "Ollama is running" }))
        .route("/api/version", get(version))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
        .route("/api/generate", post(generate))
        .route("/api/chat", post(chat))
}

#[derive(Debug, Default, Deserialize)]
struct Options {
    #[serde(flatten)]
    sampling: SamplingFields,
    num_predict: Option<i64>,
    stop: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct GenerateRequest {
    model: Option<String>,
    #[serde(default)]
    prompt: String,
    system: Option<String>,
    #[serde(default)]
    raw: bool,
    stream: Option<bool>,
    #[serde(default)]
    options: Options,
    context: Option<Vec<u32>>,
    suffix: Option<String>,
    images: Option<Vec<Value>>,
    format: Option<Value>,
    template: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: String,
    images: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    stream: Option<bool>,
    #[serde(default)]
    options: Options,
    tools: Option<Vec<Value>>,
    format: Option<Value>,
}

async fn version() -> Json<Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

fn details(st: &AppState) -> Value {
    let i = &st.info;
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": i.family,
        "families": [i.family],
        "parameter_size": i.parameter_size(),
        "quantization_level": i.quantization,
    })
}

fn listed_name(st: &AppState) -> String {
    format!("{}:latest", st.info.name)
}

async fn tags(State(st): State<Arc<AppState>>) -> Json<Value> {
    let i = &st.info;
    let modified = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(i.modified_unix);
    Json(json!({ "models": [{
        "name": listed_name(&st),
        "model": listed_name(&st),
        "modified_at": rfc3339(modified),
        "size": i.size_bytes,
        "digest": i.digest,
        "details": details(&st),
    }]}))
}

async fn ps(State(st): State<Arc<AppState>>) -> Json<Value> {
    let i = &st.info;
    Json(json!({ "models": [{
        "name": listed_name(&st),
        "model": listed_name(&st),
        "size": i.size_bytes,
        "digest": i.digest,
        "details": details(&st),
        "expires_at": "2999-01-01T00:00:00Z",
        "size_vram": 0,
        "context_length": i.n_ctx,
    }]}))
}

#[derive(Debug, Deserialize)]
struct ShowRequest {
    model: Option<String>,
    name: Option<String>,
}

async fn show(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: ShowRequest = parse_body(body)?;
    st.check_model(req.model.as_deref().or(req.name.as_deref()))?;
    let i = &st.info;
    let a = &i.family;
    let modified = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(i.modified_unix);
    let mut info = serde_json::Map::new();
    info.insert("general.architecture".into(), json!(a));
    info.insert("general.name".into(), json!(i.general_name));
    info.insert("general.parameter_count".into(), json!(i.parameter_count));
    for (k, v) in [
        ("context_length", i.n_ctx_train),
        ("embedding_length", i.n_embd),
        ("block_count", i.n_layer),
        ("attention.head_count", i.n_head),
        ("attention.head_count_kv", i.n_head_kv),
        ("vocab_size", i.n_vocab),
    ] {
        info.insert(format!("{a}.{k}"), json!(v));
    }
    Ok(Json(json!({
        "modelfile": format!("# served by hypura\nFROM {}\n", i.path),
        "parameters": format!("num_ctx {}", i.n_ctx),
        "template": st.template.text(),
        "details": details(&st),
        "model_info": info,
        "capabilities": ["completion"],
        "modified_at": rfc3339(modified),
    })))
}

/// 400 for a feature hypura does not have, when the request uses it.
fn refuse(used: bool, what: &str) -> Result<(), ApiError> {
    if used {
        return Err(ApiError::bad_request(format!(
            "{what} not supported by hypura serve"
        )));
    }
    Ok(())
}

fn format_used(f: &Option<Value>) -> bool {
    !matches!(f, None | Some(Value::Null)) && f.as_ref().and_then(Value::as_str) != Some("")
}

async fn generate(
    State(st): State<Arc<AppState>>,
    Extension(note): Extension<LogNote>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req: GenerateRequest = parse_body(body)?;
    st.check_model(req.model.as_deref())?;
    refuse(
        req.images.as_ref().is_some_and(|v| !v.is_empty()),
        "images are",
    )?;
    refuse(format_used(&req.format), "format (constrained output) is")?;
    refuse(
        req.suffix.as_ref().is_some_and(|s| !s.is_empty()),
        "suffix (fill-in-the-middle) is",
    )?;
    refuse(
        req.template.as_ref().is_some_and(|s| !s.is_empty()),
        "a template override is",
    )?;
    let context = req.context.unwrap_or_default();
    if req.prompt.is_empty() && context.is_empty() {
        return Ok(Json(load_response(&st, "response", json!(""))).into_response());
    }
    // The prompt is wrapped in the file's chat template unless raw (or the file has none).
    let text = if req.raw || !st.has_file_template {
        match &req.system {
            Some(s) if !req.raw && !s.is_empty() => format!("{s}\n\n{}", req.prompt),
            _ => req.prompt.clone(),
        }
    } else {
        let mut msgs: Vec<Message> = req
            .system
            .iter()
            .map(|s| Message::new("system", s.clone()))
            .collect();
        msgs.push(Message::new("user", req.prompt.clone()));
        st.template
            .render(&msgs, true)
            .map_err(|e| ApiError::bad_request(e.to_string()))?
    };
    let tokens = if context.is_empty() {
        st.raw_tokens(&text)?
    } else {
        let mut more = st
            .tokenizer
            .encode(&text, false, true)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        // The context already starts with BOS; a template that writes one again is not obeyed.
        if more
            .first()
            .is_some_and(|&t| Some(t) == st.tokenizer.bos_id())
        {
            more.remove(0);
        }
        [context, more].concat()
    };
    let o = &req.options;
    let job = st.job(
        tokens,
        o.sampling.params(st.info.n_ctx)?,
        num_predict(o.num_predict),
        o.stop.clone().unwrap_or_default(),
    )?;
    let prompt_tokens = job.tokens.clone();
    let rx = st.submit(job)?;
    let model = listed_name(&st);
    let finish = move |s: &Summary| {
        let mut v = final_fields(&model, s, started);
        v["response"] = json!("");
        v["context"] = json!([prompt_tokens.as_slice(), &s.generated].concat());
        v
    };
    if req.stream == Some(false) {
        let (text, s) = collect(rx).await?;
        note_summary(&note, &s, started);
        let mut v = finish(&s);
        v["response"] = json!(text);
        return Ok(Json(v).into_response());
    }
    let model = listed_name(&st);
    Ok(ndjson(
        rx,
        note,
        started,
        move |t| chunk(&model, "response", json!(t)),
        finish,
    ))
}

async fn chat(
    State(st): State<Arc<AppState>>,
    Extension(note): Extension<LogNote>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req: ChatRequest = parse_body(body)?;
    st.check_model(req.model.as_deref())?;
    refuse(
        req.tools.as_ref().is_some_and(|v| !v.is_empty()),
        "tools are",
    )?;
    refuse(format_used(&req.format), "format (constrained output) is")?;
    refuse(
        req.messages
            .iter()
            .any(|m| m.images.as_ref().is_some_and(|v| !v.is_empty())),
        "images are",
    )?;
    let assistant = |content: &str| json!({ "role": "assistant", "content": content });
    if req.messages.is_empty() {
        return Ok(Json(load_response(&st, "message", assistant(""))).into_response());
    }
    let msgs: Vec<Message> = req
        .messages
        .iter()
        .map(|m| Message::new(&m.role, m.content.clone()))
        .collect();
    let o = &req.options;
    let job = st.job(
        st.chat_tokens(&msgs)?,
        o.sampling.params(st.info.n_ctx)?,
        num_predict(o.num_predict),
        o.stop.clone().unwrap_or_default(),
    )?;
    let rx = st.submit(job)?;
    let model = listed_name(&st);
    let finish = move |s: &Summary| {
        let mut v = final_fields(&model, s, started);
        v["message"] = json!({ "role": "assistant", "content": "" });
        v
    };
    if req.stream == Some(false) {
        let (text, s) = collect(rx).await?;
        note_summary(&note, &s, started);
        let mut v = finish(&s);
        v["message"] = assistant(&text);
        return Ok(Json(v).into_response());
    }
    let model = listed_name(&st);
    Ok(ndjson(
        rx,
        note,
        started,
        move |t| chunk(&model, "message", assistant(&t)),
        finish,
    ))
}

/// `num_predict`: negative (-1 infinite, -2 fill the context) or absent = until the context is
/// full.
fn num_predict(n: Option<i64>) -> Option<usize> {
    n.and_then(|n| usize::try_from(n).ok())
}

fn chunk(model: &str, key: &str, value: Value) -> Value {
    json!({ "model": model, "created_at": rfc3339(SystemTime::now()), key: value, "done": false })
}

/// The answer to a request with nothing to generate (Ollama loads the model then).
fn load_response(st: &AppState, key: &str, empty: Value) -> Value {
    json!({
        "model": listed_name(st),
        "created_at": rfc3339(SystemTime::now()),
        key: empty,
        "done": true,
        "done_reason": "load",
    })
}

/// The last object of a reply: counts and durations (nanoseconds).
fn final_fields(model: &str, s: &Summary, started: Instant) -> Value {
    let ns = |secs: f64| (secs * 1e9) as u64;
    json!({
        "model": model,
        "created_at": rfc3339(SystemTime::now()),
        "done": true,
        "done_reason": s.finish.as_str(),
        "total_duration": started.elapsed().as_nanos() as u64,
        "load_duration": 0,
        "prompt_eval_count": s.n_prompt - s.n_cached,
        "prompt_eval_duration": ns(s.prompt_seconds),
        "eval_count": s.generated.len(),
        "eval_duration": ns(s.generate_seconds),
    })
}

/// A streamed reply: one JSON object per line.
fn ndjson(
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    note: LogNote,
    started: Instant,
    mut text: impl FnMut(String) -> Value + Send + 'static,
    finish: impl Fn(&Summary) -> Value + Send + 'static,
) -> Response {
    let line = |v: Value| Bytes::from(format!("{v}\n"));
    let stream = event_stream(rx, move |ev| match ev {
        Event::Text(t) => vec![line(text(t))],
        Event::Done(s) => {
            note_summary(&note, &s, started);
            vec![line(finish(&s))]
        }
        Event::Failed(e) => vec![line(json!({ "error": format!("generation failed: {e}") }))],
    });
    (
        [(CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}
