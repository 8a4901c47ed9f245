//! Compute kernels hypura needs beyond candle's tensor ops.
//!
//! [`matmul_t`] multiplies F32 activations by a quantized weight matrix **given as borrowed
//! bytes** in ggml's block layout — a slice of a memory-mapped GGUF file, or a pool buffer filled
//! by direct I/O — with no copy and no repacking. Each block type uses candle's SIMD dot products
//! (AVX2/AVX-512/NEON), and activations are quantized to the type's dot-product partner exactly as
//! llama.cpp does (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for k-quants), so results
//! match llama.cpp's arithmetic.
//!
//! This crate holds the only `unsafe` of hypura's compute path: reinterpreting bytes as blocks.

use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::GgmlDType;

#[cfg(target_arch = "x86_64")]
mod q8_0_x86;

#[cfg(feature = "cuda")]
pub mod cuda;

/// Why a kernel call was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelError(pub String);

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KernelError {}

/// `dst[m, n] = lhs[m, k] · Wᵀ` where `w` holds `n` rows of `k` elements of type `ty`.
pub fn matmul_t(
    ty: GgmlDType,
    w: &[u8],
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    dst: &mut [f32],
) -> Result<(), KernelError> {
    #[cfg(target_arch = "x86_64")]
    if ty == GgmlDType::Q8_0
        && m == 1
        && k % 64 == 0
        && w.len() == n * (k / 32) * 34
        && lhs.len() == k
        && dst.len() == n
        && std::env::var_os("HYPURA_GENERIC_KERNELS").is_none()
        && q8_0_x86::available()
    {
        q8_0_x86::matvec(w, n, k, lhs, dst);
        return Ok(());
    }
    match ty {
        GgmlDType::F32 => run::<f32>(w, (m, k, n), lhs, dst),
        GgmlDType::F16 => run::<half::f16>(w, (m, k, n), lhs, dst),
        GgmlDType::BF16 => run::<half::bf16>(w, (m, k, n), lhs, dst),
        GgmlDType::Q4_0 => run::<k_quants::BlockQ4_0>(w, (m, k, n), lhs, dst),
        GgmlDType::Q4_1 => run::<k_quants::BlockQ4_1>(w, (m, k, n), lhs, dst),
        GgmlDType::Q5_0 => run::<k_quants::BlockQ5_0>(w, (m, k, n), lhs, dst),
        GgmlDType::Q5_1 => run::<k_quants::BlockQ5_1>(w, (m, k, n), lhs, dst),
        GgmlDType::Q8_0 => run::<k_quants::BlockQ8_0>(w, (m, k, n), lhs, dst),
        GgmlDType::Q2K => run::<k_quants::BlockQ2K>(w, (m, k, n), lhs, dst),
        GgmlDType::Q3K => run::<k_quants::BlockQ3K>(w, (m, k, n), lhs, dst),
        GgmlDType::Q4K => run::<k_quants::BlockQ4K>(w, (m, k, n), lhs, dst),
        GgmlDType::Q5K => run::<k_quants::BlockQ5K>(w, (m, k, n), lhs, dst),
        GgmlDType::Q6K => run::<k_quants::BlockQ6K>(w, (m, k, n), lhs, dst),
        other => Err(KernelError(format!(
            "no matmul kernel for {other:?} weights"
        ))),
    }
}

/// Views `bytes` as blocks of `T`, checking length and alignment.
pub fn as_blocks<T: GgmlType>(bytes: &[u8]) -> Result<&[T], KernelError> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        return Err(KernelError(format!(
            "{} bytes is not a whole number of {size}-byte blocks",
            bytes.len()
        )));
    }
    if !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(KernelError(format!(
            "weight bytes are not aligned to {}",
            std::mem::align_of::<T>()
        )));
    }
    // SAFETY: the length is a whole number of `T`s and the pointer is aligned for `T` (both
    // checked above); every ggml block type is plain old data (integers and f16 scales), valid
    // for any bit pattern; the returned slice borrows `bytes`, so it cannot outlive them.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) })
}

fn run<T: GgmlType>(
    w: &[u8],
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    dst: &mut [f32],
) -> Result<(), KernelError> {
    if k % T::BLCK_SIZE != 0 {
        return Err(KernelError(format!(
            "row length {k} is not a multiple of the block size {}",
            T::BLCK_SIZE
        )));
    }
    let blocks = as_blocks::<T>(w)?;
    if blocks.len() != n * (k / T::BLCK_SIZE) {
        return Err(KernelError(format!(
            "weight has {} blocks, [{n}, {k}] needs {}",
            blocks.len(),
            n * k / T::BLCK_SIZE
        )));
    }
    if lhs.len() != m * k || dst.len() != m * n {
        return Err(KernelError(format!(
            "activation {} / output {} do not fit ({m}, {k}, {n})",
            lhs.len(),
            dst.len()
        )));
    }
    k_quants::matmul::<T>((m, k, n), lhs, blocks, dst).map_err(|e| KernelError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q8_0 rows built by hand: value = d · q.
    fn q8_0_rows(n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let (mut bytes, mut values) = (Vec::new(), Vec::new());
        for r in 0..n {
            for b in 0..k / 32 {
                let d = 0.01 * (1 + (r + b) % 5) as f32;
                bytes.extend(half::f16::from_f32(d).to_le_bytes());
                for i in 0..32 {
                    let q = ((r * 31 + b * 7 + i * 13) % 255) as i32 - 127;
                    bytes.push(q as i8 as u8);
                    values.push(half::f16::from_f32(d).to_f32() * q as f32);
                }
            }
        }
        (bytes, values)
    }

    #[test]
    fn q8_0_matches_dequantized_math() {
        let (n, k) = (6, 128);
        let (w, wf) = q8_0_rows(n, k);
        let lhs: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut dst = vec![0f32; n];
        matmul_t(GgmlDType::Q8_0, &w, (1, k, n), &lhs, &mut dst).unwrap();
        for r in 0..n {
            let exact: f32 = (0..k).map(|i| wf[r * k + i] * lhs[i]).sum();
            // Activations are quantized to Q8_0 (as llama.cpp does): ~1 % relative error.
            assert!(
                (dst[r] - exact).abs() <= 0.02 * (1.0 + exact.abs()),
                "row {r}: {} vs {exact}",
                dst[r]
            );
        }
    }

    #[test]
    fn q8_0_fast_path_matches_the_generic_kernel() {
        for (n, k) in [(1, 64), (5, 128), (64, 2048), (3, 192)] {
            let (w, _) = q8_0_rows(n, k);
            let lhs: Vec<f32> = (0..k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let mut fast = vec![0f32; n];
            matmul_t(GgmlDType::Q8_0, &w, (1, k, n), &lhs, &mut fast).unwrap();
            let mut generic = vec![0f32; n];
            run::<k_quants::BlockQ8_0>(&w, (1, k, n), &lhs, &mut generic).unwrap();
            for (a, b) in fast.iter().zip(&generic) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "({n},{k}): {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let (w, _) = q8_0_rows(2, 64);
        let lhs = vec![0f32; 64];
        let mut dst = vec![0f32; 2];
        assert!(matmul_t(
            GgmlDType::Q8_0,
            &w[..w.len() - 1],
            (1, 64, 2),
            &lhs,
            &mut dst
        )
        .is_err());
        assert!(matmul_t(GgmlDType::Q8_0, &w, (1, 64, 3), &lhs, &mut dst).is_err());
        assert!(matmul_t(GgmlDType::Q8_0, &w, (1, 60, 2), &lhs[..60], &mut dst).is_err());
        assert!(matmul_t(GgmlDType::Q8_0, &w, (1, 64, 2), &lhs[..32], &mut dst).is_err());
    }
}
