//! Writes `models/hypura-tiny-random-Q8_0.gguf`, the model bundled with hypura (random weights).
//!
//!     cargo run --release --example make_bundled_model

use std::path::Path;

use hypura::gguf::{Arch, ModelFiles, TensorType};
use hypura::synth::{write_model, SynthSpec};

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The vocabulary: the 512-token byte-level BPE (llama-bpe) of the small-llama fixture.
    let vocab =
        ModelFiles::open(&root.join("tests/fixtures/small-llama/small-llama-F32.gguf"))?.metadata;
    let spec = SynthSpec {
        arch: Arch::Llama,
        name: "hypura tiny random (weights are random)".into(),
        n_embd: 256,
        n_layer: 4,
        n_ff: 768,
        n_head: 8,
        n_head_kv: 2,
        n_expert: 0,
        n_expert_used: 0,
        rope_freq_base: 10000.0,
        rms_eps: 1e-5,
        ctx_len: 2048,
        tie_embeddings: false,
        ty: TensorType::Q8_0,
        seed: 20261123,
    };
    let out = root.join("models/hypura-tiny-random-Q8_0.gguf");
    write_model(&spec, &vocab, &out)?;
    println!(
        "wrote {} ({} bytes)",
        out.display(),
        std::fs::metadata(&out)?.len()
    );
    Ok(())
}
