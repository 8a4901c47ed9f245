//! Perplexity against llama-perplexity's, for every fixture file, on every compiled backend.

mod common;

use candle_core::Device;
use common::*;
use hypura::generate::perplexity::{perplexity, prepare_text};
use hypura::gguf::ModelFiles;
use hypura::tokenizer::Tokenizer;

fn perplexity_matches(device: &Device) {
    let text = std::fs::read_to_string(fixtures_dir().join("text.txt")).unwrap();
    for gguf in fixture_models() {
        let r = reference(&gguf);
        let p = &r["perplexity"];
        let (Some(want), Some(ctx)) = (p["ppl"].as_f64(), p["ctx"].as_u64()) else {
            continue;
        };
        let tok = Tokenizer::from_metadata(&ModelFiles::open(&gguf).unwrap().metadata).unwrap();
        let tokens = tok.encode(prepare_text(&text), true, false).unwrap();
        let bos = if tok.adds_bos() { tok.bos_id() } else { None };
        let mut model = load(&gguf, device, ctx as usize);
        let got = perplexity(&mut model, &tokens, ctx as usize, bos, &mut |_, _| {}).unwrap();
        let rel = (got.ppl - want).abs() / want;
        eprintln!(
            "{}: ppl {:.4} vs llama.cpp {want:.4} ({:.3} %)",
            gguf.file_name().unwrap().to_string_lossy(),
            got.ppl,
            rel * 100.0
        );
        assert_eq!(
            got.tokens_scored as u64,
            p["tokens_scored"].as_u64().unwrap(),
            "{}",
            gguf.display()
        );
        assert!(rel < 0.01, "{}: ppl {} vs {want}", gguf.display(), got.ppl);
    }
}
on_every_backend!(
    perplexity_within_one_percent_of_llama_cpp,
    perplexity_matches
);
