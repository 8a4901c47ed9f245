//! The Apple GPU's part of the profile (Metal builds; mirrors `gpu.rs` for CUDA): its name, the
//! memory Metal recommends a process keep resident (`recommendedMaxWorkingSetSize`, less what is
//! allocated), and device memory bandwidth, measured as a large on-device copy (bytes read +
//! bytes written). There is no host→device bandwidth: memory is unified, so a weight "uploaded"
//! to the device tier is a copy within RAM (the planner falls back to the RAM read rate).
//!
//! Type-checked for aarch64-apple-darwin (`scripts/metal-check.sh`, in CI); never run: no Mac
//! has been available to this project.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::DeviceInfo;
use crate::error::Result;

/// Bytes copied per device-to-device sample.
const COPY_BYTES: usize = 512 << 20;
const REPEATS: usize = 5;

/// What Metal lets this process allocate and its total, when `device` is a Metal device:
/// (recommended working set − currently allocated, recommended working set).
pub fn memory(device: &Device) -> Option<(u64, u64)> {
    let d = device.as_metal_device().ok()?.device();
    let total = d.recommended_max_working_set_size() as u64;
    let used = d.current_allocated_size() as u64;
    Some((total.saturating_sub(used), total))
}

/// Metal device 0's description; bandwidth measured when `measure`. `None` without one.
pub fn info(measure: bool) -> Option<Result<DeviceInfo>> {
    if !candle_core::utils::metal_is_available() {
        return None;
    }
    Some(describe(measure))
}

fn describe(measure: bool) -> Result<DeviceInfo> {
    let device = Device::new_metal(0)?;
    let name = device.as_metal_device()?.device().architecture_name();
    let (free, total) = memory(&device).unwrap_or((0, 0));
    let mut info = DeviceInfo {
        kind: "metal".into(),
        name: format!("Apple GPU ({name}, unified memory)"),
        memory_bytes: Some(total),
        free_bytes: Some(free),
        upload_bps: None,
        upload_pinned: false,
        device_read_bps: None,
    };
    if measure {
        info.device_read_bps = Some(copy_rate(&device)?);
    }
    Ok(info)
}

/// Bytes moved per second by the best of REPEATS on-device copies of COPY_BYTES.
fn copy_rate(device: &Device) -> Result<f64> {
    let src = Tensor::zeros(COPY_BYTES / 4, DType::F32, device)?;
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..REPEATS {
        let t = Instant::now();
        let dst = src.copy()?;
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(dst);
    }
    Ok(2.0 * COPY_BYTES as f64 / best)
}
