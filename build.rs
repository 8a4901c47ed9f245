//! Build script. Does nothing unless the `cuda` feature is on AND `HYPURA_CUDA_STUBS=1`.
//!
//! candle 0.11.1 turns on cudarc's `dynamic-linking`, so linking a CUDA build wants libcuda,
//! libcublas, libcublasLt, libcurand, libnvrtc and libcudart as files. A development machine with
//! no GPU has none of them. With `HYPURA_CUDA_STUBS=1` (set by `scripts/h100.sh`) this script makes
//! empty stub libraries carrying the real SONAMEs, links every binary of this package against
//! them with `--no-as-needed` (so each binary NEEDs `libcuda.so.1`, `libcublas.so.13`, ...) and
//! lets the CUDA symbols stay undefined; the GPU machine's real libraries resolve them at load.
//! Only this package's own link steps change: no RUSTFLAGS, so no dependency is rebuilt.
use std::path::PathBuf;
use std::process::Command;

/// (library name, SONAME version) as cudarc 0.19 / CUDA 13 load them.
const LIBS: &[(&str, &str)] = &[
    ("cuda", "1"),
    ("cublas", "13"),
    ("cublasLt", "13"),
    ("curand", "10"),
    ("nvrtc", "13"),
    ("cudart", "13"),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=HYPURA_CUDA_STUBS");
    let cuda = std::env::var_os("CARGO_FEATURE_CUDA").is_some();
    let stubs = std::env::var("HYPURA_CUDA_STUBS").is_ok_and(|v| v == "1");
    if !(cuda && stubs) {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = out.join("cuda-stubs");
    std::fs::create_dir_all(&dir).expect("create stub dir");
    let src = dir.join("stub.c");
    std::fs::write(&src, "void hypura_cuda_stub(void) {}\n").expect("write stub.c");
    let mut needed = Vec::new();
    for (name, ver) in LIBS {
        let lib = dir.join(format!("lib{name}.so"));
        let status = Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(&src)
            .arg(format!("-Wl,-soname,lib{name}.so.{ver}"))
            .status()
            .expect("run cc for CUDA stubs");
        assert!(status.success(), "cc failed making {}", lib.display());
        needed.push(format!("-l{name}"));
    }
    println!("cargo:rustc-link-search=native={}", dir.display());
    println!(
        "cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,{},--pop-state",
        needed.join(",")
    );
    println!("cargo:rustc-link-arg=-Wl,--unresolved-symbols=ignore-all");
}
