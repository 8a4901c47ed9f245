//! The expert cache: a fixed number of slots, each holding one expert (its gate, up and down
//! slices), filled by direct-I/O reads on dedicated I/O threads.
//!
//! A forward pass calls [`ExpertCache::serve`] once per MoE layer with the router's choices.
//! Cached experts are handed to the compute at once; missing ones are read into slots freed by
//! the eviction policy (all of a step's slices together, those adjacent in the file merged into
//! one read: see [`super::reads`]), and handed over as each expert's reads complete. Then the
//! co-activation statistics predict the next layer's experts, and reads for the likeliest ones
//! that are not cached start while this layer computes (speculative prefetch). A slot in use by the compute (its data `Arc` held) is never evicted.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::coact::CoActivation;
use super::policy::{EvictionPolicy, ExpertKey, TraceEntry};
use super::reads::{self, Dest, ReadPart};
use super::stats::ExpertStats;
use crate::error::{Error, Result};
use crate::storage::aligned::AlignedBuf;
use crate::storage::direct::{DirectFile, DIRECT_IO_ALIGN};

/// Prefetch reads experts predicted at least this likely to be used by the next layer.
const PREFETCH_MIN_PROBABILITY: f64 = 0.5;

/// Where one of an expert tensor's slices lie: expert `e` is bytes
/// `offset + e * stride .. offset + (e + 1) * stride` of file `file`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SliceSpec {
    pub file: usize,
    pub offset: u64,
    pub stride: u64,
}

/// One cached expert's bytes: gate, up and down, each in its own aligned buffer.
pub struct ExpertData {
    pub(super) bufs: [AlignedBuf; 3],
    pub(super) ranges: [Range<usize>; 3],
}

impl ExpertData {
    /// The bytes of slice `which` (0 = gate, 1 = up, 2 = down).
    pub fn slice(&self, which: usize) -> &[u8] {
        &self.bufs[which].as_slice()[self.ranges[which].clone()]
    }
}

/// How the expert cache is run.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ExpertCacheConfig {
    /// Experts the cache holds.
    pub slots: usize,
    pub policy: EvictionPolicy,
    /// Speculative prefetch of the next layer's likeliest experts.
    pub prefetch: bool,
    /// Threads issuing reads (the queue depth the disk sees).
    pub io_threads: usize,
    /// GPU builds: experts held in device memory in front of this cache (0: none).
    pub device_slots: usize,
}

impl Default for ExpertCacheConfig {
    fn default() -> Self {
        ExpertCacheConfig {
            slots: 8,
            policy: EvictionPolicy::default(),
            prefetch: true,
            io_threads: 2,
            device_slots: 0,
        }
    }
}

pub(super) enum SlotData {
    Free([AlignedBuf; 3]),
    /// Being read: the slices read so far, with where their bytes lie.
    Loading(Box<Pending>),
    Ready(Arc<ExpertData>),
}

#[derive(Default)]
pub(super) struct Pending {
    pub(super) parts: [Option<(AlignedBuf, Range<usize>)>; 3],
    pub(super) error: Option<Error>,
}

/// A slot taken for an expert about to be read.
struct Claim {
    slot: usize,
    key: ExpertKey,
    bufs: [AlignedBuf; 3],
    prefetch: bool,
}

pub(super) struct Slot {
    pub(super) key: Option<ExpertKey>,
    pub(super) data: SlotData,
    last_use: u64,
}

pub(super) struct State {
    pub(super) slots: Vec<Slot>,
    /// Keys being read or ready → their slot.
    pub(super) index: HashMap<ExpertKey, usize>,
    /// Read errors, kept for the request that needs the expert.
    pub(super) failed: HashMap<ExpertKey, Error>,
    /// Prefetched experts not used yet.
    pub(super) prefetched: HashSet<ExpertKey>,
    freq: HashMap<ExpertKey, u64>,
    tick: u64,
    pub(super) stats: ExpertStats,
    learn: CoActivation,
    trace: Option<Vec<TraceEntry>>,
}

pub(super) struct Shared {
    state: Mutex<State>,
    pub(super) done: Condvar,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The expert cache of one model.
pub struct ExpertCache {
    /// GPU builds: the slot buffers' page-locked registrations (dropped before the buffers).
    #[cfg(feature = "cuda")]
    pins: Mutex<Vec<crate::storage::pinned::HostRegistration>>,
    config: ExpertCacheConfig,
    shared: Arc<Shared>,
    to_io: Mutex<Sender<Vec<Dest>>>,
    /// Per layer: the gate, up and down slices.
    layers: Mutex<HashMap<usize, [SliceSpec; 3]>>,
    n_expert: usize,
    n_expert_used: usize,
}

impl ExpertCache {
    /// Allocates `config.slots` slots for experts whose slices are at most `slice_bytes` long and
    /// starts the I/O threads.
    pub(crate) fn new(
        files: Vec<DirectFile>,
        config: ExpertCacheConfig,
        slice_bytes: [usize; 3],
        n_expert: usize,
        n_expert_used: usize,
    ) -> Result<Arc<Self>> {
        if config.slots == 0 {
            return Err(Error::InvalidRequest(
                "the expert cache needs at least one slot".into(),
            ));
        }
        let alloc = |len: usize| AlignedBuf::new(len + 2 * DIRECT_IO_ALIGN, DIRECT_IO_ALIGN);
        let slots = (0..config.slots)
            .map(|_| {
                Ok(Slot {
                    key: None,
                    data: SlotData::Free([
                        alloc(slice_bytes[0])?,
                        alloc(slice_bytes[1])?,
                        alloc(slice_bytes[2])?,
                    ]),
                    last_use: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                slots,
                index: HashMap::new(),
                failed: HashMap::new(),
                prefetched: HashSet::new(),
                freq: HashMap::new(),
                tick: 0,
                stats: ExpertStats::default(),
                learn: CoActivation::new(n_expert),
                trace: None,
            }),
            done: Condvar::new(),
        });
        let (to_io, rx) = channel::<Vec<Dest>>();
        let rx = Arc::new(Mutex::new(rx));
        let files = Arc::new(files);
        for i in 0..config.io_threads.max(1) {
            let (rx, files, shared) = (rx.clone(), files.clone(), shared.clone());
            std::thread::Builder::new()
                .name(format!("hypura-expert-io-{i}"))
                .spawn(move || reads::io_thread(&files, &rx, &shared))
                .map_err(|e| Error::InvalidRequest(format!("cannot start an I/O thread: {e}")))?;
        }
        Ok(Arc::new(ExpertCache {
            #[cfg(feature = "cuda")]
            pins: Mutex::new(Vec::new()),
            config,
            shared,
            to_io: Mutex::new(to_io),
            layers: Mutex::new(HashMap::new()),
            n_expert,
            n_expert_used,
        }))
    }

    /// GPU builds: registers the slot buffers as page-locked, so uploads from them to the device
    /// are asynchronous. Buffers being read are left pageable (still correct, slower).
    #[cfg(feature = "cuda")]
    pub fn pin_buffers(
        &self,
        ctx: &Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
    ) -> Result<()> {
        let st = self.shared.lock();
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        if !pins.is_empty() {
            return Ok(());
        }
        for slot in &st.slots {
            if let SlotData::Free(bufs) = &slot.data {
                for b in bufs {
                    let s = b.as_slice();
                    // SAFETY: slot buffers are never freed while the cache lives (they cycle
                    // between slots and reads), and `pins` drops with the cache, before the
                    // buffers, which the shared state and I/O threads release after it.
                    pins.push(unsafe {
                        crate::storage::pinned::HostRegistration::new(ctx, s.as_ptr(), s.len())?
                    });
                }
            }
        }
        Ok(())
    }

    pub fn config(&self) -> &ExpertCacheConfig {
        &self.config
    }

    pub fn stats(&self) -> ExpertStats {
        self.shared.lock().stats.clone()
    }

    /// Starts (or stops, with `false`) recording each layer's experts for policy comparisons.
    pub fn record_trace(&self, on: bool) {
        self.shared.lock().trace = on.then(Vec::new);
    }

    /// The recorded trace (see [`record_trace`](Self::record_trace)).
    pub fn trace(&self) -> Vec<TraceEntry> {
        self.shared.lock().trace.clone().unwrap_or_default()
    }

    /// The co-activation statistics learned so far.
    pub fn learned(&self) -> CoActivation {
        self.shared.lock().learn.clone()
    }

    /// Starts from statistics learned before (e.g. by an earlier run).
    pub fn set_learned(&self, c: CoActivation) {
        if c.n_expert == self.n_expert {
            self.shared.lock().learn = c;
        }
    }

    pub(crate) fn register_layer(&self, layer: usize, slices: [SliceSpec; 3]) {
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(layer, slices);
    }

    fn slices(&self, layer: usize) -> Result<[SliceSpec; 3]> {
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&layer)
            .copied()
            .ok_or_else(|| Error::InvalidRequest(format!("layer {layer} has no streamed experts")))
    }

    /// Hands each expert that `per_token` names (token `t` used `per_token[t]`) to `visit`
    /// once, cached ones first, the rest as their reads complete; then prefetches for the next
    /// layer. `visit` gets the expert's bytes, held (not evictable) while it runs.
    pub fn serve(
        &self,
        layer: usize,
        per_token: &[Vec<usize>],
        visit: &mut dyn FnMut(usize, Arc<ExpertData>) -> Result<()>,
    ) -> Result<()> {
        self.serve_some(layer, per_token, None, &|_| false, visit)
    }

    /// Learns and traces the routing `per_token` of `layer` that a cache above served entirely
    /// (nothing is fetched or counted here).
    pub fn observe(&self, layer: usize, per_token: &[Vec<usize>]) {
        let mut st = self.shared.lock();
        st.learn.observe(layer, per_token);
        if let Some(t) = &mut st.trace {
            let mut used: Vec<usize> = per_token.iter().flatten().copied().collect();
            used.sort_unstable();
            used.dedup();
            t.push(TraceEntry {
                layer,
                experts: used,
            });
        }
    }

    /// Like [`serve`](Self::serve), for a cache behind another one (the GPU's): the routing of
    /// `per_token` is learned and traced whole, but only the experts `want` names (all used ones
    /// if `None`) are fetched and visited, and prefetch skips experts `held_above` says the cache
    /// above already holds.
    pub fn serve_some(
        &self,
        layer: usize,
        per_token: &[Vec<usize>],
        want: Option<&[usize]>,
        held_above: &dyn Fn(ExpertKey) -> bool,
        visit: &mut dyn FnMut(usize, Arc<ExpertData>) -> Result<()>,
    ) -> Result<()> {
        let mut used: Vec<usize> = per_token.iter().flatten().copied().collect();
        used.sort_unstable();
        used.dedup();
        if let Some(&bad) = used.iter().find(|&&e| e >= self.n_expert) {
            return Err(Error::InvalidRequest(format!(
                "expert {bad} of {} routed at layer {layer}",
                self.n_expert
            )));
        }
        let slices = self.slices(layer)?;
        let mut st = self.shared.lock();
        st.tick += 1;
        st.learn.observe(layer, per_token);
        if let Some(t) = &mut st.trace {
            t.push(TraceEntry {
                layer,
                experts: used.clone(),
            });
        }
        if let Some(want) = want {
            used.retain(|e| want.contains(e));
        }
        let keys: Vec<ExpertKey> = used.iter().map(|&e| (layer, e)).collect();
        st.stats.requests += keys.len() as u64;
        let mut claims = Vec::new();
        for &key in &keys {
            *st.freq.entry(key).or_insert(0) += 1;
            if st.prefetched.remove(&key) {
                st.stats.prefetch_used += 1;
            }
            let ready = st
                .index
                .get(&key)
                .map(|&s| matches!(st.slots[s].data, SlotData::Ready(_)));
            match ready {
                Some(true) => st.stats.hits += 1,
                Some(false) => st.stats.in_flight += 1,
                None => {
                    st.stats.misses += 1;
                    claims.extend(self.claim(&mut st, key, &keys, false));
                }
            }
        }
        self.dispatch(&mut st, &slices, claims);
        if self.config.prefetch && self.config.slots > keys.len() {
            self.prefetch(&mut st, layer, per_token, &keys, held_above);
        }
        let mut todo = keys;
        while !todo.is_empty() {
            let ready = todo.iter().position(|k| {
                matches!(
                    st.index.get(k).map(|&s| &st.slots[s].data),
                    Some(SlotData::Ready(_))
                )
            });
            if let Some(pos) = ready {
                let key = todo.remove(pos);
                let s = st.index[&key];
                let tick = st.tick;
                st.slots[s].last_use = tick;
                let SlotData::Ready(data) = &st.slots[s].data else {
                    unreachable!("checked Ready above")
                };
                let data = data.clone();
                drop(st);
                visit(key.1, data)?;
                st = self.shared.lock();
                continue;
            }
            // Nothing ready: make sure every remaining expert is being read, then wait.
            let mut loading = false;
            let mut claims = Vec::new();
            for &key in &todo {
                if st.index.contains_key(&key) {
                    loading = true;
                } else if let Some(e) = st.failed.remove(&key) {
                    return Err(e);
                } else if let Some(c) = self.claim(&mut st, key, &todo, false) {
                    claims.push(c);
                    loading = true;
                }
            }
            self.dispatch(&mut st, &slices, claims);
            if !loading
                && !st
                    .slots
                    .iter()
                    .any(|s| matches!(s.data, SlotData::Loading(_)))
            {
                return Err(Error::InvalidRequest(format!(
                    "expert cache: no slot free for layer {layer} (all {} held)",
                    st.slots.len()
                )));
            }
            let start = Instant::now();
            st = self.shared.done.wait(st).unwrap_or_else(|p| p.into_inner());
            st.stats.stall += start.elapsed();
        }
        Ok(())
    }

    /// Starts reading the likeliest experts of the next layer that are not cached, into slots
    /// whose experts are worth less (by the policy) than the prediction.
    fn prefetch(
        &self,
        st: &mut State,
        layer: usize,
        per_token: &[Vec<usize>],
        current: &[ExpertKey],
        held_above: &dyn Fn(ExpertKey) -> bool,
    ) {
        let n_layers = self.layers.lock().unwrap_or_else(|p| p.into_inner()).len();
        let next = if layer + 1 < n_layers { layer + 1 } else { 0 };
        let Ok(slices) = self.slices(next) else {
            return;
        };
        let width = (self.n_expert_used * per_token.len()).min(self.n_expert);
        // Only experts likely enough to be used are worth a read and an eviction.
        let predicted: Vec<ExpertKey> = st
            .learn
            .predict(next, per_token, width)
            .into_iter()
            .filter(|&(_, p)| p >= PREFETCH_MIN_PROBABILITY)
            .map(|(e, _)| (next, e))
            .filter(|&k| !held_above(k))
            .collect();
        let mut protect: Vec<ExpertKey> = current.to_vec();
        protect.extend(&predicted);
        let mut claims = Vec::new();
        for key in predicted {
            if st.index.contains_key(&key) {
                continue;
            }
            match self.claim(st, key, &protect, true) {
                Some(c) => claims.push(c),
                None => break,
            }
        }
        self.dispatch(st, &slices, claims);
    }

    /// Takes a free slot for `key`, or one evicted by the policy (never one of `protect`, one
    /// being read, or one in use), and marks it loading; [`dispatch`](Self::dispatch) then reads
    /// it. `None` if no slot could be had.
    fn claim(
        &self,
        st: &mut State,
        key: ExpertKey,
        protect: &[ExpertKey],
        prefetch: bool,
    ) -> Option<Claim> {
        let policy = self.config.policy;
        let victim = st
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match &s.data {
                SlotData::Free(_) => Some((i, (0, 0))),
                SlotData::Ready(d) if Arc::strong_count(d) == 1 => {
                    let k = s.key?;
                    if protect.contains(&k) {
                        return None;
                    }
                    let rank =
                        policy.victim_rank(st.freq.get(&k).copied().unwrap_or(0), s.last_use);
                    Some((i, rank))
                }
                _ => None,
            })
            .min_by_key(|&(i, rank)| (rank, i))
            .map(|(i, _)| i)?;
        let s = victim;
        let loading = SlotData::Loading(Box::default());
        let bufs = match std::mem::replace(&mut st.slots[s].data, loading) {
            SlotData::Free(b) => b,
            SlotData::Ready(d) => match Arc::try_unwrap(d) {
                Ok(d) => d.bufs,
                Err(d) => {
                    // Not reachable: strong_count was 1 under the lock, and clones are only made
                    // under it. Put it back rather than lose it.
                    st.slots[s].data = SlotData::Ready(d);
                    return None;
                }
            },
            SlotData::Loading(_) => unreachable!("filtered out above"),
        };
        if let Some(old) = st.slots[s].key.take() {
            st.index.remove(&old);
            st.prefetched.remove(&old);
        }
        st.slots[s].key = Some(key);
        st.index.insert(key, s);
        st.failed.remove(&key);
        if prefetch {
            st.prefetched.insert(key);
            st.stats.prefetch_issued += 1;
        }
        Some(Claim {
            slot: s,
            key,
            bufs,
            prefetch,
        })
    }

    /// Sends the reads of the claimed experts (of one layer, whose slices are `slices`) to the
    /// I/O threads: slices adjacent in the file are merged into one read.
    fn dispatch(&self, st: &mut State, slices: &[SliceSpec; 3], claims: Vec<Claim>) {
        let mut dests = Vec::with_capacity(3 * claims.len());
        for (rank, c) in claims.into_iter().enumerate() {
            for (which, buf) in c.bufs.into_iter().enumerate() {
                let sl = slices[which];
                let part = ReadPart {
                    file: sl.file,
                    offset: sl.offset + c.key.1 as u64 * sl.stride,
                    len: sl.stride as usize,
                    capacity: buf.len(),
                };
                dests.push(Dest {
                    slot: c.slot,
                    key: c.key,
                    which,
                    part,
                    buf,
                    prefetch: c.prefetch,
                    rank,
                });
            }
        }
        for job in reads::jobs(dests) {
            let sent = self
                .to_io
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(job);
            if let Err(std::sync::mpsc::SendError(job)) = sent {
                // The I/O threads are gone: record the failure for whoever needs these experts.
                let e = || Error::InvalidRequest("the expert I/O threads stopped".into());
                reads::complete(st, job, Err(e()));
            }
        }
    }
}
