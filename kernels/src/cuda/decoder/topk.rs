//! Top-k candidates picked on the device: after the step, `topk_blocks` (decode.cu) keeps every
//! block of 64 logits whose maximum reaches the k-th largest block maximum — exactly the blocks
//! the host's sampler would keep before its heap — and the host downloads those (~10 KB for
//! k = 40) instead of the whole vocabulary (513 KB for Llama-3's, then a pass over it).

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{driver, Buf, Decoder, Pinned};
use crate::KernelError;

/// Most blocks a step hands over (their ids and 64 logits each); more (ties) → all logits.
pub(super) const TOPK_CAP: usize = 256;
/// decode.cu's TOPK_MAX_BLOCKS, TOPK_THREADS and TOPK_FALLBACK.
const TOPK_MAX_BLOCKS: usize = 8192;
const TOPK_THREADS: u32 = 1024;
const TOPK_FALLBACK: u32 = u32::MAX;

/// A step's logits as [`Decoder::step_top_blocks`] hands them over, in host memory.
pub enum StepLogits<'a> {
    /// All `n_vocab` of them.
    All(&'a [f32]),
    /// Only the blocks of 64 (logits `64 b .. 64 b + 64`) that can hold the k largest: every
    /// block whose maximum is at least the k-th largest block maximum, `b` increasing; `values`
    /// holds 64 per block (-inf past the vocabulary's end).
    Blocks { ids: &'a [u32], values: &'a [f32] },
}

/// The device buffers `topk_blocks` writes and their page-locked download targets.
pub(super) struct TopK {
    ids: Buf<u32>,    // [1 + TOPK_CAP]: count, then block ids
    values: Buf<f32>, // [TOPK_CAP * 64]
    ids_host: Pinned<u32>,
    values_host: Pinned<f32>,
}

impl TopK {
    pub fn new(
        stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    ) -> Result<Self, KernelError> {
        let ids = stream
            .alloc_zeros::<u32>(1 + TOPK_CAP)
            .map_err(driver("alloc"))?;
        let values = stream
            .alloc_zeros::<f32>(64 * TOPK_CAP)
            .map_err(driver("alloc"))?;
        Ok(TopK {
            ids: Buf::new(ids, stream),
            values: Buf::new(values, stream),
            ids_host: Pinned::new(stream, 1 + TOPK_CAP, "page-locked top-k alloc")?,
            values_host: Pinned::new(stream, 64 * TOPK_CAP, "page-locked top-k alloc")?,
        })
    }
}

impl Decoder {
    /// Like [`step`](Self::step), but where `k` allows (1 ≤ k ≤ 256, fewer than the
    /// vocabulary's blocks of 64, at most 8192 blocks) hands over only the blocks that can hold
    /// the `k` largest logits; all logits otherwise, or when ties or a NaN keep more than 256
    /// blocks. `HYPURA_CUDA_STEP_CLOCK` does not time these steps.
    pub fn step_top_blocks(
        &mut self,
        token: u32,
        pos: usize,
        row: Option<&[f32]>,
        k: usize,
    ) -> Result<StepLogits<'_>, KernelError> {
        let n_blocks = self.spec.n_vocab.div_ceil(64);
        if !(1..=TOPK_CAP).contains(&k) || k >= n_blocks || n_blocks > TOPK_MAX_BLOCKS {
            return self.step(token, pos, row).map(StepLogits::All);
        }
        if self.spec.needs_host() {
            return Err(KernelError(
                "a mixture-of-experts model whose experts are served by the caller's caches \
                 steps through Decoder::step_served"
                    .into(),
            ));
        }
        self.launch_step(token, pos, row, None)?;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (TOPK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n, k, cap) = (self.spec.n_vocab as i32, k as i32, TOPK_CAP as i32);
        let (ids, values) = (self.topk.ids.ptr, self.topk.values.ptr);
        launch!(
            self,
            "topk_blocks",
            cfg,
            &self.logits.ptr,
            &n,
            &k,
            &cap,
            &ids,
            &values
        )?;
        let t = &mut self.topk;
        t.ids_host.copy_in(&self.stream, ids, 0, 1 + TOPK_CAP)?;
        t.values_host
            .copy_in(&self.stream, values, 0, 64 * TOPK_CAP)?;
        self.stream.synchronize().map_err(driver("synchronize"))?;
        let count = self.topk.ids_host.get()[0];
        if count == TOPK_FALLBACK || count as usize > TOPK_CAP {
            return self.download_logits().map(StepLogits::All);
        }
        let count = count as usize;
        Ok(StepLogits::Blocks {
            ids: &self.topk.ids_host.get()[1..1 + count],
            values: &self.topk.values_host.get()[..64 * count],
        })
    }
}
