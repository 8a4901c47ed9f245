//! Q8_0 × Q8_0 single-row matmul (decode) with AVX-512 VNNI, over the weights' own bytes.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so weight codes are shifted to `q + 128`
//! (one XOR) and the `128 · Σ activations` that adds is taken back out per block. Two 32-value
//! blocks fill one 512-bit register; their sums stay in separate lanes and are scaled by each
//! block's `d_w · d_a` before accumulating in f32. Activations are quantized to Q8_0 as llama.cpp
//! does, so the result is llama.cpp's arithmetic up to float summation order.

use std::arch::x86_64::*;

use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};

/// Whether this CPU can run [`matvec`].
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// The activations once quantized, laid out for the kernel.
struct Acts {
    qs: Vec<i8>,      // k codes
    d: Vec<f32>,      // k / 32 scales
    sum128: Vec<f32>, // per block: 128 · Σ codes · d
}

fn quantize(lhs: &[f32]) -> Acts {
    let nb = lhs.len() / 32;
    let mut blocks = vec![BlockQ8_0::zeros(); nb];
    BlockQ8_0::from_float(lhs, &mut blocks);
    // SAFETY: BlockQ8_0 is repr(C) { d: f16, qs: [i8; 32] } = 34 bytes, ggml's block_q8_0.
    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, nb * 34) };
    let mut a = Acts {
        qs: Vec::with_capacity(nb * 32),
        d: Vec::with_capacity(nb),
        sum128: Vec::with_capacity(nb),
    };
    for b in bytes.chunks_exact(34) {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let codes = &b[2..];
        let s: i32 = codes.iter().map(|&c| c as i8 as i32).sum();
        a.qs.extend(codes.iter().map(|&c| c as i8));
        a.d.push(d);
        a.sum128.push(128.0 * s as f32 * d);
    }
    a
}

/// `dst[r] = row r of w · lhs`, `w` = `n` rows of `k` Q8_0 values. Caller checked [`available`],
/// `w.len() == n * k / 32 * 34`, `lhs.len() == k`, `dst.len() == n`, `k % 64 == 0`.
pub fn matvec(w: &[u8], n: usize, k: usize, lhs: &[f32], dst: &mut [f32]) {
    assert!(w.len() == n * k / 32 * 34 && k.is_multiple_of(64) && dst.len() == n && lhs.len() == k);
    let a = quantize(lhs);
    let row_bytes = k / 32 * 34;
    let dst_ptr = dst.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(n, |rows| {
        for r in rows {
            // SAFETY: available() was checked by the caller; row r is in bounds (asserted sizes)
            // and written by exactly one worker.
            unsafe {
                *(dst_ptr as *mut f32).add(r) = dot_row(&w[r * row_bytes..(r + 1) * row_bytes], &a);
            }
        }
    });
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,f16c")]
unsafe fn dot_row(x: &[u8], a: &Acts) -> f32 {
    let flip = _mm512_set1_epi8(-128);
    let mut acc = _mm512_setzero_ps();
    let mut corr = 0f32;
    let nb = a.d.len();
    let xp = x.as_ptr();
    let mut b = 0;
    while b < nb {
        let x0 = xp.add(b * 34);
        let x1 = xp.add((b + 1) * 34);
        let codes = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(x0.add(2) as *const __m256i)),
            _mm256_loadu_si256(x1.add(2) as *const __m256i),
            1,
        );
        let acts = _mm512_loadu_si512(a.qs.as_ptr().add(b * 32) as *const _);
        let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(codes, flip), acts);
        let d0 = half::f16::from_bits(u16::from_le_bytes([*x0, *x0.add(1)])).to_f32();
        let d1 = half::f16::from_bits(u16::from_le_bytes([*x1, *x1.add(1)])).to_f32();
        let scale = _mm512_mask_blend_ps(
            0xFF00,
            _mm512_set1_ps(d0 * a.d[b]),
            _mm512_set1_ps(d1 * a.d[b + 1]),
        );
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc);
        corr += d0 * a.sum128[b] + d1 * a.sum128[b + 1];
        b += 2;
    }
    _mm512_reduce_add_ps(acc) - corr
}
