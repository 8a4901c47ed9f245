//! Device addresses of tensors that live in CUDA memory, for hypura's own CUDA kernels (the
//! fused decoder in `hypura_kernels::cuda`). The only place that turns a candle tensor into a raw
//! device address: each [`DeviceBytes`] keeps the tensor alive.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Storage, Tensor};
use hypura_kernels::cuda::DeviceBytes;

use crate::error::Result;

/// The bytes of a contiguous F32 tensor in CUDA memory; `None` for any other tensor.
pub fn f32_bytes(t: &Tensor) -> Result<Option<DeviceBytes>> {
    let Device::Cuda(dev) = t.device() else {
        return Ok(None);
    };
    if t.dtype() != DType::F32 || !t.is_contiguous() {
        return Ok(None);
    }
    let stream = dev.cuda_stream();
    let ptr = {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Ok(None);
        };
        let (base, _sync) = cs.as_cuda_slice::<f32>()?.device_ptr(&stream);
        base + (layout.start_offset() * 4) as u64
    };
    let len = t.elem_count() * 4;
    // SAFETY: `ptr..ptr + len` lies inside the tensor's CUDA allocation (contiguous, starting
    // at its layout offset). The allocation lives as long as the tensor, which `keep` holds;
    // candle never moves device allocations.
    Ok(Some(unsafe {
        DeviceBytes::from_raw(ptr, len, Arc::new(t.clone()))
    }))
}

/// The block bytes of a quantized tensor in CUDA memory.
pub fn quantized_bytes(q: &Arc<QTensor>) -> Result<Option<DeviceBytes>> {
    if !q.device().is_cuda() {
        return Ok(None);
    }
    let ptr = q.device_ptr()? as u64;
    let len = q.storage_size_in_bytes();
    // SAFETY: candle's CUDA QTensor storage is one allocation of at least
    // `storage_size_in_bytes()` bytes starting at `device_ptr()`, alive as long as the QTensor,
    // which `keep` holds.
    Ok(Some(unsafe { DeviceBytes::from_raw(ptr, len, q.clone()) }))
}
