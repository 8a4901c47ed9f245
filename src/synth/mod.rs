//! Synthetic models: GGUF files with random weights and the exact tensor names, shapes and types
//! of a real architecture (llama.cpp's layout), for tests, benchmarks and the bundled model.
//!
//! Quantized tensors are written *directly as blocks* — random codes from a rounded, clipped
//! normal distribution with random per-block and per-sub-block scales — with no float
//! quantization pass, and every tensor is streamed through a [`TensorData::Producer`] in chunks
//! generated in parallel. A model of any size is therefore written at about disk speed and never
//! sits in memory, and the output depends only on the spec and seed (not on the thread count).
//!
//! Scales: a matrix with fan-in `n` (its row length, ggml `dims[0]`) has entries with mean 0 and
//! standard deviation `1/sqrt(n)`, so it maps a unit-RMS vector to a unit-RMS vector; RMSNorm
//! weights are `1 + 0.05·N(0, 1)`; Qwen2 Q/K/V biases `N(0, 0.2²)`; the MoE router has standard
//! deviation `2/sqrt(n_embd)` (stored F32, as llama.cpp does). The token embedding has unit
//! standard deviation, or `1/sqrt(n_embd)` when it doubles as the output matrix (tied), so the
//! logits have about unit spread either way.
//!
//! A row whose length is not a whole number of the requested type's blocks falls back as
//! llama.cpp's quantizer does: `Q4_K` → `Q5_0`, `Q5_K` → `Q5_1`, `Q6_K` → `Q8_0`, `Q2_K`/`Q3_K` →
//! `Q4_0`, and to `F16` if that still does not fit.

use std::io::Write;
use std::path::Path;

mod blocks;
mod presets;
mod routing;

pub(crate) use blocks::mix;
pub use blocks::random_tensor_bytes;
use blocks::write_random;

pub use presets::{file_type as parse_file_type, padded_vocab, preset, presets, Preset};
pub use routing::RoutingSpec;

use crate::error::{Error, Result};
use crate::gguf::{Arch, GgufWriter, Metadata, TensorData, TensorType, Value};

/// The shape of a synthetic model.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSpec {
    pub arch: Arch,
    /// `general.name`.
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
    /// No `output.weight`: the token embedding doubles as the output matrix (small Qwen2 models,
    /// Llama 3.2 1B/3B).
    pub tie_embeddings: bool,
    /// Type of the large matrices (embedding, attention, feed-forward, output). Norms, biases and
    /// the MoE router are always F32.
    pub ty: TensorType,
    /// llama.cpp's `_M` mixes: `output`, and `attn_v` / `ffn_down` in the layers llama-quantize
    /// gives more bits, are Q6_K (e.g. Q4_K_M = Q4_K + Q6_K).
    pub k_medium: bool,
    pub seed: u64,
    /// MoE: synthetic routing statistics (default: plain random routers, nearly uniform).
    pub routing: RoutingSpec,
}

impl Default for SynthSpec {
    /// The bundled model's shape: llama, d 256, 4 layers, ff 768, 8 heads / 2 KV heads, Q8_0.
    fn default() -> Self {
        SynthSpec {
            arch: Arch::Llama,
            name: "hypura synthetic (random weights)".into(),
            n_embd: 256,
            n_layer: 4,
            n_ff: 768,
            n_head: 8,
            n_head_kv: 2,
            n_expert: 0,
            n_expert_used: 0,
            rope_freq_base: 10000.0,
            rms_eps: 1e-5,
            ctx_len: 2048,
            tie_embeddings: false,
            ty: TensorType::Q8_0,
            k_medium: false,
            seed: 0,
            routing: RoutingSpec::default(),
        }
    }
}

impl SynthSpec {
    /// The spec of the model bundled in `models/` (`examples/make_bundled_model.rs` writes it with
    /// the vocabulary of the `small-llama` test fixture).
    pub fn bundled() -> Self {
        SynthSpec {
            name: "hypura tiny random (weights are random)".into(),
            seed: 20261123,
            ..SynthSpec::default()
        }
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Checks that the dimensions describe a model hypura (and llama.cpp) can run.
    pub fn validate(&self) -> Result<()> {
        self.routing.validate()?;
        let bad = |m: String| Err(Error::InvalidRequest(format!("synth: {m}")));
        if !SYNTH_TYPES.contains(&self.ty) {
            let names: Vec<_> = SYNTH_TYPES.iter().map(|t| t.name()).collect();
            return bad(format!(
                "cannot write {} weights (it can write {})",
                self.ty,
                names.join(", ")
            ));
        }
        if self.n_embd == 0 || self.n_layer == 0 || self.n_ff == 0 || self.ctx_len == 0 {
            return bad("embedding, layers, feed-forward and context must be non-zero".into());
        }
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "{} heads must divide the embedding length {}",
                self.n_head, self.n_embd
            ));
        }
        if self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!(
                "{} KV heads must divide the {} heads",
                self.n_head_kv, self.n_head
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("head size {} must be even (RoPE)", self.head_dim()));
        }
        if self.n_expert > 0 && (self.n_expert_used == 0 || self.n_expert_used > self.n_expert) {
            return bad(format!(
                "{} of {} experts per token is not valid",
                self.n_expert_used, self.n_expert
            ));
        }
        if self.n_expert == 0 && self.n_expert_used != 0 {
            return bad("experts used per token given for a dense model".into());
        }
        Ok(())
    }
}

/// Types [`write_model`] can generate.
pub const SYNTH_TYPES: [TensorType; 13] = [
    TensorType::F32,
    TensorType::F16,
    TensorType::BF16,
    TensorType::Q4_0,
    TensorType::Q4_1,
    TensorType::Q5_0,
    TensorType::Q5_1,
    TensorType::Q8_0,
    TensorType::Q2_K,
    TensorType::Q3_K,
    TensorType::Q4_K,
    TensorType::Q5_K,
    TensorType::Q6_K,
];

/// One tensor of a synthetic model: where it goes and how its values are drawn
/// (`mean + std·N(0, 1)`, approximately, in the stored type).
#[derive(Clone, Debug, PartialEq)]
pub struct SynthTensor {
    pub name: String,
    pub ty: TensorType,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub mean: f32,
    pub std: f32,
}

impl SynthTensor {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn n_bytes(&self) -> u64 {
        self.n_elements() / self.ty.block_elems() as u64 * self.ty.block_bytes() as u64
    }
}

/// The type a row of `row_len` elements is stored in when `ty` is asked for (llama.cpp's fallback
/// for rows that are not a whole number of blocks).
pub fn storage_type(ty: TensorType, row_len: u64) -> TensorType {
    let fits = |t: TensorType| row_len.is_multiple_of(t.block_elems() as u64);
    if fits(ty) {
        return ty;
    }
    let fallback = match ty {
        TensorType::Q2_K | TensorType::Q3_K => TensorType::Q4_0,
        TensorType::Q4_K => TensorType::Q5_0,
        TensorType::Q5_K => TensorType::Q5_1,
        TensorType::Q6_K => TensorType::Q8_0,
        _ => TensorType::F16,
    };
    if fits(fallback) {
        fallback
    } else {
        TensorType::F16
    }
}

/// The tensors of `spec` with a vocabulary of `n_vocab` tokens, in file order.
pub fn plan(spec: &SynthSpec, n_vocab: usize) -> Result<Vec<SynthTensor>> {
    spec.validate()?;
    if n_vocab == 0 {
        return Err(Error::InvalidRequest("synth: empty vocabulary".into()));
    }
    let (d, ff) = (spec.n_embd as u64, spec.n_ff as u64);
    let hd = spec.head_dim() as u64;
    let (q, kv) = (spec.n_head as u64 * hd, spec.n_head_kv as u64 * hd);
    let v = n_vocab as u64;
    let big = |name: String, dims: Vec<u64>, std: f32| SynthTensor {
        ty: storage_type(spec.ty, dims[0]),
        name,
        dims,
        mean: 0.0,
        std,
    };
    let mat = |name: String, dims: Vec<u64>| {
        let std = 1.0 / (dims[0] as f32).sqrt();
        big(name, dims, std)
    };
    let f32_t = |name: String, dims: Vec<u64>, mean: f32, std: f32| SynthTensor {
        name,
        ty: TensorType::F32,
        dims,
        mean,
        std,
    };
    let norm = |name: String| f32_t(name, vec![d], 1.0, 0.05);
    let embd_std = if spec.tie_embeddings {
        1.0 / (d as f32).sqrt()
    } else {
        1.0
    };
    let mut t = vec![
        big("token_embd.weight".into(), vec![d, v], embd_std),
        norm("output_norm.weight".into()),
    ];
    if !spec.tie_embeddings {
        t.push(mat("output.weight".into(), vec![d, v]));
    }
    for i in 0..spec.n_layer {
        let n = |s: &str| format!("blk.{i}.{s}");
        t.push(norm(n("attn_norm.weight")));
        t.push(mat(n("attn_q.weight"), vec![d, q]));
        t.push(mat(n("attn_k.weight"), vec![d, kv]));
        t.push(mat(n("attn_v.weight"), vec![d, kv]));
        if spec.arch == Arch::Qwen2 {
            t.push(f32_t(n("attn_q.bias"), vec![q], 0.0, 0.2));
            t.push(f32_t(n("attn_k.bias"), vec![kv], 0.0, 0.2));
            t.push(f32_t(n("attn_v.bias"), vec![kv], 0.0, 0.2));
        }
        t.push(mat(n("attn_output.weight"), vec![q, d]));
        t.push(norm(n("ffn_norm.weight")));
        if spec.n_expert > 0 {
            let e = spec.n_expert as u64;
            let router_std = 2.0 / (d as f32).sqrt();
            t.push(f32_t(n("ffn_gate_inp.weight"), vec![d, e], 0.0, router_std));
            t.push(mat(n("ffn_gate_exps.weight"), vec![d, ff, e]));
            t.push(mat(n("ffn_up_exps.weight"), vec![d, ff, e]));
            t.push(mat(n("ffn_down_exps.weight"), vec![ff, d, e]));
        } else {
            t.push(mat(n("ffn_gate.weight"), vec![d, ff]));
            t.push(mat(n("ffn_up.weight"), vec![d, ff]));
            t.push(mat(n("ffn_down.weight"), vec![ff, d]));
        }
    }
    if spec.k_medium {
        // llama-quantize's `use_more_bits`: the first and last eighth of the layers and every
        // third layer in between get Q6_K for attn_v and ffn_down.
        let n = spec.n_layer;
        let more_bits = |i: usize| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
        for x in t.iter_mut() {
            let layer = crate::plan::layer_of(&x.name);
            let promote = x.name == "output.weight"
                || ((x.name.ends_with("attn_v.weight") || x.name.contains("ffn_down"))
                    && layer.is_some_and(more_bits));
            if promote && x.ty.is_quantized() {
                x.ty = storage_type(TensorType::Q6_K, x.dims[0]);
            }
        }
    }
    Ok(t)
}

/// llama.cpp's `general.file_type` for a file whose large matrices are `ty`.
fn file_type(ty: TensorType) -> u32 {
    match ty {
        TensorType::F32 => 0,
        TensorType::F16 => 1,
        TensorType::Q4_0 => 2,
        TensorType::Q4_1 => 3,
        TensorType::Q8_0 => 7,
        TensorType::Q5_0 => 8,
        TensorType::Q5_1 => 9,
        TensorType::Q2_K => 10,
        TensorType::Q3_K => 11, // Q3_K_S: all Q3_K
        TensorType::Q4_K => 14, // Q4_K_S
        TensorType::Q5_K => 16, // Q5_K_S
        TensorType::Q6_K => 18,
        TensorType::BF16 => 32,
        // Not generated (see SYNTH_TYPES); "guessed".
        _ => 1024,
    }
}

/// Writes the model `spec` to `out`, copying every `tokenizer.*` key from `vocab` (whose
/// `tokenizer.ggml.tokens` sets the vocabulary size). The file appears atomically (written to a
/// temporary name beside it, then renamed).
pub fn write_model(spec: &SynthSpec, vocab: &Metadata, out: &Path) -> Result<()> {
    write_model_with_progress(spec, vocab, out, &mut |_, _| {})
}

/// [`write_model`], calling `progress(bytes_written, total_bytes)` as the file grows (at most
/// every few MiB; the total counts tensor data, not the header).
pub fn write_model_with_progress(
    spec: &SynthSpec,
    vocab: &Metadata,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let n_vocab = vocab.str_array("tokenizer.ggml.tokens")?.len();
    let tensors = plan(spec, n_vocab)?;
    let arch = spec.arch.gguf_name();
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(arch.into()));
    w.set("general.name", Value::String(spec.name.clone()));
    let ftype = match (spec.k_medium, spec.ty) {
        (true, TensorType::Q4_K) => 15, // Q4_K_M
        (true, TensorType::Q5_K) => 17, // Q5_K_M
        (true, TensorType::Q3_K) => 12, // Q3_K_M
        (_, ty) => file_type(ty),
    };
    w.set("general.file_type", Value::U32(ftype));
    if spec.ty.is_quantized() {
        w.set("general.quantization_version", Value::U32(2));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let u32v = |x: usize| Value::U32(x as u32);
    w.set(&k("context_length"), u32v(spec.ctx_len));
    w.set(&k("embedding_length"), u32v(spec.n_embd));
    w.set(&k("block_count"), u32v(spec.n_layer));
    w.set(&k("feed_forward_length"), u32v(spec.n_ff));
    w.set(&k("attention.head_count"), u32v(spec.n_head));
    w.set(&k("attention.head_count_kv"), u32v(spec.n_head_kv));
    w.set(
        &k("attention.layer_norm_rms_epsilon"),
        Value::F32(spec.rms_eps),
    );
    w.set(&k("rope.freq_base"), Value::F32(spec.rope_freq_base));
    w.set(&k("rope.dimension_count"), u32v(spec.head_dim()));
    w.set(&k("vocab_size"), u32v(n_vocab));
    if spec.n_expert > 0 {
        w.set(&k("expert_count"), u32v(spec.n_expert));
        w.set(&k("expert_used_count"), u32v(spec.n_expert_used));
    }
    for (key, value) in &vocab.entries {
        if key.starts_with("tokenizer.") {
            w.set(key, value.clone());
        }
    }
    let total: u64 = tensors.iter().map(SynthTensor::n_bytes).sum();
    // Synthetic routing: routers with a structure, and embeddings that carry their bias.
    let shaped = spec.n_expert > 0 && !spec.routing.is_uniform();
    let router_std = 2.0 / (spec.n_embd as f32).sqrt();
    let mut routers = if shaped {
        routing::routers(
            &spec.routing,
            spec.n_layer,
            spec.n_expert,
            spec.n_embd,
            router_std,
            spec.seed,
        )
    } else {
        Vec::new()
    };
    for (i, t) in tensors.into_iter().enumerate() {
        let seed = mix(spec.seed ^ mix(i as u64 + 1));
        let (ty, n, mean, std) = (t.ty, t.n_elements(), t.mean, t.std);
        let layer = crate::plan::layer_of(&t.name);
        let producer: crate::gguf::Producer = if shaped && t.name.ends_with("ffn_gate_inp.weight") {
            let w = layer
                .and_then(|l| routers.get_mut(l))
                .map(std::mem::take)
                .unwrap_or_default();
            Box::new(move |out: &mut dyn Write| {
                let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
                out.write_all(&bytes)
            })
        } else if shaped && t.name == "token_embd.weight" {
            let d = spec.n_embd;
            Box::new(move |out: &mut dyn Write| routing_embedding(out, ty, n, d, std, seed))
        } else {
            Box::new(move |out: &mut dyn Write| write_random(out, ty, n, mean, std, seed))
        };
        w.add_tensor(&t.name, t.ty, &t.dims, TensorData::Producer(producer));
    }
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.gguf".into());
    let tmp = out.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, 0, e))?;
        let mut pw = ProgressWriter {
            inner: std::io::BufWriter::with_capacity(1 << 20, f),
            done: 0,
            last: 0,
            total,
            progress,
        };
        w.write(&mut pw)
            .map_err(|e| Error::io("write", &tmp, pw.done, e))?;
        pw.inner
            .flush()
            .map_err(|e| Error::io("write", &tmp, pw.done, e))?;
        (pw.progress)(pw.done, total);
        std::fs::rename(&tmp, out).map_err(|e| Error::io("rename", &tmp, 0, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

struct ProgressWriter<'a, W: Write> {
    inner: W,
    done: u64,
    last: u64,
    total: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl<W: Write> Write for ProgressWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.done += n as u64;
        if self.done - self.last >= 4 << 20 {
            self.last = self.done;
            (self.progress)(self.done, self.total);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A token embedding whose rows are random (`std`) but for a constant "massive" first component
/// (see [`routing`]), quantized to `ty` row block by row block.
fn routing_embedding(
    out: &mut dyn Write,
    ty: TensorType,
    n: u64,
    d: usize,
    std: f32,
    seed: u64,
) -> std::io::Result<()> {
    use candle_core::quantized::QTensor;
    let rows = (n / d as u64) as usize;
    let massive = routing::massive_value(d);
    let per_chunk = ((1 << 20) / d).max(1);
    let mut r0 = 0;
    while r0 < rows {
        let take = per_chunk.min(rows - r0);
        let raw = random_tensor_bytes(
            TensorType::F32,
            (take * d) as u64,
            0.0,
            std,
            mix(seed ^ r0 as u64),
        );
        let mut vals: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        for row in vals.chunks_exact_mut(d) {
            row[0] = massive;
        }
        let t = candle_core::Tensor::from_vec(vals, (take, d), &candle_core::Device::Cpu)
            .map_err(std::io::Error::other)?;
        let q = QTensor::quantize(&t, ty.to_candle()).map_err(std::io::Error::other)?;
        out.write_all(&q.data().map_err(std::io::Error::other)?)?;
        r0 += take;
    }
    Ok(())
}
