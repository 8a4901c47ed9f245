//! Writes `models/hypura-tiny-random-Q8_0.gguf`, the model bundled with hypura (random weights).
//!
//!     cargo run --release --example make_bundled_model
//!
//! The spec is [`SynthSpec::bundled`]: llama, d 256, 4 layers, ff 768, 8 heads / 2 KV heads,
//! context 2048, Q8_0 matrices, seed 20261123; the vocabulary (every `tokenizer.*` key) is the
//! 512-token byte-level BPE (`gpt2`, pre-tokenizer `llama-bpe`) of the small-llama test fixture.

use std::path::Path;

use hypura::gguf::ModelFiles;
use hypura::synth::{write_model, SynthSpec};

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let vocab =
        ModelFiles::open(&root.join("tests/fixtures/small-llama/small-llama-F32.gguf"))?.metadata;
    let out = root.join("models/hypura-tiny-random-Q8_0.gguf");
    write_model(&SynthSpec::bundled(), &vocab, &out)?;
    println!(
        "wrote {} ({} bytes)",
        out.display(),
        std::fs::metadata(&out)?.len()
    );
    Ok(())
}
