//! Every placement gives the same logits as full-resident: bit-identical on every backend (on a
//! GPU, off-device tiers are copied to the device per use and run the same kernels), for prompt
//! batches and for token-by-token decoding, with tensors on the device, in the mapped file
//! (RAM tier) or streamed from disk (NVMe tier), and mixed.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;
use common::*;
use hypura::gguf::ModelFiles;
use hypura::models::{LanguageModel, Logits, Transformer};
use hypura::plan::{Placement, TierKind};
use hypura::storage::WeightStore;

/// Prompt logits and decode logits for a few greedy tokens.
fn logits_with(
    gguf: &Path,
    device: &Device,
    placement: Placement,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>, Option<u64>) {
    let files = ModelFiles::open(gguf).unwrap();
    let cfg = files.config().unwrap();
    let store = WeightStore::with_placement(files, device, placement).unwrap();
    let mut model = Transformer::load(&store, &cfg, 64).unwrap();
    // Off-device tiers run candle's ops; so does full-resident here, for bit-identical results
    // (tests/fused.rs checks the fused CUDA decoder against candle's ops).
    model.disable_fused_decode();
    let r = reference(gguf);
    let prompt = ids(&r["fixed_prompt"]["ids"]);
    let greedy = ids(&r["fixed_prompt"]["greedy_ids"]);
    let run = |model: &mut Transformer| {
        model.reset();
        let prompt_logits: Vec<Vec<f32>> = model
            .forward(&prompt, Logits::All)
            .unwrap()
            .to_vec2()
            .unwrap();
        let decode: Vec<Vec<f32>> = greedy[..6]
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
        (prompt_logits, decode)
    };
    let first = run(&mut model);
    // A second pass exercises the stream's wrap-around (layer 0 again after the last layer).
    let second = run(&mut model);
    assert_eq!(first, second, "{}: a second pass differs", gguf.display());
    let read = store.streamer().map(|s| s.stats().bytes_read);
    (first.0, first.1, read)
}

fn mixed(files: &ModelFiles) -> Placement {
    let tiers: HashMap<String, TierKind> = files
        .tensors
        .iter()
        .map(|t| {
            let tier = if t.name.contains(".ffn_") && !t.name.contains("norm") {
                TierKind::Nvme
            } else if t.name.contains(".attn_") {
                TierKind::Ram
            } else {
                TierKind::Device
            };
            (t.name.clone(), tier)
        })
        .collect();
    Placement::new(files, tiers, 1)
}

fn every_placement(device: &Device) {
    // Tiny transient chunks, so batch products on temporary copies run in several pieces.
    hypura::storage::set_transient_chunk_bytes(32 << 10);
    let dir = fixtures_dir();
    for rel in [
        "small-llama/small-llama-Q4_K_M.gguf",
        "small-llama/small-llama-Q8_0.gguf",
        "small-qwen2/small-qwen2-F32.gguf",
        "small-moe/small-moe-Q5_K_M.gguf",
        "types/small-llama/small-llama-Q4_0.gguf",
    ] {
        let gguf = dir.join(rel);
        let files = ModelFiles::open(&gguf).unwrap();
        // The reference: full-resident, repacked copies kept. Every placement, with repacked
        // copies kept or made per batch (tight budgets), must give exactly its numbers.
        let (want_prompt, want_decode, none) = logits_with(&gguf, device, Placement::default());
        assert_eq!(none, None, "full-resident streams nothing");
        for in_place in [false, true] {
            for (name, mut placement) in [
                ("all-device", Placement::default()),
                ("all-ram", Placement::all(&files, TierKind::Ram, 2)),
                ("all-nvme", Placement::all(&files, TierKind::Nvme, 2)),
                ("mixed", mixed(&files)),
            ] {
                placement.transient_repack = in_place;
                let name = format!(
                    "{name}{}",
                    if in_place { " (transient repack)" } else { "" }
                );
                let streams = !placement.groups.is_empty();
                let (prompt, decode, read) = logits_with(&gguf, device, placement);
                assert!(
                    prompt == want_prompt,
                    "{rel} {name}: prompt logits differ from full-resident"
                );
                assert!(
                    decode == want_decode,
                    "{rel} {name}: decode logits differ from full-resident"
                );
                if streams {
                    assert!(read.unwrap() > 0, "{rel} {name}: nothing was streamed");
                }
            }
        }
    }
}

on_every_backend!(
    every_placement_matches_full_resident_bit_for_bit,
    every_placement
);

/// GPU builds: RAM-tier layers multiplied on the host (`RamCompute::Host`: hypura's CPU kernels
/// over the mapped file, the activations copied across) give full-resident CUDA's decode logits
/// within the fixture tolerance (other kernels, so not bit for bit) and upload nothing for them;
/// prompt batches are still uploaded, so their logits stay bit-identical.
#[cfg(feature = "cuda")]
#[test]
fn cuda_ram_layers_computed_on_the_host_match_full_resident() {
    let device = Device::new_cuda(0).expect("CUDA device 0");
    for rel in [
        "small-llama/small-llama-Q4_K_M.gguf",
        "small-llama/small-llama-Q8_0.gguf",
        "small-qwen2/small-qwen2-F32.gguf",
    ] {
        let gguf = fixtures_dir().join(rel);
        let files = ModelFiles::open(&gguf).unwrap();
        let (want_prompt, want_decode, _) = logits_with(&gguf, &device, Placement::default());
        for (name, mut placement) in [
            ("all-ram", Placement::all(&files, TierKind::Ram, 2)),
            ("mixed", mixed(&files)),
        ] {
            placement.ram_compute = hypura::plan::RamCompute::Host;
            let (prompt, decode, _) = logits_with(&gguf, &device, placement);
            assert!(prompt == want_prompt, "{rel} {name}: prompt logits differ");
            let c = compare(&decode, &want_decode);
            eprintln!("{rel} {name} host-computed RAM layers: {c:?}");
            assert_close("host-computed RAM layers vs full-resident", &gguf, &c);
        }
        // Nothing of an all-RAM, host-computed model goes through the uploader.
        let mut placement = Placement::all(&files, TierKind::Ram, 2);
        placement.ram_compute = hypura::plan::RamCompute::Host;
        let cfg = files.config().unwrap();
        let store = WeightStore::with_placement(files, &device, placement).unwrap();
        let mut model = Transformer::load(&store, &cfg, 64).unwrap();
        model.forward(&[1, 2, 3], Logits::Last).unwrap();
        model.forward(&[4], Logits::Last).unwrap();
        let uploads = store.uploader().map_or(0, |u| u.stats().uploads);
        assert_eq!(uploads, 0, "{rel}: host-computed RAM layers were uploaded");
    }
}

#[test]
fn streamed_model_reads_each_layer_once_per_token() {
    let gguf = fixtures_dir().join("small-llama/small-llama-Q8_0.gguf");
    let files = ModelFiles::open(&gguf).unwrap();
    let placement = mixed(&files);
    let ffn_bytes: u64 = files
        .tensors
        .iter()
        .filter(|t| placement.tier(&t.name) == TierKind::Nvme)
        .map(|t| t.n_bytes)
        .sum();
    let group_bytes: u64 = placement.groups.iter().map(|g| g.len as u64).sum();
    assert!(
        group_bytes >= ffn_bytes && group_bytes <= ffn_bytes * 5 / 4,
        "reads cover the FFN with little waste"
    );
    let cfg = files.config().unwrap();
    let store = WeightStore::with_placement(files, &Device::Cpu, placement).unwrap();
    let mut model = Transformer::load(&store, &cfg, 64).unwrap();
    let s = store.streamer().unwrap().clone();
    let before = s.stats().bytes_read;
    for id in [5u32, 9, 11, 13] {
        model.forward(&[id], Logits::Last).unwrap();
    }
    let per_token = (s.stats().bytes_read - before) as f64 / 4.0;
    // Read-ahead may run up to `lookahead` groups past the last token.
    assert!(
        per_token >= group_bytes as f64 * 0.74 && per_token <= group_bytes as f64 * 1.26,
        "{per_token} vs {group_bytes}"
    );
}
