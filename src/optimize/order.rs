//! Which order a layer's experts should have in the file, and how many reads a token then costs.
//! Pure functions of the co-activation statistics and the file layout.

use crate::storage::experts::{merged_reads, CoActivation, ReadPart};
use crate::storage::DIRECT_IO_ALIGN;

/// How to order each layer's experts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum OrderStrategy {
    /// Experts often used by the same token side by side (a maximum-weight path through the
    /// pair counts), the more popular end first.
    #[default]
    Pairs,
    /// Most used first.
    Popularity,
    /// Keep the file's order (only the layout changes).
    Keep,
}

impl OrderStrategy {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "pairs" | "coact" => Some(OrderStrategy::Pairs),
            "popularity" | "hot" => Some(OrderStrategy::Popularity),
            "keep" | "none" => Some(OrderStrategy::Keep),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OrderStrategy::Pairs => "pairs",
            OrderStrategy::Popularity => "popularity",
            OrderStrategy::Keep => "keep",
        }
    }
}

/// Layers with at most this many experts get an exact best path (dynamic programming over
/// subsets); larger ones a greedy one.
const EXACT_MAX_EXPERTS: usize = 12;

/// Per layer and expert, the chance that a use of the expert misses a cache of `slots` experts
/// (`None`: no cache, every use reads). The eviction policy keeps the most used experts, so the
/// `slots` most popular of the whole model (popularity counted over all layers together) are
/// taken as cached — not quite always (prefetch and the current layer's experts take slots
/// too): [`CACHED_MISS`] — and the rest as always read.
pub fn miss_chances(stats: &CoActivation, slots: Option<usize>) -> Vec<Vec<f64>> {
    let n = stats.n_expert;
    let mut miss: Vec<Vec<f64>> = stats
        .popularity
        .iter()
        .map(|p| vec![1.0; p.len()])
        .collect();
    if let Some(slots) = slots {
        let mut keys: Vec<(u32, usize, usize)> = stats
            .popularity
            .iter()
            .enumerate()
            .flat_map(|(l, p)| p.iter().enumerate().map(move |(e, &c)| (c, l, e)))
            .collect();
        keys.sort_by(|a, b| b.0.cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        for &(_, l, e) in keys.iter().take(slots.min(keys.len())) {
            if e < n {
                miss[l][e] = CACHED_MISS;
            }
        }
    }
    miss
}

/// How often an expert the cache is taken to hold is missed anyway.
pub const CACHED_MISS: f64 = 0.1;

/// The order of one layer's `n` experts: `order[new position] = expert id`. `popularity[e]` =
/// tokens that used `e`; `pairs[a * n + b]` = tokens that used both (empty when unknown).
///
/// (Weighting the pairs by the chance that both experts miss a given cache, [`miss_chances`],
/// was tried: on the synthetic skewed MoE of `benches/optimize_moe.sh` it read no fewer times
/// than the plain pair counts, so the order does not depend on the cache.)
pub fn layer_order(
    strategy: OrderStrategy,
    n: usize,
    popularity: &[u32],
    pairs: &[u32],
) -> Vec<usize> {
    let identity: Vec<usize> = (0..n).collect();
    let pop = |e: usize| popularity.get(e).copied().unwrap_or(0);
    let by_popularity = || {
        let mut o = identity.clone();
        o.sort_by(|&a, &b| pop(b).cmp(&pop(a)).then(a.cmp(&b)));
        o
    };
    match strategy {
        OrderStrategy::Keep => identity,
        OrderStrategy::Popularity => by_popularity(),
        OrderStrategy::Pairs => {
            let w = |a: usize, b: usize| pairs.get(a * n + b).copied().unwrap_or(0) as u64;
            if n < 3 || pairs.len() != n * n || pairs.iter().all(|&c| c == 0) {
                return by_popularity();
            }
            let mut path = if n <= EXACT_MAX_EXPERTS {
                best_path_exact(n, &w)
            } else {
                best_path_greedy(n, &w, &by_popularity())
            };
            if pop(path[n - 1]) > pop(path[0]) {
                path.reverse();
            }
            path
        }
    }
}

/// The order of `0..n` maximising the summed weight of neighbours (max-weight Hamiltonian path),
/// by dynamic programming over subsets: `best[mask][last]`.
fn best_path_exact(n: usize, w: &dyn Fn(usize, usize) -> u64) -> Vec<usize> {
    let full = (1usize << n) - 1;
    let mut best = vec![vec![None::<u64>; n]; 1 << n];
    let mut from = vec![vec![usize::MAX; n]; 1 << n];
    for e in 0..n {
        best[1 << e][e] = Some(0);
    }
    for mask in 1..=full {
        for last in 0..n {
            let Some(v) = best[mask][last] else { continue };
            for next in (0..n).filter(|&x| mask & (1 << x) == 0) {
                let m = mask | (1 << next);
                let cand = v + w(last, next);
                if best[m][next].is_none_or(|b| cand > b) {
                    best[m][next] = Some(cand);
                    from[m][next] = last;
                }
            }
        }
    }
    let mut last = (0..n)
        .max_by_key(|&e| (best[full][e].unwrap_or(0), std::cmp::Reverse(e)))
        .unwrap_or(0);
    let mut mask = full;
    let mut path = vec![last];
    while from[mask][last] != usize::MAX {
        let prev = from[mask][last];
        mask &= !(1 << last);
        last = prev;
        path.push(last);
    }
    path.reverse();
    path
}

/// A good path for many experts: from the most popular expert, repeatedly attach the unplaced
/// expert sharing the most tokens with either end of the path (ties: the more popular).
fn best_path_greedy(n: usize, w: &dyn Fn(usize, usize) -> u64, by_pop: &[usize]) -> Vec<usize> {
    let mut rank = vec![0; n];
    for (i, &e) in by_pop.iter().enumerate() {
        rank[e] = i;
    }
    let mut placed = vec![false; n];
    let mut path = std::collections::VecDeque::from([by_pop[0]]);
    placed[by_pop[0]] = true;
    while path.len() < n {
        let (front, back) = (path[0], path[path.len() - 1]);
        let best = (0..n)
            .filter(|&e| !placed[e])
            .flat_map(|e| [(w(back, e), false, e), (w(front, e), true, e)])
            .max_by_key(|&(weight, at_front, e)| (weight, std::cmp::Reverse(rank[e]), !at_front));
        let Some((_, at_front, e)) = best else { break };
        placed[e] = true;
        if at_front {
            path.push_front(e);
        } else {
            path.push_back(e);
        }
    }
    path.into()
}

/// The file layout of one layer's three expert tensors: slice `e` of tensor `i` (0 gate, 1 up,
/// 2 down) is bytes `offset[i] + e * stride[i] ..` of file `file[i]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertLayout {
    pub file: [usize; 3],
    pub offset: [u64; 3],
    pub stride: [u64; 3],
}

impl ExpertLayout {
    /// Reads the expert cache issues to fetch the experts `set` of this layer together
    /// (the runtime's own merging rule, [`merged_reads`]).
    pub fn reads(&self, set: &[usize]) -> usize {
        let mut parts: Vec<ReadPart> = set
            .iter()
            .flat_map(|&e| (0..3).map(move |i| (e, i)))
            .map(|(e, i)| ReadPart {
                file: self.file[i],
                offset: self.offset[i] + e as u64 * self.stride[i],
                len: self.stride[i] as usize,
                capacity: self.stride[i] as usize + 2 * DIRECT_IO_ALIGN,
            })
            .collect();
        merged_reads(&mut parts).len()
    }
}

/// Expected expert reads per token for one layer, the experts a token misses read together:
/// three per missed expert, less one for each pair of experts whose slices one read covers back
/// to back and that a token uses and misses both. `miss[e]` = the chance a use of `e` misses
/// (empty: no cache, every use reads; then it is exact given the pair counts). With no pairs
/// recorded (`pairs` all zero), experts are taken as independent.
pub fn expected_reads(
    layout: &ExpertLayout,
    n_expert: usize,
    n_expert_used: usize,
    popularity: &[u32],
    pairs: &[u32],
    miss: &[f64],
) -> f64 {
    let k = n_expert_used as f64;
    let tokens = popularity.iter().map(|&c| c as f64).sum::<f64>() / k.max(1.0);
    let m = |e: usize| miss.get(e).copied().unwrap_or(1.0);
    if tokens == 0.0 || n_expert < 2 {
        return 3.0 * k;
    }
    let p = |e: usize| popularity.get(e).copied().unwrap_or(0) as f64 / tokens;
    let known = pairs.len() == n_expert * n_expert && pairs.iter().any(|&c| c > 0);
    let both = |a: usize, b: usize| {
        if a == b {
            p(a)
        } else if known {
            pairs[a * n_expert + b] as f64 / tokens
        } else {
            // Independent picks without replacement, scaled so they sum to k(k-1) per token.
            p(a) * p(b) * (k - 1.0) / k * n_expert as f64 / (n_expert as f64 - 1.0)
        }
    };
    // All slices in file order; neighbours one read can join.
    let mut slices: Vec<(usize, u64, usize, usize)> = (0..3)
        .flat_map(|i| {
            (0..n_expert).map(move |e| {
                let off = layout.offset[i] + e as u64 * layout.stride[i];
                (layout.file[i], off, layout.stride[i] as usize, e)
            })
        })
        .collect();
    slices.sort_unstable();
    let mut saved = 0.0;
    for w in slices.windows(2) {
        let ((f0, o0, l0, a), (f1, o1, _, b)) = (w[0], w[1]);
        let cap = l0 + 2 * DIRECT_IO_ALIGN;
        if f0 == f1 && crate::storage::scatter_follows(o0, l0, cap, o1) {
            saved += both(a, b) * if a == b { m(a) } else { m(a) * m(b) };
        }
    }
    3.0 * (0..n_expert).map(|e| p(e) * m(e)).sum::<f64>() - saved
}

/// `stats` with each layer's experts renumbered: `orders[l][new] = old` (layers without an order
/// keep theirs), so a predictor learned on the original file works on the reordered one.
pub fn permute_stats(stats: &CoActivation, orders: &[Vec<usize>]) -> CoActivation {
    let n = stats.n_expert;
    let order = |l: usize, j: usize| orders.get(l).and_then(|o| o.get(j).copied()).unwrap_or(j);
    let mut out = stats.clone();
    for l in 0..stats.popularity.len() {
        for j in 0..n {
            out.popularity[l][j] = stats.popularity[l][order(l, j)];
            if let (Some(s), Some(d)) = (stats.stay.get(l), out.stay.get_mut(l)) {
                d[j] = s[order(l, j)];
            }
            for i in 0..n {
                if let (Some(s), Some(d)) = (stats.pairs.get(l), out.pairs.get_mut(l)) {
                    d[i * n + j] = s[order(l, i) * n + order(l, j)];
                }
                if let (Some(s), Some(d)) = (stats.transitions.get(l), out.transitions.get_mut(l)) {
                    d[i * n + j] = s[order(l, i) * n + order(l + 1, j)];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pair counts of a layer where the tokens' expert pairs are the given ones.
    fn pairs_of(n: usize, sets: &[(usize, usize, u32)]) -> (Vec<u32>, Vec<u32>) {
        let (mut pop, mut pairs) = (vec![0; n], vec![0; n * n]);
        for &(a, b, c) in sets {
            pop[a] += c;
            pop[b] += c;
            pairs[a * n + b] += c;
            pairs[b * n + a] += c;
        }
        (pop, pairs)
    }

    fn contiguous(n: usize, stride: u64) -> ExpertLayout {
        let t = n as u64 * stride;
        ExpertLayout {
            file: [0; 3],
            offset: [0, t, 2 * t],
            stride: [stride; 3],
        }
    }

    #[test]
    fn co_used_experts_become_neighbours() {
        // 6 experts; tokens use (0, 3), (3, 5), (5, 1), (1, 4), (4, 2): a chain that the identity
        // order breaks everywhere.
        let n = 6;
        let (pop, pairs) = pairs_of(
            n,
            &[(0, 3, 50), (3, 5, 40), (5, 1, 30), (1, 4, 20), (4, 2, 10)],
        );
        let o = layer_order(OrderStrategy::Pairs, n, &pop, &pairs);
        let mut sorted = o.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "a permutation");
        assert!(o == [0, 3, 5, 1, 4, 2] || o == [2, 4, 1, 5, 3, 0], "{o:?}");
        assert_eq!(o[0], 0, "the more popular end first: {o:?} {pop:?}");
        // Greedy finds the same chain here.
        let w = |a: usize, b: usize| pairs[a * n + b] as u64;
        let by_pop = layer_order(OrderStrategy::Popularity, n, &pop, &pairs);
        assert_eq!(by_pop[0], 3, "expert 3 is in 90 tokens");
        let g = best_path_greedy(n, &w, &by_pop);
        let score = |p: &[usize]| p.windows(2).map(|x| w(x[0], x[1])).sum::<u64>();
        assert_eq!(score(&g), score(&o), "{g:?}");
        assert_eq!(
            layer_order(OrderStrategy::Keep, n, &pop, &pairs),
            (0..n).collect::<Vec<_>>()
        );
        // Without pair counts: by popularity.
        assert_eq!(layer_order(OrderStrategy::Pairs, n, &pop, &[]), by_pop);
    }

    #[test]
    fn with_a_cache_only_pairs_of_missed_experts_save_reads() {
        // Experts 0 and 1 (the most used) are taken as cached; only (2, 3) both miss.
        let n = 4;
        let (pop, pairs) = pairs_of(n, &[(0, 1, 50), (2, 3, 10)]);
        let mut stats = CoActivation::new(n);
        stats.popularity = vec![pop.clone()];
        let miss = miss_chances(&stats, Some(2));
        assert_eq!(miss[0], vec![CACHED_MISS, CACHED_MISS, 1.0, 1.0]);
        assert_eq!(miss_chances(&stats, None), vec![vec![1.0; n]]);
        let l = contiguous(n, 64 << 10);
        let tokens = 60.0;
        // Reads: three per missed use, less three for each pair read together.
        let (p0, p2) = (50.0 / tokens * CACHED_MISS, 10.0 / tokens);
        let merged = 50.0 / tokens * CACHED_MISS * CACHED_MISS + 10.0 / tokens;
        let want = 3.0 * (2.0 * p0 + 2.0 * p2) - 3.0 * merged;
        let got = expected_reads(&l, n, 2, &pop, &pairs, &miss[0]);
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }

    #[test]
    fn expected_reads_follow_the_layout() {
        let n = 4;
        let stride = 64 << 10;
        let (pop, pairs) = pairs_of(n, &[(0, 1, 30), (2, 3, 10)]);
        let l = contiguous(n, stride);
        // Every token's two experts are neighbours: one read per tensor.
        assert!((expected_reads(&l, n, 2, &pop, &pairs, &[]) - 3.0).abs() < 1e-12);
        assert_eq!(l.reads(&[0, 1]), 3);
        assert_eq!(l.reads(&[1, 2]), 3);
        assert_eq!(l.reads(&[0, 2]), 6);
        // Experts 3 (gate) and 0 (up) are neighbours across tensors.
        assert_eq!(l.reads(&[0, 3]), 4);
        assert_eq!(l.reads(&[0, 1, 2, 3]), 1, "a whole layer in one read");
        // Swap experts 1 and 2 in the file: no token's pair is adjacent any more.
        let (pop2, pairs2) = pairs_of(n, &[(0, 2, 30), (1, 3, 10)]);
        assert!((expected_reads(&l, n, 2, &pop2, &pairs2, &[]) - 6.0).abs() < 1e-12);
        // Unaligned slices (32-byte GGUF alignment) never merge.
        let odd = ExpertLayout {
            offset: [96, 96 + 4 * 10_000, 96 + 8 * 10_000],
            stride: [10_000; 3],
            file: [0; 3],
        };
        assert!((expected_reads(&odd, n, 2, &pop, &pairs, &[]) - 6.0).abs() < 1e-12);
        assert_eq!(odd.reads(&[0, 1, 2, 3]), 12);
    }

    #[test]
    fn permuted_stats_follow_the_experts() {
        let mut c = CoActivation::new(3);
        c.observe(0, &[vec![0, 2]]);
        c.observe(1, &[vec![1, 2]]);
        let orders = vec![vec![2, 0, 1], vec![1, 2, 0]];
        let p = permute_stats(&c, &orders);
        // Old expert 2 of layer 0 is new expert 0; old 0 is new 1.
        assert_eq!(p.popularity[0], vec![1, 1, 0]);
        assert_eq!(p.pairs[0][1], 1, "new (0, 1) = old (2, 0)");
        // Layer 1: old 1 → new 0, old 2 → new 1.
        assert_eq!(p.popularity[1], vec![1, 1, 0]);
        // transition old (0 at l0 → 1 at l1) = new (1 → 0).
        assert_eq!(c.transitions[0][1], 1);
        assert_eq!(p.transitions[0][3], 1);
        assert_eq!(permute_stats(&c, &[]), c, "no orders: unchanged");
    }
}
