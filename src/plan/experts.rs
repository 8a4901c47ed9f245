//! Expert-streaming (MoE models that do not fit): every non-expert tensor resident, each expert
//! read on demand into an expert cache that takes the rest of the budget.
//!
//! Cost model: a token uses `n_expert_used` of `n_expert` experts in each layer. With a cache of
//! `slots` of the model's `n_units` experts and routing assumed uniform (the pessimistic case;
//! real and skewed routing hit more), a used expert is cached with probability
//! `slots / n_units`, so the disk reads `n_layer · n_expert_used · expert_bytes · (1 − that)`
//! per token.

use std::collections::HashMap;

use super::placement::{is_expert_tensor, layer_of, TierKind};
use super::planner::{evaluate_with, finish, gib, mib, Mode, Plan, PlanInput};
use crate::error::{Error, Result};
use crate::gguf::TensorEntry;
use crate::storage::{EvictionPolicy, ExpertCacheConfig, DIRECT_IO_ALIGN};

/// User choices for the expert cache (`None` = the planner's).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExpertOptions {
    /// Experts the cache holds, instead of what the budget allows.
    pub slots: Option<usize>,
    pub policy: Option<EvictionPolicy>,
    /// Turn speculative prefetch off.
    pub no_prefetch: bool,
}

/// Bytes of one expert (gate + up + down of one layer), the largest over layers.
pub fn expert_bytes(tensors: &[TensorEntry], n_expert: usize) -> u64 {
    let mut per_layer: HashMap<usize, u64> = HashMap::new();
    for t in tensors.iter().filter(|t| is_expert_tensor(&t.name)) {
        if let Some(l) = layer_of(&t.name) {
            *per_layer.entry(l).or_insert(0) += t.n_bytes / n_expert.max(1) as u64;
        }
    }
    per_layer.values().copied().max().unwrap_or(0)
}

/// Expert-streaming's tiers on top of the user's `fixed` ones: experts on NVMe (served by the
/// expert caches), token embeddings mapped (a token reads one row), everything else on the device.
pub(super) fn expert_streaming_tiers(
    input: &PlanInput,
    fixed: &HashMap<String, TierKind>,
) -> HashMap<String, TierKind> {
    let mut tiers = fixed.clone();
    for t in input
        .tensors
        .iter()
        .filter(|t| !fixed.contains_key(&t.name))
    {
        let tier = if is_expert_tensor(&t.name) {
            TierKind::Nvme
        } else if t.name.starts_with("token_embd") {
            TierKind::Ram
        } else {
            TierKind::Device
        };
        tiers.insert(t.name.clone(), tier);
    }
    tiers
}

/// Plans expert-streaming on top of the user's `fixed` tiers (overrides).
pub(super) fn plan_expert_streaming(
    input: &PlanInput,
    fixed: &HashMap<String, TierKind>,
    kv_bytes: u64,
    overhead_bytes: u64,
    mut decisions: Vec<String>,
) -> Result<Plan> {
    let cfg = input.config;
    let tiers = expert_streaming_tiers(input, fixed);
    let base = evaluate_with(input, tiers, kv_bytes, overhead_bytes, Some(1));
    let streamed_layers = {
        let mut ls: Vec<usize> = input
            .tensors
            .iter()
            .filter(|t| is_expert_tensor(&t.name))
            .filter(|t| base.placement.tier(&t.name) == TierKind::Nvme)
            .filter_map(|t| layer_of(&t.name))
            .collect();
        ls.sort_unstable();
        ls.dedup();
        ls.len()
    };
    let n_units = streamed_layers * cfg.n_expert;
    let unit_bytes = expert_bytes(input.tensors, cfg.n_expert);
    let slot_bytes = unit_bytes + 6 * DIRECT_IO_ALIGN as u64;
    let min_slots = cfg.n_expert_used.max(1);
    let spare = input
        .budgets
        .ram_bytes
        .saturating_sub(base.ram_needed_bytes);
    let fit = (spare / slot_bytes.max(1)) as usize;
    let slots = match input.experts.slots {
        Some(n) => n.max(1),
        None => fit.min(n_units),
    };
    let min_budget = base.ram_needed_bytes + min_slots as u64 * slot_bytes;
    if input.experts.slots.is_none() && slots < min_slots || slots > fit {
        return Err(Error::InvalidRequest(format!(
            "a RAM budget of {} is too small for this MoE model even when streaming its experts: \
             it needs at least {} ({} resident non-expert weights, {} KV cache for {} tokens, \
             {} scratch, and a cache of {} experts × {}){}. Raise --ram-budget or lower -c",
            gib(input.budgets.ram_bytes),
            gib(min_budget.max(base.ram_needed_bytes + slots as u64 * slot_bytes)),
            gib(base.bytes_per_token.device + base.bytes_per_token.ram),
            gib(kv_bytes),
            input.n_ctx,
            gib(overhead_bytes),
            slots.max(min_slots),
            mib(slot_bytes),
            if input.experts.slots.is_some() {
                " (--expert-cache)"
            } else {
                ""
            }
        )));
    }
    let mut p = base;
    let policy = input.experts.policy.unwrap_or_default();
    p.placement.expert_cache = ExpertCacheConfig {
        slots,
        policy,
        prefetch: !input.experts.no_prefetch,
        io_threads: 2,
        device_slots: 0,
    };
    p.ram_needed_bytes += slots as u64 * slot_bytes;
    p.expert_slot_bytes = slot_bytes;
    let hit = (slots as f64 / n_units.max(1) as f64).min(1.0);
    let used_bytes = (streamed_layers * cfg.n_expert_used) as f64 * unit_bytes as f64;
    p.bytes_per_token.nvme += (used_bytes * (1.0 - hit)) as u64;
    let t_mem = (p.bytes_per_token.device + p.bytes_per_token.ram) as f64
        / input.rates.mem_read_bps.max(1.0);
    let t_io = p.bytes_per_token.nvme as f64 / input.rates.disk_read_bps.max(1.0);
    p.predicted_tok_s = 1.0 / t_mem.max(t_io).max(1e-9);
    decisions.push(format!(
        "MoE: non-expert weights resident ({}), experts ({} of {} per layer used per token) \
         streamed through an expert cache of {slots} of {n_units} experts × {} ({}), policy {}, \
         prefetch {}",
        gib(p.bytes_per_token.device),
        cfg.n_expert_used,
        cfg.n_expert,
        mib(slot_bytes),
        gib(slots as u64 * slot_bytes),
        policy.name(),
        if input.experts.no_prefetch {
            "off"
        } else {
            "on"
        },
    ));
    decisions.push(format!(
        "predicted {:.1} MiB read per token at a uniform-routing hit rate of {:.0} % (skewed routing hits more)",
        p.bytes_per_token.nvme as f64 / (1u64 << 20) as f64,
        hit * 100.0
    ));
    let mut p = finish(p, Mode::ExpertStreaming, decisions);
    p.placement.transient_repack = true;
    Ok(p)
}
