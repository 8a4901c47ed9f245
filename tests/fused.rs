//! The fused CUDA decoder (`hypura::backend::FusedDecode`): single-token steps on hypura's own
//! kernels replayed from a CUDA graph, against candle's ops on the same GPU and against
//! llama.cpp. CUDA builds only (there is no fused path elsewhere).
#![cfg(feature = "cuda")]

mod common;

use candle_core::Device;
use common::*;
use hypura::gguf::{ModelFiles, TensorType};
use hypura::models::{LanguageModel, Logits, Transformer};

/// Whether the fused decoder must take this file: a model (dense or mixture-of-experts, loaded
/// whole onto the GPU: its experts are routed on the device and the step is a graph too) whose
/// matrices are all in a format its kernels read (float weights run as F32).
fn eligible(gguf: &std::path::Path) -> bool {
    let files = ModelFiles::open(gguf).unwrap();
    files.tensors.iter().filter(|t| t.dims.len() >= 2).all(|t| {
        matches!(
            t.ty,
            TensorType::F32
                | TensorType::F16
                | TensorType::BF16
                | TensorType::Q4_K
                | TensorType::Q5_K
                | TensorType::Q6_K
                | TensorType::Q8_0
        )
    })
}

fn is_moe(gguf: &std::path::Path) -> bool {
    ModelFiles::open(gguf).unwrap().config().unwrap().is_moe()
}

const N_DECODE: usize = 8;

#[test]
fn cuda_fused_decode_matches_candle_and_llama_cpp() {
    let device = Device::new_cuda(0).expect("CUDA device 0");
    let (mut n_fused, mut n_moe) = (0, 0);
    for gguf in fixture_models() {
        let name = gguf.file_name().unwrap().to_string_lossy().to_string();
        let r = reference(&gguf);
        let mut model = load(&gguf, &device, 256);
        let expect = eligible(&gguf);
        assert_eq!(
            model.decode_path().starts_with("fused"),
            expect,
            "{name}: decode path '{}'",
            model.decode_path()
        );
        if !expect {
            continue;
        }
        let (_, fused) = prompt_then_decode(&mut model, &r, N_DECODE);
        assert!(
            model.decode_path().contains("graph"),
            "{name}: no CUDA graph ({})",
            model.decode_path()
        );
        // A second pass replays the graph over a reset cache: the same numbers.
        let (_, again) = prompt_then_decode(&mut model, &r, N_DECODE);
        assert_eq!(fused, again, "{name}: a replayed pass differs");

        // The same steps launched one by one (no graph): bit-identical.
        std::env::set_var("HYPURA_CUDA_GRAPH", "0");
        let mut direct = load(&gguf, &device, 256);
        std::env::remove_var("HYPURA_CUDA_GRAPH");
        let (_, d) = prompt_then_decode(&mut direct, &r, N_DECODE);
        assert!(!direct.decode_path().contains("graph"));
        assert_eq!(
            fused, d,
            "{name}: graph replay differs from direct launches"
        );
        if is_moe(&gguf) {
            n_moe += 1;
        }

        // candle's ops on the same GPU: within the fixture tolerance.
        let mut plain = load(&gguf, &device, 256);
        plain.disable_fused_decode();
        let (_, ops) = prompt_then_decode(&mut plain, &r, N_DECODE);
        let c = compare(&fused, &ops);
        eprintln!("{name}: fused vs candle {c:?}");
        assert_close("fused vs candle decode", &gguf, &c);

        // llama.cpp's decode logits, where the fixture has them.
        let path = sibling(&gguf, "ref.decode_logits.npy");
        if path.exists() {
            let theirs = read_npy_2d(&path);
            let n = theirs.len().min(N_DECODE);
            let c = compare(&fused[..n], &theirs[..n]);
            eprintln!("{name}: fused vs llama.cpp {c:?}");
            assert_close("fused decode vs llama.cpp", &gguf, &c);
        }
        n_fused += 1;
    }
    assert!(n_fused >= 3, "only {n_fused} fixtures ran fused");
    assert!(
        n_moe >= 3,
        "only {n_moe} mixture-of-experts fixtures ran fused"
    );
}

/// Decode steps where a head's keys are split over blocks and merged, and where the decoder
/// switches to its long-context attention (and second graph) past 512 keys: fused steps against
/// candle's ops on the same GPU, at positions 250..=270 and 500..=520 of a 1024-token context.
#[test]
fn cuda_fused_decode_long_contexts_match_candle() {
    let device = Device::new_cuda(0).expect("CUDA device 0");
    let gguf = fixture_models()
        .into_iter()
        .find(|g| g.to_string_lossy().contains("small-llama-Q4_K_M"))
        .expect("the small-llama Q4_K_M fixture");
    let r = reference(&gguf);
    let mut fused = load(&gguf, &device, 1024);
    assert!(
        fused.decode_path().starts_with("fused"),
        "{}",
        fused.decode_path()
    );
    let mut plain = load(&gguf, &device, 1024);
    plain.disable_fused_decode();
    for n_prompt in [250, 500] {
        // The fixture's prompt repeated to n_prompt tokens, then 21 of its greedy tokens.
        let prompt: Vec<u32> = ids(&r["fixed_prompt"]["ids"])
            .into_iter()
            .cycle()
            .take(n_prompt)
            .collect();
        let steps: Vec<u32> = ids(&r["fixed_prompt"]["greedy_ids"])
            .into_iter()
            .cycle()
            .take(21)
            .collect();
        let run = |model: &mut Transformer| -> Vec<Vec<f32>> {
            model.reset();
            model.forward(&prompt, Logits::Last).unwrap();
            steps
                .iter()
                .map(|&id| {
                    let l = model.forward(&[id], Logits::Last).unwrap();
                    l.to_vec2::<f32>().unwrap().remove(0)
                })
                .collect()
        };
        let c = compare(&run(&mut fused), &run(&mut plain));
        eprintln!(
            "positions {n_prompt}..={}: fused vs candle {c:?}",
            n_prompt + 20
        );
        assert_close("fused vs candle decode at long contexts", &gguf, &c);
    }
}

/// A fresh temporary directory for synthetic models (`hypura-<tag>-<pid>`) and the vocabulary
/// they borrow (small-llama's metadata).
fn synth_dir(tag: &str) -> (std::path::PathBuf, hypura::gguf::Metadata) {
    let vocab = ModelFiles::open(&fixtures_dir().join("small-llama/small-llama-Q4_K_M.gguf"))
        .unwrap()
        .metadata;
    let dir = std::env::temp_dir().join(format!("hypura-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    (dir, vocab)
}

/// The staged down kernels (`matvec_norm_st_*`, `moe_down_st_*`: k-quant rows with `n_ff` a
/// multiple of 2048, which no fixture has): synthetic Llama files with `n_ff` 4096, dense Q4_K_M
/// (Q4_K and Q6_K downs) and Q5_K_M, and MoE Q4_K_M. The fused decoder staging its downs against
/// the same decoder reading them in place (`HYPURA_CUDA_STAGED=0`: the `_qin_` kernels, the same
/// int8 products summed in another order), and against candle's ops on the same GPU.
#[test]
fn cuda_staged_down_matches_in_place_and_candle() {
    use hypura::gguf::Arch;
    use hypura::synth::{write_model, SynthSpec};
    let device = Device::new_cuda(0).expect("CUDA device 0");
    let (dir, vocab) = synth_dir("staged");
    for (ty, n_expert) in [
        (TensorType::Q4_K, 0),
        (TensorType::Q5_K, 0),
        (TensorType::Q4_K, 4),
    ] {
        let spec = SynthSpec {
            arch: Arch::Llama,
            name: format!("staged {ty} x{n_expert}"),
            n_embd: 256,
            n_layer: 8, // Q6_K downs in layers 0, 3, 6 and 7 (llama-quantize's use_more_bits)
            // Two runs of 8 super-blocks a row: at 2048 the staged and in-place kernels add the
            // same products in the same order (bit-identical logits).
            n_ff: 4096,
            n_head: 8,
            n_head_kv: 2,
            n_expert,
            n_expert_used: if n_expert > 0 { 2 } else { 0 },
            ty,
            k_medium: true,
            seed: 7,
            ..SynthSpec::default()
        };
        let gguf = dir.join(format!("staged-{ty}-{n_expert}.gguf"));
        write_model(&spec, &vocab, &gguf).unwrap();
        let name = gguf.file_name().unwrap().to_string_lossy().to_string();
        let run = |model: &mut Transformer| -> Vec<Vec<f32>> {
            let prompt: Vec<u32> = (1..17).collect();
            model.reset();
            model.forward(&prompt, Logits::Last).unwrap();
            (0..N_DECODE as u32)
                .map(|i| {
                    let l = model.forward(&[20 + 3 * i], Logits::Last).unwrap();
                    l.to_vec2::<f32>().unwrap().remove(0)
                })
                .collect()
        };
        let mut staged = load(&gguf, &device, 256);
        assert!(
            staged.decode_path().starts_with("fused"),
            "{name}: {}",
            staged.decode_path()
        );
        let s = run(&mut staged);
        std::env::set_var("HYPURA_CUDA_STAGED", "0");
        let mut in_place = load(&gguf, &device, 256);
        std::env::remove_var("HYPURA_CUDA_STAGED");
        let p = run(&mut in_place);
        let c = compare(&s, &p);
        eprintln!("{name}: staged vs in place {c:?}");
        // The same products summed in another order: a rounding apart, which the next layers'
        // int8 copies turn into whole quantization steps (on an H200, Q4_K_M: max |Δ| 0.046,
        // about what fused vs candle gives), so the bar is the fixtures' own...
        assert_close("staged vs in-place down", &gguf, &c);
        // ...and not bit-identical, so the staged kernels did run.
        assert!(c.max_abs > 0.0, "{name}: staging changed nothing");
        let mut plain = load(&gguf, &device, 256);
        plain.disable_fused_decode();
        let c = compare(&s, &run(&mut plain));
        eprintln!("{name}: staged vs candle {c:?}");
        assert_close("staged fused vs candle decode", &gguf, &c);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Prompt batches' one-kernel attention (`backend::flash_attention`, F16 tensor cores) against
/// candle's ops on the same GPU, from an empty cache and at depth, on heads 128 and 64 wide
/// (the fixtures' are 32 and 8: the fidelity suite covers 32 against llama.cpp).
#[test]
fn cuda_flash_attention_matches_candle_at_depth() {
    use hypura::gguf::Arch;
    use hypura::synth::{write_model, SynthSpec};
    let device = Device::new_cuda(0).expect("CUDA device 0");
    let (dir, vocab) = synth_dir("flash");
    for (ty, n_embd, n_head) in [
        (TensorType::F32, 512, 4),
        (TensorType::Q4_K, 512, 4),
        (TensorType::F32, 512, 8),
    ] {
        let spec = SynthSpec {
            arch: Arch::Llama,
            name: format!("flash {ty} {n_head}"),
            n_embd,
            n_layer: 2,
            n_ff: 1024,
            n_head,
            n_head_kv: 2,
            ty,
            k_medium: true,
            seed: 11,
            ..SynthSpec::default()
        };
        let gguf = dir.join(format!("flash-{ty}-{n_head}.gguf"));
        write_model(&spec, &vocab, &gguf).unwrap();
        // 70 tokens from an empty cache, then 130 at depth 70: both batches' logits.
        let run = |model: &mut Transformer| -> Vec<Vec<f32>> {
            model.reset();
            let a: Vec<u32> = (0..70).map(|i| 1 + (i * 37) % 500).collect();
            let b: Vec<u32> = (0..130).map(|i| 1 + (i * 53) % 500).collect();
            let mut rows = model
                .forward(&a, Logits::All)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            rows.extend(
                model
                    .forward(&b, Logits::All)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
            );
            rows
        };
        let name = gguf.file_name().unwrap().to_string_lossy().to_string();
        let flash = run(&mut load(&gguf, &device, 256));
        let mut plain = load(&gguf, &device, 256);
        plain.disable_flash_attention();
        let c = compare(&flash, &run(&mut plain));
        eprintln!("{name}: flash vs candle attention {c:?}");
        assert_close("flash vs candle prompt attention", &gguf, &c);
        assert!(c.max_abs > 0.0, "{name}: the flash kernel did not run");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Greedy generation's chains (`Decoder::greedy_chain`: each step's argmax picked on the device
/// and fed to the next step before the host reads it) against the same fused model stepped one
/// token at a time with the host's argmax: the same tokens, the same cache length, and the same
/// logits when decoding goes on after the chain. Run across the 256-key boundary (a second greedy
/// graph captured mid-chain), and ended each way a chain ends: the token limit, an
/// end-of-generation token (the step launched ahead of it discarded), the context filling up.
#[test]
fn cuda_greedy_chain_matches_stepping_with_host_argmax() {
    use hypura::generate::{
        argmax, generate, GenerateOptions, Sampler, SamplingParams, StopReason,
    };
    let device = Device::new_cuda(0).expect("CUDA device 0");
    let mut n_models = 0;
    for gguf in fixture_models().into_iter().filter(|g| eligible(g)) {
        let name = gguf.file_name().unwrap().to_string_lossy().to_string();
        let r = reference(&gguf);
        let n_ctx = 300;
        let mut model = load(&gguf, &device, n_ctx);
        let prompt: Vec<u32> = ids(&r["fixed_prompt"]["ids"])
            .into_iter()
            .cycle()
            .take(240)
            .collect();
        // The reference: one step at a time, the host's argmax of each step's logits.
        let stepped = |model: &mut Transformer, n: usize| -> Vec<u32> {
            model.reset();
            let l = model.forward(&prompt, Logits::Last).unwrap();
            let mut out = vec![argmax(&l.to_vec2::<f32>().unwrap()[0])];
            while out.len() < n && model.n_past() < n_ctx {
                let l = model
                    .forward(&[*out.last().unwrap()], Logits::Last)
                    .unwrap();
                out.push(argmax(&l.to_vec2::<f32>().unwrap()[0]));
            }
            out
        };
        let want = stepped(&mut model, n_ctx);
        let chained = |model: &mut Transformer, max: usize, stop: Vec<u32>| {
            model.reset();
            let mut got = Vec::new();
            let opts = GenerateOptions {
                max_new_tokens: max,
                stop_ids: stop,
                batch_size: 512,
            };
            let mut sampler = Sampler::new(SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            });
            let stats = generate(model, &prompt, &opts, &mut sampler, &mut |id| {
                got.push(id);
                Ok(std::ops::ControlFlow::Continue(()))
            })
            .unwrap();
            (got, stats)
        };
        // The token limit, across 256 keys (positions 240..=269).
        let (got, stats) = chained(&mut model, 30, vec![]);
        assert_eq!(got, want[..30], "{name}: chained tokens differ");
        assert_eq!(stats.stop, StopReason::MaxTokens);
        assert_eq!(stats.n_decoded, 29, "{name}");
        assert_eq!(model.n_past(), 240 + 29, "{name}");
        // Decoding on from the chain's cache: the logits of stepping there all along.
        let next = model
            .forward(&[want[29]], Logits::Last)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        stepped(&mut model, 30);
        let expect = model
            .forward(&[want[29]], Logits::Last)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(next, expect, "{name}: the chain's cache differs");
        // An end-of-generation token: the 12th token, or the first later one not seen before.
        let stop_at = (11..want.len())
            .chain(0..11)
            .find(|&i| !want[..i].contains(&want[i]))
            .unwrap();
        let (got, stats) = chained(&mut model, 100, vec![want[stop_at]]);
        assert_eq!(got, want[..stop_at], "{name}: tokens before the stop token");
        assert_eq!(stats.stop, StopReason::EndOfGeneration);
        assert_eq!(model.n_past(), 240 + stop_at, "{name}");
        // The context filling up: every token up to n_ctx.
        let (got, stats) = chained(&mut model, 1000, vec![]);
        assert_eq!(stats.stop, StopReason::ContextFull, "{name}");
        assert_eq!(got, want, "{name}: tokens up to a full context");
        assert_eq!(model.n_past(), n_ctx, "{name}");
        // Without chains (one step at a time through the host): the same tokens.
        std::env::set_var("HYPURA_CUDA_CHAIN", "0");
        let (got, _) = chained(&mut model, 30, vec![]);
        std::env::remove_var("HYPURA_CUDA_CHAIN");
        assert_eq!(got, want[..30], "{name}: HYPURA_CUDA_CHAIN=0");
        eprintln!(
            "{name}: greedy chains match ({} tokens, stop token at {stop_at})",
            want.len()
        );
        n_models += 1;
    }
    assert!(n_models >= 3, "only {n_models} fixtures ran greedy chains");
}

/// Top-k sampling from the candidates the device picks (`Decoder::step_top_blocks`: only the
/// blocks of 64 logits that can hold the k largest reach the host) against the same fused model
/// downloading every logit (`HYPURA_CUDA_TOPK=0`): the same tokens from the same seed. The
/// fixtures' 512-token vocabulary is 8 blocks, so k runs 1..=7 (k = 8 takes every logit).
#[test]
fn cuda_top_k_candidates_on_the_device_sample_what_all_logits_sample() {
    use hypura::generate::{generate, GenerateOptions, Sampler, SamplingParams};
    let device = Device::new_cuda(0).expect("CUDA device 0");
    let mut n_models = 0;
    for gguf in fixture_models().into_iter().filter(|g| eligible(g)) {
        let name = gguf.file_name().unwrap().to_string_lossy().to_string();
        let r = reference(&gguf);
        let mut model = load(&gguf, &device, 256);
        let prompt = ids(&r["fixed_prompt"]["ids"]);
        let run = |model: &mut Transformer, top_k: usize| -> Vec<u32> {
            model.reset();
            let mut got = Vec::new();
            let opts = GenerateOptions {
                max_new_tokens: 40,
                ..GenerateOptions::default()
            };
            let mut sampler = Sampler::new(SamplingParams {
                temperature: 1.5, // flat enough that the draws spread over the candidates
                top_k,
                seed: Some(3),
                ..SamplingParams::default()
            });
            generate(model, &prompt, &opts, &mut sampler, &mut |id| {
                got.push(id);
                Ok(std::ops::ControlFlow::Continue(()))
            })
            .unwrap();
            got
        };
        for top_k in [1, 3, 7] {
            let picked = run(&mut model, top_k);
            std::env::set_var("HYPURA_CUDA_TOPK", "0");
            let all = run(&mut model, top_k);
            std::env::remove_var("HYPURA_CUDA_TOPK");
            assert_eq!(picked, all, "{name}: top-k {top_k}");
            assert_eq!(picked.len(), 40, "{name}");
        }
        eprintln!("{name}: top-k candidates from the device sample the same tokens");
        n_models += 1;
    }
    assert!(n_models >= 3, "only {n_models} fixtures ran");
}
