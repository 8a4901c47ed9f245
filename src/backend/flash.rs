//! Prompt-batch attention in one CUDA kernel (`hypura_kernels::cuda::Flash`): the scores of a
//! batch against the whole KV cache never reach device memory. Used by
//! [`Attention`](crate::models::layers::Attention) for batches of more than one token on a CUDA
//! device with heads 32, 64 or 128 wide; anything else (or `HYPURA_CUDA_FLASH=0`) stays on
//! candle's ops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, DeviceLocation, Tensor};
use hypura_kernels::cuda::{Flash, FlashArgs, FLASH_HEAD_DIMS};

use super::kernel_error;
use crate::error::{Error, Result};
use crate::storage::device_view::f32_bytes;

/// `HYPURA_CUDA_FLASH=0` turns the kernel off (read once per process).
fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("HYPURA_CUDA_FLASH").map_or(true, |v| v != "0"))
}

/// The kernels of the device at `ordinal`, loaded on its stream at first use.
fn kernels(dev: &candle_core::CudaDevice, ordinal: usize) -> Result<Arc<Flash>> {
    static LOADED: OnceLock<Mutex<HashMap<usize, Arc<Flash>>>> = OnceLock::new();
    let mut map = LOADED.get_or_init(Default::default).lock().map_err(|_| {
        Error::Candle(candle_core::Error::Msg(
            "flash kernels: lock poisoned".into(),
        ))
    })?;
    if let Some(f) = map.get(&ordinal) {
        return Ok(f.clone());
    }
    let f = Arc::new(Flash::new(dev.cuda_stream()).map_err(kernel_error)?);
    map.insert(ordinal, f.clone());
    Ok(f)
}

/// Causal attention of `t` queries at positions `pos..pos + t` over the cache `k`, `v`
/// `[1, n_head_kv, n_ctx, head_dim]` (holding `pos + t` keys): `q` `[1, n_head, t, head_dim]`
/// after RoPE → `[t, n_head · head_dim]`, or `None` where this kernel does not apply.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, pos: usize) -> Result<Option<Tensor>> {
    let Device::Cuda(dev) = q.device() else {
        return Ok(None);
    };
    let (_, n_head, t, head_dim) = q.dims4()?;
    let (_, n_head_kv, n_ctx, _) = k.dims4()?;
    if !enabled() || !FLASH_HEAD_DIMS.contains(&head_dim) || q.dtype() != DType::F32 {
        return Ok(None);
    }
    let DeviceLocation::Cuda { gpu_id } = q.device().location() else {
        return Ok(None);
    };
    let out = Tensor::zeros((t, n_head * head_dim), DType::F32, q.device())?;
    let q = q.contiguous()?;
    let (Some(qb), Some(kb), Some(vb), Some(ob)) = (
        f32_bytes(&q)?,
        f32_bytes(k)?,
        f32_bytes(v)?,
        f32_bytes(&out)?,
    ) else {
        return Ok(None);
    };
    kernels(dev, gpu_id)?
        .run(&FlashArgs {
            q: &qb,
            k: &kb,
            v: &vb,
            out: &ob,
            t,
            pos,
            n_head,
            n_head_kv,
            n_ctx,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        })
        .map_err(kernel_error)?;
    Ok(Some(out))
}
