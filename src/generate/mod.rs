//! Generation: sampling, the token loop over a [`LanguageModel`], and perplexity.

pub mod perplexity;
mod sampling;

use std::ops::ControlFlow;
use std::time::Instant;

pub use sampling::{argmax, Sampler, SamplingParams};

use crate::error::{Error, Result};
use crate::models::{with_logits, LanguageModel, Logits};

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
    let history = [cached, prompt].concat();
    let Some(logits) = logits else {
        unreachable!("the prompt is not empty")
    };
    let t1 = Instant::now();
    let mut progress = Progress {
        n_generated: 0,
        n_decoded: 0,
        n_past: model.n_past(),
        n_ctx: model.n_ctx(),
        history,
    };
    let stop = if opts.max_new_tokens == 0 {
        StopReason::MaxTokens
    } else {
        let mut id = with_logits(&logits, |l| sampler.sample(l, &progress.history))?;
        drop(logits);
        loop {
            if let ControlFlow::Break(r) = progress.decide(id, opts, on_token)? {
                break r;
            }
            // Greedy: the model may pick the following tokens itself (on the GPU, without a
            // round trip through the host per token), asking `decide` about each.
            if sampler.is_greedy() {
                if let Some(stop) = chain_greedy(model, id, opts, &mut progress, on_token)? {
                    break stop;
                }
            }
            let mut next = 0;
            let history = &progress.history;
            match sampler.top_k_prefilter() {
                // Top-k: the model may hand over only the logits that can be among the k.
                Some(k) => {
                    model.decode_top_k(id, k, &mut |t| next = sampler.sample_top(t, history))?
                }
                None => model.decode_with(id, &mut |l| next = sampler.sample(l, history))?,
            }
            progress.n_past += 1;
            progress.n_decoded += 1;
            id = next;
        }
    };
    Ok(GenerationStats {
        n_prompt: prompt.len(),
        n_generated: progress.n_generated,
        n_decoded: progress.n_decoded,
        prompt_seconds,
        generate_seconds: t1.elapsed().as_secs_f64(),
        stop,
    })
}

/// Feeds `id` and the tokens greedy decoding picks after it through
/// [`LanguageModel::decode_greedy`], [`Progress::decide`] taking each; returns why generation
/// ended, or `None` (nothing fed) where the model has no such path.
fn chain_greedy(
    model: &mut dyn LanguageModel,
    id: u32,
    opts: &GenerateOptions,
    progress: &mut Progress,
    on_token: &mut dyn FnMut(u32) -> Result<ControlFlow<()>>,
) -> Result<Option<StopReason>> {
    let mut verdict = None;
    let max_steps = opts.max_new_tokens - progress.n_generated;
    let n_past = progress.n_past;
    progress.n_past += 1; // `id`, fed first
    let fed = model.decode_greedy(id, max_steps, &mut |next| match progress
        .decide(next, opts, on_token)
    {
        Ok(ControlFlow::Continue(())) => {
            progress.n_past += 1;
            true
        }
        Ok(ControlFlow::Break(r)) => {
            verdict = Some(Ok(r));
            false
        }
        Err(e) => {
            verdict = Some(Err(e));
            false
        }
    })?;
    let Some(fed) = fed else {
        progress.n_past = n_past;
        return Ok(None);
    };
    progress.n_decoded += fed;
    match verdict {
        Some(v) => v.map(Some),
        None => Err(Error::InvalidRequest(
            "greedy decoding ended without a token refused (a LanguageModel::decode_greedy \
             that stopped on its own)"
                .into(),
        )),
    }
}

/// Where a generation stands, and what happens to each token picked.
struct Progress {
    n_generated: usize,
    n_decoded: usize,
    /// Tokens in the model's cache (the fed ones included).
    n_past: usize,
    n_ctx: usize,
    history: Vec<u32>,
}

impl Progress {
    /// Takes picked token `id`: `Continue` when it is to be fed to the model next (it was passed
    /// to `on_token`), else why generation ends (an end-of-generation token is not passed on).
    fn decide(
        &mut self,
        id: u32,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32) -> Result<ControlFlow<()>>,
    ) -> Result<ControlFlow<StopReason>> {
        if opts.stop_ids.contains(&id) {
            return Ok(ControlFlow::Break(StopReason::EndOfGeneration));
        }
        self.n_generated += 1;
        self.history.push(id);
        if on_token(id)?.is_break() {
            return Ok(ControlFlow::Break(StopReason::Callback));
        }
        if self.n_generated >= opts.max_new_tokens {
            return Ok(ControlFlow::Break(StopReason::MaxTokens));
        }
        if self.n_past >= self.n_ctx {
            return Ok(ControlFlow::Break(StopReason::ContextFull));
        }
        Ok(ControlFlow::Continue(()))
    }
}
