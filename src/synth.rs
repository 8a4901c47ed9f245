//! Synthetic models: GGUF files with random weights and the exact tensor names, shapes and types
//! of a real architecture. Quantized blocks are written directly (random codes with sane scales),
//! with no float quantization pass, so large models are written at disk speed.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::gguf::{Arch, GgufWriter, Metadata, TensorData, TensorType, Value};

/// The shape of a synthetic model.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub arch: Arch,
    pub name: String,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// 0 for a dense model.
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub rope_freq_base: f32,
    pub rms_eps: f32,
    pub ctx_len: usize,
    /// Type of the large matrices (norms, biases and routers are F32).
    pub ty: TensorType,
    pub seed: u64,
}

/// Types [`write_model`] can generate.
pub const SYNTH_TYPES: [TensorType; 3] = [TensorType::F32, TensorType::F16, TensorType::Q8_0];

struct Planned {
    name: String,
    dims: Vec<u64>,
    ty: TensorType,
    /// Standard deviation of the values; `None` = a norm weight (1 + small noise).
    std: Option<f32>,
}

fn plan(spec: &SynthSpec, n_vocab: usize) -> Vec<Planned> {
    let (d, ff) = (spec.n_embd as u64, spec.n_ff as u64);
    let hd = (spec.n_embd / spec.n_head) as u64;
    let (q, kv) = (spec.n_head as u64 * hd, spec.n_head_kv as u64 * hd);
    let v = n_vocab as u64;
    let mat = |name: String, dims: Vec<u64>, ty| {
        let fan_in = dims[0] as f32;
        Planned {
            name,
            dims,
            ty,
            std: Some(1.0 / fan_in.sqrt()),
        }
    };
    let norm = |name: String, n: u64| Planned {
        name,
        dims: vec![n],
        ty: TensorType::F32,
        std: None,
    };
    let mut t = vec![Planned {
        name: "token_embd.weight".into(),
        dims: vec![d, v],
        ty: spec.ty,
        std: Some(1.0),
    }];
    t.push(norm("output_norm.weight".into(), d));
    if spec.arch == Arch::Llama {
        t.push(mat("output.weight".into(), vec![d, v], spec.ty));
    }
    for i in 0..spec.n_layer {
        let n = |s: &str| format!("blk.{i}.{s}");
        t.push(norm(n("attn_norm.weight"), d));
        t.push(mat(n("attn_q.weight"), vec![d, q], spec.ty));
        t.push(mat(n("attn_k.weight"), vec![d, kv], spec.ty));
        t.push(mat(n("attn_v.weight"), vec![d, kv], spec.ty));
        if spec.arch == Arch::Qwen2 {
            for (b, len) in [("attn_q.bias", q), ("attn_k.bias", kv), ("attn_v.bias", kv)] {
                t.push(Planned {
                    name: n(b),
                    dims: vec![len],
                    ty: TensorType::F32,
                    std: Some(0.2),
                });
            }
        }
        t.push(mat(n("attn_output.weight"), vec![q, d], spec.ty));
        t.push(norm(n("ffn_norm.weight"), d));
        if spec.n_expert > 0 {
            let e = spec.n_expert as u64;
            t.push(Planned {
                name: n("ffn_gate_inp.weight"),
                dims: vec![d, e],
                ty: TensorType::F32,
                std: Some(2.0 / (d as f32).sqrt()),
            });
            t.push(mat(n("ffn_gate_exps.weight"), vec![d, ff, e], spec.ty));
            t.push(mat(n("ffn_up_exps.weight"), vec![d, ff, e], spec.ty));
            t.push(mat(n("ffn_down_exps.weight"), vec![ff, d, e], spec.ty));
        } else {
            t.push(mat(n("ffn_gate.weight"), vec![d, ff], spec.ty));
            t.push(mat(n("ffn_up.weight"), vec![d, ff], spec.ty));
            t.push(mat(n("ffn_down.weight"), vec![ff, d], spec.ty));
        }
    }
    t
}

/// Writes the model `spec` to `out`, copying every `tokenizer.*` key from `vocab`.
pub fn write_model(spec: &SynthSpec, vocab: &Metadata, out: &Path) -> Result<()> {
    if !SYNTH_TYPES.contains(&spec.ty) {
        return Err(Error::InvalidRequest(format!(
            "synth cannot write {} weights yet",
            spec.ty
        )));
    }
    if spec.n_head == 0
        || !spec.n_embd.is_multiple_of(spec.n_head)
        || spec.n_head_kv == 0
        || !spec.n_head.is_multiple_of(spec.n_head_kv)
    {
        return Err(Error::InvalidRequest(
            "heads must divide the embedding and KV heads must divide heads".into(),
        ));
    }
    let n_vocab = vocab.str_array("tokenizer.ggml.tokens")?.len();
    let arch = spec.arch.gguf_name();
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(arch.into()));
    w.set("general.name", Value::String(spec.name.clone()));
    w.set(
        "general.file_type",
        Value::U32(match spec.ty {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            _ => 7,
        }),
    );
    let k = |s: &str| format!("{arch}.{s}");
    w.set(&k("context_length"), Value::U32(spec.ctx_len as u32));
    w.set(&k("embedding_length"), Value::U32(spec.n_embd as u32));
    w.set(&k("block_count"), Value::U32(spec.n_layer as u32));
    w.set(&k("feed_forward_length"), Value::U32(spec.n_ff as u32));
    w.set(&k("attention.head_count"), Value::U32(spec.n_head as u32));
    w.set(
        &k("attention.head_count_kv"),
        Value::U32(spec.n_head_kv as u32),
    );
    w.set(
        &k("attention.layer_norm_rms_epsilon"),
        Value::F32(spec.rms_eps),
    );
    w.set(&k("rope.freq_base"), Value::F32(spec.rope_freq_base));
    w.set(
        &k("rope.dimension_count"),
        Value::U32((spec.n_embd / spec.n_head) as u32),
    );
    w.set(&k("vocab_size"), Value::U32(n_vocab as u32));
    if spec.n_expert > 0 {
        w.set(&k("expert_count"), Value::U32(spec.n_expert as u32));
        w.set(
            &k("expert_used_count"),
            Value::U32(spec.n_expert_used as u32),
        );
    }
    for (key, value) in &vocab.entries {
        if key.starts_with("tokenizer.") {
            w.set(key, value.clone());
        }
    }
    for (i, t) in plan(spec, n_vocab).into_iter().enumerate() {
        let seed = spec.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let n: u64 = t.dims.iter().product();
        let (ty, std) = (t.ty, t.std);
        let producer = move |out: &mut dyn Write| -> std::io::Result<()> {
            write_random(out, ty, n, std, seed)
        };
        w.add_tensor(
            &t.name,
            t.ty,
            &t.dims,
            TensorData::Producer(Box::new(producer)),
        );
    }
    let tmp = out.with_extension("gguf.tmp");
    let f = std::fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, 0, e))?;
    let mut buf = std::io::BufWriter::with_capacity(1 << 20, f);
    w.write(&mut buf)
        .map_err(|e| Error::io("write", &tmp, 0, e))?;
    buf.flush().map_err(|e| Error::io("write", &tmp, 0, e))?;
    std::fs::rename(&tmp, out).map_err(|e| Error::io("rename", &tmp, 0, e))?;
    Ok(())
}

/// Streams `n` random values of type `ty`: N(0, std²) (approximately), or `1 + 0.05·N(0, 1)` for
/// norms (`std = None`).
fn write_random(
    out: &mut dyn Write,
    ty: TensorType,
    n: u64,
    std: Option<f32>,
    seed: u64,
) -> std::io::Result<()> {
    let mut rng = Rng(seed | 1);
    let mut buf = Vec::with_capacity(1 << 16);
    let mut written = 0u64;
    while written < n {
        buf.clear();
        match ty {
            TensorType::Q8_0 => {
                // 32 int8 codes with a scale: value = d · q, q ≈ N(0, 42²) clipped to ±127.
                let d = half::f16::from_f32(std.unwrap_or(1.0) / 42.0);
                for _ in 0..256 {
                    buf.extend(d.to_le_bytes());
                    for _ in 0..32 {
                        buf.push((rng.normal() * 42.0).round().clamp(-127.0, 127.0) as i8 as u8);
                    }
                }
                written += 256 * 32;
            }
            TensorType::F16 => {
                for _ in 0..4096 {
                    buf.extend(half::f16::from_f32(value(&mut rng, std)).to_le_bytes());
                }
                written += 4096;
            }
            _ => {
                for _ in 0..4096 {
                    buf.extend(value(&mut rng, std).to_le_bytes());
                }
                written += 4096;
            }
        }
        let over = written.saturating_sub(n) as usize;
        let elem_bytes = ty.block_bytes() / ty.block_elems().max(1);
        let keep = if ty.is_quantized() {
            buf.len() - over / 32 * ty.block_bytes()
        } else {
            buf.len() - over * elem_bytes
        };
        out.write_all(&buf[..keep])?;
    }
    Ok(())
}

fn value(rng: &mut Rng, std: Option<f32>) -> f32 {
    match std {
        Some(s) => rng.normal() * s,
        None => 1.0 + 0.05 * rng.normal(),
    }
}

/// xorshift64* with a Box-Muller normal.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}
