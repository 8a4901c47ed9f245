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
}

mod layers;
mod moe;
mod transformer;

pub use layers::{Attention, KvCache, Linear, Mlp, RmsNorm, Rope};
pub use moe::{router_softmax, Moe, Routing};
pub use transformer::{Block, FeedForward, Transformer};
