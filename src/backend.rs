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

/// Chooses candle's CPU kernels so that quantized matmuls do llama.cpp's arithmetic.
///
/// On AVX-512 CPUs candle repacks Q8_0 weights and multiplies them against activations quantized
/// to Q8_K (one scale per 256 values), where llama.cpp uses Q8_0 activations (one per 32). That
/// moved logits by up to 0.1 on the Q8_0 fixtures and flipped an MoE routing decision
/// (cosine 0.967 at one position of small-moe-Q8_0). candle's 256-bit tier keeps Q8_0 activations
/// (bit-identical to llama.cpp on those fixtures) and still repacks Q4_K. Called once, before the
/// first quantized matmul; the environment variable is candle's own switch.
pub fn configure_cpu_kernels() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("MISTRALRS_FORCE_AVX2").is_none() {
            std::env::set_var("MISTRALRS_FORCE_AVX2", "1");
        }
    });
}
