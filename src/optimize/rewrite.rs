//! Writing the rewritten file: the input's tensors streamed through one reusable buffer (read
//! around the page cache), permuted where the plan says so, into a temporary file renamed into
//! place once complete and synced.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::Rewrite;
use crate::error::{Error, Result};
use crate::gguf::{GgufWriter, ModelFiles, TensorData};
use crate::plan::layer_of;
use crate::storage::{AlignedBuf, DirectFile, DIRECT_IO_ALIGN};

/// Bytes copied per read.
const CHUNK_BYTES: usize = 8 << 20;

/// Writes `files` rewritten as `rw` says to `out`, calling `progress(bytes)` as tensor bytes are
/// copied. `out` must not be the input.
pub fn write(
    files: &ModelFiles,
    rw: &Rewrite,
    out: &Path,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<()> {
    let same = |p: &Path| match (std::fs::canonicalize(p), std::fs::canonicalize(out)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if files.paths.iter().any(|p| same(p)) {
        return Err(Error::InvalidRequest(format!(
            "{}: the output would overwrite the input; choose another -o",
            out.display()
        )));
    }
    let readers = Arc::new(
        files
            .paths
            .iter()
            .map(|p| DirectFile::open(p))
            .collect::<Result<Vec<_>>>()?,
    );
    let buf = Arc::new(Mutex::new(AlignedBuf::new(
        CHUNK_BYTES + 2 * DIRECT_IO_ALIGN,
        DIRECT_IO_ALIGN,
    )?));
    let mut w = GgufWriter::new();
    for (k, v) in &rw.metadata {
        w.set(k, v.clone());
    }
    for &i in &rw.tensor_order {
        let t = files.tensors[i].clone();
        // Source pieces in output order: the tensor whole, or its experts' slices permuted.
        let pieces: Vec<(u64, u64)> = match layer_of(&t.name) {
            Some(l) if rw.permuted.contains(&i) => {
                let order = rw.orders.get(l).cloned().unwrap_or_default();
                let stride = t.n_bytes / order.len().max(1) as u64;
                order
                    .iter()
                    .map(|&old| (t.offset + old as u64 * stride, stride))
                    .collect()
            }
            _ => vec![(t.offset, t.n_bytes)],
        };
        let (readers, buf, progress) = (readers.clone(), buf.clone(), progress.clone());
        let produce = move |out: &mut dyn Write| -> std::io::Result<()> {
            let f = &readers[t.file];
            let mut buf = buf.lock().unwrap_or_else(|p| p.into_inner());
            for (offset, len) in pieces {
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(CHUNK_BYTES as u64) as usize;
                    let r = f
                        .read_at(offset + done, n, &mut buf)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    out.write_all(&buf.as_slice()[r])?;
                    progress(n as u64);
                    done += n as u64;
                }
            }
            Ok(())
        };
        w.add_tensor(
            &t.name,
            t.ty,
            &t.dims,
            TensorData::Producer(Box::new(produce)),
        );
    }
    let tmp = temp_path(out);
    let result = (|| -> std::io::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut bw = std::io::BufWriter::with_capacity(CHUNK_BYTES, file);
        w.write(&mut bw)?;
        bw.flush()?;
        bw.get_ref().sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("write", out, 0, e));
    }
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("rename", out, 0, e)
    })
}

/// `DIR/.NAME.tmp-PID` next to `out`.
fn temp_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out.gguf".into());
    out.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}
