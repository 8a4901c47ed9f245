//! The expert cache: a fixed number of slots, each holding one expert (its gate, up and down
//! slices), filled by direct-I/O reads on dedicated I/O threads.
//!
//! A forward pass calls [`ExpertCache::serve`] once per MoE layer with the router's choices.
//! Cached experts are handed to the compute at once; missing ones are read (in parallel, one
//! request per slice) into slots freed by the eviction policy, and handed over as each read
//! completes. Then the co-activation statistics predict the next layer's experts, and reads for
//! the likeliest ones that are not cached start while this layer computes (speculative
//! prefetch). A slot in use by the compute (its data `Arc` held) is never evicted.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::coact::CoActivation;
use super::policy::{EvictionPolicy, ExpertKey, TraceEntry};
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
    bufs: [AlignedBuf; 3],
    ranges: [Range<usize>; 3],
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

enum SlotData {
    Free([AlignedBuf; 3]),
    Loading,
    Ready(Arc<ExpertData>),
}

struct Slot {
    key: Option<ExpertKey>,
    data: SlotData,
    last_use: u64,
}

struct State {
    slots: Vec<Slot>,
    /// Keys being read or ready → their slot.
    index: HashMap<ExpertKey, usize>,
    /// Read errors, kept for the request that needs the expert.
    failed: HashMap<ExpertKey, Error>,
    /// Prefetched experts not used yet.
    prefetched: HashSet<ExpertKey>,
    freq: HashMap<ExpertKey, u64>,
    tick: u64,
    stats: ExpertStats,
    learn: CoActivation,
    trace: Option<Vec<TraceEntry>>,
}

struct Shared {
    state: Mutex<State>,
    done: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Request {
    slot: usize,
    key: ExpertKey,
    bufs: [AlignedBuf; 3],
    reads: [(usize, u64, usize); 3],
    prefetch: bool,
}

/// The expert cache of one model.
pub struct ExpertCache {
    /// GPU builds: the slot buffers' page-locked registrations (dropped before the buffers).
    #[cfg(feature = "cuda")]
    pins: Mutex<Vec<crate::storage::pinned::HostRegistration>>,
    config: ExpertCacheConfig,
    shared: Arc<Shared>,
    to_io: Mutex<Sender<Request>>,
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
        let (to_io, rx) = channel::<Request>();
        let rx = Arc::new(Mutex::new(rx));
        let files = Arc::new(files);
        for i in 0..config.io_threads.max(1) {
            let (rx, files, shared) = (rx.clone(), files.clone(), shared.clone());
            std::thread::Builder::new()
                .name(format!("hypura-expert-io-{i}"))
                .spawn(move || io_thread(&files, &rx, &shared))
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
                    self.issue(&mut st, key, &slices, &keys, false);
                }
            }
        }
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
            for &key in &todo {
                if st.index.contains_key(&key) {
                    loading = true;
                } else if let Some(e) = st.failed.remove(&key) {
                    return Err(e);
                } else {
                    loading |= self.issue(&mut st, key, &slices, &todo, false);
                }
            }
            if !loading && !st.slots.iter().any(|s| matches!(s.data, SlotData::Loading)) {
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
        for key in predicted {
            if st.index.contains_key(&key) {
                continue;
            }
            if !self.issue(st, key, &slices, &protect, true) {
                break;
            }
        }
    }

    /// Starts reading `key` into a free slot or one evicted by the policy (never one of
    /// `protect`, one being read, or one in use). A prefetch only evicts experts the policy
    /// values less than the one predicted. `false` if no slot could be had.
    fn issue(
        &self,
        st: &mut State,
        key: ExpertKey,
        slices: &[SliceSpec; 3],
        protect: &[ExpertKey],
        prefetch: bool,
    ) -> bool {
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
            .map(|(i, _)| i);
        let Some(s) = victim else {
            return false;
        };
        let bufs = match std::mem::replace(&mut st.slots[s].data, SlotData::Loading) {
            SlotData::Free(b) => b,
            SlotData::Ready(d) => match Arc::try_unwrap(d) {
                Ok(d) => d.bufs,
                Err(d) => {
                    // Not reachable: strong_count was 1 under the lock, and clones are only made
                    // under it. Put it back rather than lose it.
                    st.slots[s].data = SlotData::Ready(d);
                    return false;
                }
            },
            SlotData::Loading => unreachable!("filtered out above"),
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
        let reads = [0, 1, 2].map(|i| {
            let sl = slices[i];
            (
                sl.file,
                sl.offset + key.1 as u64 * sl.stride,
                sl.stride as usize,
            )
        });
        let sent = self
            .to_io
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Request {
                slot: s,
                key,
                bufs,
                reads,
                prefetch,
            });
        if let Err(std::sync::mpsc::SendError(r)) = sent {
            // The I/O threads are gone: record the failure for whoever needs this expert.
            st.slots[s].data = SlotData::Free(r.bufs);
            st.slots[s].key = None;
            st.index.remove(&key);
            st.failed.insert(
                key,
                Error::InvalidRequest("the expert I/O threads stopped".into()),
            );
        }
        true
    }
}

fn io_thread(files: &[DirectFile], rx: &Mutex<Receiver<Request>>, shared: &Shared) {
    loop {
        let req = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(r) => r,
            Err(_) => return,
        };
        let Request {
            slot,
            key,
            mut bufs,
            reads,
            prefetch,
        } = req;
        let start = Instant::now();
        let mut ranges = [0..0, 0..0, 0..0];
        let mut error = None;
        for i in 0..3 {
            let (file, offset, len) = reads[i];
            let r = match files.get(file) {
                Some(f) => f.read_at(offset, len, &mut bufs[i]),
                None => Err(Error::InvalidRequest(format!(
                    "expert slice in file {file}"
                ))),
            };
            match r {
                Ok(r) => ranges[i] = r,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let elapsed = start.elapsed();
        let bytes: u64 = reads.iter().map(|r| r.2 as u64).sum();
        let mut st = shared.lock();
        st.stats.io_busy += elapsed;
        match error {
            None => {
                st.stats.bytes_read += bytes;
                st.stats.reads += 3;
                if prefetch {
                    st.stats.prefetch_bytes += bytes;
                }
                st.slots[slot].data = SlotData::Ready(Arc::new(ExpertData { bufs, ranges }));
            }
            Some(e) => {
                st.slots[slot].data = SlotData::Free(bufs);
                st.slots[slot].key = None;
                st.index.remove(&key);
                st.prefetched.remove(&key);
                st.failed.insert(key, e);
            }
        }
        drop(st);
        shared.done.notify_all();
    }
}
