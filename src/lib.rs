//! # hypura: LLM inference for GGUF models that may not fit in memory
//!
//! hypura runs Llama, Qwen2 and Mixtral GGUF files on candle. Its aim is to place every tensor on
//! the tier that serves it best — compute-device memory, the memory-mapped file in RAM, or NVMe
//! read on demand — from a measured hardware profile, and to stream what does not fit.
//!
//! ## Design
//! ```text
//! GGUF header ──► gguf::ModelFiles (index: name, type, shape, file, offset) ──► gguf::ModelConfig
//!                      │
//! hardware::Profile ───┼──► plan::plan (pure) ──► Plan { tier per tensor, stream groups, pool,
//! budgets, --place ────┘                                  lookahead, predicted bytes & tok/s }
//!                      ▼
//!               storage::WeightStore ── serves each tensor as a storage::Weight:
//!                      │                  device buffer | mapped file view | streamed slab
//!                      │                  (storage::Streamer: direct-I/O pool + prefetch)
//!                      │                ── and each MoE layer's experts as a storage::ExpertSet
//!                      ▼                  (resident, or storage::ExpertCache: on demand + prefetch,
//!                                          adjacent experts' slices merged into one read)
//!               models::Transformer (Llama / Qwen2 / Mixtral forward, KV cache)
//!                      │   CUDA, all weights on the GPU: single-token steps on
//!                      │   backend::FusedDecode (hypura_kernels::cuda, one CUDA graph per step);
//!                      │   CUDA, any placement: a prompt batch's attention in one kernel
//!                      │   (backend::flash_attention)
//!                      │
//!   tokenizer::Tokenizer (from GGUF metadata) ── generate (sampling, loop, perplexity) ── CLI
//!                      │
//!   chat::ChatTemplate (the GGUF's Jinja or a built-in format) ── serve (HTTP: Ollama + OpenAI
//!                                                   APIs; one worker thread owns the model)
//! ```
//! Boundaries that hold: **models know no tiers** (they read weights only through
//! [`storage::Weight`] and name no file, device buffer or mmap); **storage knows no models**
//! (it serves byte ranges of files); the GGUF reader reads headers, never tensor data, and turns
//! every malformed input into an [`Error`] that names the file; **the planner does no I/O**.
//!
//! | module | what |
//! | --- | --- |
//! | [`gguf`] | header parser, typed metadata, split files, writer |
//! | [`hardware`] | the machine profile: RAM (cgroup-aware), memory and disk bandwidth |
//! | [`plan`] | the planner (pure) and the placement storage carries out |
//! | [`storage`] | memory maps, direct I/O, the stream pool, the [`storage::Weight`] type |
//! | [`models`] | the decoder, attention, RoPE, MoE |
//! | [`backend`] | the compute device; on CUDA, the fused single-token decoder and prompt flash attention |
//! | [`tokenizer`] | SentencePiece and byte-level BPE vocabularies from GGUF metadata |
//! | [`generate`] | sampling, the generation loop, perplexity |
//! | [`chat`] | chat templates (the GGUF's Jinja, built-in fallbacks), multi-turn conversations |
//! | `serve` | the Ollama- and OpenAI-compatible HTTP server (feature `server`, on by default) |
//! | [`hub`] | model references: paths, Hugging Face Hub, the bundled model |
//! | [`loader`] | all of the above in one call |
//! | [`synth`] | writes synthetic GGUF models with random weights |
//! | [`optimize`] | rewrites MoE files so that experts read together lie together (same logits) |
//!
//! ## Example
//! Generate 8 tokens greedily with the bundled model (random weights, so the text is gibberish):
//! ```
//! use std::ops::ControlFlow;
//! use hypura::generate::{generate, GenerateOptions, Sampler, SamplingParams};
//! use hypura::loader::{load, LoadOptions};
//!
//! # fn main() -> hypura::Result<()> {
//! let path = hypura::hub::bundled_model_path()?;
//! let mut m = load(&path, &LoadOptions::default())?;
//! let prompt = m.tokenizer.encode("Once upon a time", true, false)?;
//! let mut sampler = Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() });
//! let opts = GenerateOptions { max_new_tokens: 8, ..Default::default() };
//! let mut out = Vec::new();
//! let stats = generate(&mut m.model, &prompt, &opts, &mut sampler, &mut |id| {
//!     out.push(id);
//!     Ok(ControlFlow::Continue(()))
//! })?;
//! assert_eq!(out.len(), 8);
//! println!("{} ({:.1} tok/s)", m.tokenizer.decode(&out)?, stats.generate_tok_s());
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod chat;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hardware;
pub mod hub;
pub mod loader;

pub mod models;
pub mod optimize;
pub mod plan;
#[cfg(feature = "server")]
pub mod serve;
pub mod storage;
pub mod synth;
pub mod tokenizer;

pub use error::{Error, Result};
