//! `hypura optimize`: rewrite a MoE GGUF so that experts read together lie together, then check
//! that the new file gives the same logits and count the reads it saves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use hypura::generate::argmax;
use hypura::gguf::ModelFiles;
use hypura::loader::{default_n_ctx, learn_path, plan_model_unmeasured, LoadOptions};
use hypura::models::{LanguageModel, Logits};
use hypura::optimize::{plan_rewrite, write, OrderStrategy, Rewrite};
use hypura::plan::Mode;
use hypura::storage::experts::CoActivation;
use hypura::storage::ExpertStats;

use crate::common::ModelArgs;

#[derive(Args, Debug)]
#[command(after_help = "\
For mixture-of-experts models that stream their experts. Each expert miss reads the expert's
slices of ffn_gate_exps, ffn_up_exps and ffn_down_exps; the expert cache merges slices that lie
back to back into one read. This writes a copy of MODEL in which each layer's experts are
renumbered (router rows and expert slices permuted together) so that experts the same token
uses are neighbours, each layer's three expert tensors are adjacent (gate, up, down), and every
tensor is aligned to 4096 bytes. Logits are unchanged (bit-identical in hypura; llama.cpp loads
the file). Metadata, the tokenizer and all tensor names, types and shapes are kept; the
permutation is recorded as hypura.expert_order.

The order comes from the co-activation statistics hypura saves for MODEL after a run that
streamed its experts (`hypura run -m MODEL --ram-budget ...`), or from --stats. Without any, the
experts keep their order and only the layout changes. The statistics are also written, renumbered,
for OUT, so its first run starts with a warm predictor.

Then (unless --check 0) both files run the same greedy decode with the placement options given
(e.g. --ram-budget to force expert-streaming): the logits must be bit-identical, and the expert
reads and bytes per token of each are printed next to the expected ones.

Example:
  hypura run -m moe.gguf --ram-budget 600MiB -n 64 -p \"Once upon a time\"   # learns statistics
  hypura optimize -m moe.gguf -o moe-opt.gguf --ram-budget 600MiB
  hypura run -m moe-opt.gguf --ram-budget 600MiB --stats -p \"...\"")]
pub struct OptimizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output GGUF file (never the input).
    #[arg(short = 'o', long = "out", value_name = "OUT.gguf")]
    pub out: PathBuf,
    /// Co-activation statistics to order the experts by (default: the ones hypura saved for
    /// MODEL, if any).
    #[arg(long, value_name = "FILE")]
    pub stats: Option<PathBuf>,
    /// Expert order: pairs (experts used by the same token side by side), popularity (most used
    /// first) or keep (only the layout changes).
    #[arg(long, default_value = "pairs", value_name = "ORDER")]
    pub order: String,
    /// Greedy-decode this many tokens on both files to check the logits and count reads (0: skip).
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub check: usize,
}

pub fn optimize(a: OptimizeArgs) -> Result<()> {
    let strategy = OrderStrategy::parse(&a.order)
        .with_context(|| format!("--order '{}': expected pairs, popularity or keep", a.order))?;
    let path = a.model.resolve(false)?;
    let files = ModelFiles::open(&path)?;
    let cfg = files.config()?;
    let (stats, source) = match &a.stats {
        Some(p) => match CoActivation::load(p, cfg.n_expert)? {
            Some(s) => (Some(s), format!("{}", p.display())),
            None => bail!(
                "{}: no co-activation statistics for a model with {} experts per layer",
                p.display(),
                cfg.n_expert
            ),
        },
        None => {
            let p = learn_path(&path);
            let s = if a.model.tiers.no_learn {
                None
            } else {
                CoActivation::load(&p, cfg.n_expert)?
            };
            (s, format!("{}", p.display()))
        }
    };
    // The expert cache the file will run with here (with these placement options), if any: only
    // for the expected reads, so a plan that fails (a budget too small) just leaves them out.
    let cache_slots = {
        let n_ctx = a.model.ctx_size.unwrap_or_else(|| default_n_ctx(&cfg));
        let tiers = a.model.tiers.options()?;
        let device = hypura::backend::best_device()?;
        plan_model_unmeasured(&files, &cfg, n_ctx, &tiers, &device)
            .ok()
            .filter(|(p, _)| p.mode == Mode::ExpertStreaming)
            .map(|(p, _)| p.placement.expert_cache.slots)
    };
    let rw = plan_rewrite(&files, &cfg, strategy, stats, cache_slots)?;
    match &rw.stats {
        Some(s) => eprintln!(
            "hypura: expert order '{}' from the statistics of {} tokens ({source}){}",
            strategy.name(),
            s.tokens_seen() / cfg.n_expert_used.max(1) as u64,
            if rw.pairs_known { "" } else { "; no pair counts in them: experts taken as independent" }
        ),
        None => eprintln!(
            "hypura: no co-activation statistics ({source} does not exist: run the model with its experts \
             streamed first, or pass --stats): experts keep their order, only the layout changes"
        ),
    }
    write_with_progress(&files, &rw, &a.out)?;
    check_output(&files, &a.out)?;
    if let Some(s) = rw.permuted_stats().filter(|_| !a.model.tiers.no_learn) {
        let p = learn_path(&a.out);
        s.save(&p)?;
        eprintln!(
            "hypura: statistics for {} saved as {}",
            a.out.display(),
            p.display()
        );
    }
    let changed = rw
        .orders
        .iter()
        .enumerate()
        .filter(|(_, o)| o.iter().enumerate().any(|(i, &e)| i != e))
        .count();
    println!(
        "wrote {}: {} tensors, aligned to {} bytes, experts reordered in {changed} of {} layers",
        a.out.display(),
        rw.tensor_order.len(),
        rw.alignment,
        cfg.n_layer
    );
    for (l, o) in rw
        .orders
        .iter()
        .enumerate()
        .filter(|(_, o)| o.iter().enumerate().any(|(i, &e)| i != e))
    {
        println!("  layer {l}: new expert i = old expert {o:?}[i]");
    }
    if let Some((before, after)) = rw.expected_reads {
        println!(
            "expected expert reads per token, no cache (every used expert read): {before:.2} → {after:.2} ({:+.1} %)",
            (after / before - 1.0) * 100.0
        );
    }
    if let (Some((before, after)), Some(slots)) = (rw.expected_reads_cached, rw.cache_slots) {
        println!(
            "expected expert reads per token, cache of {slots} experts (an estimate: the most used \
             taken as cached): {before:.2} → {after:.2} ({:+.1} %)",
            (after / before - 1.0) * 100.0
        );
    }
    if a.check > 0 {
        check_runs(&a, &path, &rw)?;
    }
    Ok(())
}

fn write_with_progress(files: &ModelFiles, rw: &Rewrite, out: &Path) -> Result<()> {
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(files.tensor_bytes());
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "writing [{bar:30}] {bytes}/{total_bytes} ({eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    });
    let b2 = bar.clone();
    write(
        files,
        rw,
        out,
        Arc::new(move |n| {
            if let Some(b) = &b2 {
                b.inc(n)
            }
        }),
    )?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(())
}

/// The output parses and holds the input's tensors (names, types, shapes) and metadata.
fn check_output(files: &ModelFiles, out: &Path) -> Result<()> {
    let o = ModelFiles::open(out).with_context(|| format!("reading back {}", out.display()))?;
    for t in &files.tensors {
        match o.tensor(&t.name) {
            Some(x) if x.ty == t.ty && x.dims == t.dims => {}
            _ => bail!(
                "{}: tensor {} did not come through intact",
                out.display(),
                t.name
            ),
        }
    }
    if o.tensors.len() != files.tensors.len() {
        bail!(
            "{}: {} tensors, the input has {}",
            out.display(),
            o.tensors.len(),
            files.tensors.len()
        );
    }
    for (k, v) in &files.metadata.entries {
        let kept =
            k.starts_with("split.") || k == "general.alignment" || k == hypura::optimize::ORDER_KEY;
        if !kept && o.metadata.get(k) != Some(v) {
            bail!(
                "{}: metadata key {k} did not come through intact",
                out.display()
            );
        }
    }
    Ok(())
}

/// Greedy decode on both files; logits must match bit for bit. Prints reads per token.
fn check_runs(a: &OptimizeArgs, original: &Path, rw: &Rewrite) -> Result<()> {
    let run = |p: &Path| -> Result<(Vec<Vec<f32>>, Option<ExpertStats>, String)> {
        let opts = LoadOptions {
            n_ctx: a.model.ctx_size,
            device: hypura::backend::best_device()?,
            progress: false,
            tiers: a.model.tiers.options()?,
        };
        let mut m =
            hypura::loader::load(p, &opts).with_context(|| format!("loading {}", p.display()))?;
        let prompt = m
            .tokenizer
            .encode("Once upon a time, in a land far away,", true, false)?;
        let prompt: Vec<u32> = prompt.into_iter().take(12).collect();
        let mut logits: Vec<Vec<f32>> = m.model.forward(&prompt, Logits::All)?.to_vec2()?;
        let before = m.experts.as_ref().map(|c| c.stats());
        for _ in 0..a.check {
            let last = logits.last().map_or(0, |l| argmax(l));
            let l: Vec<Vec<f32>> = m.model.forward(&[last], Logits::Last)?.to_vec2()?;
            logits.extend(l);
        }
        let stats = match (&m.experts, before) {
            (Some(c), Some(b)) => Some(c.stats().since(&b)),
            _ => None,
        };
        Ok((logits, stats, crate::common::plan_summary(&m.plan)))
    };
    let (want, s0, plan) = run(original)?;
    let (got, s1, _) = run(&a.out)?;
    let positions = want.len();
    let same = want.len() == got.len()
        && want
            .iter()
            .zip(&got)
            .all(|(x, y)| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()));
    if !same {
        let first = want.iter().zip(&got).position(|(x, y)| x != y).unwrap_or(0);
        bail!(
            "{}: logits differ from the original's at position {first}",
            a.out.display()
        );
    }
    println!(
        "check: logits bit-identical at all {positions} positions (prompt + {} greedy tokens)",
        a.check
    );
    match (s0, s1) {
        (Some(s0), Some(s1)) => {
            let n = a.check as f64;
            let line = |name: &str, s: &ExpertStats| {
                println!(
                    "  {name}: {:.2} reads and {:.2} MiB per token, hit rate {:.1} %",
                    s.reads as f64 / n,
                    s.bytes_read as f64 / n / (1u64 << 20) as f64,
                    s.hit_rate() * 100.0
                )
            };
            println!("measured while decoding ({plan}):");
            line("original ", &s0);
            line("optimized", &s1);
            if s0.reads == 0 {
                println!(
                    "  (every expert stayed cached: a smaller --ram-budget makes them stream)"
                );
            } else {
                println!(
                    "  reads per token {:+.1} %{}",
                    (s1.reads as f64 / s0.reads as f64 - 1.0) * 100.0,
                    rw.expected_reads_cached.or(rw.expected_reads).map_or(
                        String::new(),
                        |(b, a)| format!(" (expected {:+.1} %)", (a / b - 1.0) * 100.0)
                    )
                );
            }
        }
        _ => println!(
            "  nothing streamed (the model fits): pass --ram-budget to measure the expert reads"
        ),
    }
    Ok(())
}
