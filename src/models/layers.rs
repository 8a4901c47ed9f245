//! Building blocks shared by every architecture: RMS norm, linear projections, RoPE, attention
//! with a KV cache, and the SwiGLU feed-forward.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;
use crate::gguf::RopeStyle;
use crate::storage::Weight;

/// `x / sqrt(mean(x²) + eps) * w`, over the last dimension.
pub struct RmsNorm {
    weight: Tensor, // [n_embd]
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: &Weight, eps: f32) -> Result<Self> {
        Ok(RmsNorm {
            weight: weight.dense()?,
            eps,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f32 {
        self.eps
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

/// `x · Wᵀ (+ b)`.
pub struct Linear {
    weight: Weight,       // [n_out, n_in]
    bias: Option<Tensor>, // [n_out]
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<&Weight>) -> Result<Self> {
        Ok(Linear {
            weight,
            bias: bias.map(Weight::dense).transpose()?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.add_bias(self.weight.matmul_t(x)?)
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// RoPE angle tables for every position up to the context size, computed as ggml does
/// (θ advanced by repeated f32 multiplication, divided by per-dimension frequency factors).
pub struct Rope {
    cos: Tensor, // [n_ctx, rope_dim / 2]
    sin: Tensor, // [n_ctx, rope_dim / 2]
    style: RopeStyle,
    rope_dim: usize,
}

pub struct RopeParams<'a> {
    pub style: RopeStyle,
    pub rope_dim: usize,
    pub freq_base: f32,
    pub freq_scale: f32,
    /// Llama-3 style per-dimension divisors (`rope_freqs.weight`), `rope_dim / 2` values.
    pub freq_factors: Option<&'a [f32]>,
}

impl Rope {
    pub fn new(p: &RopeParams, n_ctx: usize, device: &Device) -> Result<Self> {
        let half = p.rope_dim / 2;
        let theta_scale = p.freq_base.powf(-2.0 / p.rope_dim as f32);
        let mut cos = Vec::with_capacity(n_ctx * half);
        let mut sin = Vec::with_capacity(n_ctx * half);
        for pos in 0..n_ctx {
            let mut theta = pos as f32;
            for i in 0..half {
                let ff = p.freq_factors.map_or(1.0, |f| f[i]);
                let angle = p.freq_scale * theta / ff;
                cos.push(angle.cos());
                sin.push(angle.sin());
                theta *= theta_scale;
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (n_ctx, half), device)?,
            sin: Tensor::from_vec(sin, (n_ctx, half), device)?,
            style: p.style,
            rope_dim: p.rope_dim,
        })
    }

    /// The angle tables, `[n_ctx, rope_dim / 2]` each.
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    pub fn style(&self) -> RopeStyle {
        self.style
    }

    pub fn rope_dim(&self) -> usize {
        self.rope_dim
    }

    /// Rotates `x` `[1, n_head, t, head_dim]` whose first token is at position `pos`.
    pub fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let (_, _, t, head_dim) = x.dims4()?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let rotate = |x: &Tensor| -> Result<Tensor> {
            let x = x.contiguous()?;
            Ok(match self.style {
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
                RopeStyle::HalfSplit => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
            })
        };
        if self.rope_dim == head_dim {
            return rotate(x);
        }
        // Partial rotary: only the first rope_dim dimensions turn.
        let rotated = rotate(&x.narrow(D::Minus1, 0, self.rope_dim)?)?;
        let rest = x.narrow(D::Minus1, self.rope_dim, head_dim - self.rope_dim)?;
        Ok(Tensor::cat(&[&rotated, &rest], D::Minus1)?)
    }
}

/// Keys and values of the tokens seen so far, `[1, n_head_kv, n_ctx, head_dim]` each, allocated
/// once: appends write in place, so other kernels (the fused CUDA decoder) can share the buffers.
pub struct KvCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvCache {
    pub fn new(n_head_kv: usize, n_ctx: usize, head_dim: usize, device: &Device) -> Result<Self> {
        let shape = (1, n_head_kv, n_ctx, head_dim);
        Ok(KvCache {
            k: Tensor::zeros(shape, DType::F32, device)?,
            v: Tensor::zeros(shape, DType::F32, device)?,
            len: 0,
        })
    }

    /// Writes `k`, `v` `[1, n_head_kv, t, head_dim]` after the cached tokens; returns the
    /// cached keys and values including them, `[1, n_head_kv, len + t, head_dim]` each.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let n_ctx = self.k.dim(2)?;
        if self.len + t > n_ctx {
            return Err(crate::error::Error::InvalidRequest(format!(
                "KV cache full: {} cached + {t} new exceed {n_ctx}",
                self.len
            )));
        }
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += t;
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }

    /// The whole buffers (`n_ctx` positions; the first [`len`](Self::len) hold tokens).
    pub fn buffers(&self) -> (&Tensor, &Tensor) {
        (&self.k, &self.v)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records that positions `..len` hold tokens (after another kernel wrote them).
    pub fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    pub fn reset(&mut self) {
        self.len = 0;
    }
}

/// Multi-head attention with grouped KV heads and a KV cache.
pub struct Attention {
    pub q: Linear, // [n_head * head_dim, n_embd]
    pub k: Linear, // [n_head_kv * head_dim, n_embd]
    pub v: Linear, // [n_head_kv * head_dim, n_embd]
    pub o: Linear, // [n_embd, n_head * head_dim]
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub cache: KvCache,
    /// Batches may take the backend's one-kernel attention (`backend::flash_attention`); tests
    /// turn it off to compare with candle's ops.
    pub flash: bool,
}

impl Attention {
    /// `x` `[t, n_embd]` at positions `pos..pos+t` → `[t, n_embd]`. `mask`: the batch's
    /// [`causal_mask`] `[t, pos + t]` (the same in every layer), `None` for one token.
    pub fn forward(
        &mut self,
        x: &Tensor,
        pos: usize,
        rope: &Rope,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (t, _) = x.dims2()?;
        let (h, h_kv, hd) = (self.n_head, self.n_head_kv, self.head_dim);
        let n_rep = h / h_kv;
        // [t, h*hd] → [1, h, t, hd]
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?); // [t, h*hd], [t, h_kv*hd] ×2
        let q = rope.apply(&heads(q, h)?, pos)?; // [1, h, t, hd]
        let k = rope.apply(&heads(k, h_kv)?, pos)?; // [1, h_kv, t, hd]
        let v = heads(v, h_kv)?; // [1, h_kv, t, hd]
        let (k, v) = self.cache.append(&k, &v)?; // [1, h_kv, n_kv, hd]
        let n_kv = k.dim(2)?;
        if t > 1 && self.flash {
            // One kernel where the backend has one: the scores never reach memory.
            let (kc, vc) = self.cache.buffers(); // [1, h_kv, n_ctx, hd], n_kv of them filled
            if let Some(out) = crate::backend::flash_attention(&q, kc, vc, pos)? {
                return self.o.forward(&out); // out [t, h * hd]
            }
        }

        // Query heads that share a KV head are stacked: [1, h_kv, n_rep * t, hd]; scaled here
        // rather than their scores (t · n_kv values a head instead of t · hd).
        let scale = 1.0 / (hd as f64).sqrt();
        let q = (q.reshape((1, h_kv, n_rep * t, hd))? * scale)?;
        let mut scores = q.matmul(&k.t()?)?; // [1, h_kv, n_rep * t, n_kv]
        if let Some(mask) = mask {
            // [h_kv, n_rep, t, n_kv] + [t, n_kv]: every stacked head gets the same mask.
            scores = scores
                .reshape((h_kv, n_rep, t, n_kv))?
                .broadcast_add(mask)?
                .reshape((1, h_kv, n_rep * t, n_kv))?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v.contiguous()?)?; // [1, h_kv, n_rep * t, hd]
                                                   // back to [t, h * hd], head-major within each token
        let out = out
            .reshape((1, h, t, hd))?
            .transpose(1, 2)?
            .reshape((t, h * hd))?;
        self.o.forward(&out)
    }
}

/// Additive mask `[t, n_kv]` for `t` queries at the end of `n_kv` keys: query `i` sees keys
/// `0..=n_kv - t + i` (0 there, −∞ elsewhere). Built on `device` (no host loop, no upload),
/// once per batch: every layer uses the same.
pub fn causal_mask(t: usize, n_kv: usize, device: &Device) -> Result<Tensor> {
    let past = (n_kv - t) as u32;
    let last = Tensor::arange(past, past + t as u32, device)?.reshape((t, 1))?; // [t, 1]
    let key = Tensor::arange(0u32, n_kv as u32, device)?.reshape((1, n_kv))?; // [1, n_kv]
    let seen = key.broadcast_le(&last)?; // [t, n_kv], u8
    let zero = Tensor::zeros((t, n_kv), DType::F32, device)?;
    let hidden = Tensor::full(f32::NEG_INFINITY, (t, n_kv), device)?;
    Ok(seen.where_cond(&zero, &hidden)?)
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
pub struct Mlp {
    pub gate: Linear, // [n_ff, n_embd]
    pub up: Linear,   // [n_ff, n_embd]
    pub down: Linear, // [n_embd, n_ff]
}

impl Mlp {
    /// An MoE expert's weights as a feed-forward block (no biases).
    pub fn from_weights(w: &crate::storage::ExpertWeights) -> Result<Self> {
        Ok(Mlp {
            gate: Linear::new(w.gate.clone(), None)?,
            up: Linear::new(w.up.clone(), None)?,
            down: Linear::new(w.down.clone(), None)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (g, u) = (self.gate.forward(x)?, self.up.forward(x)?); // [t, n_ff] each
        self.down.forward(&(g.silu()? * u)?)
    }
}

#[cfg(test)]
mod tests {
    use super::causal_mask;
    use candle_core::Device;

    /// Query `i` of `t` at the end of `n_kv` keys sees keys `0..=n_kv - t + i`, and no other.
    #[test]
    fn causal_mask_hides_exactly_the_future_keys() {
        for (t, n_kv) in [(1, 1), (3, 3), (3, 7), (16, 40)] {
            let m: Vec<Vec<f32>> = causal_mask(t, n_kv, &Device::Cpu)
                .unwrap()
                .to_vec2()
                .unwrap();
            assert_eq!((m.len(), m[0].len()), (t, n_kv));
            for (i, row) in m.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    let seen = j <= n_kv - t + i;
                    assert_eq!(
                        v,
                        if seen { 0.0 } else { f32::NEG_INFINITY },
                        "t {t} n_kv {n_kv} ({i}, {j})"
                    );
                }
            }
        }
    }
}
