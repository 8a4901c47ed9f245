//! Run a Llama-family GGUF (Llama 2, Llama 3.x, Mistral) with hypura.
//!
//!     cargo run --release --example llama -- --help
//!     cargo run --release --example llama -- --model path/to/llama.gguf -p "Hello"

mod common;

/// Llama 3.2 1B Instruct, Q4_K_M (~0.8 GB).
const DEFAULT_MODEL: &str =
    "bartowski/Llama-3.2-1B-Instruct-GGUF:Llama-3.2-1B-Instruct-Q4_K_M.gguf";

fn main() {
    common::run("Llama", DEFAULT_MODEL)
}
