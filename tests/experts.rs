//! Expert-streaming gives exactly the logits of full-resident, whatever the cache size (one
//! expert to all), the eviction policy, and with speculative prefetch on or off; and the cache
//! reads only what the router picked.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;
use common::*;
use hypura::gguf::ModelFiles;
use hypura::models::{LanguageModel, Logits, Transformer};
use hypura::plan::{is_expert_tensor, Placement, TierKind};
use hypura::storage::{EvictionPolicy, ExpertCacheConfig, ExpertStats, WeightStore};

/// Prompt logits, decode logits for a few greedy tokens (run twice), and the cache's stats.
fn run(gguf: &Path, placement: Placement) -> (Logit, Logit, Option<ExpertStats>) {
    run_on(gguf, &Device::Cpu, placement)
}

fn run_on(
    gguf: &Path,
    device: &Device,
    placement: Placement,
) -> (Logit, Logit, Option<ExpertStats>) {
    let files = ModelFiles::open(gguf).unwrap();
    let cfg = files.config().unwrap();
    let store = WeightStore::with_placement(files, device, placement).unwrap();
    let mut model = Transformer::load(&store, &cfg, 64).unwrap();
    if device.is_cuda() {
        // Single-token steps run on the fused CUDA decoder: resident experts from the
        // decoder's own table, cached ones from the device expert cache's table, which the host
        // fills while the step waits on the device.
        let path = model.decode_path();
        assert!(path.starts_with("fused"), "{path}");
        assert_eq!(
            path.contains("device expert cache"),
            store.expert_cache().is_some(),
            "{path}"
        );
    }
    let r = reference(gguf);
    let mut pass = || prompt_then_decode(&mut model, &r, 8);
    let first = pass();
    let second = pass();
    assert_eq!(first, second, "a second pass over a warm cache differs");
    let stats = store.expert_cache().map(|c| c.stats());
    (first.0, first.1, stats)
}

/// A CPU store of `files` with its experts streamed through a cache of `config`.
fn streamed_on_cpu(files: &ModelFiles, config: ExpertCacheConfig) -> WeightStore {
    WeightStore::with_placement(files.clone(), &Device::Cpu, experts_streamed(files, config))
        .unwrap()
}

/// Experts on NVMe (through the cache), everything else on the device.
fn experts_streamed(files: &ModelFiles, config: ExpertCacheConfig) -> Placement {
    let tiers: HashMap<String, TierKind> = files
        .tensors
        .iter()
        .filter(|t| is_expert_tensor(&t.name))
        .map(|t| (t.name.clone(), TierKind::Nvme))
        .collect();
    let mut p = Placement::new(files, tiers, 1);
    p.expert_cache = config;
    p
}

#[test]
fn expert_streaming_matches_full_resident_bit_for_bit() {
    hypura::storage::set_transient_chunk_bytes(32 << 10);
    for rel in [
        "small-moe/small-moe-Q4_K_M.gguf",
        "small-moe/small-moe-Q8_0.gguf",
        "small-moe/small-moe-F32.gguf",
    ] {
        let gguf = fixtures_dir().join(rel);
        let files = ModelFiles::open(&gguf).unwrap();
        let cfg = files.config().unwrap();
        let (want_p, want_d, none) = run(&gguf, Placement::default());
        assert!(none.is_none(), "full-resident has no expert cache");
        let total = cfg.n_layer * cfg.n_expert;
        for slots in 1..=total {
            for prefetch in [false, true] {
                for policy in [EvictionPolicy::Lru, EvictionPolicy::Lfu] {
                    let config = ExpertCacheConfig {
                        slots,
                        policy,
                        prefetch,
                        io_threads: 1 + slots % 2,
                        device_slots: 0,
                    };
                    let (p, d, stats) = run(&gguf, experts_streamed(&files, config));
                    let what = format!("{rel}: {config:?}");
                    assert!(p == want_p, "{what}: prompt logits differ");
                    assert!(d == want_d, "{what}: decode logits differ");
                    let s = stats.expect("an expert cache");
                    assert_eq!(s.requests, s.hits + s.in_flight + s.misses, "{what}");
                    assert!(s.misses > 0 && s.bytes_read > 0, "{what}: nothing read");
                    if !prefetch {
                        assert_eq!(s.prefetch_issued, 0, "{what}");
                    }
                    if slots == total && !prefetch {
                        // Everything fits: each expert is read once, then always hit.
                        assert!(s.misses <= total as u64, "{what}: {s:?}");
                    }
                }
            }
        }
    }
}

/// On a GPU, experts also go through a device cache in front of the host cache: every device
/// cache size (one expert to all) and host cache size gives the logits of full-resident on the
/// same device, bit for bit. (On the CPU the device cache does not exist; the test then checks
/// the host cache alone.)
fn device_expert_cache_matches_full_resident(device: &Device) {
    let gguf = fixtures_dir().join("small-moe/small-moe-Q4_K_M.gguf");
    let files = ModelFiles::open(&gguf).unwrap();
    let cfg = files.config().unwrap();
    let total = cfg.n_layer * cfg.n_expert;
    let (want_p, want_d, _) = run_on(&gguf, device, Placement::default());
    for device_slots in [1, cfg.n_expert_used, total / 2, total] {
        for (slots, prefetch) in [(cfg.n_expert_used, false), (total, true)] {
            let config = ExpertCacheConfig {
                slots,
                prefetch,
                device_slots,
                ..Default::default()
            };
            let (p, d, stats) = run_on(&gguf, device, experts_streamed(&files, config));
            let what = format!("{device:?}: {config:?}");
            assert!(p == want_p, "{what}: prompt logits differ");
            assert!(d == want_d, "{what}: decode logits differ");
            assert!(stats.expect("a host cache").requests > 0, "{what}");
        }
    }
}
on_every_backend!(
    device_expert_cache,
    device_expert_cache_matches_full_resident
);

#[test]
fn only_routed_experts_are_read_without_prefetch() {
    let gguf = fixtures_dir().join("small-moe/small-moe-Q8_0.gguf");
    let files = ModelFiles::open(&gguf).unwrap();
    let cfg = files.config().unwrap();
    let config = ExpertCacheConfig {
        slots: 1,
        prefetch: false,
        ..Default::default()
    };
    let store = streamed_on_cpu(&files, config);
    let mut model = Transformer::load(&store, &cfg, 64).unwrap();
    let cache = store.expert_cache().unwrap().clone();
    cache.record_trace(true);
    for id in [3u32, 7, 11, 19] {
        model.forward(&[id], Logits::Last).unwrap();
    }
    let trace = cache.trace();
    let s = cache.stats();
    assert_eq!(
        trace.len(),
        4 * cfg.n_layer,
        "one entry per layer per token"
    );
    assert!(trace.iter().all(|t| t.experts.len() == cfg.n_expert_used));
    // Bytes of one expert (gate + up + down) of layer 0.
    let expert_bytes: u64 = files
        .tensors
        .iter()
        .filter(|t| is_expert_tensor(&t.name) && t.name.starts_with("blk.0."))
        .map(|t| t.n_bytes / cfg.n_expert as u64)
        .sum();
    assert_eq!(s.requests, (4 * cfg.n_layer * cfg.n_expert_used) as u64);
    assert_eq!(s.bytes_read, s.misses * expert_bytes, "{s:?}");
    assert_eq!(s.prefetch_issued, 0);
}

#[test]
fn prefetch_learns_a_repeated_sequence() {
    // The same token sequence twice: the second time, the co-activation statistics know which
    // experts follow, so with room for them prefetch turns misses into hits.
    let gguf = fixtures_dir().join("small-moe/small-moe-Q4_K_M.gguf");
    let files = ModelFiles::open(&gguf).unwrap();
    let cfg = files.config().unwrap();
    let stats_for = |prefetch: bool| {
        let config = ExpertCacheConfig {
            slots: 3,
            prefetch,
            policy: EvictionPolicy::Lru,
            io_threads: 1,
            device_slots: 0,
        };
        let store = streamed_on_cpu(&files, config);
        let mut model = Transformer::load(&store, &cfg, 128).unwrap();
        let seq: Vec<u32> = (0..24).map(|i| (i * 37 % 500) as u32 + 3).collect();
        for &id in &seq {
            model.forward(&[id], Logits::Last).unwrap();
        }
        let before = store.expert_cache().unwrap().stats();
        for &id in &seq {
            model.forward(&[id], Logits::Last).unwrap();
        }
        store.expert_cache().unwrap().stats().since(&before)
    };
    let without = stats_for(false);
    let with = stats_for(true);
    assert!(
        with.prefetch_issued > 0 && with.prefetch_used > 0,
        "{with:?}"
    );
    assert!(
        with.misses < without.misses,
        "prefetch should cut demand misses: {} with vs {} without",
        with.misses,
        without.misses
    );
}

/// A routing served entirely by a cache above (the GPU's) is learned and traced by the host cache
/// without being fetched or counted as a request.
#[test]
fn observed_routing_is_learned_not_fetched() {
    let gguf = fixtures_dir().join("small-moe/small-moe-Q8_0.gguf");
    let files = ModelFiles::open(&gguf).unwrap();
    let config = ExpertCacheConfig {
        slots: 2,
        prefetch: false,
        ..Default::default()
    };
    let store = streamed_on_cpu(&files, config);
    let cache = store.expert_cache().unwrap().clone();
    cache.record_trace(true);
    let seen = cache.learned().tokens_seen();
    cache.observe(0, &[vec![2, 0], vec![0, 1]]);
    let trace = cache.trace();
    assert_eq!(trace.len(), 1);
    assert_eq!(
        (trace[0].layer, trace[0].experts.clone()),
        (0, vec![0, 1, 2])
    );
    // Layer 0's popularity counts each (token, expert) use: 2 tokens × 2 experts.
    assert_eq!(
        cache.learned().tokens_seen(),
        seen + 4,
        "layer 0's uses learned"
    );
    let s = cache.stats();
    assert_eq!((s.requests, s.reads, s.bytes_read), (0, 0, 0), "{s:?}");
}
