//! Sampling: the next token from logits, in llama.cpp's default order
//! (repetition penalty → top-k → top-p → min-p → temperature → draw).

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

    /// The next token given `logits` (one per vocabulary entry) and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut logits = logits.to_vec();
        if p.repeat_penalty != 1.0 && p.repeat_last_n > 0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen: Vec<u32> = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(&logits);
        }
        // Candidates, most likely first (stable: lower id first among equals).
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
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

/// Index of the largest value (the first one on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
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
