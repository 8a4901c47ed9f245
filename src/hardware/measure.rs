//! Bandwidth measurements: direct-I/O reads of a file, and memory reads.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::storage::{AlignedBuf, DirectFile, ReadMode, DIRECT_IO_ALIGN};

/// One disk measurement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskSample {
    pub request_bytes: usize,
    /// Concurrent readers.
    pub queue_depth: usize,
    pub bytes_per_s: f64,
}

/// Most bytes read per disk sample, and longest time spent on one.
const SAMPLE_BYTES: u64 = 256 << 20;
const SAMPLE_TIME: Duration = Duration::from_millis(700);

/// Sequential direct-I/O read bandwidth of `file` at a few request sizes and queue depths.
/// Returns whether reads were direct, and the samples. Reads stay inside the file.
pub fn measure_disk(file: &Path, progress: bool) -> Result<(bool, Vec<DiskSample>)> {
    let f = DirectFile::open(file)?;
    let direct = f.mode() == ReadMode::Direct;
    let configs = [
        (1usize << 20, 1usize),
        (4 << 20, 1),
        (16 << 20, 1),
        (4 << 20, 4),
    ];
    let bar = progress.then(|| bar(configs.len() as u64, "measuring disk reads"));
    let mut samples = Vec::new();
    for (i, &(req, qd)) in configs.iter().enumerate() {
        let size = f.size();
        if size < req as u64 {
            continue;
        }
        // Each reader walks its own stretch of the file; stretches start at different places
        // for different samples so a cache in front of the disk helps as little as possible.
        let stretch = (size / qd as u64).max(req as u64);
        let per_reader = (SAMPLE_BYTES / qd as u64 / req as u64).max(1);
        let bases: Vec<u64> = (0..qd as u64)
            .map(|r| {
                let base = (r * stretch + ((i as u64 * 97) << 20))
                    % size.saturating_sub(req as u64).max(1);
                base / DIRECT_IO_ALIGN as u64 * DIRECT_IO_ALIGN as u64
            })
            .collect();
        // Interleaved, so that with `qd` readers taking reads in turn each walks its stretch.
        let reads: Vec<ReadSpec> = (0..per_reader)
            .flat_map(|j| {
                bases.iter().map(move |&b| {
                    let mut off = b + j * req as u64;
                    if off + req as u64 > size {
                        off %= size - req as u64 + 1;
                        off = off / DIRECT_IO_ALIGN as u64 * DIRECT_IO_ALIGN as u64;
                    }
                    ReadSpec {
                        offset: off,
                        len: req,
                    }
                })
            })
            .collect();
        let (total, secs) = timed_reads(&f, &reads, qd, Some(SAMPLE_TIME), &|_| {})?;
        samples.push(DiskSample {
            request_bytes: req,
            queue_depth: qd,
            bytes_per_s: total as f64 / secs,
        });
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok((direct, samples))
}

/// One read of a measurement: `len` bytes at `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ReadSpec {
    pub offset: u64,
    pub len: usize,
}

/// Issues `reads` on `file` from `queue_depth` threads, each taking the next read of the list
/// (so up to `queue_depth` are in flight), calling `on_bytes` as each completes; stops taking
/// new reads after `time_limit`. Returns the bytes read and the seconds it took.
pub fn timed_reads(
    file: &DirectFile,
    reads: &[ReadSpec],
    queue_depth: usize,
    time_limit: Option<Duration>,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<(u64, f64)> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let largest = reads.iter().map(|r| r.len).max().unwrap_or(0);
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..queue_depth.max(1))
            .map(|_| {
                let next = &next;
                s.spawn(move || -> Result<u64> {
                    let mut buf = AlignedBuf::new(largest + 2 * DIRECT_IO_ALIGN, DIRECT_IO_ALIGN)?;
                    let mut done = 0u64;
                    loop {
                        if time_limit.is_some_and(|t| start.elapsed() >= t) {
                            return Ok(done);
                        }
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(r) = reads.get(i) else {
                            return Ok(done);
                        };
                        file.read_at(r.offset, r.len, &mut buf)?;
                        done += r.len as u64;
                        on_bytes(r.len as u64);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Ok(0)))
            .sum::<Result<u64>>()
    })?;
    Ok((total, start.elapsed().as_secs_f64().max(1e-9)))
}

/// Memory read bandwidth over a 256 MiB buffer: one thread, then `threads` threads.
pub fn measure_memory(threads: usize, progress: bool) -> Result<(f64, f64)> {
    let bar = progress.then(|| bar(2, "measuring memory reads"));
    let words = (256usize << 20) / 8;
    let data: Vec<u64> = (0..words as u64).collect();
    let read = |chunk: &[u64]| -> u64 { chunk.iter().fold(0u64, |a, &x| a.wrapping_add(x)) };
    let time = |n: usize| -> f64 {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let start = Instant::now();
            let per = words.div_ceil(n);
            let sum: u64 = std::thread::scope(|s| {
                let hs: Vec<_> = data.chunks(per).map(|c| s.spawn(move || read(c))).collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap_or(0))
                    .fold(0, u64::wrapping_add)
            });
            std::hint::black_box(sum);
            best = best.min(start.elapsed().as_secs_f64());
        }
        (words * 8) as f64 / best.max(1e-9)
    };
    let one = time(1);
    if let Some(b) = &bar {
        b.inc(1);
    }
    let all = time(threads.max(1));
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok((one, all))
}

fn bar(n: u64, msg: &'static str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(n);
    b.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:20}] {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_message(msg);
    b
}
