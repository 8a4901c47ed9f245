//! The decoder, top to bottom. One definition serves the three families hypura runs:
//! - **Llama** (2, 3.x, Mistral): GQA attention, interleaved RoPE, optional Llama-3 `rope_freqs`,
//!   untied or tied output;
//! - **Qwen2 / 2.5**: the same block with q/k/v biases, half-split (NEOX) RoPE, tied output;
//! - **Mixtral**: the Llama block whose feed-forward is a mixture of experts ([`Moe`]).
//!
//! Shapes: `t` = tokens in this call, `d` = n_embd, `V` = n_vocab.

use super::layers::{causal_mask, Attention, KvCache, Linear, Mlp, RmsNorm, Rope, RopeParams};
use super::moe::Moe;
use super::{with_logits, LanguageModel, Logits, TopLogits};
use crate::error::{Error, Result};
use crate::gguf::ModelConfig;
use crate::storage::{Weight, WeightStore};
use candle_core::{DType, Device, Tensor};

pub enum FeedForward {
    Dense(Mlp),
    Moe(Box<Moe>),
}

pub struct Block {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub ffn_norm: RmsNorm,
    pub ffn: FeedForward,
}

pub struct Transformer {
    pub config: ModelConfig,
    embed: Weight, // token_embd [V, d]
    pub blocks: Vec<Block>,
    norm: RmsNorm,
    output: Weight, // [V, d] (token_embd itself when the output is tied)
    rope: Rope,
    n_ctx: usize,
    n_past: usize,
    device: Device,
    /// Single-token steps on hypura's fused CUDA kernels, when the model is eligible.
    #[cfg(feature = "cuda")]
    fused: Option<crate::backend::FusedDecode>,
}

impl Transformer {
    /// Declares the model's tensors and builds it, with a KV cache of `n_ctx` tokens.
    pub fn load(store: &WeightStore, cfg: &ModelConfig, n_ctx: usize) -> Result<Self> {
        let (d, v, ff) = (cfg.n_embd, cfg.n_vocab, cfg.n_ff);
        let (h, h_kv, hd) = (cfg.n_head, cfg.n_head_kv, cfg.head_dim);
        let embed = store.get("token_embd.weight", &[v, d])?;
        let output = store
            .get_opt("output.weight", &[v, d])?
            .unwrap_or_else(|| embed.clone());
        let freq_factors = match store.get_opt("rope_freqs.weight", &[cfg.rope_dim / 2])? {
            Some(w) => Some(w.dense()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        let rope_params = RopeParams {
            style: cfg.rope_style,
            rope_dim: cfg.rope_dim,
            freq_base: cfg.rope_freq_base,
            freq_scale: cfg.rope_freq_scale,
            freq_factors: freq_factors.as_deref(),
        };
        let rope = Rope::new(&rope_params, n_ctx, store.device())?;

        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let name = |s: &str| format!("blk.{i}.{s}");
            let linear = |s: &str, rows: usize, cols: usize| -> Result<Linear> {
                let bias = store.get_opt(&name(&format!("{s}.bias")), &[rows])?;
                Linear::new(
                    store.get(&name(&format!("{s}.weight")), &[rows, cols])?,
                    bias.as_ref(),
                )
            };
            let attn = Attention {
                q: linear("attn_q", h * hd, d)?,
                k: linear("attn_k", h_kv * hd, d)?,
                v: linear("attn_v", h_kv * hd, d)?,
                o: linear("attn_output", d, h * hd)?,
                n_head: h,
                n_head_kv: h_kv,
                head_dim: hd,
                cache: KvCache::new(h_kv, n_ctx, hd, store.device())?,
                flash: true,
            };
            let ffn = if cfg.is_moe() {
                let experts = store.get_expert_set(
                    i,
                    [
                        &name("ffn_gate_exps.weight"),
                        &name("ffn_up_exps.weight"),
                        &name("ffn_down_exps.weight"),
                    ],
                    cfg.n_expert,
                    [[ff, d], [ff, d], [d, ff]],
                )?;
                FeedForward::Moe(Box::new(Moe {
                    router: linear("ffn_gate_inp", cfg.n_expert, d)?,
                    experts,
                    n_expert_used: cfg.n_expert_used,
                }))
            } else {
                FeedForward::Dense(Mlp {
                    gate: linear("ffn_gate", ff, d)?,
                    up: linear("ffn_up", ff, d)?,
                    down: linear("ffn_down", d, ff)?,
                })
            };
            blocks.push(Block {
                attn_norm: RmsNorm::new(&store.get(&name("attn_norm.weight"), &[d])?, cfg.rms_eps)?,
                attn,
                ffn_norm: RmsNorm::new(&store.get(&name("ffn_norm.weight"), &[d])?, cfg.rms_eps)?,
                ffn,
            });
        }
        let model = Transformer {
            config: cfg.clone(),
            embed,
            blocks,
            norm: RmsNorm::new(&store.get("output_norm.weight", &[d])?, cfg.rms_eps)?,
            output,
            rope,
            n_ctx,
            n_past: 0,
            device: store.device().clone(),
            #[cfg(feature = "cuda")]
            fused: None,
        };
        #[cfg(feature = "cuda")]
        let model = {
            let mut model = model;
            model.fused = Some(crate::backend::FusedDecode::for_model(&model)?);
            model
        };
        Ok(model)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn embed(&self) -> &Weight {
        &self.embed
    }

    pub fn output(&self) -> &Weight {
        &self.output
    }

    pub fn norm(&self) -> &RmsNorm {
        &self.norm
    }

    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Which kernels run single-token steps (for logs).
    pub fn decode_path(&self) -> String {
        #[cfg(feature = "cuda")]
        if let Some(f) = &self.fused {
            return f.describe();
        }
        "candle ops".into()
    }

    /// Runs every later step on candle's ops (tests compare the fused CUDA path against them).
    pub fn disable_fused_decode(&mut self) {
        #[cfg(feature = "cuda")]
        {
            self.fused = None;
        }
    }

    /// Runs prompt batches' attention on candle's ops rather than the backend's one-kernel
    /// attention (tests compare the two).
    pub fn disable_flash_attention(&mut self) {
        for b in &mut self.blocks {
            b.attn.flash = false;
        }
    }

    /// One token through the fused CUDA decoder, if the model has one (counted in the cache):
    /// `f` of its `[n_vocab]` logits.
    fn fused_step<R>(
        &mut self,
        token: u32,
        pos: usize,
        f: impl FnOnce(&[f32]) -> R,
    ) -> Result<Option<R>> {
        #[cfg(feature = "cuda")]
        if let Some(fused) = &mut self.fused {
            let Some(out) = fused.step(token, pos, &self.embed, &self.blocks, f)? else {
                return Ok(None);
            };
            self.fed(1);
            return Ok(Some(out));
        }
        let _ = (token, pos, f);
        Ok(None)
    }

    /// Counts `n` tokens a fused path has fed (their k and v are in the cache).
    #[cfg(feature = "cuda")]
    fn fed(&mut self, n: usize) {
        self.n_past += n;
        for b in &mut self.blocks {
            b.attn.cache.set_len(self.n_past);
        }
    }

    /// Checks a forward pass's input: some tokens, room in the cache, ids in the vocabulary.
    fn check_input(&self, tokens: &[u32]) -> Result<()> {
        let t = tokens.len();
        if t == 0 {
            return Err(Error::InvalidRequest(
                "forward pass over zero tokens".into(),
            ));
        }
        if self.n_past + t > self.n_ctx {
            return Err(Error::InvalidRequest(format!(
                "context full: {} tokens cached + {t} new exceed the context size {}",
                self.n_past, self.n_ctx
            )));
        }
        if let Some(&bad) = tokens
            .iter()
            .find(|&&id| id as usize >= self.config.n_vocab)
        {
            return Err(Error::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (n_vocab {})",
                self.config.n_vocab
            )));
        }
        Ok(())
    }
}

impl LanguageModel for Transformer {
    fn forward(&mut self, tokens: &[u32], logits: Logits) -> Result<Tensor> {
        self.check_input(tokens)?;
        let (t, pos) = (tokens.len(), self.n_past);
        if t == 1 {
            let to_tensor = |l: &[f32]| Tensor::from_slice(l, (1, l.len()), &Device::Cpu);
            if let Some(logits) = self.fused_step(tokens[0], pos, to_tensor)? {
                return Ok(logits?);
            }
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.rows(&ids)?; // [t, d]
        let mask = if t > 1 {
            Some(causal_mask(t, pos + t, &self.device)?) // [t, pos + t]
        } else {
            None
        };
        for block in &mut self.blocks {
            let n = block.attn_norm.forward(&x)?;
            let a = block.attn.forward(&n, pos, &self.rope, mask.as_ref())?; // [t, d]
            x = (x + a)?;
            let n = block.ffn_norm.forward(&x)?;
            let f = match &block.ffn {
                FeedForward::Dense(mlp) => mlp.forward(&n)?,
                FeedForward::Moe(moe) => moe.forward(&n)?,
            }; // [t, d]
            x = (x + f)?;
        }
        self.n_past += t;
        if logits == Logits::Last {
            x = x.narrow(0, t - 1, 1)?; // [1, d]
        }
        let out = self.output.matmul_t(&self.norm.forward(&x)?)?; // [t or 1, V]
        Ok(out.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
    }

    fn reset(&mut self) {
        self.n_past = 0;
        for b in &mut self.blocks {
            b.attn.cache.reset();
        }
    }

    fn n_past(&self) -> usize {
        self.n_past
    }

    fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    fn n_vocab(&self) -> usize {
        self.config.n_vocab
    }

    fn decode_with(&mut self, token: u32, f: &mut dyn FnMut(&[f32])) -> Result<()> {
        self.check_input(&[token])?;
        if self.fused_step(token, self.n_past, |l| f(l))?.is_some() {
            return Ok(());
        }
        let logits = self.forward(&[token], Logits::Last)?;
        with_logits(&logits, f)
    }

    fn decode_top_k(
        &mut self,
        token: u32,
        k: usize,
        f: &mut dyn FnMut(TopLogits<'_>),
    ) -> Result<()> {
        self.check_input(&[token])?;
        #[cfg(feature = "cuda")]
        if let Some(fused) = &mut self.fused {
            let pos = self.n_past;
            if fused.step_top(token, pos, k, &mut *f)?.is_some() {
                self.fed(1);
                return Ok(());
            }
        }
        let _ = k;
        self.decode_with(token, &mut |l| f(TopLogits::All(l)))
    }

    fn decode_greedy(
        &mut self,
        token: u32,
        max_steps: usize,
        accept: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Option<usize>> {
        self.check_input(&[token])?;
        #[cfg(feature = "cuda")]
        if let Some(fused) = &mut self.fused {
            let max_steps = max_steps.min(self.n_ctx - self.n_past);
            let Some(fed) = fused.greedy_chain(token, self.n_past, max_steps, accept)? else {
                return Ok(None);
            };
            self.fed(fed);
            return Ok(Some(fed));
        }
        let _ = (token, max_steps, accept);
        Ok(None)
    }
}
