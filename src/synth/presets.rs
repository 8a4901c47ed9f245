//! Real model shapes for `hypura synth`: the exact tensor names, shapes and per-tensor quant types
//! of well-known models, with random weights — so benchmarks (and users sizing a machine) get
//! real-size files without a 40 GB download.

use super::SynthSpec;
use crate::error::{Error, Result};
use crate::gguf::{Arch, Metadata, TensorType, Value};

/// A named real architecture.
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    pub spec: SynthSpec,
    pub n_vocab: usize,
}

fn llama(name: &str, d: usize, layers: usize, ff: usize, heads: usize, kv: usize) -> SynthSpec {
    SynthSpec {
        arch: Arch::Llama,
        name: format!("{name} (synthetic, random weights)"),
        n_embd: d,
        n_layer: layers,
        n_ff: ff,
        n_head: heads,
        n_head_kv: kv,
        rope_freq_base: 500000.0,
        rms_eps: 1e-5,
        ctx_len: 8192,
        ..SynthSpec::default()
    }
}

/// Every preset.
pub fn presets() -> Vec<Preset> {
    vec![
        Preset {
            name: "llama-3-8b",
            about: "Llama 3 / 3.1 8B",
            spec: llama("Llama-3-8B", 4096, 32, 14336, 32, 8),
            n_vocab: 128256,
        },
        Preset {
            name: "llama-3-70b",
            about: "Llama 3 / 3.1 70B",
            spec: llama("Llama-3-70B", 8192, 80, 28672, 64, 8),
            n_vocab: 128256,
        },
        Preset {
            name: "qwen2.5-14b",
            about: "Qwen2.5 14B",
            spec: SynthSpec {
                arch: Arch::Qwen2,
                rope_freq_base: 1e6,
                rms_eps: 1e-6,
                ctx_len: 32768,
                ..llama("Qwen2.5-14B", 5120, 48, 13824, 40, 8)
            },
            n_vocab: 152064,
        },
        Preset {
            name: "mixtral-8x7b",
            about: "Mixtral 8x7B (8 experts, top-2)",
            spec: SynthSpec {
                n_expert: 8,
                n_expert_used: 2,
                rope_freq_base: 1e6,
                ctx_len: 32768,
                ..llama("Mixtral-8x7B", 4096, 32, 14336, 32, 8)
            },
            n_vocab: 32000,
        },
        Preset {
            name: "llama-1b",
            about: "a ~1B Llama (d 2048, 16 layers)",
            spec: llama("Llama-1B", 2048, 16, 5632, 32, 4),
            n_vocab: 32000,
        },
    ]
}

pub fn preset(name: &str) -> Result<Preset> {
    presets()
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| {
            let names: Vec<_> = presets().iter().map(|p| p.name).collect();
            Error::InvalidRequest(format!(
                "unknown preset '{name}' (known: {})",
                names.join(", ")
            ))
        })
}

/// `Q4_K_M` → (Q4_K, k-medium mix); `Q8_0` → (Q8_0, uniform); names as llama-quantize takes them.
pub fn file_type(name: &str) -> Result<(TensorType, bool)> {
    let up = name.to_ascii_uppercase();
    let (base, medium) = match up.strip_suffix("_M") {
        Some(b) if b.ends_with("_K") => (b.to_string(), true),
        _ => (up.strip_suffix("_S").unwrap_or(&up).to_string(), false),
    };
    let ty = super::SYNTH_TYPES
        .into_iter()
        .find(|t| t.name() == base)
        .ok_or_else(|| {
            Error::InvalidRequest(format!(
                "unknown or unsupported type '{name}' (e.g. Q4_K_M, Q5_K_M, Q8_0, Q4_0, F16)"
            ))
        })?;
    Ok((ty, medium))
}

/// `base`'s byte-level BPE vocabulary padded with unused tokens to `n` entries, so embedding and
/// output matrices have the real model's size. The padding tokens are never produced.
pub fn padded_vocab(base: &Metadata, n: usize) -> Result<Metadata> {
    let tokens = base.str_array("tokenizer.ggml.tokens")?;
    if n < tokens.len() {
        return Err(Error::InvalidRequest(format!(
            "vocabulary of {n} is smaller than the base's {}",
            tokens.len()
        )));
    }
    let mut md = base.clone();
    let mut toks: Vec<Value> = tokens
        .iter()
        .map(|t| Value::String(t.to_string()))
        .collect();
    let mut types: Vec<Value> = if base.has("tokenizer.ggml.token_type") {
        base.i64_array("tokenizer.ggml.token_type")?
            .into_iter()
            .map(|t| Value::I32(t as i32))
            .collect()
    } else {
        vec![Value::I32(1); toks.len()]
    };
    for i in toks.len()..n {
        toks.push(Value::String(format!("<|synth_unused_{i}|>")));
        types.push(Value::I32(5));
    }
    md.entries
        .insert("tokenizer.ggml.tokens".into(), Value::Array(toks));
    md.entries
        .insert("tokenizer.ggml.token_type".into(), Value::Array(types));
    if base.has("tokenizer.ggml.scores") {
        let mut scores: Vec<Value> = base
            .f32_array("tokenizer.ggml.scores")?
            .into_iter()
            .map(Value::F32)
            .collect();
        scores.resize(n, Value::F32(-1e9));
        md.entries
            .insert("tokenizer.ggml.scores".into(), Value::Array(scores));
    }
    Ok(md)
}
