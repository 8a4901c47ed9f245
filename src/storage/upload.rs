//! Streaming weights into GPU memory (CUDA builds).
//!
//! Weights the plan keeps off the device — in RAM (page-locked copies made at load) or on NVMe
//! (read with direct I/O into the stream pool, whose buffers are registered as page-locked) —
//! are copied host→device on a **copy stream** of their own into a few reused **device slots**,
//! `lookahead` groups (layers) ahead of the compute stream. Two events per slot order the
//! streams, never a device-wide sync:
//! - `ready` (recorded on the copy stream after a slot's uploads): the compute stream waits on it
//!   before the first product that reads the slot;
//! - `released` (recorded on the compute stream when the forward pass moves past the slot's
//!   group): the copy stream waits on it before overwriting the slot.
//!
//! Groups are used in a fixed cyclic order (layer 0, 1, …, last, then layer 0 of the next token),
//! like the [`Streamer`]'s. A slot holds one group; its device tensors are made once per
//! (type, shape) and reused.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Shape};

use super::pinned::{cuda_error, PinnedAligned};
use super::stream::{Slab, Streamer};
use crate::error::{Error, Result};
use crate::gguf::TensorType;

/// Where an uploaded weight's bytes wait on the host.
pub(crate) enum HostSource {
    /// A page-locked copy made at load (the RAM tier on a GPU).
    Pinned(Arc<PinnedAligned>, Range<usize>),
    /// Bytes `range` of stream group `group` (the NVMe tier).
    Streamed {
        streamer: Arc<Streamer>,
        group: usize,
        range: Range<usize>,
    },
}

/// One weight of an upload group.
pub(crate) struct UploadItem {
    pub ty: TensorType,
    pub shape: Shape,
    pub src: HostSource,
}

/// What uploads cost so far.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct UploadStats {
    pub bytes_uploaded: u64,
    pub uploads: u64,
    /// Host time spent waiting for stream-pool reads before an upload could be issued.
    pub read_wait: Duration,
}

/// A copy stream created and destroyed here (not through `CudaContext::new_stream`, which would
/// switch the context to multi-stream event tracking and add an event record to every kernel
/// launch of the compute stream; this module orders its streams itself).
pub(crate) struct CopyStream {
    pub stream: Arc<CudaStream>,
    pub raw: sys::CUstream,
}

impl CopyStream {
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        ctx.bind_to_thread().map_err(cuda_error)?;
        // A context is bound to this thread; the stream is destroyed in Drop, with `self`.
        let raw =
            result::stream::create(result::stream::StreamKind::NonBlocking).map_err(cuda_error)?;
        // SAFETY: `raw` is a valid stream of `ctx`, kept alive until Drop.
        let stream = unsafe { ctx.wrap_borrowed_stream(raw) };
        Ok(CopyStream { stream, raw })
    }
}

impl Drop for CopyStream {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        if self.stream.context().bind_to_thread().is_ok() {
            // SAFETY: created in `new`; no work is pending (synchronised above).
            let _ = unsafe { result::stream::destroy(self.raw) };
        }
    }
}

#[derive(Default)]
struct DevSlot {
    group: Option<usize>,
    /// Device tensors by (type, shape), reused across groups.
    tensors: HashMap<(GgmlDType, Vec<usize>), Vec<Arc<QTensor>>>,
    /// The tensors of `group`'s items, in item order.
    assigned: Vec<Arc<QTensor>>,
    ready: Option<CudaEvent>,
    released: Option<CudaEvent>,
    /// Pool slabs the pending uploads read from (kept until they complete).
    held: Vec<Arc<Slab>>,
}

struct State {
    slots: Vec<DevSlot>,
    current: Option<usize>,
    stats: UploadStats,
}

/// Uploads off-device weights to the GPU ahead of their use.
pub struct Uploader {
    device: Device,
    ctx: Arc<CudaContext>,
    compute: Arc<CudaStream>,
    copy: CopyStream,
    groups: Vec<Vec<UploadItem>>,
    lookahead: usize,
    state: Mutex<State>,
}

// SAFETY: the raw stream handle in `copy` is only used under `state`'s lock or in Drop; every
// other field is Send + Sync.
unsafe impl Send for Uploader {}
// SAFETY: as above.
unsafe impl Sync for Uploader {}

impl Uploader {
    /// An uploader for `groups` (in use order) on the CUDA `device`, `lookahead` groups ahead.
    pub(crate) fn new(
        device: &Device,
        groups: Vec<Vec<UploadItem>>,
        lookahead: usize,
    ) -> Result<Arc<Self>> {
        let cuda = device.as_cuda_device()?;
        let compute = cuda.cuda_stream();
        let ctx = compute.context().clone();
        let copy = CopyStream::new(&ctx)?;
        let lookahead = lookahead.clamp(1, groups.len().max(1));
        let n_slots = (lookahead + 1).min(groups.len().max(1));
        Ok(Arc::new(Uploader {
            device: device.clone(),
            ctx,
            compute,
            copy,
            groups,
            lookahead,
            state: Mutex::new(State {
                slots: (0..n_slots).map(|_| DevSlot::default()).collect(),
                current: None,
                stats: UploadStats::default(),
            }),
        }))
    }

    pub fn stats(&self) -> UploadStats {
        self.lock().stats.clone()
    }

    pub fn lookahead(&self) -> usize {
        self.lookahead
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device tensor of item `item` of group `group`, its upload ordered before every later
    /// use on the compute stream. Moving to a new group releases the previous one's slot and
    /// issues the uploads of the next `lookahead` groups.
    pub(crate) fn acquire(&self, group: usize, item: usize) -> Result<Arc<QTensor>> {
        let n = self.groups.len();
        if group >= n || item >= self.groups[group].len() {
            return Err(Error::InvalidRequest(format!(
                "upload item {item} of group {group} ({n} groups)"
            )));
        }
        let mut st = self.lock();
        if st.current != Some(group) {
            self.ctx.bind_to_thread().map_err(cuda_error)?;
            if let Some(prev) = st.current.take() {
                if let Some(s) = slot_of(&st, prev) {
                    st.slots[s].released = Some(self.record(&self.compute)?);
                }
            }
            st.current = Some(group);
            let window: Vec<usize> = (0..=self.lookahead.min(n - 1))
                .map(|i| (group + i) % n)
                .collect();
            for &h in &window {
                if slot_of(&st, h).is_some() {
                    continue;
                }
                let s = pick_slot(&st, &window).ok_or_else(|| {
                    Error::InvalidRequest("upload slots: none free (bad lookahead)".into())
                })?;
                self.enqueue(&mut st, h, s)?;
            }
            let s = slot_of(&st, group)
                .ok_or_else(|| Error::InvalidRequest("upload state: group not staged".into()))?;
            if let Some(ev) = &st.slots[s].ready {
                self.compute.wait(ev).map_err(cuda_error)?;
            }
            release_completed(&mut st);
        }
        let s = slot_of(&st, group)
            .ok_or_else(|| Error::InvalidRequest("upload state: group not staged".into()))?;
        Ok(st.slots[s].assigned[item].clone())
    }

    fn record(&self, stream: &CudaStream) -> Result<CudaEvent> {
        record(stream)
    }

    /// Issues the uploads of group `h` into slot `s` on the copy stream.
    fn enqueue(&self, st: &mut State, h: usize, s: usize) -> Result<()> {
        // Host buffers the slot's previous uploads read from may be reused once those finished.
        if let Some(ev) = st.slots[s].ready.take() {
            if !st.slots[s].held.is_empty() {
                ev.synchronize().map_err(cuda_error)?;
            }
        }
        st.slots[s].held.clear();
        // Slabs other slots still hold pin pool buffers the streamer needs for its reads: keep at
        // most one other slot's worth outstanding.
        let holding: Vec<usize> = (0..st.slots.len())
            .filter(|&i| i != s && !st.slots[i].held.is_empty())
            .collect();
        if holding.len() > 1 {
            for &i in &holding {
                if let Some(ev) = &st.slots[i].ready {
                    ev.synchronize().map_err(cuda_error)?;
                }
                st.slots[i].held.clear();
            }
        }
        // The compute stream must be done with the slot's old contents before they are
        // overwritten.
        if let Some(ev) = st.slots[s].released.take() {
            self.copy.stream.wait(&ev).map_err(cuda_error)?;
        }
        let mut allocated = false;
        let mut assigned = Vec::with_capacity(self.groups[h].len());
        let mut taken: HashMap<(GgmlDType, Vec<usize>), usize> = HashMap::new();
        for it in &self.groups[h] {
            let key = (it.ty.to_candle(), it.shape.dims().to_vec());
            let k = taken.entry(key.clone()).or_insert(0);
            let pool = st.slots[s].tensors.entry(key).or_default();
            if pool.len() <= *k {
                pool.push(Arc::new(zeroed_qtensor(it.ty, &it.shape, &self.device)?));
                allocated = true;
            }
            assigned.push(pool[*k].clone());
            *k += 1;
        }
        if allocated {
            // New tensors were zero-filled on the compute stream: order the copies after that.
            let ev = self.record(&self.compute)?;
            self.copy.stream.wait(&ev).map_err(cuda_error)?;
        }
        let mut held = Vec::new();
        let mut bytes_total = 0u64;
        for (it, dst) in self.groups[h].iter().zip(&assigned) {
            match &it.src {
                HostSource::Pinned(buf, r) => {
                    self.upload(&buf.as_slice()[r.clone()], dst)?;
                    bytes_total += r.len() as u64;
                }
                HostSource::Streamed {
                    streamer,
                    group,
                    range,
                } => {
                    let t0 = Instant::now();
                    let slab = streamer.acquire(*group)?;
                    st.stats.read_wait += t0.elapsed();
                    self.upload(&slab[range.clone()], dst)?;
                    bytes_total += range.len() as u64;
                    // Kept until the upload has completed (see the top of this function).
                    held.push(slab);
                }
            }
        }
        let ready = self.record(&self.copy.stream)?;
        let slot = &mut st.slots[s];
        slot.group = Some(h);
        slot.assigned = assigned;
        slot.ready = Some(ready);
        slot.held = held;
        st.stats.bytes_uploaded += bytes_total;
        st.stats.uploads += 1;
        Ok(())
    }

    /// An asynchronous copy of `bytes` into `dst` on the copy stream.
    fn upload(&self, bytes: &[u8], dst: &QTensor) -> Result<()> {
        // SAFETY: nothing reads `dst` on the compute stream until it waits on this group's
        // `ready` event, and nothing else writes it; `bytes` stays alive and unmodified until the
        // copy completes (pinned RAM-tier copies live as long as the uploader; pool slabs are held
        // in the slot until its `ready` event has completed).
        unsafe { upload_async(bytes, dst, self.copy.raw) }
    }
}

/// An event (no timing) recorded on `stream` now.
pub(crate) fn record(stream: &CudaStream) -> Result<CudaEvent> {
    stream
        .record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
        .map_err(cuda_error)
}

/// An asynchronous host→device copy of `bytes` into the start of `dst`'s device storage, on
/// `stream`.
///
/// # Safety
/// `bytes` must stay alive and unmodified until the copy completes, and nothing may read or
/// write `dst` on another stream until then (order it with an event recorded after the copy).
pub(crate) unsafe fn upload_async(
    bytes: &[u8],
    dst: &QTensor,
    stream: sys::CUstream,
) -> Result<()> {
    if bytes.len() != dst.storage_size_in_bytes() {
        return Err(Error::InvalidRequest(format!(
            "upload of {} bytes into a {}-byte device tensor",
            bytes.len(),
            dst.storage_size_in_bytes()
        )));
    }
    let ptr = dst.device_ptr()? as sys::CUdeviceptr;
    // SAFETY: `ptr` starts `dst`'s device allocation, at least `bytes.len()` long (checked
    // above); the caller upholds the lifetime and ordering contract.
    unsafe { result::memcpy_htod_async(ptr, bytes, stream) }.map_err(cuda_error)
}

/// The slot holding group `g`, if any.
fn slot_of(st: &State, g: usize) -> Option<usize> {
    st.slots.iter().position(|s| s.group == Some(g))
}

/// A slot whose group is outside `window` (or empty), preferring empty ones.
fn pick_slot(st: &State, window: &[usize]) -> Option<usize> {
    st.slots.iter().position(|s| s.group.is_none()).or_else(|| {
        st.slots
            .iter()
            .position(|s| s.group.is_some_and(|g| !window.contains(&g)))
    })
}

/// Lets go of pool slabs whose uploads have completed.
fn release_completed(st: &mut State) {
    for s in &mut st.slots {
        if !s.held.is_empty() && s.ready.as_ref().is_none_or(|e| e.is_complete()) {
            s.held.clear();
        }
    }
}

/// A device tensor of `ty` and `shape`, zero-filled, to be overwritten by uploads.
pub(crate) fn zeroed_qtensor(ty: TensorType, shape: &Shape, device: &Device) -> Result<QTensor> {
    let n = shape.elem_count() as u64;
    let bytes = n / ty.block_elems() as u64 * ty.block_bytes() as u64;
    super::qtensor(&vec![0u8; bytes as usize], ty, shape.clone(), device)
}
