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

/// A page-locked registration of host memory someone else owns (`cuMemHostRegister`): copies from
/// it to the device run asynchronously, at full bus speed. Unregistered on drop.
pub struct HostRegistration {
    ctx: Arc<CudaContext>,
    ptr: *mut std::ffi::c_void,
}

// SAFETY: the registration is a handle to driver state about an address range; it holds no
// Rust-visible data, and the driver API may be called from any thread that binds the context.
unsafe impl Send for HostRegistration {}
// SAFETY: as above; `&HostRegistration` exposes nothing.
unsafe impl Sync for HostRegistration {}

impl HostRegistration {
    /// Registers `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay allocated until the registration is dropped.
    pub unsafe fn new(ctx: &Arc<CudaContext>, ptr: *const u8, len: usize) -> Result<Self> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        ctx.bind_to_thread().map_err(cuda_error)?;
        let p = ptr as *mut std::ffi::c_void;
        // SAFETY: the caller guarantees the range is allocated for the registration's lifetime.
        let r = unsafe { sys::cuMemHostRegister_v2(p, len, sys::CU_MEMHOSTREGISTER_PORTABLE) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(cuda_error(format!(
                "registering {len} bytes of host memory as page-locked: {r:?}"
            )));
        }
        Ok(HostRegistration {
            ctx: ctx.clone(),
            ptr: p,
        })
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        use candle_core::cuda_backend::cudarc::driver::sys;
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` was registered by `new` and is still allocated (its contract).
            unsafe { sys::cuMemHostUnregister(self.ptr) };
        }
    }
}

/// An [`AlignedBuf`](super::AlignedBuf) registered as page-locked memory.
pub struct PinnedAligned {
    // Declared first: dropped (unregistered) before the buffer is freed.
    _reg: HostRegistration,
    buf: super::AlignedBuf,
}

impl PinnedAligned {
    /// Registers `buf` with the context.
    pub fn new(ctx: &Arc<CudaContext>, buf: super::AlignedBuf) -> Result<Self> {
        let s = buf.as_slice();
        // SAFETY: the registration is dropped before `buf` (field order), so the range stays
        // allocated while registered.
        let reg = unsafe { HostRegistration::new(ctx, s.as_ptr(), s.len())? };
        Ok(PinnedAligned { _reg: reg, buf })
    }

    pub fn as_slice(&self) -> &[u8] {
        self.buf.as_slice()
    }
}
