//! How the expert cache reads. A missing expert is three slices (gate, up, down) of three
//! tensors. The slices of all the experts one step needs are sorted by file offset, and slices
//! that lie back to back become **one read**: one `preadv` straight into the slots' buffers (no
//! copy). Experts adjacent in the file — e.g. after `hypura optimize` put co-activated experts
//! side by side and aligned the tensors to blocks — cost one read per tensor instead of one each.
//! Each read is one job for the I/O threads, so one expert's three slices are read in parallel;
//! when a job completes, its buffers go back to their slots ([`complete`]).

use std::ops::Range;
use std::time::{Duration, Instant};

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use super::cache::{ExpertData, Shared, SlotData, State};
use super::policy::ExpertKey;
use crate::error::{Error, Result};
use crate::storage::aligned::AlignedBuf;
use crate::storage::direct::{scatter_follows, DirectFile};

/// Merged reads stop growing past this many bytes, or two slices where slices are larger: a
/// larger read makes the compute wait longer for its first expert (prompt batches need every
/// expert of a layer: its slices come in several reads, so the first experts are computed while
/// the rest is read), and reads of a few MiB already run at the disk's full speed.
pub const MAX_READ_BYTES: usize = 8 << 20;
/// Most slices one read may gather.
pub const MAX_READ_PARTS: usize = 64;

/// A stretch of file `file` to read into a buffer of `capacity` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadPart {
    pub file: usize,
    pub offset: u64,
    pub len: usize,
    pub capacity: usize,
}

/// Sorts `parts` by file and offset and groups them into reads: each returned range of the
/// sorted `parts` is one request (parts that follow each other closely enough for one scatter
/// read, see [`scatter_follows`], up to [`MAX_READ_BYTES`] or two parts, and [`MAX_READ_PARTS`]).
pub fn merged_reads(parts: &mut [ReadPart]) -> Vec<Range<usize>> {
    parts.sort_by_key(|p| (p.file, p.offset));
    let largest = parts.iter().map(|p| p.len).max().unwrap_or(0);
    let max_bytes = MAX_READ_BYTES.max(2 * largest);
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for i in 0..parts.len() {
        if i > start {
            let (prev, p) = (parts[i - 1], parts[i]);
            let joins = p.file == prev.file
                && i - start < MAX_READ_PARTS
                && bytes + p.len <= max_bytes
                && scatter_follows(prev.offset, prev.len, prev.capacity, p.offset);
            if !joins {
                runs.push(start..i);
                (start, bytes) = (i, 0);
            }
        }
        bytes += parts[i].len;
    }
    if start < parts.len() {
        runs.push(start..parts.len());
    }
    runs
}

/// One slice of one expert being read into its slot: buffer `which` (0 gate, 1 up, 2 down).
pub(super) struct Dest {
    pub slot: usize,
    pub key: ExpertKey,
    pub which: usize,
    pub part: ReadPart,
    pub buf: AlignedBuf,
    pub prefetch: bool,
    /// The expert's place in the order it was asked for (0 = needed first).
    pub rank: usize,
}

/// Groups slices into jobs, one read each (see [`merged_reads`]), in the order that completes
/// the experts asked for first soonest (by the first-ranked expert each job serves, then gate,
/// up, down).
pub(super) fn jobs(mut dests: Vec<Dest>) -> Vec<Vec<Dest>> {
    dests.sort_by_key(|d| (d.part.file, d.part.offset));
    let mut parts: Vec<ReadPart> = dests.iter().map(|d| d.part).collect();
    let runs = merged_reads(&mut parts);
    let mut out: Vec<Vec<Dest>> = Vec::with_capacity(runs.len());
    let mut rest = dests.into_iter();
    for r in runs {
        out.push(rest.by_ref().take(r.len()).collect());
    }
    out.sort_by_key(|job| {
        job.iter()
            .map(|d| (d.rank, d.which))
            .min()
            .unwrap_or((usize::MAX, 0))
    });
    out
}

/// Reads one job: a single slice with a plain read, several with one scatter read. Returns where
/// each slice lies in its buffer, and the time the read took.
pub(super) fn perform(
    files: &[DirectFile],
    job: &mut [Dest],
) -> (Result<Vec<Range<usize>>>, Duration) {
    let start = Instant::now();
    let file = job.first().map_or(0, |d| d.part.file);
    let r = match files.get(file) {
        None => Err(Error::InvalidRequest(format!(
            "expert slice in file {file}"
        ))),
        Some(f) => match job {
            [d] => f
                .read_at(d.part.offset, d.part.len, &mut d.buf)
                .map(|r| vec![r]),
            _ => {
                let parts: Vec<(u64, usize)> =
                    job.iter().map(|d| (d.part.offset, d.part.len)).collect();
                let mut bufs: Vec<&mut AlignedBuf> = job.iter_mut().map(|d| &mut d.buf).collect();
                f.read_scatter_at(&parts, &mut bufs)
            }
        },
    };
    (r, start.elapsed())
}

/// Hands the buffers of a finished read back to their slots; an expert whose three slices are
/// all back becomes ready (or, if a read failed, its slot is freed and the error kept).
pub(super) fn complete(st: &mut State, job: Vec<Dest>, result: Result<Vec<Range<usize>>>) {
    let (ranges, error) = match result {
        Ok(r) => (r, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    if error.is_none() {
        let bytes: u64 = job.iter().map(|d| d.part.len as u64).sum();
        let prefetch: u64 = job
            .iter()
            .filter(|d| d.prefetch)
            .map(|d| d.part.len as u64)
            .sum();
        st.stats.bytes_read += bytes;
        st.stats.prefetch_bytes += prefetch;
        st.stats.reads += 1;
    }
    for (i, d) in job.into_iter().enumerate() {
        let slot = &mut st.slots[d.slot];
        let SlotData::Loading(p) = &mut slot.data else {
            continue; // not reachable: a loading slot is never evicted
        };
        match (&error, ranges.get(i)) {
            (None, Some(r)) => p.parts[d.which] = Some((d.buf, r.clone())),
            _ => {
                p.parts[d.which] = Some((d.buf, 0..0));
                let why = error.clone().unwrap_or_else(|| "scatter read".into());
                p.error.get_or_insert(Error::InvalidRequest(format!(
                    "reading expert {} of layer {}: {why}",
                    d.key.1, d.key.0
                )));
            }
        }
        if p.parts.iter().all(Option::is_some) {
            let error = p.error.take();
            let [Some(g), Some(u), Some(dn)] = std::mem::take(&mut p.parts) else {
                continue; // checked just above
            };
            let (bufs, ranges) = ([g.0, u.0, dn.0], [g.1, u.1, dn.1]);
            match error {
                None => slot.data = SlotData::Ready(Arc::new(ExpertData { bufs, ranges })),
                Some(e) => {
                    slot.data = SlotData::Free(bufs);
                    slot.key = None;
                    st.index.remove(&d.key);
                    st.prefetched.remove(&d.key);
                    st.failed.insert(d.key, e);
                }
            }
        }
    }
}

pub(super) fn io_thread(files: &[DirectFile], rx: &Mutex<Receiver<Vec<Dest>>>, shared: &Shared) {
    loop {
        let mut job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let (result, elapsed) = perform(files, &mut job);
        let mut st = shared.lock();
        st.stats.io_busy += elapsed;
        complete(&mut st, job, result);
        drop(st);
        shared.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(file: usize, offset: u64, len: usize) -> ReadPart {
        ReadPart {
            file,
            offset,
            len,
            capacity: len + 2 * 4096,
        }
    }

    #[test]
    fn adjacent_aligned_slices_merge_and_others_do_not() {
        // Three experts' gate slices (64 KiB, aligned) of one tensor, two of them adjacent, plus
        // an up slice right after the tensor (aligned start) and one in another file.
        let s = 64 << 10;
        let mut parts = vec![
            part(0, 3 * s as u64, s),
            part(0, 0, s),
            part(0, s as u64, s),
            part(1, s as u64, s),
            part(0, 4 * s as u64 + 4096, s), // after a block of padding
        ];
        let runs = merged_reads(&mut parts);
        let offsets: Vec<Vec<u64>> = runs
            .iter()
            .map(|r| parts[r.clone()].iter().map(|p| p.offset).collect())
            .collect();
        let s = s as u64;
        assert_eq!(
            offsets,
            vec![vec![0, s], vec![3 * s, 4 * s + 4096], vec![s]],
            "{parts:?}"
        );
    }

    #[test]
    fn slices_sharing_a_block_are_read_apart() {
        // 32-byte aligned tensors (GGUF's default): the boundary between two experts falls
        // inside a block, which one scatter read cannot split between two buffers.
        let mut parts = vec![part(0, 96, 10_000), part(0, 10_096, 10_000)];
        assert_eq!(merged_reads(&mut parts).len(), 2);
        // A gap of more than one block is not read through.
        let mut parts = vec![part(0, 0, 8192), part(0, 8192 + 8192, 8192)];
        assert_eq!(merged_reads(&mut parts).len(), 2);
    }

    #[test]
    fn reads_are_capped() {
        let s = 64 << 10;
        let mut parts: Vec<ReadPart> = (0..MAX_READ_PARTS as u64 + 1)
            .map(|i| part(0, i * s as u64, s))
            .collect();
        let runs = merged_reads(&mut parts);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].len(), MAX_READ_PARTS);
        // 1 MiB slices: MAX_READ_BYTES worth per read.
        let s = 1 << 20;
        let mut parts: Vec<ReadPart> = (0..40u64).map(|i| part(0, i * s as u64, s)).collect();
        let runs = merged_reads(&mut parts);
        assert!(
            runs.iter().all(|r| r.len() * s <= MAX_READ_BYTES),
            "{runs:?}"
        );
        assert_eq!(runs.len(), 40usize.div_ceil(MAX_READ_BYTES / s));
        // Slices larger than half the cap still merge in twos.
        let big = MAX_READ_BYTES;
        let mut parts: Vec<ReadPart> = (0..5u64).map(|i| part(0, i * big as u64, big)).collect();
        let runs: Vec<usize> = merged_reads(&mut parts).iter().map(|r| r.len()).collect();
        assert_eq!(runs, vec![2, 2, 1]);
    }
}
