//! Run a Mixtral (mixture-of-experts) GGUF with hypura.
//!
//!     cargo run --release --example mixtral -- --help
//!     cargo run --release --example mixtral -- --model path/to/mixtral.gguf -p "Hello"
//!
//! The default, Mixtral 8x7B Instruct at Q4_K_M, is a 26 GB download.

mod common;

const DEFAULT_MODEL: &str =
    "TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF:mixtral-8x7b-instruct-v0.1.Q4_K_M.gguf";

fn main() {
    common::run("Mixtral", DEFAULT_MODEL)
}
