//! Logits against llama.cpp's, for every fixture file, on every compiled backend.

mod common;

use candle_core::Device;
use common::*;
use hypura::models::{LanguageModel, Logits};

/// One batch over the fixed prompt from an empty cache: every position's logits.
fn prompt_logits(device: &Device) {
    for gguf in fixture_models() {
        let r = reference(&gguf);
        let prompt = ids(&r["fixed_prompt"]["ids"]);
        let theirs = read_npy_2d(&sibling(&gguf, "ref.logits.npy"));
        let mut model = load(&gguf, device, 256);
        let ours: Vec<Vec<f32>> = model
            .forward(&prompt, Logits::All)
            .unwrap()
            .to_vec2()
            .unwrap();
        let c = compare(&ours, &theirs);
        eprintln!(
            "{}: prompt {c:?}",
            gguf.file_name().unwrap().to_string_lossy()
        );
        assert_close("prompt logits", &gguf, &c);
    }
}
on_every_backend!(prompt_logits_match_llama_cpp, prompt_logits);

/// The KV-cache path: the prompt in one batch, then llama.cpp's greedy tokens one at a time.
fn decode_logits(device: &Device) {
    for gguf in fixture_models() {
        let path = sibling(&gguf, "ref.decode_logits.npy");
        if !path.exists() {
            continue;
        }
        let r = reference(&gguf);
        let prompt = ids(&r["fixed_prompt"]["ids"]);
        let greedy = ids(&r["fixed_prompt"]["greedy_ids"]);
        let theirs = read_npy_2d(&path);
        let mut model = load(&gguf, device, 256);
        model.forward(&prompt, Logits::Last).unwrap();
        let ours: Vec<Vec<f32>> = greedy[..theirs.len()]
            .iter()
            .map(|&id| {
                model
                    .forward(&[id], Logits::Last)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap()
                    .remove(0)
            })
            .collect();
        let c = compare(&ours, &theirs);
        eprintln!(
            "{}: decode {c:?}",
            gguf.file_name().unwrap().to_string_lossy()
        );
        assert_close("decode logits", &gguf, &c);
    }
}
on_every_backend!(decode_logits_match_llama_cpp, decode_logits);
