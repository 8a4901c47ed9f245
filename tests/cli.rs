//! The `hypura` binary end to end: what a user types, what comes out, how bad input fails.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hypura"));
    c.args(args).env("HF_HUB_OFFLINE", "1").env(
        "HF_HUB_CACHE",
        std::env::temp_dir().join("hypura-cli-empty-hub"),
    );
    c
}

fn hypura(args: &[&str]) -> Output {
    command(args).output().expect("run hypura")
}

/// Runs hypura with `input` on its stdin (then end of input).
fn hypura_with_stdin(args: &[&str], input: &str) -> Output {
    let mut child = command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hypura");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    child.wait_with_output().expect("wait for hypura")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/hypura-tiny-random-Q8_0.gguf")
}

#[test]
fn run_streams_text_to_stdout_and_timings_to_stderr() {
    let m = bundled();
    let out = hypura(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "Hello",
        "-n",
        "12",
        "--temp",
        "0",
        "-t",
        "2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).trim().is_empty());
    let err = text(&out.stderr);
    assert!(err.contains("tok/s") && err.contains("loaded in"), "{err}");
    assert!(
        !text(&out.stdout).contains("tok/s"),
        "stdout carries only the generated text"
    );
    // Greedy is deterministic.
    let again = hypura(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "Hello",
        "-n",
        "12",
        "--temp",
        "0",
    ]);
    assert_eq!(out.stdout, again.stdout);
}

#[test]
fn run_without_a_model_falls_back_to_the_bundled_one_offline() {
    let out = hypura(&["run", "-p", "Hi", "-n", "4", "--seed", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("bundled model") && err.contains("random weights"),
        "{err}"
    );
}

#[test]
fn tokenize_prints_llama_cpp_ids() {
    let gguf = fixtures_dir().join("small-qwen2/small-qwen2-F32.gguf");
    let r = reference(&gguf);
    for case in r["tokenize"].as_array().unwrap() {
        let t = case["text"].as_str().unwrap();
        let mut args = vec!["tokenize", "-m", gguf.to_str().unwrap(), "-p", t];
        if !case["add_bos"].as_bool().unwrap() {
            args.push("--no-bos");
        }
        if !case["special"].as_bool().unwrap() {
            args.push("--no-parse-special");
        }
        let out = hypura(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let got: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got, ids(&case["ids"]), "{t:?}");
    }
}

#[test]
fn logits_writes_the_forward_pass() {
    let gguf = fixtures_dir().join("tiny-llama-spm/tiny-llama-spm-F32.gguf");
    let r = reference(&gguf);
    let prompt = ids(&r["fixed_prompt"]["ids"]);
    let list = prompt
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out_path =
        std::env::temp_dir().join(format!("hypura-cli-logits-{}.npy", std::process::id()));
    let out = hypura(&[
        "logits",
        "-m",
        gguf.to_str().unwrap(),
        "--tokens",
        &list,
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ours = read_npy_2d(&out_path);
    let c = compare(&ours, &read_npy_2d(&sibling(&gguf, "ref.logits.npy")));
    assert_close("hypura logits", &gguf, &c);
    let _ = std::fs::remove_file(out_path);
}

#[test]
fn perplexity_json_matches_llama_perplexity() {
    let gguf = fixtures_dir().join("tiny-qwen2/tiny-qwen2-F32.gguf");
    let want = reference(&gguf)["perplexity"]["ppl"].as_f64().unwrap();
    let f = fixtures_dir().join("text.txt");
    let out = hypura(&[
        "perplexity",
        "-m",
        gguf.to_str().unwrap(),
        "-f",
        f.to_str().unwrap(),
        "-c",
        "128",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got = j["ppl"].as_f64().unwrap();
    assert!((got - want).abs() / want < 0.01, "{got} vs {want}");
    assert_eq!(
        j["tokens_scored"].as_u64(),
        reference(&gguf)["perplexity"]["tokens_scored"].as_u64()
    );
}

#[test]
fn bench_prints_a_table_and_json() {
    let m = bundled();
    let out = hypura(&[
        "bench",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "32",
        "-n",
        "8",
        "-r",
        "1",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let t = text(&out.stdout);
    assert!(t.contains("pp32") && t.contains("tg8"), "{t}");
    let out = hypura(&[
        "bench",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "32",
        "-n",
        "8",
        "-r",
        "1",
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        j["pp_tok_s"].as_f64().unwrap() > 0.0 && j["tg_tok_s"].as_f64().unwrap() > 0.0,
        "{j}"
    );
}

#[test]
fn bad_input_gets_a_clear_error_not_a_panic() {
    let dir = std::env::temp_dir().join(format!("hypura-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |args: &[&str], needles: &[&str]| {
        let out = hypura(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: {err:?} should mention {n:?}");
        }
    };
    check(
        &["run", "-m", "/no/such/file.gguf"],
        &["/no/such/file.gguf", "no such file"],
    );
    let full = std::fs::read(bundled()).unwrap();
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    check(
        &["run", "-m", truncated.to_str().unwrap()],
        &["truncated.gguf", "truncated"],
    );
    let not_gguf = dir.join("notes.gguf");
    std::fs::write(&not_gguf, "just some text, not a model").unwrap();
    check(
        &["run", "-m", not_gguf.to_str().unwrap()],
        &["notes.gguf", "not a GGUF file"],
    );
    let m = bundled();
    let long = "word ".repeat(400);
    check(
        &["run", "-m", m.to_str().unwrap(), "-c", "64", "-p", &long],
        &["context"],
    );
    check(
        &[
            "logits",
            "-m",
            m.to_str().unwrap(),
            "--tokens",
            "1,999999",
            "--out",
            "/tmp/x.npy",
        ],
        &["999999", "vocabulary"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn qwen_fixture() -> PathBuf {
    common::fixtures_dir().join("small-qwen2/small-qwen2-Q8_0.gguf")
}

/// The numbers of each reply's stderr line: (generated, prompt tokens, context used).
fn reply_stats(err: &str) -> Vec<(usize, usize, usize)> {
    let num = |s: &str, after: &str| -> usize {
        let rest = &s[s.find(after).unwrap() + after.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    err.lines()
        .filter(|l| l.contains(" tokens in ") && l.contains("context "))
        .map(|l| (num(l, "hypura: "), num(l, "prompt "), num(l, "context ")))
        .collect()
}

#[test]
fn interactive_chat_keeps_the_cache_across_turns() {
    let m = qwen_fixture();
    let args = [
        "run",
        "-m",
        m.to_str().unwrap(),
        "-i",
        "--temp",
        "0",
        "-n",
        "8",
        "-c",
        "512",
    ];
    let out = hypura_with_stdin(&args, "Hi\nHow are you?\n/reset\nHi\n");
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("the file's chat template") && err.contains("conversation cleared"),
        "{err}"
    );
    let replies: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    let st = reply_stats(&err);
    assert_eq!((replies.len(), st.len()), (3, 3), "{err}\n{replies:?}");
    assert!(err.matches("tok/s").count() >= 3);
    let ((n1, p1, c1), (n2, p2, c2), (n3, p3, c3)) = (st[0], st[1], st[2]);
    assert_eq!(c1, p1 + n1);
    // The second turn fed only its own tokens after the cached first turn.
    assert_eq!(c2, c1 + p2 + n2, "{err}");
    // After /reset the conversation starts afresh: the same first turn, the same greedy reply.
    assert_eq!((n3, p3, c3), (n1, p1, c1));
    assert_eq!(replies[2], replies[0]);
}

#[test]
fn interactive_chat_when_the_context_fills_up() {
    let m = qwen_fixture();
    let m = m.to_str().unwrap();
    // A message that no longer fits: hypura asks, and starts over on yes.
    let args = [
        "run", "-m", m, "-i", "--temp", "0", "-n", "100", "-c", "128",
    ];
    let out = hypura_with_stdin(&args, "Hi\nTell me more about it please\ny\n");
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("the context is full")
            && err.contains("Start a new conversation with it? [Y/n]"),
        "{err}"
    );
    assert!(
        err.contains("new conversation (the earlier turns are forgotten)"),
        "{err}"
    );
    assert_eq!(reply_stats(&err).len(), 2, "{err}");
    // On no (here: end of input) the message is not sent.
    let out = hypura_with_stdin(&args, "Hi\nTell me more about it please\n");
    let err = text(&out.stderr);
    assert!(out.status.success() && err.contains("not sent"), "{err}");
    assert_eq!(reply_stats(&err).len(), 1, "{err}");
    // A message larger than the whole context is refused; a reply that fills the context is
    // cut, and the next message starts a new conversation.
    let args = ["run", "-m", m, "-i", "--temp", "0", "-c", "64"];
    let long = "word ".repeat(100);
    let out = hypura_with_stdin(&args, &format!("{long}\nHi\nnext\n"));
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("more than the context of 64 tokens; it was not sent"),
        "{err}"
    );
    assert!(err.contains("so the reply was cut"), "{err}");
    assert!(err.contains("new conversation"), "{err}");
    let st = reply_stats(&err);
    assert_eq!(st.len(), 2, "{err}");
    assert_eq!(
        st[0].2, 64,
        "the first reply ran until the context was full: {err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn serve_listens_answers_and_logs_one_line_per_request() {
    let m = bundled();
    let mut child = command(&[
        "serve",
        "-m",
        m.to_str().unwrap(),
        "--port",
        "0",
        "-c",
        "128",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start hypura serve");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let addr = loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("hypura serve ended before listening: {seen}");
        }
        seen += &line;
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    assert!(
        addr.starts_with("127.0.0.1:"),
        "loopback by default: {addr}"
    );
    let mut sock = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        sock,
        "GET /api/tags HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    sock.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.contains("hypura-tiny-random-Q8_0:latest"),
        "{resp}"
    );
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("GET /api/tags 200"), "{line:?}");
    child.kill().unwrap();
    let _ = child.wait();
}
