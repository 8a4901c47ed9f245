//! `hypura profile` and `hypura plan`: what the machine can do, and where a model would go.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use hypura::gguf::ModelFiles;
use hypura::hardware;
use hypura::loader::{
    default_n_ctx, default_ram_budget, device_budget_of, plan_model, ram_budget_beside,
};
use hypura::plan::{gib, layer_of, Plan, TierKind};

use crate::common::{plan_summary, ModelArgs};

#[derive(Args, Debug)]
#[command(after_help = "\
Measures the compute device and what it may hold, RAM (total and available, narrowed by a cgroup
memory limit), memory read bandwidth, and the direct-I/O read bandwidth of the filesystem that
holds the model (reading the model file itself, around the page cache). The result is cached per
machine and filesystem under ~/.cache/hypura and reused; --reprofile measures again.")]
pub struct ProfileArgs {
    /// A model on the filesystem to measure (its file is read, not changed). Without one, a
    /// 512 MiB scratch file is written in --dir and removed afterwards.
    #[arg(short = 'm', long = "model")]
    pub model: Option<String>,
    /// Folder on the filesystem to measure when no model is given.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Measure again even if a cached profile exists.
    #[arg(long)]
    pub reprofile: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn profile(a: ProfileArgs) -> Result<()> {
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (sample, scratch) = match &a.model {
        Some(m) => {
            let args = ModelArgs {
                model: Some(m.clone()),
                threads: None,
                ctx_size: None,
                tiers: Default::default(),
            };
            (args.resolve(false)?, None)
        }
        None => {
            let p = a
                .dir
                .join(format!(".hypura-profile-{}.tmp", std::process::id()));
            write_scratch(&p, 512 << 20)
                .with_context(|| format!("writing a scratch file in {}", a.dir.display()))?;
            (p.clone(), Some(p))
        }
    };
    let result = hardware::profile(&sample, a.reprofile, progress);
    if let Some(p) = scratch {
        let _ = std::fs::remove_file(p);
    }
    let p = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    let g = |b: f64| format!("{:.2} GB/s", b / 1e9);
    println!("| what | value |");
    println!("| --- | --- |");
    println!("| compute device | {} |", p.device.name);
    let unified = p.device.kind == "metal";
    match (p.device.memory_bytes, p.device.free_bytes) {
        (Some(total), free) => {
            println!(
                "| device memory free / total | {} / {} |",
                free.map_or("?".into(), gib),
                gib(total)
            );
            if let Some(f) = free {
                let ram = default_ram_budget(&p.memory);
                println!(
                    "| default device budget | {} |",
                    gib(device_budget_of(f, total, unified, ram))
                );
            }
        }
        (None, _) => println!("| device memory | none (CPU build: the device tier is RAM) |"),
    }
    if let Some(b) = p.device.upload_bps {
        let how = if p.device.upload_pinned {
            "pinned"
        } else {
            "pageable"
        };
        println!("| host→device copy ({how}) | {} |", g(b));
    }
    if let Some(b) = p.device.device_read_bps {
        println!("| device memory (copy, read + write) | {} |", g(b));
    }
    println!("| CPU threads | {} |", p.cpu_threads);
    println!("| RAM total | {} |", gib(p.memory.total_bytes));
    println!("| RAM available | {} |", gib(p.memory.available_bytes));
    println!(
        "| cgroup memory limit | {} |",
        p.memory
            .cgroup_limit_bytes
            .map_or("none".into(), |l| format!(
                "{} ({})",
                gib(l),
                p.memory.cgroup_version.clone().unwrap_or_default()
            ))
    );
    let device_budget = p
        .device
        .memory_bytes
        .zip(p.device.free_bytes)
        .map(|(total, free)| device_budget_of(free, total, unified, default_ram_budget(&p.memory)));
    println!(
        "| default RAM budget | {}{} |",
        gib(ram_budget_beside(
            default_ram_budget(&p.memory),
            device_budget,
            unified
        )),
        if unified {
            " (unified memory: what the device budget leaves)"
        } else {
            ""
        }
    );
    println!(
        "| memory read, 1 thread / all | {} / {} |",
        g(p.mem_read_bps_1t),
        g(p.mem_read_bps)
    );
    println!(
        "| disk ({}) | {} |",
        p.disk_path.display(),
        if p.disk_direct_io {
            "direct I/O"
        } else {
            "buffered (direct I/O refused)"
        }
    );
    for s in &p.disk_samples {
        println!(
            "| read {} MiB × queue {} | {} |",
            s.request_bytes >> 20,
            s.queue_depth,
            g(s.bytes_per_s)
        );
    }
    println!(
        "| streaming bandwidth used for plans | {} |",
        g(p.disk_read_bps)
    );
    Ok(())
}

fn write_scratch(p: &std::path::Path, bytes: usize) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(p)?);
    let block: Vec<u8> = (0..1 << 20).map(|i: usize| (i * 31 % 251) as u8).collect();
    for _ in 0..bytes >> 20 {
        f.write_all(&block)?;
    }
    f.flush()?;
    f.get_ref().sync_all()
}

#[derive(Args, Debug)]
#[command(after_help = "\
Prints where every tensor would live on this machine (device memory, the memory-mapped file, or
streamed from disk), the stream pool and prefetch depth, and the predicted speed — without loading
any weight. Try a smaller --ram-budget to see the FFN-streaming plan.")]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn plan(a: PlanArgs) -> Result<()> {
    let path = a.model.resolve(false)?;
    let files = ModelFiles::open(&path)?;
    let cfg = files.config()?;
    let n_ctx = a.model.ctx_size.unwrap_or_else(|| default_n_ctx(&cfg));
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let device = hypura::backend::best_device()?;
    let tiers = a.model.tiers.options()?;
    let (p, profile) = plan_model(&files, &cfg, n_ctx, &tiers, &device, progress)?;
    if a.json {
        let j = plan_json(&path, &files, &p, n_ctx, profile.is_some());
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    print_plan(&files, &p, n_ctx, profile.is_some());
    Ok(())
}

/// The plan as JSON: mode, budgets, rates, costs, the expert cache, decisions, stream groups and
/// every tensor's tier.
pub fn plan_json(
    path: &std::path::Path,
    files: &ModelFiles,
    p: &Plan,
    n_ctx: usize,
    rates_measured: bool,
) -> serde_json::Value {
    let tensors: Vec<_> = files
        .tensors
        .iter()
        .map(|t| serde_json::json!({"name": t.name, "type": t.ty.name(), "bytes": t.n_bytes, "tier": p.placement.tier(&t.name).name()}))
        .collect();
    serde_json::json!({
        "model": path, "mode": p.mode, "n_ctx": n_ctx, "budgets": p.budgets, "rates": p.rates,
        "rates_measured": rates_measured,
        "ram_needed_bytes": p.ram_needed_bytes, "device_needed_bytes": p.device_needed_bytes, "kv_bytes": p.kv_bytes, "overhead_bytes": p.overhead_bytes,
        "pool_slots": p.pool_slots, "pool_slot_bytes": p.pool_slot_bytes, "lookahead": p.placement.lookahead,
        "bytes_per_token": p.bytes_per_token, "predicted_tok_s": p.predicted_tok_s,
        "expert_cache": (p.mode == hypura::plan::Mode::ExpertStreaming).then(|| serde_json::json!({
            "config": p.placement.expert_cache, "slot_bytes": p.expert_slot_bytes,
        })),
        "decisions": p.decisions, "stream_groups": p.placement.groups, "tensors": tensors,
    })
}

/// The plan as tables: bytes per layer and tier, totals, the summary line and the decisions.
pub fn print_plan(files: &ModelFiles, p: &Plan, n_ctx: usize, rates_measured: bool) {
    // Per layer: bytes on each tier, attention and feed-forward apart.
    let mut rows: BTreeMap<(usize, String), BTreeMap<&'static str, u64>> = BTreeMap::new();
    for t in &files.tensors {
        let key = match layer_of(&t.name) {
            Some(l) => (l + 1, format!("blk.{l}")),
            None if t.name.starts_with("token_embd") => (0, "token_embd".into()),
            None => (usize::MAX, t.name.trim_end_matches(".weight").to_string()),
        };
        let part = if t.name.contains(".ffn_") && !t.name.contains("norm") {
            "ffn"
        } else {
            "attn"
        };
        let tier = p.placement.tier(&t.name).name();
        *rows
            .entry(key)
            .or_default()
            .entry(if layer_of(&t.name).is_some() {
                leak(part, tier)
            } else {
                tier
            })
            .or_insert(0) += t.n_bytes;
    }
    println!("| tensors | where | bytes |");
    println!("| --- | --- | ---: |");
    for ((_, name), tiers) in &rows {
        for (tier, bytes) in tiers {
            println!("| {name} | {tier} | {} |", gib(*bytes));
        }
    }
    let by = p.placement.bytes_by_tier(&files.tensors);
    println!();
    for k in [TierKind::Device, TierKind::Ram, TierKind::Nvme] {
        println!("{:>7}: {}", k.name(), gib(by.get(&k).copied().unwrap_or(0)));
    }
    println!("{}", plan_summary(p));
    println!(
        "KV cache {} ({n_ctx} tokens), scratch {}; per token: {} device, {} ram, {} nvme; predicted {:.2} tok/s{}",
        gib(p.kv_bytes),
        gib(p.overhead_bytes),
        gib(p.bytes_per_token.device),
        gib(p.bytes_per_token.ram),
        gib(p.bytes_per_token.nvme),
        p.predicted_tok_s,
        if rates_measured { "" } else { " (rates not measured yet: run `hypura profile -m MODEL`)" }
    );
    for d in &p.decisions {
        println!("- {d}");
    }
}

/// "attn" + "device" → "attn: device" as a static label.
fn leak(part: &'static str, tier: &'static str) -> &'static str {
    match (part, tier) {
        ("attn", "device") => "attn+norms: device",
        ("attn", "ram") => "attn+norms: ram",
        ("attn", _) => "attn+norms: nvme",
        (_, "device") => "ffn: device",
        (_, "ram") => "ffn: ram",
        _ => "ffn: nvme",
    }
}
