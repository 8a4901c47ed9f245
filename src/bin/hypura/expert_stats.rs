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

/// GPU builds: the device caches' counters at one moment.
#[cfg(feature = "cuda")]
#[derive(Clone, Default)]
pub struct GpuSnapshot {
    uploads: Option<hypura::storage::UploadStats>,
    device: Option<hypura::storage::experts::DeviceExpertStats>,
}

#[cfg(feature = "cuda")]
pub fn gpu_snapshot(
    uploader: Option<&std::sync::Arc<hypura::storage::Uploader>>,
    device: Option<&std::sync::Arc<hypura::storage::experts::DeviceExperts>>,
) -> GpuSnapshot {
    GpuSnapshot {
        uploads: uploader.map(|u| u.stats()),
        device: device.map(|d| d.stats()),
    }
}

/// GPU builds: what the device caches did since `since` (or load) over `tokens` tokens (uploads
/// of off-device layers, the device expert cache), as one line and as JSON; `None` when the run
/// uses neither.
#[cfg(feature = "cuda")]
pub fn gpu_report(
    m: &hypura::loader::LoadedModel,
    tokens: usize,
    since: Option<&GpuSnapshot>,
) -> Option<(String, serde_json::Value)> {
    let n = tokens.max(1) as f64;
    let mib = |b: u64| b as f64 / n / (1u64 << 20) as f64;
    let base = since.cloned().unwrap_or_default();
    let mut parts = Vec::new();
    let mut j = serde_json::Map::new();
    if let Some(u) = &m.uploader {
        let mut s = u.stats();
        if let Some(b) = &base.uploads {
            s.bytes_uploaded -= b.bytes_uploaded;
            s.uploads -= b.uploads;
            s.read_wait -= b.read_wait;
        }
        parts.push(format!(
            "uploads of off-device layers: {:.1} MiB per token ({} layer uploads, lookahead {}), \
             {:.1} ms per token waiting for disk reads",
            mib(s.bytes_uploaded),
            s.uploads,
            u.lookahead(),
            s.read_wait.as_secs_f64() * 1e3 / n
        ));
        j.insert("uploads".into(), serde_json::json!(s));
    }
    if let Some(d) = &m.device_experts {
        let s = match &base.device {
            Some(b) => d.stats().since(b),
            None => d.stats(),
        };
        parts.push(format!(
            "device expert cache: {} slots, hit rate {:.1} % ({} of {} experts asked for), {:.1} MiB \
             uploaded per token",
            d.slots(),
            s.hit_rate() * 100.0,
            s.hits,
            s.requests,
            mib(s.bytes_uploaded)
        ));
        j.insert(
            "device_expert_cache".into(),
            serde_json::json!({"stats": s, "slots": d.slots(), "hit_rate": s.hit_rate()}),
        );
    }
    (!parts.is_empty()).then(|| (parts.join("; "), serde_json::Value::Object(j)))
}
