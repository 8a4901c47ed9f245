//! Synthetic models: they parse, have the spec's shape and llama.cpp's tensor layout, their
//! quantized blocks decode to values with the intended scale, and they run.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use candle_core::quantized::{QStorage, QTensor};
use candle_core::Device;
use hypura::gguf::{read_header, Arch, Metadata, ModelFiles, TensorEntry, TensorType};
use hypura::models::{LanguageModel, Logits};
use hypura::synth::{plan, write_model, SynthSpec, SYNTH_TYPES};

fn fixture_vocab(name: &str) -> Metadata {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .join(format!("{name}-F32.gguf"));
    ModelFiles::open(&p).unwrap().metadata
}

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hypura-synth-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn small(arch: Arch, ty: TensorType) -> SynthSpec {
    SynthSpec {
        arch,
        name: format!("synth test {arch:?} {ty}"),
        n_embd: 256,
        n_layer: 2,
        n_ff: 512,
        n_head: 8,
        n_head_kv: 2,
        n_expert: 0,
        n_expert_used: 0,
        rope_freq_base: if arch == Arch::Qwen2 { 1e6 } else { 1e4 },
        rms_eps: 1e-6,
        ctx_len: 1024,
        tie_embeddings: arch == Arch::Qwen2,
        ty,
        k_medium: false,
        seed: 42,
        routing: Default::default(),
    }
}

fn moe(ty: TensorType) -> SynthSpec {
    SynthSpec {
        n_expert: 4,
        n_expert_used: 2,
        ..small(Arch::Llama, ty)
    }
}

fn values(bytes: &[u8], t: &TensorEntry) -> Vec<f32> {
    let storage =
        QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, t.ty.to_candle()).unwrap();
    QTensor::new(storage, t.shape())
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Writes `spec`, then checks the file against the spec and returns its path.
fn write_and_check(spec: &SynthSpec, vocab: &Metadata, dir: &Path) -> PathBuf {
    let out = dir.join(format!(
        "{:?}-{}-{}.gguf",
        spec.arch, spec.n_expert, spec.ty
    ));
    write_model(spec, vocab, &out).unwrap();
    let files = ModelFiles::open(&out).unwrap();
    let c = files.config().unwrap();
    let what = &spec.name;
    assert_eq!(c.arch, spec.arch, "{what}");
    assert_eq!(c.name, spec.name);
    assert_eq!(
        (c.n_embd, c.n_layer, c.n_ff, c.n_head, c.n_head_kv),
        (
            spec.n_embd,
            spec.n_layer,
            spec.n_ff,
            spec.n_head,
            spec.n_head_kv
        ),
        "{what}"
    );
    assert_eq!(
        (c.n_expert, c.n_expert_used),
        (spec.n_expert, spec.n_expert_used)
    );
    assert_eq!(c.head_dim, spec.n_embd / spec.n_head);
    assert_eq!(c.n_ctx_train, spec.ctx_len);
    assert_eq!(c.rope_freq_base, spec.rope_freq_base);
    assert_eq!(c.rms_eps, spec.rms_eps);
    let n_vocab = vocab.str_array("tokenizer.ggml.tokens").unwrap().len();
    assert_eq!(c.n_vocab, n_vocab);
    let md = &files.metadata;
    let arch = spec.arch.gguf_name();
    assert_eq!(md.usize(&format!("{arch}.vocab_size")).unwrap(), n_vocab);
    assert_eq!(
        md.usize(&format!("{arch}.rope.dimension_count")).unwrap(),
        c.head_dim
    );
    // Every tokenizer key is copied as is.
    for (k, v) in vocab
        .entries
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
    {
        assert_eq!(md.get(k), Some(v), "{what}: {k}");
    }

    // The tensor table is the plan: names, order, shapes, types.
    let planned = plan(spec, n_vocab).unwrap();
    let names: Vec<&str> = files.tensors.iter().map(|t| t.name.as_str()).collect();
    let want: Vec<&str> = planned.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, want, "{what}");
    for (t, p) in files.tensors.iter().zip(&planned) {
        assert_eq!((&t.dims, t.ty), (&p.dims, p.ty), "{what}: {}", t.name);
    }
    let d = spec.n_embd as u64;
    let hd = c.head_dim as u64;
    let shape = |name: &str| files.tensor(name).map(|t| t.dims.clone());
    assert_eq!(shape("token_embd.weight"), Some(vec![d, n_vocab as u64]));
    assert_eq!(shape("output_norm.weight"), Some(vec![d]));
    if spec.tie_embeddings {
        assert_eq!(shape("output.weight"), None);
    } else {
        assert_eq!(shape("output.weight"), Some(vec![d, n_vocab as u64]));
    }
    let (q, kv, ff) = (
        spec.n_head as u64 * hd,
        spec.n_head_kv as u64 * hd,
        spec.n_ff as u64,
    );
    for i in 0..spec.n_layer {
        let s = |n: &str| shape(&format!("blk.{i}.{n}"));
        assert_eq!(s("attn_norm.weight"), Some(vec![d]));
        assert_eq!(s("attn_q.weight"), Some(vec![d, q]));
        assert_eq!(s("attn_k.weight"), Some(vec![d, kv]));
        assert_eq!(s("attn_v.weight"), Some(vec![d, kv]));
        assert_eq!(s("attn_output.weight"), Some(vec![q, d]));
        assert_eq!(s("ffn_norm.weight"), Some(vec![d]));
        let bias = |n: &str| s(n).is_some();
        assert_eq!(
            [
                bias("attn_q.bias"),
                bias("attn_k.bias"),
                bias("attn_v.bias")
            ],
            [spec.arch == Arch::Qwen2; 3]
        );
        if spec.arch == Arch::Qwen2 {
            assert_eq!(s("attn_q.bias"), Some(vec![q]));
            assert_eq!(s("attn_k.bias"), Some(vec![kv]));
        }
        if spec.n_expert > 0 {
            let e = spec.n_expert as u64;
            assert_eq!(s("ffn_gate_inp.weight"), Some(vec![d, e]));
            let router = files
                .tensor(&format!("blk.{i}.ffn_gate_inp.weight"))
                .unwrap();
            assert_eq!(router.ty, TensorType::F32);
            assert_eq!(s("ffn_gate_exps.weight"), Some(vec![d, ff, e]));
            assert_eq!(s("ffn_up_exps.weight"), Some(vec![d, ff, e]));
            assert_eq!(s("ffn_down_exps.weight"), Some(vec![ff, d, e]));
            assert_eq!(s("ffn_gate.weight"), None);
        } else {
            assert_eq!(s("ffn_gate.weight"), Some(vec![d, ff]));
            assert_eq!(s("ffn_up.weight"), Some(vec![d, ff]));
            assert_eq!(s("ffn_down.weight"), Some(vec![ff, d]));
        }
    }

    // The file is the header, then the tensors back to back (each at the next aligned offset).
    let h = read_header(&out).unwrap();
    let file_len = std::fs::metadata(&out).unwrap().len();
    let mut at = h.data_offset;
    for t in &files.tensors {
        assert_eq!(
            t.offset,
            at.div_ceil(h.alignment) * h.alignment,
            "{}",
            t.name
        );
        at = t.offset + t.n_bytes;
    }
    assert_eq!(file_len, at, "{what}");
    let tensor_bytes: u64 = files.tensors.iter().map(|t| t.n_bytes).sum();
    let padding = file_len - h.data_offset - tensor_bytes;
    assert!(
        padding < h.alignment * files.tensors.len() as u64,
        "{padding}"
    );
    assert_eq!(
        tensor_bytes,
        planned.iter().map(|t| t.n_bytes()).sum::<u64>()
    );
    out
}

/// Every tensor decodes to finite values with the planned mean and spread.
fn check_values(path: &Path) {
    let files = ModelFiles::open(path).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let spec_of = |name: &str| -> (f64, f64) {
        let d = files.config().unwrap().n_embd as f64;
        let t = files.tensor(name).unwrap();
        if name.ends_with("norm.weight") {
            (1.0, 0.05)
        } else if name.ends_with(".bias") {
            (0.0, 0.2)
        } else if name.ends_with("ffn_gate_inp.weight") {
            (0.0, 2.0 / d.sqrt())
        } else if name == "token_embd.weight" {
            let tied = files.tensor("output.weight").is_none();
            (0.0, if tied { 1.0 / d.sqrt() } else { 1.0 })
        } else {
            (0.0, 1.0 / (t.dims[0] as f64).sqrt())
        }
    };
    for t in &files.tensors {
        let v = values(
            &bytes[t.offset as usize..(t.offset + t.n_bytes) as usize],
            t,
        );
        assert_eq!(v.len() as u64, t.dims.iter().product::<u64>());
        assert!(v.iter().all(|x| x.is_finite()), "{}", t.name);
        let (mean, std) = mean_std(&v);
        let (want_mean, want_std) = spec_of(&t.name);
        // Small tensors (biases, norms) are noisier.
        let tol = if v.len() < 10_000 { 0.2 } else { 0.08 };
        assert!(
            (std / want_std - 1.0).abs() < tol,
            "{} ({}): std {std}, want {want_std}",
            t.name,
            t.ty
        );
        assert!(
            (mean - want_mean).abs() < 0.1 * want_std + 4.0 * want_std / (v.len() as f64).sqrt(),
            "{} ({}): mean {mean}, want {want_mean}",
            t.name,
            t.ty
        );
    }
}

/// Runs a few tokens: the logits are finite and neither flat nor one-hot.
fn check_runs(path: &Path) {
    let mut m = hypura::loader::load(path, &Default::default()).unwrap();
    let logits = m
        .model
        .forward(&[1, 17, 200, 33, 5, 90], Logits::All)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for row in &logits {
        assert!(row.iter().all(|x| x.is_finite()));
        let (_, std) = mean_std(row);
        let max = row.iter().cloned().fold(f32::MIN, f32::max);
        let z: f32 = row.iter().map(|&x| (x - max).exp()).sum();
        let p_top = 1.0 / z;
        assert!(
            (0.2..8.0).contains(&std) && p_top < 0.9,
            "{}: logit std {std}, top p {p_top}",
            path.display()
        );
    }
}

#[test]
fn llama_dense_in_several_types() {
    let dir = temp("llama");
    let vocab = fixture_vocab("small-llama");
    for ty in [
        TensorType::Q8_0,
        TensorType::F32,
        TensorType::F16,
        TensorType::Q4_0,
    ] {
        let p = write_and_check(&small(Arch::Llama, ty), &vocab, &dir);
        check_values(&p);
        check_runs(&p);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qwen2_tied_with_biases() {
    let dir = temp("qwen2");
    let vocab = fixture_vocab("small-qwen2");
    for ty in [TensorType::Q4_K, TensorType::BF16] {
        let p = write_and_check(&small(Arch::Qwen2, ty), &vocab, &dir);
        check_values(&p);
        check_runs(&p);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn moe_with_experts() {
    let dir = temp("moe");
    let vocab = fixture_vocab("small-moe");
    for ty in [TensorType::Q6_K, TensorType::Q8_0] {
        let p = write_and_check(&moe(ty), &vocab, &dir);
        check_values(&p);
        check_runs(&p);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_type_decodes_with_the_intended_scale() {
    let dir = temp("types");
    let vocab = fixture_vocab("small-llama");
    for ty in SYNTH_TYPES {
        let spec = SynthSpec {
            n_layer: 1,
            ..small(Arch::Llama, ty)
        };
        let p = write_and_check(&spec, &vocab, &dir);
        check_values(&p);
        std::fs::remove_file(&p).unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rows_that_are_not_whole_blocks_fall_back() {
    // d = 320 is not a multiple of 256: K-quant rows of length 320 fall back as in llama.cpp.
    let dir = temp("fallback");
    let vocab = fixture_vocab("small-qwen2");
    let spec = SynthSpec {
        n_embd: 320,
        n_head: 5,
        n_head_kv: 1,
        n_ff: 768,
        ..small(Arch::Qwen2, TensorType::Q4_K)
    };
    let p = write_and_check(&spec, &vocab, &dir);
    let files = ModelFiles::open(&p).unwrap();
    assert_eq!(
        files.tensor("blk.0.attn_q.weight").unwrap().ty,
        TensorType::Q5_0
    );
    assert_eq!(
        files.tensor("blk.0.ffn_down.weight").unwrap().ty,
        TensorType::Q4_K
    );
    check_values(&p);
    check_runs(&p);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn same_seed_same_file_and_bad_specs_are_errors() {
    let dir = temp("seed");
    let vocab = fixture_vocab("small-llama");
    let spec = small(Arch::Llama, TensorType::Q4_K);
    let (a, b) = (dir.join("a.gguf"), dir.join("b.gguf"));
    write_model(&spec, &vocab, &a).unwrap();
    write_model(&spec, &vocab, &b).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let c = dir.join("c.gguf");
    write_model(
        &SynthSpec {
            seed: 43,
            ..spec.clone()
        },
        &vocab,
        &c,
    )
    .unwrap();
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
    for (bad, needle) in [
        (
            SynthSpec {
                n_head: 7,
                ..spec.clone()
            },
            "heads",
        ),
        (
            SynthSpec {
                n_head_kv: 3,
                ..spec.clone()
            },
            "KV heads",
        ),
        (
            SynthSpec {
                n_expert: 4,
                n_expert_used: 5,
                ..spec.clone()
            },
            "experts",
        ),
        (
            SynthSpec {
                ty: TensorType::Q8_K,
                ..spec.clone()
            },
            "Q8_K",
        ),
        (
            SynthSpec {
                n_layer: 0,
                ..spec.clone()
            },
            "non-zero",
        ),
    ] {
        let out = dir.join("bad.gguf");
        let e = write_model(&bad, &vocab, &out).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
        assert!(!out.exists());
    }
    // No leftovers from the atomic write.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_bundled_model_is_what_the_example_writes() {
    // Regenerating it as examples/make_bundled_model.rs does gives the committed bytes.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bundled = root.join("models/hypura-tiny-random-Q8_0.gguf");
    let dir = temp("bundled");
    let again = dir.join("again.gguf");
    write_model(&SynthSpec::bundled(), &fixture_vocab("small-llama"), &again).unwrap();
    assert!(
        std::fs::read(&again).unwrap() == std::fs::read(&bundled).unwrap(),
        "models/ is stale: run `cargo run --release --example make_bundled_model`"
    );
    let files = ModelFiles::open(&bundled).unwrap();
    let c = files.config().unwrap();
    assert_eq!(
        (
            c.arch,
            c.n_embd,
            c.n_layer,
            c.n_ff,
            c.n_head,
            c.n_head_kv,
            c.n_vocab
        ),
        (Arch::Llama, 256, 4, 768, 8, 2, 512)
    );
    assert!(files
        .tensors
        .iter()
        .all(|t| t.ty == TensorType::Q8_0 || t.dims.len() == 1));
    check_values(&bundled);
    check_runs(&bundled);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Throughput of generating tensors in memory and of writing a model of ~0.5-2 GB
/// (`cargo test --release --test synth write_speed -- --ignored --nocapture`).
#[test]
#[ignore]
fn write_speed() {
    for ty in SYNTH_TYPES {
        let n = 1u64 << 26;
        let start = std::time::Instant::now();
        let b = hypura::synth::random_tensor_bytes(ty, n, 0.0, 0.02, 1);
        let s = start.elapsed().as_secs_f64();
        eprintln!(
            "{ty}: {:.0} M elements/s ({:.0} MB/s) in memory",
            n as f64 / 1e6 / s,
            b.len() as f64 / 1e6 / s
        );
    }
    let dir = temp("speed");
    let vocab = fixture_vocab("small-llama");
    for ty in [TensorType::Q4_K, TensorType::Q8_0, TensorType::F16] {
        let spec = SynthSpec {
            n_embd: 2048,
            n_layer: 16,
            n_ff: 8192,
            n_head: 16,
            n_head_kv: 4,
            ..small(Arch::Llama, ty)
        };
        let out = dir.join("big.gguf");
        let start = std::time::Instant::now();
        write_model(&spec, &vocab, &out).unwrap();
        let s = start.elapsed().as_secs_f64();
        let bytes = std::fs::metadata(&out).unwrap().len();
        eprintln!(
            "{ty}: {:.2} GB file in {s:.2} s = {:.0} MB/s",
            bytes as f64 / 1e9,
            bytes as f64 / 1e6 / s
        );
        std::fs::remove_file(&out).unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Share of expert uses that went to each layer's two most used experts, averaged over layers,
/// over `n` decoded tokens.
fn top2_share(path: &Path, n: usize) -> f64 {
    use hypura::plan::{is_expert_tensor, Placement, TierKind};
    use hypura::storage::{ExpertCacheConfig, WeightStore};
    let files = ModelFiles::open(path).unwrap();
    let cfg = files.config().unwrap();
    let tiers = files
        .tensors
        .iter()
        .filter(|t| is_expert_tensor(&t.name))
        .map(|t| (t.name.clone(), TierKind::Nvme))
        .collect();
    let mut placement = Placement::new(&files, tiers, 1);
    placement.expert_cache = ExpertCacheConfig {
        slots: cfg.n_layer * cfg.n_expert,
        ..Default::default()
    };
    let store = WeightStore::with_placement(files, &Device::Cpu, placement).unwrap();
    let mut model = hypura::models::Transformer::load(&store, &cfg, n + 1).unwrap();
    let cache = store.expert_cache().unwrap().clone();
    cache.record_trace(true);
    for i in 0..n {
        model
            .forward(&[(i * 37 % 500 + 3) as u32], Logits::Last)
            .unwrap();
    }
    let mut counts = vec![vec![0u32; cfg.n_expert]; cfg.n_layer];
    for t in cache.trace() {
        for e in t.experts {
            counts[t.layer][e] += 1;
        }
    }
    let shares: Vec<f64> = counts
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c.sort_unstable_by(|a, b| b.cmp(a));
            (c[0] + c[1]) as f64 / c.iter().sum::<u32>() as f64
        })
        .collect();
    shares.iter().sum::<f64>() / shares.len() as f64
}

#[test]
fn synthetic_routing_skews_expert_popularity() {
    let dir = temp("routing");
    let vocab = fixture_vocab("small-moe");
    let base = SynthSpec {
        n_layer: 4,
        n_expert: 8,
        n_expert_used: 2,
        ..moe(TensorType::Q8_0)
    };
    let uniform = write_and_check(&base, &vocab, &dir);
    let skewed_spec = SynthSpec {
        name: "skewed".into(),
        routing: hypura::synth::RoutingSpec {
            skew: 2.0,
            layer_corr: 0.8,
        },
        ..base.clone()
    };
    let skewed = dir.join("skewed.gguf");
    write_model(&skewed_spec, &vocab, &skewed).unwrap();
    check_runs(&skewed);
    // Top-2 of 8 experts: a quarter of the uses if routing were uniform.
    let (u, s) = (top2_share(&uniform, 48), top2_share(&skewed, 48));
    assert!(u < 0.45, "plain random routers: top-2 share {u}");
    assert!(
        s > 0.6 && s > u + 0.2,
        "skewed routers: top-2 share {s} (uniform {u})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
