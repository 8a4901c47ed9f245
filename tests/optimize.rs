//! `hypura optimize`'s rewrite: the reordered file parses, keeps metadata and tokenizer, gives
//! bit-identical logits full-resident and expert-streaming, and costs fewer expert reads.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use common::*;
use hypura::gguf::ModelFiles;
use hypura::models::Transformer;
use hypura::optimize::{plan_rewrite, write, OrderStrategy, ALIGNMENT, ORDER_KEY};
use hypura::plan::{is_expert_tensor, Placement, TierKind};
use hypura::storage::experts::CoActivation;
use hypura::storage::{EvictionPolicy, ExpertCacheConfig, ExpertStats, WeightStore};
use hypura::tokenizer::Tokenizer;

/// Prompt logits and decode logits for 8 greedy tokens, plus the expert cache's stats and what
/// it learned (when `cache` is given, the experts stream through a cache of that many slots).
fn run(gguf: &Path, cache: Option<usize>) -> (Logit, Logit, Option<(ExpertStats, CoActivation)>) {
    run_with(gguf, cache, false)
}

fn run_with(
    gguf: &Path,
    cache: Option<usize>,
    prefetch: bool,
) -> (Logit, Logit, Option<(ExpertStats, CoActivation)>) {
    let files = ModelFiles::open(gguf).unwrap();
    let cfg = files.config().unwrap();
    let placement = match cache {
        None => Placement::default(),
        Some(slots) => {
            let tiers: HashMap<String, TierKind> = files
                .tensors
                .iter()
                .filter(|t| is_expert_tensor(&t.name))
                .map(|t| (t.name.clone(), TierKind::Nvme))
                .collect();
            let mut p = Placement::new(&files, tiers, 1);
            p.expert_cache = ExpertCacheConfig {
                slots,
                policy: EvictionPolicy::Lfu,
                prefetch,
                io_threads: 1 + slots % 2,
                device_slots: 0,
            };
            p
        }
    };
    let store = WeightStore::with_placement(files, &Device::Cpu, placement).unwrap();
    let mut model = Transformer::load(&store, &cfg, 64).unwrap();
    let (p, d) = prompt_then_decode(&mut model, &reference(&fixture_of(gguf)), 8);
    let stats = store.expert_cache().map(|c| (c.stats(), c.learned()));
    (p, d, stats)
}

/// The fixture a file came from (rewritten files are named `X.opt.gguf`), for its reference.
fn fixture_of(gguf: &Path) -> PathBuf {
    let name = gguf
        .file_name()
        .unwrap()
        .to_string_lossy()
        .replace(".opt", "");
    let model = name.rsplit_once('-').unwrap().0.to_string();
    fixtures_dir().join(model).join(name)
}

fn temp(name: &str) -> PathBuf {
    let p = std::env::temp_dir()
        .join(format!("hypura-optimize-{}", std::process::id()))
        .join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    p
}

/// Optimizes `rel` with `stats` into a temporary `X.opt.gguf` in a folder of its own per `test`
/// (tests run in parallel).
fn optimize(
    test: &str,
    rel: &str,
    stats: Option<CoActivation>,
    strategy: OrderStrategy,
) -> PathBuf {
    let src = fixtures_dir().join(rel);
    let files = ModelFiles::open(&src).unwrap();
    let cfg = files.config().unwrap();
    let rw = plan_rewrite(&files, &cfg, strategy, stats, None).unwrap();
    let name = src
        .file_name()
        .unwrap()
        .to_string_lossy()
        .replace(".gguf", ".opt.gguf");
    let out = temp(&format!("{test}/{name}"));
    write(&files, &rw, &out, Arc::new(|_| {})).unwrap();
    out
}

/// Statistics whose best order for layer `l` is the evens, then the odds, shifted by `l`: a real
/// permutation in every layer (nor is its reverse the identity). Distinct weights along the path
/// make it the only best one.
fn scrambling_stats(n: usize, layers: usize) -> CoActivation {
    let mut c = CoActivation::new(n);
    let base: Vec<usize> = (0..n).step_by(2).chain((1..n).step_by(2)).collect();
    for l in 0..layers {
        let order: Vec<usize> = base.iter().map(|&e| (e + l) % n).collect();
        for (j, w) in order.windows(2).enumerate() {
            c.observe(l, &vec![vec![w[0], w[1]]; 100 - j]);
        }
    }
    c
}

#[test]
fn optimized_files_give_bit_identical_logits_and_keep_everything_else() {
    hypura::storage::set_transient_chunk_bytes(32 << 10);
    for rel in [
        "tiny-moe-spm/tiny-moe-spm-F32.gguf",
        "small-moe/small-moe-Q4_K_M.gguf",
        "small-moe/small-moe-Q8_0.gguf",
        "small-moe/small-moe-F32.gguf",
    ] {
        let src = fixtures_dir().join(rel);
        let files = ModelFiles::open(&src).unwrap();
        let cfg = files.config().unwrap();
        let out = optimize(
            "keep",
            rel,
            Some(scrambling_stats(cfg.n_expert, cfg.n_layer)),
            OrderStrategy::Pairs,
        );
        let opt = ModelFiles::open(&out).unwrap();
        // Every layer's experts were really permuted, and the file says how.
        let order = opt.metadata.i64_array(ORDER_KEY).unwrap();
        assert_eq!(order.len(), cfg.n_layer * cfg.n_expert);
        for l in 0..cfg.n_layer {
            let o = &order[l * cfg.n_expert..(l + 1) * cfg.n_expert];
            assert!(
                o.iter().enumerate().any(|(i, &e)| i as i64 != e),
                "{rel}: layer {l} {o:?}"
            );
        }
        // Same tensors; metadata the same but for the alignment and the order; same tokenizer.
        assert_eq!(opt.tensors.len(), files.tensors.len());
        for t in &files.tensors {
            let o = opt.tensor(&t.name).unwrap();
            assert_eq!(
                (o.ty, &o.dims, o.n_bytes),
                (t.ty, &t.dims, t.n_bytes),
                "{}",
                t.name
            );
            assert_eq!(o.offset % ALIGNMENT, 0, "{rel}: {} aligned", t.name);
        }
        for (k, v) in &files.metadata.entries {
            if k != "general.alignment" {
                assert_eq!(opt.metadata.get(k), Some(v), "{rel}: {k}");
            }
        }
        let keys = |m: &ModelFiles| m.metadata.entries.len();
        assert_eq!(
            keys(&opt),
            keys(&files) + 1 + usize::from(!files.metadata.has("general.alignment"))
        );
        let (t0, t1) = (
            Tokenizer::from_metadata(&files.metadata).unwrap(),
            Tokenizer::from_metadata(&opt.metadata).unwrap(),
        );
        let text = "Once upon a time, the <0x41> quick brown fox";
        assert_eq!(
            t0.encode(text, true, true).unwrap(),
            t1.encode(text, true, true).unwrap()
        );
        // Each layer's three expert tensors lie together, gate, up, down.
        for l in 0..cfg.n_layer {
            let at = |p: &str| opt.tensor(&format!("blk.{l}.ffn_{p}_exps.weight")).unwrap();
            let (g, u, d) = (at("gate"), at("up"), at("down"));
            assert!(
                u.offset - (g.offset + g.n_bytes) < ALIGNMENT,
                "{rel}: layer {l}"
            );
            assert!(
                d.offset - (u.offset + u.n_bytes) < ALIGNMENT,
                "{rel}: layer {l}"
            );
        }
        // Logits: the original full-resident is the reference.
        let (want_p, want_d, _) = run(&src, None);
        let (p, d, _) = run(&out, None);
        assert!(
            p == want_p && d == want_d,
            "{rel}: full-resident logits differ"
        );
        for slots in [1, 3, cfg.n_layer * cfg.n_expert] {
            let (p, d, s) = run(&out, Some(slots));
            assert!(
                p == want_p && d == want_d,
                "{rel}: streamed ({slots} slots) logits differ"
            );
            assert!(s.unwrap().0.misses > 0);
        }
        let _ = std::fs::remove_file(&out);
    }
}

#[test]
fn permuted_tensors_hold_the_original_experts_in_the_new_order() {
    let rel = "small-moe/small-moe-Q8_0.gguf";
    let src = fixtures_dir().join(rel);
    let files = ModelFiles::open(&src).unwrap();
    let cfg = files.config().unwrap();
    let out = optimize(
        "bytes",
        rel,
        Some(scrambling_stats(cfg.n_expert, cfg.n_layer)),
        OrderStrategy::Pairs,
    );
    let opt = ModelFiles::open(&out).unwrap();
    let order = opt.metadata.i64_array(ORDER_KEY).unwrap();
    let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&out).unwrap());
    let n = cfg.n_expert;
    for t in &files.tensors {
        let o = opt.tensor(&t.name).unwrap();
        let old = &a[t.offset as usize..(t.offset + t.n_bytes) as usize];
        let new = &b[o.offset as usize..(o.offset + o.n_bytes) as usize];
        let permuted = t.name.contains("_exps.") || t.name.contains("ffn_gate_inp");
        if !permuted {
            assert!(old == new, "{} copied unchanged", t.name);
            continue;
        }
        let l = hypura::plan::layer_of(&t.name).unwrap();
        let s = t.n_bytes as usize / n;
        for j in 0..n {
            let e = order[l * n + j] as usize;
            assert!(
                new[j * s..(j + 1) * s] == old[e * s..(e + 1) * s],
                "{} expert {j}",
                t.name
            );
        }
    }
    // Optimizing again composes the orders: back to the original with the inverse statistics
    // is not needed; optimizing the output with 'keep' keeps its order.
    let again = {
        let rw = plan_rewrite(&opt, &cfg, OrderStrategy::Keep, None, None).unwrap();
        let p = temp("bytes/again.gguf");
        write(&opt, &rw, &p, Arc::new(|_| {})).unwrap();
        p
    };
    let again_files = ModelFiles::open(&again).unwrap();
    assert_eq!(again_files.metadata.i64_array(ORDER_KEY).unwrap(), order);
    for f in [out, again] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn learned_order_cuts_expert_reads() {
    // Learn the routing of the fixture prompt on the original file, optimize with it, replay
    // the same tokens on both through a small cache: same misses, fewer reads.
    for rel in [
        "small-moe/small-moe-F32.gguf",
        "small-moe/small-moe-Q8_0.gguf",
    ] {
        let src = fixtures_dir().join(rel);
        let files = ModelFiles::open(&src).unwrap();
        let cfg = files.config().unwrap();
        let (_, _, s0) = run(&src, Some(2));
        let (s0, learned) = s0.unwrap();
        // The fixture's tensors are 32-byte aligned: no two slices share a read.
        assert_eq!(s0.reads, 3 * s0.misses, "{rel}: {s0:?}");
        let rw = plan_rewrite(
            &files,
            &cfg,
            OrderStrategy::Pairs,
            Some(learned.clone()),
            None,
        )
        .unwrap();
        let (before, after) = rw.expected_reads.unwrap();
        assert!((before - 3.0 * (cfg.n_layer * cfg.n_expert_used) as f64).abs() < 1e-9);
        assert!(after < before, "{rel}: expected {before} → {after}");
        let out = optimize("learned", rel, Some(learned), OrderStrategy::Pairs);
        let (_, _, s1) = run(&out, Some(2));
        let (s1, _) = s1.unwrap();
        assert_eq!(s1.bytes_read, s0.bytes_read * s1.misses / s0.misses.max(1));
        assert!(
            s1.reads < 3 * s1.misses,
            "{rel}: merged reads expected on the optimized file: {s1:?}"
        );
        let _ = std::fs::remove_file(out);
    }
}

#[test]
fn merged_reads_are_bit_identical_for_every_cache_size() {
    // On the rewritten file the cache merges the reads of adjacent experts (demand and
    // prefetch); every cache size, with and without prefetch, must still give the same numbers.
    let rel = "small-moe/small-moe-F32.gguf";
    let src = fixtures_dir().join(rel);
    let files = ModelFiles::open(&src).unwrap();
    let cfg = files.config().unwrap();
    let out = optimize(
        "sizes",
        rel,
        Some(scrambling_stats(cfg.n_expert, cfg.n_layer)),
        OrderStrategy::Pairs,
    );
    let (want_p, want_d, _) = run(&src, None);
    let mut merged = 0;
    for slots in 1..=cfg.n_layer * cfg.n_expert {
        for prefetch in [false, true] {
            let (p, d, s) = run_with(&out, Some(slots), prefetch);
            let (s, _) = s.unwrap();
            assert!(
                p == want_p && d == want_d,
                "{slots} slots, prefetch {prefetch}: logits differ"
            );
            assert_eq!(s.requests, s.hits + s.in_flight + s.misses);
            assert!(s.reads <= 3 * (s.misses + s.prefetch_issued), "{s:?}");
            merged += 3 * (s.misses + s.prefetch_issued) - s.reads;
        }
    }
    assert!(merged > 0, "no read was merged");
    let _ = std::fs::remove_file(out);
}

#[test]
fn dense_models_are_refused() {
    let src = fixtures_dir().join("tiny-llama-spm/tiny-llama-spm-F32.gguf");
    let files = ModelFiles::open(&src).unwrap();
    let cfg = files.config().unwrap();
    let e = plan_rewrite(&files, &cfg, OrderStrategy::Pairs, None, None).unwrap_err();
    assert!(e.to_string().contains("not a mixture-of-experts"), "{e}");
}

#[test]
fn split_sets_become_one_file() {
    use hypura::gguf::{GgufWriter, TensorData, Value};
    // small-moe as a 2-part split set (split keys in both parts, metadata in the first).
    let src = fixtures_dir().join("small-moe/small-moe-Q8_0.gguf");
    let files = ModelFiles::open(&src).unwrap();
    let cfg = files.config().unwrap();
    let bytes = std::fs::read(&src).unwrap();
    let dir = temp("split/x").parent().unwrap().to_path_buf();
    let half = files.tensors.len() / 2;
    let mut parts = Vec::new();
    for (part, range) in [(0, 0..half), (1, half..files.tensors.len())] {
        let mut w = GgufWriter::new();
        if part == 0 {
            for (k, v) in &files.metadata.entries {
                w.set(k, v.clone());
            }
        }
        w.set("split.no", Value::U16(part as u16));
        w.set("split.count", Value::U16(2));
        w.set(
            "split.tensors.count",
            Value::I32(files.tensors.len() as i32),
        );
        for t in &files.tensors[range] {
            let b = bytes[t.offset as usize..(t.offset + t.n_bytes) as usize].to_vec();
            w.add_tensor(&t.name, t.ty, &t.dims, TensorData::Bytes(b));
        }
        let p = dir.join(format!("sm-0000{}-of-00002.gguf", part + 1));
        std::fs::write(&p, w.to_bytes()).unwrap();
        parts.push(p);
    }
    let split = ModelFiles::open(&parts[0]).unwrap();
    assert_eq!(split.paths.len(), 2);
    let stats = scrambling_stats(cfg.n_expert, cfg.n_layer);
    let rw = plan_rewrite(&split, &cfg, OrderStrategy::Pairs, Some(stats), None).unwrap();
    let out = dir.join("small-moe-Q8_0.opt.gguf");
    write(&split, &rw, &out, Arc::new(|_| {})).unwrap();
    let opt = ModelFiles::open(&out).unwrap();
    assert_eq!(opt.paths.len(), 1);
    assert!(!opt.metadata.entries.keys().any(|k| k.starts_with("split.")));
    assert_eq!(opt.tensors.len(), files.tensors.len());
    let (want_p, want_d, _) = run(&src, None);
    let (p, d, _) = run(&out, Some(2));
    assert!(
        p == want_p && d == want_d,
        "logits of the rewritten split set differ"
    );
    let _ = std::fs::remove_dir_all(dir);
}
