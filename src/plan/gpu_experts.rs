//! Expert-streaming on a GPU: MoE models that do not fit the device. Pure, like the rest of the
//! planner.
//!
//! Every non-expert tensor goes to the device (token embeddings stay mapped: a token reads one
//! row). Experts are read as units (gate, up and down of one expert of one layer) through two
//! caches: a **device** cache that takes the rest of the device budget, and behind it the
//! **host** expert cache (the RAM budget), which reads misses from disk with direct I/O and
//! prefetches by co-activation.
//!
//! Cost model: with `d` device slots and `h` host slots of the model's `n` experts, a used expert
//! is on the device with probability `p(d)` and in one of the caches with `p(d + h)`, where
//! `p(s)` is the share of expert uses falling on the `s` most used experts ([`hit_shares`]: from
//! the routing earlier runs observed, or `s / n` at uniform routing, the pessimistic case). A
//! token uses `n_layer · n_expert_used` experts, so it uploads `used · (1 − p(d))` and reads from
//! disk `used · (1 − p(d+h))` experts' bytes, and takes `max(disk bytes / disk bw, upload bytes /
//! upload bw + (device weights + used) / device bw)`.

use std::collections::HashMap;

use super::experts::{expert_bytes, expert_streaming_tiers, hit_shares, routing_basis};
use super::gpu::{evaluate, finish, HOST_OVERHEAD};
use super::placement::{is_expert_tensor, layer_of, TierKind};
use super::planner::{gib, mib, Mode, Plan, PlanInput};
use crate::error::{Error, Result};
use crate::storage::{ExpertCacheConfig, DIRECT_IO_ALIGN};

pub(super) fn plan_gpu_experts(
    input: &PlanInput,
    device_budget: u64,
    fixed: &HashMap<String, TierKind>,
    kv_bytes: u64,
    scratch_bytes: u64,
    mut decisions: Vec<String>,
) -> Result<Plan> {
    let cfg = input.config;
    let tiers = expert_streaming_tiers(input, fixed);
    let base = evaluate(input, tiers, kv_bytes, scratch_bytes);
    let mut layers: Vec<usize> = input
        .tensors
        .iter()
        .filter(|t| is_expert_tensor(&t.name) && base.placement.tier(&t.name) == TierKind::Nvme)
        .filter_map(|t| layer_of(&t.name))
        .collect();
    layers.sort_unstable();
    layers.dedup();
    let n_units = layers.len() * cfg.n_expert;
    let unit_bytes = expert_bytes(input.tensors, cfg.n_expert);
    // Device slots are three device tensors (candle pads each a little); host slots three
    // direct-I/O buffers with alignment slack.
    let dev_slot_bytes = unit_bytes + 3 * 4096;
    let host_slot_bytes = unit_bytes + 6 * DIRECT_IO_ALIGN as u64;
    let min_slots = cfg.n_expert_used.max(1);

    let dev_spare = device_budget.saturating_sub(base.device_needed_bytes);
    let dev_fit = (dev_spare / dev_slot_bytes.max(1)) as usize;
    if dev_fit < min_slots {
        return Err(Error::InvalidRequest(format!(
            "a device budget of {} is too small for this MoE model even when streaming its experts: \
             it needs at least {} ({} non-expert weights, {} KV cache for {} tokens, {} scratch, \
             and {} experts × {}). Raise --device-budget or lower -c",
            gib(device_budget),
            gib(base.device_needed_bytes + min_slots as u64 * dev_slot_bytes),
            gib(base.bytes_per_token.device),
            gib(kv_bytes),
            input.n_ctx,
            gib(scratch_bytes),
            min_slots,
            mib(dev_slot_bytes)
        )));
    }
    let device_slots = dev_fit.min(n_units);
    let host_spare = input
        .budgets
        .ram_bytes
        .saturating_sub(base.ram_needed_bytes);
    let host_fit = (host_spare / host_slot_bytes.max(1)) as usize;
    let host_slots = match input.experts.slots {
        Some(n) => n.max(1),
        None => host_fit.min(n_units),
    };
    if host_slots < min_slots || host_slots > host_fit {
        return Err(Error::InvalidRequest(format!(
            "a RAM budget of {} is too small for this MoE model's host expert cache: it needs at least {} \
             ({} runtime and mapped embedding rows, and {} experts × {}){}. Raise --ram-budget",
            gib(input.budgets.ram_bytes),
            gib(base.ram_needed_bytes.max(HOST_OVERHEAD) + host_slots.max(min_slots) as u64 * host_slot_bytes),
            gib(base.ram_needed_bytes),
            host_slots.max(min_slots),
            mib(host_slot_bytes),
            if input.experts.slots.is_some() { " (--expert-cache)" } else { "" }
        )));
    }

    let mut p = base;
    let policy = input.experts.policy.unwrap_or_default();
    p.placement.expert_cache = ExpertCacheConfig {
        slots: host_slots,
        policy,
        prefetch: !input.experts.no_prefetch,
        io_threads: 2,
        device_slots,
    };
    p.expert_slot_bytes = host_slot_bytes;
    p.ram_needed_bytes += host_slots as u64 * host_slot_bytes;
    p.device_needed_bytes += device_slots as u64 * dev_slot_bytes;
    let shares = hit_shares(
        input.routing,
        &layers,
        cfg.n_expert,
        &[device_slots, device_slots + host_slots],
    );
    let (on_device, cached) = (shares[0], shares[1]);
    let used = (layers.len() * cfg.n_expert_used) as f64 * unit_bytes as f64;
    let upload_bytes = (used * (1.0 - on_device)) as u64;
    p.bytes_per_token.ram += upload_bytes;
    p.bytes_per_token.nvme += (used * (1.0 - cached)) as u64;
    let r = &input.rates;
    // The device reads its resident weights and every used expert; misses cross the bus first.
    let t_gpu = (p.bytes_per_token.device as f64 + used) / r.device_read_bps.max(1.0)
        + upload_bytes as f64 / r.upload_bps.max(1.0);
    let t_io = p.bytes_per_token.nvme as f64 / r.disk_read_bps.max(1.0);
    p.predicted_tok_s = 1.0 / t_gpu.max(t_io).max(1e-9);
    decisions.push(format!(
        "MoE on the GPU: non-expert weights on the device ({}); experts ({} of {} per layer used per token) \
         through a device cache of {device_slots} and a host cache of {host_slots} of {n_units} experts × {}, \
         policy {}, prefetch {}",
        gib(p.bytes_per_token.device),
        cfg.n_expert_used,
        cfg.n_expert,
        mib(unit_bytes),
        policy.name(),
        if input.experts.no_prefetch { "off" } else { "on" },
    ));
    decisions.push(format!(
        "predicted per token {}: {:.0} % of experts on the device, {:.0} % in either cache, \
         {:.1} MiB uploaded, {:.1} MiB read from disk",
        routing_basis(input),
        on_device * 100.0,
        cached * 100.0,
        upload_bytes as f64 / (1u64 << 20) as f64,
        p.bytes_per_token.nvme as f64 / (1u64 << 20) as f64
    ));
    p.routing_observed = input.routing.is_some();
    let mut p = finish(p, Mode::ExpertStreaming, decisions);
    p.placement.transient_repack = true;
    Ok(p)
}
