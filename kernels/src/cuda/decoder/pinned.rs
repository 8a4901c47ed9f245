//! Page-locked host memory the decoder downloads into: the step's `[n_vocab]` logits cross the
//! bus in one DMA instead of through the driver's staging copies into pageable memory, and are
//! read in place there (a 128k vocabulary is 513 KB: copying it out cost ~30 µs a token); and
//! greedy chains' token ids (decoder/greedy.rs).

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};

use super::driver;
use crate::KernelError;

/// `len` values of page-locked host memory that device-to-host copies on one stream land in.
pub(super) struct Pinned<T> {
    /// Owns the memory `ptr` points into.
    _host: PinnedHostSlice<T>,
    ptr: *mut T,
    len: usize,
}

// SAFETY: `ptr` points into host memory owned by `_host`, written only by copies that `copy_in`
// issues (and its callers wait for before reading) and read only through `&self` borrows of
// the owning decoder, which is used through `&mut`: never shared between threads while in use.
unsafe impl<T> Send for Pinned<T> {}

impl<T: Copy + Default + DeviceRepr + ValidAsZeroBits> Pinned<T> {
    pub fn new(stream: &Arc<CudaStream>, len: usize, what: &str) -> Result<Self, KernelError> {
        // Flags 0: cached page-locked memory (the default write-combined kind is slow to read).
        // SAFETY: `len` uninitialised values, written below before anything reads them.
        let mut host = unsafe { stream.context().alloc_pinned_with_flags::<T>(len, 0) }
            .map_err(driver(what))?;
        let ptr = host.as_mut_ptr().map_err(driver(what))?;
        // SAFETY: `ptr` is `len` writable values owned by `host`.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }.fill(T::default());
        Ok(Pinned {
            _host: host,
            ptr,
            len,
        })
    }

    /// Queues a copy of `n` values from the device address `src` into `self[at..at + n]` on
    /// `stream`, after the work already there. The caller waits for the stream (or an event
    /// recorded after this) before reading them.
    pub fn copy_in(
        &mut self,
        stream: &CudaStream,
        src: u64,
        at: usize,
        n: usize,
    ) -> Result<(), KernelError> {
        assert!(at + n <= self.len, "a pinned copy past its buffer");
        stream
            .context()
            .bind_to_thread()
            .map_err(driver("device-to-host copy"))?;
        // SAFETY: `self.ptr + at` is `n` writable values of page-locked memory owned by
        // `_host` (checked above); `src` is a device buffer of the decoder holding at least `n`
        // values, alive while the decoder is; the copy is ordered on `stream` after the work
        // that writes `src`, and readers wait for it.
        let r = unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                self.ptr.add(at) as *mut std::ffi::c_void,
                src,
                n * std::mem::size_of::<T>(),
                stream.cu_stream(),
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(KernelError(format!("CUDA device-to-host copy: {r:?}")));
        }
        Ok(())
    }

    /// The values, as the last waited-for copies left them.
    pub fn get(&self) -> &[T] {
        // SAFETY: `len` initialised values (filled at creation, then only written by copies the
        // caller has waited for), owned by `_host`, alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// The logits' download target.
pub(super) struct HostLogits(Pinned<f32>);

impl HostLogits {
    pub fn new(stream: &Arc<CudaStream>, len: usize) -> Result<Self, KernelError> {
        Ok(HostLogits(Pinned::new(
            stream,
            len,
            "page-locked logits alloc",
        )?))
    }

    /// Copies the logits from the device address `src` (written by work already on `stream`)
    /// after that work, waits, and returns them in place.
    pub fn download(&mut self, stream: &CudaStream, src: u64) -> Result<&[f32], KernelError> {
        let n = self.0.len;
        self.0.copy_in(stream, src, 0, n)?;
        stream.synchronize().map_err(driver("synchronize"))?;
        Ok(self.0.get())
    }

    /// The last downloaded logits.
    pub fn get(&self) -> &[f32] {
        self.0.get()
    }
}
