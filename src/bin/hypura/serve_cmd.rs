//! `hypura serve`: the model behind Ollama's and OpenAI's HTTP APIs.

use anyhow::{Context, Result};
use clap::Args;
use hypura::serve::{ServeOptions, Server, WorkerOptions};

use crate::common::{chat_template, ModelArgs};

#[derive(Args, Debug)]
#[command(after_help = "\
The model is loaded once and serves one request at a time; others wait their turn (first come,
first served). Endpoints:
  Ollama   GET /  /api/version  /api/tags  /api/ps   POST /api/show  /api/generate  /api/chat
  OpenAI   GET /v1/models   POST /v1/chat/completions  /v1/completions
Requests name the model by its file name (with or without .gguf or :latest), the -m argument,
the file's general.name or an --alias; an empty name means the loaded model.

Chat requests are formatted with the file's chat template (tokenizer.chat_template), or a
built-in Llama-3 / ChatML / Llama-2 format when it has none. Sampling defaults are hypura run's
(temperature 0.8, top-k 40, top-p 0.95, min-p 0.05); requests override them.

Point clients at it:
  OLLAMA_HOST=http://127.0.0.1:8080 ollama run MODEL
  python: ollama.Client(host=\"http://127.0.0.1:8080\")
          openai.OpenAI(base_url=\"http://127.0.0.1:8080/v1\", api_key=\"unused\")
  curl http://127.0.0.1:8080/api/generate -d '{\"model\": \"MODEL\", \"prompt\": \"Hi\"}'

The server listens on 127.0.0.1 (this machine only) unless --host says otherwise; it has no
authentication. One line per request goes to stderr. Ctrl-C stops it after the current token
(the reply in progress ends with an error); a second Ctrl-C quits at once.")]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on. 0.0.0.0 accepts connections from every network (no authentication).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the one taken is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Another name the model answers to; the first one is the name it is listed under
    /// (e.g. --alias llama3.2). Repeatable.
    #[arg(long = "alias", value_name = "NAME")]
    pub aliases: Vec<String>,
    /// Requests that may wait while one is generating; beyond that the server answers 503.
    #[arg(long = "max-queue", value_name = "N", default_value_t = 64)]
    pub max_queue: usize,
    /// Largest request body accepted (413 beyond), e.g. 8MiB.
    #[arg(long = "max-body", value_name = "SIZE", default_value = "8MiB")]
    pub max_body: String,
    /// Start every request from an empty KV cache. By default a request whose prompt extends
    /// the previous request's prompt and reply (a chat going on) computes only its new tokens.
    #[arg(long = "no-cache-prompt")]
    pub no_cache_prompt: bool,
    /// Tokens per batch while reading a prompt.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    pub batch_size: usize,
    /// Do not log requests on stderr.
    #[arg(long)]
    pub quiet: bool,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let max_body = hypura::plan::parse_bytes(&a.max_body)
        .with_context(|| format!("--max-body '{}'", a.max_body))?;
    let m = a.model.load(true, None)?;
    let template = chat_template(&m);
    eprintln!("hypura serve: chat format: {}", template.describe());
    let host = if a.host.contains(':') && !a.host.starts_with('[') {
        format!("[{}]", a.host) // an IPv6 address
    } else {
        a.host.clone()
    };
    let opts = ServeOptions {
        addr: format!("{host}:{}", a.port),
        reference: a.model.model.clone(),
        aliases: a.aliases.clone(),
        max_body_bytes: usize::try_from(max_body).unwrap_or(usize::MAX),
        log: !a.quiet,
        ctrl_c: true,
        worker: WorkerOptions {
            max_queue: a.max_queue,
            cache_prompt: !a.no_cache_prompt,
            batch_size: a.batch_size.max(1),
        },
    };
    let server = Server::start(m, template, opts)?;
    eprintln!(
        "hypura serve: listening on http://{} (model '{}': Ollama API under /api, OpenAI API under /v1)",
        server.addr(),
        server.info().name
    );
    if !server.addr().ip().is_loopback() {
        eprintln!(
            "hypura serve: warning: {} is reachable from other machines, and the server has no authentication",
            server.addr().ip()
        );
    }
    server.wait()?;
    Ok(())
}
