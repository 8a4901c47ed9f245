//! GGUF: the file format llama.cpp and the Hub use for quantized models.
//!
//! The header is an *index* (metadata + a table of tensors with offsets); reading tensor bytes is
//! the storage layer's job. [`ModelFiles`] opens one file or a split set
//! (`name-00001-of-00003.gguf`) and presents one tensor table whose entries say which file and
//! which absolute offset hold each tensor.

mod config;
mod reader;
mod types;
mod value;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use config::{Arch, ModelConfig, RopeStyle};
pub use reader::{parse_header, read_header, Header, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC};
pub use types::TensorType;
pub use value::{Metadata, Value};
pub use writer::{GgufWriter, Producer, TensorData};

use crate::error::{Error, Result};

/// Where one tensor's bytes are: which file of the set, at which absolute offset.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub ty: TensorType,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub file: usize,
    /// Absolute byte offset in that file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorEntry {
    /// Dimensions in candle order (outermost first), e.g. `[n_out, n_in]` for a matrix.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An opened model: one GGUF file or all parts of a split set, indexed.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// The parts in order; `paths[0]` holds the model's metadata.
    pub paths: Vec<PathBuf>,
    pub metadata: Metadata,
    /// Every tensor, in file order.
    pub tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
}

impl ModelFiles {
    /// Opens `path`. If it is the first part of a split set, every part is opened and checked.
    pub fn open(path: &Path) -> Result<Self> {
        let first = read_header(path)?;
        let paths = match split_parts(path, &first.metadata)? {
            Some(p) => p,
            None => vec![path.to_path_buf()],
        };
        if paths.len() > 1 {
            check_split_part(&first, 0, paths.len())?;
        }
        let mut headers = vec![first];
        for (i, p) in paths.iter().enumerate().skip(1) {
            if !p.exists() {
                return Err(Error::InvalidGguf {
                    path: path.to_path_buf(),
                    reason: format!("split part {} is missing", p.display()),
                });
            }
            let h = read_header(p)?;
            check_split_part(&h, i, paths.len())?;
            headers.push(h);
        }
        let files = Self::from_headers(headers)?;
        if paths.len() > 1 {
            if let Some(n) = files.metadata.usize_opt("split.tensors.count")? {
                if n != files.tensors.len() {
                    return Err(Error::InvalidGguf {
                        path: path.to_path_buf(),
                        reason: format!(
                            "split.tensors.count says {n} tensors but the {} parts hold {}",
                            paths.len(),
                            files.tensors.len()
                        ),
                    });
                }
            }
        }
        Ok(files)
    }

    /// Builds the index from parsed headers (first part first).
    pub fn from_headers(headers: Vec<Header>) -> Result<Self> {
        if headers.is_empty() {
            return Err(Error::InvalidRequest(
                "ModelFiles::from_headers needs at least one header".into(),
            ));
        }
        let paths: Vec<PathBuf> = headers.iter().map(|h| h.path.clone()).collect();
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        for (file, h) in headers.iter().enumerate() {
            for t in &h.tensors {
                if by_name.insert(t.name.clone(), tensors.len()).is_some() {
                    return Err(Error::InvalidGguf {
                        path: h.path.clone(),
                        reason: format!("tensor '{}' appears in more than one split part", t.name),
                    });
                }
                tensors.push(TensorEntry {
                    name: t.name.clone(),
                    ty: t.ty,
                    dims: t.dims.clone(),
                    file,
                    offset: h.data_offset + t.offset,
                    n_bytes: t.n_bytes,
                });
            }
        }
        let metadata = headers
            .into_iter()
            .next()
            .map(|h| h.metadata)
            .unwrap_or_default();
        Ok(ModelFiles {
            paths,
            metadata,
            tensors,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.paths[0]
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Total bytes of tensor data.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_bytes).sum()
    }

    /// The typed configuration of the model's architecture.
    pub fn config(&self) -> Result<ModelConfig> {
        ModelConfig::from_files(self)
    }
}

/// For `x-00001-of-00003.gguf`, the paths of all parts; `None` for a single file.
fn split_parts(path: &Path, md: &Metadata) -> Result<Option<Vec<PathBuf>>> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let parsed = name.strip_suffix(".gguf").and_then(|stem| {
        let (rest, count_s) = stem.rsplit_once("-of-")?;
        let (prefix, no_s) = rest.rsplit_once('-')?;
        if !(no_s.bytes().all(|b| b.is_ascii_digit())
            && count_s.bytes().all(|b| b.is_ascii_digit()))
        {
            return None;
        }
        let no: usize = no_s.parse().ok()?;
        let count: usize = count_s.parse().ok()?;
        // Part names keep the digit widths of the name given (llama.cpp writes 5 digits).
        Some((prefix.to_string(), no, count, no_s.len(), count_s.len()))
    });
    let md_count = md.usize_opt("split.count")?;
    let Some((prefix, no, count, no_width, count_width)) = parsed else {
        return match md_count {
            Some(n) if n > 1 => Err(Error::InvalidGguf {
                path: path.to_path_buf(),
                reason: format!("is part of a {n}-part split but its name does not say which (expected NAME-00001-of-{n:05}.gguf)"),
            }),
            _ => Ok(None),
        };
    };
    if count <= 1 {
        return Ok(None);
    }
    let part_name = |i: usize| format!("{prefix}-{i:0no_width$}-of-{count:0count_width$}.gguf");
    if no != 1 {
        return Err(Error::InvalidGguf {
            path: path.to_path_buf(),
            reason: format!(
                "is part {no} of a {count}-part split; open the first part, {}",
                part_name(1)
            ),
        });
    }
    if count > 9999 {
        return Err(Error::InvalidGguf {
            path: path.to_path_buf(),
            reason: format!("claims {count} split parts"),
        });
    }
    if let Some(n) = md_count {
        if n != count {
            return Err(Error::InvalidGguf {
                path: path.to_path_buf(),
                reason: format!("name says {count} parts but split.count says {n}"),
            });
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    Ok(Some((1..=count).map(|i| dir.join(part_name(i))).collect()))
}

/// Checks that part `index` (0-based, as `split.no` counts) of a `count`-part set says so, so that
/// parts of different sets (or a stale part) are not mixed.
fn check_split_part(h: &Header, index: usize, count: usize) -> Result<()> {
    let bad = |reason: String| Error::InvalidGguf {
        path: h.path.clone(),
        reason,
    };
    if let Some(no) = h.metadata.usize_opt("split.no")? {
        if no != index {
            return Err(bad(format!(
                "split.no is {no} but this is split part {} of {count} (split.no {index} expected): \
                 the part belongs to another split set",
                index + 1
            )));
        }
    }
    if let Some(n) = h.metadata.usize_opt("split.count")? {
        if n != count {
            return Err(bad(format!(
                "split.count is {n} but the set has {count} parts: the part belongs to another split set"
            )));
        }
    }
    Ok(())
}
