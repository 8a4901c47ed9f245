//! The fused single-token CUDA decoder (`--features cuda`).
//!
//! candle runs one decode step of an 8B Llama as ~800 small kernels, each with the CPU cost of a
//! tensor op; at ~8 µs each the GPU waits on the CPU. [`Decoder`] runs the same step as 8
//! kernels per layer (`cuda/decode.cu`; a ninth merges split attention past 256 keys) over
//! buffers allocated once, and reads the token id and position from device memory, so the whole
//! step is captured into a CUDA graph (one per attention shape, `shapes.rs`) and replayed for
//! every token: the CPU cost of a token is one graph launch and two small copies.
//!
//! What it borrows, it borrows by device address: the weights (candle's quantized or F32 device
//! tensors) and the KV cache (the model's own tensors, which candle's batch path also writes). A
//! [`DeviceBytes`] keeps its owner alive; making one is the only `unsafe` a caller writes.
//! Small tensors (norm weights, biases, RoPE tables) are copied in.
//!
//! Mixture-of-experts models (Mixtral) run on the same kernels and route on the device (top-k of
//! the router's logits). A block's experts are read through a device table of their addresses
//! (3 per expert), and the step is one graph like a dense model's. When the experts live behind
//! the caller's caches ([`MoeExperts::Served`]), the caller keeps that table up to date; a step
//! whose routing picks an expert that is not on the device stops on the device at that block and
//! asks the host through a mailbox in mapped host memory ([`Decoder::step_served`] answers it by
//! calling the caller's `serve`). Steps whose experts are all on the device never wait for the
//! host. Both ways run the same arithmetic and give the same bits.

mod decoder;
mod flash;
mod shapes;

use std::any::Any;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;

pub use decoder::{DecodeOptions, Decoder, KernelTime, Serve, StepLogits};
pub use flash::{Flash, FlashArgs, FLASH_HEAD_DIMS};

use crate::KernelError;

/// Device memory someone else owns, kept alive by `keep`.
pub struct DeviceBytes {
    ptr: u64,
    len: usize,
    _keep: Arc<dyn Any + Send + Sync>,
}

impl DeviceBytes {
    /// # Safety
    /// `ptr` must be the address of `len` bytes of device memory in the CUDA context the
    /// [`Decoder`] runs in, which stay allocated (and are not moved) while `keep` lives, and
    /// which nothing else writes while a decoder step runs (other than on the decoder's stream).
    pub unsafe fn from_raw(ptr: u64, len: usize, keep: Arc<dyn Any + Send + Sync>) -> Self {
        DeviceBytes {
            ptr,
            len,
            _keep: keep,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A weight matrix `[rows, cols]` on the device, in ggml block layout (`F32`: plain floats).
pub struct DeviceMatrix {
    bytes: DeviceBytes,
    ty: GgmlDType,
    rows: usize,
    cols: usize,
}

/// The weight formats the decoder's kernels read.
pub fn supported(ty: GgmlDType) -> bool {
    matches!(
        ty,
        GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K | GgmlDType::Q8_0 | GgmlDType::F32
    )
}

impl DeviceMatrix {
    /// Checks the format is supported and `bytes` holds `rows × cols` of it.
    pub fn new(
        bytes: DeviceBytes,
        ty: GgmlDType,
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        if !supported(ty) {
            return Err(KernelError(format!("no fused CUDA kernel for {ty:?}")));
        }
        let block = ty.block_size();
        if !cols.is_multiple_of(block)
            || (ty == GgmlDType::F32 && (!cols.is_multiple_of(4) || !bytes.ptr.is_multiple_of(16)))
        {
            return Err(KernelError(format!(
                "{ty:?} matrix of {cols} columns at {:#x}: columns not a multiple of {block} \
                 (F32: of 4, 16-byte aligned)",
                bytes.ptr
            )));
        }
        let need = rows * (cols / block) * ty.type_size();
        if bytes.len < need {
            return Err(KernelError(format!(
                "{ty:?} [{rows}, {cols}] needs {need} bytes, the buffer has {}",
                bytes.len
            )));
        }
        Ok(DeviceMatrix {
            bytes,
            ty,
            rows,
            cols,
        })
    }

    /// Lower-case type name, as the embedding kernels are named.
    fn kernel_suffix(&self) -> &'static str {
        match self.ty {
            GgmlDType::Q4K => "q4_k",
            GgmlDType::Q5K => "q5_k",
            GgmlDType::Q6K => "q6_k",
            GgmlDType::Q8_0 => "q8_0",
            _ => "f32",
        }
    }

    /// The ggml type id the matvec kernels switch on (`T_*` in quant.cuh).
    fn type_id(&self) -> i32 {
        type_id(self.ty)
    }
}

/// The kernels' id of a weight format (ggml's type numbers; 0 for F32).
fn type_id(ty: GgmlDType) -> i32 {
    match ty {
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8_0 => 8,
        _ => 0,
    }
}

/// How RoPE pairs dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePairs {
    /// `(2i, 2i + 1)`: Llama (GGUF's permuted q/k weights).
    Interleaved,
    /// `(i, i + rope_dim / 2)`: NEOX, Qwen2.
    HalfSplit,
}

/// One transformer block: weights borrowed from the device, small vectors copied in.
pub struct LayerSpec {
    pub attn_norm: Vec<f32>,
    pub q: DeviceMatrix,
    pub k: DeviceMatrix,
    pub v: DeviceMatrix,
    pub o: DeviceMatrix,
    pub q_bias: Option<Vec<f32>>,
    pub k_bias: Option<Vec<f32>>,
    pub v_bias: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub ffn: FfnSpec,
    /// `[n_head_kv, n_ctx, head_dim]` F32, shared with whoever else runs this model.
    pub k_cache: DeviceBytes,
    pub v_cache: DeviceBytes,
}

/// A block's feed-forward.
pub enum FfnSpec {
    /// SwiGLU: `down · (silu(gate · x) * (up · x))`.
    Dense {
        gate: DeviceMatrix, // [n_ff, n_embd]
        up: DeviceMatrix,   // [n_ff, n_embd]
        down: DeviceMatrix, // [n_embd, n_ff]
    },
    /// A mixture of SwiGLU experts, routed on the device (top-k of the router's logits).
    Moe {
        router: DeviceMatrix, // [n_expert, n_embd]
        n_expert_used: usize,
        /// The experts' hidden size.
        n_ff: usize,
        /// Where the experts are: all resident, or served by the caller's caches.
        experts: MoeExperts,
    },
}

/// A MoE block's experts, as the decoder finds them.
pub enum MoeExperts {
    /// Every expert in device memory: the decoder builds the block's address table itself.
    Resident(Vec<ExpertMatrices>),
    /// Behind the caller's caches: `table` holds 3 device addresses per expert (gate, up, down;
    /// all 0 for an expert not in device memory) as little-endian u64s, and the caller updates it
    /// only while the device waits for it (inside `serve`, see [`Decoder::step_served`]) or
    /// between steps. `types` are gate's, up's and down's formats, the same for every expert.
    Served {
        table: DeviceBytes,
        types: [GgmlDType; 3],
        n_expert: usize,
    },
}

/// One expert's SwiGLU weights on the device.
pub struct ExpertMatrices {
    pub gate: DeviceMatrix, // [n_ff, n_embd]
    pub up: DeviceMatrix,   // [n_ff, n_embd]
    pub down: DeviceMatrix, // [n_embd, n_ff]
}

impl ExpertMatrices {
    /// The kernels' type ids of gate, up and down.
    pub(crate) fn types(&self) -> [i32; 3] {
        [self.gate.type_id(), self.up.type_id(), self.down.type_id()]
    }

    /// The device addresses of gate, up and down.
    pub(crate) fn ptrs(&self) -> [u64; 3] {
        [self.gate.bytes.ptr, self.up.bytes.ptr, self.down.bytes.ptr]
    }
}

/// The most experts a MoE layer may have (`moe_route` is one warp of 8 logits a lane).
pub const MAX_EXPERTS: usize = 256;

/// The most experts a MoE layer may route a token to (`MOE_MAX_USED` in decode.cu, the size of
/// the device's routing record).
pub const MAX_EXPERTS_USED: usize = 8;

/// A decoder-only model (dense or mixture-of-experts), as the fused decoder runs it.
pub struct DecodeSpec {
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// The dense feed-forward's hidden size (unused by MoE layers, which carry their own).
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub rope_dim: usize,
    pub rope_pairs: RopePairs,
    pub rms_eps: f32,
    /// `[n_ctx, rope_dim / 2]` each: the angles the model's own RoPE uses.
    pub rope_cos: Vec<f32>,
    pub rope_sin: Vec<f32>,
    /// `[n_vocab, n_embd]` on the device; `None` when the table stays in host memory (the caller
    /// then hands each step its token's row).
    pub embed: Option<DeviceMatrix>,
    pub layers: Vec<LayerSpec>,
    pub out_norm: Vec<f32>,
    pub output: DeviceMatrix, // [n_vocab, n_embd]
}

impl DecodeSpec {
    /// Whether some MoE block's experts are served by the caller's caches (steps then go
    /// through [`Decoder::step_served`]).
    pub fn needs_host(&self) -> bool {
        self.layers.iter().any(|l| {
            matches!(
                l.ffn,
                FfnSpec::Moe {
                    experts: MoeExperts::Served { .. },
                    ..
                }
            )
        })
    }

    /// The widest expert hidden state of any MoE block (0 if dense).
    fn moe_n_ff(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l.ffn {
                FfnSpec::Dense { .. } => 0,
                FfnSpec::Moe { n_ff, .. } => n_ff,
            })
            .max()
            .unwrap_or(0)
    }

    /// The most experts any MoE block routes a token to, and the most it has (0, 0 if dense).
    fn max_experts(&self) -> (usize, usize) {
        self.layers.iter().fold((0, 0), |(k, n), l| match &l.ffn {
            FfnSpec::Moe {
                router,
                n_expert_used,
                ..
            } => (k.max(*n_expert_used), n.max(router.rows)),
            FfnSpec::Dense { .. } => (k, n),
        })
    }

    /// Every shape the kernels rely on, checked once.
    fn validate(&self) -> Result<(), KernelError> {
        let (d, hd) = (self.n_embd, self.head_dim);
        let bad = |what: String| Err(KernelError(format!("fused CUDA decoder: {what}")));
        if hd == 0 || hd > 256 || self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv)
        {
            return bad(format!(
                "head_dim {hd} (max 256), n_head {} / n_head_kv {}",
                self.n_head, self.n_head_kv
            ));
        }
        if d % 32 != 0 || !self.n_ff.is_multiple_of(32) || !(self.n_head * hd).is_multiple_of(32) {
            return bad(format!(
                "n_embd {d}, n_ff {} and n_head·head_dim must be multiples of 32",
                self.n_ff
            ));
        }
        if self.rope_dim > hd || !self.rope_dim.is_multiple_of(2) {
            return bad(format!("rope_dim {} with head_dim {hd}", self.rope_dim));
        }
        let half = self.rope_dim / 2;
        if self.rope_cos.len() != self.n_ctx * half || self.rope_sin.len() != self.n_ctx * half {
            return bad("RoPE tables are not [n_ctx, rope_dim / 2]".into());
        }
        let (qd, kvd) = (self.n_head * hd, self.n_head_kv * hd);
        let shape = |m: &DeviceMatrix, rows: usize, cols: usize, name: &str| {
            if m.rows == rows && m.cols == cols {
                Ok(())
            } else {
                bad(format!(
                    "{name} is [{}, {}], expected [{rows}, {cols}]",
                    m.rows, m.cols
                ))
            }
        };
        if let Some(embed) = &self.embed {
            shape(embed, self.n_vocab, d, "token_embd")?;
        }
        shape(&self.output, self.n_vocab, d, "output")?;
        let vec_len = |v: &[f32], n: usize, name: &str| {
            if v.len() == n {
                Ok(())
            } else {
                bad(format!("{name} has {} values, expected {n}", v.len()))
            }
        };
        vec_len(&self.out_norm, d, "output_norm")?;
        let cache_bytes = self.n_head_kv * self.n_ctx * hd * 4;
        for (i, l) in self.layers.iter().enumerate() {
            shape(&l.q, qd, d, &format!("blk.{i}.attn_q"))?;
            shape(&l.k, kvd, d, &format!("blk.{i}.attn_k"))?;
            shape(&l.v, kvd, d, &format!("blk.{i}.attn_v"))?;
            shape(&l.o, d, qd, &format!("blk.{i}.attn_output"))?;
            match &l.ffn {
                FfnSpec::Dense { gate, up, down } => {
                    shape(gate, self.n_ff, d, &format!("blk.{i}.ffn_gate"))?;
                    shape(up, self.n_ff, d, &format!("blk.{i}.ffn_up"))?;
                    shape(down, d, self.n_ff, &format!("blk.{i}.ffn_down"))?;
                }
                FfnSpec::Moe {
                    router,
                    n_expert_used,
                    n_ff,
                    experts,
                } => {
                    let n_expert = router.rows;
                    if n_expert == 0
                        || n_expert > MAX_EXPERTS
                        || *n_expert_used == 0
                        || *n_expert_used > n_expert.min(MAX_EXPERTS_USED)
                        || !n_ff.is_multiple_of(32)
                    {
                        return bad(format!(
                            "blk.{i}: {n_expert_used} of {n_expert} experts (at most \
                             {MAX_EXPERTS_USED} of {MAX_EXPERTS}), expert n_ff {n_ff} (a \
                             multiple of 32)"
                        ));
                    }
                    shape(router, n_expert, d, &format!("blk.{i}.ffn_gate_inp"))?;
                    match experts {
                        MoeExperts::Resident(experts) => {
                            if experts.len() != n_expert {
                                return bad(format!(
                                    "blk.{i}: {} resident experts, the router has {n_expert}",
                                    experts.len()
                                ));
                            }
                            let types = experts[0].types();
                            for (e, x) in experts.iter().enumerate() {
                                let name = |w: &str| format!("blk.{i}.ffn_{w}_exps[{e}]");
                                shape(&x.gate, *n_ff, d, &name("gate"))?;
                                shape(&x.up, *n_ff, d, &name("up"))?;
                                shape(&x.down, d, *n_ff, &name("down"))?;
                                if x.types() != types {
                                    return bad(format!("blk.{i}: experts of different types"));
                                }
                            }
                        }
                        MoeExperts::Served {
                            table,
                            types,
                            n_expert: served,
                        } => {
                            if *served != n_expert || table.len < n_expert * 24 {
                                return bad(format!(
                                    "blk.{i}: an expert table of {} bytes for {served} experts, \
                                     the router has {n_expert} (24 bytes each)",
                                    table.len
                                ));
                            }
                            if let Some(t) = types.iter().find(|&&t| !supported(t)) {
                                return bad(format!("blk.{i}: experts of type {t:?}"));
                            }
                        }
                    }
                }
            }
            vec_len(&l.attn_norm, d, "attn_norm")?;
            vec_len(&l.ffn_norm, d, "ffn_norm")?;
            for (b, n) in [(&l.q_bias, qd), (&l.k_bias, kvd), (&l.v_bias, kvd)] {
                if let Some(b) = b {
                    vec_len(b, n, "bias")?;
                }
            }
            if l.k_cache.len < cache_bytes || l.v_cache.len < cache_bytes {
                return bad(format!(
                    "blk.{i} KV cache holds fewer than {cache_bytes} bytes"
                ));
            }
        }
        Ok(())
    }
}
