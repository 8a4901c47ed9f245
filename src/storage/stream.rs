//! Streaming weights from disk: a pool of aligned buffers, one I/O thread reading with direct I/O,
//! and a prefetcher that keeps the next `lookahead` groups in flight.
//!
//! A *group* is a byte range of one file read in one request — typically the streamed tensors of
//! one layer, merged because they lie together. Groups are used in a fixed cyclic order (layer
//! 0, 1, …, last, then layer 0 for the next token). Acquiring group `g` retires the group used
//! before it, hands its buffer to the I/O thread for group `g + lookahead`, and waits for `g`
//! only if its read has not finished (that wait is the stall the statistics report).

use std::collections::HashMap;
use std::ops::{Deref, Range};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::aligned::AlignedBuf;
use super::direct::{DirectFile, DIRECT_IO_ALIGN};
use crate::error::{Error, Result};

/// I/O threads of the stream pool: the queue depth its reads see.
pub const STREAM_IO_THREADS: usize = 1;

/// One read: `len` bytes at `offset` of file `file`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StreamGroup {
    pub file: usize,
    pub offset: u64,
    pub len: usize,
}

/// A group's bytes, in a pool buffer. Dropping every `Slab` of a group lets its buffer be reused.
pub struct Slab {
    buf: AlignedBuf,
    range: Range<usize>,
}

impl Deref for Slab {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf.as_slice()[self.range.clone()]
    }
}

/// What streaming cost so far.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StreamStats {
    pub bytes_read: u64,
    pub reads: u64,
    /// Time the compute side waited for reads.
    pub stall: Duration,
    /// Time the I/O thread spent in reads.
    pub io_busy: Duration,
}

struct Request {
    group: usize,
    buf: AlignedBuf,
}

struct Response {
    group: usize,
    result: std::result::Result<(AlignedBuf, Range<usize>), (AlignedBuf, Error)>,
    elapsed: Duration,
}

struct State {
    free: Vec<AlignedBuf>,
    ready: HashMap<usize, Arc<Slab>>,
    in_flight: Vec<usize>,
    current: Option<(usize, Arc<Slab>)>,
    stats: StreamStats,
    /// Buffers of retired groups still borrowed by a caller.
    lent: Vec<Arc<Slab>>,
}

/// The streaming engine for one model.
pub struct Streamer {
    /// GPU builds: the pool buffers' page-locked registrations (dropped before the buffers).
    #[cfg(feature = "cuda")]
    pins: Mutex<Vec<super::pinned::HostRegistration>>,
    groups: Vec<StreamGroup>,
    lookahead: usize,
    to_io: Mutex<Sender<Request>>,
    from_io: Mutex<Receiver<Response>>,
    state: Mutex<State>,
}

impl Streamer {
    /// Starts the I/O thread. `lookahead` groups are kept in flight ahead of the one in use; the
    /// pool holds `slots` buffers (at least `lookahead + 1`), each as large as the largest group.
    pub fn new(
        paths: &[PathBuf],
        groups: Vec<StreamGroup>,
        lookahead: usize,
        slots: usize,
    ) -> Result<Arc<Self>> {
        let lookahead = lookahead.clamp(1, groups.len().max(1));
        let files = paths
            .iter()
            .map(|p| DirectFile::open(p))
            .collect::<Result<Vec<_>>>()?;
        for g in &groups {
            let f = files.get(g.file).ok_or_else(|| {
                Error::InvalidRequest(format!("stream group names file {}", g.file))
            })?;
            if g.offset + g.len as u64 > f.size() {
                return Err(Error::InvalidRequest(format!(
                    "{}: stream group runs past the end",
                    f.path().display()
                )));
            }
        }
        let slot_bytes = groups
            .iter()
            .map(|g| DirectFile::buffer_len_for(g.offset, g.len))
            .max()
            .unwrap_or(DIRECT_IO_ALIGN);
        let free = (0..slots.max(lookahead + 1))
            .map(|_| AlignedBuf::new(slot_bytes, DIRECT_IO_ALIGN))
            .collect::<Result<Vec<_>>>()?;
        let (to_io, io_rx) = channel::<Request>();
        let (io_tx, from_io) = channel::<Response>();
        let io_groups = groups.clone();
        std::thread::Builder::new()
            .name("hypura-io".into())
            .spawn(move || io_thread(files, io_groups, io_rx, io_tx))
            .map_err(|e| Error::InvalidRequest(format!("cannot start the I/O thread: {e}")))?;
        Ok(Arc::new(Streamer {
            #[cfg(feature = "cuda")]
            pins: Mutex::new(Vec::new()),
            groups,
            lookahead,
            to_io: Mutex::new(to_io),
            from_io: Mutex::new(from_io),
            state: Mutex::new(State {
                free,
                ready: HashMap::new(),
                in_flight: Vec::new(),
                current: None,
                stats: StreamStats::default(),
                lent: Vec::new(),
            }),
        }))
    }

    /// GPU builds: registers the pool's buffers as page-locked, so uploads from them to the
    /// device are asynchronous. Buffers in flight are left pageable (still correct, slower).
    #[cfg(feature = "cuda")]
    pub fn pin_pool(
        &self,
        ctx: &Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
    ) -> Result<()> {
        let st = self.lock();
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        if !pins.is_empty() {
            return Ok(());
        }
        for b in &st.free {
            let s = b.as_slice();
            // SAFETY: pool buffers live as long as the streamer, and `pins` is declared before
            // `state`, so every registration is dropped before the buffers are freed.
            pins.push(unsafe { super::pinned::HostRegistration::new(ctx, s.as_ptr(), s.len())? });
        }
        Ok(())
    }

    pub fn groups(&self) -> &[StreamGroup] {
        &self.groups
    }

    pub fn lookahead(&self) -> usize {
        self.lookahead
    }

    pub fn stats(&self) -> StreamStats {
        self.lock().stats.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bytes of group `g`, read ahead if the order was followed, else now.
    pub fn acquire(&self, g: usize) -> Result<Arc<Slab>> {
        if g >= self.groups.len() {
            return Err(Error::InvalidRequest(format!(
                "stream group {g} of {}",
                self.groups.len()
            )));
        }
        let mut st = self.lock();
        if let Some((cur, slab)) = &st.current {
            if *cur == g {
                return Ok(slab.clone());
            }
        }
        // Retire the group in use: its buffer returns to the pool once no caller holds it.
        if let Some((_, slab)) = st.current.take() {
            st.lent.push(slab);
        }
        reclaim(&mut st);
        // Keep g and the next `lookahead` groups requested.
        let n = self.groups.len();
        let window: Vec<usize> = (0..=self.lookahead.min(n - 1))
            .map(|i| (g + i) % n)
            .collect();
        // Read-ahead that fell outside the window (the order changed, e.g. a reset) is dropped.
        let stale: Vec<usize> = st
            .ready
            .keys()
            .copied()
            .filter(|k| !window.contains(k))
            .collect();
        for k in stale {
            if let Some(slab) = st.ready.remove(&k) {
                st.lent.push(slab);
            }
        }
        reclaim(&mut st);
        for &want in &window {
            if st.ready.contains_key(&want) || st.in_flight.contains(&want) {
                continue;
            }
            let Some(buf) = st.free.pop() else { break };
            st.in_flight.push(want);
            self.send(Request { group: want, buf })?;
        }
        // Wait for g.
        let start = Instant::now();
        while !st.ready.contains_key(&g) {
            if !st.in_flight.contains(&g) {
                // No buffer was free for it (callers hold slabs): wait for any read, then retry.
                if st.in_flight.is_empty() {
                    reclaim(&mut st);
                    let buf = st.free.pop().ok_or_else(|| {
                        Error::InvalidRequest(
                            "stream pool exhausted: every buffer is held by a caller".into(),
                        )
                    })?;
                    st.in_flight.push(g);
                    self.send(Request { group: g, buf })?;
                }
            }
            drop(st);
            let resp = self
                .from_io
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .recv()
                .map_err(|_| Error::InvalidRequest("the I/O thread stopped".into()))?;
            st = self.lock();
            st.in_flight.retain(|&x| x != resp.group);
            st.stats.io_busy += resp.elapsed;
            match resp.result {
                Ok((buf, range)) => {
                    st.stats.bytes_read += self.groups[resp.group].len as u64;
                    st.stats.reads += 1;
                    st.ready.insert(resp.group, Arc::new(Slab { buf, range }));
                }
                Err((buf, e)) => {
                    st.free.push(buf);
                    if resp.group == g {
                        return Err(e);
                    }
                }
            }
        }
        st.stats.stall += start.elapsed();
        let slab = st
            .ready
            .remove(&g)
            .ok_or_else(|| Error::InvalidRequest("stream state".into()))?;
        st.current = Some((g, slab.clone()));
        Ok(slab)
    }

    fn send(&self, r: Request) -> Result<()> {
        self.to_io
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(r)
            .map_err(|_| Error::InvalidRequest("the I/O thread stopped".into()))
    }
}

/// Moves buffers of retired slabs that no caller holds any more back to the free list.
fn reclaim(st: &mut State) {
    let lent = std::mem::take(&mut st.lent);
    for slab in lent {
        match Arc::try_unwrap(slab) {
            Ok(s) => st.free.push(s.buf),
            Err(still_held) => st.lent.push(still_held),
        }
    }
}

fn io_thread(
    files: Vec<DirectFile>,
    groups: Vec<StreamGroup>,
    rx: Receiver<Request>,
    tx: Sender<Response>,
) {
    for Request { group, mut buf } in rx {
        let g = &groups[group];
        let start = Instant::now();
        let result = match files[g.file].read_at(g.offset, g.len, &mut buf) {
            Ok(range) => Ok((buf, range)),
            Err(e) => Err((buf, e)),
        };
        if tx
            .send(Response {
                group,
                result,
                elapsed: start.elapsed(),
            })
            .is_err()
        {
            return;
        }
    }
}
