//! A GGUF writer: used by the tests (files built in memory), the bundled model and `hypura synth`.

use std::io::Write;

use super::reader::{DEFAULT_ALIGNMENT, GGUF_MAGIC};
use super::types::TensorType;
use super::value::Value;

/// Tensor data to be written: either bytes in hand or a producer called once at write time
/// (so multi-gigabyte synthetic models are never held in memory).
pub enum TensorData {
    Bytes(Vec<u8>),
    Producer(Producer),
}

/// Writes a tensor's bytes when the file is written.
pub type Producer = Box<dyn FnOnce(&mut dyn Write) -> std::io::Result<()> + Send>;

struct PendingTensor {
    name: String,
    ty: TensorType,
    dims: Vec<u64>,
    n_bytes: u64,
    data: TensorData,
}

/// Collects metadata and tensors, then writes a GGUF v3 file.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a metadata key (replacing an earlier value of the same key).
    pub fn set(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor with ggml-order `dims` whose bytes are given. Panics in debug builds only if
    /// the byte count does not match the type and dims (a programming error in the caller).
    pub fn add_tensor(
        &mut self,
        name: &str,
        ty: TensorType,
        dims: &[u64],
        data: TensorData,
    ) -> &mut Self {
        let n: u64 = dims.iter().product();
        let n_bytes = n / ty.block_elems() as u64 * ty.block_bytes() as u64;
        if let TensorData::Bytes(b) = &data {
            debug_assert_eq!(b.len() as u64, n_bytes, "tensor {name}");
        }
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            ty,
            dims: dims.to_vec(),
            n_bytes,
            data,
        });
        self
    }

    /// Adds an F32 tensor from values (ggml-order dims).
    pub fn add_f32(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor(name, TensorType::F32, dims, TensorData::Bytes(bytes))
    }

    /// The data alignment: `general.alignment` if set, else 32.
    fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_i64())
            .filter(|&a| a > 0 && (a as u64).is_power_of_two())
            .map_or(DEFAULT_ALIGNMENT, |a| a as u64)
    }

    fn header_bytes(&self) -> (Vec<u8>, Vec<u64>) {
        let mut h = Vec::new();
        h.extend(GGUF_MAGIC.to_le_bytes());
        h.extend(3u32.to_le_bytes());
        h.extend((self.tensors.len() as u64).to_le_bytes());
        h.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut h, k);
            h.extend(v.type_id().to_le_bytes());
            put_value(&mut h, v);
        }
        let align = self.alignment();
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut off = 0u64;
        for t in &self.tensors {
            off = off.div_ceil(align) * align;
            put_str(&mut h, &t.name);
            h.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend(d.to_le_bytes());
            }
            h.extend((t.ty as u32).to_le_bytes());
            h.extend(off.to_le_bytes());
            offsets.push(off);
            off += t.n_bytes;
        }
        (h, offsets)
    }

    /// Writes the file to `w`.
    pub fn write(self, w: &mut dyn Write) -> std::io::Result<()> {
        let (mut header, offsets) = self.header_bytes();
        let align = self.alignment();
        let data_start = (header.len() as u64).div_ceil(align) * align;
        header.resize(data_start as usize, 0);
        w.write_all(&header)?;
        let mut pos = 0u64;
        for (t, off) in self.tensors.into_iter().zip(offsets) {
            w.write_all(&vec![0u8; (off - pos) as usize])?;
            let mut counted = CountingWriter {
                inner: &mut *w,
                n: 0,
            };
            match t.data {
                TensorData::Bytes(b) => counted.write_all(&b)?,
                TensorData::Producer(f) => f(&mut counted)?,
            }
            if counted.n != t.n_bytes {
                return Err(std::io::Error::other(format!(
                    "tensor {} produced {} bytes, expected {}",
                    t.name, counted.n, t.n_bytes
                )));
            }
            pos = off + t.n_bytes;
        }
        Ok(())
    }

    /// Writes the file into memory.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut v = Vec::new();
        // Writing to a Vec cannot fail except for a producer's own error.
        self.write(&mut v).expect("in-memory GGUF write");
        v
    }
}

struct CountingWriter<'a> {
    inner: &'a mut dyn Write,
    n: u64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend((s.len() as u64).to_le_bytes());
    h.extend(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.push(*x as u8),
        Value::U16(x) => h.extend(x.to_le_bytes()),
        Value::I16(x) => h.extend(x.to_le_bytes()),
        Value::U32(x) => h.extend(x.to_le_bytes()),
        Value::I32(x) => h.extend(x.to_le_bytes()),
        Value::U64(x) => h.extend(x.to_le_bytes()),
        Value::I64(x) => h.extend(x.to_le_bytes()),
        Value::F32(x) => h.extend(x.to_le_bytes()),
        Value::F64(x) => h.extend(x.to_le_bytes()),
        Value::Bool(x) => h.push(*x as u8),
        Value::String(s) => put_str(h, s),
        Value::Array(items) => {
            let item_ty = items.first().map(Value::type_id).unwrap_or(4);
            h.extend(item_ty.to_le_bytes());
            h.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(h, i);
            }
        }
    }
}
