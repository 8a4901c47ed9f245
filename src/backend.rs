//! The compute backend: which device runs the model, and the CPU kernel policy.

use candle_core::Device;

use crate::error::Result;

/// Picks the compute device: CUDA device 0 or Metal when compiled in and present, else the CPU.
pub fn best_device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    if candle_core::utils::cuda_is_available() {
        return Ok(Device::new_cuda(0)?);
    }
    #[cfg(feature = "metal")]
    if candle_core::utils::metal_is_available() {
        return Ok(Device::new_metal(0)?);
    }
    Ok(Device::Cpu)
}

/// Sets the CPU thread count used by candle's kernels. Must run before the first tensor op.
pub fn set_cpu_threads(n: usize) {
    if n > 0 {
        // SAFETY-free: edition 2021 `set_var`; called at start-up before worker threads exist.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
