//! Sampling: the next token from logits, in llama.cpp's default order
//! (repetition penalty → top-k → top-p → min-p → temperature → draw).

use crate::models::TopLogits;

/// How to pick tokens. Defaults are llama.cpp's.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 (or less) = greedy: always the most likely token.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability mass reaches `top_p` (1.0 = off).
    pub top_p: f32,
    /// Drop tokens with probability below `min_p` × the top probability (0 = off).
    pub min_p: f32,
    /// > 1 discourages tokens seen in the last `repeat_last_n` tokens (1.0 = off).
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// PRNG seed; `None` = from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: None,
        }
    }
}

/// Draws tokens; deterministic for a given seed.
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Sampler {
            params,
            rng: SplitMix64(seed),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether every token is the logits' argmax as they come ([`argmax`]): temperature 0 and
    /// no repetition penalty (which changes the logits first).
    pub fn is_greedy(&self) -> bool {
        let p = &self.params;
        p.temperature <= 0.0 && !(p.repeat_penalty != 1.0 && p.repeat_last_n > 0)
    }

    /// The next token given `logits` (one per vocabulary entry) and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        // The repetition penalty changes the logits of the tokens seen: only then a copy.
        let penalized;
        let logits = if p.repeat_penalty != 1.0 && p.repeat_last_n > 0 {
            let mut l = logits.to_vec();
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen: Vec<u32> = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = l.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
            penalized = l;
            &penalized[..]
        } else {
            logits
        };
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        // Candidates, most likely first (lower id first among equals).
        let cand = top_candidates(logits, p.top_k);
        self.draw(cand)
    }

    /// `Some(k)` when sampling looks at no more than the `k` most likely logits before anything
    /// else (top-k on, temperature above 0, no repetition penalty): then a model may hand over
    /// only the blocks of logits that can hold them ([`TopLogits::Blocks`], for
    /// [`sample_top`](Self::sample_top)).
    pub fn top_k_prefilter(&self) -> Option<usize> {
        let p = &self.params;
        let penalty = p.repeat_penalty != 1.0 && p.repeat_last_n > 0;
        (p.top_k > 0 && p.temperature > 0.0 && !penalty).then_some(p.top_k)
    }

    /// [`sample`](Self::sample) from what [`LanguageModel::decode_top_k`] handed over: the same
    /// token for the same seed, whether it gave all logits or only the blocks of
    /// [`top_k_prefilter`](Self::top_k_prefilter)'s `k`.
    ///
    /// [`LanguageModel::decode_top_k`]: crate::models::LanguageModel::decode_top_k
    pub fn sample_top(&mut self, logits: TopLogits<'_>, history: &[u32]) -> u32 {
        let (n_vocab, ids, values) = match logits {
            TopLogits::All(l) => return self.sample(l, history),
            TopLogits::Blocks {
                n_vocab,
                ids,
                values,
            } => (n_vocab, ids, values),
        };
        let kept = ids.iter().zip(values.chunks(64)).flat_map(|(&b, v)| {
            let start = 64 * b as usize;
            let len = n_vocab.saturating_sub(start).min(v.len());
            v[..len]
                .iter()
                .enumerate()
                .map(move |(i, &l)| Cand((start + i) as u32, l))
        });
        let cand = best_k(kept, self.params.top_k);
        self.draw(cand)
    }

    /// The draw from candidates most likely first: top-p, min-p, temperature, then the PRNG.
    fn draw(&mut self, mut cand: Vec<(u32, f32)>) -> u32 {
        let p = &self.params;
        if p.top_p < 1.0 {
            let probs = softmax(&cand.iter().map(|c| c.1).collect::<Vec<_>>());
            let mut mass = 0.0;
            let mut keep = cand.len();
            for (i, pr) in probs.iter().enumerate() {
                mass += pr;
                if mass >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let probs = softmax(&cand.iter().map(|c| c.1).collect::<Vec<_>>());
            let cut = probs[0] * p.min_p;
            let keep = probs.iter().take_while(|&&pr| pr >= cut).count();
            cand.truncate(keep.max(1));
        }
        let probs = softmax(&cand.iter().map(|c| c.1 / p.temperature).collect::<Vec<_>>());
        let r = self.rng.next_f64();
        let mut acc = 0.0;
        for (c, pr) in cand.iter().zip(&probs) {
            acc += *pr as f64;
            if r < acc {
                return c.0;
            }
        }
        cand[cand.len() - 1].0
    }
}

/// A candidate `(id, logit)` ordered by how likely it is: `a < b` when `a` is more likely (a
/// larger logit, or the same logit and a lower id). A total order (`f32::total_cmp`), so the
/// most likely `k` and their order are those of a stable descending sort of the whole vocabulary.
#[derive(Clone, Copy)]
struct Cand(u32, f32);

impl Ord for Cand {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.1.total_cmp(&self.1).then(self.0.cmp(&o.0))
    }
}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl PartialEq for Cand {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o).is_eq()
    }
}
impl Eq for Cand {}

/// The `k` most likely `(id, logit)` pairs, most likely first (every pair when `k` is 0 or at
/// least the vocabulary). Sorting a 128k vocabulary to keep 40 took 3.7 ms a token on a 2-core
/// host, longer than a decode step; this takes ~0.1 ms there:
/// - each block of 64 logits' maximum (a pass the compiler vectorizes);
/// - the `k`-th largest of those maxima, `floor`: `k` blocks each hold a logit ≥ `floor`, so a
///   logit below it is not among the `k` most likely, nor is any block whose maximum is;
/// - a heap of the best `k` so far over the other blocks' logits, in id order.
///
/// A NaN among the logits (which `f32::total_cmp` orders above +∞ or below −∞) skips the floor.
fn top_candidates(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    const BLOCK: usize = 64;
    let cand = |(i, &l): (usize, &f32)| Cand(i as u32, l);
    if k == 0 || k >= logits.len() {
        let mut all: Vec<Cand> = logits.iter().enumerate().map(cand).collect();
        all.sort_unstable();
        return all.into_iter().map(|c| (c.0, c.1)).collect();
    }
    let (maxima, nan) = block_maxima(logits, BLOCK);
    let floor = if nan || maxima.len() <= k {
        f32::NEG_INFINITY
    } else {
        let mut m = maxima.clone();
        let (_, kth, _) = m.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        *kth
    };
    let kept = maxima
        .iter()
        .enumerate()
        .filter(|&(_, &m)| nan || m >= floor)
        .flat_map(|(b, _)| {
            let start = b * BLOCK;
            let end = (start + BLOCK).min(logits.len());
            logits[start..end]
                .iter()
                .enumerate()
                .map(move |(i, l)| (start + i, l))
        });
    best_k(kept.map(cand), k)
}

/// The `k` most likely of `kept` (ids increasing), most likely first.
fn best_k(mut kept: impl Iterator<Item = Cand>, k: usize) -> Vec<(u32, f32)> {
    // A max-heap of the kept candidates: its top is the least likely of them. Ids arrive in
    // increasing order, so a later candidate displaces it only with a larger logit.
    let mut heap: std::collections::BinaryHeap<Cand> = kept.by_ref().take(k).collect();
    let mut worst = heap.peek().map_or(f32::NEG_INFINITY, |c| c.1);
    for c in kept {
        if c.1.total_cmp(&worst).is_gt() {
            if let Some(mut top) = heap.peek_mut() {
                *top = c;
            }
            worst = heap.peek().map_or(worst, |c| c.1);
        }
    }
    let mut best = heap.into_vec();
    best.sort_unstable();
    best.into_iter().map(|c| (c.0, c.1)).collect()
}

/// The maximum of each block of `block` values (NaNs passed over), and whether any is NaN.
fn block_maxima(v: &[f32], block: usize) -> (Vec<f32>, bool) {
    let mut nan = false;
    let maxima = v
        .chunks(block)
        .map(|c| {
            nan |= c.iter().fold(false, |n, &x| n | x.is_nan());
            c.iter()
                .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
        })
        .collect();
    (maxima, nan)
}

/// Index of the largest value (the first one on ties; NaNs are passed over, except a NaN first,
/// which wins as nothing compares greater).
pub fn argmax(v: &[f32]) -> u32 {
    if v.first().is_none_or(|x| x.is_nan()) {
        return 0;
    }
    // Written so that the compiler vectorizes both passes (a 128k vocabulary: ~10 µs, against
    // ~150 for one scalar pass keeping the index): the maximum in 16 lanes (`x > m` passes
    // NaNs over), then the first block of 64 holding it, then its place there.
    let chunks = v.chunks_exact(16);
    let mut lanes = [f32::NEG_INFINITY; 16];
    for x in chunks.remainder() {
        lanes[0] = if *x > lanes[0] { *x } else { lanes[0] };
    }
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = lanes
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for (i, c) in v.chunks(64).enumerate() {
        if c.iter().fold(false, |hit, &x| hit | (x == max)) {
            return (64 * i + c.iter().position(|&x| x == max).unwrap_or(0)) as u32;
        }
    }
    0
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// A small, fast, seedable PRNG (Vigna's SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: usize, top_p: f32, min_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed: Some(seed),
            ..Default::default()
        })
    }

    fn counts(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<usize> {
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[s.sample(logits, &[]) as usize] += 1;
        }
        c
    }

    #[test]
    fn greedy_is_argmax_and_top_k_1_is_greedy() {
        let logits = [0.1, 2.0, -1.0, 2.0, 0.5];
        assert_eq!(sampler(0.0, 40, 0.95, 0.05, 1).sample(&logits, &[]), 1);
        let mut s = sampler(1.0, 1, 1.0, 0.0, 7);
        assert!(counts(&mut s, &logits, 200)[1] == 200);
    }

    /// The blocks of 64 a device would hand over for top-k (every block whose maximum, in
    /// `total_cmp` order, reaches the k-th largest block maximum), as decode.cu's topk_blocks.
    fn device_blocks(logits: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
        let maxima: Vec<f32> = logits
            .chunks(64)
            .map(|c| c.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)))
            .collect();
        let mut sorted = maxima.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let floor = sorted[k - 1];
        let (mut ids, mut values) = (Vec::new(), Vec::new());
        for (b, m) in maxima.iter().enumerate() {
            if m.total_cmp(&floor).is_ge() {
                ids.push(b as u32);
                let c = &logits[64 * b..(64 * b + 64).min(logits.len())];
                values.extend(
                    c.iter()
                        .copied()
                        .chain(std::iter::repeat(f32::NEG_INFINITY))
                        .take(64),
                );
            }
        }
        (ids, values)
    }

    #[test]
    fn sampling_from_the_top_k_blocks_draws_what_all_logits_draw() {
        // A coarse grid (ties within and across blocks), signed zeros, a vocabulary that ends
        // mid-block; default sampling and a few top-k sizes, 300 draws each from one seed.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut logits: Vec<f32> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x % 41) as f32 - 20.0) / 4.0
            })
            .collect();
        logits[77] = -0.0;
        logits[4999] = 6.0;
        for k in [1, 5, 40, 77] {
            let (ids, values) = device_blocks(&logits, k);
            let blocks = TopLogits::Blocks {
                n_vocab: logits.len(),
                ids: &ids,
                values: &values,
            };
            let mut all = sampler(0.8, k, 0.95, 0.05, 11);
            let mut top = sampler(0.8, k, 0.95, 0.05, 11);
            assert_eq!(top.top_k_prefilter(), Some(k));
            for _ in 0..300 {
                assert_eq!(
                    top.sample_top(blocks, &[]),
                    all.sample(&logits, &[]),
                    "k {k}"
                );
            }
            assert_eq!(
                best_k(
                    ids.iter()
                        .flat_map(|&b| 64 * b..(64 * b + 64).min(5000))
                        .map(|i| Cand(i, logits[i as usize])),
                    k
                ),
                top_candidates(&logits, k),
                "k {k}: candidates"
            );
        }
        // No prefilter where the sampler looks at more than the top k first.
        assert_eq!(sampler(0.0, 40, 0.95, 0.05, 1).top_k_prefilter(), None);
        assert_eq!(sampler(0.8, 0, 0.95, 0.05, 1).top_k_prefilter(), None);
    }

    #[test]
    fn top_candidates_are_the_first_k_of_a_stable_sort() {
        // 5000 logits on a coarse grid (many ties), with infinities among them.
        let mut st = 7u64;
        let mut logits: Vec<f32> = (0..5000)
            .map(|_| {
                st = st
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((st >> 33) % 200) as f32 * 0.25 - 25.0
            })
            .collect();
        logits[17] = f32::INFINITY;
        logits[4000] = f32::NEG_INFINITY;
        let check = |logits: &[f32]| {
            let mut sorted: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l))
                .collect();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
            for k in [1, 2, 40, 78, 79, 199, 4999, 5000, 6000, 0] {
                let want = &sorted[..if k == 0 {
                    sorted.len()
                } else {
                    k.min(sorted.len())
                }];
                let got = top_candidates(logits, k);
                assert_eq!(got.len(), want.len(), "k {k}");
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        g.0 == w.0 && g.1.to_bits() == w.1.to_bits(),
                        "k {k}: {g:?} {w:?}"
                    );
                }
            }
        };
        check(&logits);
        // Signed zeros at the top (total_cmp: -0 < +0), then a NaN (ordered above +∞).
        let mut zeros: Vec<f32> = logits.iter().map(|l| l.min(0.0)).collect();
        zeros[4100] = -0.0;
        zeros[300] = 0.0;
        check(&zeros);
        logits[2500] = f32::NAN;
        check(&logits);
    }

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[0.5, 2.0, -1.0, 2.0]), 1);
        assert_eq!(argmax(&[3.0]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 0);
        assert_eq!(argmax(&[1.0, f32::NAN, 2.0]), 2);
        let long: Vec<f32> = (0..1001).map(|i| ((i * 37) % 101) as f32).collect();
        assert_eq!(
            argmax(&long),
            30,
            "30 · 37 = 1110 = 10 · 101 + 100: the first 100"
        );
    }

    #[test]
    fn distribution_follows_softmax() {
        // p = softmax([0, ln 3]) = [0.25, 0.75]
        let logits = [0.0, 3f32.ln()];
        let c = counts(&mut sampler(1.0, 0, 1.0, 0.0, 3), &logits, 20_000);
        let frac = c[1] as f64 / 20_000.0;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }

    #[test]
    fn top_p_and_min_p_exclude_the_tail() {
        // probabilities ≈ [0.665, 0.245, 0.090]
        let logits = [2.0, 1.0, 0.0];
        let c = counts(&mut sampler(1.0, 0, 0.8, 0.0, 5), &logits, 5_000);
        assert_eq!(c[2], 0, "top-p 0.8 keeps the first two");
        assert!(c[1] > 0);
        let c = counts(&mut sampler(1.0, 0, 1.0, 0.4, 5), &logits, 5_000);
        assert_eq!(c[1] + c[2], 0, "min-p 0.4: 0.245 < 0.4 × 0.665");
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = (0..30)
            .map({
                let mut s = sampler(1.0, 0, 1.0, 0.0, 99);
                move |_| s.sample(&logits, &[])
            })
            .collect();
        let logits2: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<u32> = (0..30)
            .map({
                let mut s = sampler(1.0, 0, 1.0, 0.0, 99);
                move |_| s.sample(&logits2, &[])
            })
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().any(|&t| t != a[0]), "a random draw should vary");
    }

    #[test]
    fn repeat_penalty_demotes_seen_tokens() {
        let logits = [1.0, 1.1, -0.5];
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[]), 1);
        assert_eq!(s.sample(&logits, &[1]), 0, "1.1 / 1.5 < 1.0");
    }
}
