//! The fused CUDA decode path: single-token steps of a dense model whose weights are all in GPU
//! memory run on `hypura_kernels::cuda::Decoder` (8 kernels per layer, replayed from a CUDA
//! graph per attention shape) instead of candle's ~25 tensor ops per layer.
//!
//! `HYPURA_CUDA_DECODE=candle` turns it off (every step runs candle's ops);
//! `HYPURA_CUDA_GRAPH=0` keeps the fused kernels but launches them one by one;
//! `HYPURA_CUDA_PROFILE=N` times every kernel of the step at position N and prints the table.
//! Prompt batches always run on candle; both paths share the model's KV cache.

use candle_core::{DType, Device, Tensor};
use hypura_kernels::cuda::{DecodeSpec, Decoder, DeviceMatrix, LayerSpec, RopePairs};

use crate::error::{Error, Result};
use crate::gguf::RopeStyle;
use crate::models::{FeedForward, Transformer};
use crate::storage::Weight;

/// A model's fused decoder, or why it has none.
pub enum FusedDecode {
    Ready {
        decoder: Box<Decoder>,
        /// `HYPURA_CUDA_PROFILE`: the position whose step is timed kernel by kernel.
        profile_at: Option<usize>,
    },
    Off(String),
}

fn kernel_error(e: hypura_kernels::KernelError) -> Error {
    Error::Candle(candle_core::Error::Msg(e.to_string()))
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
        let graph = !std::env::var("HYPURA_CUDA_GRAPH").is_ok_and(|v| v == "0");
        let decoder = Decoder::new(dev.cuda_stream(), spec, graph).map_err(kernel_error)?;
        let profile_at = std::env::var("HYPURA_CUDA_PROFILE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok());
        Ok(FusedDecode::Ready {
            decoder: Box::new(decoder),
            profile_at,
        })
    }

    /// One line for logs: which kernels run single-token steps.
    pub fn describe(&self) -> String {
        match self {
            FusedDecode::Ready { decoder, .. } => match decoder.capture_failure() {
                _ if decoder.graph_captured() => "fused CUDA kernels, CUDA graph".into(),
                Some(why) => format!("fused CUDA kernels (CUDA graph refused: {why})"),
                None => "fused CUDA kernels".into(),
            },
            FusedDecode::Off(why) => format!("candle ops ({why})"),
        }
    }

    /// Runs `token` at position `pos`; the `[1, n_vocab]` logits on the CPU.
    pub fn step(&mut self, token: u32, pos: usize) -> Result<Option<Tensor>> {
        let FusedDecode::Ready {
            decoder,
            profile_at,
        } = self
        else {
            return Ok(None);
        };
        let logits = if *profile_at == Some(pos) {
            let (logits, times) = decoder.profile_step(token, pos).map_err(kernel_error)?;
            print_profile(pos, &times);
            logits
        } else {
            decoder.step(token, pos).map_err(kernel_error)?
        };
        let n = logits.len();
        Ok(Some(Tensor::from_vec(logits, (1, n), &Device::Cpu)?))
    }
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
        let FeedForward::Dense(mlp) = &b.ffn else {
            return Ok(Err("mixture-of-experts feed-forward".into()));
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
        if a.o.bias().is_some() || mlp.gate.bias().is_some() || mlp.down.bias().is_some() {
            return Ok(Err("biases outside q/k/v".into()));
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
            gate: matrix!(mlp.gate.weight()),
            up: matrix!(mlp.up.weight()),
            down: matrix!(mlp.down.weight()),
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
        embed: matrix!(model.embed()),
        layers,
        out_norm: host_f32(model.norm().weight())?,
        output: matrix!(model.output()),
    }))
}
