//! `hypura tokenize`, `logits` and `perplexity`: the tools for checking hypura against another engine.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use hypura::generate::perplexity::{perplexity as compute_ppl, prepare_text};
use hypura::models::{LanguageModel, Logits};

use crate::common::ModelArgs;

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to tokenize.
    #[arg(short = 'p', long)]
    pub prompt: String,
    /// Do not add BOS even if the model asks for it.
    #[arg(long = "no-bos")]
    pub no_bos: bool,
    /// Tokenize special-token text (e.g. <|im_start|>) as plain text.
    #[arg(long = "no-parse-special")]
    pub no_parse_special: bool,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let path = a.model.resolve(false)?;
    let files = hypura::gguf::ModelFiles::open(&path)?;
    let tok = hypura::tokenizer::Tokenizer::from_metadata(&files.metadata)?;
    let ids = tok.encode(&a.prompt, !a.no_bos, !a.no_parse_special)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

#[derive(Args, Debug)]
#[command(
    after_help = "The output is float32 [n_tokens, n_vocab], one forward pass from an empty KV cache."
)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated token ids, e.g. 1,15043,3186.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tokens: Vec<u32>,
    /// Output .npy file.
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    let n = a.tokens.len();
    let mut m = a
        .model
        .load(false, Some(a.model.ctx_size.unwrap_or(n).max(n)))?;
    let logits = m.model.forward(&a.tokens, Logits::All)?;
    logits
        .write_npy(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "hypura: wrote logits {:?} to {}",
        logits.dims(),
        a.out.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
#[command(after_help = "\
Method (llama-perplexity's): the file (minus one trailing newline) is tokenized with BOS, cut into
chunks of -c tokens, each evaluated from an empty cache with its first token replaced by BOS when
the model uses one; the second half of each chunk is scored.")]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to score.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Print {\"ppl\": ..., \"tokens_scored\": ...} as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let n_ctx = a.model.ctx_size.unwrap_or(512);
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let mut m = a.model.load(false, Some(n_ctx))?;
    let tokens = m.tokenizer.encode(prepare_text(&text), true, false)?;
    if tokens.len() < 2 * n_ctx {
        bail!(
            "{}: {} tokens; perplexity with -c {n_ctx} needs at least {} (two chunks)",
            a.file.display(),
            tokens.len(),
            2 * n_ctx
        );
    }
    let bos = if m.tokenizer.adds_bos() {
        m.tokenizer.bos_id()
    } else {
        None
    };
    let n_vocab = m.model.n_vocab();
    eprintln!(
        "hypura: {} tokens, {} chunks of {n_ctx}, vocab {n_vocab}",
        tokens.len(),
        tokens.len() / n_ctx
    );
    let r = compute_ppl(&mut m.model, &tokens, n_ctx, bos, &mut |k, running| {
        eprint!("[{}]{running:.4},", k + 1);
    })?;
    eprintln!();
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "ppl": r.ppl, "tokens_scored": r.tokens_scored, "n_chunks": r.n_chunks })
        );
    } else {
        println!(
            "Final estimate: PPL = {:.4} ({} tokens scored)",
            r.ppl, r.tokens_scored
        );
    }
    Ok(())
}
