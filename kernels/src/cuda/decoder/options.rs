//! What a [`Decoder`](super::Decoder) is set up with: its options, the kernels it loads from
//! decode.cu, and the shared memory its staged kernels may take (the step's sequence is in
//! decoder.rs).

use std::collections::HashMap;

use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream};

use super::driver;
use crate::KernelError;

/// Lets the staged kernels (`matvec_norm_st_*`, `moe_down_st_*`, which copy weights into shared
/// memory) take what the device allows a block past the default 48 KiB, and returns how much that
/// is.
pub(super) fn allow_staged_smem(
    stream: &CudaStream,
    funcs: &HashMap<&'static str, CudaFunction>,
) -> Result<usize, KernelError> {
    let optin = stream
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_err(driver("shared memory limit"))?;
    let mut max = usize::MAX;
    let staged = |n: &str| n.starts_with("matvec_norm_st_") || n.starts_with("moe_down_st_");
    for (name, f) in funcs.iter().filter(|(n, _)| staged(n)) {
        let fixed = f
            .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
            .map_err(driver(name))?;
        let dynamic = (optin - fixed).max(0);
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            dynamic,
        )
        .map_err(driver(name))?;
        max = max.min(dynamic as usize);
    }
    Ok(if max == usize::MAX { 0 } else { max })
}

/// How a [`Decoder`] launches its steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Capture each step into a CUDA graph (per attention shape) and replay it; otherwise
    /// launch the kernels one by one. Same results either way.
    pub graph: bool,
    /// Inside the graph, launch each kernel as a programmatic dependent launch (sm_90: the
    /// next kernel's blocks are placed while the previous kernel's last wave runs; every kernel
    /// waits for the previous one's results first, so results are the same).
    pub dependent_launch: bool,
    /// Fold RMS norms into the mat-vecs that produce and consume them where the kernels allow
    /// (decoder/norms.rs): two launches fewer per dense layer, the same products up to float
    /// rounding.
    pub fold_norms: bool,
    /// MoE blocks with an F32 router: its product and the routing in one kernel
    /// (`moe_router`) instead of a mat-vec and `moe_route`.
    pub fused_router: bool,
    /// Down (dense and experts') with k-quant rows staged through shared memory
    /// (`matvec_norm_st_*`, `moe_down_st_*`) where the device allows the shared memory; otherwise
    /// read in place (`*_qin_*`). Same products up to float rounding.
    pub staged_down: bool,
    /// Time every [`Decoder::step`] (GPU time from two events, host time around the launch and
    /// the download) and print the means when the decoder is dropped (decoder/clock.rs).
    pub step_clock: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            graph: true,
            dependent_launch: true,
            fold_norms: true,
            fused_router: true,
            staged_down: true,
            step_clock: false,
        }
    }
}

/// GPU time of one kernel label over a profiled step.
#[derive(Debug, Clone)]
pub struct KernelTime {
    pub label: String,
    pub launches: usize,
    pub total_us: f64,
}

pub(super) const KERNELS: &[&str] = &[
    "matvec_1_1",
    "matvec_1_2",
    "matvec_2_1_q4_k",
    "matvec_2_1_q5_k",
    "matvec_2_1_q6_k",
    "matvec_2_1_q8_0",
    "matvec_2_1_f32",
    "matvec_2_2",
    "matvec_qkv_1_1",
    "matvec_qkv_1_2",
    "matvec_qkv_2_1",
    "matvec_qkv_2_2",
    "matvec_swiglu",
    "matvec_norm_q4_k",
    "matvec_norm_q5_k",
    "matvec_norm_q6_k",
    "matvec_norm_q8_0",
    "matvec_norm_f32",
    "matvec_norm_qin_q4_k",
    "matvec_norm_qin_q5_k",
    "matvec_norm_qin_q6_k",
    "matvec_norm_st_q4_k",
    "matvec_norm_st_q5_k",
    "matvec_norm_st_q6_k",
    "embed_q4_k",
    "embed_q5_k",
    "embed_q6_k",
    "embed_q8_0",
    "embed_f32",
    "rms_norm",
    "rms_norm4",
    "attention_32_4",
    "attention_8_4",
    "attention_32_1_256",
    "attention_8_2_256",
    "attention_merge",
    "quantize_q8",
    "moe_combine",
    "moe_route",
    "moe_router",
    "moe_swiglu",
    "moe_down_1_1",
    "moe_down_1_2",
    "moe_down_2_1",
    "moe_down_2_2",
    "moe_down_qin_q4_k",
    "moe_down_qin_q5_k",
    "moe_down_qin_q6_k",
    "moe_down_st_q4_k",
    "moe_down_st_q5_k",
    "moe_down_st_q6_k",
    "argmax_next",
    "topk_blocks",
];
