//! RMS norms folded into the mat-vecs around them (decode.cu's `NormIn` and `matvec_norm_*`).
//!
//! A norm's producer (o or down, which add into the residual stream `x`) also writes the int8
//! copy of `x ⊙ w` (w: the norm's weight) into buffers of its own and `Σx²` per block; its
//! consumers (q/k/v, SwiGLU, the output matrix) read that copy and scale their dot products by
//! `1 / sqrt(mean(x²) + eps)`. The norm kernel between them, and its launch, are gone: two per
//! layer. Where a consumer reads F32 activations (Q8_0 or F32 rows; the MoE router) or the
//! producer is not a mat-vec (the embedding, `moe_combine`), the norm runs as its own kernel.
//! (Folding a MoE block's norm into o, with `moe_router` norming its F32 input itself, was
//! measured on an H200 and was slower: Mixtral 272 against 275.5 tok/s; docs/cuda.md.)

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::quantized::GgmlDType;

use super::{driver, DecodeOptions, Decoder};
use crate::cuda::{DecodeSpec, DeviceMatrix, FfnSpec};
use crate::KernelError;

/// Warps per block of `matvec_norm_*` and `moe_down_qin_*` (`NORM_WARPS` in decode.cu: pairs of
/// warps share two rows, so 32 rows, one int8 block, per block).
pub(super) const NORM_WARPS: u32 = 32;
/// Rows per block of `matvec_norm_*` and `moe_down_qin_*`.
pub(super) const NORM_ROWS: usize = 32;
/// Shared memory a block may take without opting in (the `_qin_` kernels keep their input's
/// int8 copy there).
const SHARED_MEM_DEFAULT: usize = 48 << 10;

/// decode.cu's `qin_smem_bytes`: the padded int8 copy of `cols` activations and its block
/// scales.
pub(super) fn qin_smem_bytes(cols: usize) -> usize {
    cols / 64 * (64 + 16) + cols / 32 * 8
}

/// Whether a `_qin_` kernel's int8 copy of `cols` inputs fits a block's shared memory.
pub(super) fn qin_fits(cols: usize) -> bool {
    qin_smem_bytes(cols) <= SHARED_MEM_DEFAULT
}

/// Whether down (`m`) quantizes its F32 input itself (`matvec_norm_qin_*`: k-quant rows whose
/// input's int8 copy fits in a block's shared memory), so no `quantize_q8` runs before it.
pub(super) fn quantizes_own_input(m: &DeviceMatrix) -> bool {
    reads_int8(m) && qin_fits(m.cols)
}

/// decode.cu's staged producers (`matvec_norm_st_<type>`, `nst_smem_bytes`): the dynamic shared
/// memory one needs for rows of `ty`, when they can be staged (k-quants, `cols` a multiple of 2048 so
/// that each warp's runs of 8 super-blocks are 16-byte aligned). Q6_K copies 2 runs ahead, Q4_K
/// and Q5_K 3 (each the faster on an H200, kbench pdl).
/// (The experts' down, `moe_down_st_<type>`, the same.)
pub(super) fn staged_smem_bytes(ty: GgmlDType, cols: usize) -> Option<usize> {
    let (block_bytes, stages) = match ty {
        GgmlDType::Q4K => (144, 3),
        GgmlDType::Q5K => (176, 3),
        GgmlDType::Q6K => (210, 2),
        _ => return None,
    };
    cols.is_multiple_of(2048)
        .then(|| qin_smem_bytes(cols) + NORM_WARPS as usize * stages * 8 * block_bytes)
}

/// A norm producer's input.
pub(super) enum ProducerInput {
    /// F32 at this address, its int8 copy in the main buffers (the kernel before wrote both).
    Int8(u64),
    /// F32 only: the kernel quantizes it itself (see [`quantizes_own_input`]).
    F32(u64),
}

/// `struct NormIn` in decode.cu: where a consumer's norm scale comes from.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct NormIn {
    /// The producer's `Σx²` per block (0: the input is normed already).
    part: u64,
    n_part: i32,
    inv_n: f32,
    eps: f32,
}

// SAFETY: plain `#[repr(C)]` scalars laid out as decode.cu's `struct NormIn` (a pointer, an int,
// two floats: 24 bytes with the trailing padding both sides add).
unsafe impl DeviceRepr for NormIn {}

impl NormIn {
    /// The input is normed already (scale 1).
    pub(super) const NONE: NormIn = NormIn {
        part: 0,
        n_part: 0,
        inv_n: 0.0,
        eps: 0.0,
    };
}

/// Which norms fold into their producer: `attn[i]` (layer `i`'s attention norm, produced by
/// layer `i - 1`'s down), `ffn[i]` (produced by layer `i`'s o), `out` (the output norm, produced
/// by the last layer's down).
pub(super) struct Folds {
    pub attn: Vec<bool>,
    pub ffn: Vec<bool>,
    pub out: bool,
}

/// Whether the fused kernels read this matrix's input as int8 blocks (k-quant rows).
fn reads_int8(m: &DeviceMatrix) -> bool {
    matches!(m.ty, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K)
}

/// Whether `moe_router` computes this router's product (F32, at most 256 experts).
pub(super) fn fused_router(router: &DeviceMatrix) -> bool {
    router.ty == GgmlDType::F32
        && router.rows <= crate::cuda::MAX_EXPERTS
        && router.cols.is_multiple_of(4)
}

impl Folds {
    /// Folds every norm whose producer is a dense block's mat-vec and whose consumers all read
    /// int8 activations (none without `options.fold_norms` or when `n_embd` is not a multiple
    /// of 32).
    pub(super) fn plan(spec: &DecodeSpec, options: &DecodeOptions) -> Folds {
        let ok = options.fold_norms && spec.n_embd.is_multiple_of(NORM_ROWS);
        let dense = |i: usize| matches!(spec.layers[i].ffn, FfnSpec::Dense { .. });
        let attn = (0..spec.layers.len())
            .map(|i| {
                let l = &spec.layers[i];
                ok && i > 0 && dense(i - 1) && [&l.q, &l.k, &l.v].into_iter().all(reads_int8)
            })
            .collect();
        let ffn = spec
            .layers
            .iter()
            .map(|l| match &l.ffn {
                FfnSpec::Dense { gate, up, .. } => ok && reads_int8(gate) && reads_int8(up),
                FfnSpec::Moe { .. } => false,
            })
            .collect();
        let last = spec.layers.len().checked_sub(1);
        let out = ok && last.is_some_and(dense) && reads_int8(&spec.output);
        Folds { attn, ffn, out }
    }
}

impl Decoder {
    /// The scale source of a consumer whose norm is folded (`folded`), else [`NormIn::NONE`].
    pub(super) fn norm_in(&self, folded: bool) -> NormIn {
        if !folded {
            return NormIn::NONE;
        }
        let n = self.spec.n_embd;
        NormIn {
            part: self.norm_part.ptr,
            n_part: (n / NORM_ROWS) as i32,
            inv_n: 1.0 / n as f32,
            eps: self.spec.rms_eps,
        }
    }

    /// The int8 buffers a consumer reads: the folded copy, or the main ones.
    pub(super) fn q8_in(&self, folded: bool) -> [u64; 3] {
        if folded {
            [self.xq_n.ptr, self.xd_n.ptr, self.xs_n.ptr]
        } else {
            self.q8()
        }
    }

    /// The weight of the norm that layer `i`'s down produces the input of, if it folds there.
    pub(super) fn norm_after(&self, i: usize) -> Option<u64> {
        match self.layers.get(i + 1) {
            Some(next) => self.folds.attn[i + 1].then_some(next.attn_norm.ptr),
            None => self.folds.out.then_some(self.out_norm.ptr),
        }
    }

    /// `x += m · input`, then the folded norm's inputs: the int8 copy of `x ⊙ w` and the
    /// per-block `Σx²`.
    pub(super) fn matvec_norm(
        &self,
        m: &DeviceMatrix,
        input: ProducerInput,
        w: u64,
    ) -> Result<(), KernelError> {
        let (cols, suffix) = (m.cols as i32, m.kernel_suffix());
        // cp.async copies 16-byte pieces: the rows' runs are aligned when the matrix is.
        let staged = staged_smem_bytes(m.ty, m.cols)
            .filter(|&b| b <= self.staged_smem_max && m.bytes.ptr.is_multiple_of(16));
        let (name, input, shared) = match (input, staged) {
            (ProducerInput::Int8(x), _) => (format!("matvec_norm_{suffix}"), x, 0),
            (ProducerInput::F32(x), Some(bytes)) => {
                (format!("matvec_norm_st_{suffix}"), x, bytes as u32)
            }
            (ProducerInput::F32(x), None) => (
                format!("matvec_norm_qin_{suffix}"),
                x,
                qin_smem_bytes(m.cols) as u32,
            ),
        };
        let cfg = LaunchConfig {
            grid_dim: ((m.rows / NORM_ROWS) as u32, 1, 1),
            block_dim: (32, NORM_WARPS, 1),
            shared_mem_bytes: shared,
        };
        let label = || format!("{name} [{}, {cols}]", m.rows);
        let [xq, xd, xs] = self.q8();
        let x = self.x.ptr;
        launch!(@labelled self, &name, label, cfg, &m.bytes.ptr, &input, &xq, &xd, &xs, &x,
            &cols, &x, &w, &self.xq_n.ptr, &self.xd_n.ptr, &self.xs_n.ptr, &self.norm_part.ptr)
    }
}
