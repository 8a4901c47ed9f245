//! The GGUF reader against valid, truncated, corrupt and hostile files: always a clear error
//! naming the file, never a panic or a huge allocation.

mod common;

use std::path::{Path, PathBuf};

use hypura::gguf::{parse_header, GgufWriter, ModelFiles, TensorData, TensorType, Value};
use hypura::Error;

fn tiny_model(arch: &str) -> GgufWriter {
    let mut w = tiny_meta(arch);
    w.add_f32("token_embd.weight", &[32, 8], &vec![0.5; 256]);
    w.add_f32("output_norm.weight", &[32], &[1.0; 32]);
    w
}

/// The metadata of a small model, no tensors.
fn tiny_meta(arch: &str) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(arch.into()));
    let k = |s: &str| format!("{arch}.{s}");
    w.set(&k("embedding_length"), Value::U32(32));
    w.set(&k("block_count"), Value::U32(1));
    w.set(&k("feed_forward_length"), Value::U32(64));
    w.set(&k("attention.head_count"), Value::U32(4));
    w.set(&k("attention.head_count_kv"), Value::U32(2));
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
    );
    w.set(
        "nested",
        Value::Array(vec![
            Value::Array(vec![Value::I16(-3), Value::I16(7)]),
            Value::Array(vec![]),
        ]),
    );
    w.set("flag", Value::Bool(true));
    w.set("big", Value::U64(u64::MAX));
    w.set("pi", Value::F64(std::f64::consts::PI));
    w
}

fn parse(bytes: &[u8]) -> hypura::Result<hypura::gguf::Header> {
    parse_header(bytes, bytes.len() as u64, Path::new("mem.gguf"))
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hypura-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn round_trip_metadata_and_every_tensor_type() {
    let mut w = tiny_model("llama");
    for (i, ty) in TensorType::ALL.into_iter().enumerate() {
        let n = 256u64 * 2;
        let bytes: Vec<u8> = (0..n / ty.block_elems() as u64 * ty.block_bytes() as u64)
            .map(|b| (b * 7 + i as u64) as u8)
            .collect();
        w.add_tensor(&format!("t.{ty}"), ty, &[256, 2], TensorData::Bytes(bytes));
    }
    w.set("general.alignment", Value::U32(64));
    let bytes = w.to_bytes();
    let h = parse(&bytes).unwrap();
    assert_eq!(
        h.metadata.get("nested"),
        Some(&Value::Array(vec![
            Value::Array(vec![Value::I16(-3), Value::I16(7)]),
            Value::Array(vec![])
        ]))
    );
    assert_eq!(h.metadata.get("big"), Some(&Value::U64(u64::MAX)));
    assert_eq!(h.metadata.get("flag"), Some(&Value::Bool(true)));
    assert_eq!(h.alignment, 64);
    for (i, ty) in TensorType::ALL.into_iter().enumerate() {
        let t = h
            .tensors
            .iter()
            .find(|t| t.name == format!("t.{ty}"))
            .unwrap();
        assert_eq!(t.ty, ty);
        assert_eq!(t.offset % 64, 0, "writer honours general.alignment");
        let start = (h.data_offset + t.offset) as usize;
        assert_eq!(
            bytes[start + 1],
            (7 + i as u64) as u8,
            "{ty} data lands at its offset"
        );
    }
}

#[test]
fn fixtures_open_with_their_generator_config() {
    for gguf in common::fixture_models() {
        let files = ModelFiles::open(&gguf).unwrap();
        let cfg = files.config().unwrap();
        let dir = gguf.parent().unwrap();
        let json = dir.join(format!(
            "{}.json",
            dir.file_name().unwrap().to_string_lossy()
        ));
        let Ok(text) = std::fs::read_to_string(&json) else {
            continue;
        };
        let want: serde_json::Value = serde_json::from_str(&text).unwrap();
        let field = |k: &str| want[k].as_u64().map(|v| v as usize);
        assert_eq!(Some(cfg.n_embd), field("d"), "{}", gguf.display());
        assert_eq!(Some(cfg.n_layer), field("L"), "{}", gguf.display());
        assert_eq!(Some(cfg.n_ff), field("ff"), "{}", gguf.display());
        assert_eq!(Some(cfg.n_head), field("h"), "{}", gguf.display());
        assert_eq!(Some(cfg.n_head_kv), field("hkv"), "{}", gguf.display());
        assert_eq!(
            cfg.n_expert,
            field("n_expert").unwrap_or(0),
            "{}",
            gguf.display()
        );
        if gguf.to_string_lossy().contains("Q4_K_M") {
            let types: Vec<_> = files.tensors.iter().map(|t| t.ty).collect();
            assert!(
                types.contains(&TensorType::Q4_K) && types.contains(&TensorType::Q6_K),
                "{}",
                gguf.display()
            );
        }
    }
}

#[test]
fn truncation_anywhere_is_an_error() {
    let bytes = tiny_model("llama").to_bytes();
    let h = parse(&bytes).unwrap();
    for cut in (0..h.data_offset as usize).chain([bytes.len() - 1, bytes.len() - 100]) {
        let err = parse(&bytes[..cut])
            .err()
            .unwrap_or_else(|| panic!("cut at {cut} parsed"));
        let msg = err.to_string();
        assert!(msg.contains("mem.gguf"), "error names the file: {msg}");
        assert!(
            msg.contains("truncated") || msg.contains("past the end"),
            "cut {cut}: {msg}"
        );
    }
}

/// Overwrites the 8 bytes at `at` with `v`.
fn patch(bytes: &[u8], at: usize, v: u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    b
}

#[test]
fn hostile_headers_fail_fast() {
    let good = tiny_model("llama").to_bytes();
    let expect = |b: Vec<u8>, needle: &str| {
        let start = std::time::Instant::now();
        let msg = parse(&b).expect_err("must fail").to_string();
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        assert!(start.elapsed().as_secs_f64() < 1.0, "took too long: {msg}");
    };
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    expect(bad_magic, "not a GGUF file");
    let mut v1 = good.clone();
    v1[4] = 1;
    expect(v1, "version 1");
    let mut v99 = good.clone();
    v99[4] = 99;
    expect(v99, "version 99");
    expect(patch(&good, 8, u64::MAX), "tensors"); // n_tensors
    expect(patch(&good, 16, u64::MAX), "metadata entries"); // n_kv
    expect(patch(&good, 16, good.len() as u64), "metadata entries");
    expect(patch(&good, 24, u64::MAX), "string bytes"); // first key length
    expect(patch(&good, 24, good.len() as u64 - 30), "string bytes");
}

/// A header with one tensor entry written by hand, to express what the writer cannot.
fn one_tensor(n_dims: u32, dims: &[u64], ty: u32, offset: u64, data_bytes: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(0x4655_4747u32.to_le_bytes());
    h.extend(3u32.to_le_bytes());
    h.extend(1u64.to_le_bytes());
    h.extend(0u64.to_le_bytes());
    h.extend(4u64.to_le_bytes());
    h.extend(b"w.00");
    h.extend(n_dims.to_le_bytes());
    for d in dims {
        h.extend(d.to_le_bytes());
    }
    h.extend(ty.to_le_bytes());
    h.extend(offset.to_le_bytes());
    h.resize(h.len().div_ceil(32) * 32 + data_bytes, 0);
    h
}

#[test]
fn hostile_tensor_entries() {
    let check = |b: Vec<u8>, needle: &str| {
        let msg = parse(&b).expect_err("must fail").to_string();
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    };
    assert!(parse(&one_tensor(1, &[32], 0, 0, 128)).is_ok());
    check(one_tensor(0, &[], 0, 0, 128), "0 dimensions");
    check(one_tensor(5, &[1, 1, 1, 1, 1], 0, 0, 128), "5 dimensions");
    check(one_tensor(2, &[u64::MAX, 4], 0, 0, 128), "absurd");
    check(one_tensor(1, &[256], 16, 0, 1024), "IQ-family type 16");
    check(one_tensor(1, &[256], 16, 0, 1024), "w.00");
    check(one_tensor(1, &[32], 0, 8, 256), "not aligned");
    check(one_tensor(1, &[32], 0, 0, 64), "past the end");
    check(one_tensor(1, &[33], 8, 0, 1024), "not a multiple");
}

#[test]
fn corrupt_values_and_duplicates() {
    let mk = || {
        let mut w = GgufWriter::new();
        w.set("a", Value::Bool(true));
        w.to_bytes()
    };
    let mut b = mk();
    // Layout: magic 4, version 4, n_tensors 8, n_kv 8, key len 8, "a", type 4, value 1.
    b[24 + 8 + 1 + 4] = 2;
    assert!(parse(&b).unwrap_err().to_string().contains("bool value 2"));
    let mut b2 = mk();
    b2[24 + 8 + 1] = 77;
    assert!(parse(&b2)
        .unwrap_err()
        .to_string()
        .contains("unknown metadata value type 77"));
    let mut deep = Value::I32(1);
    for _ in 0..6 {
        deep = Value::Array(vec![deep]);
    }
    let mut w3 = GgufWriter::new();
    w3.set("deep", deep);
    assert!(parse(&w3.to_bytes())
        .unwrap_err()
        .to_string()
        .contains("nested too deeply"));
    let mut w4 = GgufWriter::new();
    w4.set("general.alignment", Value::U32(48));
    assert!(parse(&w4.to_bytes())
        .unwrap_err()
        .to_string()
        .contains("power of two"));
}

#[test]
fn random_corruption_never_panics() {
    let good = tiny_model("qwen2").to_bytes();
    let header_len = parse(&good).unwrap().data_offset as usize;
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut ok, mut err) = (0, 0);
    for _ in 0..3000 {
        let mut b = good.clone();
        for _ in 0..1 + next() % 3 {
            let at = (next() % header_len as u64) as usize;
            b[at] = next() as u8;
        }
        match parse(&b) {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    assert!(err > 100 && ok + err == 3000, "ok {ok} err {err}");
}

#[test]
fn config_errors_name_what_is_wrong() {
    let dir = temp_dir("config");
    let write = |name: &str, w: GgufWriter| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, w.to_bytes()).unwrap();
        p
    };
    let p = write("neox.gguf", tiny_model("gpt-neox"));
    let msg = ModelFiles::open(&p)
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("gpt-neox") && msg.contains("llama") && msg.contains("neox.gguf"),
        "{msg}"
    );
    let mut w = tiny_model("llama");
    w.set("llama.attention.head_count_kv", Value::U32(3));
    let msg = ModelFiles::open(&write("kv.gguf", w))
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
    assert!(msg.contains("head_count_kv"), "{msg}");
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    let err = ModelFiles::open(&write("nokeys.gguf", w))
        .unwrap()
        .config()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Metadata { key, .. } if key == "llama.embedding_length"),
        "{err}"
    );
    let msg = ModelFiles::open(&write("noembd.gguf", tiny_meta("llama")))
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("token_embd.weight") && msg.contains("missing"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn split_sets_open_from_the_first_part() {
    let dir = temp_dir("split");
    let names: Vec<PathBuf> = (1..=3)
        .map(|i| dir.join(format!("m-{i:05}-of-00003.gguf")))
        .collect();
    for (i, path) in names.iter().enumerate() {
        let mut w = if i == 0 {
            tiny_model("llama")
        } else {
            GgufWriter::new()
        };
        w.set("split.no", Value::U16(i as u16));
        w.set("split.count", Value::U16(3));
        w.set("split.tensors.count", Value::I32(4));
        if i > 0 {
            w.add_f32(&format!("part{i}.weight"), &[32], &[i as f32; 32]);
        }
        std::fs::write(path, w.to_bytes()).unwrap();
    }
    let files = ModelFiles::open(&names[0]).unwrap();
    assert_eq!(files.paths, names);
    assert_eq!(files.tensors.len(), 4);
    for (i, name) in names.iter().enumerate().skip(1) {
        let t = files.tensor(&format!("part{i}.weight")).unwrap();
        assert_eq!(t.file, i);
        let bytes = std::fs::read(name).unwrap();
        let v = f32::from_le_bytes(
            bytes[t.offset as usize..t.offset as usize + 4]
                .try_into()
                .unwrap(),
        );
        assert_eq!(v, i as f32);
    }
    let msg = ModelFiles::open(&names[1]).unwrap_err().to_string();
    assert!(msg.contains("open the first part"), "{msg}");
    std::fs::remove_file(&names[2]).unwrap();
    let msg = ModelFiles::open(&names[0]).unwrap_err().to_string();
    assert!(
        msg.contains("m-00003-of-00003.gguf") && msg.contains("missing"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
