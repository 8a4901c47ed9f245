//! The GGUF reader against valid, truncated, corrupt and hostile files: always a clear error
//! naming the file, never a panic, a hang or a huge allocation.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypura::gguf::{parse_header, read_header, Arch, GgufWriter, Header, ModelConfig, ModelFiles};
use hypura::gguf::{RopeStyle, TensorData, TensorType, Value};
use hypura::Error;

// ---------------------------------------------------------------------------------------------
// Helpers

/// This test binary's allocator: records each thread's largest single request and refuses any
/// over 4 GiB (the process then aborts: "memory allocation of N bytes failed").
struct Probe;
thread_local!(static LARGEST: Cell<usize> = const { Cell::new(0) });
unsafe impl GlobalAlloc for Probe {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|c| c.set(c.get().max(l.size())));
        if l.size() > 1 << 32 {
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}
#[global_allocator]
static GLOBAL: Probe = Probe;

/// Runs `f`; returns its result, the largest single allocation it made and the time it took.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize, Duration) {
    LARGEST.with(|c| c.set(0));
    let start = Instant::now();
    let out = f();
    (out, LARGEST.with(|c| c.get()), start.elapsed())
}

/// ggml's block geometry (type, elements, bytes), written out independently of the crate's.
#[rustfmt::skip]
const GEOMETRY: [(TensorType, u64, u64); 15] = {
    use TensorType::*;
    [(F32, 1, 4), (F16, 1, 2), (BF16, 1, 2), (Q4_0, 32, 18), (Q4_1, 32, 20), (Q5_0, 32, 22),
     (Q5_1, 32, 24), (Q8_0, 32, 34), (Q8_1, 32, 36), (Q2_K, 256, 84), (Q3_K, 256, 110),
     (Q4_K, 256, 144), (Q5_K, 256, 176), (Q6_K, 256, 210), (Q8_K, 256, 292)]
};
fn n_bytes(ty: TensorType, dims: &[u64]) -> u64 {
    let g = GEOMETRY.iter().find(|g| g.0 == ty).expect("in GEOMETRY");
    dims.iter().product::<u64>() / g.1 * g.2
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

/// Metadata of a small model of `arch`, as a list so that tests can drop or replace keys.
fn meta(arch: &str) -> Vec<(String, Value)> {
    let tokens = (0..8).map(|i| Value::String(format!("t{i}"))).collect();
    let mut md = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
    ];
    let keys = "embedding_length block_count feed_forward_length attention.head_count \
                attention.head_count_kv";
    for (k, v) in keys.split_whitespace().zip([32, 1, 64, 4, 2]) {
        md.push((format!("{arch}.{k}"), Value::U32(v)));
    }
    md
}

fn writer(meta: &[(String, Value)]) -> GgufWriter {
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.set(k, v.clone());
    }
    w
}

/// A small valid model: metadata, an F32 embedding and norm, and a Q8_0 matrix.
fn tiny_model(arch: &str) -> GgufWriter {
    let mut w = writer(&meta(arch));
    w.add_f32("token_embd.weight", &[32, 8], &[0.5; 256]);
    w.add_f32("output_norm.weight", &[32], &[1.0; 32]);
    let q = TensorData::Bytes(Rng(7).bytes(n_bytes(TensorType::Q8_0, &[32, 32])));
    w.add_tensor("blk.0.attn_q.weight", TensorType::Q8_0, &[32, 32], q);
    w
}

fn parse(bytes: &[u8]) -> hypura::Result<Header> {
    parse_header(bytes, bytes.len() as u64, Path::new("mem.gguf"))
}

/// Asserts that `msg` contains every needle.
fn mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "{msg:?} should mention {n:?}");
    }
}

/// Parses `bytes`, which must fail, quickly and without allocating much, with an error that names
/// the file and mentions every needle. Returns the error.
fn fails(bytes: &[u8], needles: &[&str]) -> Error {
    let (res, largest, took) = measured(|| parse(bytes));
    let err = res
        .err()
        .unwrap_or_else(|| panic!("parsed; should fail with {needles:?}"));
    let msg = err.to_string();
    assert!(msg.starts_with("mem.gguf: "), "error names the file: {msg}");
    mentions(&msg, needles);
    assert!(largest < 64 << 10, "allocated {largest} bytes for: {msg}");
    assert!(took < Duration::from_secs(1), "took {took:?}: {msg}");
    err
}

/// Index just past the first occurrence of `needle` in `hay`.
fn after(hay: &[u8], needle: &str) -> usize {
    let n = needle.as_bytes();
    hay.windows(n.len()).position(|w| w == n).expect("needle") + n.len()
}

/// `bytes` with the 8 bytes at `at` replaced by `v`.
fn patch(bytes: &[u8], at: usize, v: u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    b
}

/// GGUF bytes written field by field, for what `GgufWriter` cannot express.
struct Raw(Vec<u8>);
#[rustfmt::skip]
impl Raw {
    fn new(n_tensors: u64, n_kv: u64) -> Raw { Raw(b"GGUF".to_vec()).u32(3).u64(n_tensors).u64(n_kv) }
    fn put(mut self, b: &[u8]) -> Raw { self.0.extend(b); self }
    fn u32(self, v: u32) -> Raw { self.put(&v.to_le_bytes()) }
    fn u64(self, v: u64) -> Raw { self.put(&v.to_le_bytes()) }
    fn str(self, s: &str) -> Raw { self.u64(s.len() as u64).put(s.as_bytes()) }
    /// A key and its value type; the value follows.
    fn key(self, k: &str, ty: u32) -> Raw { self.str(k).u32(ty) }
    /// A key of an array, its item type and count; the items follow.
    fn array(self, k: &str, item_ty: u32, n: u64) -> Raw { self.key(k, 9).u32(item_ty).u64(n) }
    fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Raw {
        let r = self.str(name).u32(dims.len() as u32);
        dims.iter().fold(r, |r, &d| r.u64(d)).u32(ty).u64(offset)
    }
    /// Pads to the default alignment of 32 and appends `n` zero data bytes.
    fn data(mut self, n: usize) -> Vec<u8> {
        self.0.resize(self.0.len().div_ceil(32) * 32 + n, 0);
        self.0
    }
}

/// A reader of `head` and then endless 0xFF bytes: with a large `file_bytes`, a huge file.
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
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        let unique = format!("{}-{}", std::process::id(), t.unwrap().as_nanos());
        let d = std::env::temp_dir().join(format!("hypura-gguf-{tag}-{unique}"));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One key of every value type, arrays of each, empty and nested arrays, odd strings.
#[rustfmt::skip]
fn every_value() -> Vec<(String, Value)> {
    use Value::*;
    let s = |x: &str| String(x.into());
    vec![
        ("u8", U8(0xAB)), ("i8", I8(-128)), ("u16", U16(u16::MAX)), ("i16", I16(-2)),
        ("u32", U32(u32::MAX)), ("i32", I32(i32::MIN)), ("u64", U64(u64::MAX)), ("i64", I64(i64::MIN)),
        ("f32", F32(-1.5e-7)), ("f64", F64(std::f64::consts::PI)), ("inf", F32(f32::INFINITY)),
        ("yes", Bool(true)), ("no", Bool(false)), ("empty", s("")), ("text", s("héllo ✓\n\0 \"q\"")),
        ("unicode.ключ", s("v")), ("a.u8", Array(vec![U8(0), U8(255)])), ("a.i8", Array(vec![I8(-1)])),
        ("a.u16", Array(vec![U16(9)])), ("a.i16", Array(vec![I16(-9), I16(9)])),
        ("a.u32", Array(vec![U32(1), U32(2), U32(3)])), ("a.i32", Array(vec![I32(-7)])),
        ("a.u64", Array(vec![U64(1 << 60)])), ("a.i64", Array(vec![I64(-1 << 60)])),
        ("a.f32", Array(vec![F32(0.25)])), ("a.f64", Array(vec![F64(-0.125)])),
        ("a.bool", Array(vec![Bool(false), Bool(true)])), ("a.str", Array(vec![s("a"), s(""), s("ü")])),
        ("a.empty", Array(vec![])),
        ("a.nested", Array(vec![Array(vec![I16(-3)]), Array(vec![]), Array(vec![s("x"), s("y")])])),
        ("a.deep", Array(vec![Array(vec![Array(vec![Array(vec![U8(1)])])])])),
    ]
    .into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Checks a fixture against its generator config (`<model>.json`): `main` is the tensor type its
/// name promises, `ftype` llama.cpp's `general.file_type` for that.
fn check_fixture(gguf: &Path, ftype: usize, main: TensorType) {
    let files = ModelFiles::open(gguf).unwrap();
    let c = files.config().unwrap();
    let dir = gguf.parent().unwrap();
    let model = dir.file_name().unwrap().to_string_lossy();
    let json = std::fs::read(dir.join(format!("{model}.json"))).unwrap();
    let want: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let arch = want["arch"].as_str().unwrap();
    let rope = [RopeStyle::Interleaved, RopeStyle::HalfSplit][(arch == "qwen2") as usize];
    assert_eq!((c.arch.gguf_name(), c.rope_style), (arch, rope));
    let got = serde_json::to_value(&c).unwrap();
    let pairs = "n_embd=d n_layer=L n_ff=ff n_head=h n_head_kv=hkv head_dim=head_dim \
                 n_vocab=vocab_size n_expert=n_expert n_expert_used=n_expert_used";
    for (ours, theirs) in pairs.split_whitespace().filter_map(|p| p.split_once('=')) {
        let theirs = want[theirs].as_u64().unwrap_or(0);
        assert_eq!(got[ours].as_u64(), Some(theirs), "{ours}");
    }
    assert_eq!(c.rope_freq_base as f64, want["theta"].as_f64().unwrap());
    assert_eq!(c.rms_eps, want["eps"].as_f64().unwrap() as f32);
    assert_eq!(files.metadata.usize("general.file_type").unwrap(), ftype);

    // The tensor table: embedding, final norm, output unless tied; per layer 4 attention
    // matrices, 2 norms, 3 biases if qkv_bias, then 3 FFN matrices or a router + 3 expert stacks.
    let (l, moe) = (c.n_layer, c.n_expert > 0);
    let bias = want["qkv_bias"].as_bool().unwrap_or(false);
    let tied = want["tied"].as_bool().unwrap();
    let per_layer = 6 + 3 * bias as usize + 3 + moe as usize;
    assert_eq!(files.tensors.len(), 2 + !tied as usize + l * per_layer);
    assert_eq!(files.tensor("output.weight").is_none(), tied);

    // Types: vectors stay F32; the promised type dominates; quantized files may keep the output
    // in Q6_K, and K-quant mixes (Q4_K_M, ...) use several K types, Q6_K always among them.
    use TensorType::{Q2_K, Q3_K, Q4_K, Q5_K, Q6_K};
    let k_quant = |ty| [Q2_K, Q3_K, Q4_K, Q5_K, Q6_K].contains(&ty);
    let matrices = files.tensors.iter().filter(|t| t.dims.len() > 1);
    let count = |ty| matrices.clone().filter(|t| t.ty == ty).count();
    for t in &files.tensors {
        let vector_ok = t.dims.len() > 1 || t.ty == TensorType::F32;
        let ok = [TensorType::F32, main].contains(&t.ty)
            || (main.is_quantized() && t.ty == Q6_K)
            || (k_quant(main) && k_quant(t.ty));
        assert!(ok && vector_ok, "{} is {}", t.name, t.ty);
    }
    assert!(TensorType::ALL.iter().all(|&ty| count(ty) <= count(main)));
    assert!(
        !k_quant(main) || count(Q6_K) > 0,
        "K-quant mix without Q6_K"
    );

    // Bytes: sizes from the block geometry, aligned, inside the file, no overlaps.
    let h = read_header(gguf).unwrap();
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for t in &files.tensors {
        assert_eq!(t.n_bytes, n_bytes(t.ty, &t.dims), "{}", t.name);
        assert_eq!((t.offset - h.data_offset) % h.alignment, 0, "{}", t.name);
        assert!(t.offset + t.n_bytes <= h.file_bytes, "{}", t.name);
        spans.push((t.offset, t.offset + t.n_bytes));
    }
    spans.sort();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "overlap");
}

fn config_of(w: GgufWriter) -> hypura::Result<ModelConfig> {
    ModelFiles::from_headers(vec![parse(&w.to_bytes())?])?.config()
}

/// The tiny llama model without `key`, or with `key` set to `value`.
fn edited(key: &str, value: Option<Value>) -> GgufWriter {
    let mut md = meta("llama");
    md.retain(|(k, _)| k != key);
    md.extend(value.map(|v| (key.to_string(), v)));
    let mut w = writer(&md);
    w.add_f32("token_embd.weight", &[32, 8], &[0.0; 256]);
    w
}

/// A tensor of a split set: name, part (0-based), bytes.
type Placed = (String, usize, Vec<u8>);
type Namer<'a> = &'a dyn Fn(usize) -> String;

/// Writes a model as 3 parts named `name(1..=3)` the way gguf-split does (split keys in every
/// part, the model's metadata only in the first); `count` is the split.tensors.count written.
fn write_split(dir: &Path, name: Namer, count: i32) -> (Vec<PathBuf>, Vec<Placed>) {
    use TensorType::*;
    #[rustfmt::skip]
    let parts: [&[(&str, TensorType, &[u64])]; 3] = [
        &[("token_embd.weight", F32, &[32, 8]), ("output_norm.weight", F32, &[32])],
        &[("blk.0.attn_q.weight", Q8_0, &[32, 32]), ("blk.0.attn_k.weight", Q4_K, &[256, 4])],
        &[("output.weight", F16, &[32, 8])],
    ];
    let (mut paths, mut placed, mut rng) = (Vec::new(), Vec::new(), Rng(99));
    for (part, tensors) in parts.iter().enumerate() {
        let md = if part == 0 { meta("llama") } else { Vec::new() };
        let mut w = writer(&md);
        w.set("split.no", Value::U16(part as u16));
        w.set("split.count", Value::U16(3));
        w.set("split.tensors.count", Value::I32(count));
        for &(n, ty, dims) in tensors.iter() {
            let data = rng.bytes(n_bytes(ty, dims));
            w.add_tensor(n, ty, dims, TensorData::Bytes(data.clone()));
            placed.push((n.to_string(), part, data));
        }
        paths.push(dir.join(name(part + 1)));
        std::fs::write(&paths[part], w.to_bytes()).unwrap();
    }
    (paths, placed)
}

// ---------------------------------------------------------------------------------------------
// Valid files

#[test]
fn round_trip_every_value_type_and_tensor_type() {
    assert!(TensorType::ALL
        .iter()
        .all(|&t| GEOMETRY.iter().any(|g| g.0 == t)));
    let md = every_value();
    // Every type as a 2-block x 3-row matrix, and F32 tensors of 1, 3 and 4 dimensions.
    let mut want: Vec<(TensorType, Vec<u64>)> = Vec::new();
    for (ty, block_elems, _) in GEOMETRY {
        want.push((ty, vec![block_elems * 2, 3]));
    }
    for dims in [vec![5], vec![2, 3, 4], vec![1, 2, 1, 3]] {
        want.push((TensorType::F32, dims));
    }
    for align in [None, Some(1u32), Some(8), Some(64), Some(4096)] {
        let mut w = writer(&md);
        let mut expect: BTreeMap<String, Value> = md.iter().cloned().collect();
        if let Some(a) = align {
            w.set("general.alignment", Value::U32(a));
            expect.insert("general.alignment".into(), Value::U32(a));
        }
        let (mut rng, mut datas) = (Rng(align.unwrap_or(3) as u64), Vec::new());
        for (i, (ty, dims)) in want.iter().enumerate() {
            let data = rng.bytes(n_bytes(*ty, dims));
            let td = TensorData::Bytes(data.clone());
            w.add_tensor(&format!("t{i}.{ty}"), *ty, dims, td);
            datas.push(data);
        }
        let bytes = w.to_bytes();
        let h = parse(&bytes).unwrap();
        assert_eq!(h.metadata.entries, expect, "alignment {align:?}");
        let a = align.unwrap_or(32) as u64;
        assert_eq!((h.version, h.alignment), (3, a));
        assert_eq!(h.file_bytes, bytes.len() as u64);
        assert_eq!(h.data_offset % a, 0);
        assert_eq!(h.tensors.len(), want.len());
        for (i, (t, (ty, dims))) in h.tensors.iter().zip(&want).enumerate() {
            let name = format!("t{i}.{ty}");
            assert_eq!((&t.name, t.ty, &t.dims), (&name, *ty, dims));
            assert_eq!(t.n_bytes, datas[i].len() as u64, "{name}");
            assert_eq!(t.offset % a, 0, "{name} offset aligned to {a}");
            let start = (h.data_offset + t.offset) as usize;
            let end = start + datas[i].len();
            assert!(bytes[start..end] == datas[i], "{name}: bytes at its offset");
        }
        let mut v2 = bytes.clone();
        v2[4] = 2; // version 2 has the same layout
        assert_eq!(parse(&v2).unwrap().metadata.entries, expect);
    }
}

#[test]
fn fixtures_parse_with_their_generator_config() {
    use TensorType::*;
    #[rustfmt::skip]
    let kinds = [
        ("F32", 0, F32), ("F16", 1, F16), ("BF16", 32, BF16), ("Q8_0", 7, Q8_0), ("Q4_0", 2, Q4_0),
        ("Q4_1", 3, Q4_1), ("Q5_0", 8, Q5_0), ("Q5_1", 9, Q5_1), ("Q2_K", 10, Q2_K),
        ("Q3_K_M", 12, Q3_K), ("Q4_K_M", 15, Q4_K), ("Q5_K_M", 17, Q5_K), ("Q6_K", 18, Q6_K),
    ];
    let fixtures = common::fixture_models();
    for gguf in &fixtures {
        println!("checking {}", gguf.display()); // shown if the check fails
        let name = gguf.file_name().unwrap().to_string_lossy();
        let kind = kinds
            .iter()
            .find(|k| name.ends_with(&format!("-{}.gguf", k.0)));
        let &(_, ftype, main) = kind.expect("a known type suffix");
        check_fixture(gguf, ftype, main);
    }
    assert!(fixtures.len() >= 23, "found {} fixtures", fixtures.len());
}

// ---------------------------------------------------------------------------------------------
// Truncated, hostile and corrupt files

#[test]
fn truncation_anywhere_is_an_error() {
    let bytes = tiny_model("llama").to_bytes();
    let data = parse(&bytes).unwrap().data_offset as usize;
    // The header ends with the last tensor entry: 2 dims, type and offset after the name.
    let header_end = after(&bytes, "blk.0.attn_q.weight") + 4 + 16 + 4 + 8;
    let end = bytes.len();
    let in_data = [data, data + 1, data + 1024, data + 1100, end - 34, end - 1];
    for cut in (0..data).chain(in_data) {
        let err = fails(&bytes[..cut], &[]);
        let msg = err.to_string();
        assert!(matches!(err, Error::InvalidGguf { .. }), "{cut}: {msg}");
        let said = msg.contains("truncated") || msg.contains("past the end");
        assert!(said, "cut at {cut}: {msg}");
        if cut >= header_end {
            mentions(&msg, &[".weight' (", "past the end"]);
        } else {
            // The file shrank after its size was taken: the reader runs dry.
            let file = Path::new("mem.gguf");
            let dry = parse_header(&bytes[..cut], end as u64, file).unwrap_err();
            mentions(&dry.to_string(), &["truncated"]);
        }
    }
    // Through the file system: the errors name the file.
    let dir = TempDir::new("trunc");
    let p = dir.0.join("cut.gguf");
    std::fs::write(&p, &bytes[..header_end - 5]).unwrap();
    let msg = ModelFiles::open(&p).unwrap_err().to_string();
    mentions(&msg, &[&p.to_string_lossy(), "truncated"]);
    let err = ModelFiles::open(&dir.0.join("absent.gguf")).unwrap_err();
    assert!(matches!(err, Error::Io { op: "open", .. }), "{err}");
    mentions(&err.to_string(), &["absent.gguf"]);
}

#[test]
fn hostile_counts_and_lengths_fail_fast() {
    let good = tiny_model("llama").to_bytes();
    let magic_and = |version: u64| patch(&good, 0, version << 32 | 0x4655_4747);
    fails(&patch(&good, 0, 0x4655_4758), &["not a GGUF file"]);
    fails(&magic_and(1), &["version 1 is not supported"]);
    fails(&magic_and(99), &["version 99 is not supported"]);
    fails(&magic_and(3u32.swap_bytes() as u64), &["big-endian"]);
    // Counts and lengths: u64::MAX, and just more than the rest of the file could hold.
    let rest = |at: usize| (good.len() - at - 8) as u64;
    let arch = after(&good, "general.architecture") + 4; // the value's length
    let tokens = after(&good, "tokenizer.ggml.tokens") + 8; // the array's count
    let name = after(&good, "output_norm.weight") - 18 - 8; // a tensor name's length
    for (at, just_past, what) in [
        (8, rest(16) / 32 + 1, "tensors"),
        (16, rest(16) / 13 + 1, "metadata entries"),
        (24, rest(24) + 1, "string bytes"),
        (arch, rest(arch) + 1, "string bytes"),
        (tokens, rest(tokens) / 8 + 1, "array items"),
        (name, rest(name) + 1, "string bytes"),
    ] {
        let needles = [what, "the file is truncated or corrupt"];
        fails(&patch(&good, at, u64::MAX), &needles);
        fails(&patch(&good, at, just_past), &needles);
    }
    fails(&patch(&good, 24, rest(24)), &["truncated"]); // a key that eats the file
}

#[test]
fn huge_claims_in_a_huge_file_allocate_nothing() {
    // A 1 TiB "file": each count fits in its size, so only the reader's limits stop them.
    let huge = |head: Raw, needle: &str| {
        let (file, path) = (Endless(head.0, 0), Path::new("huge.gguf"));
        let (res, largest, took) = measured(|| parse_header(file, 1 << 40, path));
        let msg = res.expect_err("must fail").to_string();
        mentions(&msg, &["huge.gguf", needle]);
        assert!(largest < 1 << 20, "allocated {largest} bytes for: {msg}");
        assert!(took < Duration::from_secs(1), "took {took:?}: {msg}");
    };
    huge(Raw::new(1 << 34, 0), "1048576 are accepted");
    huge(Raw::new(1000, 0), "string bytes"); // 1000 tensors, then garbage
    huge(Raw::new(0, 1 << 35), "metadata values");
    huge(Raw::new(0, 1).key("a", 8).u64(1 << 36), "string bytes");
    huge(Raw::new(0, 1).array("a", 7, 1 << 36), "metadata values");
    huge(Raw::new(0, 1).array("a", 7, 1 << 23), "bool value 255");
    let nested = Raw::new(0, 1).array("a", 9, 1 << 23).u32(7);
    huge(nested.u64(1 << 23), "metadata values");
}

#[test]
fn hostile_tensor_entries() {
    let one = |dims: &[u64], ty: u32, offset: u64, data: usize| {
        Raw::new(1, 0).tensor("w.00", dims, ty, offset).data(data)
    };
    let ok = parse(&one(&[32], 0, 0, 128)).unwrap();
    assert_eq!(ok.tensors[0].n_bytes, 128);
    fails(&one(&[], 0, 0, 128), &["'w.00' has 0 dimensions"]);
    fails(&one(&[1; 5], 0, 0, 128), &["'w.00' has 5 dimensions"]);
    fails(&one(&[u64::MAX, 4], 0, 0, 128), &["'w.00' dims", "absurd"]);
    fails(&one(&[1 << 32, 1 << 32], 0, 0, 128), &["absurd"]);
    fails(&one(&[0, u64::MAX], 0, 0, 128), &["absurd"]);
    fails(&one(&[33], 8, 0, 1024), &["'w.00' row length 33 is not"]);
    for id in [16u32, 4, 99, u32::MAX] {
        let needles = ["'w.00' has", &format!("type {id}")];
        let err = fails(&one(&[256], id, 0, 1024), &needles);
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    }
    fails(&one(&[32], 0, 8, 256), &["'w.00' offset 8 is not aligned"]);
    fails(&one(&[32], 0, 0, 64), &["'w.00'", "past the end"]);
    fails(&one(&[32], 0, 1 << 40, 128), &["past the end"]);
    fails(&one(&[32], 0, u64::MAX - 31, 128), &["past the end"]);
    let two = Raw::new(2, 0).tensor("w", &[8], 0, 0);
    let two = two.tensor("w", &[8], 0, 32).data(64);
    fails(&two, &["tensor 'w' appears twice"]);
}

#[test]
fn corrupt_values_duplicates_and_alignment() {
    let kv = |n: u64| Raw::new(0, n);
    let bools = kv(2).key("a", 7).put(&[1]).array("b", 7, 2).put(&[0, 1]);
    let b = Value::Array(vec![Value::Bool(false), Value::Bool(true)]);
    let h = parse(&bools.data(0)).unwrap();
    assert_eq!(h.metadata.get("b"), Some(&b));
    for (raw, needle) in [
        (kv(1).key("a", 7).put(&[2]), "bool value 2"),
        (kv(1).array("a", 7, 2).put(&[1, 2]), "bool value 2"),
        (kv(1).key("a", 13), "unknown metadata value type 13"),
        (kv(1).key("a", u32::MAX), "value type 4294967295"),
        (kv(1).array("a", 13, 1), "unknown array item type 13"),
        (
            kv(2).key("k", 0).put(&[1]).key("k", 0).put(&[2]),
            "key 'k' appears twice",
        ),
    ] {
        fails(&raw.data(8), &[needle]);
    }
    // Arrays nest 4 deep at most.
    let nest = |depth: usize| {
        let v = (0..depth).fold(Value::I32(1), |v, _| Value::Array(vec![v]));
        let mut w = GgufWriter::new();
        w.set("deep", v.clone());
        (w.to_bytes(), v)
    };
    let (ok, v) = nest(4);
    assert_eq!(parse(&ok).unwrap().metadata.get("deep"), Some(&v));
    fails(&nest(5).0, &["nested too deeply"]);
    fails(&nest(64).0, &["nested too deeply"]);
    // general.alignment: an integer power of two up to 1 MiB.
    let align = |ty: u32, v: &[u8]| kv(1).key("general.alignment", ty).put(v).data(0);
    let ok = parse(&align(4, &256u32.to_le_bytes())).unwrap();
    assert_eq!(ok.alignment, 256);
    for (ty, v) in [
        (4, 48u32.to_le_bytes().to_vec()),
        (4, 0u32.to_le_bytes().to_vec()),
        (10, (1u64 << 30).to_le_bytes().to_vec()),
        (5, (-32i32).to_le_bytes().to_vec()),
        (6, 32f32.to_le_bytes().to_vec()),
        (7, vec![1]),
    ] {
        fails(&align(ty, &v), &["general.alignment", "not a power of two"]);
    }
}

#[test]
fn random_corruption_never_panics() {
    let good = tiny_model("qwen2").to_bytes();
    let header = parse(&good).unwrap().data_offset as usize;
    let len = good.len() as u64;
    let interesting = [0, 1, 5, 32, 1 << 63, u64::MAX, len, len + 1];
    let mut rng = Rng(0x1234_5678_9abc_def0);
    let (mut ok, mut err, start) = (0, 0, Instant::now());
    for i in 0..4000 {
        let mut b = good.clone();
        let mut edits = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(header);
            match rng.below(3) {
                0 => b[at] ^= 1 << rng.below(8),
                1 => b[at] = rng.next() as u8,
                _ => b = patch(&b, at, interesting[rng.below(8)]),
            }
            edits.push(at);
        }
        // Whatever parses must be consistent, and its configuration must not panic either.
        let res = std::panic::catch_unwind(|| {
            let h = parse(&b)?;
            for t in &h.tensors {
                assert_eq!(t.offset % h.alignment, 0);
                assert!(h.data_offset + t.offset + t.n_bytes <= len, "{t:?}");
            }
            ModelFiles::from_headers(vec![h])?.config().map(|_| ())
        });
        match res {
            Ok(Ok(())) => ok += 1,
            Ok(Err(_)) => err += 1,
            Err(_) => panic!("mutation {i} (at bytes {edits:?}) panicked"),
        }
    }
    assert!(ok > 100 && err > 1000, "ok {ok} err {err}: expected both");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

// ---------------------------------------------------------------------------------------------
// Model configuration

#[test]
fn config_errors_name_what_is_wrong() {
    let c = config_of(tiny_model("llama")).unwrap();
    assert_eq!(
        (c.arch, c.rope_style),
        (Arch::Llama, RopeStyle::Interleaved)
    );
    assert_eq!((c.n_embd, c.n_layer, c.n_ff, c.n_vocab), (32, 1, 64, 8));
    assert_eq!((c.n_head, c.n_head_kv, c.head_dim), (4, 2, 8));
    assert_eq!((c.rope_freq_base, c.rms_eps), (10000.0, 1e-5));
    let c = config_of(tiny_model("qwen2")).unwrap();
    assert_eq!((c.arch, c.rope_style), (Arch::Qwen2, RopeStyle::HalfSplit));

    let err = config_of(tiny_model("gpt-neox")).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    let needles = ["mem.gguf", "'gpt-neox' is not supported", "llama", "qwen2"];
    mentions(&err.to_string(), &needles);

    // Edits of the tiny llama model (None drops the key), each named by the error it causes.
    let u32 = |v| Some(Value::U32(v));
    #[rustfmt::skip]
    let cases = [
        ("general.architecture", None, "missing"),
        ("llama.embedding_length", None, "missing"),
        ("llama.block_count", None, "missing"),
        ("llama.feed_forward_length", None, "missing"),
        ("llama.attention.head_count", None, "missing"),
        ("llama.block_count", Some(Value::String("2".into())), "expected a non-negative integer, found \"2\""),
        ("llama.attention.head_count_kv", u32(3), "3 KV heads must divide the 4 query heads"),
        ("llama.attention.head_count_kv", u32(0), "0 KV heads"),
        ("llama.attention.head_count", u32(0), "0 heads is not a valid head count"),
        ("llama.attention.key_length", u32(0), "head size 0 is not valid"),
        ("llama.rope.freq_base", Some(Value::F32(-1.0)), "-1 is not a valid RoPE base"),
        ("llama.expert_count", u32(4), "0 of 4 experts per token is not valid"),
    ];
    for (edit, value, needle) in cases {
        let err = config_of(edited(edit, value)).unwrap_err();
        let Error::Metadata { key, .. } = &err else {
            panic!("{edit}: {err}")
        };
        // The error names the key at fault (for a lone expert_count, the missing used-count).
        let want = edit.replace("expert_count", "expert_used_count");
        assert_eq!(key, &want, "{err}");
        mentions(
            &err.to_string(),
            &["mem.gguf", &format!("'{want}'"), needle],
        );
    }

    let tensor_err = |w: GgufWriter, needle: &str| {
        let err = config_of(w).unwrap_err();
        let embd = matches!(&err, Error::Tensor { name, .. } if name == "token_embd.weight");
        assert!(embd, "{err}");
        mentions(&err.to_string(), &["mem.gguf", needle]);
    };
    tensor_err(writer(&meta("llama")), "missing");
    let mut w = writer(&meta("llama"));
    w.add_f32("token_embd.weight", &[16, 8], &[0.0; 128]);
    tensor_err(w, "does not match embedding length 32");
}

// ---------------------------------------------------------------------------------------------
// Split sets

#[test]
fn split_sets_open_from_the_first_part() {
    let dir = TempDir::new("split");
    let five = |i: usize| format!("m-{i:05}-of-00003.gguf");
    let three = |i: usize| format!("short-{i:03}-of-003.gguf");
    for name in [&five as Namer, &three] {
        let (paths, placed) = write_split(&dir.0, name, 5);
        let files = ModelFiles::open(&paths[0]).unwrap();
        assert_eq!((&files.paths, files.tensors.len()), (&paths, 5));
        // The metadata is the first part's.
        assert_eq!(files.metadata.get("split.no"), Some(&Value::U16(0)));
        assert_eq!(files.config().unwrap().n_vocab, 8);
        for (n, part, data) in &placed {
            let t = files.tensor(n).unwrap();
            assert_eq!(t.file, *part, "{n}");
            let h = read_header(&paths[*part]).unwrap();
            let rel = h.tensors.iter().find(|x| &x.name == n).unwrap().offset;
            assert_eq!(t.offset, h.data_offset + rel, "{n}: absolute offset");
            let bytes = std::fs::read(&paths[*part]).unwrap();
            let at = t.offset as usize;
            assert!(bytes[at..at + data.len()] == *data, "{n}: bytes at offset");
        }
    }
    let (paths, _) = write_split(&dir.0, &five, 5);
    let err = ModelFiles::open(&paths[1]).unwrap_err();
    assert!(matches!(err, Error::InvalidGguf { .. }), "{err}");
    let first = "open the first part, m-00001-of-00003.gguf";
    mentions(&err.to_string(), &["m-00002-of-00003.gguf: ", first]);

    write_split(&dir.0, &five, 6);
    let msg = ModelFiles::open(&paths[0]).unwrap_err().to_string();
    let needle = "split.tensors.count says 6 tensors but the 3 parts hold 5";
    mentions(&msg, &["m-00001-of-00003.gguf: ", needle]);

    write_split(&dir.0, &five, 5); // then part 3 takes part 2's name
    std::fs::rename(&paths[2], &paths[1]).unwrap();
    let msg = ModelFiles::open(&paths[0]).unwrap_err().to_string();
    let needle = "split.no is 2 but this is split part 2 of 3";
    mentions(&msg, &["m-00002-of-00003.gguf: ", needle]);

    write_split(&dir.0, &five, 5);
    std::fs::remove_file(&paths[2]).unwrap();
    let msg = ModelFiles::open(&paths[0]).unwrap_err().to_string();
    let needle = "m-00003-of-00003.gguf is missing";
    mentions(&msg, &["m-00001-of-00003.gguf: ", needle]);

    let plain = dir.0.join("plain.gguf");
    std::fs::copy(&paths[0], &plain).unwrap();
    let msg = ModelFiles::open(&plain).unwrap_err().to_string();
    mentions(
        &msg,
        &["plain.gguf: ", "3-part split", "NAME-00001-of-00003"],
    );
}
