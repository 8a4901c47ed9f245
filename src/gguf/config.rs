//! The typed configuration of a model, read once from GGUF metadata and the tensor table.

use super::ModelFiles;
use crate::error::{Error, Result};

/// Architectures hypura runs. Mixtral-style MoE models are `llama` files with experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub const SUPPORTED: &'static str =
        "llama (Llama 2/3.x, Mistral, Mixtral MoE), qwen2 (Qwen2, Qwen2.5)";

    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])` (llama.cpp's `LLAMA_ROPE_TYPE_NORM`).
    Interleaved,
    /// Halves `(x[i], x[i + d/2])` (llama.cpp's `NEOX`, used by Qwen2).
    HalfSplit,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub name: String,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope_style: RopeStyle,
    pub rope_dim: usize,
    pub rope_freq_base: f32,
    /// Positions are multiplied by this (linear RoPE scaling; 1.0 when none).
    pub rope_freq_scale: f32,
    /// Number of experts per MoE layer (0 for dense models).
    pub n_expert: usize,
    pub n_expert_used: usize,
}

impl ModelConfig {
    pub fn is_moe(&self) -> bool {
        self.n_expert > 0
    }

    pub fn from_files(files: &ModelFiles) -> Result<Self> {
        let md = &files.metadata;
        let path = files.path().to_path_buf();
        let unsupported = |reason: String| Error::Unsupported {
            path: path.clone(),
            reason,
        };
        let arch_name = md.str("general.architecture")?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(unsupported(format!(
                    "architecture '{other}' is not supported; hypura runs {}",
                    Arch::SUPPORTED
                )))
            }
        };
        let k = |s: &str| format!("{arch_name}.{s}");
        let n_embd = md.usize(&k("embedding_length"))?;
        let n_layer = md.usize(&k("block_count"))?;
        let n_ff = md.usize(&k("feed_forward_length"))?;
        let n_head = md.usize(&k("attention.head_count"))?;
        let n_head_kv = md
            .usize_opt(&k("attention.head_count_kv"))?
            .unwrap_or(n_head);
        let bad = |key: &str, reason: String| Error::Metadata {
            path: path.clone(),
            key: k(key),
            reason,
        };
        if n_head == 0 || n_head > 4096 {
            return Err(bad(
                "attention.head_count",
                format!("{n_head} heads is not a valid head count"),
            ));
        }
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(bad(
                "attention.head_count_kv",
                format!("{n_head_kv} KV heads must divide the {n_head} query heads"),
            ));
        }
        if n_embd == 0 || n_embd > 1 << 20 || n_layer == 0 || n_layer > 4096 || n_ff > 1 << 22 {
            return Err(unsupported(format!(
                "implausible dimensions: embedding {n_embd}, layers {n_layer}, feed-forward {n_ff}"
            )));
        }
        let head_dim = match md.usize_opt(&k("attention.key_length"))? {
            Some(d) => d,
            None if n_embd % n_head == 0 => n_embd / n_head,
            None => {
                return Err(bad(
                    "embedding_length",
                    format!("{n_embd} is not a multiple of {n_head} heads"),
                ))
            }
        };
        if head_dim == 0 || head_dim > 1 << 14 {
            return Err(bad(
                "attention.key_length",
                format!("head size {head_dim} is not valid"),
            ));
        }
        let rope_dim = md
            .usize_opt(&k("rope.dimension_count"))?
            .unwrap_or(head_dim);
        if rope_dim % 2 != 0 || rope_dim > head_dim || head_dim % 2 != 0 {
            return Err(bad(
                "rope.dimension_count",
                format!("{rope_dim} does not fit head size {head_dim}"),
            ));
        }
        let mut rope_freq_scale = 1.0;
        match md.str_opt(&k("rope.scaling.type"))? {
            None | Some("none") => {}
            Some("linear") => {
                let f = md.f32_opt(&k("rope.scaling.factor"))?.unwrap_or(1.0);
                if f > 0.0 {
                    rope_freq_scale = 1.0 / f;
                }
            }
            Some(other) => return Err(unsupported(format!("RoPE scaling '{other}' is not supported (none, linear, and Llama-3 rope_freqs are)"))),
        }
        let n_expert = md.usize_opt(&k("expert_count"))?.unwrap_or(0);
        let n_expert_used = md.usize_opt(&k("expert_used_count"))?.unwrap_or(0);
        if n_expert > 0 && (n_expert_used == 0 || n_expert_used > n_expert || n_expert > 1024) {
            return Err(bad(
                "expert_used_count",
                format!("{n_expert_used} of {n_expert} experts per token is not valid"),
            ));
        }
        let rms_eps = md
            .f32_opt(&k("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);
        if !(rms_eps.is_finite() && rms_eps >= 0.0) {
            return Err(bad(
                "attention.layer_norm_rms_epsilon",
                format!("{rms_eps} is not a valid epsilon"),
            ));
        }
        let rope_freq_base = md.f32_opt(&k("rope.freq_base"))?.unwrap_or(10000.0);
        if !(rope_freq_base.is_finite() && rope_freq_base > 0.0) {
            return Err(bad(
                "rope.freq_base",
                format!("{rope_freq_base} is not a valid RoPE base"),
            ));
        }
        let embd = files
            .tensor("token_embd.weight")
            .ok_or_else(|| Error::Tensor {
                path: path.clone(),
                name: "token_embd.weight".into(),
                reason: "missing".into(),
            })?;
        let n_vocab = embd.dims.get(1).copied().unwrap_or(0) as usize;
        if embd.dims.len() != 2 || embd.dims[0] as usize != n_embd || n_vocab == 0 {
            return Err(Error::Tensor {
                path,
                name: "token_embd.weight".into(),
                reason: format!(
                    "shape {:?} does not match embedding length {n_embd}",
                    embd.dims
                ),
            });
        }
        Ok(ModelConfig {
            arch,
            name: md.str_opt("general.name")?.unwrap_or("").to_string(),
            n_vocab,
            n_embd,
            n_layer,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            n_ctx_train: md.usize_opt(&k("context_length"))?.unwrap_or(4096),
            rms_eps,
            rope_style: match arch {
                Arch::Llama => RopeStyle::Interleaved,
                Arch::Qwen2 => RopeStyle::HalfSplit,
            },
            rope_dim,
            rope_freq_base,
            rope_freq_scale,
            n_expert,
            n_expert_used,
        })
    }
}
