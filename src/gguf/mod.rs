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
pub use writer::{GgufWriter, TensorData};

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
        let mut headers = vec![first];
        for p in &paths[1..] {
            if !p.exists() {
                return Err(Error::InvalidGguf {
                    path: path.to_path_buf(),
                    reason: format!("split part {} is missing", p.display()),
                });
            }
            headers.push(read_header(p)?);
        }
        Self::from_headers(headers)
    }

    /// Builds the index from parsed headers (first part first).
    pub fn from_headers(headers: Vec<Header>) -> Result<Self> {
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
        let (rest, count) = stem.rsplit_once("-of-")?;
        let (prefix, no) = rest.rsplit_once('-')?;
        let no: usize = no.parse().ok()?;
        let count: usize = count.parse().ok()?;
        Some((
            prefix.to_string(),
            no,
            count,
            count.to_string().len().max(5),
        ))
    });
    let md_count = md.usize_opt("split.count")?;
    let Some((prefix, no, count, width)) = parsed else {
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
    if no != 1 {
        return Err(Error::InvalidGguf {
            path: path.to_path_buf(),
            reason: format!(
                "is part {no} of {count}; open the first part (-00001-of-{count:05}.gguf)"
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
    Ok(Some(
        (1..=count)
            .map(|i| dir.join(format!("{prefix}-{i:0width$}-of-{count:0width$}.gguf")))
            .collect(),
    ))
}
