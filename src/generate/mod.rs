//! Generation: sampling, the token loop over a [`LanguageModel`], and perplexity.

pub mod perplexity;
mod sampling;

use std::ops::ControlFlow;
use std::time::Instant;

pub use sampling::{argmax, Sampler, SamplingParams};

use candle_core::{CpuStorage, Storage, Tensor};

use crate::error::{Error, Result};
use crate::models::{LanguageModel, Logits};

/// Options of one generation.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Tokens that end generation (not passed to the callback).
    pub stop_ids: Vec<u32>,
    /// Prompt tokens per forward pass.
    pub batch_size: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            stop_ids: Vec::new(),
            batch_size: 512,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    EndOfGeneration,
    MaxTokens,
    ContextFull,
    Callback,
}

#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub n_prompt: usize,
    pub n_generated: usize,
    /// Single-token forward passes while generating: the first token is sampled from the
    /// prompt's logits and the last one needs no pass, so usually `n_generated - 1`.
    pub n_decoded: usize,
    pub prompt_seconds: f64,
    pub generate_seconds: f64,
    pub stop: StopReason,
}

impl GenerationStats {
    pub fn prompt_tok_s(&self) -> f64 {
        self.n_prompt as f64 / self.prompt_seconds.max(1e-9)
    }
    /// Decode speed: single-token forward passes per second (llama.cpp's "eval" rate; 0 when
    /// no pass ran). Counting generated tokens instead would credit the prompt's pass to the
    /// decode time (6 tokens take 5 passes).
    pub fn generate_tok_s(&self) -> f64 {
        self.n_decoded as f64 / self.generate_seconds.max(1e-9)
    }
}

/// Continues the model's KV cache with `prompt`, then samples up to `max_new_tokens`, calling
/// `on_token` with each one. The first token is sampled from the prompt's last logits; each
/// further token costs one forward pass of one token.
///
/// Every sampled token is fed back into the cache, except the one that ends generation: an
/// end-of-generation token, the `max_new_tokens`-th token, or the token whose callback broke.
pub fn generate(
    model: &mut dyn LanguageModel,
    prompt: &[u32],
    opts: &GenerateOptions,
    sampler: &mut Sampler,
    on_token: &mut dyn FnMut(u32) -> Result<ControlFlow<()>>,
) -> Result<GenerationStats> {
    generate_after(model, &[], prompt, opts, sampler, on_token)
}

/// [`generate`] for a cache that already holds `cached` (the tokens of earlier calls, e.g. the
/// previous turns of a chat): the repetition penalty sees them as history, as if the whole
/// sequence had been given at once.
pub fn generate_after(
    model: &mut dyn LanguageModel,
    cached: &[u32],
    prompt: &[u32],
    opts: &GenerateOptions,
    sampler: &mut Sampler,
    on_token: &mut dyn FnMut(u32) -> Result<ControlFlow<()>>,
) -> Result<GenerationStats> {
    if prompt.is_empty() {
        return Err(Error::InvalidRequest("the prompt has no tokens".into()));
    }
    let room = model.n_ctx() - model.n_past();
    if prompt.len() > room {
        return Err(Error::InvalidRequest(format!(
            "the prompt has {} tokens but the context has room for {room} (context size {}); use a larger -c",
            prompt.len(),
            model.n_ctx()
        )));
    }
    let t0 = Instant::now();
    let mut logits = None;
    for chunk in prompt.chunks(opts.batch_size.max(1)) {
        logits = Some(model.forward(chunk, Logits::Last)?);
    }
    let prompt_seconds = t0.elapsed().as_secs_f64();
    let mut history = [cached, prompt].concat();
    let Some(mut logits) = logits else {
        unreachable!("the prompt is not empty")
    };
    let t1 = Instant::now();
    let (mut n_generated, mut n_decoded) = (0, 0);
    let stop = loop {
        if n_generated >= opts.max_new_tokens {
            break StopReason::MaxTokens;
        }
        let id = with_logits(&logits, |l| sampler.sample(l, &history))?;
        if opts.stop_ids.contains(&id) {
            break StopReason::EndOfGeneration;
        }
        n_generated += 1;
        history.push(id);
        if on_token(id)?.is_break() {
            break StopReason::Callback;
        }
        if n_generated >= opts.max_new_tokens {
            break StopReason::MaxTokens;
        }
        if model.n_past() >= model.n_ctx() {
            break StopReason::ContextFull;
        }
        logits = model.forward(&[id], Logits::Last)?;
        n_decoded += 1;
    };
    Ok(GenerationStats {
        n_prompt: prompt.len(),
        n_generated,
        n_decoded,
        prompt_seconds,
        generate_seconds: t1.elapsed().as_secs_f64(),
        stop,
    })
}

/// Calls `f` with the values of `logits` (`[1, n_vocab]` or `[n_vocab]`, F32): borrowed in place
/// when they are contiguous on the CPU (as the fused CUDA decoder returns them), else copied out
/// (from a GPU, say). A 128k vocabulary is 513 KB: a copy costs tens of µs a token.
fn with_logits<R>(logits: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
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
