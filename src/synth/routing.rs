//! Real-looking expert routing for synthetic MoE models. **Synthetic**: these statistics are
//! put there on purpose, they are not learned from data.
//!
//! Random routers route almost uniformly, which no trained MoE does. Two knobs make them look
//! like a trained model's:
//! - **skew** `s`: in every layer, expert popularity follows a Zipf law with exponent `s` (the
//!   expert of popularity rank `r` is picked about `(r + 1)^-s` as often as the first). The
//!   popularity order is a different permutation in each layer.
//! - **layer correlation** `ρ`: the router of layer `l + 1` is, up to a permutation of expert
//!   ids, `ρ ×` the router of layer `l` plus independent noise, so the experts a token uses in
//!   one layer predict those of the next (the residual stream carries the token's features from
//!   layer to layer). With `ρ > 0` the popularity ranks follow the same permutation.
//!
//! How: like trained LLMs, whose hidden states have a few "massive activations", every token
//! embedding gets one large constant component (dimension 0, value `sqrt(n_embd)`). After RMS
//! normalisation it is nearly the same for every token, so a router column over that dimension
//! acts as a per-expert bias: `-s · β · ln(r + 1)`, with `β` the Gumbel scale of the routers'
//! random part. The skew is strongest in the first layers and fades as later layers add to the
//! residual stream; `hypura run --stats` on the model reports the routing that results.

use crate::error::{Error, Result};

/// Routing statistics of a synthetic MoE model (see the module docs). Both 0 = plain random
/// routers (nearly uniform routing).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoutingSpec {
    /// Zipf exponent of expert popularity per layer (0 = uniform).
    pub skew: f32,
    /// Correlation of consecutive layers' routers, in [0, 1).
    pub layer_corr: f32,
}

impl RoutingSpec {
    pub fn is_uniform(&self) -> bool {
        self.skew == 0.0 && self.layer_corr == 0.0
    }

    pub fn validate(&self) -> Result<()> {
        if !((0.0..=16.0).contains(&self.skew) && (0.0..1.0).contains(&self.layer_corr)) {
            return Err(Error::InvalidRequest(format!(
                "synthetic routing: skew {} must be in [0, 16] and layer correlation {} in [0, 1)",
                self.skew, self.layer_corr
            )));
        }
        Ok(())
    }
}

/// The constant embedding component that carries the routers' bias.
pub(super) fn massive_value(n_embd: usize) -> f32 {
    (n_embd as f32).sqrt()
}

/// A small deterministic generator (SplitMix64 + Box–Muller); routers are small.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        super::blocks::mix(self.0)
    }
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
        p
    }
}

/// Every layer's router, `[n_expert][n_embd]` row-major, for `n_layer` layers. `std` is the
/// standard deviation of the random part (the routers of a plain synthetic model).
pub(super) fn routers(
    r: &RoutingSpec,
    n_layer: usize,
    n_expert: usize,
    n_embd: usize,
    std: f32,
    seed: u64,
) -> Vec<Vec<f32>> {
    let d = n_embd;
    let mut g = Gen(seed ^ 0x0005_eed0_fa11_7e55);
    // The routers' random logits have std ≈ std · sqrt(d) (RMS-normalised input); Gumbel
    // noise of that std has scale β = std·√6/π, and a bias of -s·β·ln(r+1) then gives Zipf(s).
    let noise_std = std as f64 * (d as f64).sqrt();
    let beta = noise_std * 6f64.sqrt() / std::f64::consts::PI;
    // The massive component after normalisation: rms of an embedding row is sqrt((M² + d)/d).
    let m = massive_value(d) as f64;
    let x0 = m / ((m * m + d as f64) / d as f64).sqrt();
    let rho = r.layer_corr as f64;
    let mut out: Vec<Vec<f32>> = Vec::with_capacity(n_layer);
    let mut rank: Vec<usize> = g.permutation(n_expert);
    for l in 0..n_layer {
        let perm = g.permutation(n_expert);
        let mut w = vec![0f32; n_expert * d];
        for v in w.iter_mut() {
            *v = g.normal() * std;
        }
        if l > 0 && rho > 0.0 {
            // Expert e of the previous layer becomes expert perm[e] here.
            let prev = &out[l - 1];
            let keep = (1.0 - rho * rho).sqrt() as f32;
            let mut mixed = vec![0f32; n_expert * d];
            for (e, &p) in perm.iter().enumerate() {
                let (dst, src) = (p * d, e * d);
                for j in 0..d {
                    mixed[dst + j] = rho as f32 * prev[src + j] + keep * w[dst + j];
                }
            }
            w = mixed;
            let mut next_rank = vec![0; n_expert];
            for (&p, &r) in perm.iter().zip(&rank) {
                next_rank[p] = r;
            }
            rank = next_rank;
        } else if l > 0 {
            rank = g.permutation(n_expert);
        }
        for e in 0..n_expert {
            let bias = -(r.skew as f64) * beta * ((rank[e] + 1) as f64).ln();
            w[e * d] = (bias / x0) as f32;
        }
        out.push(w);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn biases_follow_the_popularity_ranks_and_layers_correlate() {
        let r = RoutingSpec {
            skew: 1.0,
            layer_corr: 0.9,
        };
        let (n, d) = (8, 64);
        let w = routers(&r, 3, n, d, 0.25, 7);
        assert_eq!(w.len(), 3);
        // Biases of layer 0: one expert at 0 (rank 0), the others negative and distinct.
        let mut b: Vec<f32> = (0..n).map(|e| w[0][e * d]).collect();
        b.sort_by(|a, c| c.total_cmp(a));
        assert_eq!(b[0], 0.0);
        assert!(b.windows(2).all(|p| p[0] > p[1]), "{b:?}");
        // Some row of layer 1 is strongly correlated with each row of layer 0.
        for e in 0..n {
            let a = &w[0][e * d + 1..(e + 1) * d];
            let best = (0..n)
                .map(|f| {
                    let c = &w[1][f * d + 1..(f + 1) * d];
                    let dot: f32 = a.iter().zip(c).map(|(x, y)| x * y).sum();
                    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
                    let nc: f32 = c.iter().map(|x| x * x).sum::<f32>().sqrt();
                    dot / (na * nc)
                })
                .fold(f32::MIN, f32::max);
            assert!(best > 0.8, "expert {e}: best correlation {best}");
        }
        assert!(RoutingSpec {
            skew: -1.0,
            layer_corr: 0.0
        }
        .validate()
        .is_err());
        assert!(RoutingSpec {
            skew: 1.0,
            layer_corr: 1.0
        }
        .validate()
        .is_err());
    }
}
