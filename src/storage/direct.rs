//! Reading byte ranges of a file around the page cache: `O_DIRECT` + `pread` on Linux,
//! `F_NOCACHE` + `pread` on macOS. Where the filesystem refuses direct I/O (tmpfs, some network
//! filesystems), reads fall back to buffered `pread` followed by `POSIX_FADV_DONTNEED`, so the page
//! cache still does not keep what was streamed; the fallback is reported once.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::aligned::AlignedBuf;
use crate::error::{Error, Result};

/// Alignment used for offsets, lengths and buffers: 4096 covers both 512-byte and 4 KiB
/// logical-block devices.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// How a [`DirectFile`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// Around the page cache (`O_DIRECT` / `F_NOCACHE`).
    Direct,
    /// Through the page cache, dropping the pages after each read.
    BufferedDropCache,
}

/// A file opened for uncached reads of arbitrary byte ranges.
pub struct DirectFile {
    file: File,
    path: PathBuf,
    size: u64,
    mode: ReadMode,
    /// Set when a direct read failed with EINVAL and we switched to buffered reads.
    fell_back: AtomicBool,
}

impl DirectFile {
    /// Opens `path` for direct reads, or buffered ones where direct I/O is refused.
    pub fn open(path: &Path) -> Result<Self> {
        let (file, mode) = open_uncached(path)?;
        Self::with(file, mode, path)
    }

    /// Opens with buffered reads (+ `POSIX_FADV_DONTNEED`), e.g. for tests of the fallback.
    pub fn open_buffered(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("open", path, 0, e))?;
        Self::with(file, ReadMode::BufferedDropCache, path)
    }

    fn with(file: File, mode: ReadMode, path: &Path) -> Result<Self> {
        let size = file
            .metadata()
            .map_err(|e| Error::io("stat", path, 0, e))?
            .len();
        Ok(DirectFile {
            file,
            path: path.to_path_buf(),
            size,
            mode,
            fell_back: AtomicBool::new(false),
        })
    }

    pub fn mode(&self) -> ReadMode {
        if self.fell_back.load(Ordering::Relaxed) {
            ReadMode::BufferedDropCache
        } else {
            self.mode
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Drops the page cache of a range of the file (advisory).
    pub fn drop_cache(&self, offset: u64, len: u64) {
        drop_cache(&self.file, offset, len);
    }

    /// Bytes of `buf` a read of `len` bytes at `offset` needs (alignment slack included).
    pub fn buffer_len_for(offset: u64, len: usize) -> usize {
        let a = DIRECT_IO_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        (end - start) as usize
    }

    /// Reads bytes `offset .. offset + len` of the file into `buf` and returns where they are in
    /// `buf`. The read itself covers the enclosing aligned range (so `buf` may hold a few bytes
    /// before and after). Short reads are continued; reading past the end of the file is an error.
    pub fn read_at(&self, offset: u64, len: usize, buf: &mut AlignedBuf) -> Result<Range<usize>> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::io(
                    "read",
                    &self.path,
                    offset,
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{len} bytes would run past the end ({} bytes)", self.size),
                    ),
                )
            })?;
        let a = DIRECT_IO_ALIGN as u64;
        let start = offset / a * a;
        let aligned_len = Self::buffer_len_for(offset, len);
        if buf.len() < aligned_len || buf.align() < DIRECT_IO_ALIGN {
            return Err(Error::InvalidRequest(format!(
                "{}: I/O buffer of {} bytes (align {}) cannot hold an aligned read of {aligned_len}",
                self.path.display(),
                buf.len(),
                buf.align()
            )));
        }
        // Bytes to read: up to the aligned end, but the file may end before it.
        let want = (start + aligned_len as u64).min(self.size) - start;
        let mut done = 0usize;
        while (done as u64) < want {
            let pos = start + done as u64;
            // Direct reads need aligned lengths, even for the tail of the file.
            let chunk = &mut buf.as_mut_slice()[done..aligned_len];
            done += self.advance(self.pread(chunk, pos), pos)?;
        }
        if self.mode() == ReadMode::BufferedDropCache {
            drop_cache(&self.file, start, want);
        }
        let first = (offset - start) as usize;
        debug_assert!(end - start <= want);
        Ok(first..first + len)
    }

    /// Reads one stretch of the file into several buffers with one request (`preadv`): part `i`
    /// (`parts[i]` = offset, length; in file order) lands in `bufs[i]`, and where it lies there is
    /// returned. The stretch is cut at block boundaries: buffer `i` receives the aligned blocks
    /// from the one holding part `i`'s first byte up to the one where part `i + 1` starts, so each
    /// consecutive pair must satisfy [`scatter_follows`] (gaps between parts are read through).
    pub fn read_scatter_at(
        &self,
        parts: &[(u64, usize)],
        bufs: &mut [&mut AlignedBuf],
    ) -> Result<Vec<Range<usize>>> {
        let bad = |why: String| Error::InvalidRequest(format!("{}: {why}", self.path.display()));
        let (Some(&(first_off, _)), Some(&(last_off, last_len))) = (parts.first(), parts.last())
        else {
            return Ok(Vec::new());
        };
        if parts.len() != bufs.len() {
            return Err(bad(format!(
                "scatter read of {} parts into {} buffers",
                parts.len(),
                bufs.len()
            )));
        }
        let end = last_off
            .checked_add(last_len as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::io(
                    "read",
                    &self.path,
                    last_off,
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "{last_len} bytes would run past the end ({} bytes)",
                            self.size
                        ),
                    ),
                )
            })?;
        let a = DIRECT_IO_ALIGN as u64;
        // Cut points: buffer i gets file bytes cuts[i] .. cuts[i + 1].
        let mut cuts = Vec::with_capacity(parts.len() + 1);
        cuts.push(first_off / a * a);
        for (i, w) in parts.windows(2).enumerate() {
            let ((off, len), (next, _)) = (w[0], w[1]);
            if !scatter_follows(off, len, bufs[i].len(), next) {
                return Err(bad(format!(
                    "scatter read: part at {next} cannot follow {len} bytes at {off} in buffer {i} ({} bytes)",
                    bufs[i].len()
                )));
            }
            cuts.push(next / a * a);
        }
        cuts.push(end.div_ceil(a) * a);
        if let Some((i, b)) = bufs.iter().enumerate().find(|&(i, b)| {
            b.align() < DIRECT_IO_ALIGN || (cuts[i + 1] - cuts[i]) as usize > b.len()
        }) {
            return Err(bad(format!(
                "scatter read: buffer {i} ({} bytes, align {}) cannot hold {} bytes",
                b.len(),
                b.align(),
                cuts[i + 1] - cuts[i]
            )));
        }
        let start = cuts[0];
        let want = cuts[parts.len()].min(self.size) - start;
        let mut done = 0u64;
        while done < want {
            let pos = start + done;
            // The not yet filled rest of each buffer's share, from `done` on.
            let mut skip = done;
            let mut iov: Vec<std::io::IoSliceMut> = Vec::with_capacity(bufs.len());
            for (i, b) in bufs.iter_mut().enumerate() {
                let share = cuts[i + 1] - cuts[i];
                if skip >= share {
                    skip -= share;
                    continue;
                }
                iov.push(std::io::IoSliceMut::new(
                    &mut b.as_mut_slice()[skip as usize..share as usize],
                ));
                skip = 0;
            }
            done += self.advance(self.preadv(&mut iov, pos), pos)? as u64;
        }
        if self.mode() == ReadMode::BufferedDropCache {
            drop_cache(&self.file, start, want);
        }
        Ok(parts
            .iter()
            .zip(&cuts)
            .map(|(&(off, len), &cut)| {
                let first = (off - cut) as usize;
                first..first + len
            })
            .collect())
    }

    fn preadv(&self, iov: &mut [std::io::IoSliceMut], pos: u64) -> std::io::Result<usize> {
        if self.fell_back.load(Ordering::Relaxed) {
            preadv(&*buffered_file(&self.path)?, iov, pos)
        } else {
            preadv(&self.file, iov, pos)
        }
    }

    /// Bytes one read at `pos` made (0 when it is to be retried: interrupted, or direct I/O
    /// refused by the filesystem after open, which switches to buffered reads and says so once);
    /// an error naming the file and offset for anything else, a read at the end of file included.
    fn advance(&self, r: std::io::Result<usize>, pos: u64) -> Result<usize> {
        match r {
            Ok(0) => Err(Error::io(
                "read",
                &self.path,
                pos,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file ended early (truncated while open?)",
                ),
            )),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(0),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && self.mode() == ReadMode::Direct => {
                if !self.fell_back.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "hypura: {}: direct I/O refused by the filesystem; using buffered reads that drop the page cache",
                        self.path.display()
                    );
                }
                Ok(0)
            }
            Err(e) => Err(Error::io("read", &self.path, pos, e)),
        }
    }

    fn pread(&self, buf: &mut [u8], pos: u64) -> std::io::Result<usize> {
        if self.fell_back.load(Ordering::Relaxed) {
            // The descriptor carries O_DIRECT, which cannot be cleared portably: read through a
            // second, buffered descriptor.
            buffered_file(&self.path)?.read_at(buf, pos)
        } else {
            self.file.read_at(buf, pos)
        }
    }
}

/// Whether a part at `next` can follow `prev_len` bytes at `prev` in one
/// [`read_scatter_at`](DirectFile::read_scatter_at) whose buffer for `prev` holds `prev_cap` bytes:
/// `next` starts after `prev` ends, at most one block later, and `prev` ends before the block in
/// which `next` starts (true whenever `next` is block-aligned).
pub fn scatter_follows(prev: u64, prev_len: usize, prev_cap: usize, next: u64) -> bool {
    let a = DIRECT_IO_ALIGN as u64;
    let prev_end = prev + prev_len as u64;
    next >= prev_end
        && next - prev_end <= a
        && prev_end <= next / a * a
        && next / a * a - prev / a * a <= prev_cap as u64
}

/// `preadv(2)` where it exists; elsewhere the slices are read one after the other.
#[cfg(target_os = "linux")]
fn preadv(file: &File, iov: &mut [std::io::IoSliceMut], pos: u64) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let n = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
    // SAFETY: IoSliceMut is ABI-compatible with iovec on Unix; each one borrows a distinct live
    // buffer mutably for the duration of the call, and the count does not exceed the slice.
    let r = unsafe {
        libc::preadv(
            file.as_raw_fd(),
            iov.as_mut_ptr() as *const libc::iovec,
            n,
            pos as libc::off_t,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

#[cfg(not(target_os = "linux"))]
fn preadv(file: &File, iov: &mut [std::io::IoSliceMut], pos: u64) -> std::io::Result<usize> {
    let mut done = 0usize;
    for s in iov.iter_mut() {
        let n = file.read_at(&mut s[..], pos + done as u64)?;
        done += n;
        if n < s.len() {
            break;
        }
    }
    Ok(done)
}

thread_local! {
    static BUFFERED: std::cell::RefCell<Option<(PathBuf, std::rc::Rc<File>)>> = const { std::cell::RefCell::new(None) };
}

/// A buffered descriptor of `path`, kept per thread.
fn buffered_file(path: &Path) -> std::io::Result<std::rc::Rc<File>> {
    BUFFERED.with(|slot| {
        let mut slot = slot.borrow_mut();
        if let Some((p, f)) = slot.as_ref() {
            if p == path {
                return Ok(f.clone());
            }
        }
        let f = std::rc::Rc::new(File::open(path)?);
        *slot = Some((path.to_path_buf(), f.clone()));
        Ok(f)
    })
}

#[cfg(target_os = "linux")]
fn open_uncached(path: &Path) -> Result<(File, ReadMode)> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok((f, ReadMode::Direct)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!(
                "hypura: {}: the filesystem refuses direct I/O (O_DIRECT); using buffered reads that drop the page cache",
                path.display()
            );
            let f = File::open(path).map_err(|e| Error::io("open", path, 0, e))?;
            Ok((f, ReadMode::BufferedDropCache))
        }
        Err(e) => Err(Error::io("open (O_DIRECT)", path, 0, e)),
    }
}

#[cfg(target_os = "macos")]
fn open_uncached(path: &Path) -> Result<(File, ReadMode)> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).map_err(|e| Error::io("open", path, 0, e))?;
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_NOCACHE, 1) };
    if rc == -1 {
        return Ok((f, ReadMode::BufferedDropCache));
    }
    Ok((f, ReadMode::Direct))
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn open_uncached(path: &Path) -> Result<(File, ReadMode)> {
    let f = File::open(path).map_err(|e| Error::io("open", path, 0, e))?;
    Ok((f, ReadMode::BufferedDropCache))
}

/// Asks the kernel to drop the page-cache pages of a range we just read.
fn drop_cache(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fadvise on a descriptor we own; it only advises the kernel.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}
