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

impl Moe {
    /// Runs the router over `x` `[t, n_embd]`.
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let probs = candle_nn::ops::softmax_last_dim(&self.router.forward(x)?)?; // [t, n_expert]
        let probs: Vec<Vec<f32>> = probs.to_device(&candle_core::Device::Cpu)?.to_vec2()?;
        let mut experts = Vec::with_capacity(probs.len());
        let mut weights = Vec::with_capacity(probs.len());
        for p in probs {
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
        // Each used expert's weighted output on its tokens, in whatever order the experts
        // arrive; summed below in expert order, so the result never depends on that order.
        let mut parts: Vec<(usize, Tensor, Tensor)> = Vec::new();
        self.experts.with_routed(&routing.experts, |e, w| {
            // Tokens routed to expert e, and the weight each gives it.
            let mut tokens = Vec::new();
            let mut mix = Vec::new();
            for (t, (ids, ws)) in routing.experts.iter().zip(&routing.weights).enumerate() {
                if let Some(slot) = ids.iter().position(|&id| id == e) {
                    tokens.push(t as u32);
                    mix.push(ws[slot]);
                }
            }
            let n = tokens.len();
            let idx = Tensor::from_vec(tokens, n, x.device())?;
            let xs = x.index_select(&idx, 0)?; // [n, n_embd]
            let mix = Tensor::from_vec(mix, (n, 1), x.device())?;
            let mlp = Mlp::from_weights(w)?;
            let ys = mlp.forward(&xs)?.broadcast_mul(&mix)?; // [n, n_embd]
            parts.push((e, idx, ys));
            Ok(())
        })?;
        parts.sort_by_key(|p| p.0);
        let mut out = x.zeros_like()?;
        for (_, idx, ys) in parts {
            out = out.index_add(&idx, &ys, 0)?;
        }
        Ok(out)
    }
}
