pub mod backend;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod models;
pub mod storage;
pub mod synth;
pub mod tokenizer;

pub use error::{Error, Result};
