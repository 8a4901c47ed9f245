//! Chat templates: real Llama-3 and Qwen2.5 templates render the formats their model cards
//! document; the fixtures pick the right template; rendered prompts tokenize with one BOS.

mod common;

use std::path::{Path, PathBuf};

use common::fixtures_dir;
use hypura::chat::{encode_prompt, Builtin, ChatTemplate, Message, TemplateSource};
use hypura::gguf::{Metadata, ModelFiles, Value};
use hypura::tokenizer::Tokenizer;

fn template_text(name: &str) -> String {
    let p = fixtures_dir().join("chat-templates").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn gguf_template(name: &str, bos: &str, eos: &str) -> ChatTemplate {
    ChatTemplate::new(&template_text(name), bos, eos, TemplateSource::Gguf).unwrap()
}

fn m(role: &str, content: &str) -> Message {
    Message::new(role, content)
}

fn conversation() -> Vec<Message> {
    vec![
        m("system", "You are terse."),
        m("user", "Hi!"),
        m("assistant", "Hello."),
        m("user", "What is 2+2?"),
    ]
}

#[test]
fn real_llama3_template_renders_the_documented_format() {
    let t = gguf_template(
        "llama3-instruct.jinja",
        "<|begin_of_text|>",
        "<|end_of_text|>",
    );
    let got = t.render(&conversation(), true).unwrap();
    assert_eq!(
        got,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    // Without the generation prompt the text ends after the last message.
    let got = t.render(&conversation()[1..2], false).unwrap();
    assert_eq!(
        got,
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    );
    // The built-in Llama-3 format is this template.
    let b = ChatTemplate::new(
        Builtin::Llama3.source(),
        "<|begin_of_text|>",
        "<|end_of_text|>",
        TemplateSource::Builtin(Builtin::Llama3),
    )
    .unwrap();
    assert_eq!(
        b.render(&conversation(), true).unwrap(),
        t.render(&conversation(), true).unwrap()
    );
}

#[test]
fn real_qwen25_template_renders_chatml_with_its_default_system_prompt() {
    let t = gguf_template("qwen2.5-instruct.jinja", "", "<|im_end|>");
    let got = t.render(&[m("user", "Hi!")], true).unwrap();
    assert_eq!(
        got,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
    let got = t.render(&conversation(), true).unwrap();
    assert_eq!(
        got,
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // Tool results are wrapped in one user turn.
    let msgs = [
        m("user", "Weather?"),
        m("assistant", "Checking."),
        m("tool", "sunny"),
        m("tool", "22C"),
    ];
    let got = t.render(&msgs, false).unwrap();
    assert!(
        got.ends_with(
            "<|im_start|>assistant\nChecking.<|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n\
             </tool_response>\n<tool_response>\n22C\n</tool_response><|im_end|>\n"
        ),
        "{got:?}"
    );
}

#[test]
fn hf_template_features_work() {
    // What Llama-3.1+ and Mistral templates use: namespace, Python string methods, loop
    // controls, strftime_now, raise_exception, whitespace control.
    let src = r#"{{- bos_token }}
{%- set ns = namespace(n=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% continue %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
    {{- '[' ~ ns.n ~ '] ' ~ message.content.strip().upper() ~ ('!' if message.content.endswith('?') else '') }}
    {%- if message.content.startswith('stop') %}{% break %}{% endif %}
{%- endfor %}
{%- if strftime_now('%Y')|length != 4 %}{{ raise_exception('bad year') }}{% endif %}
{%- if messages|length > 3 %}{{ raise_exception('Only 3 messages, got ' ~ messages|length) }}{% endif %}"#;
    let t = ChatTemplate::new(src, "<s>", "</s>", TemplateSource::Gguf).unwrap();
    let got = t
        .render(
            &[
                m("system", "x"),
                m("user", "  why? "),
                m("user", "stop now"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(got, "<s>[1] WHY?[2] STOP NOW");
    let e = t
        .render(&vec![m("user", "a"); 4], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Only 3 messages, got 4"), "{e}");
    assert!(ChatTemplate::new("{% for %}", "", "", TemplateSource::Gguf).is_err());
}

fn fixture(rel: &str) -> PathBuf {
    fixtures_dir().join(rel)
}

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/hypura-tiny-random-Q8_0.gguf")
}

fn open(path: &Path) -> (ModelFiles, Tokenizer) {
    let files = ModelFiles::open(path).unwrap();
    let tok = Tokenizer::from_metadata(&files.metadata).unwrap();
    (files, tok)
}

#[test]
fn each_fixture_gets_its_template() {
    let cases = [
        (bundled(), TemplateSource::Builtin(Builtin::Llama3)),
        (
            fixture("small-llama/small-llama-Q8_0.gguf"),
            TemplateSource::Builtin(Builtin::Llama3),
        ),
        (
            fixture("small-qwen2/small-qwen2-Q8_0.gguf"),
            TemplateSource::Gguf,
        ),
        (
            fixture("tiny-llama-spm/tiny-llama-spm-F32.gguf"),
            TemplateSource::Builtin(Builtin::Llama2),
        ),
    ];
    for (path, want) in cases {
        let (files, tok) = open(&path);
        let t = ChatTemplate::for_model(&files.metadata, &tok).unwrap();
        assert_eq!(t.source(), want, "{}", path.display());
    }
}

#[test]
fn rendered_prompts_tokenize_with_special_tokens_and_one_bos() {
    // Llama-3 vocabulary, built-in Llama-3 format (it writes <|begin_of_text|> itself).
    let (files, tok) = open(&bundled());
    let t = ChatTemplate::for_model(&files.metadata, &tok).unwrap();
    let ids = encode_prompt(&tok, &t.render(&[m("user", "Hi")], true).unwrap()).unwrap();
    let bos = tok.bos_id().unwrap();
    let id = |s: &str| tok.inner().token_to_id(s).unwrap();
    assert_eq!(ids[0], bos);
    assert_ne!(ids[1], bos, "one BOS: {ids:?}");
    assert_eq!(ids[1], id("<|start_header_id|>"));
    assert_eq!(ids.iter().filter(|&&i| i == id("<|eot_id|>")).count(), 1);
    assert_eq!(tok.decode(&ids).unwrap(), "user\n\nHiassistant\n\n");
    // SentencePiece vocabulary, built-in Llama-2 format (writes <s> before each [INST]).
    let (files, tok) = open(&fixture("tiny-llama-spm/tiny-llama-spm-F32.gguf"));
    let t = ChatTemplate::for_model(&files.metadata, &tok).unwrap();
    let ids = encode_prompt(&tok, &t.render(&[m("user", "Hi")], true).unwrap()).unwrap();
    let bos = tok.bos_id().unwrap();
    assert_eq!(ids[0], bos);
    assert_ne!(ids[1], bos, "one BOS: {ids:?}");
    // Qwen2 vocabulary (adds no BOS), the file's ChatML template.
    let (files, tok) = open(&fixture("small-qwen2/small-qwen2-Q8_0.gguf"));
    let t = ChatTemplate::for_model(&files.metadata, &tok).unwrap();
    let ids = encode_prompt(&tok, &t.render(&[m("user", "Hi")], true).unwrap()).unwrap();
    assert_eq!(ids[0], tok.inner().token_to_id("<|im_start|>").unwrap());
}

#[test]
fn a_broken_file_template_is_an_error_naming_the_key() {
    let (files, tok) = open(&bundled());
    let mut md: Metadata = files.metadata.clone();
    md.entries.insert(
        "tokenizer.chat_template".into(),
        Value::String("{% if messages %}unclosed".into()),
    );
    let e = ChatTemplate::for_model(&md, &tok).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.chat_template") && e.contains("hypura-tiny-random"),
        "{e}"
    );
}
