//! The fused CUDA decode path: single-token steps of a model whose weights are all in GPU
//! memory run on `hypura_kernels::cuda::Decoder` (8 kernels per layer, replayed from a CUDA
//! graph per attention shape) instead of candle's ~25 tensor ops per layer.
//!
//! Mixture-of-experts models (Mixtral) qualify when their experts are in device memory or come
//! through the device expert cache; routing (top-k of the router's logits) runs on the device,
//! and the step is one graph like a dense model's either way. Behind the expert caches, the
//! decoder reads the device cache's address table; a layer whose routing picks an expert missing
//! there waits on the device while the host serves it (host-cache hit or disk read, copied into a
//! device slot). After the step, the layers served entirely from device memory are counted and
//! learned from by both caches.
//!
//! `HYPURA_CUDA_DECODE=candle` turns it off (every step runs candle's ops);
//! `HYPURA_CUDA_GRAPH=0` keeps the fused kernels but launches them one by one;
//! `HYPURA_CUDA_PDL=0` captures the graph without programmatic dependent launches;
//! `HYPURA_CUDA_FOLD=0` keeps every RMS norm a kernel of its own (no folding into mat-vecs);
//! `HYPURA_CUDA_ROUTER=0` runs a MoE router as a mat-vec and `moe_route` (not `moe_router`);
//! `HYPURA_CUDA_TOPK=0` downloads every step's logits for top-k sampling (no candidates picked
//! on the device: see `FusedDecode::step_top`);
//! `HYPURA_CUDA_CHAIN=0` keeps greedy generation's steps one at a time through the host (no
//! greedy chains: see `FusedDecode::greedy_chain`);
//! `HYPURA_CUDA_STEP_CLOCK=1` prints, when the model is dropped, the mean GPU and host time of
//! a dense model's steps;
//! `HYPURA_CUDA_PROFILE=N` times every kernel of the step at position N and prints the table
//! (a MoE model's requests for experts are served the same way, between the timed kernels).
//! Prompt batches always run on candle; both paths share the model's KV cache.

use candle_core::{DType, Device, Tensor};
use hypura_kernels::cuda::{
    DecodeOptions, DecodeSpec, Decoder, DeviceMatrix, ExpertMatrices, FfnSpec, LayerSpec,
    MoeExperts, RopePairs, StepLogits,
};
use hypura_kernels::KernelError;

use super::kernel_error;
use crate::error::{Error, Result};
use crate::gguf::RopeStyle;
use crate::models::{Block, FeedForward, TopLogits, Transformer};
use crate::storage::experts::ExpertWeights;
use crate::storage::Weight;

/// A model's fused decoder, or why it has none.
pub enum FusedDecode {
    Ready {
        decoder: Box<Decoder>,
        /// `HYPURA_CUDA_PROFILE`: the position whose step is timed kernel by kernel.
        profile_at: Option<usize>,
        /// The embedding table is not in a form the kernels read: each step reads its row with
        /// the table's own lookup, token id placed on this device (the table's).
        host_embed: Option<Device>,
    },
    Off(String),
}

impl FusedDecode {
    /// Builds the fused decoder for `model`, or says why its steps stay on candle.
    pub fn for_model(model: &Transformer) -> Result<Self> {
        if std::env::var("HYPURA_CUDA_DECODE").is_ok_and(|v| v.eq_ignore_ascii_case("candle")) {
            return Ok(FusedDecode::Off("HYPURA_CUDA_DECODE=candle".into()));
        }
        let Device::Cuda(dev) = model.device() else {
            return Ok(FusedDecode::Off("not a CUDA device".into()));
        };
        let spec = match spec(model)? {
            Ok(spec) => spec,
            Err(why) => return Ok(FusedDecode::Off(why)),
        };
        let options = DecodeOptions {
            graph: !std::env::var("HYPURA_CUDA_GRAPH").is_ok_and(|v| v == "0"),
            dependent_launch: !std::env::var("HYPURA_CUDA_PDL").is_ok_and(|v| v == "0"),
            fold_norms: !std::env::var("HYPURA_CUDA_FOLD").is_ok_and(|v| v == "0"),
            fused_router: !std::env::var("HYPURA_CUDA_ROUTER").is_ok_and(|v| v == "0"),
            staged_down: !std::env::var("HYPURA_CUDA_STAGED").is_ok_and(|v| v == "0"),
            step_clock: std::env::var("HYPURA_CUDA_STEP_CLOCK").is_ok_and(|v| v == "1"),
        };
        let host_embed = spec
            .embed
            .is_none()
            .then(|| match model.embed().tier_name() {
                "device" => model.device().clone(),
                _ => Device::Cpu,
            });
        // A shape the kernels do not take (say head_dim > 256, more than 8 experts per token)
        // or a device that cannot hold the decoder's buffers: the steps stay on candle's ops.
        let decoder = match Decoder::new(dev.cuda_stream(), spec, options) {
            Ok(d) => d,
            Err(e) => return Ok(FusedDecode::Off(e.to_string())),
        };
        let profile_at = std::env::var("HYPURA_CUDA_PROFILE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok());
        Ok(FusedDecode::Ready {
            decoder: Box::new(decoder),
            profile_at,
            host_embed,
        })
    }

    /// One line for logs: which kernels run single-token steps.
    pub fn describe(&self) -> String {
        match self {
            FusedDecode::Ready { decoder, .. } => {
                let experts = if decoder.needs_host() {
                    ", experts from the device expert cache (the host serves misses mid-step)"
                } else {
                    ""
                };
                match decoder.capture_failure() {
                    _ if decoder.graph_captured() => {
                        format!("fused CUDA kernels, CUDA graph{experts}")
                    }
                    Some(why) => {
                        format!("fused CUDA kernels{experts} (CUDA graph refused: {why})")
                    }
                    None => format!("fused CUDA kernels{experts}"),
                }
            }
            FusedDecode::Off(why) => format!("candle ops ({why})"),
        }
    }

    /// Runs `token` at position `pos` through the model whose blocks are `blocks` (MoE layers
    /// find their experts there) and calls `f` with the `[n_vocab]` logits, in place in host
    /// memory; `None` when the model has no fused decoder.
    /// `embed` is the model's embedding table: when it is not on the device, the token's row is
    /// read from it here.
    pub fn step<R>(
        &mut self,
        token: u32,
        pos: usize,
        embed: &Weight,
        blocks: &[Block],
        f: impl FnOnce(&[f32]) -> R,
    ) -> Result<Option<R>> {
        let FusedDecode::Ready {
            decoder,
            profile_at,
            host_embed,
        } = self
        else {
            return Ok(None);
        };
        let row = match host_embed {
            Some(dev) => {
                let ids = Tensor::new(&[token], dev)?;
                Some(embed.rows(&ids)?.flatten_all()?.to_vec1::<f32>()?)
            }
            None => None,
        };
        let row = row.as_deref();
        // Requests of the device for experts it lacks: served here; the first failure is kept
        // (the step still runs to its end) and returned.
        let mut served = Vec::new();
        let mut failure: Option<Error> = None;
        let mut serve = |layer: usize, ids: &[usize]| -> std::result::Result<(), KernelError> {
            let r = moe_set(blocks, layer).and_then(|set| set.serve_device(ids));
            served.push(layer);
            r.map_err(|e| {
                let msg = KernelError(format!("serving experts {ids:?} of layer {layer}: {e}"));
                failure.get_or_insert(e);
                msg
            })
        };
        let profiled: Vec<f32>;
        let stepped = if *profile_at == Some(pos) {
            match decoder.profile_step(token, pos, row, &mut serve) {
                Ok((logits, times)) => {
                    print_profile(pos, &times);
                    profiled = logits;
                    Ok(&profiled[..])
                }
                Err(e) => Err(e),
            }
        } else if decoder.needs_host() {
            decoder.step_served(token, pos, row, &mut serve)
        } else {
            decoder.step(token, pos, row)
        };
        if let Some(e) = failure {
            return Err(e);
        }
        let out = f(stepped.map_err(kernel_error)?);
        if decoder.needs_host() {
            for (layer, ids) in decoder.last_routing().map_err(kernel_error)? {
                if !served.contains(&layer) {
                    moe_set(blocks, layer)?.note_device_hits(&ids);
                }
            }
        }
        Ok(Some(out))
    }

    /// The decoder, for the paths that keep everything on the device (top-k candidates, greedy
    /// chains): none without a fused decoder, with the embedding table on the host, with
    /// `off_var` set to 0, or when `profiled` says the profiled position is among the steps.
    fn device_only(
        &mut self,
        off_var: &str,
        profiled: impl Fn(usize) -> bool,
    ) -> Option<&mut Decoder> {
        let FusedDecode::Ready {
            decoder,
            profile_at,
            host_embed: None,
        } = self
        else {
            return None;
        };
        let off = std::env::var(off_var).is_ok_and(|v| v == "0");
        (!off && !profile_at.is_some_and(profiled)).then_some(&mut **decoder)
    }

    /// Runs `token` at `pos` and calls `f` with the blocks of logits that can hold the `k`
    /// largest, picked on the device (kernels' `Decoder::step_top_blocks`; all logits where `k`
    /// or ties do not allow it). `None`, having run nothing, where this path does not run: no
    /// fused decoder, the embedding table on the host, experts served by the host, the step
    /// profiled, or `HYPURA_CUDA_TOPK=0`.
    pub fn step_top<R>(
        &mut self,
        token: u32,
        pos: usize,
        k: usize,
        f: impl FnOnce(TopLogits<'_>) -> R,
    ) -> Result<Option<R>> {
        let Some(decoder) = self.device_only("HYPURA_CUDA_TOPK", |p| p == pos) else {
            return Ok(None);
        };
        if decoder.needs_host() {
            return Ok(None);
        }
        let n_vocab = decoder.n_vocab();
        let out = match decoder
            .step_top_blocks(token, pos, None, k)
            .map_err(kernel_error)?
        {
            StepLogits::All(l) => f(TopLogits::All(l)),
            StepLogits::Blocks { ids, values } => f(TopLogits::Blocks {
                n_vocab,
                ids,
                values,
            }),
        };
        Ok(Some(out))
    }

    /// Feeds `token` at `pos`, then each next token greedy decoding picks, while `accept` says
    /// so, picking them on the device so that steps follow each other without waiting on the
    /// host (kernels' `Decoder::greedy_chain`; `accept` sees every picked token, false ends the
    /// chain without feeding it). Returns how many tokens were fed (`token` included, at most
    /// `max_steps`), or `None` where chains do not run: no fused decoder, the embedding table on
    /// the host, experts served by the host mid-step, a step profiled, or `HYPURA_CUDA_CHAIN=0`.
    pub fn greedy_chain(
        &mut self,
        token: u32,
        pos: usize,
        max_steps: usize,
        accept: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Option<usize>> {
        let Some(decoder) = self.device_only("HYPURA_CUDA_CHAIN", |p| p >= pos) else {
            return Ok(None);
        };
        if !decoder.can_chain() {
            return Ok(None);
        }
        decoder
            .greedy_chain(token, pos, max_steps, accept)
            .map(Some)
            .map_err(kernel_error)
    }
}

/// The experts of MoE block `layer`.
fn moe_set(blocks: &[Block], layer: usize) -> Result<&crate::storage::experts::ExpertSet> {
    match blocks.get(layer).map(|b| &b.ffn) {
        Some(FeedForward::Moe(moe)) => Ok(&moe.experts),
        _ => Err(Error::InvalidRequest(format!(
            "fused decode: block {layer} is not a mixture of experts"
        ))),
    }
}

/// One expert's weights as the decoder reads them (all in CUDA memory, or an error naming one).
fn expert_matrices(w: &ExpertWeights) -> Result<ExpertMatrices> {
    let m = |w: &Weight| {
        w.cuda_matrix()?
            .ok_or_else(|| Error::InvalidRequest(format!("{} is not in CUDA memory", w.name())))
    };
    Ok(ExpertMatrices {
        gate: m(&w.gate)?,
        up: m(&w.up)?,
        down: m(&w.down)?,
    })
}

fn print_profile(pos: usize, times: &[hypura_kernels::cuda::KernelTime]) {
    let total: f64 = times.iter().map(|k| k.total_us).sum();
    eprintln!("hypura: fused decode step at position {pos}: {total:.1} µs of GPU time");
    eprintln!("| kernel | launches | total µs | µs each | share |");
    eprintln!("| --- | ---: | ---: | ---: | ---: |");
    for k in times {
        eprintln!(
            "| {} | {} | {:.1} | {:.2} | {:.1} % |",
            k.label,
            k.launches,
            k.total_us,
            k.total_us / k.launches as f64,
            100.0 * k.total_us / total
        );
    }
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The decoder's view of the model, or (inner `Err`) why the model is not eligible.
fn spec(model: &Transformer) -> Result<std::result::Result<DecodeSpec, String>> {
    let cfg = &model.config;
    let matrix = |w: &Weight| -> Result<std::result::Result<DeviceMatrix, String>> {
        Ok(w.cuda_matrix()?.ok_or_else(|| {
            format!(
                "{} is {} on the {} tier, which the fused kernels do not read",
                w.name(),
                w.ty().name(),
                w.tier_name()
            )
        }))
    };
    macro_rules! matrix {
        ($w:expr) => {
            match matrix($w)? {
                Ok(m) => m,
                Err(why) => return Ok(Err(why)),
            }
        };
    }
    let mut layers = Vec::with_capacity(model.blocks.len());
    for b in &model.blocks {
        let ffn = match &b.ffn {
            FeedForward::Dense(mlp) => {
                if mlp.gate.bias().is_some() || mlp.down.bias().is_some() {
                    return Ok(Err("feed-forward biases".into()));
                }
                FfnSpec::Dense {
                    gate: matrix!(mlp.gate.weight()),
                    up: matrix!(mlp.up.weight()),
                    down: matrix!(mlp.down.weight()),
                }
            }
            FeedForward::Moe(moe) => {
                if let Err(why) = moe.experts.fused_ready()? {
                    return Ok(Err(why));
                }
                if moe.router.bias().is_some() {
                    return Ok(Err("a router bias".into()));
                }
                let experts = match moe.experts.resident_experts() {
                    Some(all) => MoeExperts::Resident(
                        all.iter().map(expert_matrices).collect::<Result<_>>()?,
                    ),
                    None => match moe.experts.served_table()? {
                        Some((table, types)) => MoeExperts::Served {
                            table,
                            types,
                            n_expert: moe.experts.n_expert(),
                        },
                        None => return Ok(Err("experts outside device memory".into())),
                    },
                };
                FfnSpec::Moe {
                    router: matrix!(moe.router.weight()),
                    n_expert_used: moe.n_expert_used,
                    n_ff: cfg.n_ff,
                    experts,
                }
            }
        };
        let a = &b.attn;
        let (kc, vc) = a.cache.buffers();
        let (Some(k_cache), Some(v_cache)) = (
            crate::storage::device_view::f32_bytes(kc)?,
            crate::storage::device_view::f32_bytes(vc)?,
        ) else {
            return Ok(Err("KV cache not in CUDA memory".into()));
        };
        let bias = |l: &crate::models::Linear| l.bias().map(host_f32).transpose();
        if a.o.bias().is_some() {
            return Ok(Err("an attention output bias".into()));
        }
        layers.push(LayerSpec {
            attn_norm: host_f32(b.attn_norm.weight())?,
            q: matrix!(a.q.weight()),
            k: matrix!(a.k.weight()),
            v: matrix!(a.v.weight()),
            o: matrix!(a.o.weight()),
            q_bias: bias(&a.q)?,
            k_bias: bias(&a.k)?,
            v_bias: bias(&a.v)?,
            ffn_norm: host_f32(b.ffn_norm.weight())?,
            ffn,
            k_cache,
            v_cache,
        });
    }
    let (cos, sin) = model.rope().tables();
    Ok(Ok(DecodeSpec {
        n_embd: cfg.n_embd,
        n_head: cfg.n_head,
        n_head_kv: cfg.n_head_kv,
        head_dim: cfg.head_dim,
        n_ff: cfg.n_ff,
        n_vocab: cfg.n_vocab,
        n_ctx: crate::models::LanguageModel::n_ctx(model),
        rope_dim: model.rope().rope_dim(),
        rope_pairs: match model.rope().style() {
            RopeStyle::Interleaved => RopePairs::Interleaved,
            RopeStyle::HalfSplit => RopePairs::HalfSplit,
        },
        rms_eps: model.norm().eps(),
        rope_cos: host_f32(cos)?,
        rope_sin: host_f32(sin)?,
        // The table is only read a row per token: it may stay in host memory (the plan often
        // keeps it there, as llama.cpp does).
        embed: model.embed().cuda_matrix()?,
        layers,
        out_norm: host_f32(model.norm().weight())?,
        output: matrix!(model.output()),
    }))
}
