//! The hardware profile: what the machine can hold and how fast it moves bytes — compute-device
//! memory, RAM (cgroup-aware), the direct-I/O read bandwidth of the filesystem holding the model,
//! and memory read bandwidth. The profiler measures; the planner only reads the numbers.

#[cfg(feature = "cuda")]
pub mod gpu;
mod measure;
mod memory;
#[cfg(feature = "metal")]
pub mod metal;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use measure::{measure_disk, measure_memory, timed_reads, DiskSample, ReadSpec};
pub use memory::{cgroup_limit, read_memory, CgroupLimit, MemoryInfo};

use crate::error::{Error, Result};

/// Bump when the profile's fields or measurements change, so old caches are not reused.
const PROFILE_VERSION: u32 = 2;

/// The compute device and what it may hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `"cpu"`, `"cuda"` or `"metal"`.
    pub kind: String,
    pub name: String,
    /// Total device memory; `None` on a CPU build (the device tier is RAM).
    pub memory_bytes: Option<u64>,
    /// Free device memory (re-read each time the profile is read).
    pub free_bytes: Option<u64>,
    /// Host→device copy bandwidth, and whether it was measured from page-locked memory.
    pub upload_bps: Option<f64>,
    pub upload_pinned: bool,
    /// Device memory bandwidth: a large device-to-device copy, bytes read + bytes written.
    pub device_read_bps: Option<f64>,
}

/// Everything the planner needs to know about the machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub version: u32,
    pub cpu_threads: usize,
    pub device: DeviceInfo,
    /// Read live each time (it changes); the rest is measured once and cached.
    pub memory: MemoryInfo,
    /// Sequential read bandwidth of memory, one thread and all threads.
    pub mem_read_bps_1t: f64,
    pub mem_read_bps: f64,
    /// The filesystem measured (the model's), its device id, and the direct-I/O samples.
    pub disk_path: PathBuf,
    pub disk_device_id: u64,
    pub disk_direct_io: bool,
    pub disk_samples: Vec<DiskSample>,
    /// The best sequential direct-I/O read bandwidth seen (what streaming can hope for).
    pub disk_read_bps: f64,
}

/// Where profiles are cached: `$XDG_CACHE_HOME/hypura` or `~/.cache/hypura`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("hypura")
}

fn device_id(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)
        .map_err(|e| Error::io("stat", path, 0, e))?
        .dev())
}

/// The compute device: CUDA device 0 on a CUDA build that finds one, Metal device 0 on a Metal
/// build (bandwidths measured when `measure`), else the CPU.
fn current_device(measure: bool) -> Result<DeviceInfo> {
    #[cfg(feature = "cuda")]
    if let Some(info) = gpu::info(measure) {
        return info;
    }
    #[cfg(feature = "metal")]
    if let Some(info) = metal::info(measure) {
        return info;
    }
    let _ = measure;
    Ok(DeviceInfo {
        kind: "cpu".into(),
        name: "CPU (device tier = RAM)".into(),
        memory_bytes: None,
        free_bytes: None,
        upload_bps: None,
        upload_pinned: false,
        device_read_bps: None,
    })
}

/// Profiles are cached per filesystem and per build kind (a GPU build measures its GPU).
fn cache_file(dev: u64) -> PathBuf {
    let build = if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "metal") {
        "metal"
    } else {
        "cpu"
    };
    cache_dir().join(format!(
        "profile-v{PROFILE_VERSION}-{build}-dev{dev:x}.json"
    ))
}

/// The cached profile for the filesystem holding `path`, if one was measured (memory re-read).
pub fn cached_profile(path: &Path) -> Option<Profile> {
    let dev = device_id(path).ok()?;
    let mut p: Profile =
        serde_json::from_str(&std::fs::read_to_string(cache_file(dev)).ok()?).ok()?;
    if p.version != PROFILE_VERSION {
        return None;
    }
    p.memory = read_memory();
    if p.device.kind != "cpu" {
        p.device.free_bytes = current_device(false).ok()?.free_bytes;
    }
    Some(p)
}

/// The profile for the filesystem holding `sample_file` (a large file on it, e.g. the model):
/// from the cache unless `refresh`, else measured (a few seconds) and cached. `progress` draws
/// bars while measuring.
pub fn profile(sample_file: &Path, refresh: bool, progress: bool) -> Result<Profile> {
    let dev = device_id(sample_file)?;
    let cache = cache_file(dev);
    if !refresh {
        if let Some(p) = cached_profile(sample_file) {
            return Ok(p);
        }
    }
    let cpu_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (mem1, mem_all) = measure_memory(cpu_threads, progress)?;
    let (direct, samples) = measure_disk(sample_file, progress)?;
    let disk_read_bps = samples.iter().map(|s| s.bytes_per_s).fold(0.0, f64::max);
    let p = Profile {
        version: PROFILE_VERSION,
        cpu_threads,
        device: current_device(true)?,
        memory: read_memory(),
        mem_read_bps_1t: mem1,
        mem_read_bps: mem_all,
        disk_path: sample_file.to_path_buf(),
        disk_device_id: dev,
        disk_direct_io: direct,
        disk_samples: samples,
        disk_read_bps,
    };
    if std::fs::create_dir_all(cache_dir()).is_ok() {
        if let Ok(json) = serde_json::to_string_pretty(&p) {
            let tmp = cache.with_extension("tmp");
            if std::fs::write(&tmp, json).is_ok() {
                let _ = std::fs::rename(&tmp, &cache);
            }
        }
    }
    Ok(p)
}
