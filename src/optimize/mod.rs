//! Rewriting a mixture-of-experts GGUF so that what the expert cache reads together lies
//! together (`hypura optimize`).
//!
//! An expert miss reads the expert's slices of `ffn_gate_exps`, `ffn_up_exps` and
//! `ffn_down_exps`: three reads. The cache merges slices that lie back to back into one read
//! ([`crate::storage::experts::merged_reads`]), so experts that are needed together and are
//! neighbours in the file cost three reads between them, not three each. The rewrite:
//!
//! 1. **permutes each layer's experts** — the rows of `ffn_gate_inp` (and its bias) and the
//!    slices of the three `_exps` tensors, consistently — so that experts often used by the same
//!    token are neighbours (from the co-activation statistics hypura learns and saves per model,
//!    see [`crate::storage::experts::CoActivation`]). Top-k routing is permutation-equivariant
//!    and hypura's router softmax is computed in an id-independent order
//!    ([`crate::models::router_softmax`]), so the logits are bit-identical;
//! 2. places each layer's three `_exps` tensors next to each other, gate, up, down (the order
//!    the cache reads them), so a run of experts can continue from one tensor into the next;
//! 3. aligns every tensor to 4096 bytes (`general.alignment`), so expert slices start on block
//!    boundaries and one scatter read can fill several cache slots directly.
//!
//! Everything else — metadata (tokenizer included), tensor names, types and shapes — is kept.
//! The permutation is recorded as `hypura.expert_order` (`[layer * n_expert + new] = original`).
//! llama.cpp loads the result (it requires merged `_exps` tensors: per-expert tensors
//! `blk.N.ffn_gate.E.weight` are not loaded by the llama.cpp hypura is checked against, so one
//! read per expert — gate, up and down of one expert side by side — is not possible in a file
//! llama.cpp still loads).

mod order;
mod rewrite;

use std::collections::BTreeMap;

pub use order::{
    expected_reads, layer_order, miss_chances, permute_stats, ExpertLayout, OrderStrategy,
    CACHED_MISS,
};
pub use rewrite::write;

use crate::error::{Error, Result};
use crate::gguf::{ModelConfig, ModelFiles, TensorEntry, Value};
use crate::plan::layer_of;
use crate::storage::experts::CoActivation;

/// The metadata key recording the expert permutation.
pub const ORDER_KEY: &str = "hypura.expert_order";
/// Tensor alignment of rewritten files.
pub const ALIGNMENT: u64 = 4096;

/// What the rewrite will do.
#[derive(Clone, Debug)]
pub struct Rewrite {
    /// Per layer: `orders[l][new] = old` expert id (the identity for layers left alone).
    pub orders: Vec<Vec<usize>>,
    /// The output's tensors, as indices into the input's tensor table, in file order.
    pub tensor_order: Vec<usize>,
    pub alignment: u64,
    /// The output's metadata.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors whose outermost dimension (the expert) is permuted.
    pub permuted: Vec<usize>,
    /// The statistics the order came from (in the input's expert ids), if any.
    pub stats: Option<CoActivation>,
    /// Expected expert reads per token with no cache (every used expert read), before and after;
    /// `None` without statistics.
    pub expected_reads: Option<(f64, f64)>,
    /// The same with an expert cache of `cache_slots`, taking the most popular experts as
    /// cached (see [`miss_chances`]): an estimate.
    pub expected_reads_cached: Option<(f64, f64)>,
    /// The expert-cache size of the plan the file will run with, if known.
    pub cache_slots: Option<usize>,
    /// Whether the statistics held pair counts (else experts were taken as independent).
    pub pairs_known: bool,
}

impl Rewrite {
    /// `stats` renumbered for the rewritten file.
    pub fn permuted_stats(&self) -> Option<CoActivation> {
        self.stats.as_ref().map(|s| permute_stats(s, &self.orders))
    }
}

/// The gate, up and down expert tensors of layer `l`.
fn expert_names(l: usize) -> [String; 3] {
    ["gate", "up", "down"].map(|p| format!("blk.{l}.ffn_{p}_exps.weight"))
}

/// Whether `name` (a tensor of a MoE layer) is indexed by expert on its outermost dimension and
/// must follow the experts' permutation.
fn per_expert(name: &str) -> bool {
    let rest = name.split_once('.').and_then(|(_, r)| r.split_once('.'));
    let Some((_, rest)) = rest else { return false };
    rest.starts_with("ffn_gate_inp.") || rest.contains("_exps.") || rest.starts_with("exp_probs_b")
}

/// Plans the rewrite of `files` (no I/O). `stats` (in the file's expert ids) orders the experts;
/// without them the experts keep their order and only the layout changes. `cache_slots`: the
/// expert cache the file will run with, if known, for [`Rewrite::expected_reads_cached`].
pub fn plan_rewrite(
    files: &ModelFiles,
    cfg: &ModelConfig,
    strategy: OrderStrategy,
    stats: Option<CoActivation>,
    cache_slots: Option<usize>,
) -> Result<Rewrite> {
    let path = files.path();
    if !cfg.is_moe() {
        return Err(Error::InvalidRequest(format!(
            "{}: not a mixture-of-experts model (no experts to reorder): nothing to optimize",
            path.display()
        )));
    }
    let n = cfg.n_expert;
    let stats = stats.filter(|s| s.n_expert == n && s.tokens_seen() > 0);
    // Experts' order per layer.
    let mut orders: Vec<Vec<usize>> = vec![(0..n).collect(); cfg.n_layer];
    if let Some(s) = &stats {
        for (l, order) in orders.iter_mut().enumerate() {
            if let (Some(pop), Some(pairs)) = (s.popularity.get(l), s.pairs.get(l)) {
                *order = layer_order(strategy, n, pop, pairs);
            }
        }
    }
    // Which tensors follow the permutation; each must have n_expert as its outermost dimension.
    let mut permuted = Vec::new();
    for (i, t) in files.tensors.iter().enumerate() {
        if layer_of(&t.name).is_some() && per_expert(&t.name) {
            if t.dims.last().copied() != Some(n as u64) || t.n_bytes % n as u64 != 0 {
                return Err(Error::Tensor {
                    path: path.to_path_buf(),
                    name: t.name.clone(),
                    reason: format!(
                        "dims {:?}: expected {n} experts on the outermost dimension, cannot reorder",
                        t.dims
                    ),
                });
            }
            permuted.push(i);
        }
    }
    let tensor_order = tensor_order(files, cfg);
    // Metadata: the input's, without split keys, with the alignment and the composed order.
    let mut metadata = files.metadata.entries.clone();
    metadata.retain(|k, _| !k.starts_with("split."));
    let alignment = files
        .metadata
        .usize_opt("general.alignment")?
        .map_or(ALIGNMENT, |a| (a as u64).max(ALIGNMENT));
    metadata.insert("general.alignment".into(), Value::U32(alignment as u32));
    let earlier = files.metadata.i64_array(ORDER_KEY).ok();
    let composed: Vec<Value> = orders
        .iter()
        .enumerate()
        .flat_map(|(l, o)| {
            let earlier = &earlier;
            o.iter().map(move |&old| {
                let orig = earlier
                    .as_ref()
                    .and_then(|e| e.get(l * n + old).copied())
                    .unwrap_or(old as i64);
                Value::U32(orig as u32)
            })
        })
        .collect();
    metadata.insert(ORDER_KEY.into(), Value::Array(composed));
    let pairs_known = stats
        .as_ref()
        .is_some_and(|s| s.pairs.iter().flatten().any(|&c| c > 0));
    let mut rw = Rewrite {
        orders,
        tensor_order,
        alignment,
        metadata,
        permuted,
        stats,
        expected_reads: None,
        expected_reads_cached: None,
        cache_slots,
        pairs_known,
    };
    rw.expected_reads = expected(files, cfg, &rw, None);
    rw.expected_reads_cached = cache_slots.and_then(|c| expected(files, cfg, &rw, Some(c)));
    Ok(rw)
}

/// The input's tensor order, except that each layer's expert tensors come together, gate, up,
/// down, where the first of them was.
fn tensor_order(files: &ModelFiles, cfg: &ModelConfig) -> Vec<usize> {
    let index = |name: &str| files.tensors.iter().position(|t| t.name == name);
    let mut grouped: Vec<Option<[usize; 3]>> = (0..cfg.n_layer)
        .map(|l| {
            let [g, u, d] = expert_names(l).map(|n| index(&n));
            Some([g?, u?, d?])
        })
        .collect();
    let mut out = Vec::with_capacity(files.tensors.len());
    for (i, t) in files.tensors.iter().enumerate() {
        let group = layer_of(&t.name)
            .and_then(|l| grouped.get(l).copied().flatten().map(|g| (l, g)))
            .filter(|(_, g)| g.contains(&i));
        match group {
            Some((l, g)) => {
                // The first of the three emits all three; the others were emitted already.
                out.extend(g);
                grouped[l] = None;
            }
            None if out.contains(&i) => {}
            None => out.push(i),
        }
    }
    out
}

/// Offsets relative to the data section's start (a multiple of the alignment) of `order`'s
/// tensors when written with `alignment`.
fn data_offsets(tensors: &[TensorEntry], order: &[usize], alignment: u64) -> Vec<u64> {
    let mut offsets = vec![0u64; tensors.len()];
    let mut off = 0u64;
    for &i in order {
        off = off.div_ceil(alignment) * alignment;
        offsets[i] = off;
        off += tensors[i].n_bytes;
    }
    offsets
}

/// One layer's expert layout given each tensor's (file, offset).
fn layout(
    files: &ModelFiles,
    cfg: &ModelConfig,
    l: usize,
    at: impl Fn(usize) -> (usize, u64),
) -> Option<ExpertLayout> {
    let idx = expert_names(l).map(|n| files.tensors.iter().position(|t| t.name == n));
    let [Some(g), Some(u), Some(d)] = idx else {
        return None;
    };
    let stride = |i: usize| files.tensors[i].n_bytes / cfg.n_expert as u64;
    Some(ExpertLayout {
        file: [at(g).0, at(u).0, at(d).0],
        offset: [at(g).1, at(u).1, at(d).1],
        stride: [stride(g), stride(u), stride(d)],
    })
}

/// Expected reads per token with a cache of `slots` (`None`: none), summed over the layers,
/// before and after.
fn expected(
    files: &ModelFiles,
    cfg: &ModelConfig,
    rw: &Rewrite,
    slots: Option<usize>,
) -> Option<(f64, f64)> {
    let stats = rw.stats.as_ref()?;
    let after_stats = permute_stats(stats, &rw.orders);
    let (miss, after_miss) = (
        miss_chances(stats, slots),
        miss_chances(&after_stats, slots),
    );
    let new_offsets = data_offsets(&files.tensors, &rw.tensor_order, rw.alignment);
    let (mut before, mut after) = (0.0, 0.0);
    for l in 0..cfg.n_layer {
        let (Some(pop), Some(pairs)) = (stats.popularity.get(l), stats.pairs.get(l)) else {
            continue;
        };
        let old = layout(files, cfg, l, |i| {
            (files.tensors[i].file, files.tensors[i].offset)
        })?;
        let new = layout(files, cfg, l, |i| (0, new_offsets[i]))?;
        let (k, n) = (cfg.n_expert_used, cfg.n_expert);
        before += expected_reads(&old, n, k, pop, pairs, &miss[l]);
        let (p, q) = (&after_stats.popularity[l], &after_stats.pairs[l]);
        after += expected_reads(&new, n, k, p, q, &after_miss[l]);
    }
    Some((before, after))
}
