//! Real clients against `hypura serve`: Python's `openai` and `ollama` packages
//! (tests/clients/check_clients.py) and curl. Without them the tests say loudly that they
//! skipped, unless `HYPURA_REQUIRE_CLIENTS=1` (set by .ci/run), which makes a missing client a
//! failure.

mod http;

use std::path::Path;
use std::process::{Command, Output};

use http::*;

fn required() -> bool {
    std::env::var("HYPURA_REQUIRE_CLIENTS").is_ok_and(|v| v == "1")
}

/// Whether `cmd args` runs and succeeds; if not, fails (required) or says that the test skipped.
fn available(what: &str, cmd: &str, args: &[&str]) -> bool {
    let ok = Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !required(),
            "HYPURA_REQUIRE_CLIENTS=1 but {what} is missing ({cmd} {args:?} failed)"
        );
        eprintln!(
            "\n*** SKIPPED: {what} is not installed (`{cmd} {}` failed); \
             install it to run this test (python3 -m pip install openai ollama) ***\n",
            args.join(" ")
        );
    }
    ok
}

/// Runs a client on this machine's loopback, with no proxy in the way.
fn client(cmd: &str, args: &[&str]) -> Output {
    let mut c = Command::new(cmd);
    c.args(args);
    for v in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        c.env_remove(v);
    }
    c.env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    c.output().unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn python_openai_and_ollama_clients() {
    if !available(
        "the Python packages openai and ollama",
        "python3",
        &["-c", "import openai, ollama"],
    ) {
        return;
    }
    let s = start(512);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/check_clients.py");
    let host = format!("http://{}", s.addr());
    let out = client("python3", &[script.to_str().unwrap(), &host, NAME]);
    assert!(
        out.status.success(),
        "check_clients.py failed\nstdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("openai client: ok") && stdout.contains("ollama client: ok"),
        "{stdout}"
    );
}

#[test]
fn curl_as_in_the_readme() {
    if !available("curl", "curl", &["--version"]) {
        return;
    }
    let s = start(512);
    let base = format!("http://{}", s.addr());
    // Ollama: streamed NDJSON by default; curl's -d sends a form content type, which is fine.
    let body = format!(r#"{{"model": "{NAME}", "prompt": "Hi", "options": {{"num_predict": 6}}}}"#);
    let out = client(
        "curl",
        &["-sS", &format!("{base}/api/generate"), "-d", &body],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.last().unwrap()["done"], true, "{lines:?}");
    // OpenAI: server-sent events.
    let body =
        r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": true}"#;
    let url = format!("{base}/v1/chat/completions");
    let out = client(
        "curl",
        &[
            "-sS",
            "-N",
            &url,
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
    );
    let sse = text(&out.stdout);
    assert!(
        sse.starts_with("data: {") && sse.trim_end().ends_with("data: [DONE]"),
        "{sse}"
    );
    // A malformed body: 400.
    let out = client(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
            "-d",
            "{bad",
        ],
    );
    assert_eq!(text(&out.stdout), "400");
}
