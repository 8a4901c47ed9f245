//! Soak: 8 clients stream at once, a few requests each, over loopback. Every response must equal
//! the same request served alone (seeded sampling), none may be lost or mixed up. Prints the
//! numbers (run with `--nocapture` to see them). `HYPURA_SOAK_ROUNDS` (default 3) sets the
//! requests per client, `HYPURA_SOAK_TOKENS` (default 24) the tokens per request.

mod http;

use std::sync::{Arc, Barrier};
use std::time::Instant;

use http::*;
use serde_json::{json, Value};

const CLIENTS: usize = 8;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Request `j` of client `c`: the three streaming/non-streaming kinds in turn, each with its own
/// prompt and seed. Returns (text, tokens generated).
fn request(s: &hypura::serve::Server, c: usize, j: usize, tokens: usize) -> (String, u64) {
    let prompt = format!("Story {c}-{j}: once");
    let seed = 1000 + 10 * c + j;
    match (c + j) % 3 {
        0 => {
            let r = post_json(
                s,
                "/api/generate",
                &json!({
                    "model": NAME, "prompt": prompt,
                    "options": { "temperature": 0.8, "seed": seed, "num_predict": tokens },
                }),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            let (text, last) = ollama_text(&r.lines());
            assert_eq!(last["done"], true);
            (text, last["eval_count"].as_u64().unwrap())
        }
        1 => {
            let r = post_json(
                s,
                "/v1/chat/completions",
                &json!({
                    "model": NAME, "stream": true, "stream_options": { "include_usage": true },
                    "messages": [{ "role": "user", "content": prompt }],
                    "temperature": 0.8, "seed": seed, "max_tokens": tokens,
                }),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            let (text, _, usage) = openai_text(&r.events());
            (
                text,
                usage.expect("usage")["completion_tokens"].as_u64().unwrap(),
            )
        }
        _ => {
            let r = post_json(
                s,
                "/api/chat",
                &json!({
                    "model": NAME, "stream": false,
                    "messages": [{ "role": "user", "content": prompt }],
                    "options": { "temperature": 0.8, "seed": seed, "num_predict": tokens },
                }),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            let v: Value = r.json();
            (
                v["message"]["content"].as_str().unwrap().to_string(),
                v["eval_count"].as_u64().unwrap(),
            )
        }
    }
}

#[test]
fn concurrent_streaming_clients_get_exactly_what_they_would_get_alone() {
    let rounds = env_usize("HYPURA_SOAK_ROUNDS", 3);
    let tokens = env_usize("HYPURA_SOAK_TOKENS", 24);
    let s = Arc::new(start(512));
    let t0 = Instant::now();
    let alone: Vec<Vec<(String, u64)>> = (0..CLIENTS)
        .map(|c| (0..rounds).map(|j| request(&s, c, j, tokens)).collect())
        .collect();
    let alone_s = t0.elapsed().as_secs_f64();
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let t1 = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (s, barrier) = (s.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                (0..rounds)
                    .map(|j| request(&s, c, j, tokens))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let together: Vec<Vec<(String, u64)>> = threads
        .into_iter()
        .map(|t| t.join().expect("a client failed"))
        .collect();
    let together_s = t1.elapsed().as_secs_f64();
    let mut generated = 0;
    for c in 0..CLIENTS {
        for j in 0..rounds {
            assert_eq!(
                together[c][j], alone[c][j],
                "client {c} request {j} differs from when served alone"
            );
            assert!(together[c][j].1 > 0);
            generated += together[c][j].1;
        }
    }
    let st = s.stats();
    let n = (CLIENTS * rounds) as u64;
    assert_eq!(
        (st.completed, st.cancelled, st.failed, st.waiting),
        (2 * n, 0, 0, 0),
        "{st:?}"
    );
    eprintln!(
        "soak: {n} requests from {CLIENTS} concurrent clients ({rounds} each, up to {tokens} tokens, \
         Ollama/OpenAI streaming and not) in {together_s:.2} s: {generated} tokens, {:.1} tok/s aggregate, \
         {:.2} requests/s, 0 errors, 0 mismatches; the same requests one at a time took {alone_s:.2} s",
        generated as f64 / together_s,
        n as f64 / together_s,
    );
}
