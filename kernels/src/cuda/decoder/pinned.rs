//! The logits' download target: page-locked host memory, so the step's `[n_vocab]` logits cross
//! the bus in one DMA instead of through the driver's staging copies into pageable memory.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaStream, PinnedHostSlice};

use super::driver;
use crate::KernelError;

pub(super) struct HostLogits {
    /// Owns the memory `ptr` points into.
    _host: PinnedHostSlice<f32>,
    ptr: *mut f32,
    len: usize,
    /// How long the last download's copy out of page-locked memory took (for the step clock).
    pub last_copy: std::time::Duration,
}

// SAFETY: `ptr` points into host memory owned by `_host`, written only by the copy
// `download` issues and waits for, and read only inside `download` through `&mut self`: the
// pointer is never shared between threads while in use.
unsafe impl Send for HostLogits {}

impl HostLogits {
    pub fn new(stream: &Arc<CudaStream>, len: usize) -> Result<Self, KernelError> {
        // Flags 0: cached page-locked memory (the default write-combined kind is slow to read).
        // SAFETY: `len` uninitialised floats; nothing reads them before `download` has copied
        // into all of them.
        let mut host = unsafe { stream.context().alloc_pinned_with_flags::<f32>(len, 0) }
            .map_err(driver("page-locked logits alloc"))?;
        let ptr = host
            .as_mut_ptr()
            .map_err(driver("page-locked logits alloc"))?;
        Ok(HostLogits {
            _host: host,
            ptr,
            len,
            last_copy: std::time::Duration::ZERO,
        })
    }

    /// Copies `len` floats from the device address `src` (written by work already on `stream`)
    /// after that work, waits, and returns them.
    pub fn download(&mut self, stream: &CudaStream, src: u64) -> Result<Vec<f32>, KernelError> {
        stream
            .context()
            .bind_to_thread()
            .map_err(driver("logits download"))?;
        let bytes = self.len * std::mem::size_of::<f32>();
        // SAFETY: `self.ptr` is `len` writable floats of page-locked memory owned by `_host`;
        // `src` is the decoder's `[n_vocab]` logits buffer (n_vocab = len), alive while the
        // decoder is; the copy is ordered after the step on `stream` and waited for below.
        let r = unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                self.ptr as *mut std::ffi::c_void,
                src,
                bytes,
                stream.cu_stream(),
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(KernelError(format!("CUDA logits download: {r:?}")));
        }
        stream.synchronize().map_err(driver("synchronize"))?;
        let t = std::time::Instant::now();
        // SAFETY: the copy into all `len` floats has completed (the stream is synchronized) and
        // nothing else writes them.
        let out = unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec();
        self.last_copy = t.elapsed();
        Ok(out)
    }
}
