//! Test helpers for the HTTP server: start one on a free loopback port with a small model, and
//! a small client (ureq; raw sockets where a test needs to hang up mid-stream).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hypura::chat::ChatTemplate;
use hypura::loader::{load, LoadOptions};
use hypura::serve::{ServeOptions, Server, WorkerOptions};
use serde_json::Value;

/// The bundled random-weight model (Llama-3 vocabulary, no chat template of its own).
pub fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/hypura-tiny-random-Q8_0.gguf")
}

/// The name the server lists the bundled model under.
pub const NAME: &str = "hypura-tiny-random-Q8_0";

/// Starts a server for `model` with a context of `n_ctx` tokens on 127.0.0.1, any free port.
pub fn start_with(model: &Path, n_ctx: usize, tweak: impl FnOnce(&mut ServeOptions)) -> Server {
    hypura::backend::set_cpu_threads(2);
    let opts = LoadOptions {
        n_ctx: Some(n_ctx),
        ..Default::default()
    };
    let m = load(model, &opts).unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    let template = ChatTemplate::for_model(&m.files.metadata, &m.tokenizer).unwrap();
    let mut so = ServeOptions {
        addr: "127.0.0.1:0".into(),
        log: false,
        worker: WorkerOptions::default(),
        ..Default::default()
    };
    tweak(&mut so);
    Server::start(m, template, so).unwrap()
}

pub fn start(n_ctx: usize) -> Server {
    start_with(&bundled(), n_ctx, |_| {})
}

/// A response: status, content type, body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// NDJSON: one object per line.
    pub fn lines(&self) -> Vec<Value> {
        self.body
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("line not JSON ({e}): {l:?}"))
            })
            .collect()
    }

    /// Server-sent events: the `data:` payloads.
    pub fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

fn reply(r: Result<ureq::Response, ureq::Error>) -> Reply {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = resp.status();
    let content_type = resp.header("content-type").unwrap_or("").to_string();
    let body = resp.into_string().expect("read body");
    Reply {
        status,
        content_type,
        body,
    }
}

pub fn get(server: &Server, path: &str) -> Reply {
    reply(
        agent()
            .get(&format!("http://{}{path}", server.addr()))
            .call(),
    )
}

pub fn post(server: &Server, path: &str, body: &str) -> Reply {
    reply(
        agent()
            .post(&format!("http://{}{path}", server.addr()))
            .set("content-type", "application/json")
            .send_string(body),
    )
}

pub fn post_json(server: &Server, path: &str, body: &Value) -> Reply {
    post(server, path, &body.to_string())
}

/// The text of a streamed Ollama reply (`response` or `message.content` of every line) and its
/// last line.
pub fn ollama_text(lines: &[Value]) -> (String, Value) {
    let mut text = String::new();
    for l in lines {
        assert!(l.get("error").is_none(), "error line: {l}");
        if let Some(t) = l["response"].as_str() {
            text += t;
        } else if let Some(t) = l["message"]["content"].as_str() {
            text += t;
        }
    }
    let last = lines.last().cloned().expect("no lines");
    (text, last)
}

/// The text of a streamed OpenAI reply, the finish reason, and the usage chunk if any.
pub fn openai_text(events: &[String]) -> (String, String, Option<Value>) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    let mut finish = String::new();
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}"));
        assert!(v.get("error").is_none(), "error event: {v}");
        let choices = v["choices"].as_array().expect("choices");
        if choices.is_empty() {
            usage = Some(v["usage"].clone());
            continue;
        }
        let c = &choices[0];
        if let Some(t) = c["delta"]["content"].as_str().or(c["text"].as_str()) {
            text += t;
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish, usage)
}
