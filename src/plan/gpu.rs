//! The GPU policy: used when the plan has a device budget (a GPU build with a GPU present, or
//! `--device-budget`). Pure, like the rest of the planner.
//!
//! The device tier is GPU memory, and it holds the KV cache and the activations too. RAM-tier
//! weights stay in the mapped file and are copied host→device for each use; NVMe-tier weights are
//! streamed into the pool, then copied the same way. So a token costs
//! `t = device_bytes / device_bw + (ram_bytes + nvme_bytes) / upload_bw`, or the disk time if
//! that is longer (the stream reads ahead on its own thread).
//!
//! **Rules, in order:**
//! 1. user overrides, first match wins;
//! 2. if every weight, the KV cache and the scratch fit the device budget: full-resident;
//! 3. otherwise, for MoE models, expert-streaming on the GPU ([`super::gpu_experts`]): every
//!    non-expert tensor on the device, experts through a device expert cache (the rest of the
//!    device budget) backed by a host expert cache (the RAM budget) and the disk;
//! 4. otherwise layer offload: `output`/norms stay on the device, `token_embd` stays mapped (a
//!    token reads one row), then whole layers go to the device in order while they fit; the rest
//!    stay in RAM (the mapped file) while the RAM budget allows, and stream from disk after that;
//!    RAM-tier layers are multiplied on the host where host memory outpaces host→device copies
//!    (`--ram-compute` overrides), else uploaded per use;
//! 5. if even the fixed part (KV cache, scratch, output) does not fit the device: refuse, naming
//!    the smallest device budget that would work.

use std::collections::HashMap;

use super::placement::{is_expert_tensor, layer_of, Placement, RamCompute, TierKind};
use super::planner::{gib, is_embedding, BytesPerToken, Mode, Plan, PlanInput};
use crate::error::{Error, Result};
use crate::gguf::TensorEntry;

/// Host memory a GPU run needs beyond its RAM-tier weights and stream pool (runtime, allocator).
pub(super) const HOST_OVERHEAD: u64 = 256 << 20;

/// Most layers uploads run ahead of the compute: each costs a layer of device memory, and with
/// two in flight the copy engine is never idle (a layer's upload starts as the previous ends).
const MAX_UPLOAD_LOOKAHEAD: usize = 2;

/// Layers uploaded ahead of the compute (`--lookahead` overrides): enough that the compute of the
/// layers in between covers one layer's copy, `ceil(t_copy / t_compute)` with a layer computed at
/// device bandwidth and copied at the slower of the bus and (for streamed layers) the disk; at
/// least 1, at most [`MAX_UPLOAD_LOOKAHEAD`]. Off-device layers are always slower to bring than
/// to compute, so this is the maximum in practice.
fn upload_lookahead(input: &PlanInput) -> usize {
    input.lookahead.unwrap_or_else(|| {
        let r = &input.rates;
        let copy_bps = r.upload_bps.min(r.disk_read_bps.max(1.0)).max(1.0);
        let ratio = r.device_read_bps.max(1.0) / copy_bps;
        (ratio.ceil() as usize).clamp(1, MAX_UPLOAD_LOOKAHEAD)
    })
}

/// Device slots the uploader keeps for off-device layers: the one in use and those ahead.
fn upload_slots(input: &PlanInput) -> u64 {
    upload_lookahead(input) as u64 + 1
}

/// Stream-pool buffers on a GPU: the reads ahead, plus the slabs of the two layers whose uploads
/// may still be reading from the pool (see `storage::upload`).
pub fn gpu_pool_slots(p: &Placement) -> usize {
    p.lookahead + 2 * p.max_groups_per_layer
}

pub(super) fn plan_gpu(
    input: &PlanInput,
    device_budget: u64,
    fixed: HashMap<String, TierKind>,
    kv_bytes: u64,
    scratch_bytes: u64,
    mut decisions: Vec<String>,
) -> Result<Plan> {
    let free: Vec<&TensorEntry> = input
        .tensors
        .iter()
        .filter(|t| !fixed.contains_key(&t.name))
        .collect();
    let dev_fixed = kv_bytes + scratch_bytes;

    // Rule 2: everything on the device.
    let mut all = fixed.clone();
    for t in &free {
        all.insert(t.name.clone(), TierKind::Device);
    }
    let p = evaluate(input, all, kv_bytes, scratch_bytes);
    if p.device_needed_bytes <= device_budget && p.ram_needed_bytes <= input.budgets.ram_bytes {
        decisions.push(format!(
            "everything fits the GPU: {} needed ({} KV cache, {} scratch) of a {} device budget → full-resident",
            gib(p.device_needed_bytes),
            gib(kv_bytes),
            gib(scratch_bytes),
            gib(device_budget)
        ));
        return Ok(finish(p, Mode::FullResident, decisions));
    }

    if input.config.is_moe() {
        decisions.push(format!(
            "full-resident needs {} > {} device budget → stream experts through device and host caches",
            gib(p.device_needed_bytes),
            gib(device_budget)
        ));
        return super::gpu_experts::plan_gpu_experts(
            input,
            device_budget,
            &fixed,
            kv_bytes,
            scratch_bytes,
            decisions,
        );
    }

    // Rule 4: fixed part on the device (norms and biases of every layer too: they are tiny and
    // read at load time), then whole layers in order.
    let movable = |t: &TensorEntry| layer_of(&t.name).is_some() && t.dims.len() > 1;
    let mut tiers = fixed.clone();
    let mut dev_used = dev_fixed;
    for t in &free {
        if is_embedding(&t.name) {
            tiers.insert(t.name.clone(), TierKind::Ram);
        } else if !movable(t) {
            tiers.insert(t.name.clone(), TierKind::Device);
            dev_used += t.n_bytes;
        }
    }
    dev_used += fixed_device_bytes(input.tensors, &fixed);
    // Room for the upload slots of layers left off the device.
    let mut layer_bytes: HashMap<usize, u64> = HashMap::new();
    for t in free.iter().filter(|t| movable(t)) {
        *layer_bytes
            .entry(layer_of(&t.name).unwrap_or(0))
            .or_insert(0) += t.n_bytes;
    }
    dev_used += upload_slots(input) * layer_bytes.values().copied().max().unwrap_or(0);
    if dev_used > device_budget {
        return Err(Error::InvalidRequest(format!(
            "a device budget of {} is too small for this model: the KV cache ({} for {} tokens), scratch ({}) and \
             output weights need at least {}. Raise --device-budget or lower -c",
            gib(device_budget),
            gib(kv_bytes),
            input.n_ctx,
            gib(scratch_bytes),
            gib(dev_used)
        )));
    }
    let mut layers: Vec<(usize, u64)> = Vec::new(); // (layer, bytes of its movable tensors)
    for t in free.iter().filter(|t| movable(t)) {
        let l = layer_of(&t.name).unwrap_or(0);
        match layers.iter_mut().find(|(x, _)| *x == l) {
            Some((_, b)) => *b += t.n_bytes,
            None => layers.push((l, t.n_bytes)),
        }
    }
    layers.sort_unstable();
    let ram_base = HOST_OVERHEAD
        + free
            .iter()
            .filter(|t| is_embedding(&t.name))
            .map(|t| embedding_touched(input, t))
            .sum::<u64>();
    // Layers in order: device while it fits, then RAM, then disk; `pool` bytes of RAM kept for
    // the stream pool.
    let assign = |pool: u64| {
        let (mut dev, mut ram) = (dev_used, ram_base + pool);
        let mut out = Vec::with_capacity(layers.len());
        for &(l, bytes) in &layers {
            let tier = if dev + bytes <= device_budget {
                dev += bytes;
                TierKind::Device
            } else if ram + bytes <= input.budgets.ram_bytes {
                ram += bytes;
                TierKind::Ram
            } else {
                TierKind::Nvme
            };
            out.push((l, tier));
        }
        out
    };
    let place = |chosen: &[(usize, TierKind)]| {
        let mut tiers = tiers.clone();
        for &(l, tier) in chosen {
            for t in free
                .iter()
                .filter(|t| movable(t) && layer_of(&t.name) == Some(l))
            {
                tiers.insert(t.name.clone(), tier);
            }
        }
        evaluate(input, tiers, kv_bytes, scratch_bytes)
    };
    // The pool's size is known once some layer streams: assign again with it reserved (twice at
    // most: the largest group does not change).
    // Start by reserving the pool a streamed layer would need (if none streams, the RAM
    // layers' bytes stay within the budget anyway).
    let largest = layers.iter().map(|l| l.1).max().unwrap_or(0);
    let pool_guess = (upload_lookahead(input) as u64 + 2) * (largest + 2 * 4096);
    let mut chosen = assign(pool_guess);
    if !chosen.iter().any(|c| c.1 == TierKind::Nvme) {
        chosen = assign(0);
    }
    let mut p = place(&chosen);
    for _ in 0..2 {
        if p.ram_needed_bytes <= input.budgets.ram_bytes {
            break;
        }
        chosen = assign(p.pool_slots as u64 * p.pool_slot_bytes);
        p = place(&chosen);
    }
    let n_on = |k: TierKind| chosen.iter().filter(|c| c.1 == k).count();
    let (n_dev, n_ram, n_nvme) = (
        n_on(TierKind::Device),
        n_on(TierKind::Ram),
        n_on(TierKind::Nvme),
    );
    if p.ram_needed_bytes > input.budgets.ram_bytes {
        return Err(Error::InvalidRequest(format!(
            "a RAM budget of {} is too small next to a {} device budget: the plan needs {} of RAM \
             (mapped weights, stream pool {} × {}, runtime). Raise --ram-budget or --device-budget",
            gib(input.budgets.ram_bytes),
            gib(device_budget),
            gib(p.ram_needed_bytes),
            p.pool_slots,
            gib(p.pool_slot_bytes)
        )));
    }
    decisions.push(format!(
        "full-resident needs {} > {} device budget → layer offload: {n_dev} layers on the GPU, {n_ram} in RAM, \
         {n_nvme} streamed from disk",
        gib(dev_fixed + fixed_device_bytes(input.tensors, &fixed) + free.iter().map(|t| t.n_bytes).sum::<u64>()),
        gib(device_budget)
    ));
    if n_ram > 0 {
        // Where RAM-tier layers are multiplied: on the GPU after an upload, or on the host where
        // they lie, whichever moves their bytes faster (a decode step reads each once).
        let (up, host) = (input.rates.upload_bps, input.rates.mem_read_bps);
        let choice = input.ram_compute.unwrap_or(if host > up {
            RamCompute::Host
        } else {
            RamCompute::Upload
        });
        let why = match input.ram_compute {
            Some(_) => "--ram-compute".to_string(),
            None if host > up => format!(
                "host memory {:.1} GB/s > host→device {:.1} GB/s",
                host / 1e9,
                up / 1e9
            ),
            None => format!(
                "host→device {:.1} GB/s ≥ host memory {:.1} GB/s",
                up / 1e9,
                host / 1e9
            ),
        };
        decisions.push(match choice {
            RamCompute::Upload => format!("RAM-tier layers are uploaded to the GPU per use ({why})"),
            RamCompute::Host => format!(
                "RAM-tier layers are multiplied on the host where they lie, prompt batches uploaded ({why})"
            ),
        });
        p = with_ram_compute(input, p, choice);
    }
    Ok(finish(p, Mode::LayerOffload, decisions))
}

/// Bytes of the override-placed tensors that the overrides put on the device.
fn fixed_device_bytes(tensors: &[TensorEntry], fixed: &HashMap<String, TierKind>) -> u64 {
    tensors
        .iter()
        .filter(|t| fixed.get(&t.name) == Some(&TierKind::Device))
        .map(|t| t.n_bytes)
        .sum()
}

/// Embedding rows a context's worth of tokens can touch.
pub(super) fn embedding_touched(input: &PlanInput, t: &TensorEntry) -> u64 {
    let per_row = t.n_bytes / input.config.n_vocab.max(1) as u64;
    t.n_bytes.min(per_row * input.n_ctx as u64)
}

/// Costs of one placement on a GPU.
pub(super) fn evaluate(
    input: &PlanInput,
    tiers: HashMap<String, TierKind>,
    kv_bytes: u64,
    scratch_bytes: u64,
) -> Plan {
    let mut bpt = BytesPerToken::default();
    let (mut dev, mut ram) = (kv_bytes + scratch_bytes, HOST_OVERHEAD);
    for t in input.tensors {
        let per_token = if is_embedding(&t.name) {
            t.n_bytes / input.config.n_vocab.max(1) as u64
        } else {
            t.n_bytes
        };
        match tiers.get(&t.name).copied().unwrap_or(TierKind::Device) {
            TierKind::Device => {
                dev += t.n_bytes;
                bpt.device += per_token;
            }
            TierKind::Ram => {
                ram += if is_embedding(&t.name) {
                    embedding_touched(input, t)
                } else {
                    t.n_bytes
                };
                bpt.ram += per_token;
            }
            TierKind::Nvme => {}
        }
    }
    // Two reads ahead: the upload of a group and the read of the next overlap.
    let mut placement = Placement::from_tensors(input.tensors, tiers, upload_lookahead(input));
    bpt.nvme = placement.groups.iter().map(|g| g.len as u64).sum();
    let slot = placement
        .groups
        .iter()
        .map(|g| g.len as u64 + 2 * 4096)
        .max()
        .unwrap_or(0);
    let pool_slots = if placement.groups.is_empty() {
        0
    } else {
        gpu_pool_slots(&placement)
    };
    // Off-device matrices are uploaded a layer at a time into reused device slots (embeddings
    // upload only the rows used).
    let mut off_device: HashMap<Option<usize>, u64> = HashMap::new();
    for t in input.tensors.iter().filter(|t| {
        placement.tier(&t.name) != TierKind::Device
            && !is_embedding(&t.name)
            && !(is_expert_tensor(&t.name) && placement.streams_experts())
    }) {
        *off_device.entry(layer_of(&t.name)).or_insert(0) += t.n_bytes;
    }
    if let Some(&largest) = off_device.values().max() {
        dev += upload_slots(input) * largest;
    }
    placement.lookahead = placement.lookahead.max(1);
    let predicted_tok_s = predicted_tok_s(&bpt, &input.rates, placement.ram_compute);
    Plan {
        mode: Mode::FullResident,
        placement,
        decisions: Vec::new(),
        budgets: input.budgets,
        rates: input.rates,
        kv_bytes,
        overhead_bytes: scratch_bytes,
        pool_slots,
        pool_slot_bytes: slot,
        ram_needed_bytes: ram + pool_slots as u64 * slot,
        device_needed_bytes: dev,
        expert_slot_bytes: 0,
        bytes_per_token: bpt,
        predicted_tok_s,
        routing_observed: false,
    }
}

/// Tokens per second a GPU plan predicts: device weights at device bandwidth, off-device ones at
/// the bus's (RAM-tier ones at host memory's when multiplied there), or the disk time if that is
/// longer (the stream reads ahead on its own thread).
fn predicted_tok_s(bpt: &BytesPerToken, r: &super::Rates, ram_compute: RamCompute) -> f64 {
    let ram_bps = match ram_compute {
        RamCompute::Upload => r.upload_bps,
        RamCompute::Host => r.mem_read_bps,
    };
    let t_gpu = bpt.device as f64 / r.device_read_bps.max(1.0)
        + bpt.ram as f64 / ram_bps.max(1.0)
        + bpt.nvme as f64 / r.upload_bps.max(1.0);
    let t_io = bpt.nvme as f64 / r.disk_read_bps.max(1.0);
    1.0 / t_gpu.max(t_io).max(1e-9)
}

/// `p` with RAM-tier matrices multiplied per `choice` (and predicted accordingly).
fn with_ram_compute(input: &PlanInput, mut p: Plan, choice: RamCompute) -> Plan {
    p.placement.ram_compute = choice;
    p.predicted_tok_s = predicted_tok_s(&p.bytes_per_token, &input.rates, choice);
    p
}

pub(super) fn finish(mut p: Plan, mode: Mode, decisions: Vec<String>) -> Plan {
    p.mode = mode;
    p.decisions = decisions;
    p
}
