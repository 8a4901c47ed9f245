//! Shared test helpers: fixture discovery, llama.cpp reference loading, logit comparisons, and the
//! macro that runs a numeric test on every compiled backend.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use hypura::gguf::ModelFiles;
use hypura::models::{LanguageModel, Logits, Transformer};
use hypura::storage::WeightStore;

/// Runs `$body(&Device)` as one test per compiled backend: CPU always, CUDA with `--features cuda`,
/// Metal with `--features metal`.
#[macro_export]
macro_rules! on_every_backend {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn cpu() {
                super::$body(&candle_core::Device::Cpu)
            }
            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                super::$body(&candle_core::Device::new_cuda(0).expect("CUDA device 0"))
            }
            #[cfg(feature = "metal")]
            #[test]
            fn metal() {
                super::$body(&candle_core::Device::new_metal(0).expect("Metal device 0"))
            }
        }
    };
}

/// `tests/fixtures` of this checkout, or `$HYPURA_FIXTURES` (test binaries run on another
/// machine, e.g. the GPU box, where the build's path does not exist).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("HYPURA_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

/// Every fixture GGUF that has a llama.cpp reference next to it, sorted.
pub fn fixture_models() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![fixtures_dir()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("fixtures dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "gguf") && ref_json_path(&p).exists() {
                out.push(p);
            }
        }
    }
    out.sort();
    // The GPU run carries a subset of the fixtures (its tree must travel small) and says how many.
    let min = std::env::var("HYPURA_FIXTURES_MIN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(14);
    assert!(
        out.len() >= min,
        "expected the oracle fixtures, found {}",
        out.len()
    );
    out
}

pub fn ref_json_path(gguf: &Path) -> PathBuf {
    gguf.with_extension("ref.json")
}

pub fn reference(gguf: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(ref_json_path(gguf)).expect("ref.json");
    serde_json::from_str(&text).expect("ref.json parses")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// `X.ref.json` → `X.<suffix>` (e.g. `ref.logits.npy`).
pub fn sibling(gguf: &Path, suffix: &str) -> PathBuf {
    let stem = gguf.file_stem().unwrap().to_string_lossy().to_string();
    gguf.with_file_name(format!("{stem}.{suffix}"))
}

pub fn read_npy_2d(path: &Path) -> Vec<Vec<f32>> {
    Tensor::read_npy(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_vec2()
        .unwrap()
}

pub fn is_f32_model(gguf: &Path) -> bool {
    gguf.to_string_lossy().ends_with("-F32.gguf")
}

pub fn load(gguf: &Path, device: &Device, n_ctx: usize) -> Transformer {
    let files = ModelFiles::open(gguf).unwrap();
    let cfg = files.config().unwrap();
    let store = WeightStore::open(files, device).unwrap();
    Transformer::load(&store, &cfg, n_ctx).unwrap()
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// Logit error a quantized file may show against llama.cpp's same-quant reference. The oracle
/// measured 0.04–0.12 max |Δ| between exact F32 math and llama.cpp's quantized-activation
/// products on these fixtures, and 0.04–0.16 for llama.cpp against itself when only its KV-cache
/// type changes (`../shared/oracle/README.md`, "Tolerances"); GPU kernels (Q8_1 activations, or
/// in-kernel dequantization) land in the same range.
pub const QUANT_MAX_ABS: f32 = 0.25;

/// A reference top-2 margin this small is a near-tie: errors within [`QUANT_MAX_ABS`]'s measured
/// range can flip its argmax, so a different top-1 there is not a decisive disagreement.
pub const NEAR_TIE: f32 = 0.15;

/// How two `[positions][vocab]` logit sets compare.
#[derive(Debug)]
pub struct Comparison {
    pub min_cosine: f64,
    pub max_abs: f32,
    pub top1_agree: usize,
    /// Positions where the top-1 differs although the reference's top-2 margin exceeds
    /// [`NEAR_TIE`].
    pub top1_decisive_miss: usize,
    pub n: usize,
}

/// The margin between the largest and second-largest values.
pub fn top2_gap(v: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in v {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a - b
}

pub fn compare(ours: &[Vec<f32>], theirs: &[Vec<f32>]) -> Comparison {
    assert_eq!(ours.len(), theirs.len(), "position count");
    let mut c = Comparison {
        min_cosine: 1.0,
        max_abs: 0.0,
        top1_agree: 0,
        top1_decisive_miss: 0,
        n: ours.len(),
    };
    for (a, b) in ours.iter().zip(theirs) {
        assert_eq!(a.len(), b.len(), "vocab size");
        c.min_cosine = c.min_cosine.min(cosine(a, b));
        for (x, y) in a.iter().zip(b) {
            c.max_abs = c.max_abs.max((x - y).abs());
        }
        let agree = argmax(a) == argmax(b);
        c.top1_agree += agree as usize;
        c.top1_decisive_miss += (!agree && top2_gap(b) > NEAR_TIE) as usize;
    }
    c
}

/// The bar, the same on every backend: cosine ≥ 0.999 everywhere; F32 files max |Δ| ≤ 1e-2 and
/// top-1 100 %; quantized files max |Δ| ≤ [`QUANT_MAX_ABS`] and top-1 ≥ 90 %, where a different
/// top-1 at a near-tie of the reference (margin ≤ [`NEAR_TIE`]) is not counted against it (on
/// random-weight models many positions are near-ties: small-llama-Q6_K has 9 of 32 decode
/// positions with a margin under 0.06).
pub fn assert_close(what: &str, gguf: &Path, c: &Comparison) {
    let name = gguf.file_name().unwrap().to_string_lossy();
    assert!(
        c.min_cosine >= 0.999,
        "{name} {what}: min cosine {} < 0.999 ({c:?})",
        c.min_cosine
    );
    if is_f32_model(gguf) {
        assert!(
            c.max_abs <= 1e-2,
            "{name} {what}: max |Δ| {} > 1e-2",
            c.max_abs
        );
        assert_eq!(
            c.top1_agree, c.n,
            "{name} {what}: top-1 {}/{}",
            c.top1_agree, c.n
        );
    } else {
        assert!(
            c.max_abs <= QUANT_MAX_ABS,
            "{name} {what}: max |Δ| {} > {QUANT_MAX_ABS}",
            c.max_abs
        );
        assert!(
            (c.n - c.top1_decisive_miss) * 10 >= c.n * 9,
            "{name} {what}: top-1 differs at {} of {} positions beyond near-ties ({c:?})",
            c.top1_decisive_miss,
            c.n
        );
    }
}

/// `[positions][vocab]` logits.
pub type Logit = Vec<Vec<f32>>;

/// From an empty KV cache: the logits of the reference's fixed prompt (one batch), then of its
/// first `n_decode` greedy tokens fed one at a time (the KV-cache path). `reference` is the
/// `.ref.json` of the fixture the model was made from.
pub fn prompt_then_decode(
    model: &mut Transformer,
    reference: &serde_json::Value,
    n_decode: usize,
) -> (Logit, Logit) {
    let prompt = ids(&reference["fixed_prompt"]["ids"]);
    let greedy = ids(&reference["fixed_prompt"]["greedy_ids"]);
    model.reset();
    let p: Logit = model
        .forward(&prompt, Logits::All)
        .unwrap()
        .to_vec2()
        .unwrap();
    let d: Logit = greedy[..n_decode]
        .iter()
        .map(|&id| {
            let l = model.forward(&[id], Logits::Last).unwrap();
            l.to_vec2::<f32>().unwrap().remove(0)
        })
        .collect();
    (p, d)
}
