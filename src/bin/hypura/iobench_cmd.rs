//! `hypura iobench`: read throughput of a model's own file at the request sizes and queue depths
//! hypura's runtime uses, with direct I/O and, for comparison, buffered reads from a cold page
//! cache.

use anyhow::{bail, Result};
use clap::Args;
use hypura::gguf::ModelFiles;
use hypura::hardware::{timed_reads, ReadSpec};
use hypura::plan::{gib, is_expert_tensor, layer_of, Placement, TierKind};
use hypura::storage::{
    DirectFile, ExpertCacheConfig, ReadMode, DIRECT_IO_ALIGN, STREAM_IO_THREADS,
};

use crate::common::ModelArgs;

#[derive(Args, Debug)]
#[command(after_help = "\
Reads the model file (it is not changed) the way hypura's runtime does and prints the throughput:
- dense models: the stream pool's reads, one per layer (a layer's feed-forward weights merged
  into one request, as FFN-streaming reads them), in layer order, on the pool's one I/O thread;
- MoE models: the expert cache's reads of single experts (one request per gate / up / down slice)
  at random (layer, expert), and of two adjacent experts (one request per tensor, where the
  file's layout lets one read cover both: see `hypura inspect`), on the cache's I/O threads;
- standard request sizes (64 KiB to 16 MiB, sequential) at queue depth 1, and 4 MiB at depth 4.
Each row is read twice: with direct I/O (O_DIRECT, around the page cache), and buffered, after
dropping the file's pages from the page cache (POSIX_FADV_DONTNEED) so the reads come from disk
(each buffered read drops its pages again). If the filesystem refuses direct I/O, both columns
are buffered reads and the output says so. At most --read-gb is read in all.")]
pub struct IobenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Gigabytes to read in total, over all rows and both modes.
    #[arg(long = "read-gb", default_value_t = 2.0, value_name = "N")]
    pub read_gb: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One row: what is read, how, and what it gave.
#[derive(serde::Serialize)]
struct Row {
    what: String,
    request_bytes: usize,
    queue_depth: usize,
    pattern: &'static str,
    direct_bytes_per_s: f64,
    buffered_bytes_per_s: f64,
    bytes_read: u64,
    #[serde(skip)]
    reads: Vec<ReadSpec>,
}

pub fn iobench(a: IobenchArgs) -> Result<()> {
    if !(a.read_gb > 0.0 && a.read_gb.is_finite()) {
        bail!(
            "--read-gb {}: must be a positive number of gigabytes",
            a.read_gb
        );
    }
    let path = a.model.resolve(false)?;
    let files = ModelFiles::open(&path)?;
    let cfg = files.config()?;
    let size = std::fs::metadata(&path)?.len();
    let budget = (a.read_gb * 1e9) as u64;
    let mut rows = runtime_rows(&files, cfg.n_expert);
    for (req, qd) in [
        (64usize << 10, 1usize),
        (1 << 20, 1),
        (4 << 20, 1),
        (16 << 20, 1),
        (4 << 20, 4),
    ] {
        if req as u64 <= size {
            rows.push(row(
                format!("{} sequential", human(req)),
                req,
                qd,
                "sequential",
                Vec::new(),
            ));
        }
    }
    if rows.is_empty() {
        bail!("{}: too small to measure ({size} bytes)", path.display());
    }
    let per_sample = (budget / (2 * rows.len() as u64)).max(1);
    let direct = DirectFile::open(&path)?;
    let buffered = DirectFile::open_buffered(&path)?;
    let refused = direct.mode() != ReadMode::Direct;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let planned: u64 = rows
        .iter()
        .map(|r| 2 * per_sample.max(r.request_bytes as u64))
        .sum();
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(planned);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "reading {msg} [{bar:30}] {bytes}/{total_bytes}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    });
    let on_bytes = |n: u64| {
        if let Some(b) = &bar {
            b.inc(n);
        }
    };
    for (i, r) in rows.iter_mut().enumerate() {
        for (mode, f) in [(0, &direct), (1, &buffered)] {
            if let Some(b) = &bar {
                b.set_message(format!(
                    "{} ({})",
                    r.what,
                    if mode == 0 { "direct" } else { "buffered" }
                ));
            }
            // Different rows and modes read different parts of the file, so that a cache in
            // front of the disk (a VM host's) helps as little as possible.
            let base = (size / 7 * (i as u64 % 7) + mode * size / 2) % size;
            let reads = plan_reads(r, per_sample, base, size);
            if mode == 1 {
                f.drop_cache(0, size);
            }
            let (bytes, secs) = timed_reads(f, &reads, r.queue_depth, None, &on_bytes)?;
            r.bytes_read += bytes;
            let bps = bytes as f64 / secs;
            if mode == 0 {
                r.direct_bytes_per_s = bps;
            } else {
                r.buffered_bytes_per_s = bps;
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let direct_note = if refused {
        "the filesystem refuses direct I/O (O_DIRECT): the 'direct' column is buffered reads that drop the page cache"
    } else {
        "direct = O_DIRECT reads around the page cache"
    };
    let buffered_note =
        "buffered = plain reads after dropping the file's pages (POSIX_FADV_DONTNEED), each read's pages dropped again";
    if a.json {
        let j = serde_json::json!({
            "model": path, "file_bytes": size, "direct_io": !refused, "read_budget_bytes": budget,
            "notes": [direct_note, buffered_note], "rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!(
        "| reads | request (mean) | queue depth | pattern | direct GB/s | buffered (cold) GB/s | read |"
    );
    println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {} |",
            r.what,
            human(r.request_bytes),
            r.queue_depth,
            r.pattern,
            r.direct_bytes_per_s / 1e9,
            r.buffered_bytes_per_s / 1e9,
            gib(r.bytes_read)
        );
    }
    println!("{direct_note}; {buffered_note}.");
    Ok(())
}

/// A row; `req` is replaced by the mean request size of `reads` when there are any.
fn row(what: String, req: usize, qd: usize, pattern: &'static str, reads: Vec<ReadSpec>) -> Row {
    let req = match reads.len() {
        0 => req,
        n => reads.iter().map(|r| r.len).sum::<usize>() / n,
    };
    Row {
        what,
        request_bytes: req,
        queue_depth: qd,
        pattern,
        direct_bytes_per_s: 0.0,
        buffered_bytes_per_s: 0.0,
        bytes_read: 0,
        reads,
    }
}

/// The reads the runtime issues for this file: stream-pool groups (dense) or expert-cache reads
/// (MoE), as request lists to cycle through.
fn runtime_rows(files: &ModelFiles, n_expert: usize) -> Vec<Row> {
    let t = &files.tensors;
    let in_main = |f: usize| f == 0;
    if n_expert == 0 {
        // FFN-streaming's groups: each layer's feed-forward weights, merged where they lie together.
        let tiers = t
            .iter()
            .filter(|x| {
                layer_of(&x.name).is_some() && x.name.contains(".ffn_") && !x.name.contains("norm")
            })
            .map(|x| (x.name.clone(), TierKind::Nvme))
            .collect();
        let p = Placement::from_tensors(t, tiers, 1);
        let reads: Vec<ReadSpec> = p
            .groups
            .iter()
            .filter(|g| in_main(g.file))
            .map(|g| ReadSpec {
                offset: g.offset,
                len: g.len,
            })
            .collect();
        let Some(len) = reads.iter().map(|r| r.len).max() else {
            return Vec::new();
        };
        return vec![row(
            format!("stream pool: {} layer reads", reads.len()),
            len,
            STREAM_IO_THREADS,
            "layer order",
            reads,
        )];
    }
    // Each MoE layer's slices: (offset, stride) of gate, up, down.
    let qd = ExpertCacheConfig::default().io_threads;
    let mut layers: Vec<[(u64, u64); 3]> = Vec::new();
    let mut l = 0;
    while let Some(slices) = (|| {
        let get = |p: &str| {
            t.iter()
                .find(|x| x.name == format!("blk.{l}.ffn_{p}_exps.weight") && in_main(x.file))
                .map(|x| (x.offset, x.n_bytes / n_expert as u64))
        };
        Some([get("gate")?, get("up")?, get("down")?])
    })() {
        layers.push(slices);
        l += 1;
    }
    if layers.is_empty() || !t.iter().any(|x| is_expert_tensor(&x.name)) {
        return Vec::new();
    }
    // A fixed pseudo-random sequence of (layer, expert).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut pick = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x as usize) % layers.len(), ((x >> 32) as usize) % n_expert)
    };
    let picks: Vec<(usize, usize)> = (0..4096).map(|_| pick()).collect();
    let single: Vec<ReadSpec> = picks
        .iter()
        .flat_map(|&(l, e)| {
            layers[l].map(|(off, stride)| ReadSpec {
                offset: off + e as u64 * stride,
                len: stride as usize,
            })
        })
        .collect();
    let stride = layers[0][0].1 as usize;
    let mut rows = vec![row(
        "expert cache: 1 expert = 3 reads".into(),
        stride,
        qd,
        "random experts",
        single,
    )];
    // Two adjacent experts, merged into one read per tensor when the layout allows it.
    let mergeable = {
        let (off, s) = layers[0][0];
        hypura::storage::scatter_follows(off, s as usize, s as usize + 2 * DIRECT_IO_ALIGN, off + s)
    };
    if n_expert > 1 && mergeable {
        let pairs: Vec<ReadSpec> = picks
            .iter()
            .flat_map(|&(l, e)| {
                let e = e.min(n_expert - 2);
                layers[l].map(|(off, stride)| ReadSpec {
                    offset: off + e as u64 * stride,
                    len: 2 * stride as usize,
                })
            })
            .collect();
        rows.push(row(
            "expert cache: 2 adjacent experts = 3 merged reads".into(),
            2 * stride,
            qd,
            "random experts",
            pairs,
        ));
    }
    rows
}

/// The reads of one sample: about `bytes` worth of the row's own reads (cycled), or for
/// standard sizes sequential requests from `base`, wrapping inside the file.
fn plan_reads(r: &Row, bytes: u64, base: u64, size: u64) -> Vec<ReadSpec> {
    if !r.reads.is_empty() {
        let mut out = Vec::new();
        let mut total = 0u64;
        let start = (base as usize / 4096) % r.reads.len();
        for s in r.reads.iter().cycle().skip(start) {
            if total >= bytes && !out.is_empty() {
                break;
            }
            total += s.len as u64;
            out.push(*s);
        }
        return out;
    }
    let req = r.request_bytes as u64;
    let a = DIRECT_IO_ALIGN as u64;
    let n = bytes.div_ceil(req).max(1);
    let span = (size - req) / a * a + a; // aligned starts that fit
    (0..n)
        .map(|i| ReadSpec {
            offset: ((base / a * a + i * req) % span) / a * a,
            len: req as usize,
        })
        .collect()
}

fn human(b: usize) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", b as f64 / 1024.0)
    }
}
