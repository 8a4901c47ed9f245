//! Reporting what the expert cache did (MoE expert-streaming).

use hypura::storage::experts::{simulate, EvictionPolicy, TraceEntry};
use hypura::storage::ExpertStats;

/// One line: hit rate, prefetch precision/recall, bytes and stall per token.
pub fn describe(s: &ExpertStats, tokens: usize) -> String {
    let n = tokens.max(1) as f64;
    let disk_bps = if s.io_busy.as_secs_f64() > 0.0 {
        s.bytes_read as f64 / s.io_busy.as_secs_f64()
    } else {
        0.0
    };
    format!(
        "expert cache: hit rate {:.1} % ({} hits, {} in flight, {} misses of {} experts asked for); \
         prefetch {} issued, precision {:.1} %, recall {:.1} %; {:.1} MiB read per token \
         ({:.1} MiB by prefetch) in {:.2} reads per token ({:.2} per expert fetched), stall {:.1} ms \
         per token, disk {:.2} GB/s while reading",
        s.hit_rate() * 100.0,
        s.hits,
        s.in_flight,
        s.misses,
        s.requests,
        s.prefetch_issued,
        s.prefetch_precision() * 100.0,
        s.prefetch_recall() * 100.0,
        s.bytes_read as f64 / n / (1u64 << 20) as f64,
        s.prefetch_bytes as f64 / n / (1u64 << 20) as f64,
        s.reads as f64 / n,
        s.reads as f64 / (s.misses + s.prefetch_issued).max(1) as f64,
        s.stall.as_secs_f64() * 1e3 / n,
        disk_bps / 1e9,
    )
}

/// Both eviction policies replayed on `trace` with a cache of `slots` experts (demand only).
pub fn compare_policies(trace: &[TraceEntry], slots: usize) -> String {
    let r = |p| simulate(trace, slots, p).hit_rate() * 100.0;
    format!(
        "eviction policies replayed on this run's routing ({} layer steps, {slots} slots, no prefetch): \
         LRU {:.1} %, LFU {:.1} % hits",
        trace.len(),
        r(EvictionPolicy::Lru),
        r(EvictionPolicy::Lfu)
    )
}
