//! `hypura bench`: llama-bench's two tests, pp (prompt processing) and tg (token generation).

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use hypura::loader::LoadedModel;
use hypura::models::{LanguageModel, Logits};

use crate::common::{human_bytes, ModelArgs};

#[derive(Args, Debug)]
#[command(after_help = "\
pp N: one batch of N tokens from an empty cache. tg N: N tokens decoded one at a time from an
empty cache. With -d D, both start from a cache already holding D tokens (filled in one untimed
batch), as llama-bench's -d: decode speed deep into a context. Each test runs once to warm up,
then -r times; the table shows mean ± std tok/s. Cache counters (expert caches, uploads) cover
the timed tg runs only.
Compare with llama.cpp on the same file: benches/vs_llama_cpp.sh.")]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens for the pp test (0 = skip).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub n_prompt: usize,
    /// Generated tokens for the tg test (0 = skip).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    /// Tokens already in the cache when each test starts (llama-bench's -d).
    #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
    pub n_depth: usize,
    /// Repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    pub reps: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Deterministic token ids spread over the vocabulary (avoiding id 0).
fn tokens(n: usize, n_vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| (1 + (i * 7919) % (n_vocab - 1)) as u32)
        .collect()
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// Empties the cache, then fills it with `depth` (one untimed batch).
fn start_at(model: &mut dyn LanguageModel, depth: &[u32]) -> Result<()> {
    model.reset();
    if !depth.is_empty() {
        model.forward(depth, Logits::Last)?;
    }
    Ok(())
}

fn time_pp(model: &mut dyn LanguageModel, depth: &[u32], toks: &[u32]) -> Result<f64> {
    start_at(model, depth)?;
    let t = Instant::now();
    model.forward(toks, Logits::Last)?;
    Ok(toks.len() as f64 / t.elapsed().as_secs_f64())
}

fn time_tg(model: &mut dyn LanguageModel, depth: &[u32], toks: &[u32]) -> Result<f64> {
    start_at(model, depth)?;
    let t = Instant::now();
    // Each step's logits land in host memory, where generation reads them (`decode_with`), as
    // llama-bench's `llama_decode` leaves them in its output buffer; neither reads them here.
    for &id in toks {
        model.decode_with(id, &mut |_| {})?;
    }
    Ok(toks.len() as f64 / t.elapsed().as_secs_f64())
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let n_ctx = a.n_depth + a.n_prompt.max(a.n_gen).max(1);
    let mut m = a.model.load(false, Some(n_ctx)).with_context(|| {
        format!(
            "hypura bench needs a context of {n_ctx} tokens (-d {} + the larger of -p {} and -n {})",
            a.n_depth, a.n_prompt, a.n_gen
        )
    })?;
    let n_vocab = m.config.n_vocab;
    let threads = a
        .model
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let depth = tokens(a.n_depth, n_vocab);
    type Test = fn(&mut dyn LanguageModel, &[u32], &[u32]) -> Result<f64>;
    let warm_up = |m: &mut LoadedModel, n: usize, f: Test| -> Result<()> {
        if n > 0 {
            f(&mut m.model, &depth, &tokens(n.min(16), n_vocab))?;
        }
        Ok(())
    };
    let timed = |m: &mut LoadedModel, n: usize, f: Test| -> Result<Option<(f64, f64)>> {
        if n == 0 {
            return Ok(None);
        }
        let toks = tokens(n, n_vocab);
        let rates = (0..a.reps.max(1))
            .map(|_| f(&mut m.model, &depth, &toks))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(mean_std(&rates)))
    };
    warm_up(&mut m, a.n_prompt, time_pp)?;
    let pp = timed(&mut m, a.n_prompt, time_pp)?;
    warm_up(&mut m, a.n_gen, time_tg)?;
    // The caches' counters over the timed tg runs only (after their warm-up).
    let experts_before = m.experts.as_ref().map(|c| c.stats());
    #[cfg(feature = "cuda")]
    let gpu_before =
        crate::expert_stats::gpu_snapshot(m.uploader.as_ref(), m.device_experts.as_ref());
    let tg = timed(&mut m, a.n_gen, time_tg)?;
    let tg_tokens = a.n_gen * a.reps.max(1);
    let experts = m
        .experts
        .as_ref()
        .zip(experts_before)
        .map(|(c, b)| (c.stats().since(&b), tg_tokens));
    m.save_learned()?;
    let size = m.files.tensor_bytes();
    let n_params: u64 = m
        .files
        .tensors
        .iter()
        .map(|t| t.dims.iter().product::<u64>())
        .sum();
    let model_name = m
        .files
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let backend = if m.model.n_ctx() > 0 && hypura::backend::best_device()?.is_cuda() {
        "CUDA"
    } else {
        "CPU"
    };
    // GPU builds: the device caches over the timed tg runs, like the expert cache.
    #[cfg(feature = "cuda")]
    let gpu = crate::expert_stats::gpu_report(&m, tg_tokens, Some(&gpu_before));
    #[cfg(not(feature = "cuda"))]
    let gpu: Option<(String, serde_json::Value)> = None;
    if a.json {
        let j = serde_json::json!({
            "gpu": gpu.as_ref().map(|g| g.1.clone()),
            "decode": m.model.decode_path(),
            "model": model_name, "size_bytes": size, "n_params": n_params, "backend": backend, "threads": threads,
            "n_prompt": a.n_prompt, "n_gen": a.n_gen, "n_depth": a.n_depth, "repetitions": a.reps,
            "pp_tok_s": pp.map(|x| x.0), "pp_tok_s_std": pp.map(|x| x.1),
            "tg_tok_s": tg.map(|x| x.0), "tg_tok_s_std": tg.map(|x| x.1),
            "expert_cache": experts.as_ref().map(|(s, t)| serde_json::json!({
                "stats": s, "tokens": t, "hit_rate": s.hit_rate(),
                "prefetch_precision": s.prefetch_precision(), "prefetch_recall": s.prefetch_recall(),
                "bytes_per_token": s.bytes_read as f64 / (*t).max(1) as f64,
                "stall_s_per_token": s.stall.as_secs_f64() / (*t).max(1) as f64,
            })),
        });
        println!("{j}");
        return Ok(());
    }
    println!("| model | size | params | backend | threads | test | t/s |");
    println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
    let at = if a.n_depth > 0 {
        format!(" @ d{}", a.n_depth)
    } else {
        String::new()
    };
    for (name, n, r) in [("pp", a.n_prompt, pp), ("tg", a.n_gen, tg)] {
        if let Some((mean, std)) = r {
            println!(
                "| {model_name} | {} | {:.2} M | {backend} | {threads} | {name}{n}{at} | {mean:.2} ± {std:.2} |",
                human_bytes(size),
                n_params as f64 / 1e6
            );
        }
    }
    println!();
    println!("single-token steps: {}", m.model.decode_path());
    if let Some((s, t)) = &experts {
        println!("tg {}", crate::expert_stats::describe(s, *t));
    }
    if let Some((line, _)) = &gpu {
        println!("{line}");
    }
    Ok(())
}
