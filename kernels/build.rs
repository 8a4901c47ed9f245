//! Build script: with the `cuda` feature, compiles `cuda/decode.cu` (and the `quant.cuh` it
//! includes) and `cuda/flash.cu` with nvcc (`$CUDA_ROOT/bin/nvcc`, else `nvcc` on PATH) each into a fat binary holding
//! machine code for `CUDA_COMPUTE_CAP` (default 90) and its PTX (so newer GPUs can JIT it; no
//! JIT on the target).
//! Without the feature it does nothing.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda/decode.cu");
    println!("cargo:rerun-if-changed=cuda/quant.cuh");
    println!("cargo:rerun-if-changed=cuda/flash.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var_os("CUDA_ROOT")
        .map(|r| PathBuf::from(r).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    for name in ["decode", "flash"] {
        let fatbin = out.join(format!("{name}.fatbin"));
        let status = Command::new(&nvcc)
            .args(["--fatbin", "-O3", "-std=c++17"])
            .arg(format!(
                "-gencode=arch=compute_{cap},code=[sm_{cap},compute_{cap}]"
            ))
            .arg(format!("cuda/{name}.cu"))
            .arg("-o")
            .arg(&fatbin)
            .status()
            .unwrap_or_else(|e| panic!("running {} (set CUDA_ROOT): {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed compiling cuda/{name}.cu");
    }
}
