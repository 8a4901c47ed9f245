//! The direct-I/O reader: unaligned offsets and lengths, file tails that are not a whole block,
//! reads past the end, and the buffered fallback where direct I/O is refused (tmpfs).

use std::path::{Path, PathBuf};

use hypura::storage::{AlignedBuf, DirectFile, ReadMode, DIRECT_IO_ALIGN};

/// A file of `len` bytes whose byte i is a hash of i, in `dir`.
fn pattern_file(dir: &Path, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
    std::fs::create_dir_all(dir).unwrap();
    let data: Vec<u8> = (0..len)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let p = dir.join(name);
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

fn disk_dir() -> PathBuf {
    // On the disk the build is on (not tmpfs), so O_DIRECT is exercised.
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("direct-{}", std::process::id()))
}

fn check_ranges(f: &DirectFile, data: &[u8]) {
    let n = data.len() as u64;
    let cases: Vec<(u64, usize)> = vec![
        (0, 1),
        (0, data.len()),
        (1, 4095),
        (4095, 2),
        (4096, 4096),
        (12345, (n / 2) as usize),
        (n - 1, 1),
        (n - 700, 700),
        (n / 2 + 3, (n / 3) as usize),
    ];
    let mut buf = AlignedBuf::new(
        DirectFile::buffer_len_for(0, data.len()) + DIRECT_IO_ALIGN,
        DIRECT_IO_ALIGN,
    )
    .unwrap();
    for (off, len) in cases {
        let r = f.read_at(off, len, &mut buf).unwrap();
        assert_eq!(
            &buf.as_slice()[r],
            &data[off as usize..off as usize + len],
            "offset {off} len {len}"
        );
    }
    // Past the end: an error naming the file and the offset.
    let err = f.read_at(n - 10, 11, &mut buf).unwrap_err().to_string();
    assert!(
        err.contains(&f.path().display().to_string()) && err.contains(&format!("{}", n - 10)),
        "{err}"
    );
    // A buffer too small for the aligned read is refused, not overrun.
    let mut small = AlignedBuf::new(4096, DIRECT_IO_ALIGN).unwrap();
    assert!(f.read_at(4000, 200, &mut small).is_err());
}

#[test]
fn direct_reads_of_unaligned_ranges_on_disk() {
    // Each test its own folder: tests run in parallel, and each removes what it made.
    let dir = disk_dir().join("unaligned");
    // A size that is not a multiple of the block size.
    let (p, data) = pattern_file(&dir, "odd.bin", 3 * 4096 * 7 + 1234);
    let f = DirectFile::open(&p).unwrap();
    assert_eq!(
        f.mode(),
        ReadMode::Direct,
        "the build disk should accept O_DIRECT"
    );
    check_ranges(&f, &data);
    let _ = std::fs::remove_dir_all(&dir);
}

/// tmpfs refuses O_DIRECT on older kernels (hypura then reads buffered and drops the pages) and
/// accepts it on newer ones; either way the bytes must be right.
#[test]
fn tmpfs_reads_are_correct_direct_or_not() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        return; // no tmpfs here; nothing to check
    }
    let dir = shm.join(format!("hypura-direct-{}", std::process::id()));
    let (p, data) = pattern_file(&dir, "t.bin", 100_000);
    let f = DirectFile::open(&p).unwrap();
    eprintln!("tmpfs read mode here: {:?}", f.mode());
    check_ranges(&f, &data);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn buffered_mode_reads_the_same_bytes() {
    let dir = disk_dir().join("buffered");
    let (p, data) = pattern_file(&dir, "b.bin", 50_001);
    check_ranges(&DirectFile::open_buffered(&p).unwrap(), &data);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn aligned_buffers_keep_their_invariants() {
    for (len, align) in [(1, 4096), (4096, 4096), (5000, 512), (0, 64)] {
        let b = AlignedBuf::new(len, align).unwrap();
        assert_eq!(b.as_slice().as_ptr() as usize % align, 0);
        assert_eq!(b.len() % align, 0);
        assert!(b.len() >= len.max(1));
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }
}

/// Scatter reads (`read_scatter_at`): one request fills several buffers with back-to-back parts,
/// gaps of up to a block between them read through, the file's unaligned tail included.
fn check_scatter(f: &DirectFile, data: &[u8]) {
    let n = data.len() as u64;
    let a = DIRECT_IO_ALIGN as u64;
    let cases: Vec<Vec<(u64, usize)>> = vec![
        // Three aligned 12 KiB parts back to back (experts of one tensor).
        vec![(0, 12288), (12288, 12288), (24576, 12288)],
        // An unaligned start, a part ending mid-block, then a gap up to the next block.
        vec![(100, 8092), (8192, 5000), (16384, 3 * 4096)],
        // The last part runs to the file's unaligned end.
        vec![(n / a * a - 2 * a, 2 * 4096), (n / a * a, (n % a) as usize)],
        // One part alone.
        vec![(12288, 777)],
    ];
    for parts in cases {
        let mut bufs: Vec<AlignedBuf> = parts
            .iter()
            .map(|&(_, len)| AlignedBuf::new(len + 2 * DIRECT_IO_ALIGN, DIRECT_IO_ALIGN).unwrap())
            .collect();
        let mut refs: Vec<&mut AlignedBuf> = bufs.iter_mut().collect();
        let ranges = f.read_scatter_at(&parts, &mut refs).unwrap();
        for ((&(off, len), r), b) in parts.iter().zip(&ranges).zip(&bufs) {
            assert_eq!(
                &b.as_slice()[r.clone()],
                &data[off as usize..off as usize + len],
                "{parts:?}: part at {off}"
            );
        }
        for w in parts.windows(2) {
            assert!(hypura::storage::scatter_follows(
                w[0].0,
                w[0].1,
                w[0].1 + 2 * DIRECT_IO_ALIGN,
                w[1].0
            ));
        }
    }
    // Parts that share a block cannot be split between buffers: refused, not misread.
    let mut bufs: Vec<AlignedBuf> = (0..2)
        .map(|_| AlignedBuf::new(3 * 4096, DIRECT_IO_ALIGN).unwrap())
        .collect();
    let mut refs: Vec<&mut AlignedBuf> = bufs.iter_mut().collect();
    assert!(f
        .read_scatter_at(&[(96, 5000), (5096, 5000)], &mut refs)
        .is_err());
    // Past the end: an error naming the file.
    let err = f
        .read_scatter_at(&[(0, 4096), (4096, data.len())], &mut refs)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&f.path().display().to_string()), "{err}");
}

#[test]
fn scatter_reads_direct_and_buffered() {
    let dir = disk_dir().join("scatter");
    let (p, data) = pattern_file(&dir, "s.bin", 11 * 4096 + 1234);
    let f = DirectFile::open(&p).unwrap();
    assert_eq!(f.mode(), ReadMode::Direct);
    check_scatter(&f, &data);
    check_scatter(&DirectFile::open_buffered(&p).unwrap(), &data);
    let _ = std::fs::remove_dir_all(&dir);
}
