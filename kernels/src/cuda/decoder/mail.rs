//! The mailbox through which a step asks the host for experts that are not in device memory:
//! `struct MoeMail` of decode.cu, in page-locked host memory mapped into the device's address
//! space. `moe_route` writes a request (block, chosen ids) and bumps `req`, then waits until
//! `done` equals it; the host polls `req` ([`Mail::request`]), serves it and writes `done`
//! ([`Mail::answer`]). Each side writes only its own fields.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaContext, PinnedHostSlice};

use super::driver;
use crate::cuda::MAX_EXPERTS_USED;
use crate::KernelError;

/// decode.cu's `struct MoeMail`, field for field.
#[repr(C)]
struct MoeMail {
    req: u32,
    layer: u32,
    n: u32,
    ids: [u32; MAX_EXPERTS_USED],
    done: u32,
    timeouts: u32,
}

/// A request the device posted: block `layer` chose `ids`, some not in device memory.
pub(super) struct Request {
    pub seq: u32,
    pub layer: usize,
    pub ids: Vec<usize>,
}

pub(super) struct Mail {
    /// Owns the memory `ptr` points into.
    _host: PinnedHostSlice<u8>,
    /// The mailbox as the host sees it, in `host`.
    ptr: *mut MoeMail,
    /// The same memory as the kernels see it.
    pub device_ptr: u64,
}

// SAFETY: the mailbox is host memory owned by `_host`; the host side touches it only through
// `&Mail` with volatile accesses to fields the device does not write (or reads of fields it
// does), so sharing the pointer across threads adds no data race the device does not already
// have with a single thread.
unsafe impl Send for Mail {}

impl Mail {
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self, KernelError> {
        let len = std::mem::size_of::<MoeMail>();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: `len` bytes of uninitialised page-locked memory, zeroed below before anything
        // (host or device) reads them.
        let mut host = unsafe { ctx.alloc_pinned_with_flags::<u8>(len, flags) }
            .map_err(driver("mapped host alloc"))?;
        let ptr = host.as_mut_ptr().map_err(driver("mapped host alloc"))? as *mut MoeMail;
        // SAFETY: `ptr` is `len` writable bytes owned by `_host`, and u8-aligned allocations from
        // the driver are page-aligned (so aligned for `MoeMail`'s u32s).
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, len) };
        let mut device_ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` was allocated with CU_MEMHOSTALLOC_DEVICEMAP in a context bound to this
        // thread (alloc_pinned_with_flags binds it); the driver writes one device address.
        let r = unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, ptr as *mut std::ffi::c_void, 0)
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(KernelError(format!(
                "mapping the expert mailbox into device memory: {r:?}"
            )));
        }
        Ok(Mail {
            _host: host,
            ptr,
            device_ptr,
        })
    }

    /// The device's latest request, if the host has not answered it.
    pub fn request(&self) -> Option<Request> {
        // SAFETY: `ptr` is valid for the mailbox's lifetime (owned by `_host`); the reads are
        // volatile because the device writes these fields concurrently.
        unsafe {
            let m = self.ptr;
            let req = std::ptr::addr_of!((*m).req).read_volatile();
            if req == std::ptr::addr_of!((*m).done).read_volatile() {
                return None;
            }
            // The device wrote the fields before `req` (with a system fence between).
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            let layer = std::ptr::addr_of!((*m).layer).read_volatile() as usize;
            let n = (std::ptr::addr_of!((*m).n).read_volatile() as usize).min(MAX_EXPERTS_USED);
            let ids = (0..n)
                .map(|r| std::ptr::addr_of!((*m).ids[r]).read_volatile() as usize)
                .collect();
            Some(Request {
                seq: req,
                layer,
                ids,
            })
        }
    }

    /// Lets the device go on past request `seq`.
    pub fn answer(&self, seq: u32) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: as in `request`; `done` is written only by the host.
        unsafe { std::ptr::addr_of_mut!((*self.ptr).done).write_volatile(seq) };
    }

    /// How many requests the device stopped waiting for so far.
    pub fn timeouts(&self) -> u32 {
        // SAFETY: as in `request`.
        unsafe { std::ptr::addr_of!((*self.ptr).timeouts).read_volatile() }
    }
}
