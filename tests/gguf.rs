//! The GGUF reader against valid, truncated, corrupt and hostile files: always a clear error
//! naming the file, never a panic, a hang or a huge allocation.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypura::gguf::{
    parse_header, read_header, Arch, GgufWriter, Header, ModelFiles, RopeStyle, TensorData,
    TensorType, Value,
};
use hypura::Error;

// ---------------------------------------------------------------------------------------------
// Helpers

/// The global allocator of this test binary: records the largest single request of each thread
/// and refuses any over 4 GiB (the process then aborts with "memory allocation of N bytes failed").
struct Probe;
thread_local!(static LARGEST: Cell<usize> = const { Cell::new(0) });
fn note(size: usize) -> bool {
    let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
    size <= 1 << 32
}
unsafe impl GlobalAlloc for Probe {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if note(l.size()) {
            System.alloc(l)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if note(l.size()) {
            System.alloc_zeroed(l)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if note(n) {
            System.realloc(p, l, n)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}
#[global_allocator]
static GLOBAL: Probe = Probe;

/// Runs `f`; returns its result, the largest single allocation it made and how long it took.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize, Duration) {
    LARGEST.with(|c| c.set(0));
    let start = Instant::now();
    let out = f();
    (out, LARGEST.with(|c| c.get()), start.elapsed())
}

/// ggml's block geometry (elements, bytes), written out independently of the crate's table.
const GEOMETRY: [(TensorType, u64, u64); 15] = {
    use TensorType::*;
    [
        (F32, 1, 4),
        (F16, 1, 2),
        (BF16, 1, 2),
        (Q4_0, 32, 18),
        (Q4_1, 32, 20),
        (Q5_0, 32, 22),
        (Q5_1, 32, 24),
        (Q8_0, 32, 34),
        (Q8_1, 32, 36),
        (Q2_K, 256, 84),
        (Q3_K, 256, 110),
        (Q4_K, 256, 144),
        (Q5_K, 256, 176),
        (Q6_K, 256, 210),
        (Q8_K, 256, 292),
    ]
};
fn geometry(ty: TensorType) -> (u64, u64) {
    let g = GEOMETRY.iter().find(|g| g.0 == ty);
    g.map(|g| (g.1, g.2))
        .unwrap_or_else(|| panic!("{ty} missing from GEOMETRY"))
}
fn n_bytes(ty: TensorType, dims: &[u64]) -> u64 {
    let (elems, bytes) = geometry(ty);
    dims.iter().product::<u64>() / elems * bytes
}

/// xorshift64: deterministic pseudo-random numbers without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: u64) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Metadata of a small llama-style model (`arch.` keys), as a list so tests can drop keys.
fn meta(arch: &str) -> Vec<(String, Value)> {
    let k = |s: &str| format!("{arch}.{s}");
    vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (k("embedding_length"), Value::U32(32)),
        (k("block_count"), Value::U32(1)),
        (k("feed_forward_length"), Value::U32(64)),
        (k("attention.head_count"), Value::U32(4)),
        (k("attention.head_count_kv"), Value::U32(2)),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array((0..8).map(|i| Value::String(format!("t{i}"))).collect()),
        ),
    ]
}

fn writer(meta: &[(String, Value)]) -> GgufWriter {
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.set(k, v.clone());
    }
    w
}

/// A small valid model: metadata plus an F32 embedding, a norm and a Q8_0 matrix.
fn tiny_model(arch: &str) -> GgufWriter {
    let mut w = writer(&meta(arch));
    w.add_f32("token_embd.weight", &[32, 8], &[0.5; 256]);
    w.add_f32("output_norm.weight", &[32], &[1.0; 32]);
    let q = Rng(7).bytes(n_bytes(TensorType::Q8_0, &[32, 32]));
    w.add_tensor(
        "blk.0.attn_q.weight",
        TensorType::Q8_0,
        &[32, 32],
        TensorData::Bytes(q),
    );
    w
}

fn parse(bytes: &[u8]) -> hypura::Result<Header> {
    parse_header(bytes, bytes.len() as u64, Path::new("mem.gguf"))
}

/// Parses `bytes`, which must fail quickly, without allocating much, with an error that names the
/// file and contains every needle. Returns the error.
fn fails(bytes: &[u8], needles: &[&str]) -> Error {
    let (res, largest, took) = measured(|| parse(bytes));
    let err = res
        .err()
        .unwrap_or_else(|| panic!("parsed, but should fail with {needles:?}"));
    let msg = err.to_string();
    assert!(msg.starts_with("mem.gguf: "), "error names the file: {msg}");
    for n in needles {
        assert!(msg.contains(n), "{msg:?} should mention {n:?}");
    }
    assert!(largest < 64 << 10, "allocated {largest} bytes for: {msg}");
    assert!(took < Duration::from_secs(1), "took {took:?}: {msg}");
    err
}

/// Index just past the first occurrence of `needle` in `hay`.
fn after(hay: &[u8], needle: &str) -> usize {
    let n = needle.as_bytes();
    hay.windows(n.len())
        .position(|w| w == n)
        .expect("needle in header")
        + n.len()
}

/// `bytes` with the 8 bytes at `at` replaced by `v`.
fn patch(bytes: &[u8], at: usize, v: u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    b
}

/// GGUF bytes written field by field, for what `GgufWriter` cannot express.
struct Raw(Vec<u8>);
impl Raw {
    fn new(n_tensors: u64, n_kv: u64) -> Raw {
        Raw(Vec::new())
            .u32(0x4655_4747)
            .u32(3)
            .u64(n_tensors)
            .u64(n_kv)
    }
    fn u32(mut self, v: u32) -> Raw {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Raw {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn byte(mut self, v: u8) -> Raw {
        self.0.push(v);
        self
    }
    fn str(self, s: &str) -> Raw {
        let mut r = self.u64(s.len() as u64);
        r.0.extend(s.as_bytes());
        r
    }
    /// A key and its value type; the caller appends the value.
    fn key(self, k: &str, ty: u32) -> Raw {
        self.str(k).u32(ty)
    }
    fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Raw {
        let mut r = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(ty).u64(offset)
    }
    /// Pads to the default alignment and appends `n` data bytes.
    fn data(mut self, n: usize) -> Vec<u8> {
        self.0.resize(self.0.len().div_ceil(32) * 32 + n, 0);
        self.0
    }
}

/// A reader over `head` and then endless 0xFF bytes: with a large `file_bytes`, a huge file.
struct Endless(Vec<u8>, usize);
impl Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        for b in buf.iter_mut() {
            *b = self.0.get(self.1).copied().unwrap_or(0xFF);
            self.1 += 1;
        }
        Ok(buf.len())
    }
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let name = format!(
            "hypura-gguf-{tag}-{}-{}",
            std::process::id(),
            nanos.as_nanos()
        );
        let d = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Valid files

#[test]
fn round_trip_every_value_type_and_tensor_type() {
    assert_eq!(
        GEOMETRY.len(),
        TensorType::ALL.len(),
        "GEOMETRY covers every type"
    );
    let arr = |v: Vec<Value>| Value::Array(v);
    let s = |x: &str| Value::String(x.into());
    let md: Vec<(String, Value)> = vec![
        ("u8", Value::U8(0xAB)),
        ("i8", Value::I8(-128)),
        ("u16", Value::U16(u16::MAX)),
        ("i16", Value::I16(-2)),
        ("u32", Value::U32(u32::MAX)),
        ("i32", Value::I32(i32::MIN)),
        ("u64", Value::U64(u64::MAX)),
        ("i64", Value::I64(i64::MIN)),
        ("f32", Value::F32(-1.5e-7)),
        ("f64", Value::F64(std::f64::consts::PI)),
        ("inf", Value::F32(f32::INFINITY)),
        ("yes", Value::Bool(true)),
        ("no", Value::Bool(false)),
        ("empty", s("")),
        ("text", s("héllo ✓\n\0 \"quoted\"")),
        ("unicode.key.ключ", s("v")),
        ("a.u8", arr(vec![Value::U8(0), Value::U8(255)])),
        ("a.i8", arr(vec![Value::I8(-1)])),
        ("a.u16", arr(vec![Value::U16(9)])),
        ("a.i16", arr(vec![Value::I16(-9), Value::I16(9)])),
        (
            "a.u32",
            arr(vec![Value::U32(1), Value::U32(2), Value::U32(3)]),
        ),
        ("a.i32", arr(vec![Value::I32(-7)])),
        ("a.u64", arr(vec![Value::U64(1 << 60)])),
        ("a.i64", arr(vec![Value::I64(-1 << 60)])),
        ("a.f32", arr(vec![Value::F32(0.25)])),
        ("a.f64", arr(vec![Value::F64(-0.125)])),
        ("a.bool", arr(vec![Value::Bool(false), Value::Bool(true)])),
        ("a.str", arr(vec![s("a"), s(""), s("ü")])),
        ("a.empty", arr(vec![])),
        (
            "a.nested",
            arr(vec![
                arr(vec![Value::I16(-3)]),
                arr(vec![]),
                arr(vec![s("x"), s("y")]),
            ]),
        ),
        (
            "a.deep",
            arr(vec![arr(vec![arr(vec![arr(vec![Value::U8(1)])])])]),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for align in [None, Some(1u64), Some(8), Some(64), Some(4096)] {
        let mut w = writer(&md);
        if let Some(a) = align {
            w.set("general.alignment", Value::U32(a as u32));
        }
        let mut rng = Rng(align.unwrap_or(3));
        let mut want = Vec::new();
        for ty in TensorType::ALL {
            want.push((format!("t.{ty}"), ty, vec![geometry(ty).0 * 2, 3]));
        }
        for dims in [vec![5u64], vec![2, 3, 4], vec![1, 2, 1, 3]] {
            want.push((format!("f32.{}d", dims.len()), TensorType::F32, dims));
        }
        let mut datas = Vec::new();
        for (name, ty, dims) in &want {
            let data = rng.bytes(n_bytes(*ty, dims));
            w.add_tensor(name, *ty, dims, TensorData::Bytes(data.clone()));
            datas.push(data);
        }
        let bytes = w.to_bytes();
        let h = parse(&bytes).unwrap();
        let mut expect: BTreeMap<String, Value> = md.iter().cloned().collect();
        if let Some(a) = align {
            expect.insert("general.alignment".into(), Value::U32(a as u32));
        }
        assert_eq!(
            h.metadata.entries, expect,
            "metadata round trip (alignment {align:?})"
        );
        let a = align.unwrap_or(32);
        assert_eq!(
            (h.version, h.alignment, h.file_bytes),
            (3, a, bytes.len() as u64)
        );
        assert_eq!(h.data_offset % a, 0);
        assert_eq!(h.tensors.len(), want.len());
        for ((t, (name, ty, dims)), data) in h.tensors.iter().zip(&want).zip(&datas) {
            assert_eq!((&t.name, t.ty, &t.dims), (name, *ty, dims));
            assert_eq!(
                t.n_bytes,
                data.len() as u64,
                "{name}: size from block geometry"
            );
            assert_eq!(t.offset % a, 0, "{name} offset aligned to {a}");
            let start = (h.data_offset + t.offset) as usize;
            assert!(
                &bytes[start..start + data.len()] == data,
                "{name} bytes at its offset"
            );
        }
        // Version 2 has the same layout.
        let mut v2 = bytes.clone();
        v2[4] = 2;
        assert_eq!(parse(&v2).unwrap().metadata.entries, expect);
    }
}

#[test]
fn fixtures_parse_with_their_generator_config() {
    // Suffix -> llama.cpp's general.file_type and the file's main tensor type.
    let kinds = [
        ("F32", 0, TensorType::F32),
        ("F16", 1, TensorType::F16),
        ("BF16", 32, TensorType::BF16),
        ("Q8_0", 7, TensorType::Q8_0),
        ("Q4_0", 2, TensorType::Q4_0),
        ("Q4_1", 3, TensorType::Q4_1),
        ("Q5_0", 8, TensorType::Q5_0),
        ("Q5_1", 9, TensorType::Q5_1),
        ("Q2_K", 10, TensorType::Q2_K),
        ("Q3_K_M", 12, TensorType::Q3_K),
        ("Q4_K_M", 15, TensorType::Q4_K),
        ("Q5_K_M", 17, TensorType::Q5_K),
        ("Q6_K", 18, TensorType::Q6_K),
    ];
    let k_types = [
        TensorType::Q2_K,
        TensorType::Q3_K,
        TensorType::Q4_K,
        TensorType::Q5_K,
        TensorType::Q6_K,
    ];
    let mut seen = 0;
    for gguf in common::fixture_models() {
        let p = gguf.display().to_string();
        let files = ModelFiles::open(&gguf).unwrap();
        let cfg = files.config().unwrap();
        let dir = gguf.parent().unwrap();
        let model = dir.file_name().unwrap().to_string_lossy().to_string();
        let json =
            std::fs::read_to_string(dir.join(format!("{model}.json"))).expect("generator json");
        let want: serde_json::Value = serde_json::from_str(&json).unwrap();
        let field = |k: &str| want[k].as_u64().map(|v| v as usize);
        let arch = want["arch"].as_str().unwrap();
        assert_eq!(cfg.arch.gguf_name(), arch, "{p}");
        assert_eq!(
            cfg.rope_style,
            if arch == "qwen2" {
                RopeStyle::HalfSplit
            } else {
                RopeStyle::Interleaved
            }
        );
        assert_eq!(Some(cfg.n_embd), field("d"), "{p}");
        assert_eq!(Some(cfg.n_layer), field("L"), "{p}");
        assert_eq!(Some(cfg.n_ff), field("ff"), "{p}");
        assert_eq!(Some(cfg.n_head), field("h"), "{p}");
        assert_eq!(Some(cfg.n_head_kv), field("hkv"), "{p}");
        assert_eq!(Some(cfg.head_dim), field("head_dim"), "{p}");
        assert_eq!(Some(cfg.n_vocab), field("vocab_size"), "{p}");
        assert_eq!(cfg.n_expert, field("n_expert").unwrap_or(0), "{p}");
        assert_eq!(
            cfg.n_expert_used,
            field("n_expert_used").unwrap_or(0),
            "{p}"
        );
        assert_eq!(
            cfg.rope_freq_base as f64,
            want["theta"].as_f64().unwrap(),
            "{p}"
        );
        assert!(
            (cfg.rms_eps as f64 / want["eps"].as_f64().unwrap() - 1.0).abs() < 1e-6,
            "{p}"
        );

        // Tensor table: 2 (+ output unless tied) + per layer 4 attention + 2 norms (+ 3 biases)
        // + 3 FFN matrices or router + 3 expert stacks.
        let (d, l, ff) = (cfg.n_embd as u64, cfg.n_layer, cfg.n_ff as u64);
        let moe = cfg.n_expert > 0;
        let bias = want["qkv_bias"].as_bool().unwrap_or(false);
        let tied = want["tied"].as_bool().unwrap();
        let per_layer = 6 + if bias { 3 } else { 0 } + if moe { 4 } else { 3 };
        assert_eq!(
            files.tensors.len(),
            2 + !tied as usize + l * per_layer,
            "{p}"
        );
        assert_eq!(files.tensor("output.weight").is_none(), tied, "{p}");
        let dims = |n: &str| {
            files
                .tensor(n)
                .unwrap_or_else(|| panic!("{p}: {n}"))
                .dims
                .clone()
        };
        assert_eq!(dims("token_embd.weight"), [d, cfg.n_vocab as u64], "{p}");
        let kv = (cfg.n_head_kv * cfg.head_dim) as u64;
        assert_eq!(
            dims(&format!("blk.{}.attn_k.weight", l - 1)),
            [d, kv],
            "{p}"
        );
        assert!(
            files.tensor(&format!("blk.{l}.attn_k.weight")).is_none(),
            "{p}"
        );
        let up = if moe {
            vec![d, ff, cfg.n_expert as u64]
        } else {
            vec![d, ff]
        };
        let name = if moe {
            "blk.0.ffn_up_exps.weight"
        } else {
            "blk.0.ffn_up.weight"
        };
        assert_eq!(dims(name), up, "{p}");

        // Types: the file type's main type dominates, vectors stay F32, K files use Q6_K.
        let suffix = kinds
            .iter()
            .find(|k| p.ends_with(&format!("-{}.gguf", k.0)))
            .expect("known suffix");
        let (ftype, main) = (suffix.1, suffix.2);
        assert_eq!(
            files.metadata.usize("general.file_type").unwrap(),
            ftype,
            "{p}"
        );
        let count = |ty| {
            files
                .tensors
                .iter()
                .filter(|t| t.ty == ty && t.dims.len() > 1)
                .count()
        };
        for t in &files.tensors {
            assert!(
                t.dims.len() > 1 || t.ty == TensorType::F32,
                "{p}: vector {} is {}",
                t.name,
                t.ty
            );
            let ok = t.ty == TensorType::F32
                || t.ty == main
                || (main.is_quantized() && t.ty == TensorType::Q6_K)
                || (k_types.contains(&main) && k_types.contains(&t.ty));
            assert!(ok, "{p}: {} is {} in a {} file", t.name, t.ty, suffix.0);
        }
        assert!(
            TensorType::ALL.iter().all(|&ty| count(ty) <= count(main)),
            "{p}: {main} dominates"
        );
        if k_types.contains(&main) {
            assert!(count(TensorType::Q6_K) > 0, "{p} has Q6_K tensors");
        }

        // Bytes: sizes from block geometry, aligned, inside the file, no overlaps.
        let h = read_header(&gguf).unwrap();
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for t in &files.tensors {
            assert_eq!(t.n_bytes, n_bytes(t.ty, &t.dims), "{p}: {}", t.name);
            assert_eq!(
                (t.offset - h.data_offset) % h.alignment,
                0,
                "{p}: {}",
                t.name
            );
            assert!(t.offset + t.n_bytes <= h.file_bytes, "{p}: {}", t.name);
            spans.push((t.offset, t.offset + t.n_bytes));
        }
        spans.sort();
        assert!(
            spans.windows(2).all(|w| w[0].1 <= w[1].0),
            "{p}: tensors overlap"
        );
        seen += 1;
    }
    assert!(seen >= 23, "saw {seen} fixtures");
}

// ---------------------------------------------------------------------------------------------
// Truncated, hostile and corrupt files

#[test]
fn truncation_anywhere_is_an_error() {
    let bytes = tiny_model("llama").to_bytes();
    let h = parse(&bytes).unwrap();
    let end = bytes.len();
    let data = h.data_offset as usize;
    let cuts = (0..data).chain([data, data + 1, data + 1024, data + 1100, end - 34, end - 1]);
    for cut in cuts {
        let err = fails(&bytes[..cut], &[]);
        let msg = err.to_string();
        assert!(matches!(err, Error::InvalidGguf { .. }), "cut {cut}: {msg}");
        assert!(
            msg.contains("truncated") || msg.contains("past the end"),
            "cut {cut}: {msg}"
        );
        if cut >= data {
            assert!(msg.contains(".weight"), "cut {cut} names the tensor: {msg}");
        }
        // The file shrank after its size was taken: the reader runs dry.
        if cut < data {
            let res = parse_header(&bytes[..cut], bytes.len() as u64, Path::new("mem.gguf"));
            let msg = res.err().expect("reader ran dry").to_string();
            assert!(
                msg.contains("truncated") || msg.contains("past the end"),
                "cut {cut}: {msg}"
            );
        }
    }
    // Through the file system: the error names the file.
    let dir = TempDir::new("trunc");
    let p = dir.0.join("cut.gguf");
    std::fs::write(&p, &bytes[..data - 5]).unwrap();
    let msg = ModelFiles::open(&p).unwrap_err().to_string();
    assert!(
        msg.contains(&*p.to_string_lossy()) && msg.contains("truncated"),
        "{msg}"
    );
    let msg = ModelFiles::open(&dir.0.join("absent.gguf"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("absent.gguf") && msg.contains("open"), "{msg}");
}

#[test]
fn hostile_counts_and_lengths_fail_fast() {
    let good = tiny_model("llama").to_bytes();
    let len = good.len() as u64;
    let mut b = good.clone();
    b[0] = b'X';
    fails(&b, &["not a GGUF file"]);
    for (v, needle) in [
        (1u32, "version 1 "),
        (99, "version 99 "),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let mut b = good.clone();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        fails(&b, &[needle]);
    }
    // n_tensors at 8, n_kv at 16, the first key's length at 24: u64::MAX and just past the end.
    fails(
        &patch(&good, 8, u64::MAX),
        &["tensors", "truncated or corrupt"],
    );
    fails(&patch(&good, 8, (len - 24) / 32 + 1), &["tensors"]);
    fails(&patch(&good, 16, u64::MAX), &["metadata entries"]);
    fails(
        &patch(&good, 16, (len - 24) / 13 + 1),
        &["metadata entries"],
    );
    fails(&patch(&good, 24, u64::MAX), &["string bytes"]);
    fails(&patch(&good, 24, len - 32 + 1), &["string bytes"]);
    fails(&patch(&good, 24, len - 32), &["truncated"]);
    // A string value's length and an array's length.
    let arch = after(&good, "general.architecture") + 4;
    fails(&patch(&good, arch, u64::MAX), &["string bytes"]);
    fails(
        &patch(&good, arch, len - arch as u64 - 8 + 1),
        &["string bytes"],
    );
    let tokens = after(&good, "tokenizer.ggml.tokens") + 8;
    fails(&patch(&good, tokens, u64::MAX), &["array items"]);
    fails(
        &patch(&good, tokens, (len - tokens as u64 - 8) / 8 + 1),
        &["array items"],
    );
    // A tensor name's length.
    let name = after(&good, "output_norm.weight") - "output_norm.weight".len() - 8;
    fails(&patch(&good, name, u64::MAX), &["string bytes"]);
}

#[test]
fn huge_claims_in_a_huge_file_allocate_nothing() {
    // A 1 TiB "file": every count below fits in it, so only the reader's limits stop them.
    let huge = |head: Raw, needle: &str| {
        let (res, largest, took) =
            measured(|| parse_header(Endless(head.0, 0), 1 << 40, Path::new("huge.gguf")));
        let msg = res.err().expect("must fail").to_string();
        assert!(
            msg.contains("huge.gguf") && msg.contains(needle),
            "{msg:?} should mention {needle:?}"
        );
        assert!(largest < 1 << 20, "allocated {largest} bytes for: {msg}");
        assert!(took < Duration::from_secs(1), "took {took:?}: {msg}");
    };
    huge(Raw::new(1 << 34, 0), "tensors");
    huge(Raw::new(1000, 0), "string bytes"); // few tensors, then garbage
    huge(Raw::new(0, 1 << 35), "metadata entries");
    huge(Raw::new(0, 1).key("a", 8).u64(1 << 36), "string bytes");
    huge(
        Raw::new(0, 1).key("a", 9).u32(7).u64(1 << 36),
        "array items",
    );
    huge(
        Raw::new(0, 1).key("a", 9).u32(7).u64(1 << 23),
        "bool value 255",
    );
    huge(
        Raw::new(0, 1)
            .key("a", 9)
            .u32(9)
            .u64(1 << 23)
            .u32(7)
            .u64(1 << 23),
        "array items",
    );
}

#[test]
fn hostile_tensor_entries() {
    let one = |dims: &[u64], ty: u32, offset: u64, data: usize| {
        Raw::new(1, 0).tensor("w.00", dims, ty, offset).data(data)
    };
    assert_eq!(
        parse(&one(&[32], 0, 0, 128)).unwrap().tensors[0].n_bytes,
        128
    );
    fails(&one(&[], 0, 0, 128), &["w.00", "0 dimensions"]);
    fails(&one(&[1, 1, 1, 1, 1], 0, 0, 128), &["w.00", "5 dimensions"]);
    fails(&one(&[u64::MAX, 4], 0, 0, 128), &["w.00", "absurd"]);
    fails(&one(&[1 << 32, 1 << 32], 0, 0, 128), &["absurd"]);
    fails(&one(&[0, u64::MAX], 0, 0, 128), &["absurd"]);
    fails(&one(&[33], 8, 0, 1024), &["w.00", "not a multiple"]);
    for id in [16u32, 4, 99, u32::MAX] {
        let err = fails(&one(&[256], id, 0, 1024), &["w.00", &format!("type {id}")]);
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    }
    fails(&one(&[32], 0, 8, 256), &["w.00", "offset 8 is not aligned"]);
    fails(&one(&[32], 0, 0, 64), &["w.00", "past the end"]);
    fails(&one(&[32], 0, 1 << 40, 128), &["past the end"]);
    fails(&one(&[32], 0, u64::MAX - 31, 128), &["past the end"]);
    let two = Raw::new(2, 0)
        .tensor("w", &[8], 0, 0)
        .tensor("w", &[8], 0, 32)
        .data(64);
    fails(&two, &["tensor 'w' appears twice"]);
}

#[test]
fn corrupt_values_duplicates_and_alignment() {
    let ok = Raw::new(0, 2)
        .key("a", 7)
        .byte(1)
        .key("b", 9)
        .u32(7)
        .u64(2)
        .byte(0)
        .byte(1)
        .data(0);
    assert_eq!(
        parse(&ok).unwrap().metadata.get("b"),
        Some(&Value::Array(vec![Value::Bool(false), Value::Bool(true)]))
    );
    fails(
        &Raw::new(0, 1).key("a", 7).byte(2).data(0),
        &["bool value 2"],
    );
    fails(
        &Raw::new(0, 1)
            .key("a", 9)
            .u32(7)
            .u64(2)
            .byte(1)
            .byte(2)
            .data(0),
        &["bool value 2"],
    );
    fails(
        &Raw::new(0, 1).key("a", 13).u64(0).data(0),
        &["unknown metadata value type 13"],
    );
    fails(
        &Raw::new(0, 1).key("a", u32::MAX).u64(0).data(0),
        &["unknown metadata value type 4294967295"],
    );
    fails(
        &Raw::new(0, 1).key("a", 9).u32(13).u64(1).data(8),
        &["unknown array item type 13"],
    );
    fails(
        &Raw::new(0, 2)
            .key("k", 0)
            .byte(1)
            .key("k", 0)
            .byte(2)
            .data(0),
        &["key 'k' appears twice"],
    );
    // Arrays nest 4 deep at most.
    let nest = |depth: usize| {
        let mut v = Value::I32(1);
        for _ in 0..depth {
            v = Value::Array(vec![v]);
        }
        let mut w = GgufWriter::new();
        w.set("deep", v.clone());
        (w.to_bytes(), v)
    };
    let (b, v) = nest(4);
    assert_eq!(parse(&b).unwrap().metadata.get("deep"), Some(&v));
    fails(&nest(5).0, &["nested too deeply"]);
    fails(&nest(64).0, &["nested too deeply"]);
    // general.alignment: a power of two up to 1 MiB, as an integer.
    let align = |v: Value| {
        let mut w = Raw::new(0, 1).key("general.alignment", v.type_id());
        w.0.extend(match v {
            Value::U32(x) => x.to_le_bytes().to_vec(),
            Value::I32(x) => x.to_le_bytes().to_vec(),
            Value::U64(x) => x.to_le_bytes().to_vec(),
            Value::F32(x) => x.to_le_bytes().to_vec(),
            Value::Bool(x) => vec![x as u8],
            _ => unreachable!(),
        });
        w.data(0)
    };
    assert_eq!(parse(&align(Value::U32(256))).unwrap().alignment, 256);
    for bad in [
        Value::U32(48),
        Value::U32(0),
        Value::U64(1 << 30),
        Value::I32(-32),
        Value::F32(32.0),
        Value::Bool(true),
    ] {
        fails(&align(bad), &["general.alignment", "power of two"]);
    }
}

#[test]
fn random_corruption_never_panics() {
    let good = tiny_model("qwen2").to_bytes();
    let header_len = parse(&good).unwrap().data_offset as usize;
    let interesting = [
        0,
        1,
        u64::MAX,
        1 << 63,
        good.len() as u64,
        good.len() as u64 + 1,
        5,
        32,
    ];
    let mut rng = Rng(0x1234_5678_9abc_def0);
    let (mut ok, mut err) = (0, 0);
    let start = Instant::now();
    for i in 0..4000 {
        let mut b = good.clone();
        let mut edits = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(header_len);
            match rng.below(3) {
                0 => b[at] ^= 1 << rng.below(8),
                1 => b[at] = rng.next() as u8,
                _ if at + 8 <= b.len() => {
                    b = patch(&b, at, interesting[rng.below(interesting.len())])
                }
                _ => b[at] = 0xFF,
            }
            edits.push(at);
        }
        let res = std::panic::catch_unwind(|| {
            let h = parse(&b)?;
            for t in &h.tensors {
                assert_eq!(t.offset % h.alignment, 0);
                assert!(
                    h.data_offset + t.offset + t.n_bytes <= b.len() as u64,
                    "{t:?}"
                );
            }
            ModelFiles::from_headers(vec![h])?.config().map(|_| ())
        });
        match res {
            Ok(Ok(())) => ok += 1,
            Ok(Err(_)) => err += 1,
            Err(_) => panic!("mutation {i} (bytes {edits:?}) panicked"),
        }
    }
    assert!(
        ok > 100 && err > 1000,
        "ok {ok} err {err}: the mutations should do both"
    );
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Model configuration

fn config_of(w: GgufWriter) -> hypura::Result<hypura::gguf::ModelConfig> {
    ModelFiles::from_headers(vec![parse(&w.to_bytes())?])?.config()
}

/// `meta` without `key`, or with it replaced by `value`, plus a token embedding.
fn edited(arch: &str, key: &str, value: Option<Value>) -> GgufWriter {
    let mut md = meta(arch);
    md.retain(|(k, _)| k != key);
    md.extend(value.map(|v| (key.to_string(), v)));
    let mut w = writer(&md);
    w.add_f32("token_embd.weight", &[32, 8], &[0.0; 256]);
    w
}

#[test]
fn config_errors_name_what_is_wrong() {
    let cfg = config_of(tiny_model("llama")).unwrap();
    assert_eq!(
        (cfg.arch, cfg.n_embd, cfg.n_layer, cfg.n_ff),
        (Arch::Llama, 32, 1, 64)
    );
    assert_eq!(
        (cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_vocab),
        (4, 2, 8, 8)
    );
    assert_eq!(
        (cfg.rope_freq_base, cfg.rms_eps, cfg.n_expert),
        (10000.0, 1e-5, 0)
    );
    let cfg = config_of(tiny_model("qwen2")).unwrap();
    assert_eq!(
        (cfg.arch, cfg.rope_style),
        (Arch::Qwen2, RopeStyle::HalfSplit)
    );

    let err = config_of(tiny_model("gpt-neox")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Unsupported { .. }), "{msg}");
    for n in ["mem.gguf", "'gpt-neox'", "not supported", "llama", "qwen2"] {
        assert!(msg.contains(n), "{msg:?} should mention {n:?}");
    }
    let metadata_err = |w: GgufWriter, want_key: &str, needle: &str| {
        let err = config_of(w).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, Error::Metadata { key, .. } if key == want_key),
            "{want_key}: {msg}"
        );
        assert!(
            msg.contains("mem.gguf") && msg.contains(needle),
            "{msg:?} should mention {needle:?}"
        );
    };
    for key in [
        "general.architecture",
        "llama.embedding_length",
        "llama.block_count",
        "llama.feed_forward_length",
        "llama.attention.head_count",
    ] {
        metadata_err(edited("llama", key, None), key, "missing");
    }
    let key = "llama.block_count";
    metadata_err(
        edited("llama", key, Some(Value::String("2".into()))),
        key,
        "non-negative integer",
    );
    let key = "llama.attention.head_count_kv";
    metadata_err(
        edited("llama", key, Some(Value::U32(3))),
        key,
        "3 KV heads must divide the 4",
    );
    metadata_err(edited("llama", key, Some(Value::U32(0))), key, "0 KV heads");
    let key = "llama.attention.head_count";
    metadata_err(edited("llama", key, Some(Value::U32(0))), key, "0 heads");
    let key = "llama.attention.key_length";
    metadata_err(
        edited("llama", key, Some(Value::U32(0))),
        key,
        "head size 0",
    );
    let key = "llama.rope.freq_base";
    metadata_err(
        edited("llama", key, Some(Value::F32(-1.0))),
        key,
        "RoPE base",
    );
    let mut w = edited("llama", "llama.expert_count", Some(Value::U32(4)));
    w.set("llama.expert_used_count", Value::U32(5));
    metadata_err(w, "llama.expert_used_count", "5 of 4 experts");

    let tensor_err = |w: GgufWriter, needle: &str| {
        let err = config_of(w).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, Error::Tensor { name, .. } if name == "token_embd.weight"),
            "{msg}"
        );
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    };
    tensor_err(writer(&meta("llama")), "missing");
    let mut w = writer(&meta("llama"));
    w.add_f32("token_embd.weight", &[16, 8], &[0.0; 128]);
    tensor_err(w, "does not match embedding length 32");
}

// ---------------------------------------------------------------------------------------------
// Split sets

/// Writes a 3-part set named by `name(i)` (1-based); returns the paths and each tensor's
/// (name, part, data). `tensors_count` is what the parts' split.tensors.count claims.
fn write_split(
    dir: &Path,
    name: impl Fn(usize) -> String,
    tensors_count: i32,
) -> (Vec<PathBuf>, Vec<(String, usize, Vec<u8>)>) {
    let layout: [&[(&str, TensorType, &[u64])]; 3] = [
        &[
            ("token_embd.weight", TensorType::F32, &[32, 8]),
            ("output_norm.weight", TensorType::F32, &[32]),
        ],
        &[
            ("blk.0.attn_q.weight", TensorType::Q8_0, &[32, 32]),
            ("blk.0.attn_k.weight", TensorType::Q4_K, &[256, 4]),
        ],
        &[("output.weight", TensorType::F16, &[32, 8])],
    ];
    let (mut paths, mut tensors) = (Vec::new(), Vec::new());
    let mut rng = Rng(99);
    for (part, list) in layout.iter().enumerate() {
        let mut w = if part == 0 {
            writer(&meta("llama"))
        } else {
            GgufWriter::new()
        };
        w.set("split.no", Value::U16(part as u16));
        w.set("split.count", Value::U16(3));
        w.set("split.tensors.count", Value::I32(tensors_count));
        for &(n, ty, dims) in list.iter() {
            let data = rng.bytes(n_bytes(ty, dims));
            w.add_tensor(n, ty, dims, TensorData::Bytes(data.clone()));
            tensors.push((n.to_string(), part, data));
        }
        let p = dir.join(name(part + 1));
        std::fs::write(&p, w.to_bytes()).unwrap();
        paths.push(p);
    }
    (paths, tensors)
}

#[test]
fn split_sets_open_from_the_first_part() {
    let dir = TempDir::new("split");
    let five = |i: usize| format!("m-{i:05}-of-00003.gguf");
    for name in [&five as &dyn Fn(usize) -> String, &|i| {
        format!("short-{i:03}-of-003.gguf")
    }] {
        let (paths, tensors) = write_split(&dir.0, name, 5);
        let files = ModelFiles::open(&paths[0]).unwrap();
        assert_eq!(files.paths, paths);
        assert_eq!(files.tensors.len(), tensors.len());
        assert_eq!(
            files.metadata.get("split.no"),
            Some(&Value::U16(0)),
            "metadata of part 1"
        );
        assert_eq!(files.config().unwrap().n_vocab, 8);
        for (n, part, data) in &tensors {
            let t = files.tensor(n).unwrap();
            assert_eq!(t.file, *part, "{n}");
            let h = read_header(&paths[*part]).unwrap();
            let rel = h.tensors.iter().find(|x| &x.name == n).unwrap().offset;
            assert_eq!(t.offset, h.data_offset + rel, "{n}: absolute offset");
            let bytes = std::fs::read(&paths[*part]).unwrap();
            assert!(
                &bytes[t.offset as usize..][..data.len()] == data,
                "{n}: bytes at its offset"
            );
        }
    }
    let (paths, _) = write_split(&dir.0, five, 5);
    let name = |i: usize| paths[i].file_name().unwrap().to_string_lossy().to_string();
    let err = ModelFiles::open(&paths[1]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::InvalidGguf { .. }), "{msg}");
    assert!(
        msg.contains(&name(1)) && msg.contains("open the first part") && msg.contains(&name(0)),
        "{msg}"
    );

    write_split(&dir.0, five, 6);
    let msg = ModelFiles::open(&paths[0]).unwrap_err().to_string();
    assert!(
        msg.contains("split.tensors.count says 6") && msg.contains("hold 5"),
        "{msg}"
    );

    write_split(&dir.0, five, 5);
    let tmp = dir.0.join("swap");
    std::fs::rename(&paths[1], &tmp).unwrap();
    std::fs::rename(&paths[2], &paths[1]).unwrap();
    std::fs::rename(&tmp, &paths[2]).unwrap();
    let msg = ModelFiles::open(&paths[0]).unwrap_err().to_string();
    assert!(
        msg.contains(&name(1))
            && msg.contains("split.no is 2")
            && msg.contains("another split set"),
        "{msg}"
    );

    write_split(&dir.0, five, 5);
    std::fs::remove_file(&paths[2]).unwrap();
    let msg = ModelFiles::open(&paths[0]).unwrap_err().to_string();
    assert!(
        msg.contains(&name(0)) && msg.contains(&name(2)) && msg.contains("missing"),
        "{msg}"
    );

    let plain = dir.0.join("plain.gguf");
    std::fs::copy(&paths[0], &plain).unwrap();
    let msg = ModelFiles::open(&plain).unwrap_err().to_string();
    assert!(
        msg.contains("plain.gguf") && msg.contains("3-part split"),
        "{msg}"
    );
}
