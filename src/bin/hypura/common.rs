//! What every subcommand shares: the model argument, threads, loading with a progress bar.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use hypura::hub::{self, HubOptions, ModelRef};
use hypura::loader::{self, LoadOptions, LoadedModel};

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
