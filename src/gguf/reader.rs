//! The GGUF header parser: magic, key/values and the tensor table, read from the file's first bytes.
//!
//! It reads no tensor data. Every count and length in the header is checked against the bytes that
//! remain, and against sanity limits no real file comes near, before anything is allocated, and
//! lists are reserved a little at a time, so a truncated or hostile file (even a large one) gives an
//! error, not a panic or a multi-gigabyte allocation.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::types::TensorType;
use super::value::{Metadata, Value};
use crate::error::{Error, Result};

/// `GGUF` as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's limit on tensor rank.
const MAX_DIMS: u32 = 4;
/// Deepest array nesting we accept (GGUF writers never go past 2).
const MAX_ARRAY_DEPTH: u32 = 4;
/// Most tensors one file may list (real models have a few thousand).
const MAX_TENSORS: u64 = 1 << 20;
/// Most metadata values (keys plus array items) one file may hold. The largest real headers
/// (256k-token vocabularies with scores, types and merges) hold about 2M; the limit stops a corrupt
/// count in a large file from turning gigabytes of tensor data into metadata values.
const MAX_METADATA_VALUES: u64 = 1 << 24;
/// Longest string we read (a whole `tokenizer.huggingface.json` is a few tens of MB).
const MAX_STRING_BYTES: u64 = 1 << 27;
/// Largest single dimension and element count of a tensor.
const MAX_ELEMENTS: u64 = 1 << 48;
/// Items reserved up front for a counted list; more are added as they are actually read.
const PREALLOC_ITEMS: u64 = 1024;

/// One entry of a file's tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: TensorType,
    /// Dimensions in ggml order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Bytes the tensor occupies.
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header.
#[derive(Clone, Debug)]
pub struct Header {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    pub alignment: u64,
    pub file_bytes: u64,
}

/// Reads the header of the GGUF file at `path`.
pub fn read_header(path: &Path) -> Result<Header> {
    let file = std::fs::File::open(path).map_err(|e| Error::io("open", path, 0, e))?;
    let file_bytes = file
        .metadata()
        .map_err(|e| Error::io("stat", path, 0, e))?
        .len();
    parse_header(
        std::io::BufReader::with_capacity(1 << 20, file),
        file_bytes,
        path,
    )
}

/// Parses a header from `reader`, which yields a file of `file_bytes` bytes named `path`.
pub fn parse_header(reader: impl Read, file_bytes: u64, path: &Path) -> Result<Header> {
    let mut c = Cursor {
        r: reader,
        pos: 0,
        len: file_bytes,
        path,
        values_left: MAX_METADATA_VALUES,
    };
    let magic = c.u32()?;
    if magic != GGUF_MAGIC {
        return Err(c.invalid(format!(
            "not a GGUF file (magic {magic:#010x}, expected 'GGUF')"
        )));
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        let hint = if (2..=3).contains(&version.swap_bytes()) {
            " (this is a big-endian GGUF file; hypura reads little-endian files)"
        } else {
            " (2 and 3 are)"
        };
        return Err(c.invalid(format!("GGUF version {version} is not supported{hint}")));
    }
    let n_tensors = c.u64()?;
    let n_kv = c.u64()?;
    // A key/value takes at least 8 (key len) + 4 (type) + 1 bytes; a tensor entry at least 8+4+8+4+8.
    c.check_count(n_kv, 13, "metadata entries")?;
    c.check_count(n_tensors, 32, "tensors")?;
    c.check_limit(n_tensors, MAX_TENSORS, "tensors")?;
    c.take_values(n_kv, "metadata entries")?;

    let mut metadata = Metadata::new(path);
    for _ in 0..n_kv {
        let key = c.string()?;
        let ty = c.u32()?;
        let value = c.value(ty, 0)?;
        if metadata.entries.insert(key.clone(), value).is_some() {
            return Err(c.invalid(format!("metadata key '{key}' appears twice")));
        }
    }

    let mut tensors = Vec::with_capacity(n_tensors.min(PREALLOC_ITEMS) as usize);
    let mut names = std::collections::HashSet::new();
    for _ in 0..n_tensors {
        let name = c.string()?;
        let n_dims = c.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(c.invalid(format!(
                "tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64()?);
        }
        let ty_id = c.u32()?;
        let offset = c.u64()?;
        let ty = TensorType::from_id(ty_id).ok_or_else(|| Error::Unsupported {
            path: path.to_path_buf(),
            reason: format!(
                "tensor '{name}' has {}, which hypura cannot compute with",
                TensorType::name_of_id(ty_id)
            ),
        })?;
        let n_bytes = tensor_bytes(&name, ty, &dims).map_err(|r| c.invalid(r))?;
        if !names.insert(name.clone()) {
            return Err(c.invalid(format!("tensor '{name}' appears twice")));
        }
        tensors.push(TensorInfo {
            name,
            ty,
            dims,
            offset,
            n_bytes,
        });
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_i64() {
            Some(a)
                if !matches!(v, Value::Bool(_))
                    && a > 0
                    && (a as u64).is_power_of_two()
                    && a <= 1 << 20 =>
            {
                a as u64
            }
            _ => {
                return Err(c.invalid(format!(
                    "general.alignment {} is not a power of two from 1 to {}",
                    v.summary(),
                    1 << 20
                )))
            }
        },
    };
    let data_offset = c.pos.div_ceil(alignment) * alignment;
    let data_bytes = file_bytes.saturating_sub(data_offset);
    for t in &tensors {
        if t.offset % alignment != 0 {
            return Err(c.invalid(format!(
                "tensor '{}' offset {} is not aligned to {alignment}",
                t.name, t.offset
            )));
        }
        match t.offset.checked_add(t.n_bytes) {
            Some(end) if end <= data_bytes => {}
            _ => {
                return Err(c.invalid(format!(
                    "tensor '{}' ({} bytes at data offset {}) runs past the end of the file ({} data bytes): \
                     the file is truncated or corrupt",
                    t.name, t.n_bytes, t.offset, data_bytes
                )))
            }
        }
    }
    Ok(Header {
        path: path.to_path_buf(),
        version,
        metadata,
        tensors,
        data_offset,
        alignment,
        file_bytes,
    })
}

/// Bytes of a tensor of type `ty` and ggml dims `dims`, or why that is not a valid tensor.
fn tensor_bytes(name: &str, ty: TensorType, dims: &[u64]) -> std::result::Result<u64, String> {
    let mut n: u64 = 1;
    for &d in dims {
        n = n
            .checked_mul(d)
            .filter(|&n| n < MAX_ELEMENTS && d < MAX_ELEMENTS)
            .ok_or_else(|| format!("tensor '{name}' dims {dims:?} are absurd"))?;
    }
    if !dims[0].is_multiple_of(ty.block_elems() as u64) {
        return Err(format!(
            "tensor '{name}' row length {} is not a multiple of {}'s block of {}",
            dims[0],
            ty,
            ty.block_elems()
        ));
    }
    Ok(n / ty.block_elems() as u64 * ty.block_bytes() as u64)
}

struct Cursor<'a, R> {
    r: R,
    pos: u64,
    len: u64,
    path: &'a Path,
    /// Metadata values still allowed (see [`MAX_METADATA_VALUES`]).
    values_left: u64,
}

impl<R: Read> Cursor<'_, R> {
    fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidGguf {
            path: self.path.to_path_buf(),
            reason: reason.into(),
        }
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.fill(&mut b)?;
        Ok(b)
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        if self.pos + buf.len() as u64 > self.len {
            return Err(self.invalid(format!(
                "header truncated: needs {} bytes at offset {}, file has {}",
                buf.len(),
                self.pos,
                self.len
            )));
        }
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                self.invalid(format!("header truncated at offset {}", self.pos))
            }
            _ => Error::io("read header", self.path, self.pos, e),
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// Refuses a count whose items (each at least `min_item_bytes`) cannot fit in what remains.
    fn check_count(&self, n: u64, min_item_bytes: u64, what: &str) -> Result<()> {
        let remaining = self.len.saturating_sub(self.pos);
        if n.saturating_mul(min_item_bytes) > remaining {
            return Err(self.invalid(format!(
                "claims {n} {what} at offset {} but only {remaining} bytes remain: the file is truncated or corrupt",
                self.pos
            )));
        }
        Ok(())
    }

    /// Refuses a count above a sanity limit that no real file comes near.
    fn check_limit(&self, n: u64, limit: u64, what: &str) -> Result<()> {
        if n > limit {
            return Err(self.invalid(format!(
                "claims {n} {what} at offset {} (at most {limit} are accepted): the file is corrupt",
                self.pos
            )));
        }
        Ok(())
    }

    /// Charges `n` values against the metadata budget.
    fn take_values(&mut self, n: u64, what: &str) -> Result<()> {
        if n > self.values_left {
            return Err(self.invalid(format!(
                "claims {n} {what} at offset {}, more than the {MAX_METADATA_VALUES} metadata values \
                 a header may hold: the file is corrupt",
                self.pos
            )));
        }
        self.values_left -= n;
        Ok(())
    }

    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        self.check_count(n, 1, "string bytes")?;
        self.check_limit(n, MAX_STRING_BYTES, "string bytes")?;
        let mut buf = vec![0u8; n as usize];
        self.fill(&mut buf)?;
        Ok(match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(self.bytes::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => match self.bytes::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.invalid(format!("bool value {b} at offset {}", self.pos - 1))),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.invalid("arrays nested too deeply"));
                }
                let item_ty = self.u32()?;
                let n = self.u64()?;
                let min_item = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => {
                        return Err(self.invalid(format!(
                            "unknown array item type {t} at offset {}",
                            self.pos
                        )))
                    }
                };
                self.check_count(n, min_item, "array items")?;
                self.take_values(n, "array items")?;
                let mut items = Vec::with_capacity(n.min(PREALLOC_ITEMS) as usize);
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            t => {
                return Err(self.invalid(format!(
                    "unknown metadata value type {t} at offset {}",
                    self.pos - 4
                )))
            }
        })
    }
}
