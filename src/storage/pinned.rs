//! Page-locked host memory (CUDA builds): host→device copies run at full bus speed only from it.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaContext, PinnedHostSlice};

use crate::error::{Error, Result};

/// A zero-filled page-locked host buffer.
pub struct PinnedBuf(PinnedHostSlice<u8>);

impl PinnedBuf {
    /// `len` bytes of page-locked host memory, every byte zero.
    pub fn zeroed(ctx: &Arc<CudaContext>, len: usize) -> Result<Self> {
        // SAFETY: `alloc_pinned` hands back `len` bytes of uninitialised page-locked memory; the
        // only thing done with it before it is initialised is the `write_bytes` below.
        let mut s = unsafe { ctx.alloc_pinned::<u8>(len) }.map_err(cuda_error)?;
        let p = s.as_mut_ptr().map_err(cuda_error)?;
        // SAFETY: `p` points to `len` writable bytes owned by `s`, which outlives this call.
        unsafe { std::ptr::write_bytes(p, 0, len) };
        Ok(PinnedBuf(s))
    }

    pub fn host(&self) -> &PinnedHostSlice<u8> {
        &self.0
    }
}

/// A CUDA driver error as the library's error.
pub fn cuda_error(e: impl std::fmt::Display) -> Error {
    Error::Candle(candle_core::Error::Msg(format!("CUDA: {e}")))
}
