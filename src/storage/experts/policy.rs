//! Which cached expert to evict, and a simulator to compare policies on recorded routing traces.
//!
//! Two policies:
//! - **LRU**: evict the expert used longest ago.
//! - **LFU** (frequency-aware): evict the expert used least often over the whole run (counts are
//!   kept for every expert ever seen, cached or not, so a popular expert that was evicted once
//!   comes back with its history), ties broken by least recent use.
//!
//! Which is better depends on the routing; [`simulate`] replays a trace of `(layer, experts)`
//! uses against a cache of `slots` experts, so both can be measured on the same trace (`hypura
//! run --stats` prints both for the run's own routing). See the README for the measurements that
//! chose the default.

use std::collections::HashMap;

/// An expert: (layer, expert id).
pub type ExpertKey = (usize, usize);

/// The eviction policy of the expert cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EvictionPolicy {
    Lru,
    /// Least frequently used, ties by least recently used.
    #[default]
    Lfu,
}

impl EvictionPolicy {
    pub fn name(self) -> &'static str {
        match self {
            EvictionPolicy::Lru => "lru",
            EvictionPolicy::Lfu => "lfu",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "lru" => Some(EvictionPolicy::Lru),
            "lfu" => Some(EvictionPolicy::Lfu),
            _ => None,
        }
    }

    /// The key to minimise when choosing a victim: smaller = evicted first.
    pub(crate) fn victim_rank(self, freq: u64, last_use: u64) -> (u64, u64) {
        match self {
            EvictionPolicy::Lru => (last_use, 0),
            EvictionPolicy::Lfu => (freq, last_use),
        }
    }
}

/// One use of a layer's experts in a forward pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEntry {
    pub layer: usize,
    /// The experts used (distinct, sorted).
    pub experts: Vec<usize>,
}

/// Hits and misses of a replay.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SimResult {
    pub hits: u64,
    pub misses: u64,
}

impl SimResult {
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

/// Replays `trace` against a demand-filled cache of `slots` experts under `policy` (no
/// prefetch). The experts of one entry are never evicted by each other, unless the cache is
/// smaller than the entry.
pub fn simulate(trace: &[TraceEntry], slots: usize, policy: EvictionPolicy) -> SimResult {
    let mut r = SimResult::default();
    if slots == 0 {
        r.misses = trace.iter().map(|e| e.experts.len() as u64).sum();
        return r;
    }
    // cached key -> last use; frequencies of every key seen.
    let mut cached: HashMap<ExpertKey, u64> = HashMap::new();
    let mut freq: HashMap<ExpertKey, u64> = HashMap::new();
    for (tick, entry) in trace.iter().enumerate() {
        let tick = tick as u64 + 1;
        for &e in &entry.experts {
            let key = (entry.layer, e);
            *freq.entry(key).or_insert(0) += 1;
            if let Some(last) = cached.get_mut(&key) {
                *last = tick;
                r.hits += 1;
                continue;
            }
            r.misses += 1;
            if cached.len() >= slots {
                // Prefer victims outside this entry; if all are in it, any.
                let pick = |protect: bool| {
                    cached
                        .iter()
                        .filter(|(k, _)| {
                            !(protect && k.0 == entry.layer && entry.experts.contains(&k.1))
                        })
                        .min_by_key(|(k, &last)| {
                            (
                                policy.victim_rank(freq.get(k).copied().unwrap_or(0), last),
                                **k,
                            )
                        })
                        .map(|(k, _)| *k)
                };
                if let Some(victim) = pick(true).or_else(|| pick(false)) {
                    cached.remove(&victim);
                }
            }
            cached.insert(key, tick);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(layer: usize, experts: &[usize]) -> TraceEntry {
        TraceEntry {
            layer,
            experts: experts.to_vec(),
        }
    }

    #[test]
    fn all_fit_means_only_cold_misses() {
        let trace: Vec<_> = (0..10).map(|i| t(i % 2, &[i % 3, 3])).collect();
        for p in [EvictionPolicy::Lru, EvictionPolicy::Lfu] {
            let r = simulate(&trace, 16, p);
            // Distinct keys: layer0 {0,1,2,3} ∩ used, layer1 likewise.
            let distinct: std::collections::HashSet<_> = trace
                .iter()
                .flat_map(|e| e.experts.iter().map(move |&x| (e.layer, x)))
                .collect();
            assert_eq!(r.misses, distinct.len() as u64, "{p:?}");
            assert_eq!(r.hits + r.misses, 20);
        }
    }

    #[test]
    fn lfu_keeps_a_popular_expert_that_lru_evicts() {
        // Expert 0 is used every other step; a scan of one-off experts in between.
        let mut trace = Vec::new();
        for i in 0..50 {
            trace.push(t(0, &[0]));
            trace.push(t(0, &[100 + i]));
            trace.push(t(0, &[200 + i]));
        }
        let lru = simulate(&trace, 2, EvictionPolicy::Lru);
        let lfu = simulate(&trace, 2, EvictionPolicy::Lfu);
        assert_eq!(lru.hits, 0, "LRU: each scan pair pushes expert 0 out");
        // LFU loses expert 0 once (a tie with the first one-off expert), then keeps it.
        assert_eq!(lfu.hits, 48);
    }

    #[test]
    fn lru_wins_when_popularity_shifts() {
        // Phase 1 uses {0,1} a lot; phase 2 uses {2,3}: LFU clings to the old favourites.
        let mut trace = Vec::new();
        for _ in 0..20 {
            trace.push(t(0, &[0, 1]));
        }
        for _ in 0..10 {
            trace.push(t(0, &[2, 3]));
            trace.push(t(0, &[4]));
        }
        let lru = simulate(&trace, 3, EvictionPolicy::Lru);
        let lfu = simulate(&trace, 3, EvictionPolicy::Lfu);
        assert!(lru.hits > lfu.hits, "lru {lru:?} lfu {lfu:?}");
    }

    #[test]
    fn zero_slots_miss_everything() {
        let r = simulate(&[t(0, &[1, 2])], 0, EvictionPolicy::Lru);
        assert_eq!((r.hits, r.misses), (0, 2));
    }
}
