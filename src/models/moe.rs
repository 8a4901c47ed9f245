//! Mixture-of-experts feed-forward (Mixtral): a router picks `k` of `n` SwiGLU experts per token.

use candle_core::Tensor;

use super::layers::{Linear, Mlp};
use crate::error::Result;
use crate::storage::ExpertSet;

pub struct Moe {
    pub router: Linear,     // [n_expert, n_embd]
    pub experts: ExpertSet, // n_expert SwiGLU experts
    pub n_expert_used: usize,
}

/// The router's decision for a batch: for each token, its experts and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// `[t][k]` expert ids, most probable first.
    pub experts: Vec<Vec<usize>>,
    /// `[t][k]` mixing weights (the chosen softmax probabilities, renormalised to sum to 1).
    pub weights: Vec<Vec<f32>>,
}

/// Softmax of one token's router logits, computed so that permuting the experts permutes the
/// result exactly (bit for bit): the normaliser is summed in f64 over the terms sorted, an order
/// that does not depend on the experts' ids. (So a file whose experts were reordered consistently,
/// e.g. by `hypura optimize`, gives the same numbers.)
pub fn router_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|&v| (v - max).exp()).collect();
    let mut sorted = e.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let sum: f64 = sorted.iter().map(|&v| v as f64).sum();
    e.iter().map(|&v| (v as f64 / sum) as f32).collect()
}

impl Moe {
    /// Runs the router over `x` `[t, n_embd]`.
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let logits = self.router.forward(x)?; // [t, n_expert]
        let logits: Vec<Vec<f32>> = logits.to_device(&candle_core::Device::Cpu)?.to_vec2()?;
        let mut experts = Vec::with_capacity(logits.len());
        let mut weights = Vec::with_capacity(logits.len());
        for l in logits {
            let p = router_softmax(&l);
            let mut order: Vec<usize> = (0..p.len()).collect();
            // Highest probability first; ties keep the lower expert id first.
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            order.truncate(self.n_expert_used);
            let w: Vec<f32> = order.iter().map(|&e| p[e]).collect();
            let sum: f32 = w.iter().sum();
            weights.push(w.iter().map(|v| v / sum).collect());
            experts.push(order);
        }
        Ok(Routing { experts, weights })
    }

    /// `x` `[t, n_embd]` → `[t, n_embd]`: each token's chosen experts, mixed by their weights.
    /// The router runs first, so only the experts it picked are fetched.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let routing = self.route(x)?;
        let k = routing.experts.first().map_or(0, Vec::len);
        // Each used expert's weighted output on its tokens, in whatever order the experts
        // arrive, split by the rank the expert has for each token (its position in the token's
        // choices). Summed below rank by rank, so each token adds its experts' outputs most
        // probable first: the result depends neither on the order the experts arrive in nor
        // on their ids.
        let mut by_rank: Vec<Vec<(Tensor, Tensor)>> = vec![Vec::new(); k];
        self.experts.with_routed(&routing.experts, |e, w| {
            // Tokens routed to expert e, the weight each gives it, and its rank there.
            let (mut tokens, mut mix, mut ranks) = (Vec::new(), Vec::new(), Vec::new());
            for (t, (ids, ws)) in routing.experts.iter().zip(&routing.weights).enumerate() {
                if let Some(slot) = ids.iter().position(|&id| id == e) {
                    tokens.push(t as u32);
                    mix.push(ws[slot]);
                    ranks.push(slot);
                }
            }
            let n = tokens.len();
            let idx = Tensor::from_vec(tokens.clone(), n, x.device())?;
            let xs = x.index_select(&idx, 0)?; // [n, n_embd]
            let mix = Tensor::from_vec(mix, (n, 1), x.device())?;
            let mlp = Mlp::from_weights(w)?;
            let ys = mlp.forward(&xs)?.broadcast_mul(&mix)?; // [n, n_embd]
            for (r, parts) in by_rank.iter_mut().enumerate() {
                let rows: Vec<u32> = (0..n as u32).filter(|&i| ranks[i as usize] == r).collect();
                if rows.is_empty() {
                    continue;
                }
                if rows.len() == n {
                    parts.push((idx.clone(), ys.clone()));
                    continue;
                }
                let to: Vec<u32> = rows.iter().map(|&i| tokens[i as usize]).collect();
                let m = to.len();
                let rows = Tensor::from_vec(rows, m, x.device())?;
                let to = Tensor::from_vec(to, m, x.device())?;
                parts.push((to, ys.index_select(&rows, 0)?));
            }
            Ok(())
        })?;
        // Within a rank every token gets one expert's output, so the order there is immaterial.
        let mut out = x.zeros_like()?;
        for parts in by_rank {
            for (idx, ys) in parts {
                out = out.index_add(&idx, &ys, 0)?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::router_softmax;

    /// Router logits like a real layer's: a spread of values, some nearly tied.
    fn logits(seed: u64, n: usize) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let x = crate::synth::mix(seed.wrapping_mul(0x9e37_79b9) ^ i);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
            })
            .collect()
    }

    #[test]
    fn router_softmax_is_exactly_permutation_equivariant() {
        for n in [2, 4, 8, 16, 60, 128] {
            for seed in 0..50u64 {
                let l = logits(seed, n);
                let p = router_softmax(&l);
                assert!((p.iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-5);
                // Reversal, rotations and a pseudo-random shuffle.
                let mut perms: Vec<Vec<usize>> = vec![(0..n).rev().collect()];
                perms.extend((1..n.min(5)).map(|r| (0..n).map(|i| (i + r) % n).collect()));
                let mut shuffled: Vec<usize> = (0..n).collect();
                shuffled.sort_by_key(|&i| crate::synth::mix(seed ^ (i as u64) << 20));
                perms.push(shuffled);
                for perm in perms {
                    // Expert j of the permuted layer is expert perm[j] of the original.
                    let lp: Vec<f32> = perm.iter().map(|&i| l[i]).collect();
                    let pp = router_softmax(&lp);
                    for (j, &i) in perm.iter().enumerate() {
                        assert_eq!(pp[j].to_bits(), p[i].to_bits(), "n {n} seed {seed}");
                    }
                }
            }
        }
    }
}
