//! Token ids against llama.cpp's, for every fixture file.

mod common;

use common::*;
use hypura::gguf::ModelFiles;
use hypura::tokenizer::{StreamDecoder, Tokenizer};

fn tokenizer(gguf: &std::path::Path) -> Tokenizer {
    Tokenizer::from_metadata(&ModelFiles::open(gguf).unwrap().metadata).unwrap()
}

#[test]
fn ids_match_llama_cpp_on_every_fixture_string() {
    let mut checked = 0;
    for gguf in fixture_models() {
        let tok = tokenizer(&gguf);
        let r = reference(&gguf);
        let name = gguf.file_name().unwrap().to_string_lossy().to_string();
        for case in r["tokenize"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let add_bos = case["add_bos"].as_bool().unwrap();
            let special = case["special"].as_bool().unwrap();
            let ours = tok.encode(text, add_bos, special).unwrap();
            assert_eq!(
                ours,
                ids(&case["ids"]),
                "{name}: {text:?} add_bos={add_bos} special={special}"
            );
            if let Some(detok) = case["detok"].as_str() {
                assert_eq!(
                    tok.decode(&ours).unwrap(),
                    detok,
                    "{name}: detok of {text:?}"
                );
            }
            checked += 1;
        }
        let tp = &r["text_prompt"];
        assert_eq!(
            tok.encode(tp["text"].as_str().unwrap(), true, false)
                .unwrap(),
            ids(&tp["ids"]),
            "{name}: text_prompt"
        );
    }
    assert!(checked >= 14 * 36, "only {checked} cases");
}

#[test]
fn perplexity_text_token_count_matches_llama_cpp() {
    let text = std::fs::read_to_string(fixtures_dir().join("text.txt")).unwrap();
    let text = text.strip_suffix('\n').unwrap_or(&text);
    for gguf in fixture_models() {
        let r = reference(&gguf);
        let Some(n) = r["perplexity"]["n_text_tokens"].as_u64() else {
            continue;
        };
        let ours = tokenizer(&gguf).encode(text, true, false).unwrap();
        assert_eq!(ours.len() as u64, n, "{}", gguf.display());
    }
}

#[test]
fn stream_decoder_holds_back_split_utf8() {
    // SPM vocab: characters outside the 512-token vocabulary fall back to <0xNN> byte tokens.
    let gguf = fixtures_dir().join("tiny-llama-spm/tiny-llama-spm-F32.gguf");
    let tok = tokenizer(&gguf);
    let text = "héllo 🦀 wörld";
    let ids = tok.encode(text, false, false).unwrap();
    let mut dec = StreamDecoder::new(&tok);
    let mut out = String::new();
    let mut saw_partial = false;
    for &id in &ids {
        match dec.push(id) {
            Some(s) => {
                assert!(!s.contains('\u{FFFD}'), "emitted a broken character: {s:?}");
                out.push_str(&s);
            }
            None => saw_partial = true,
        }
    }
    out.push_str(&dec.finish());
    assert_eq!(out.trim_start(), text);
    assert!(
        saw_partial,
        "expected the crab emoji to arrive as byte tokens"
    );
}

#[test]
fn end_of_generation_tokens_come_from_metadata() {
    let tok = tokenizer(&fixtures_dir().join("tiny-qwen2/tiny-qwen2-F32.gguf"));
    let eos = tok.eos_id().expect("qwen2 fixture has EOS");
    assert!(tok.is_end_of_generation(eos));
    assert!(!tok.adds_bos(), "qwen2 adds no BOS");
    let spm = tokenizer(&fixtures_dir().join("tiny-llama-spm/tiny-llama-spm-F32.gguf"));
    assert!(spm.adds_bos());
    assert_eq!(
        spm.encode("", true, false).unwrap(),
        vec![spm.bos_id().unwrap()]
    );
}
