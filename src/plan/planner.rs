//! The planner: a pure function from (tensor inventory, hardware rates, budgets, overrides) to a
//! placement. It does no I/O.
//!
//! **Objective.** Minimise the predicted time per generated token,
//! `t = max(bytes_resident / mem_bw, bytes_streamed / disk_bw)`, subject to RAM (and device)
//! budgets. Each tensor is weighted by how often a token touches it: dense weights are read once
//! per token; `token_embd` only for the rows of the tokens used (so it stays memory-mapped and
//! costs almost nothing); experts (MoE) by routing probability (later milestone). Streaming
//! overlaps compute (the prefetcher keeps `lookahead` groups in flight), hence `max`, not `+`.
//!
//! **Rules, in order** (each decision is logged in [`Plan::decisions`]):
//! 1. user overrides (`--place REGEX=tier`), first match wins;
//! 2. if everything fits the RAM budget: full-resident;
//! 3. otherwise, for MoE models, expert-streaming (see [`super::experts`]): every non-expert
//!    tensor resident, experts read on demand into an expert cache sized from the rest;
//! 4. otherwise dense FFN-streaming: embeddings mapped, attention/norms/output resident, FFN
//!    weights streamed; then as many FFN layers as the spare budget allows come back resident,
//!    spread evenly so their compute hides the reads of the streamed ones;
//! 5. if even that does not fit: refuse, naming the smallest budget that would work.

use std::collections::HashMap;

use super::experts::{plan_expert_streaming, ExpertOptions};
use super::placement::{is_expert_tensor, layer_of, Placement, TierKind};
use crate::error::{Error, Result};
use crate::gguf::{ModelConfig, TensorEntry, TensorType};

/// Memory hypura may use.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Budgets {
    pub ram_bytes: u64,
    /// GPU memory; `None` on a CPU build (the device tier is RAM).
    pub device_bytes: Option<u64>,
}

/// Measured speeds the plan is predicted with.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Rates {
    pub mem_read_bps: f64,
    pub disk_read_bps: f64,
    /// GPU memory read bandwidth (GPU plans; on a CPU build the device tier is RAM).
    pub device_read_bps: f64,
    /// Host→device copy bandwidth (GPU plans: RAM- and NVMe-tier weights cross it per use).
    pub upload_bps: f64,
}

/// `--place REGEX=tier`.
#[derive(Clone, Debug)]
pub struct Override {
    pub text: String,
    pub regex: regex::Regex,
    pub tier: TierKind,
}

impl Override {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: String| {
            Error::InvalidRequest(format!(
                "--place '{s}': {why} (expected REGEX=device|ram|nvme)"
            ))
        };
        let (re, tier) = s.rsplit_once('=').ok_or_else(|| bad("no '='".into()))?;
        let tier = TierKind::parse(tier).ok_or_else(|| bad(format!("unknown tier '{tier}'")))?;
        let regex = regex::Regex::new(re).map_err(|e| bad(e.to_string()))?;
        Ok(Override {
            text: s.to_string(),
            regex,
            tier,
        })
    }
}

/// The three modes the policy produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    FullResident,
    FfnStreaming,
    ExpertStreaming,
    /// GPU plans: whole layers on the device while they fit, the rest in RAM or streamed.
    LayerOffload,
}

/// Bytes one generated token reads from each tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct BytesPerToken {
    pub device: u64,
    pub ram: u64,
    pub nvme: u64,
}

/// What to run, and what it should cost.
#[derive(Clone, Debug)]
pub struct Plan {
    pub mode: Mode,
    pub placement: Placement,
    pub decisions: Vec<String>,
    pub budgets: Budgets,
    pub rates: Rates,
    pub kv_bytes: u64,
    pub overhead_bytes: u64,
    /// Stream pool: buffers × bytes each.
    pub pool_slots: usize,
    pub pool_slot_bytes: u64,
    /// RAM the plan needs (resident weights + touched embedding rows + pool + KV + overhead).
    pub ram_needed_bytes: u64,
    /// Expert-streaming: bytes of one expert-cache slot (the cache holds
    /// `placement.expert_cache.slots` of them).
    pub expert_slot_bytes: u64,
    /// Device memory the plan needs (GPU plans: weights, KV cache, scratch); 0 on a CPU plan.
    pub device_needed_bytes: u64,
    pub bytes_per_token: BytesPerToken,
    pub predicted_tok_s: f64,
    /// MoE: whether the predictions used the routing earlier runs observed (else uniform).
    pub routing_observed: bool,
}

/// Everything the planner reads.
pub struct PlanInput<'a> {
    pub tensors: &'a [TensorEntry],
    pub config: &'a ModelConfig,
    pub n_ctx: usize,
    pub budgets: Budgets,
    pub rates: Rates,
    pub overrides: &'a [Override],
    /// Fixed prefetch depth; `None` = derived from the rates.
    pub lookahead: Option<usize>,
    /// Expert-cache choices (MoE).
    pub experts: ExpertOptions,
    /// GPU plans: where RAM-tier matrices are multiplied; `None` = whichever the rates predict
    /// faster.
    pub ram_compute: Option<super::RamCompute>,
    /// MoE: `routing[l][e]` = the share of layer `l`'s expert uses that went to expert `e` (each
    /// layer sums to 1), as earlier runs observed it; `None` (or a layer missing): routing
    /// assumed uniform. Only the predictions use it.
    pub routing: Option<&'a [Vec<f64>]>,
}

fn is_ffn(name: &str) -> bool {
    name.contains(".ffn_") && !name.contains("norm") && !name.contains("ffn_gate_inp")
}

pub(super) fn is_embedding(name: &str) -> bool {
    name.starts_with("token_embd")
}

/// KV cache (F32 K and V for every layer) and compute scratch, for `n_ctx` tokens.
fn fixed_costs(cfg: &ModelConfig, n_ctx: usize) -> (u64, u64) {
    let kv = 2 * cfg.n_layer as u64 * n_ctx as u64 * (cfg.n_head_kv * cfg.head_dim) as u64 * 4;
    // Activations of a 512-token batch, attention scores, logits, allocator slack.
    let batch = 512u64.min(n_ctx as u64);
    let scratch = batch * (cfg.n_embd + cfg.n_ff.max(cfg.n_embd) * 2) as u64 * 4
        + cfg.n_head as u64 * batch * n_ctx as u64 * 4
        + batch * cfg.n_vocab as u64 * 4
        + (64 << 20);
    (kv, scratch)
}

/// Plans where every tensor goes: the GPU policy ([`super::gpu`]) when there is a device budget,
/// else the CPU policy below (the device tier is RAM).
pub fn plan(input: &PlanInput) -> Result<Plan> {
    let cfg = input.config;
    let (kv_bytes, mut overhead_bytes) = fixed_costs(cfg, input.n_ctx);
    if let Some(device_budget) = input.budgets.device_bytes {
        let (tiers, decisions) = overridden(input);
        return super::gpu::plan_gpu(
            input,
            device_budget,
            tiers,
            kv_bytes,
            overhead_bytes,
            decisions,
        );
    }
    // Batch products on temporary copies (tight plans): a quantized weight in 8 MiB chunks plus
    // its repacked chunk; a float matrix whole.
    overhead_bytes += (16 << 20)
        + input
            .tensors
            .iter()
            .filter(|t| !t.ty.is_quantized() && t.dims.len() > 1)
            .map(|t| t.n_bytes)
            .max()
            .unwrap_or(0);
    let (tiers, mut decisions) = overridden(input);
    let free: Vec<&TensorEntry> = input
        .tensors
        .iter()
        .filter(|t| !tiers.contains_key(&t.name))
        .collect();

    // Rule 2: does everything fit?
    let mut all_device = tiers.clone();
    for t in &free {
        all_device.insert(t.name.clone(), TierKind::Device);
    }
    let candidate = evaluate(input, all_device, kv_bytes, overhead_bytes);
    // candle keeps a repacked copy of Q4_K / Q6_K / Q8_0 weights for fast prompt batches.
    let repack: u64 = input
        .tensors
        .iter()
        .filter(|t| candidate.placement.tier(&t.name) == TierKind::Device)
        .filter(|t| matches!(t.ty, TensorType::Q4_K | TensorType::Q6_K | TensorType::Q8_0))
        .map(|t| t.n_bytes)
        .sum();
    if candidate.ram_needed_bytes + repack <= input.budgets.ram_bytes {
        decisions.push(format!(
            "everything fits: {} needed (+{} repacked for prompt batches) of a {} RAM budget → full-resident",
            gib(candidate.ram_needed_bytes),
            gib(repack),
            gib(input.budgets.ram_bytes)
        ));
        let mut p = candidate;
        p.ram_needed_bytes += repack;
        return Ok(finish(p, Mode::FullResident, decisions));
    }
    if candidate.ram_needed_bytes <= input.budgets.ram_bytes {
        decisions.push(format!(
            "the weights fit ({} of a {} RAM budget) but kept repacked copies for prompt batches would not: \
             full-resident, repacking per batch (slower prompts)",
            gib(candidate.ram_needed_bytes),
            gib(input.budgets.ram_bytes)
        ));
        let mut p = finish(candidate, Mode::FullResident, decisions);
        p.placement.transient_repack = true;
        return Ok(p);
    }

    if cfg.is_moe() {
        decisions.push(format!(
            "full-resident needs {} > {} budget → stream experts",
            gib(candidate.ram_needed_bytes),
            gib(input.budgets.ram_bytes)
        ));
        return plan_expert_streaming(input, &tiers, kv_bytes, overhead_bytes, decisions);
    }

    // Rule 4: FFN-streaming.
    let mut streaming = tiers.clone();
    for t in &free {
        let tier = if is_embedding(&t.name) {
            TierKind::Ram
        } else if is_ffn(&t.name) {
            TierKind::Nvme
        } else {
            TierKind::Device
        };
        streaming.insert(t.name.clone(), tier);
    }
    decisions.push(format!(
        "full-resident needs {} > {} budget → stream FFN weights from disk, map the embeddings",
        gib(candidate.ram_needed_bytes),
        gib(input.budgets.ram_bytes)
    ));
    let mut minimal = evaluate(input, streaming.clone(), kv_bytes, overhead_bytes);
    if minimal.ram_needed_bytes > input.budgets.ram_bytes && input.lookahead.is_none() {
        // A shallower prefetch queue needs one buffer less.
        minimal = evaluate_with(input, streaming.clone(), kv_bytes, overhead_bytes, Some(1));
    }
    if minimal.ram_needed_bytes > input.budgets.ram_bytes {
        // Stream the attention weights too: each layer becomes one read.
        let mut deeper = streaming.clone();
        for t in &free {
            if layer_of(&t.name).is_some() && !t.name.contains("norm") && t.ty.is_quantized() {
                deeper.insert(t.name.clone(), TierKind::Nvme);
            }
        }
        let d = evaluate_with(
            input,
            deeper.clone(),
            kv_bytes,
            overhead_bytes,
            input.lookahead.or(Some(1)),
        );
        if d.ram_needed_bytes <= input.budgets.ram_bytes {
            decisions.push(format!(
                "streaming the FFN alone needs {}: stream attention weights too (whole layers)",
                gib(minimal.ram_needed_bytes)
            ));
            streaming = deeper;
            minimal = d;
        } else if d.ram_needed_bytes < minimal.ram_needed_bytes {
            minimal = d; // the smallest budget to report
        }
    }
    if minimal.ram_needed_bytes > input.budgets.ram_bytes {
        return Err(Error::InvalidRequest(format!(
            "a RAM budget of {} is too small for this model even when streaming its feed-forward weights: \
             it needs at least {} ({} resident weights, {} stream pool, {} KV cache for {} tokens, {} scratch). \
             Raise --ram-budget or lower -c",
            gib(input.budgets.ram_bytes),
            gib(minimal.ram_needed_bytes),
            gib(minimal.bytes_per_token.device + minimal.bytes_per_token.ram),
            gib(minimal.pool_slots as u64 * minimal.pool_slot_bytes),
            gib(kv_bytes),
            input.n_ctx,
            gib(overhead_bytes)
        )));
    }
    // Bring FFN layers back, evenly spaced, while they fit.
    let streamed_layers: Vec<usize> = {
        let mut ls: Vec<usize> = free
            .iter()
            .filter(|t| streaming.get(&t.name) == Some(&TierKind::Nvme))
            .filter_map(|t| layer_of(&t.name))
            .collect();
        ls.sort_unstable();
        ls.dedup();
        ls
    };
    let depth = Some(minimal.placement.lookahead);
    let mut best = minimal;
    let n = streamed_layers.len();
    for keep in 1..n {
        // `keep` layers resident, spread over the streamed ones.
        let chosen: Vec<usize> = (0..keep).map(|i| streamed_layers[i * n / keep]).collect();
        let mut t = streaming.clone();
        for f in &free {
            let streamed = streaming.get(&f.name) == Some(&TierKind::Nvme);
            if streamed && layer_of(&f.name).is_some_and(|l| chosen.contains(&l)) {
                t.insert(f.name.clone(), TierKind::Device);
            }
        }
        let c = evaluate_with(input, t, kv_bytes, overhead_bytes, depth);
        if c.ram_needed_bytes > input.budgets.ram_bytes {
            break;
        }
        best = c;
    }
    decisions.push(format!(
        "{} of {} layers stream their FFN; lookahead {} groups; pool {} × {}",
        streamed_layer_count(&best.placement),
        cfg.n_layer,
        best.placement.lookahead,
        best.pool_slots,
        mib(best.pool_slot_bytes)
    ));
    let mut p = finish(best, Mode::FfnStreaming, decisions);
    p.placement.transient_repack = true;
    Ok(p)
}

/// Rule 1: the tiers the user's overrides fix, and a decision line for each override.
fn overridden(input: &PlanInput) -> (HashMap<String, TierKind>, Vec<String>) {
    let mut decisions = Vec::new();
    let mut tiers: HashMap<String, TierKind> = HashMap::new();
    for t in input.tensors {
        if let Some(o) = input.overrides.iter().find(|o| o.regex.is_match(&t.name)) {
            tiers.insert(t.name.clone(), o.tier);
        }
    }
    for o in input.overrides {
        let n = input
            .tensors
            .iter()
            .filter(|t| o.regex.is_match(&t.name))
            .count();
        decisions.push(format!(
            "override '{}': {n} tensors on {}",
            o.text,
            o.tier.name()
        ));
    }
    (tiers, decisions)
}

fn streamed_layer_count(p: &Placement) -> usize {
    let mut ls: Vec<usize> = p.members.keys().filter_map(|n| layer_of(n)).collect();
    ls.sort_unstable();
    ls.dedup();
    ls.len()
}

/// Costs of one candidate placement.
fn evaluate(
    input: &PlanInput,
    tiers: HashMap<String, TierKind>,
    kv_bytes: u64,
    overhead_bytes: u64,
) -> Plan {
    evaluate_with(input, tiers, kv_bytes, overhead_bytes, input.lookahead)
}

pub(super) fn evaluate_with(
    input: &PlanInput,
    tiers: HashMap<String, TierKind>,
    kv_bytes: u64,
    overhead_bytes: u64,
    lookahead: Option<usize>,
) -> Plan {
    let cfg = input.config;
    let mut bpt = BytesPerToken::default();
    let mut resident = 0u64;
    for t in input.tensors {
        let tier = tiers.get(&t.name).copied().unwrap_or(TierKind::Device);
        let touched = if is_embedding(&t.name) {
            // Rows of the tokens used: at most the context's worth stays in memory.
            t.n_bytes
                .min(t.n_bytes / cfg.n_vocab.max(1) as u64 * input.n_ctx as u64)
        } else {
            t.n_bytes
        };
        let per_token = if is_embedding(&t.name) {
            t.n_bytes / cfg.n_vocab.max(1) as u64
        } else if is_expert_tensor(&t.name) {
            // A token uses n_expert_used of the n_expert experts.
            t.n_bytes / cfg.n_expert.max(1) as u64 * cfg.n_expert_used.max(1) as u64
        } else {
            t.n_bytes
        };
        match tier {
            TierKind::Device => {
                resident += t.n_bytes;
                bpt.device += per_token;
            }
            TierKind::Ram => {
                resident += touched;
                bpt.ram += per_token;
            }
            // Streamed dense tensors are counted from their groups below; streamed experts by
            // the expert-streaming plan.
            TierKind::Nvme => {}
        }
    }
    let mut placement = Placement::from_tensors(input.tensors, tiers, 1);
    bpt.nvme = placement.groups.iter().map(|g| g.len as u64).sum();
    let slot = placement
        .groups
        .iter()
        .map(|g| g.len as u64 + 2 * 4096)
        .max()
        .unwrap_or(0);
    // Prefetch depth: when a group's read takes longer than the compute between two streamed
    // groups, the disk is the bottleneck and two reads in flight keep it busy without a gap;
    // otherwise one read ahead hides the disk entirely. Deeper queues only cost pool memory.
    let lookahead = lookahead.unwrap_or_else(|| {
        if placement.groups.is_empty() {
            return 1;
        }
        let read_s = slot as f64 / input.rates.disk_read_bps.max(1.0);
        let per_group = cfg.n_layer.max(1) as f64 / placement.groups.len() as f64;
        let compute_s = per_group * (bpt.device + bpt.ram) as f64
            / cfg.n_layer.max(1) as f64
            / input.rates.mem_read_bps.max(1.0);
        if read_s > compute_s {
            2
        } else {
            1
        }
    });
    placement.lookahead = lookahead.max(1);
    let pool_slots = if placement.groups.is_empty() {
        0
    } else {
        placement.lookahead + placement.max_groups_per_layer
    };
    let ram_needed_bytes = resident + pool_slots as u64 * slot + kv_bytes + overhead_bytes;
    let t_mem = (bpt.device + bpt.ram) as f64 / input.rates.mem_read_bps.max(1.0);
    let t_io = bpt.nvme as f64 / input.rates.disk_read_bps.max(1.0);
    Plan {
        mode: Mode::FullResident,
        placement,
        decisions: Vec::new(),
        budgets: input.budgets,
        rates: input.rates,
        kv_bytes,
        overhead_bytes,
        pool_slots,
        pool_slot_bytes: slot,
        ram_needed_bytes,
        expert_slot_bytes: 0,
        device_needed_bytes: 0,
        bytes_per_token: bpt,
        predicted_tok_s: 1.0 / t_mem.max(t_io).max(1e-9),
        routing_observed: false,
    }
}

pub(super) fn finish(mut p: Plan, mode: Mode, decisions: Vec<String>) -> Plan {
    p.mode = mode;
    p.decisions = decisions;
    p
}

pub fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        mib(b)
    }
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// Parses `3GiB`, `512MiB`, `2G`, `1.5GB`, `1000000` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| Error::InvalidRequest(format!("'{s}' is not a size (e.g. 3GiB, 512MiB)")))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => (1u64 << 20) as f64,
        "mb" => 1e6,
        "g" | "gib" => (1u64 << 30) as f64,
        "gb" => 1e9,
        "t" | "tib" => (1u64 << 40) as f64,
        "tb" => 1e12,
        u => {
            return Err(Error::InvalidRequest(format!(
                "'{s}': unknown unit '{u}' (use B, KiB, MiB, GiB, TiB or KB, MB, GB, TB)"
            )))
        }
    };
    if !(v >= 0.0 && v.is_finite()) {
        return Err(Error::InvalidRequest(format!("'{s}' is not a size")));
    }
    Ok((v * mult) as u64)
}
