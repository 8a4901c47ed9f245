//! [`Flash`]: causal attention of a prompt batch over the KV cache in one kernel
//! (`cuda/flash.cu`: F16 tensor cores, F32 softmax and sums, as llama.cpp's CUDA flash
//! attention), instead of a `[n_head, t, n_kv]` score tensor written and read through candle's
//! ops.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;

use super::DeviceBytes;
use crate::KernelError;

/// flash.cu compiled by build.rs, as decode.cu.
const FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/flash.fatbin"));

/// Head widths with a kernel (`flash_attn_<hd>_<warps>`).
pub const FLASH_HEAD_DIMS: [usize; 3] = [32, 64, 128];

/// Dynamic shared memory of a block for heads `hd` wide (`flash_smem_bytes` in flash.cu: the
/// F32 staging of a 64-key tile, v's rows padded by 4 floats, and its F16 copies padded by 8).
fn smem_bytes(hd: usize) -> usize {
    const BK: usize = 64;
    BK * hd * 4 + BK * (hd + 4) * 4 + BK * (hd + 8) * 2 + hd * (BK + 8) * 2
}

/// One attention call: `q` `[n_head, t, head_dim]` (after RoPE, unscaled), the KV cache `k`, `v`
/// `[n_head_kv, n_ctx, head_dim]` holding `pos + t` keys (the batch's at `pos..`), all F32;
/// `out` `[t, n_head · head_dim]` F32. Query `i` sees keys `0..=pos + i`.
pub struct FlashArgs<'a> {
    pub q: &'a DeviceBytes,
    pub k: &'a DeviceBytes,
    pub v: &'a DeviceBytes,
    pub out: &'a DeviceBytes,
    pub t: usize,
    pub pos: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ctx: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// The flash-attention kernels, loaded on one stream (candle's, so they order with its ops).
pub struct Flash {
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    /// (head width, warps a block, kernel)
    funcs: Vec<(usize, usize, CudaFunction)>,
}

impl Flash {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, KernelError> {
        let err = |what: String| {
            move |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
                KernelError(format!("CUDA {what}: {e}"))
            }
        };
        let module = stream
            .context()
            .load_module(Ptx::from_binary(FATBIN.to_vec()))
            .map_err(err("loading the flash-attention kernels".into()))?;
        let mut funcs = Vec::new();
        for hd in FLASH_HEAD_DIMS {
            for warps in [4, 8] {
                let name = format!("flash_attn_{hd}_{warps}");
                let f = module.load_function(&name).map_err(err(name.clone()))?;
                // Past the default 48 KiB of shared memory a block: the host opts in.
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem_bytes(hd) as i32,
                )
                .map_err(err(name.clone()))?;
                funcs.push((hd, warps, f));
            }
        }
        Ok(Flash {
            stream,
            _module: module,
            funcs,
        })
    }

    /// Warps a block for a batch of `t` queries: 8 (128 queries a block share each tile's loads:
    /// on an H200, an 8B layer's pp512 at depth 4096 took 264 µs with 8 warps, 363 with 4),
    /// or 4 for batches of ≤ 64 tokens, which 8 warps would leave half idle.
    fn warps_for(t: usize) -> usize {
        if t > 64 {
            8
        } else {
            4
        }
    }

    /// Launches one attention call on the stream (after the work already there).
    pub fn run(&self, a: &FlashArgs) -> Result<(), KernelError> {
        let f32s = |n: usize| n * std::mem::size_of::<f32>();
        let bad = |what: String| Err(KernelError(format!("flash attention: {what}")));
        if a.t == 0 || a.n_head_kv == 0 || !a.n_head.is_multiple_of(a.n_head_kv) {
            return bad(format!(
                "t {} with {} heads over {} kv heads",
                a.t, a.n_head, a.n_head_kv
            ));
        }
        if a.pos + a.t > a.n_ctx {
            return bad(format!("{} + {} keys exceed n_ctx {}", a.pos, a.t, a.n_ctx));
        }
        let hd = a.head_dim;
        for (name, b, need) in [
            ("q", a.q, f32s(a.n_head * a.t * hd)),
            ("k", a.k, f32s(a.n_head_kv * a.n_ctx * hd)),
            ("v", a.v, f32s(a.n_head_kv * a.n_ctx * hd)),
            ("out", a.out, f32s(a.t * a.n_head * hd)),
        ] {
            if b.len < need || !b.ptr.is_multiple_of(16) {
                return bad(format!(
                    "{name} has {} bytes at {:#x}, needs {need}, 16-byte aligned",
                    b.len, b.ptr
                ));
            }
        }
        let warps = Self::warps_for(a.t);
        let Some((_, _, func)) = self.funcs.iter().find(|(h, w, _)| *h == hd && *w == warps) else {
            return bad(format!("no kernel for heads {hd} wide"));
        };
        let cfg = LaunchConfig {
            grid_dim: (a.t.div_ceil(16 * warps) as u32, a.n_head as u32, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: smem_bytes(hd) as u32,
        };
        let (t, pos, nh, nkv, n_ctx) = (
            a.t as i32,
            a.pos as i32,
            a.n_head as i32,
            a.n_head_kv as i32,
            a.n_ctx as i32,
        );
        let mut b = self.stream.launch_builder(func);
        b.arg(&a.q.ptr)
            .arg(&a.k.ptr)
            .arg(&a.v.ptr)
            .arg(&a.out.ptr)
            .arg(&t)
            .arg(&pos)
            .arg(&nh)
            .arg(&nkv)
            .arg(&n_ctx)
            .arg(&a.scale);
        // SAFETY: the four addresses are device memory of at least the sizes checked above, kept
        // alive by their `DeviceBytes` until this call returns and, as their contract says,
        // until the stream's work on them is done; the kernel reads q, k, v within
        // [n_head, t, hd] and [n_head_kv, pos + t ≤ n_ctx, hd], writes out within [t, n_head · hd],
        // and its signature (flash.cu) takes exactly these arguments in this order.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| KernelError(format!("CUDA flash_attn launch: {e}")))
    }
}
