//! Opening a model end to end: index the GGUF, build the tokenizer, read the weights (with a
//! progress bar), build the model. The one entry point the CLI, the examples and library users share.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;

use crate::error::Result;
use crate::gguf::{ModelConfig, ModelFiles};
use crate::models::Transformer;
use crate::storage::WeightStore;
use crate::tokenizer::Tokenizer;

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// KV-cache size in tokens; `None` = the model's training context, capped at 4096.
    pub n_ctx: Option<usize>,
    pub device: Device,
    /// Draw a progress bar on stderr while weights are read.
    pub progress: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            n_ctx: None,
            device: Device::Cpu,
            progress: false,
        }
    }
}

/// A model ready to run.
pub struct LoadedModel {
    pub files: ModelFiles,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub model: Transformer,
    pub load_seconds: f64,
}

/// Default context size: the training context, capped at 4096 tokens (llama.cpp's default).
pub fn default_n_ctx(cfg: &ModelConfig) -> usize {
    cfg.n_ctx_train.clamp(1, 4096)
}

/// Opens, checks and loads the model at `path` (a single GGUF or the first part of a split set).
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let start = Instant::now();
    let files = ModelFiles::open(path)?;
    let config = files.config()?;
    let tokenizer = Tokenizer::from_metadata(&files.metadata)?;
    let n_ctx = opts.n_ctx.unwrap_or_else(|| default_n_ctx(&config));
    if n_ctx == 0 {
        return Err(crate::Error::InvalidRequest(
            "context size must be at least 1 token".into(),
        ));
    }
    let mut store = WeightStore::open(files.clone(), &opts.device)?;
    let bar = opts.progress.then(|| {
        let bar = indicatif::ProgressBar::new(files.tensor_bytes());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "loading {msg} [{bar:30}] {bytes}/{total_bytes} ({eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(
            path.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
        );
        bar
    });
    if let Some(bar) = &bar {
        let bar = bar.clone();
        store.on_read(Box::new(move |n| bar.inc(n)));
    }
    let model = Transformer::load(&store, &config, n_ctx)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(LoadedModel {
        files,
        config,
        tokenizer,
        model,
        load_seconds: start.elapsed().as_secs_f64(),
    })
}
