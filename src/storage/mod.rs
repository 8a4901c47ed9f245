//! Storage: where a tensor's bytes live, and the one weight type models read them through.
//!
//! Storage knows no models. It opens the model's files read-only, memory-maps them, and serves
//! any tensor of the index as a [`Weight`] on the compute device. The placement plan decides, per
//! tensor, which tier serves it; this module is where that decision is carried out.

mod weight;

use std::sync::Arc;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::Device;
use memmap2::Mmap;

pub use weight::Weight;

use crate::error::{Error, Result};
use crate::gguf::{ModelFiles, TensorEntry};

/// The model's files, mapped, serving tensors by name.
pub struct WeightStore {
    files: ModelFiles,
    maps: Vec<Arc<Mmap>>,
    device: Device,
    on_read: Option<Box<dyn Fn(u64) + Send + Sync>>,
}

impl WeightStore {
    /// Maps every file of `files` read-only. No tensor byte is read yet.
    pub fn open(files: ModelFiles, device: &Device) -> Result<Self> {
        let mut maps = Vec::with_capacity(files.paths.len());
        for path in &files.paths {
            let f = std::fs::File::open(path).map_err(|e| Error::io("open", path, 0, e))?;
            // SAFETY: the map is read-only and private to this process. If another process
            // truncates the file while it is mapped, reads of the lost pages fault (SIGBUS); this
            // is the same contract every mmap-based loader (llama.cpp included) has with its user.
            let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io("mmap", path, 0, e))?;
            maps.push(Arc::new(map));
        }
        Ok(WeightStore {
            files,
            maps,
            device: device.clone(),
            on_read: None,
        })
    }

    /// Calls `f(bytes)` each time tensor bytes are read (progress reporting).
    pub fn on_read(&mut self, f: Box<dyn Fn(u64) + Send + Sync>) {
        self.on_read = Some(f);
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn has(&self, name: &str) -> bool {
        self.files.tensor(name).is_some()
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.files.tensor(name).ok_or_else(|| Error::Tensor {
            path: self.files.path().to_path_buf(),
            name: name.to_string(),
            reason: "missing from the model file".into(),
        })
    }

    fn shape_error(&self, e: &TensorEntry, expected: &[usize]) -> Error {
        Error::Tensor {
            path: self.files.paths[e.file].clone(),
            name: e.name.clone(),
            reason: format!("shape {:?}, expected {:?}", e.shape(), expected),
        }
    }

    /// The bytes of `e` in its mapped file (bounds were checked when the header was read).
    fn bytes(&self, e: &TensorEntry) -> &[u8] {
        &self.maps[e.file][e.offset as usize..(e.offset + e.n_bytes) as usize]
    }

    /// The tensor `name`, which must have `shape` (candle order, outermost first).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let e = self.entry(name)?;
        if e.shape() != shape {
            return Err(self.shape_error(e, shape));
        }
        self.resident(&e.name, e, self.bytes(e), shape)
    }

    /// Like [`get`](Self::get), but `Ok(None)` when the file has no such tensor.
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Weight>> {
        if !self.has(name) {
            return Ok(None);
        }
        self.get(name, shape).map(Some)
    }

    /// A merged expert tensor `[n_expert, rows, cols]` as one weight per expert, each `[rows, cols]`.
    /// Each expert's slice is contiguous in the file, so each is separately placeable.
    pub fn get_experts(
        &self,
        name: &str,
        n_expert: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<Weight>> {
        let e = self.entry(name)?;
        if e.shape() != [n_expert, rows, cols] {
            return Err(self.shape_error(e, &[n_expert, rows, cols]));
        }
        let per_expert = (e.n_bytes / n_expert as u64) as usize;
        let all = self.bytes(e);
        (0..n_expert)
            .map(|i| {
                let bytes = &all[i * per_expert..(i + 1) * per_expert];
                self.resident(&format!("{name}[{i}]"), e, bytes, &[rows, cols])
            })
            .collect()
    }

    /// Copies `bytes` into a tensor on the compute device.
    fn resident(
        &self,
        name: &str,
        e: &TensorEntry,
        bytes: &[u8],
        shape: &[usize],
    ) -> Result<Weight> {
        let storage = QStorage::from_data(
            std::borrow::Cow::Borrowed(bytes),
            &self.device,
            e.ty.to_candle(),
        )?;
        let q = QTensor::new(storage, shape)?;
        if let Some(f) = &self.on_read {
            f(bytes.len() as u64);
        }
        Weight::resident(name, e.ty, q)
    }
}
