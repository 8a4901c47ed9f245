//! Run a Qwen2 / Qwen2.5 GGUF with hypura.
//!
//!     cargo run --release --example qwen -- --help
//!     cargo run --release --example qwen -- --model path/to/qwen2.5.gguf -p "Hello"

mod common;

/// Qwen2.5 0.5B Instruct, Q4_K_M (~0.4 GB), from the Qwen team's own GGUF repository.
const DEFAULT_MODEL: &str = "Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf";

fn main() {
    common::run("Qwen2", DEFAULT_MODEL)
}
