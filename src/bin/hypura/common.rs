//! What every subcommand shares: the model argument, threads, loading with a progress bar.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use hypura::hub::{self, HubOptions, ModelRef};
use hypura::loader::{self, LoadOptions, LoadedModel, TierOptions};
use hypura::plan::{gib, mib, ExpertOptions, Mode, Override, Plan, TierKind};
use hypura::storage::EvictionPolicy;

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model: a .gguf path, or a Hub reference ORG/REPO:FILE.gguf.
    #[arg(short = 'm', long = "model", value_name = "MODEL")]
    pub model: Option<String>,
    /// CPU threads for the compute kernels (default: all cores).
    #[arg(short = 't', long, value_name = "N")]
    pub threads: Option<usize>,
    /// Context size in tokens (KV cache). Default: the model's training context, at most 4096.
    #[arg(short = 'c', long = "ctx-size", value_name = "N")]
    pub ctx_size: Option<usize>,
    #[command(flatten)]
    pub tiers: TierArgs,
}

/// Where tensors may go. hypura plans this itself from the machine; these override it.
#[derive(Args, Clone, Debug, Default)]
pub struct TierArgs {
    /// RAM hypura may use, e.g. 3GiB (default: available RAM, cgroup-aware, minus headroom).
    /// A model that does not fit streams its feed-forward weights from disk.
    #[arg(long = "ram-budget", value_name = "SIZE", help_heading = "Placement")]
    pub ram_budget: Option<String>,
    /// GPU memory hypura may use (GPU builds), e.g. 22GiB.
    #[arg(
        long = "device-budget",
        value_name = "SIZE",
        help_heading = "Placement"
    )]
    pub device_budget: Option<String>,
    /// Put tensors whose name matches REGEX on a tier, before any other rule, like llama.cpp's
    /// -ot: e.g. --place 'blk\.[0-9]\.ffn_.*=nvme'. Tiers: device, ram (the mapped file), nvme
    /// (streamed with direct I/O). Repeatable; the first match wins.
    #[arg(long = "place", value_name = "REGEX=TIER", help_heading = "Placement")]
    pub place: Vec<String>,
    /// Stream groups read ahead (default: derived from disk and memory bandwidth).
    #[arg(long, value_name = "N", help_heading = "Placement")]
    pub lookahead: Option<usize>,
    /// GPU builds: where layers placed in RAM are multiplied during decode: gpu (copied to the
    /// GPU per use) or host (on the CPU over the mapped file; only activations cross the bus).
    /// Default: whichever the profile's host-memory and host→device rates predict faster.
    #[arg(long = "ram-compute", value_name = "WHERE", help_heading = "Placement")]
    pub ram_compute: Option<String>,
    /// MoE models that stream experts: how many experts the expert cache holds (default: as
    /// many as the RAM budget allows).
    #[arg(
        long = "expert-cache",
        value_name = "N",
        help_heading = "Mixture of experts"
    )]
    pub expert_cache: Option<usize>,
    /// Expert-cache eviction policy: lfu (least frequently used; the default) or lru.
    #[arg(
        long = "expert-policy",
        value_name = "POLICY",
        help_heading = "Mixture of experts"
    )]
    pub expert_policy: Option<String>,
    /// Do not prefetch the experts the co-activation statistics predict for the next layer.
    #[arg(long = "no-prefetch", help_heading = "Mixture of experts")]
    pub no_prefetch: bool,
    /// Neither load nor save the per-model co-activation statistics (kept under the user cache
    /// dir, so a second run starts with a warm predictor).
    #[arg(long = "no-learn", help_heading = "Mixture of experts")]
    pub no_learn: bool,
}

impl TierArgs {
    pub fn options(&self) -> Result<TierOptions> {
        let size = |s: &Option<String>| s.as_deref().map(hypura::plan::parse_bytes).transpose();
        Ok(TierOptions {
            ram_budget: size(&self.ram_budget)?,
            device_budget: size(&self.device_budget)?,
            overrides: self
                .place
                .iter()
                .map(|p| Override::parse(p))
                .collect::<hypura::Result<_>>()?,
            lookahead: self.lookahead,
            ram_compute: self
                .ram_compute
                .as_deref()
                .map(|s| {
                    hypura::plan::RamCompute::parse(s)
                        .with_context(|| format!("--ram-compute '{s}': expected gpu or host"))
                })
                .transpose()?,
            experts: ExpertOptions {
                slots: self.expert_cache,
                policy: self
                    .expert_policy
                    .as_deref()
                    .map(|p| {
                        EvictionPolicy::parse(p)
                            .with_context(|| format!("--expert-policy '{p}': expected lfu or lru"))
                    })
                    .transpose()?,
                no_prefetch: self.no_prefetch,
            },
            no_learn: self.no_learn,
        })
    }
}

/// One line saying what the plan does.
pub fn plan_summary(p: &Plan) -> String {
    let tiers = |k: TierKind| p.placement.tiers.values().filter(|t| **t == k).count();
    let device = match p.budgets.device_bytes {
        Some(b) => format!(
            "{} of a {} device budget, ",
            gib(p.device_needed_bytes),
            gib(b)
        ),
        None => String::new(),
    };
    match p.mode {
        Mode::FullResident => format!(
            "mode full-resident: {device}{} of a {} RAM budget{}",
            gib(p.ram_needed_bytes),
            gib(p.budgets.ram_bytes),
            if tiers(TierKind::Ram) + tiers(TierKind::Nvme) > 0 {
                format!(" ({} tensors mapped, {} streamed by --place)", tiers(TierKind::Ram), tiers(TierKind::Nvme))
            } else {
                String::new()
            }
        ),
        Mode::FfnStreaming => format!(
            "mode FFN-streaming: {} of a {} RAM budget; {} streamed per token in {} reads, lookahead {}, pool {} × {}; predicted {:.2} tok/s",
            gib(p.ram_needed_bytes),
            gib(p.budgets.ram_bytes),
            gib(p.bytes_per_token.nvme),
            p.placement.groups.len(),
            p.placement.lookahead,
            p.pool_slots,
            gib(p.pool_slot_bytes),
            p.predicted_tok_s
        ),
        Mode::ExpertStreaming => {
            let c = &p.placement.expert_cache;
            format!(
                "mode expert-streaming: {} of a {} RAM budget; expert cache {} × {} ({}, prefetch {}); \
                 predicted {} read per token at {} routing, {:.2} tok/s",
                gib(p.ram_needed_bytes),
                gib(p.budgets.ram_bytes),
                c.slots,
                mib(p.expert_slot_bytes),
                c.policy.name(),
                if c.prefetch { "on" } else { "off" },
                gib(p.bytes_per_token.nvme),
                if p.routing_observed { "the observed" } else { "uniform" },
                p.predicted_tok_s
            )
        }
        Mode::LayerOffload => format!(
            "mode layer offload: {device}{} of a {} RAM budget; per token {} from RAM ({}) and {} streamed to the GPU; predicted {:.2} tok/s",
            gib(p.ram_needed_bytes),
            gib(p.budgets.ram_bytes),
            gib(p.bytes_per_token.ram),
            match p.placement.ram_compute {
                hypura::plan::RamCompute::Upload => "copied to the GPU",
                hypura::plan::RamCompute::Host => "multiplied on the host",
            },
            gib(p.bytes_per_token.nvme),
            p.predicted_tok_s
        ),
    }
}

impl ModelArgs {
    /// Resolves MODEL to a local file. With no MODEL, `default_ok` allows the default model
    /// (the Hub default if reachable or cached, else the bundled random-weight model).
    pub fn resolve(&self, default_ok: bool) -> Result<PathBuf> {
        let opts = HubOptions::from_env();
        match &self.model {
            Some(m) => {
                let r = ModelRef::parse(m)?;
                Ok(hub::resolve(&r, &opts)?)
            }
            None if default_ok => {
                let (path, why) = hub::default_model(&opts)?;
                eprintln!("hypura: no -m given; {why}");
                Ok(path)
            }
            None => {
                anyhow::bail!("no model given: pass -m MODEL (a .gguf path or ORG/REPO:FILE.gguf)")
            }
        }
    }

    /// Resolves and loads the model, reporting on stderr.
    pub fn load(&self, default_ok: bool, n_ctx: Option<usize>) -> Result<LoadedModel> {
        if let Some(t) = self.threads {
            hypura::backend::set_cpu_threads(t);
        }
        let path = self.resolve(default_ok)?;
        let opts = LoadOptions {
            n_ctx: n_ctx.or(self.ctx_size),
            device: hypura::backend::best_device()?,
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            tiers: self.tiers.options()?,
        };
        let loaded =
            loader::load(&path, &opts).with_context(|| format!("loading {}", path.display()))?;
        let c = &loaded.config;
        eprintln!(
            "hypura: {} ({} {}, {} layers, d {}, {}{} vocab {}) loaded in {:.2} s, context {} tokens",
            path.display(),
            c.arch.gguf_name(),
            human_bytes(loaded.files.tensor_bytes()),
            c.n_layer,
            c.n_embd,
            if c.is_moe() { format!("{} experts top-{}, ", c.n_expert, c.n_expert_used) } else { String::new() },
            if c.name.is_empty() { String::new() } else { format!("'{}', ", c.name) },
            c.n_vocab,
            loaded.load_seconds,
            hypura::models::LanguageModel::n_ctx(&loaded.model),
        );
        eprintln!("hypura: {}", plan_summary(&loaded.plan));
        Ok(loaded)
    }
}

pub fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else {
        format!("{:.0} KB", n / 1e3)
    }
}

/// The model's chat template: the file's own, else a built-in format chosen from its
/// vocabulary. A file template that does not compile is reported and replaced by the built-in.
pub fn chat_template(m: &LoadedModel) -> hypura::chat::ChatTemplate {
    use hypura::chat::{Builtin, ChatTemplate};
    match ChatTemplate::for_model(&m.files.metadata, &m.tokenizer) {
        Ok(t) => t,
        Err(e) => {
            let b = Builtin::detect(&m.tokenizer);
            eprintln!(
                "hypura: warning: {e}; using the built-in {} format",
                b.name()
            );
            ChatTemplate::builtin(b, &m.tokenizer)
        }
    }
}
