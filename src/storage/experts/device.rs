//! The GPU's expert cache (CUDA builds): experts kept in device memory, in front of the host
//! [`ExpertCache`](super::ExpertCache).
//!
//! A MoE layer's routed experts that are on the device are used at once. The others are asked of
//! the host cache (which reads them from disk on a miss, and prefetches by co-activation); each
//! arriving expert is copied host→device on a copy stream into a device slot freed by the
//! eviction policy, and the compute stream waits on that copy's event before using it. So the
//! tiers are: device slots (most of the device budget) → host slots (the RAM budget) → disk.
//!
//! The fused decoder reads the slots through an address table in device memory (3 addresses per
//! expert, 0 when not on the device), which this cache keeps in step with the slots: each copy
//! into a slot is followed, on the same copy stream, by the table entries of the expert evicted
//! (zeroed) and of the one arriving.
//!
//! Ordering ([`Order`]): candle's ops read slots through the weights handed out, so before a slot
//! is overwritten the copy stream waits on an event recorded on the compute stream at that
//! moment, and the compute stream waits for the copy. A fused step asks for experts while the
//! device waits inside the step (every kernel before it has finished, none after it has started
//! reading weights): an event on the compute stream would only fire after the step, so those
//! copies wait for nothing and the host answers the device once they are done. Either way the
//! host waits for each copy to complete before it lets go of the host bytes (so a small host
//! cache is never pinned down by copies in flight).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::cuda_backend::cudarc::driver::{
    result, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice,
};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Device;

use super::{EvictionPolicy, ExpertData, ExpertKey, ExpertWeights, SliceMeta};
use crate::error::{Error, Result};
use crate::storage::pinned::cuda_error;
use crate::storage::upload::{record, upload_async, zeroed_qtensor, CopyStream};
use crate::storage::weight::{Tier, Weight};

/// What the device expert cache did so far.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DeviceExpertStats {
    /// Routed experts asked of the device cache.
    pub requests: u64,
    /// Found in device memory.
    pub hits: u64,
    /// Copied host→device (each after a host-cache hit or a disk read).
    pub uploads: u64,
    pub bytes_uploaded: u64,
}

impl DeviceExpertStats {
    /// `self - before`, field by field.
    pub fn since(&self, before: &DeviceExpertStats) -> DeviceExpertStats {
        DeviceExpertStats {
            requests: self.requests - before.requests,
            hits: self.hits - before.hits,
            uploads: self.uploads - before.uploads,
            bytes_uploaded: self.bytes_uploaded - before.bytes_uploaded,
        }
    }

    pub fn hit_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.hits as f64 / self.requests as f64
        }
    }
}

struct Slot {
    key: Option<ExpertKey>,
    /// Gate, up and down of the expert held.
    tensors: [Arc<QTensor>; 3],
    last_use: u64,
}

/// How a copy into a device slot is ordered with the compute stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    /// After every product already issued on the compute stream; products issued later wait
    /// for the copy (candle's ops).
    AfterIssued,
    /// The device waits inside a fused step for the host's answer: nothing in flight reads the
    /// slot, and nothing later starts before the host answers (after the copy completes).
    DeviceWaiting,
}

struct State {
    /// Slots by the (gate, up, down) types they hold: layers of different types do not share.
    pools: HashMap<[GgmlDType; 3], Vec<Slot>>,
    /// The host's copy of the address table (`[n_layer, n_expert, 3]`), page-locked so the
    /// copies of changed entries run on the copy stream.
    mirror: PinnedHostSlice<u64>,
    index: HashMap<ExpertKey, ([GgmlDType; 3], usize)>,
    freq: HashMap<ExpertKey, u64>,
    tick: u64,
    stats: DeviceExpertStats,
}

/// Experts in device memory.
pub struct DeviceExperts {
    device: Device,
    compute: Arc<CudaStream>,
    copy: CopyStream,
    policy: EvictionPolicy,
    slots: usize,
    /// The fused decoder's address table, `[n_layer, n_expert, 3]` device addresses.
    table: CudaSlice<u64>,
    table_ptr: u64,
    n_expert: usize,
    n_layer: usize,
    state: Mutex<State>,
}

// SAFETY: the raw copy-stream handle is only used under `state`'s lock or in Drop; the other
// fields are Send + Sync.
unsafe impl Send for DeviceExperts {}
// SAFETY: as above.
unsafe impl Sync for DeviceExperts {}

impl DeviceExperts {
    /// `slots` device slots, shared among layers in proportion to how many layers have each
    /// (gate, up, down) type triple in `layer_metas`; every triple gets at least `min_per_kind`.
    /// `n_layer` and `n_expert` size the address table.
    pub(crate) fn new(
        device: &Device,
        slots: usize,
        min_per_kind: usize,
        policy: EvictionPolicy,
        layer_metas: &[[SliceMeta; 3]],
        (n_layer, n_expert): (usize, usize),
    ) -> Result<Arc<Self>> {
        let compute = device.as_cuda_device()?.cuda_stream();
        let copy = CopyStream::new(compute.context())?;
        let mut kinds: Vec<([GgmlDType; 3], &[SliceMeta; 3], usize)> = Vec::new();
        for m in layer_metas {
            let k = [0, 1, 2].map(|i| m[i].ty.to_candle());
            match kinds.iter_mut().find(|x| x.0 == k) {
                Some(x) => x.2 += 1,
                None => kinds.push((k, m, 1)),
            }
        }
        let n_layers = layer_metas.len().max(1);
        let mut pools = HashMap::new();
        for (kind, meta, n) in kinds {
            let count = (slots * n / n_layers).max(min_per_kind);
            let mut pool = Vec::with_capacity(count);
            for _ in 0..count {
                let t = |i: usize| -> Result<Arc<QTensor>> {
                    Ok(Arc::new(zeroed_qtensor(
                        meta[i].ty,
                        &meta[i].shape,
                        device,
                    )?))
                };
                pool.push(Slot {
                    key: None,
                    tensors: [t(0)?, t(1)?, t(2)?],
                    last_use: 0,
                });
            }
            pools.insert(kind, pool);
        }
        let n_table = (n_layer * n_expert * 3).max(1);
        let table = compute.alloc_zeros::<u64>(n_table).map_err(cuda_error)?;
        let table_ptr = table.device_ptr(&compute).0;
        // SAFETY: `n_table` u64s of uninitialised page-locked memory, zeroed before any use.
        let mut mirror =
            unsafe { compute.context().alloc_pinned::<u64>(n_table) }.map_err(cuda_error)?;
        mirror.as_mut_slice().map_err(cuda_error)?.fill(0);
        // The zero fills ran on the compute stream: copies into slots and the table come after.
        compute.synchronize().map_err(cuda_error)?;
        Ok(Arc::new(DeviceExperts {
            device: device.clone(),
            compute,
            copy,
            policy,
            slots,
            table,
            table_ptr,
            n_expert,
            n_layer,
            state: Mutex::new(State {
                mirror,
                pools,
                index: HashMap::new(),
                freq: HashMap::new(),
                tick: 0,
                stats: DeviceExpertStats::default(),
            }),
        }))
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn stats(&self) -> DeviceExpertStats {
        self.lock().stats.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `key` is in device memory.
    pub fn contains(&self, key: ExpertKey) -> bool {
        self.lock().index.contains_key(&key)
    }

    /// Counts one layer's request for `used` and splits it into (on the device, missing).
    pub(crate) fn lookup(&self, layer: usize, used: &[usize]) -> (Vec<usize>, Vec<usize>) {
        let mut st = self.lock();
        st.tick += 1;
        st.stats.requests += used.len() as u64;
        let (mut hit, mut miss) = (Vec::new(), Vec::new());
        for &e in used {
            *st.freq.entry((layer, e)).or_insert(0) += 1;
            if st.index.contains_key(&(layer, e)) {
                hit.push(e);
            } else {
                miss.push(e);
            }
        }
        st.stats.hits += hit.len() as u64;
        for &e in &hit {
            let tick = st.tick;
            if let Some(&(k, s)) = st.index.get(&(layer, e)) {
                if let Some(slot) = st.pools.get_mut(&k).and_then(|p| p.get_mut(s)) {
                    slot.last_use = tick;
                }
            }
        }
        (hit, miss)
    }

    /// The weights of cached expert `(layer, e)`.
    pub(crate) fn weights(
        &self,
        layer: usize,
        e: usize,
        meta: &[SliceMeta; 3],
    ) -> Result<ExpertWeights> {
        let st = self.lock();
        let &(k, s) = st.index.get(&(layer, e)).ok_or_else(|| {
            Error::InvalidRequest(format!("expert {e} of layer {layer} not on the device"))
        })?;
        let slot = &st.pools[&k][s];
        self.make_weights(e, meta, &slot.tensors)
    }

    /// Layer `layer`'s part of the fused decoder's address table: `n_expert` × (gate, up, down)
    /// device addresses, 0 for experts not on the device. Kept alive by the bytes it returns.
    pub(crate) fn table(
        self: &Arc<Self>,
        layer: usize,
    ) -> Result<hypura_kernels::cuda::DeviceBytes> {
        if layer >= self.n_layer {
            return Err(Error::InvalidRequest(format!(
                "device expert table: layer {layer} of {}",
                self.n_layer
            )));
        }
        let row_bytes = self.n_expert * 3 * 8;
        let ptr = self.table_ptr + (layer * row_bytes) as u64;
        debug_assert!(self.table.len() * 8 >= (layer + 1) * row_bytes);
        // SAFETY: `ptr..ptr + row_bytes` lies inside `self.table` (`n_layer` rows of `row_bytes`,
        // `layer < n_layer`), which lives as long as `self`, held by `keep`.
        Ok(unsafe { hypura_kernels::cuda::DeviceBytes::from_raw(ptr, row_bytes, self.clone()) })
    }

    /// Copies expert `(layer, e)` from the host into a device slot (evicting by the policy, never
    /// one of `protect`), updates the address table, and returns its device weights, ordered
    /// after the copy as `order` says.
    pub(crate) fn insert(
        &self,
        layer: usize,
        e: usize,
        data: Arc<ExpertData>,
        meta: &[SliceMeta; 3],
        protect: &[usize],
        order: Order,
    ) -> Result<ExpertWeights> {
        let kind = [0, 1, 2].map(|i| meta[i].ty.to_candle());
        let mut st = self.lock();
        let tick = st.tick;
        let st = &mut *st;
        let pool = st.pools.get_mut(&kind).ok_or_else(|| {
            Error::InvalidRequest(format!("no device slots for layer {layer}'s types"))
        })?;
        // Prefer not to evict this layer's own experts (they are used again by the next token);
        // when the pool is smaller than the layer's working set, any slot will do: the copy
        // waits for every product already issued, so no use of the old expert is cut short.
        let rank = |s: &Slot| match s.key {
            None => (0, 0),
            Some(k) => self
                .policy
                .victim_rank(st.freq.get(&k).copied().unwrap_or(0), s.last_use),
        };
        let protected = |s: &Slot| {
            s.key
                .is_some_and(|(l, x)| l == layer && protect.contains(&x))
        };
        let victim = (0..pool.len())
            .filter(|&i| !protected(&pool[i]))
            .min_by_key(|&i| (rank(&pool[i]), i))
            .or_else(|| (0..pool.len()).min_by_key(|&i| (rank(&pool[i]), i)))
            .ok_or_else(|| {
                Error::InvalidRequest(format!("device expert cache: no slots for layer {layer}"))
            })?;
        let slot = &mut pool[victim];
        let old = slot.key.take();
        if let Some(old) = old {
            st.index.remove(&old);
        }
        if order == Order::AfterIssued {
            // Every product issued so far (some may read the old expert) finishes first.
            let issued = record(&self.compute)?;
            self.copy.stream.wait(&issued).map_err(cuda_error)?;
        }
        let mut bytes = 0;
        for i in 0..3 {
            let src = data.slice(i);
            // SAFETY: `data` outlives the copy (the host waits for its event below). AfterIssued:
            // the compute stream reads the slot only after waiting on that event, and the copy
            // stream waited above for every earlier read. DeviceWaiting: no kernel in flight
            // reads the slot (the device waits for the host, which answers after the event).
            unsafe { upload_async(src, &slot.tensors[i], self.copy.raw)? };
            bytes += src.len() as u64;
        }
        let mut ptrs = [0u64; 3];
        for (p, t) in ptrs.iter_mut().zip(&slot.tensors) {
            *p = t.device_ptr()? as u64;
        }
        let n_expert = self.n_expert;
        let mirror = st.mirror.as_mut_slice().map_err(cuda_error)?;
        let mut changed = Vec::with_capacity(2);
        for (key, entry) in old
            .map(|k| (k, [0; 3]))
            .into_iter()
            .chain([((layer, e), ptrs)])
        {
            let at = (key.0 * n_expert + key.1) * 3;
            if key.0 < self.n_layer && key.1 < n_expert {
                mirror[at..at + 3].copy_from_slice(&entry);
                changed.push(at);
            }
        }
        for at in changed {
            let dst = self.table_ptr + (at * 8) as u64;
            // SAFETY: `at + 3 <= n_layer * n_expert * 3` (checked above), inside both the table
            // and the page-locked mirror; the mirror is changed again only under this lock after
            // `ready` below has completed.
            unsafe { result::memcpy_htod_async(dst, &mirror[at..at + 3], self.copy.raw) }
                .map_err(cuda_error)?;
        }
        let ready = record(&self.copy.stream)?;
        if order == Order::AfterIssued {
            self.compute.wait(&ready).map_err(cuda_error)?;
        }
        ready.synchronize().map_err(cuda_error)?;
        drop(data);
        slot.key = Some((layer, e));
        slot.last_use = tick;
        st.index.insert((layer, e), (kind, victim));
        st.stats.uploads += 1;
        st.stats.bytes_uploaded += bytes;
        self.make_weights(e, meta, &slot.tensors)
    }

    fn make_weights(
        &self,
        e: usize,
        meta: &[SliceMeta; 3],
        t: &[Arc<QTensor>; 3],
    ) -> Result<ExpertWeights> {
        let w = |i: usize| -> Result<Weight> {
            let m = &meta[i];
            let tier = Tier::Device {
                mm: QMatMul::from_arc(t[i].clone())?,
                q: None,
            };
            Ok(Weight::new(
                &format!("{}[{e}]", m.name),
                m.ty,
                m.shape.clone(),
                tier,
                &self.device,
            )
            .with_batch_math(crate::storage::BatchMath::Int8))
        };
        Ok(ExpertWeights {
            gate: w(0)?,
            up: w(1)?,
            down: w(2)?,
        })
    }
}
