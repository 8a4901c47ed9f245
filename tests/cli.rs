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
    // The decode rate counts forward passes: the first token comes from the prompt's pass, and
    // the last one (at the token limit) needs none.
    let line = err.lines().find(|l| l.contains("generated")).expect(&err);
    let gen = &line[line.find("generated").unwrap()..];
    let num_before = |word: &str| -> usize {
        let head = &gen[..gen.find(word).expect(line)];
        head.split_whitespace().last().unwrap().parse().expect(line)
    };
    let (n_gen, n_steps) = (num_before(" tokens in"), num_before(" decode steps"));
    let want = if line.contains("MaxTokens") {
        n_gen - 1
    } else {
        n_gen
    };
    assert_eq!(n_steps, want, "{line}");
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
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", "-m", m.to_str().unwrap(), "-r", "1"];
        args.extend_from_slice(extra);
        hypura(&args)
    };
    let out = bench(&["-p", "32", "-n", "8"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let t = text(&out.stdout);
    assert!(t.contains("pp32") && t.contains("tg8"), "{t}");
    let out = bench(&["-p", "32", "-n", "8", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        j["pp_tok_s"].as_f64().unwrap() > 0.0 && j["tg_tok_s"].as_f64().unwrap() > 0.0,
        "{j}"
    );
    // -d: both tests start deep in a context (the bundled model's cache must hold d + n).
    let out = bench(&["-p", "16", "-n", "4", "-d", "40"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let t = text(&out.stdout);
    assert!(t.contains("pp16 @ d40") && t.contains("tg4 @ d40"), "{t}");
    // A depth no budget holds: a clear error that names the flags behind the context size.
    let out = bench(&["-p", "8", "-n", "4", "-d", "100000000"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let e = text(&out.stderr);
    assert!(e.contains("-d 100000000") && e.contains("too small"), "{e}");
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

fn json_of(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

#[test]
fn inspect_groups_tensors_by_role_and_shows_the_plan() {
    let gguf = fixtures_dir().join("small-moe/small-moe-Q4_K_M.gguf");
    let m = gguf.to_str().unwrap();
    let files = hypura::gguf::ModelFiles::open(&gguf).unwrap();
    let j = json_of(&hypura(&["inspect", "-m", m, "--json"]));
    assert_eq!(j["config"]["n_expert"], 4);
    assert_eq!(j["tokenizer"]["model"], "llama");
    let groups = j["tensors_by_role"].as_array().unwrap();
    let count: u64 = groups.iter().map(|g| g["tensors"].as_u64().unwrap()).sum();
    let bytes: u64 = groups.iter().map(|g| g["bytes"].as_u64().unwrap()).sum();
    assert_eq!(count as usize, files.tensors.len());
    assert_eq!(bytes, files.tensor_bytes());
    let roles: Vec<&str> = groups.iter().map(|g| g["role"].as_str().unwrap()).collect();
    for r in [
        "embedding",
        "attention",
        "norms",
        "experts",
        "router",
        "output",
    ] {
        assert!(roles.contains(&r), "{roles:?}");
    }
    let routers = groups.iter().filter(|g| g["role"] == "router");
    assert_eq!(
        routers.map(|g| g["tensors"].as_u64().unwrap()).sum::<u64>(),
        2
    );
    assert_eq!(j["plan"]["mode"], "FullResident");
    assert_eq!(j["expert_reads"]["adjacent_experts_merge"], false);
    // A budget that makes the experts stream: the plan says so (the same planner as `plan`).
    let j = json_of(&hypura(&[
        "inspect",
        "-m",
        m,
        "--json",
        "--ram-budget",
        "86MiB",
        "-c",
        "256",
    ]));
    assert_eq!(j["plan"]["mode"], "ExpertStreaming");
    let t = text(&hypura(&["inspect", "-m", m]).stdout);
    for needle in [
        "| experts | Q4_K | 5 |",
        "| router | F32 | 2 |",
        "mixture of experts: 4 experts, 2 per token",
        "mode full-resident",
    ] {
        assert!(t.contains(needle), "{needle:?} in {t}");
    }
    // An architecture hypura does not run is still described, without a plan.
    let mut w = hypura::gguf::GgufWriter::new();
    w.set(
        "general.architecture",
        hypura::gguf::Value::String("falcon".into()),
    );
    w.add_f32("token_embd.weight", &[4, 2], &[0.0; 8]);
    let odd = std::env::temp_dir().join(format!("hypura-cli-falcon-{}.gguf", std::process::id()));
    std::fs::write(&odd, w.to_bytes()).unwrap();
    let out = hypura(&["inspect", "-m", odd.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let t = text(&out.stdout);
    assert!(
        t.contains("not runnable by hypura") && t.contains("falcon"),
        "{t}"
    );
    assert!(t.contains("| embedding | F32 | 1 |"), "{t}");
    let _ = std::fs::remove_file(odd);
}

#[test]
fn iobench_reads_at_the_runtime_request_sizes() {
    let moe = fixtures_dir().join("small-moe/small-moe-Q8_0.gguf");
    let files = hypura::gguf::ModelFiles::open(&moe).unwrap();
    // Q8_0 everywhere: the gate, up and down slices are the same size.
    let gate = files.tensor("blk.0.ffn_gate_exps.weight").unwrap();
    let j = json_of(&hypura(&[
        "iobench",
        "-m",
        moe.to_str().unwrap(),
        "--read-gb",
        "0.02",
        "--json",
    ]));
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(
        rows[0]["request_bytes"].as_u64(),
        Some(gate.n_bytes / 4),
        "{j}"
    );
    assert_eq!(rows[0]["queue_depth"], 2, "the expert cache's I/O threads");
    assert!(rows[0]["what"].as_str().unwrap().contains("expert cache"));
    let read: u64 = rows.iter().map(|r| r["bytes_read"].as_u64().unwrap()).sum();
    assert!(
        read <= 20_000_000 + 2 * rows.len() as u64 * (16 << 20),
        "{read}"
    );
    for r in rows {
        assert!(r["direct_bytes_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["buffered_bytes_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(j["notes"][1]
        .as_str()
        .unwrap()
        .contains("POSIX_FADV_DONTNEED"));
    // A dense model: the stream pool's per-layer reads, on its one I/O thread.
    let dense = fixtures_dir().join("small-llama/small-llama-Q8_0.gguf");
    let j = json_of(&hypura(&[
        "iobench",
        "-m",
        dense.to_str().unwrap(),
        "--read-gb",
        "0.01",
        "--json",
    ]));
    let r0 = &j["rows"][0];
    assert!(r0["what"].as_str().unwrap().contains("stream pool"), "{j}");
    assert_eq!(r0["queue_depth"], 1);
    let t = text(
        &hypura(&[
            "iobench",
            "-m",
            dense.to_str().unwrap(),
            "--read-gb",
            "0.01",
        ])
        .stdout,
    );
    assert!(
        t.contains("| stream pool") && t.contains("direct GB/s"),
        "{t}"
    );
    // Bad input.
    let out = hypura(&["iobench", "-m", "/no/such/model.gguf"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/no/such/model.gguf"));
    let out = hypura(&["iobench", "-m", dense.to_str().unwrap(), "--read-gb", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--read-gb"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn optimize_rewrites_a_moe_file_with_the_same_logits() {
    use hypura::storage::experts::CoActivation;
    let src = fixtures_dir().join("small-moe/small-moe-Q8_0.gguf");
    let dir = std::env::temp_dir().join(format!("hypura-cli-optimize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Statistics in which experts (0, 2) and (1, 3) go together: they should become neighbours.
    let mut stats = CoActivation::new(4);
    for l in 0..2 {
        stats.observe(l, &vec![vec![0, 2]; 30]);
        stats.observe(l, &vec![vec![1, 3]; 20]);
        stats.observe(l, &vec![vec![2, 1]; 10]);
    }
    let stats_path = dir.join("stats.json");
    stats.save(&stats_path).unwrap();
    let out_path = dir.join("opt.gguf");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["optimize", "-m", src.to_str().unwrap(), "-o"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(out_path.to_str().unwrap().into());
        a.extend(["--no-learn", "--stats", stats_path.to_str().unwrap()].map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        hypura(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = run(&["--check", "4", "--place", "_exps\\.=nvme", "-c", "64"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let t = text(&out.stdout);
    for needle in [
        "experts reordered in 2 of 2 layers",
        "layer 0: new expert i = old expert [0, 2, 1, 3][i]",
        "expected expert reads per token, no cache (every used expert read): 12.00 →",
        "check: logits bit-identical",
        "optimized:",
    ] {
        assert!(t.contains(needle), "{needle:?} in {t}");
    }
    let j = json_of(&hypura(&[
        "inspect",
        "-m",
        out_path.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(j["optimized"], true);
    assert_eq!(j["expert_reads"]["adjacent_experts_merge"], true);
    assert_eq!(j["file"]["alignment"], 4096);
    // Refusals.
    let bad = |args: &[&str], needle: &str| {
        let out = hypura(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let e = text(&out.stderr);
        assert!(
            e.contains(needle) && !e.contains("panicked"),
            "{args:?}: {e}"
        );
    };
    let s = src.to_str().unwrap();
    bad(
        &["optimize", "-m", s, "-o", s, "--no-learn"],
        "overwrite the input",
    );
    let dense = fixtures_dir().join("tiny-llama-spm/tiny-llama-spm-F32.gguf");
    let o = out_path.to_str().unwrap();
    bad(
        &["optimize", "-m", dense.to_str().unwrap(), "-o", o],
        "not a mixture-of-experts",
    );
    bad(
        &["optimize", "-m", s, "-o", o, "--order", "sideways"],
        "--order",
    );
    bad(
        &[
            "optimize",
            "-m",
            s,
            "-o",
            o,
            "--stats",
            "/no/such/stats.json",
        ],
        "no co-activation statistics",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A MoE plan predicts at uniform routing until a run has saved what the router did; then the
/// plan uses that routing (and says so), unless `--no-learn`.
#[test]
fn expert_streaming_plans_learn_the_routing_earlier_runs_saw() {
    let m = fixtures_dir().join("small-moe/small-moe-Q8_0.gguf");
    let m = m.to_str().unwrap();
    let cache = std::env::temp_dir().join(format!("hypura-cli-routing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let with_cache = |args: &[&str]| {
        command(args)
            .env("XDG_CACHE_HOME", &cache)
            .output()
            .expect("run hypura")
    };
    let plan = |extra: &[&str]| {
        let mut a = vec!["plan", "-m", m, "--ram-budget", "86MiB", "-c", "256"];
        a.extend_from_slice(extra);
        let out = with_cache(&a);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let before = plan(&[]);
    assert!(before.contains("mode expert-streaming"), "{before}");
    assert!(before.contains("at uniform routing"), "{before}");
    let run = with_cache(&[
        "run",
        "-m",
        m,
        "--ram-budget",
        "86MiB",
        "-c",
        "256",
        "-p",
        "Once upon a time",
        "-n",
        "32",
        "--temp",
        "0",
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let after = plan(&[]);
    assert!(after.contains("at the observed routing"), "{after}");
    assert!(after.contains("routing earlier runs observed"), "{after}");
    assert!(plan(&["--no-learn"]).contains("at uniform routing"));
    let _ = std::fs::remove_dir_all(&cache);
}
