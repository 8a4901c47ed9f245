//! The part of a plan that storage carries out: a tier per tensor, and how streamed tensors are
//! grouped into reads. Pure data, built from the GGUF index alone.

use std::collections::HashMap;
use std::ops::Range;

use crate::gguf::{ModelFiles, TensorEntry};
use crate::storage::{ExpertCacheConfig, StreamGroup};

/// Where a GPU build multiplies the matrices of RAM-tier layers: on the GPU after a host→device
/// copy per use, or on the host over the mapped file (activations cross the bus instead).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum RamCompute {
    #[default]
    Upload,
    Host,
}

impl RamCompute {
    /// `gpu` (or `upload`) or `host`, as `--ram-compute` takes them.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gpu" | "upload" => Some(RamCompute::Upload),
            "host" | "cpu" => Some(RamCompute::Host),
            _ => None,
        }
    }
}

/// A tier a tensor can live on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum TierKind {
    /// Compute-device memory (GPU), or owned RAM on a CPU build.
    Device,
    /// The memory-mapped file: the page cache holds the bytes, used in place.
    Ram,
    /// Read from disk with direct I/O into a pool buffer when needed.
    Nvme,
}

impl TierKind {
    pub fn name(self) -> &'static str {
        match self {
            TierKind::Device => "device",
            TierKind::Ram => "ram",
            TierKind::Nvme => "nvme",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "device" | "gpu" | "vram" => Some(TierKind::Device),
            "ram" | "mmap" | "cpu" => Some(TierKind::Ram),
            "nvme" | "disk" | "ssd" | "stream" => Some(TierKind::Nvme),
            _ => None,
        }
    }
}

/// Tiers for every tensor, and the stream groups of the NVMe ones.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// Tier of each tensor by name; tensors not listed are on the device.
    pub tiers: HashMap<String, TierKind>,
    /// Reads, in the order the forward pass uses them (cyclic).
    pub groups: Vec<StreamGroup>,
    /// For each streamed tensor: its group and its byte range inside the group.
    pub members: HashMap<String, (usize, Range<usize>)>,
    /// Groups kept in flight ahead of the one in use.
    pub lookahead: usize,
    /// Most groups one layer is split into (a fused product may hold them all at once).
    pub max_groups_per_layer: usize,
    /// Repacked copies for multi-row products are made per product and dropped, instead of
    /// kept beside every device weight (no second copy of the weights; slower prompts; the
    /// same numbers).
    pub transient_repack: bool,
    /// How expert tensors on NVMe are served (MoE): through an expert cache of this size,
    /// never through stream groups.
    pub expert_cache: ExpertCacheConfig,
    /// GPU builds: where RAM-tier matrices are multiplied (single-token products; batches are
    /// always uploaded).
    pub ram_compute: RamCompute,
}

impl Placement {
    /// Every tensor on `tier`.
    pub fn all(files: &ModelFiles, tier: TierKind, lookahead: usize) -> Self {
        let tiers = files
            .tensors
            .iter()
            .map(|t| (t.name.clone(), tier))
            .collect();
        Self::new(files, tiers, lookahead)
    }

    /// The given tiers over `files`' tensors; groups are formed for the NVMe tensors.
    pub fn new(files: &ModelFiles, tiers: HashMap<String, TierKind>, lookahead: usize) -> Self {
        Self::from_tensors(&files.tensors, tiers, lookahead)
    }

    /// The given tiers over a tensor table; groups are formed for the NVMe tensors.
    pub fn from_tensors(
        tensors: &[TensorEntry],
        mut tiers: HashMap<String, TierKind>,
        lookahead: usize,
    ) -> Self {
        // A layer's experts are read as units (gate, up and down together): if one of its expert
        // tensors is on NVMe, all are.
        let streamed_expert_layers: Vec<usize> = tensors
            .iter()
            .filter(|t| is_expert_tensor(&t.name) && tiers.get(&t.name) == Some(&TierKind::Nvme))
            .filter_map(|t| layer_of(&t.name))
            .collect();
        for t in tensors {
            if is_expert_tensor(&t.name)
                && layer_of(&t.name).is_some_and(|l| streamed_expert_layers.contains(&l))
            {
                tiers.insert(t.name.clone(), TierKind::Nvme);
            }
        }
        let (groups, members, max_groups_per_layer) = stream_groups(tensors, &tiers);
        Placement {
            tiers,
            groups,
            members,
            lookahead: lookahead.max(1),
            max_groups_per_layer,
            transient_repack: false,
            expert_cache: ExpertCacheConfig::default(),
            ram_compute: RamCompute::default(),
        }
    }

    /// Whether some expert tensors are streamed through the expert cache.
    pub fn streams_experts(&self) -> bool {
        self.tiers
            .iter()
            .any(|(n, t)| *t == TierKind::Nvme && is_expert_tensor(n))
    }

    pub fn tier(&self, name: &str) -> TierKind {
        self.tiers.get(name).copied().unwrap_or(TierKind::Device)
    }

    /// Bytes on each tier.
    pub fn bytes_by_tier(&self, tensors: &[TensorEntry]) -> HashMap<TierKind, u64> {
        let mut m = HashMap::new();
        for t in tensors {
            *m.entry(self.tier(&t.name)).or_insert(0) += t.n_bytes;
        }
        m
    }
}

/// Reads in use order, each streamed tensor's (group, range), and the most groups of one layer.
type Groups = (
    Vec<StreamGroup>,
    HashMap<String, (usize, Range<usize>)>,
    usize,
);

/// A merged MoE expert tensor (`blk.N.ffn_{gate,up,down}_exps.weight`).
pub fn is_expert_tensor(name: &str) -> bool {
    name.contains("_exps.")
}

/// `blk.N.` → N.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Groups the NVMe tensors into reads: per layer, runs of tensors that lie together in one file
/// become one read (a gap of at most 1/4 of the run's bytes, e.g. a norm vector, is read through).
/// Non-layer tensors come after the layers, each its own read. Order = use order.
fn stream_groups(tensors: &[TensorEntry], tiers: &HashMap<String, TierKind>) -> Groups {
    let mut by_layer: std::collections::BTreeMap<(usize, usize), Vec<&TensorEntry>> =
        Default::default();
    for t in tensors {
        if tiers.get(&t.name) == Some(&TierKind::Nvme) && !is_expert_tensor(&t.name) {
            // Token embeddings are used first; other non-layer tensors (output) last.
            let key = match layer_of(&t.name) {
                Some(l) => (1, l),
                None if t.name.starts_with("token_embd") => (0, 0),
                None => (2, by_layer.len()),
            };
            by_layer.entry(key).or_default().push(t);
        }
    }
    let mut groups = Vec::new();
    let mut members = HashMap::new();
    let mut max_per_layer = 1;
    for (_, mut ts) in by_layer {
        ts.sort_by_key(|t| (t.file, t.offset));
        let mut runs: Vec<Vec<&TensorEntry>> = Vec::new();
        for t in ts {
            match runs.last_mut() {
                Some(run) => {
                    let last = run[run.len() - 1];
                    let bytes: u64 = run.iter().map(|x| x.n_bytes).sum::<u64>() + t.n_bytes;
                    let gap = t.offset.saturating_sub(last.offset + last.n_bytes);
                    if last.file == t.file && gap * 4 <= bytes {
                        run.push(t);
                    } else {
                        runs.push(vec![t]);
                    }
                }
                None => runs.push(vec![t]),
            }
        }
        max_per_layer = max_per_layer.max(runs.len());
        for run in runs {
            let start = run[0].offset;
            let end = run
                .iter()
                .map(|t| t.offset + t.n_bytes)
                .max()
                .unwrap_or(start);
            let g = groups.len();
            for t in &run {
                let a = (t.offset - start) as usize;
                members.insert(t.name.clone(), (g, a..a + t.n_bytes as usize));
            }
            groups.push(crate::storage::StreamGroup {
                file: run[0].file,
                offset: start,
                len: (end - start) as usize,
            });
        }
    }
    (groups, members, max_per_layer)
}
