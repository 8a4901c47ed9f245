//! Model definitions: Llama, Qwen2 and Mixtral as candle modules.
//!
//! Model code declares tensors by name and builds the forward pass. It reads weights only through
//! [`crate::storage::Weight`]; it never names a file, a device buffer or a memory map.

/// Which positions' logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Logits for every input position: `[n_tokens, n_vocab]`.
    All,
    /// Logits for the last input position only: `[1, n_vocab]`.
    Last,
}

/// What generation, perplexity and benchmarking need from a model.
pub trait LanguageModel {
    /// Runs `tokens` through the model, appending them to the KV cache after what is already
    /// there, and returns F32 logits on the CPU (`[n, n_vocab]`, see [`Logits`]).
    fn forward(&mut self, tokens: &[u32], logits: Logits) -> crate::Result<candle_core::Tensor>;
    /// Empties the KV cache.
    fn reset(&mut self);
    /// Tokens currently in the KV cache.
    fn n_past(&self) -> usize;
    /// Most tokens the KV cache can hold.
    fn n_ctx(&self) -> usize;
    fn n_vocab(&self) -> usize;

    /// Runs one token (appending it to the cache) and calls `f` with its `[n_vocab]` logits:
    /// read in place where the backend leaves them in host memory (the fused CUDA decoder's
    /// page-locked buffer), else out of [`forward`](Self::forward)'s tensor. Generation steps
    /// through this.
    fn decode_with(&mut self, token: u32, f: &mut dyn FnMut(&[f32])) -> crate::Result<()> {
        let logits = self.forward(&[token], Logits::Last)?;
        with_logits(&logits, f)
    }

    /// Like [`decode_with`](Self::decode_with), for a sampler that looks at no more than the `k`
    /// largest logits first (top-k): the model may hand over only the blocks of 64 logits that
    /// can hold them ([`TopLogits::Blocks`], picked on the GPU by the fused CUDA decoder: ~10 KB
    /// to the host instead of the whole vocabulary), or all of them.
    fn decode_top_k(
        &mut self,
        token: u32,
        k: usize,
        f: &mut dyn FnMut(TopLogits<'_>),
    ) -> crate::Result<()> {
        let _ = k;
        self.decode_with(token, &mut |l| f(TopLogits::All(l)))
    }

    /// Greedy decoding inside the model: feeds `token`, then each next most likely token (the
    /// first of equal maxima, as [`crate::generate::argmax`]) while `accept` says so, feeding at
    /// most `max_steps` tokens in all (`token` included). `accept` sees every token picked, in
    /// order; false ends without feeding that one. Returns how many tokens were fed, or `None`
    /// where the model has no such path (nothing is fed then: step with
    /// [`decode_with`](Self::decode_with)).
    fn decode_greedy(
        &mut self,
        token: u32,
        max_steps: usize,
        accept: &mut dyn FnMut(u32) -> bool,
    ) -> crate::Result<Option<usize>> {
        let _ = (token, max_steps, accept);
        Ok(None)
    }
}

/// A step's logits as [`LanguageModel::decode_top_k`] hands them over.
#[derive(Clone, Copy, Debug)]
pub enum TopLogits<'a> {
    /// All of them, one per vocabulary entry.
    All(&'a [f32]),
    /// Only the blocks of 64 logits (`64 b .. 64 b + 64` for each `b` of `ids`, increasing) that
    /// can hold the `k` largest: every block whose maximum is at least the `k`-th largest block
    /// maximum. `values` holds 64 per block, -inf past `n_vocab`.
    Blocks {
        n_vocab: usize,
        ids: &'a [u32],
        values: &'a [f32],
    },
}

/// Calls `f` with the values of `logits` (`[1, n_vocab]` or `[n_vocab]`, F32): borrowed in place
/// when they are contiguous on the CPU, else copied out (from a GPU, say). A 128k vocabulary is
/// 513 KB: a copy costs tens of µs a token.
pub fn with_logits<R>(
    logits: &candle_core::Tensor,
    f: impl FnOnce(&[f32]) -> R,
) -> crate::Result<R> {
    use candle_core::{CpuStorage, Storage};
    {
        let (storage, layout) = logits.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[start..end]));
        }
    }
    let v = logits.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&v))
}

mod layers;
mod moe;
mod transformer;

pub use layers::{Attention, KvCache, Linear, Mlp, RmsNorm, Rope};
pub use moe::{router_softmax, Moe, Routing};
pub use transformer::{Block, FeedForward, Transformer};
