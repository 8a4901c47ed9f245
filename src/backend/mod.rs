//! The compute backend: which device runs the model, and the CPU kernel policy.

use candle_core::Device;

#[cfg(feature = "cuda")]
mod flash;
#[cfg(feature = "cuda")]
mod fused;
#[cfg(feature = "cuda")]
pub use fused::FusedDecode;

use crate::error::Result;

/// A kernel's refusal or CUDA error as the library's error (the fused decoder, flash attention).
#[cfg(feature = "cuda")]
fn kernel_error(e: hypura_kernels::KernelError) -> crate::error::Error {
    crate::error::Error::Candle(candle_core::Error::Msg(e.to_string()))
}

/// Causal attention of a prompt batch in one kernel where the device has one (CUDA: see
/// `flash.rs`): `q` `[1, n_head, t, head_dim]` after RoPE at positions `pos..`, the KV cache `k`,
/// `v` `[1, n_head_kv, n_ctx, head_dim]` holding `pos + t` keys → `[t, n_head · head_dim]`;
/// `None` elsewhere (the caller runs candle's ops).
pub fn flash_attention(
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    pos: usize,
) -> Result<Option<candle_core::Tensor>> {
    #[cfg(feature = "cuda")]
    return flash::attention(q, k, v, pos);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, pos);
        Ok(None)
    }
}

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

/// Which CUDA kernels run single-row (decode) products of quantized weights, from
/// `HYPURA_CUDA_MATVEC`: `q8` (the default: candle's MMVQ kernels, which quantize the activations
/// to Q8_1 first, as llama.cpp's CUDA backend does; 151 vs 126 tok/s on an 8B Q4_K_M on an H200)
/// or `exact` (weights dequantized inside the kernel and multiplied with F32 activations). Both
/// meet the fixture tolerances against llama.cpp.
///
/// `HYPURA_CUDA_TF32`: F32 matmuls in cuBLAS (prompt batches: their quantized weights dequantized
/// to F32, F32 weights, attention) run by default on TF32 tensor cores (inputs rounded to
/// 10 mantissa bits, sums in F32: more precise than llama.cpp's own CUDA prompt path, which
/// quantizes activations to 8 bits); `0` for exact F32 (IEEE, on the CUDA cores). Set once per
/// process, before the first product.
#[cfg(feature = "cuda")]
pub fn configure_cuda() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let exact =
            std::env::var("HYPURA_CUDA_MATVEC").is_ok_and(|v| v.eq_ignore_ascii_case("exact"));
        candle_core::quantized::cuda::set_force_dmmv(exact);
        let tf32 = std::env::var("HYPURA_CUDA_TF32").map_or(true, |v| v != "0");
        candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
    });
}

/// The batch math a weight asking for `wanted` gets: `HYPURA_CUDA_BATCH=mmq` or `float`
/// overrides every weight's choice (read once per process); unset, each keeps its own.
#[cfg(feature = "cuda")]
pub fn cuda_batch_math(wanted: crate::storage::BatchMath) -> crate::storage::BatchMath {
    use crate::storage::BatchMath;
    static FORCED: std::sync::OnceLock<Option<BatchMath>> = std::sync::OnceLock::new();
    let forced = FORCED.get_or_init(|| match std::env::var("HYPURA_CUDA_BATCH").as_deref() {
        Ok("mmq") => Some(BatchMath::Int8),
        Ok("float") => Some(BatchMath::Float),
        _ => None,
    });
    forced.unwrap_or(wanted)
}
