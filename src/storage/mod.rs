//! Storage: where a tensor's bytes live, and the one weight type models read them through.
//!
//! Storage knows no models. It opens the model's files read-only, memory-maps them, and serves
//! any tensor of the index as a [`Weight`] on the tier the [`Placement`] names: owned on the
//! compute device, a zero-copy view of the mapped file, or streamed from disk through a pool of
//! direct-I/O buffers ([`Streamer`]).

mod aligned;
#[cfg(feature = "cuda")]
pub(crate) mod device_view;
mod direct;
pub mod experts;
#[cfg(feature = "cuda")]
mod gpu_tier;
#[cfg(feature = "cuda")]
mod pinned;
mod stream;
#[cfg(feature = "cuda")]
mod upload;
mod weight;

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Shape};
use memmap2::Mmap;

pub use aligned::AlignedBuf;
pub use direct::{scatter_follows, DirectFile, ReadMode, DIRECT_IO_ALIGN};
pub use experts::{
    EvictionPolicy, ExpertCache, ExpertCacheConfig, ExpertSet, ExpertStats, ExpertWeights,
};
#[cfg(feature = "cuda")]
pub use pinned::{cuda_error, PinnedBuf};
pub use stream::{Slab, StreamGroup, StreamStats, Streamer, STREAM_IO_THREADS};
#[cfg(feature = "cuda")]
pub use upload::{UploadStats, Uploader};
pub use weight::{set_transient_chunk_bytes, BatchMath, Weight};

use crate::error::{Error, Result};
use crate::gguf::{ModelFiles, TensorEntry, TensorType};
use crate::plan::{Placement, TierKind};
use experts::SliceSpec;
use weight::Tier;

/// The model's files, mapped, serving tensors by name on their planned tiers.
pub struct WeightStore {
    files: ModelFiles,
    maps: Vec<Arc<Mmap>>,
    /// Used to drop the page cache of tensors copied to the device.
    readers: Vec<DirectFile>,
    device: Device,
    placement: Placement,
    streamer: Option<Arc<Streamer>>,
    experts: Option<Arc<ExpertCache>>,
    on_read: Option<Box<dyn Fn(u64) + Send + Sync>>,
    /// GPU builds: uploads of off-device weights, made on first use (after `on_read` is set).
    #[cfg(feature = "cuda")]
    uploads: std::sync::Mutex<Option<Arc<gpu_tier::Uploads>>>,
    /// GPU builds: the device expert cache, in front of `experts`.
    #[cfg(feature = "cuda")]
    device_experts: Option<Arc<experts::DeviceExperts>>,
}

impl WeightStore {
    /// Maps every file of `files` read-only; every tensor goes to the device. No tensor byte is
    /// read yet.
    pub fn open(files: ModelFiles, device: &Device) -> Result<Self> {
        Self::with_placement(files, device, Placement::default())
    }

    /// Like [`open`](Self::open), with tensors on the tiers `placement` names. Starts the stream
    /// I/O thread when some tensors are on NVMe.
    pub fn with_placement(
        files: ModelFiles,
        device: &Device,
        placement: Placement,
    ) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            crate::backend::configure_cuda();
        }
        let mut maps = Vec::with_capacity(files.paths.len());
        for path in &files.paths {
            let f = std::fs::File::open(path).map_err(|e| Error::io("open", path, 0, e))?;
            // SAFETY: the map is read-only and private to this process. If another process
            // truncates the file while it is mapped, reads of the lost pages fault (SIGBUS); this
            // is the same contract every mmap-based loader (llama.cpp included) has with its user.
            let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io("mmap", path, 0, e))?;
            maps.push(Arc::new(map));
        }
        let streamer = if placement.groups.is_empty() {
            None
        } else {
            // On a GPU, uploads may still read the slabs of two layers (see `upload`).
            let slots = if device.is_cuda() {
                crate::plan::gpu_pool_slots(&placement)
            } else {
                placement.lookahead + placement.max_groups_per_layer
            };
            Some(Streamer::new(
                &files.paths,
                placement.groups.clone(),
                placement.lookahead,
                slots,
            )?)
        };
        let readers = files
            .paths
            .iter()
            .map(|p| DirectFile::open(p))
            .collect::<Result<Vec<_>>>()?;
        let experts = expert_cache(&files, &placement)?;
        #[cfg(feature = "cuda")]
        let device_experts =
            gpu_tier::device_experts(&files, &placement, device, experts.as_ref())?;
        Ok(WeightStore {
            files,
            maps,
            readers,
            device: device.clone(),
            placement,
            streamer,
            experts,
            on_read: None,
            #[cfg(feature = "cuda")]
            uploads: std::sync::Mutex::new(None),
            #[cfg(feature = "cuda")]
            device_experts,
        })
    }

    /// Calls `f(bytes)` each time tensor bytes are copied to the device (progress reporting).
    pub fn on_read(&mut self, f: Box<dyn Fn(u64) + Send + Sync>) {
        self.on_read = Some(f);
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// GPU builds: the uploader of off-device weights, once a weight has used it.
    #[cfg(feature = "cuda")]
    pub fn uploader(&self) -> Option<Arc<Uploader>> {
        let u = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        u.as_ref().map(|u| u.uploader.clone())
    }

    /// GPU builds: the device expert cache, when the plan has one.
    #[cfg(feature = "cuda")]
    pub fn device_experts(&self) -> Option<&Arc<experts::DeviceExperts>> {
        self.device_experts.as_ref()
    }

    /// The streaming engine, when some tensors are on NVMe.
    pub fn streamer(&self) -> Option<&Arc<Streamer>> {
        self.streamer.as_ref()
    }

    /// The expert cache, when some MoE experts are streamed.
    pub fn expert_cache(&self) -> Option<&Arc<ExpertCache>> {
        self.experts.as_ref()
    }

    pub fn has(&self, name: &str) -> bool {
        self.files.tensor(name).is_some()
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.files.tensor(name).ok_or_else(|| Error::Tensor {
            path: self.files.path().to_path_buf(),
            name: name.to_string(),
            reason: "missing from the model file".into(),
        })
    }

    fn shape_error(&self, e: &TensorEntry, expected: &[usize]) -> Error {
        Error::Tensor {
            path: self.files.paths[e.file].clone(),
            name: e.name.clone(),
            reason: format!("shape {:?}, expected {:?}", e.shape(), expected),
        }
    }

    /// The tensor `name`, which must have `shape` (candle order, outermost first).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let e = self.entry(name)?;
        if e.shape() != shape {
            return Err(self.shape_error(e, shape));
        }
        self.weight(&e.name, e, 0..e.n_bytes as usize, shape)
    }

    /// Like [`get`](Self::get), but `Ok(None)` when the file has no such tensor.
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Weight>> {
        if !self.has(name) {
            return Ok(None);
        }
        self.get(name, shape).map(Some)
    }

    /// A merged expert tensor `[n_expert, rows, cols]` as one weight per expert, each `[rows, cols]`.
    /// Each expert's slice is contiguous in the file, so each is separately placeable.
    pub fn get_experts(
        &self,
        name: &str,
        n_expert: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<Weight>> {
        let e = self.entry(name)?;
        if e.shape() != [n_expert, rows, cols] {
            return Err(self.shape_error(e, &[n_expert, rows, cols]));
        }
        let per_expert = (e.n_bytes / n_expert as u64) as usize;
        (0..n_expert)
            .map(|i| {
                let w = self.weight(
                    &format!("{name}[{i}]"),
                    e,
                    i * per_expert..(i + 1) * per_expert,
                    &[rows, cols],
                )?;
                Ok(w.with_batch_math(BatchMath::Int8))
            })
            .collect()
    }

    /// Layer `layer`'s experts from its merged tensors `names` (gate `[n_expert, ff, d]`, up
    /// `[n_expert, ff, d]`, down `[n_expert, d, ff]`): resident weights, or, when the plan puts
    /// them on NVMe, served through the expert cache.
    pub fn get_expert_set(
        &self,
        layer: usize,
        names: [&str; 3],
        n_expert: usize,
        shapes: [[usize; 2]; 3],
    ) -> Result<ExpertSet> {
        let entries = [0, 1, 2].map(|i| self.entry(names[i]));
        let mut specs = Vec::with_capacity(3);
        let mut metas = Vec::with_capacity(3);
        for (i, e) in entries.into_iter().enumerate() {
            let e = e?;
            let [rows, cols] = shapes[i];
            if e.shape() != [n_expert, rows, cols] {
                return Err(self.shape_error(e, &[n_expert, rows, cols]));
            }
            specs.push(SliceSpec {
                file: e.file,
                offset: e.offset,
                stride: e.n_bytes / n_expert as u64,
            });
            metas.push(experts::SliceMeta {
                name: e.name.clone(),
                ty: e.ty,
                shape: Shape::from((rows, cols)),
            });
        }
        let streamed = names
            .iter()
            .any(|n| self.placement.tier(n) == TierKind::Nvme);
        if let (true, Some(cache)) = (streamed, &self.experts) {
            cache.register_layer(layer, [specs[0], specs[1], specs[2]]);
            let meta = [metas[0].clone(), metas[1].clone(), metas[2].clone()];
            let set = ExpertSet::cached(layer, n_expert, cache.clone(), meta, &self.device);
            #[cfg(feature = "cuda")]
            let set = match &self.device_experts {
                Some(d) => set.with_device_cache(d.clone()),
                None => set,
            };
            return Ok(set);
        }
        let g = self.get_experts(names[0], n_expert, shapes[0][0], shapes[0][1])?;
        let u = self.get_experts(names[1], n_expert, shapes[1][0], shapes[1][1])?;
        let d = self.get_experts(names[2], n_expert, shapes[2][0], shapes[2][1])?;
        let experts = g
            .into_iter()
            .zip(u)
            .zip(d)
            .map(|((gate, up), down)| ExpertWeights { gate, up, down })
            .collect();
        Ok(ExpertSet::resident(layer, experts))
    }

    /// Bytes `part` (relative to the tensor's start) of tensor `e`, served from its tier.
    fn weight(
        &self,
        name: &str,
        e: &TensorEntry,
        part: Range<usize>,
        shape: &[usize],
    ) -> Result<Weight> {
        Ok(self
            .weight_on_tier(name, e, part, shape)?
            .with_transient_repack(self.placement.transient_repack))
    }

    fn weight_on_tier(
        &self,
        name: &str,
        e: &TensorEntry,
        part: Range<usize>,
        shape: &[usize],
    ) -> Result<Weight> {
        let shape = Shape::from(shape);
        #[cfg(feature = "cuda")]
        if let Some(w) = self.uploaded_weight(name, e, &part, &shape)? {
            return Ok(w);
        }
        match self.placement.tier(&e.name) {
            TierKind::Device => {
                // Copy from the mapped file, then let go of those pages: the weight is owned on
                // the device now, and a second copy in the page cache would only crowd the budget.
                let start = e.offset as usize + part.start;
                let bytes = &self.maps[e.file][start..start + part.len()];
                let q = qtensor(bytes, e.ty, shape, &self.device)?;
                release_pages(&self.maps[e.file], start..start + part.len());
                self.readers[e.file].drop_cache(start as u64, part.len() as u64);
                if let Some(f) = &self.on_read {
                    f(part.len() as u64);
                }
                Weight::device(name, e.ty, q)
            }
            TierKind::Ram => {
                let start = e.offset as usize + part.start;
                let tier = Tier::Mapped {
                    map: self.maps[e.file].clone(),
                    range: start..start + part.len(),
                };
                Ok(Weight::new(name, e.ty, shape, tier, &self.device))
            }
            TierKind::Nvme => {
                let (group, range) =
                    self.placement
                        .members
                        .get(&e.name)
                        .cloned()
                        .ok_or_else(|| {
                            Error::InvalidRequest(format!(
                                "{}: placed on NVMe but in no stream group",
                                e.name
                            ))
                        })?;
                let streamer = self.streamer.clone().ok_or_else(|| {
                    Error::InvalidRequest("NVMe placement without a streamer".into())
                })?;
                let range = range.start + part.start..range.start + part.end;
                Ok(Weight::new(
                    name,
                    e.ty,
                    shape,
                    Tier::Streamed {
                        streamer,
                        group,
                        range,
                    },
                    &self.device,
                ))
            }
        }
    }
}

/// The expert cache for the expert tensors `placement` puts on NVMe, if any: slots sized for the
/// largest gate, up and down slices.
fn expert_cache(files: &ModelFiles, placement: &Placement) -> Result<Option<Arc<ExpertCache>>> {
    let streamed: Vec<&TensorEntry> = files
        .tensors
        .iter()
        .filter(|t| crate::plan::is_expert_tensor(&t.name))
        .filter(|t| placement.tier(&t.name) == TierKind::Nvme)
        .collect();
    if streamed.is_empty() {
        return Ok(None);
    }
    let cfg = files.config()?;
    let mut slice_bytes = [0usize; 3];
    for t in &streamed {
        let i = if t.name.contains("ffn_gate_exps") {
            0
        } else if t.name.contains("ffn_up_exps") {
            1
        } else {
            2
        };
        let n_expert = t.shape().first().copied().unwrap_or(1).max(1) as u64;
        slice_bytes[i] = slice_bytes[i].max((t.n_bytes / n_expert) as usize);
    }
    let readers = files
        .paths
        .iter()
        .map(|p| DirectFile::open(p))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(ExpertCache::new(
        readers,
        placement.expert_cache,
        slice_bytes,
        cfg.n_expert,
        cfg.n_expert_used,
    )?))
}

/// Tells the kernel this process no longer needs the mapped pages of `range` (they are re-read
/// from the file if touched again).
fn release_pages(map: &Mmap, range: Range<usize>) {
    let page = 4096;
    let start = range.start.div_ceil(page) * page;
    let end = range.end / page * page;
    if end > start {
        // SAFETY: the range lies inside the mapping (whole pages within `range`); the mapping is
        // read-only and private, so MADV_DONTNEED only drops our view of file pages, which are
        // faulted back in from the file on the next access. No Rust reference into these pages
        // is used after this call by this function's callers except through the map itself.
        unsafe {
            libc::madvise(
                map.as_ptr().add(start) as *mut libc::c_void,
                end - start,
                libc::MADV_DONTNEED,
            );
        }
    }
}

/// A candle tensor from ggml block bytes. Checks the length; copies to an aligned buffer when the
/// bytes are not aligned for the block type (GGUF alignment can be as small as 1).
pub(crate) fn qtensor(
    bytes: &[u8],
    ty: TensorType,
    shape: Shape,
    device: &Device,
) -> Result<QTensor> {
    let n = shape.elem_count() as u64;
    let expected = n / ty.block_elems() as u64 * ty.block_bytes() as u64;
    if bytes.len() as u64 != expected || !n.is_multiple_of(ty.block_elems() as u64) {
        return Err(Error::InvalidRequest(format!(
            "{} bytes for a {ty} tensor of shape {shape:?}",
            bytes.len()
        )));
    }
    if (bytes.as_ptr() as usize).is_multiple_of(16) {
        let storage = QStorage::from_data(Cow::Borrowed(bytes), device, ty.to_candle())?;
        return Ok(QTensor::new(storage, shape)?);
    }
    // Misaligned (odd `general.alignment`): copy into 16-aligned storage first.
    let mut words = vec![0u128; bytes.len().div_ceil(16)];
    // SAFETY: `words` owns at least bytes.len() bytes, and u8 has no alignment requirement.
    let aligned =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, bytes.len()) };
    aligned.copy_from_slice(bytes);
    let storage = QStorage::from_data(Cow::Borrowed(aligned), device, ty.to_candle())?;
    Ok(QTensor::new(storage, shape)?)
}
