//! Expert-streaming (MoE models that do not fit): every non-expert tensor resident, each expert
//! read on demand into an expert cache that takes the rest of the budget.
//!
//! Cost model: a token uses `n_expert_used` of `n_expert` experts in each layer. With a cache of
//! `slots` of the model's `n_units` experts, a used expert is cached with probability
//! [`hit_shares`]: the share of expert uses that fall on the `slots` most used experts, from the
//! routing earlier runs observed, or `slots / n_units` at uniform routing (the pessimistic case).
//! So the disk reads `n_layer · n_expert_used · expert_bytes · (1 − that)` per token, and memory
//! serves the resident weights plus every used expert.

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

/// The expected share of a token's expert uses that fall on the `s` most used experts of the
/// streamed `layers`, for each `s` in `slots` (caches that keep the most used experts, as LFU
/// does in its steady state). `routing`: each layer's shares of its expert uses (see
/// [`PlanInput::routing`]); without it, or for a layer it lacks, uniform — then the share is
/// `s / (layers · n_expert)`.
pub(super) fn hit_shares(
    routing: Option<&[Vec<f64>]>,
    layers: &[usize],
    n_expert: usize,
    slots: &[usize],
) -> Vec<f64> {
    let uniform = 1.0 / n_expert.max(1) as f64;
    let mut w: Vec<f64> = Vec::with_capacity(layers.len() * n_expert);
    for &l in layers {
        match routing
            .and_then(|r| r.get(l))
            .filter(|r| r.len() == n_expert)
        {
            Some(shares) => {
                let sum: f64 = shares.iter().filter(|v| v.is_finite() && **v > 0.0).sum();
                w.extend(shares.iter().map(|&v| {
                    if sum > 0.0 && v.is_finite() && v > 0.0 {
                        v / sum
                    } else if sum > 0.0 {
                        0.0
                    } else {
                        uniform
                    }
                }));
            }
            None => w.extend(std::iter::repeat_n(uniform, n_expert)),
        }
    }
    w.sort_by(|a, b| b.total_cmp(a));
    let total: f64 = w.iter().sum();
    slots
        .iter()
        .map(|&s| {
            let top: f64 = w.iter().take(s).sum();
            if total > 0.0 {
                (top / total).min(1.0)
            } else {
                0.0
            }
        })
        .collect()
}

/// How a prediction's routing was assumed, for the plan's decisions.
pub(super) fn routing_basis(input: &PlanInput) -> &'static str {
    if input.routing.is_some() {
        "at the routing earlier runs observed"
    } else {
        "at uniform routing (skewed routing hits more)"
    }
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
    let layers = {
        let mut ls: Vec<usize> = input
            .tensors
            .iter()
            .filter(|t| is_expert_tensor(&t.name))
            .filter(|t| base.placement.tier(&t.name) == TierKind::Nvme)
            .filter_map(|t| layer_of(&t.name))
            .collect();
        ls.sort_unstable();
        ls.dedup();
        ls
    };
    let streamed_layers = layers.len();
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
    let hit = hit_shares(input.routing, &layers, cfg.n_expert, &[slots])[0];
    let used_bytes = (streamed_layers * cfg.n_expert_used) as f64 * unit_bytes as f64;
    p.bytes_per_token.nvme += (used_bytes * (1.0 - hit)) as u64;
    // The resident weights and every used expert (from the cache) are read from memory.
    let t_mem = ((p.bytes_per_token.device + p.bytes_per_token.ram) as f64 + used_bytes)
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
        "predicted {:.1} MiB read per token at a hit rate of {:.0} %, {}",
        p.bytes_per_token.nvme as f64 / (1u64 << 20) as f64,
        hit * 100.0,
        routing_basis(input)
    ));
    p.routing_observed = input.routing.is_some();
    let mut p = finish(p, Mode::ExpertStreaming, decisions);
    p.placement.transient_repack = true;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::hit_shares;

    #[test]
    fn hit_shares_follow_the_routing_or_assume_it_uniform() {
        let layers = [0, 1];
        // Uniform: s of 8 units hold s / 8 of the uses.
        assert_eq!(
            hit_shares(None, &layers, 4, &[0, 2, 8, 20]),
            [0.0, 0.25, 1.0, 1.0]
        );
        // Layer shares 1/2, 1/4, 1/8, 1/8: the two most used units (one per layer) hold half the
        // uses, four hold three quarters.
        let r = vec![vec![0.5, 0.25, 0.125, 0.125]; 2];
        assert_eq!(hit_shares(Some(&r), &layers, 4, &[2, 4]), [0.5, 0.75]);
        // Counts instead of shares, and a layer the statistics lack (uniform there).
        let r = vec![vec![4.0, 2.0, 1.0, 1.0]];
        let s = hit_shares(Some(&r), &layers, 4, &[1, 5]);
        assert!(
            (s[0] - 0.25).abs() < 1e-12 && (s[1] - 0.75).abs() < 1e-12,
            "{s:?}"
        );
    }
}
