//! `hypura::serve` end to end over loopback HTTP: every endpoint, streaming and not, the error
//! statuses, a client that hangs up mid-stream, and prompt-cache reuse. The soak test is in
//! tests/serve_soak.rs.

mod http;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

use http::*;
use serde_json::{json, Value};

#[test]
fn info_endpoints_describe_the_one_model() {
    let s = start(256);
    let r = get(&s, "/");
    assert_eq!((r.status, r.body.as_str()), (200, "Ollama is running"));
    let v = get(&s, "/api/version").json();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let tags = get(&s, "/api/tags").json();
    let m = &tags["models"][0];
    assert_eq!(m["name"], format!("{NAME}:latest"));
    assert_eq!(m["details"]["format"], "gguf");
    assert_eq!(m["details"]["family"], "llama");
    assert_eq!(m["details"]["quantization_level"], "Q8_0");
    assert_eq!(m["size"], std::fs::metadata(bundled()).unwrap().len());
    assert_eq!(
        get(&s, "/api/ps").json()["models"][0]["context_length"],
        256
    );
    let show = post_json(&s, "/api/show", &json!({ "model": NAME }));
    assert_eq!(show.status, 200);
    let show = show.json();
    assert!(show["template"]
        .as_str()
        .unwrap()
        .contains("<|start_header_id|>"));
    assert_eq!(show["model_info"]["general.architecture"], "llama");
    assert_eq!(show["model_info"]["llama.block_count"], 4);
    // The older field name `name` works too.
    assert_eq!(
        post_json(
            &s,
            "/api/show",
            &json!({ "name": format!("{NAME}:latest") })
        )
        .status,
        200
    );
    let models = get(&s, "/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], NAME);
    assert_eq!(get(&s, &format!("/v1/models/{NAME}")).json()["id"], NAME);
    assert_eq!(get(&s, "/v1/models/other").status, 404);
}

fn greedy(extra: Value) -> Value {
    let mut o = json!({ "temperature": 0 });
    if let (Some(o), Some(e)) = (o.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    o
}

#[test]
fn ollama_generate_streams_the_same_text_it_returns_at_once() {
    let s = start(256);
    let body = |stream: bool| {
        json!({
            "model": NAME, "prompt": "Once upon a time", "stream": stream,
            "options": greedy(json!({ "num_predict": 12 })),
        })
    };
    let r = post_json(&s, "/api/generate", &body(true));
    assert_eq!(r.status, 200);
    assert!(
        r.content_type.starts_with("application/x-ndjson"),
        "{}",
        r.content_type
    );
    let lines = r.lines();
    assert!(lines.len() >= 2, "{lines:?}");
    assert!(lines[..lines.len() - 1]
        .iter()
        .all(|l| l["done"] == false && l["model"] == format!("{NAME}:latest")));
    let (text, last) = ollama_text(&lines);
    assert_eq!(last["done"], true);
    let n = last["eval_count"].as_u64().unwrap();
    match last["done_reason"].as_str().unwrap() {
        "length" => assert_eq!(n, 12),
        "stop" => assert!(n < 12),
        other => panic!("done_reason {other}"),
    }
    let n_prompt = last["prompt_eval_count"].as_u64().unwrap();
    assert!(n_prompt > 0);
    for k in [
        "total_duration",
        "prompt_eval_duration",
        "eval_duration",
        "load_duration",
    ] {
        assert!(last[k].is_u64(), "{k}: {last}");
    }
    assert!(last["created_at"].as_str().unwrap().ends_with('Z'));
    // The context is the prompt and the reply, as tokens.
    assert_eq!(
        last["context"].as_array().unwrap().len() as u64,
        n_prompt + n
    );
    let one = post_json(&s, "/api/generate", &body(false)).json();
    assert_eq!(one["response"].as_str().unwrap(), text);
    assert_eq!(one["done"], true);
    assert_eq!(one["eval_count"], n);
    // An empty prompt only "loads" the model.
    let load = post_json(&s, "/api/generate", &json!({ "model": NAME })).json();
    assert_eq!(
        (load["done"].clone(), load["done_reason"].clone()),
        (json!(true), json!("load"))
    );
}

#[test]
fn ollama_chat_streams_and_answers_with_the_assistant_role() {
    let s = start(256);
    let body = |stream: bool| {
        json!({
            "model": NAME, "stream": stream,
            "messages": [{ "role": "system", "content": "Be brief." }, { "role": "user", "content": "Hi" }],
            "options": greedy(json!({ "num_predict": 10 })),
        })
    };
    let lines = post_json(&s, "/api/chat", &body(true)).lines();
    assert!(
        lines.iter().all(|l| l["message"]["role"] == "assistant"),
        "{lines:?}"
    );
    let (text, last) = ollama_text(&lines);
    assert_eq!(last["done"], true);
    assert!(!text.is_empty());
    let one = post_json(&s, "/api/chat", &body(false)).json();
    assert_eq!(one["message"]["content"].as_str().unwrap(), text);
    assert_eq!(one["eval_count"], last["eval_count"]);
    // The prompt is the template's rendering: more tokens than the two messages' text.
    assert!(one["prompt_eval_count"].as_u64().unwrap() > 10);
}

#[test]
fn openai_chat_streams_chunks_then_done_with_usage() {
    let s = start(256);
    let body = |stream: bool| {
        json!({
            "model": NAME, "stream": stream, "temperature": 0, "max_tokens": 9,
            "stream_options": { "include_usage": true },
            "messages": [{ "role": "user", "content": [{ "type": "text", "text": "Hi" }] }],
        })
    };
    let one = post_json(&s, "/v1/chat/completions", &body(false));
    assert_eq!(one.status, 200);
    let one = one.json();
    assert_eq!(one["object"], "chat.completion");
    assert!(one["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let c = &one["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    let u = &one["usage"];
    let (p, n) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + n);
    assert_eq!(c["finish_reason"], if n == 9 { "length" } else { "stop" });
    let r = post_json(&s, "/v1/chat/completions", &body(true));
    assert!(
        r.content_type.starts_with("text/event-stream"),
        "{}",
        r.content_type
    );
    let events = r.events();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert!(first["usage"].is_null());
    let (text, finish, usage) = openai_text(&events);
    assert_eq!(text, c["message"]["content"].as_str().unwrap());
    assert_eq!(finish, c["finish_reason"].as_str().unwrap());
    assert_eq!(usage.as_ref(), Some(u));
    // Without include_usage there is no usage chunk.
    let mut b = body(true);
    b["stream_options"] = json!(null);
    assert!(
        openai_text(&post_json(&s, "/v1/chat/completions", &b).events())
            .2
            .is_none()
    );
}

#[test]
fn openai_completions_default_to_16_tokens_and_echo() {
    let s = start(256);
    let one = post_json(
        &s,
        "/v1/completions",
        &json!({ "prompt": "Once", "temperature": 0 }),
    )
    .json();
    assert_eq!(one["object"], "text_completion");
    let n = one["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        n <= 16 && (n == 16) == (one["choices"][0]["finish_reason"] == "length"),
        "{one}"
    );
    let text = one["choices"][0]["text"].as_str().unwrap().to_string();
    let echo = post_json(
        &s,
        "/v1/completions",
        &json!({ "prompt": ["Once"], "temperature": 0, "echo": true }),
    )
    .json();
    assert_eq!(
        echo["choices"][0]["text"].as_str().unwrap(),
        format!("Once{text}")
    );
    let r = post_json(
        &s,
        "/v1/completions",
        &json!({ "prompt": "Once", "temperature": 0, "stream": true }),
    );
    let (streamed, finish, _) = openai_text(&r.events());
    assert_eq!(
        (streamed, finish.as_str()),
        (text, one["choices"][0]["finish_reason"].as_str().unwrap())
    );
    // Token ids work as a prompt.
    let ids = post_json(
        &s,
        "/v1/completions",
        &json!({ "prompt": [1, 2, 3], "max_tokens": 2 }),
    );
    assert_eq!(ids.status, 200);
    assert_eq!(ids.json()["usage"]["prompt_tokens"], 3);
}

#[test]
fn stop_strings_end_the_reply_before_them() {
    let s = start(256);
    let ask = |stop: Option<&str>| {
        let mut o = greedy(json!({ "num_predict": 24 }));
        if let Some(st) = stop {
            o["stop"] = json!([st]);
        }
        post_json(
            &s,
            "/api/generate",
            &json!({ "model": NAME, "prompt": "Hello", "stream": false, "options": o }),
        )
        .json()
    };
    let full = ask(None)["response"].as_str().unwrap().to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 12, "{full:?}");
    let stop: String = chars[6..9].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let got = ask(Some(&stop));
    assert_eq!(got["response"].as_str().unwrap(), cut);
    assert_eq!(got["done_reason"], "stop");
    let oa = post_json(
        &s,
        "/v1/completions",
        &json!({
            "prompt": "Hello", "temperature": 0, "max_tokens": 24, "stop": stop, "stream": true,
        }),
    );
    let (text, finish, _) = openai_text(&oa.events());
    assert_eq!((text.as_str(), finish.as_str()), (cut, "stop"));
}

#[test]
fn a_seed_makes_sampling_reproducible() {
    let s = start(256);
    let ask = |seed: u64| {
        let b = json!({ "prompt": "Hi", "max_tokens": 20, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                        "min_p": 0.0, "seed": seed });
        post_json(&s, "/v1/completions", &b).json()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let a = ask(7);
    assert_eq!(a, ask(7));
    assert!(
        [8, 9, 10].iter().any(|&seed| ask(seed) != a),
        "different seeds, same text {a:?}"
    );
}

#[test]
fn bad_requests_get_json_errors_and_the_server_keeps_serving() {
    let s = start_with(&bundled(), 64, |o| o.max_body_bytes = 4096);
    let check = |path: &str, body: &str, status: u16| {
        let r = post(&s, path, body);
        assert_eq!(r.status, status, "{path} {body:?}: {}", r.body);
        let v = r.json();
        let msg = if path.starts_with("/v1") {
            &v["error"]["message"]
        } else {
            &v["error"]
        };
        assert!(msg.as_str().is_some_and(|m| !m.is_empty()), "{path}: {v}");
        msg.as_str().unwrap().to_string()
    };
    for path in [
        "/api/generate",
        "/api/chat",
        "/api/show",
        "/v1/chat/completions",
        "/v1/completions",
    ] {
        for body in [
            "{bad",
            "",
            "null",
            "[]",
            "\"x\"",
            "{\"messages\": 3, \"prompt\": 3, \"model\": 3}",
        ] {
            check(path, body, 400);
        }
    }
    check(
        "/api/generate",
        r#"{"prompt": "x", "options": {"temperature": "hot"}}"#,
        400,
    );
    check(
        "/api/generate",
        r#"{"prompt": "x", "options": {"temperature": 1e999}}"#,
        400,
    );
    check(
        "/v1/chat/completions",
        r#"{"messages": [{"role": 1}]}"#,
        400,
    );
    check("/v1/chat/completions", r#"{"messages": []}"#, 400);
    check(
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "x"}], "n": 2}"#,
        400,
    );
    check(
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
        400,
    );
    check(
        "/api/chat",
        r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{}]}"#,
        400,
    );
    check(
        "/api/generate",
        r#"{"prompt": "x", "images": ["aGk="]}"#,
        400,
    );
    check("/v1/completions", r#"{"prompt": [999999]}"#, 400);
    check(
        "/v1/completions",
        r#"{"prompt": "x", "response_format": {"type": "json_object"}}"#,
        400,
    );
    // Unknown model: 404 in each API's shape.
    let e = check(
        "/api/chat",
        r#"{"model": "llama3:8b", "messages": [{"role": "user", "content": "x"}]}"#,
        404,
    );
    assert!(e.contains("llama3:8b") && e.contains(NAME), "{e}");
    let r = post(
        &s,
        "/v1/chat/completions",
        r#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}"#,
    );
    assert_eq!(
        (r.status, r.json()["error"]["type"].clone()),
        (404, json!("not_found_error"))
    );
    // More prompt tokens than the context (64).
    let long = "word ".repeat(200);
    let e = check("/api/generate", &json!({ "prompt": long }).to_string(), 400);
    assert!(e.contains("context"), "{e}");
    let e = check(
        "/v1/chat/completions",
        &json!({ "messages": [{ "role": "user", "content": long }] }).to_string(),
        400,
    );
    assert!(e.contains("context"), "{e}");
    // Bodies over the limit (4 KiB here).
    let big = json!({ "prompt": "x".repeat(8000) }).to_string();
    assert_eq!(post(&s, "/api/generate", &big).status, 413);
    assert_eq!(post(&s, "/v1/completions", &big).status, 413);
    // Unknown routes and methods.
    assert_eq!(get(&s, "/api/pull").status, 404);
    assert_eq!(get(&s, "/api/generate").status, 405);
    // Bytes that are not UTF-8.
    let mut sock = TcpStream::connect(s.addr()).unwrap();
    let body = b"{\"prompt\": \"\xff\xfe\"}";
    write!(
        sock,
        "POST /api/generate HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    sock.write_all(body).unwrap();
    let mut status = String::new();
    BufReader::new(sock).read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    // And it still serves.
    let ok = post_json(
        &s,
        "/api/generate",
        &json!({ "prompt": "Hi", "stream": false, "options": { "num_predict": 3 } }),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(s.stats().failed, 0);
}

/// Sends a streaming request on a raw socket, reads until the first piece of the reply arrives,
/// and hangs up.
fn hang_up_after_first_chunk(addr: std::net::SocketAddr, path: &str, body: &Value) {
    let body = body.to_string();
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    write!(sock, "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut r = BufReader::new(sock);
    let mut line = String::new();
    // Headers, then the first chunk's size line and data.
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.contains("\"done\":false") || line.starts_with("data: {") {
            break;
        }
        assert!(!line.is_empty(), "connection closed before the first chunk");
    }
    drop(r); // hang up mid-stream
}

#[test]
fn a_client_that_hangs_up_stops_its_generation_and_the_next_request_runs() {
    let s = start(2048);
    for (path, body) in [
        (
            "/api/generate",
            json!({ "prompt": "Hi", "options": { "temperature": 0 } }),
        ),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "user", "content": "Hi" }], "stream": true }),
        ),
    ] {
        let before = s.stats();
        hang_up_after_first_chunk(s.addr(), path, &body);
        // The next request is served in full.
        let r = post_json(
            &s,
            "/api/generate",
            &json!({ "prompt": "Hello", "stream": false, "options": { "num_predict": 5 } }),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let next = r.json()["eval_count"].as_u64().unwrap();
        let after = s.stats();
        assert_eq!(after.cancelled, before.cancelled + 1, "{after:?}");
        assert_eq!(after.completed, before.completed + 1, "{after:?}");
        // The abandoned reply stopped early: it would have run until the context was full.
        let abandoned = after.generated_tokens - before.generated_tokens - next;
        assert!(
            abandoned < 1000,
            "the abandoned request generated {abandoned} tokens"
        );
    }
}

#[test]
fn a_prompt_that_extends_the_last_reply_reuses_the_cache() {
    let with = start(512);
    let without = start_with(&bundled(), 512, |o| o.worker.cache_prompt = false);
    let run = |s: &hypura::serve::Server, body: Value| post_json(s, "/api/generate", &body).json();
    let first = json!({ "prompt": "Once upon a time", "raw": true, "stream": false, "options": greedy(json!({ "num_predict": 6 })) });
    let a = run(&with, first.clone());
    let a2 = run(&without, first);
    assert_eq!(
        (&a["response"], &a["context"]),
        (&a2["response"], &a2["context"])
    );
    // Continue from the returned context, as Ollama clients do.
    let next = json!({ "prompt": " and then", "raw": true, "stream": false, "context": a["context"],
                       "options": greedy(json!({ "num_predict": 6 })) });
    let b = run(&with, next.clone());
    let c = run(&without, next);
    let n_context = a["context"].as_array().unwrap().len() as u64;
    let evaluated = b["prompt_eval_count"].as_u64().unwrap();
    assert!(evaluated < c["prompt_eval_count"].as_u64().unwrap(), "{b}");
    // All but the reply's last token (never fed back) came from the cache.
    assert_eq!(
        c["prompt_eval_count"].as_u64().unwrap() - evaluated,
        n_context - 1
    );
    assert_eq!(
        b["response"], c["response"],
        "reusing the cache changed the reply"
    );
}

#[test]
fn a_queued_request_whose_client_left_never_runs() {
    let s = start(2048);
    // A runs (its first piece has arrived) ...
    let body =
        json!({ "prompt": "Hi", "options": { "temperature": 0, "num_predict": 200 } }).to_string();
    let mut a = TcpStream::connect(s.addr()).unwrap();
    write!(a, "POST /api/generate HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut a = BufReader::new(a);
    let mut line = String::new();
    while !line.contains("\"done\":false") {
        line.clear();
        assert!(a.read_line(&mut line).unwrap() > 0, "A closed early");
    }
    // ... while B is queued behind it, and its client hangs up.
    let mut b = TcpStream::connect(s.addr()).unwrap();
    let body_b = json!({ "prompt": "Queued", "options": { "num_predict": 400 } }).to_string();
    write!(
        b,
        "POST /api/generate HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body_b}",
        body_b.len()
    )
    .unwrap();
    for _ in 0..1000 {
        if s.stats().waiting == 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(s.stats().waiting, 1, "B was not queued");
    drop(b);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut a, &mut rest).unwrap();
    let last = rest
        .lines()
        .rfind(|l| l.contains("\"done\":true"))
        .expect("A's last line")
        .to_string();
    let a_tokens = serde_json::from_str::<Value>(&last).unwrap()["eval_count"]
        .as_u64()
        .unwrap();
    let c = post_json(
        &s,
        "/api/generate",
        &json!({ "prompt": "C", "stream": false, "options": { "num_predict": 3 } }),
    )
    .json();
    let st = s.stats();
    assert_eq!((st.completed, st.cancelled), (2, 1), "{st:?}");
    let b_tokens = st.generated_tokens - a_tokens - c["eval_count"].as_u64().unwrap();
    assert!(b_tokens <= 1, "B generated {b_tokens} tokens for nobody");
}

#[test]
fn shutdown_ends_the_running_reply_with_an_error_and_returns() {
    let s = start(2048);
    let addr = s.addr();
    let body =
        json!({ "prompt": "Hi", "options": { "temperature": 0, "num_predict": 1500 } }).to_string();
    let mut sock = TcpStream::connect(addr).unwrap();
    write!(sock, "POST /api/generate HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut r = BufReader::new(sock);
    let mut line = String::new();
    while !line.contains("\"done\":false") {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "closed early");
    }
    s.shutdown();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut r, &mut rest).unwrap();
    assert!(rest.contains("the server is shutting down"), "{rest}");
    assert!(
        TcpStream::connect(addr).is_err(),
        "still accepting connections"
    );
}
