//! Opening a model end to end: index the GGUF, build the tokenizer, plan where each tensor lives
//! (from the machine's profile and the budgets), read the weights (with a progress bar), build
//! the model. The one entry point the CLI, the examples and library users share.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;

use crate::error::Result;
use crate::gguf::{ModelConfig, ModelFiles};
use crate::hardware::{self, MemoryInfo, Profile};
use crate::models::Transformer;
use crate::plan::{self, Budgets, ExpertOptions, Override, Plan, PlanInput, Rates};
use crate::storage::experts::CoActivation;
use crate::storage::{ExpertCache, Streamer, WeightStore};
use crate::tokenizer::Tokenizer;

/// Where tensors may go: budgets and overrides. Defaults: what the machine can safely give.
#[derive(Clone, Debug, Default)]
pub struct TierOptions {
    /// RAM hypura may use; `None` = available RAM (cgroup-aware) minus headroom for the OS.
    pub ram_budget: Option<u64>,
    /// GPU memory hypura may use (GPU builds).
    pub device_budget: Option<u64>,
    /// `--place REGEX=tier` rules, applied first.
    pub overrides: Vec<Override>,
    /// Fixed prefetch depth instead of the derived one.
    pub lookahead: Option<usize>,
    /// Expert-cache choices (MoE models that stream experts).
    pub experts: ExpertOptions,
    /// Neither load nor save the co-activation statistics learned per model (MoE).
    pub no_learn: bool,
    /// GPU builds: where RAM-tier matrices are multiplied; `None` = from the profile's rates.
    pub ram_compute: Option<crate::plan::RamCompute>,
}

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// KV-cache size in tokens; `None` = the model's training context, capped at 4096.
    pub n_ctx: Option<usize>,
    pub device: Device,
    /// Draw progress bars on stderr while profiling and reading weights.
    pub progress: bool,
    pub tiers: TierOptions,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            n_ctx: None,
            device: Device::Cpu,
            progress: false,
            tiers: TierOptions::default(),
        }
    }
}

/// A model ready to run.
pub struct LoadedModel {
    pub files: ModelFiles,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub model: Transformer,
    pub plan: Plan,
    /// The streaming engine, when the plan streams tensors from disk.
    pub streamer: Option<Arc<Streamer>>,
    /// The expert cache, when the plan streams MoE experts.
    pub experts: Option<Arc<ExpertCache>>,
    /// GPU builds: uploads of RAM- and NVMe-tier weights to the device, if any.
    #[cfg(feature = "cuda")]
    pub uploader: Option<Arc<crate::storage::Uploader>>,
    /// GPU builds: the device expert cache, if the plan has one.
    #[cfg(feature = "cuda")]
    pub device_experts: Option<Arc<crate::storage::experts::DeviceExperts>>,
    /// Where the expert co-activation statistics are saved (`None`: learning is not kept).
    pub learn_path: Option<PathBuf>,
    pub load_seconds: f64,
}

impl LoadedModel {
    /// Saves what the expert cache learned about co-activation, so the next run starts warm.
    /// Does nothing without an expert cache or with `no_learn`.
    pub fn save_learned(&self) -> Result<()> {
        match (&self.experts, &self.learn_path) {
            (Some(cache), Some(path)) => cache.learned().save(path),
            _ => Ok(()),
        }
    }
}

/// Where co-activation statistics for the model at `path` are kept: the user cache dir, keyed by
/// the file's name and size.
pub fn learn_path(path: &Path) -> PathBuf {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    hardware::cache_dir()
        .join("experts")
        .join(format!("{stem}-{size:x}.json"))
}

/// Default context size: the training context, capped at 4096 tokens (llama.cpp's default).
pub fn default_n_ctx(cfg: &ModelConfig) -> usize {
    cfg.n_ctx_train.clamp(1, 4096)
}

/// The RAM budget hypura takes by default: what is available, less headroom — for the OS and the
/// rest of the machine (10 %, at least 512 MiB), or inside a memory cgroup, whose limit covers only
/// this process and its page cache, for the binary, libraries and allocator slack (8 % + 16 MiB).
pub fn default_ram_budget(mem: &MemoryInfo) -> u64 {
    let headroom = match mem.cgroup_limit_bytes {
        Some(limit) if limit <= mem.total_bytes => limit / 12 + (16 << 20),
        _ => (mem.total_bytes / 10).max(512 << 20),
    };
    mem.available_bytes.saturating_sub(headroom)
}

/// Rates assumed before the machine is measured (only used for predictions of plans that stream
/// nothing; a streaming plan always measures first).
const UNMEASURED: Rates = Rates {
    mem_read_bps: 20e9,
    disk_read_bps: 1e9,
    device_read_bps: 20e9,
    upload_bps: 20e9,
};

/// The device budget hypura takes by default on a GPU: its free memory, less headroom for the
/// CUDA runtime, cuBLAS workspaces and allocator slack (5 % of the total, at least 1 GiB).
/// `None` for the CPU (no device budget: the device tier is RAM).
pub fn default_device_budget(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Some((free, total)) = hardware::gpu::memory(device) {
        return Some(device_budget_of(free, total, false, 0));
    }
    #[cfg(feature = "metal")]
    if let Some((free, total)) = hardware::metal::memory(device) {
        let ram = default_ram_budget(&hardware::read_memory());
        return Some(device_budget_of(free, total, true, ram));
    }
    let _ = device;
    None
}

/// Whether `device`'s memory is the machine's RAM (Metal on Apple Silicon): the device tier and
/// the RAM tier then draw on one pool of memory.
pub fn unified_memory(device: &Device) -> bool {
    device.is_metal()
}

/// The default device budget from the device's `free` and `total` memory. A discrete GPU keeps
/// 5 % of its total (at least 1 GiB) free. On unified memory, `free` is what Metal recommends
/// this process keep resident, less 512 MiB for command buffers and candle's intermediates, and
/// never more than `ram_default`, the RAM budget the machine allows as a whole.
pub fn device_budget_of(free: u64, total: u64, unified: bool, ram_default: u64) -> u64 {
    if unified {
        free.saturating_sub(512 << 20).min(ram_default)
    } else {
        free.saturating_sub((total / 20).max(1 << 30))
    }
}

/// The default RAM budget beside a device budget. On unified memory the device tier's buffers
/// are RAM too, so the RAM tier gets what is left of `ram_default` after them: the two together
/// never ask for more than the machine has (the seed's 32 GB Mac: 22 GiB device, 8 GiB RAM).
pub fn ram_budget_beside(ram_default: u64, device_budget: Option<u64>, unified: bool) -> u64 {
    match device_budget {
        Some(d) if unified => ram_default.saturating_sub(d),
        _ => ram_default,
    }
}

/// Plans `files` for this machine, running on `device`. Reads the cached profile; measures the
/// disk only when the plan streams and no profile is cached yet. A GPU (or `--device-budget`)
/// gives the plan a device budget.
pub fn plan_model(
    files: &ModelFiles,
    cfg: &ModelConfig,
    n_ctx: usize,
    tiers: &TierOptions,
    device: &Device,
    progress: bool,
) -> Result<(Plan, Option<Profile>)> {
    plan_model_with(files, cfg, n_ctx, tiers, device, Some(progress))
}

/// Like [`plan_model`], but never measures: without a cached profile the plan is predicted with
/// assumed rates (the placement is the same; only predicted speeds and the prefetch depth use
/// the rates). Reads no tensor data.
pub fn plan_model_unmeasured(
    files: &ModelFiles,
    cfg: &ModelConfig,
    n_ctx: usize,
    tiers: &TierOptions,
    device: &Device,
) -> Result<(Plan, Option<Profile>)> {
    plan_model_with(files, cfg, n_ctx, tiers, device, None)
}

/// `measure`: `Some(progress)` to profile the machine when the plan streams and none is cached.
fn plan_model_with(
    files: &ModelFiles,
    cfg: &ModelConfig,
    n_ctx: usize,
    tiers: &TierOptions,
    device: &Device,
    measure: Option<bool>,
) -> Result<(Plan, Option<Profile>)> {
    let mem = hardware::read_memory();
    let device_bytes = tiers
        .device_budget
        .or_else(|| default_device_budget(device));
    let budgets = Budgets {
        ram_bytes: tiers.ram_budget.unwrap_or_else(|| {
            ram_budget_beside(
                default_ram_budget(&mem),
                device_bytes,
                unified_memory(device),
            )
        }),
        device_bytes,
    };
    let cached = hardware::cached_profile(files.path());
    let rates = |p: &Option<Profile>| {
        p.as_ref().map_or(UNMEASURED, |p| Rates {
            mem_read_bps: p.mem_read_bps,
            disk_read_bps: p.disk_read_bps,
            device_read_bps: p.device.device_read_bps.unwrap_or(p.mem_read_bps),
            upload_bps: p.device.upload_bps.unwrap_or(p.mem_read_bps),
        })
    };
    // MoE: the routing earlier runs saw (the statistics `run` saves), for the predictions.
    let routing = if cfg.is_moe() && !tiers.no_learn {
        CoActivation::load(&learn_path(files.path()), cfg.n_expert)?
            .map(|c| c.routing_shares())
            .filter(|r| !r.is_empty())
    } else {
        None
    };
    let input = |r: Rates| PlanInput {
        tensors: &files.tensors,
        config: cfg,
        n_ctx,
        budgets,
        rates: r,
        overrides: &tiers.overrides,
        lookahead: tiers.lookahead,
        experts: tiers.experts,
        ram_compute: tiers.ram_compute,
        routing: routing.as_deref(),
    };
    let p = plan::plan(&input(rates(&cached)))?;
    let Some(progress) = measure.filter(|_| !p.placement.groups.is_empty() && cached.is_none())
    else {
        return Ok((p, cached));
    };
    let profile = hardware::profile(files.path(), false, progress)?;
    let p = plan::plan(&input(rates(&Some(profile.clone()))))?;
    Ok((p, Some(profile)))
}

/// Opens, checks, plans and loads the model at `path` (a single GGUF or the first part of a
/// split set).
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
    let (plan, _) = plan_model(
        &files,
        &config,
        n_ctx,
        &opts.tiers,
        &opts.device,
        opts.progress,
    )?;
    let mut store =
        WeightStore::with_placement(files.clone(), &opts.device, plan.placement.clone())?;
    // What loading copies: device-tier weights (and, on a GPU, the RAM tier's page-locked copies).
    let by_tier = plan.placement.bytes_by_tier(&files.tensors);
    let tier_bytes = |k: plan::TierKind| by_tier.get(&k).copied().unwrap_or(0);
    let mut device_bytes = tier_bytes(plan::TierKind::Device);
    if opts.device.is_cuda() {
        device_bytes += tier_bytes(plan::TierKind::Ram);
    }
    let bar = opts.progress.then(|| {
        let bar = indicatif::ProgressBar::new(device_bytes);
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
    let streamer = store.streamer().cloned();
    let experts = store.expert_cache().cloned();
    #[cfg(feature = "cuda")]
    let (uploader, device_experts) = (store.uploader(), store.device_experts().cloned());
    let learn_path = (experts.is_some() && !opts.tiers.no_learn).then(|| learn_path(path));
    if let (Some(cache), Some(p)) = (&experts, &learn_path) {
        if let Some(learned) = CoActivation::load(p, config.n_expert)? {
            cache.set_learned(learned);
        }
    }
    Ok(LoadedModel {
        files,
        config,
        tokenizer,
        model,
        plan,
        streamer,
        experts,
        #[cfg(feature = "cuda")]
        uploader,
        #[cfg(feature = "cuda")]
        device_experts,
        learn_path,
        load_seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn discrete_gpu_keeps_five_percent_free() {
        // An H200: 140 GiB free of 141; 5 % of the total stays free.
        assert_eq!(
            device_budget_of(140 * GIB, 141 * GIB, false, 0),
            140 * GIB - 141 * GIB / 20
        );
        // A small card: at least 1 GiB.
        assert_eq!(device_budget_of(7 * GIB, 8 * GIB, false, 0), 6 * GIB);
        // The RAM budget does not bound a discrete GPU, nor the other way round.
        assert_eq!(
            ram_budget_beside(20 * GIB, Some(100 * GIB), false),
            20 * GIB
        );
    }

    #[test]
    fn unified_memory_shares_one_pool() {
        // A 32 GB Mac: Metal recommends ~21.3 GiB resident; 27 GiB of RAM may be taken.
        let ws = 21 * GIB + 300 * (1 << 20);
        let dev = device_budget_of(ws, ws, true, 27 * GIB);
        assert_eq!(dev, ws - 512 * (1 << 20));
        // The RAM tier gets what the device tier leaves, so the two fit the machine together.
        let ram = ram_budget_beside(27 * GIB, Some(dev), true);
        assert_eq!(ram + dev, 27 * GIB);
        // The device budget never exceeds what RAM allows.
        assert_eq!(device_budget_of(ws, ws, true, 4 * GIB), 4 * GIB);
        // The seed's budgets, given by hand on unified memory: RAM left after the device's.
        assert_eq!(ram_budget_beside(30 * GIB, Some(22 * GIB), true), 8 * GIB);
        assert_eq!(ram_budget_beside(10 * GIB, Some(22 * GIB), true), 0);
        // No device budget (a CPU build): the whole RAM budget.
        assert_eq!(ram_budget_beside(27 * GIB, None, true), 27 * GIB);
    }
}
