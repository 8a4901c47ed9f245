//! How the [`WeightStore`] serves off-device weights on a GPU (CUDA builds): every matrix the plan
//! puts in RAM or on NVMe becomes an item of an [`Uploader`] group (one group per layer, in use
//! order; non-layer tensors last). RAM-tier bytes are copied once, at load, into page-locked
//! memory (and their page-cache pages dropped); NVMe-tier bytes come through the stream pool.
//! Token embeddings stay in the mapped file: a token reads one row on the host.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use candle_core::Shape;

use super::experts::{DeviceExperts, ExpertCache, SliceMeta};
use super::pinned::PinnedAligned;
use super::upload::{HostSource, UploadItem, Uploader};
use super::weight::Tier;
use super::{release_pages, AlignedBuf, Weight, WeightStore, DIRECT_IO_ALIGN};
use crate::error::{Error, Result};
use crate::gguf::{ModelFiles, TensorEntry};
use crate::plan::{is_expert_tensor, layer_of, RamCompute, TierKind};

/// The uploader and where each weight (tensor name, byte offset of its part) is in it.
pub(crate) struct Uploads {
    pub uploader: Arc<Uploader>,
    index: HashMap<(String, usize), (usize, usize)>,
}

/// One weight to upload: its tensor, the part of it, and its shape.
struct Part<'a> {
    e: &'a TensorEntry,
    part: Range<usize>,
    shape: Shape,
}

impl WeightStore {
    /// Whether tensor `e` is served through the uploader on this store's device.
    fn uploads_tensor(&self, e: &TensorEntry) -> bool {
        let tier = self.placement.tier(&e.name);
        // RAM-tier matrices multiplied on the host stay plain mapped weights.
        let host = tier == TierKind::Ram && self.placement.ram_compute == RamCompute::Host;
        self.device.is_cuda()
            && tier != TierKind::Device
            && !host
            && e.dims.len() > 1
            && !e.name.starts_with("token_embd")
            && !(is_expert_tensor(&e.name) && self.placement.streams_experts())
    }

    /// The weight for `name` (part `part` of tensor `e`) when it is uploaded per use, else None.
    pub(super) fn uploaded_weight(
        &self,
        name: &str,
        e: &TensorEntry,
        part: &Range<usize>,
        shape: &Shape,
    ) -> Result<Option<Weight>> {
        if !self.uploads_tensor(e) {
            return Ok(None);
        }
        let mut guard = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(Arc::new(self.build_uploads()?));
        }
        let up = guard
            .as_ref()
            .ok_or_else(|| Error::InvalidRequest("uploads not built".into()))?;
        let &(group, item) = up.index.get(&(e.name.clone(), part.start)).ok_or_else(|| {
            Error::InvalidRequest(format!("{name}: not among the weights planned for upload"))
        })?;
        let tier = Tier::Uploaded {
            uploader: up.uploader.clone(),
            group,
            item,
            home: self.placement.tier(&e.name),
        };
        Ok(Some(Weight::new(
            name,
            e.ty,
            shape.clone(),
            tier,
            &self.device,
        )))
    }

    /// Every uploaded weight, grouped per layer; RAM-tier bytes copied to page-locked memory.
    fn build_uploads(&self) -> Result<Uploads> {
        let n_expert = self.files.config().map(|c| c.n_expert).unwrap_or(0);
        // Groups in use order: layers first, then the other tensors (output).
        let mut by_group: BTreeMap<(usize, usize), Vec<Part>> = BTreeMap::new();
        for e in self.files.tensors.iter().filter(|e| self.uploads_tensor(e)) {
            let key = match layer_of(&e.name) {
                Some(l) => (0, l),
                None => (1, 0),
            };
            let parts = by_group.entry(key).or_default();
            let dims = e.shape();
            if is_expert_tensor(&e.name) && n_expert > 0 && dims.len() == 3 {
                // Merged expert tensors are used one expert at a time.
                let per = e.n_bytes as usize / n_expert;
                for i in 0..n_expert {
                    parts.push(Part {
                        e,
                        part: i * per..(i + 1) * per,
                        shape: Shape::from((dims[1], dims[2])),
                    });
                }
            } else {
                parts.push(Part {
                    e,
                    part: 0..e.n_bytes as usize,
                    shape: Shape::from(dims),
                });
            }
        }
        let ctx = self
            .device
            .as_cuda_device()?
            .cuda_stream()
            .context()
            .clone();
        let streamer = self.streamer.clone();
        if let Some(s) = &streamer {
            s.pin_pool(&ctx)?;
        }
        let mut groups = Vec::with_capacity(by_group.len());
        let mut index = HashMap::new();
        for parts in by_group.into_values() {
            let g = groups.len();
            // One page-locked buffer for the group's RAM-tier parts.
            let ram: Vec<&Part> = parts
                .iter()
                .filter(|p| self.placement.tier(&p.e.name) == TierKind::Ram)
                .collect();
            let ram_bytes: usize = ram.iter().map(|p| p.part.len().next_multiple_of(64)).sum();
            let pinned = if ram.is_empty() {
                None
            } else {
                let mut buf = AlignedBuf::new(ram_bytes, DIRECT_IO_ALIGN)?;
                let mut at = 0;
                for p in &ram {
                    let start = p.e.offset as usize + p.part.start;
                    let src = &self.maps[p.e.file][start..start + p.part.len()];
                    buf.as_mut_slice()[at..at + src.len()].copy_from_slice(src);
                    release_pages(&self.maps[p.e.file], start..start + p.part.len());
                    self.readers[p.e.file].drop_cache(start as u64, p.part.len() as u64);
                    if let Some(f) = &self.on_read {
                        f(p.part.len() as u64);
                    }
                    at += p.part.len().next_multiple_of(64);
                }
                Some(Arc::new(PinnedAligned::new(&ctx, buf)?))
            };
            let mut items = Vec::with_capacity(parts.len());
            let mut at = 0;
            for p in &parts {
                let src =
                    match self.placement.tier(&p.e.name) {
                        TierKind::Ram => {
                            let buf = pinned
                                .clone()
                                .ok_or_else(|| Error::InvalidRequest("pinned buffer".into()))?;
                            let r = at..at + p.part.len();
                            at += p.part.len().next_multiple_of(64);
                            HostSource::Pinned(buf, r)
                        }
                        _ => {
                            let (group, range) =
                                self.placement.members.get(&p.e.name).cloned().ok_or_else(
                                    || {
                                        Error::InvalidRequest(format!(
                                            "{}: placed on NVMe but in no stream group",
                                            p.e.name
                                        ))
                                    },
                                )?;
                            let streamer = streamer.clone().ok_or_else(|| {
                                Error::InvalidRequest("NVMe placement without a streamer".into())
                            })?;
                            HostSource::Streamed {
                                streamer,
                                group,
                                range: range.start + p.part.start..range.start + p.part.end,
                            }
                        }
                    };
                index.insert((p.e.name.clone(), p.part.start), (g, items.len()));
                items.push(UploadItem {
                    ty: p.e.ty,
                    shape: p.shape.clone(),
                    src,
                });
            }
            groups.push(items);
        }
        let uploader = Uploader::new(&self.device, groups, self.placement.lookahead)?;
        Ok(Uploads { uploader, index })
    }
}

/// The device expert cache the placement asks for (`expert_cache.device_slots`), on a CUDA
/// `device` in front of the host cache `host`, whose buffers are registered as page-locked.
pub(super) fn device_experts(
    files: &ModelFiles,
    placement: &crate::plan::Placement,
    device: &candle_core::Device,
    host: Option<&Arc<ExpertCache>>,
) -> Result<Option<Arc<DeviceExperts>>> {
    let cfg = &placement.expert_cache;
    let Some(host) = host else { return Ok(None) };
    if !device.is_cuda() || cfg.device_slots == 0 {
        return Ok(None);
    }
    let model = files.config()?;
    let mut metas: Vec<[SliceMeta; 3]> = Vec::new();
    for l in 0..model.n_layer {
        let names = ["gate", "up", "down"].map(|k| format!("blk.{l}.ffn_{k}_exps.weight"));
        let entries: Vec<&TensorEntry> = names.iter().filter_map(|n| files.tensor(n)).collect();
        if entries.len() != 3 || placement.tier(&names[0]) != TierKind::Nvme {
            continue;
        }
        let meta = [0, 1, 2].map(|i| {
            let d = entries[i].shape();
            SliceMeta {
                name: entries[i].name.clone(),
                ty: entries[i].ty,
                shape: Shape::from((d[1], d[2])),
            }
        });
        metas.push(meta);
    }
    if metas.is_empty() {
        return Ok(None);
    }
    let ctx = device.as_cuda_device()?.cuda_stream().context().clone();
    host.pin_buffers(&ctx)?;
    Ok(Some(DeviceExperts::new(
        device,
        cfg.device_slots,
        model.n_expert_used.max(1),
        cfg.policy,
        &metas,
        (model.n_layer, model.n_expert),
    )?))
}
