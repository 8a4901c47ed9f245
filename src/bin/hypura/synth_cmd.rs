//! `hypura synth`: a GGUF with random weights and a real model's exact tensors.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use hypura::gguf::{Arch, ModelFiles};
use hypura::synth::{padded_vocab, parse_file_type, preset, presets, write_model_with_progress};

#[derive(Args, Debug)]
#[command(after_help = "\
Writes a model with the exact tensor names, shapes and per-tensor quant types of a real one, with
RANDOM weights (written directly as quantized blocks, no quantization pass: it runs at disk speed).
The text it generates is gibberish; its size, layout and speed are real. The vocabulary is the
bundled model's 512-token byte-level BPE, padded with unused tokens to the real vocabulary size.
llama.cpp loads these files.

Examples:
  hypura synth --preset llama-3-8b --type Q4_K_M -o llama-3-8b-synth-Q4_K_M.gguf
  hypura synth --preset mixtral-8x7b --type Q5_K_M -o mixtral-synth.gguf
  hypura synth --preset mixtral-8x7b --layers 8 --router-skew 1.2 --router-corr 0.8 -o moe-skewed.gguf
  hypura synth --layers 8 --dim 2048 --ff 5632 --heads 32 --kv-heads 4 --type Q8_0 -o small.gguf
  hypura synth --list")]
pub struct SynthArgs {
    /// A real model's shape (see --list).
    #[arg(long)]
    pub preset: Option<String>,
    /// Tensor type: Q4_K_M, Q5_K_M, Q3_K_M (llama.cpp's mixes), or one type for all matrices:
    /// Q8_0, Q6_K, Q5_K, Q4_K, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, F16, BF16, F32.
    #[arg(long = "type", default_value = "Q4_K_M")]
    pub ty: String,
    /// Output file.
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
    /// List the presets and exit.
    #[arg(long)]
    pub list: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Architecture for a custom shape: llama or qwen2.
    #[arg(long, help_heading = "Custom shape (overrides the preset's)")]
    pub arch: Option<String>,
    #[arg(long, help_heading = "Custom shape (overrides the preset's)")]
    pub layers: Option<usize>,
    #[arg(long, help_heading = "Custom shape (overrides the preset's)")]
    pub dim: Option<usize>,
    #[arg(long, help_heading = "Custom shape (overrides the preset's)")]
    pub ff: Option<usize>,
    #[arg(long, help_heading = "Custom shape (overrides the preset's)")]
    pub heads: Option<usize>,
    #[arg(
        long = "kv-heads",
        help_heading = "Custom shape (overrides the preset's)"
    )]
    pub kv_heads: Option<usize>,
    #[arg(long, help_heading = "Custom shape (overrides the preset's)")]
    pub experts: Option<usize>,
    #[arg(
        long = "experts-used",
        help_heading = "Custom shape (overrides the preset's)"
    )]
    pub experts_used: Option<usize>,
    #[arg(long, help_heading = "Custom shape (overrides the preset's)")]
    pub vocab: Option<usize>,
    /// MoE only. Random routers route almost uniformly; this makes expert popularity in each
    /// layer follow a Zipf law with this exponent (1 ≈ the top expert picked twice as often as
    /// the second), as trained models' routing is skewed. Synthetic, not learned: see the README.
    #[arg(
        long = "router-skew",
        value_name = "S",
        default_value_t = 0.0,
        help_heading = "Synthetic routing (MoE)"
    )]
    pub router_skew: f32,
    /// MoE only. Correlation in [0, 1) between consecutive layers' routers (up to a permutation
    /// of expert ids), so the experts of one layer predict those of the next.
    #[arg(
        long = "router-corr",
        value_name = "R",
        default_value_t = 0.0,
        help_heading = "Synthetic routing (MoE)"
    )]
    pub router_corr: f32,
}

pub fn synth(a: SynthArgs) -> Result<()> {
    if a.list {
        for p in presets() {
            let s = &p.spec;
            println!(
                "{:14} {} — {} d {}, {} layers, ff {}, {} heads / {} kv{}, vocab {}",
                p.name,
                p.about,
                s.arch.gguf_name(),
                s.n_embd,
                s.n_layer,
                s.n_ff,
                s.n_head,
                s.n_head_kv,
                if s.n_expert > 0 {
                    format!(", {} experts top-{}", s.n_expert, s.n_expert_used)
                } else {
                    String::new()
                },
                p.n_vocab
            );
        }
        return Ok(());
    }
    let Some(out) = a.out.clone() else {
        bail!("give the output file with -o FILE.gguf")
    };
    let base = preset(a.preset.as_deref().unwrap_or("llama-1b"))?;
    let mut spec = base.spec;
    let mut n_vocab = base.n_vocab;
    if let Some(arch) = &a.arch {
        spec.arch = match arch.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => bail!("--arch {other}: llama or qwen2"),
        };
    }
    let set = |v: Option<usize>, f: &mut usize| {
        if let Some(v) = v {
            *f = v;
        }
    };
    set(a.layers, &mut spec.n_layer);
    set(a.dim, &mut spec.n_embd);
    set(a.ff, &mut spec.n_ff);
    set(a.heads, &mut spec.n_head);
    set(a.kv_heads, &mut spec.n_head_kv);
    set(a.experts, &mut spec.n_expert);
    set(a.experts_used, &mut spec.n_expert_used);
    set(a.vocab, &mut n_vocab);
    if spec.n_expert == 0 {
        spec.n_expert_used = 0;
    }
    let (ty, medium) = parse_file_type(&a.ty)?;
    spec.ty = ty;
    spec.k_medium = medium;
    spec.seed = a.seed;
    spec.routing = hypura::synth::RoutingSpec {
        skew: a.router_skew,
        layer_corr: a.router_corr,
    };
    if spec.n_expert == 0 && !spec.routing.is_uniform() {
        bail!("--router-skew and --router-corr shape MoE routing: give --experts too (or an MoE preset)");
    }
    let bundled = hypura::hub::bundled_model_path()?;
    let vocab = padded_vocab(&ModelFiles::open(&bundled)?.metadata, n_vocab)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "writing [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    write_model_with_progress(&spec, &vocab, &out, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let size = std::fs::metadata(&out)?.len();
    eprintln!(
        "hypura: wrote {} ({:.2} GB, {} {}, random weights) in {:.1} s",
        out.display(),
        size as f64 / 1e9,
        spec.arch.gguf_name(),
        a.ty.to_uppercase(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
