//! `hypura run`: generate text from a prompt.

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::Result;
use clap::Args;
use hypura::generate::{generate, GenerateOptions, Sampler, SamplingParams};
use hypura::tokenizer::StreamDecoder;

use crate::common::ModelArgs;
use crate::expert_stats::{compare_policies, describe};

#[derive(Args, Debug)]
#[command(after_help = "\
With no -m, hypura uses a well-known small model from the Hugging Face Hub if it is cached or can
be downloaded, and otherwise the tiny bundled model (random weights: it runs, but writes gibberish).

Sampling happens in llama.cpp's order: repetition penalty, top-k, top-p, min-p, temperature.
--temp 0 is greedy decoding. Only the generated text goes to stdout; timings go to stderr.

--interactive chats: each line you type is a message, formatted with the model's chat template
(the file's tokenizer.chat_template, or a built-in Llama-3 / ChatML / Llama-2 format). The KV
cache is kept between turns, so each turn computes only its new tokens. /reset forgets the
conversation, /exit or Ctrl-D quits. Example:
  hypura run -m model.gguf --interactive --system \"You are terse.\"")]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (default "Once upon a time"). With --interactive: the first message.
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    /// Tokens to generate (stops earlier at end-of-generation or when the context is full).
    /// Default 128; with --interactive, per reply, default: no limit but the context.
    #[arg(short = 'n', long = "n-predict")]
    pub n_predict: Option<usize>,
    /// Chat on stdin/stdout with the model's chat template, keeping the KV cache across turns.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// With --interactive: the system prompt.
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to P (1.0 = off).
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0 = off).
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalise tokens seen in the last --repeat-last-n tokens (1.0 = off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed (default: from the clock).
    #[arg(short = 's', long)]
    pub seed: Option<u64>,
    /// Tokens per batch while reading the prompt.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    pub batch_size: usize,
    /// After generating, print what streaming cost: bytes read per token, I/O stall per token,
    /// pool use, and the I/O bound at the measured disk bandwidth.
    #[arg(long)]
    pub stats: bool,
}

impl RunArgs {
    /// The sampler's parameters from the options.
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        }
    }
}

/// Every end-of-generation token of the vocabulary.
pub fn stop_ids(tok: &hypura::tokenizer::Tokenizer) -> Vec<u32> {
    (0..tok.n_vocab() as u32)
        .filter(|&id| tok.is_end_of_generation(id))
        .collect()
}

pub fn run(a: RunArgs) -> Result<()> {
    let mut m = a.model.load(true, None)?;
    if a.interactive {
        let r = crate::chat_repl::chat(&a, &mut m);
        m.save_learned()?;
        return r;
    }
    let text = a.prompt.as_deref().unwrap_or("Once upon a time");
    let prompt = m.tokenizer.encode(text, true, true)?;
    let mut sampler = Sampler::new(a.sampling());
    let opts = GenerateOptions {
        max_new_tokens: a.n_predict.unwrap_or(128),
        stop_ids: stop_ids(&m.tokenizer),
        batch_size: a.batch_size.max(1),
    };
    let before = m.streamer.as_ref().map(|s| s.stats());
    if let Some(c) = &m.experts {
        c.record_trace(a.stats);
    }
    let mut decoder = StreamDecoder::new(&m.tokenizer);
    let mut out = std::io::stdout().lock();
    let stats = generate(&mut m.model, &prompt, &opts, &mut sampler, &mut |id| {
        if let Some(text) = decoder.push(id) {
            out.write_all(text.as_bytes())
                .and_then(|_| out.flush())
                .map_err(|e| hypura::Error::InvalidRequest(format!("writing to stdout: {e}")))?;
        }
        Ok(ControlFlow::Continue(()))
    })?;
    let rest = decoder.finish();
    writeln!(out, "{rest}")?;
    eprintln!(
        "hypura: prompt {} tokens in {:.2} s ({:.1} tok/s), generated {} tokens in {:.2} s \
         ({:.2} tok/s over {} decode steps), stop: {:?}",
        stats.n_prompt,
        stats.prompt_seconds,
        stats.prompt_tok_s(),
        stats.n_generated,
        stats.generate_seconds,
        stats.generate_tok_s(),
        stats.n_decoded,
        stats.stop
    );
    // Forward passes: the prompt's batches, then the decode steps.
    let passes = stats.n_prompt.div_ceil(a.batch_size.max(1)) + stats.n_decoded;
    // Tokens through the model: the prompt's and each decode step's.
    let tokens = stats.n_prompt + stats.n_decoded;
    if let Some(c) = &m.experts {
        eprintln!("hypura: {}", describe(&c.stats(), tokens));
        if a.stats {
            eprintln!(
                "hypura stats: {}",
                compare_policies(&c.trace(), c.config().slots)
            );
        }
    }
    #[cfg(feature = "cuda")]
    if let Some((line, _)) = crate::expert_stats::gpu_report(&m, tokens, None) {
        eprintln!("hypura: {line}");
    }
    if a.stats && m.experts.is_none() {
        print_stream_stats(&m, before.as_ref(), passes);
    }
    m.save_learned()?;
    Ok(())
}

fn print_stream_stats(
    m: &hypura::loader::LoadedModel,
    before: Option<&hypura::storage::StreamStats>,
    passes: usize,
) {
    let Some(s) = &m.streamer else {
        eprintln!("hypura stats: nothing streamed (every tensor is resident)");
        return;
    };
    let now = s.stats();
    let base = before.cloned().unwrap_or_default();
    let bytes = now.bytes_read - base.bytes_read;
    let stall = (now.stall - base.stall).as_secs_f64();
    let io = (now.io_busy - base.io_busy).as_secs_f64();
    let n = passes.max(1) as f64;
    let disk_bps = if io > 0.0 { bytes as f64 / io } else { 0.0 };
    eprintln!(
        "hypura stats: {:.1} MiB read per forward pass ({} reads), I/O stall {:.1} ms per pass, disk {:.2} GB/s while reading; \
         pool {} buffers × {:.1} MiB, lookahead {}; I/O bound {:.2} tok/s (plan predicted {:.2})",
        bytes as f64 / n / (1u64 << 20) as f64,
        now.reads - base.reads,
        stall * 1e3 / n,
        disk_bps / 1e9,
        m.plan.pool_slots,
        m.plan.pool_slot_bytes as f64 / (1u64 << 20) as f64,
        s.lookahead(),
        if bytes > 0 { disk_bps / (bytes as f64 / n) } else { f64::INFINITY },
        m.plan.predicted_tok_s,
    );
}
