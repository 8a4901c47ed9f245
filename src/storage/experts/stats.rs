//! What the expert cache did: hits, misses, prefetch accuracy, bytes and stalls.

use std::time::Duration;

/// What the expert cache did so far.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ExpertStats {
    /// Experts the router asked for (each layer's distinct experts, summed).
    pub requests: u64,
    /// Already in the cache and read.
    pub hits: u64,
    /// Being read when asked for (a prefetch not yet complete).
    pub in_flight: u64,
    /// Read on demand.
    pub misses: u64,
    pub prefetch_issued: u64,
    /// Prefetched experts that the router then asked for.
    pub prefetch_used: u64,
    pub bytes_read: u64,
    pub prefetch_bytes: u64,
    pub reads: u64,
    /// Time the compute waited for reads.
    pub stall: Duration,
    /// Time the I/O threads spent reading (summed over threads).
    pub io_busy: Duration,
}

impl ExpertStats {
    pub fn hit_rate(&self) -> f64 {
        ratio(self.hits, self.requests)
    }
    /// Of the experts prefetched, the share the router then asked for. (Over a window of a
    /// run, a prefetch issued before the window may be used in it; the share is capped at 1.)
    pub fn prefetch_precision(&self) -> f64 {
        ratio(self.prefetch_used, self.prefetch_issued).min(1.0)
    }
    /// Of the experts that were not cached when needed or predicted, the share prefetch covered.
    pub fn prefetch_recall(&self) -> f64 {
        ratio(self.prefetch_used, self.prefetch_used + self.misses)
    }
    /// `self - before`, field by field.
    pub fn since(&self, before: &ExpertStats) -> ExpertStats {
        ExpertStats {
            requests: self.requests - before.requests,
            hits: self.hits - before.hits,
            in_flight: self.in_flight - before.in_flight,
            misses: self.misses - before.misses,
            prefetch_issued: self.prefetch_issued - before.prefetch_issued,
            prefetch_used: self.prefetch_used - before.prefetch_used,
            bytes_read: self.bytes_read - before.bytes_read,
            prefetch_bytes: self.prefetch_bytes - before.prefetch_bytes,
            reads: self.reads - before.reads,
            stall: self.stall.saturating_sub(before.stall),
            io_busy: self.io_busy.saturating_sub(before.io_busy),
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}
