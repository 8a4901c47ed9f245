//! The `hypura` binary end to end: what a user types, what comes out, how bad input fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn hypura(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hypura"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env(
            "HF_HUB_CACHE",
            std::env::temp_dir().join("hypura-cli-empty-hub"),
        )
        .output()
        .expect("run hypura")
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
