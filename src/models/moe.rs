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
    ///
    /// A batch takes a fixed handful of operations besides the experts' own: one gather of
    /// every (token, rank) pair's input grouped by expert (each expert multiplies a view of
    /// it), one concatenation of the outputs, one gather putting them back in (token, rank)
    /// order, one product with the mixing weights and `k - 1` sums, with three uploads.
    /// (Gathering, weighing and adding per expert and rank took ~20 operations and ~5 uploads
    /// an expert: on a GPU their launches, not the products, set the batch's time.)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let routing = self.route(x)?;
        let (t, n_embd) = x.dims2()?;
        let k = routing.experts.first().map_or(0, Vec::len);
        let dev = x.device();
        // Pair p = token · k + rank, grouped by the expert it was routed to.
        let n_expert = routing.experts.iter().flatten().max().map_or(0, |&e| e + 1);
        let mut pairs: Vec<Vec<u32>> = vec![Vec::new(); n_expert];
        for (tok, ids) in routing.experts.iter().enumerate() {
            for (rank, &e) in ids.iter().enumerate() {
                pairs[e].push((tok * k + rank) as u32);
            }
        }
        let mut start = vec![0usize; n_expert + 1];
        let mut tokens = Vec::with_capacity(t * k);
        for (e, ps) in pairs.iter().enumerate() {
            tokens.extend(ps.iter().map(|&p| p / k as u32));
            start[e + 1] = tokens.len();
        }
        let xs = x.index_select(&Tensor::from_vec(tokens, t * k, dev)?, 0)?; // [t·k, n_embd]

        // Each used expert's output on its pairs, in whatever order the experts arrive.
        let (mut ys, mut order) = (Vec::new(), Vec::with_capacity(t * k));
        self.experts.with_routed(&routing.experts, |e, w| {
            let (a, n) = (start[e], start[e + 1] - start[e]);
            ys.push(Mlp::from_weights(w)?.forward(&xs.narrow(0, a, n)?)?); // [n, n_embd]
            order.extend_from_slice(&pairs[e]);
            Ok(())
        })?;
        if order.len() != t * k {
            return Err(crate::Error::InvalidRequest(format!(
                "{} of {} routed (token, expert) pairs computed at layer {}",
                order.len(),
                t * k,
                self.experts.layer()
            )));
        }
        // Output row i belongs to pair order[i]: back to [t, k, n_embd], then weighed.
        let mut back = vec![0u32; t * k];
        for (i, &p) in order.iter().enumerate() {
            back[p as usize] = i as u32;
        }
        let y = Tensor::cat(&ys, 0)?
            .index_select(&Tensor::from_vec(back, t * k, dev)?, 0)?
            .reshape((t, k, n_embd))?;
        let w: Vec<f32> = routing.weights.iter().flatten().copied().collect();
        let w = Tensor::from_vec(w, (t, k, 1), dev)?.to_dtype(y.dtype())?;
        let y = y.broadcast_mul(&w)?;
        // Each token adds its experts' outputs most probable first: the result depends neither
        // on the order the experts arrive in nor on their ids.
        let mut out = y.narrow(1, 0, 1)?.squeeze(1)?;
        for rank in 1..k {
            out = (out + y.narrow(1, rank, 1)?.squeeze(1)?)?;
        }
        Ok(out.contiguous()?)
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
