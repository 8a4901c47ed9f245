//! The library's one error type. Every variant that concerns a file names it; I/O errors also carry
//! the operation and the byte offset, so a user can tell *which* read of *which* file failed.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O call failed.
    #[error("{path}: {op} at offset {offset} failed: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },

    /// The file is not a GGUF file we can trust (bad magic, truncated, offsets out of range, ...).
    #[error("{path}: invalid GGUF: {reason}")]
    InvalidGguf { path: PathBuf, reason: String },

    /// The GGUF is well formed but describes something hypura does not run.
    #[error("{path}: unsupported model: {reason}")]
    Unsupported { path: PathBuf, reason: String },

    /// A metadata key the architecture needs is absent or has the wrong type.
    #[error("{path}: metadata key '{key}': {reason}")]
    Metadata {
        path: PathBuf,
        key: String,
        reason: String,
    },

    /// A tensor the architecture needs is absent or has the wrong shape.
    #[error("{path}: tensor '{name}': {reason}")]
    Tensor {
        path: PathBuf,
        name: String,
        reason: String,
    },

    /// Building or running the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A model reference could not be resolved (bad path, Hub unreachable, not in the cache).
    #[error("model '{reference}': {reason}")]
    ModelSource { reference: String, reason: String },

    /// A request the caller made cannot be honoured (prompt longer than the context, bad option).
    #[error("{0}")]
    InvalidRequest(String),

    /// An error from the tensor framework.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
        offset: u64,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            op,
            path: path.into(),
            offset,
            source,
        }
    }
}
