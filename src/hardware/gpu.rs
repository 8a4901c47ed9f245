//! The GPU's part of the profile (CUDA builds): its name, free and total memory, and two measured
//! bandwidths — host→device copies from page-locked memory, and device memory itself (a large
//! device-to-device copy, counting the bytes read and the bytes written).

use std::time::Instant;

use candle_core::Device;

use super::DeviceInfo;
use crate::error::Result;
use crate::storage::{cuda_error, PinnedBuf};

/// Bytes copied per host→device sample, and per device-to-device sample.
const H2D_BYTES: usize = 256 << 20;
const D2D_BYTES: usize = 1 << 30;
const REPEATS: usize = 5;

/// Free and total memory of `device`, when it is a CUDA device.
pub fn memory(device: &Device) -> Option<(u64, u64)> {
    let d = device.as_cuda_device().ok()?;
    let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
    Some((free as u64, total as u64))
}

/// CUDA device 0's description; bandwidths measured when `measure`. `None` without a GPU.
pub fn info(measure: bool) -> Option<Result<DeviceInfo>> {
    if !candle_core::utils::cuda_is_available() {
        return None;
    }
    Some(describe(measure))
}

fn describe(measure: bool) -> Result<DeviceInfo> {
    let device = Device::new_cuda(0)?;
    let d = device.as_cuda_device()?;
    let stream = d.cuda_stream();
    let ctx = stream.context().clone();
    let name = ctx.name().map_err(cuda_error)?;
    let (free, total) = ctx.mem_get_info().map_err(cuda_error)?;
    let mut info = DeviceInfo {
        kind: "cuda".into(),
        name,
        memory_bytes: Some(total as u64),
        free_bytes: Some(free as u64),
        upload_bps: None,
        upload_pinned: false,
        device_read_bps: None,
    };
    if !measure {
        return Ok(info);
    }
    // Host→device from page-locked memory (pageable memory if it cannot be had).
    let mut dst = stream.alloc_zeros::<u8>(H2D_BYTES).map_err(cuda_error)?;
    let pinned = PinnedBuf::zeroed(&ctx, H2D_BYTES);
    let pageable = vec![1u8; if pinned.is_ok() { 0 } else { H2D_BYTES }];
    info.upload_pinned = pinned.is_ok();
    info.upload_bps = Some(best_rate(H2D_BYTES, || {
        match &pinned {
            Ok(p) => stream.memcpy_htod(p.host(), &mut dst),
            Err(_) => stream.memcpy_htod(&pageable, &mut dst),
        }
        .and_then(|_| stream.synchronize())
        .map_err(cuda_error)
    })?);
    drop(dst);
    // Device memory: a copy reads and writes every byte once.
    let n = if free > 4 * D2D_BYTES {
        D2D_BYTES
    } else {
        H2D_BYTES
    };
    let src = stream.alloc_zeros::<u8>(n).map_err(cuda_error)?;
    let mut dst = stream.alloc_zeros::<u8>(n).map_err(cuda_error)?;
    info.device_read_bps = Some(best_rate(2 * n, || {
        stream
            .memcpy_dtod(&src, &mut dst)
            .and_then(|_| stream.synchronize())
            .map_err(cuda_error)
    })?);
    Ok(info)
}

/// Bytes per second of the fastest of `REPEATS` runs of `f` (after one warm-up run).
fn best_rate(bytes: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::MAX;
    for _ in 0..REPEATS {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(bytes as f64 / best.max(1e-9))
}
