//! Random tensor data written directly in ggml block formats: a fast normal sampler, per-type
//! code ranges and scales, and the block packers. Output depends only on the seed.

use std::io::Write;
use std::sync::OnceLock;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::gguf::TensorType;

/// The bytes of a random tensor of `n` elements of type `ty` whose values are about
/// `mean + std·N(0, 1)` (quantized types: `mean` must be 0). For tests of kernels and loaders.
pub fn random_tensor_bytes(ty: TensorType, n: u64, mean: f32, std: f32, seed: u64) -> Vec<u8> {
    let mut v = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = write_random(&mut v, ty, n, mean, std, seed);
    v
}

/// Bytes generated per chunk (each chunk has its own seed, so chunks are made in parallel).
const CHUNK_BYTES: usize = 1 << 20;

/// Streams `n` random values of type `ty` (see [`random_tensor_bytes`]). `n` must be a whole
/// number of blocks.
pub(super) fn write_random(
    out: &mut dyn Write,
    ty: TensorType,
    n: u64,
    mean: f32,
    std: f32,
    seed: u64,
) -> std::io::Result<()> {
    let block_elems = ty.block_elems() as u64;
    if !n.is_multiple_of(block_elems) {
        return Err(std::io::Error::other(format!(
            "{n} elements are not a whole number of {ty} blocks"
        )));
    }
    let gen = Generator::new(ty, mean, std);
    let n_blocks = n / block_elems;
    let per_chunk = (CHUNK_BYTES / ty.block_bytes()).max(1) as u64;
    let n_chunks = n_blocks.div_ceil(per_chunk);
    let chunk = |c: u64| {
        let blocks = per_chunk.min(n_blocks - c * per_chunk) as usize;
        let mut buf = Vec::with_capacity(blocks * ty.block_bytes());
        let mut rng = Rng::new(mix(seed ^ mix(c)));
        gen.blocks(&mut rng, blocks, &mut buf);
        buf
    };
    if n_chunks <= 1 {
        for c in 0..n_chunks {
            out.write_all(&chunk(c))?;
        }
        return Ok(());
    }
    let batch = (4 * rayon::current_num_threads()).max(2) as u64;
    let mut c0 = 0;
    while c0 < n_chunks {
        let c1 = (c0 + batch).min(n_chunks);
        let bufs: Vec<Vec<u8>> = (c0..c1).into_par_iter().map(chunk).collect();
        for b in bufs {
            out.write_all(&b)?;
        }
        c0 = c1;
    }
    Ok(())
}

/// SplitMix64's finalizer: a good 64-bit mixing function for deriving seeds.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64, handing out 16 bits at a time.
struct Rng {
    state: u64,
    bits: u64,
    left: u32,
}

impl Rng {
    fn new(seed: u64) -> Self {
        Rng {
            state: seed,
            bits: 0,
            left: 0,
        }
    }
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn u16(&mut self) -> usize {
        if self.left == 0 {
            self.bits = self.next_u64();
            self.left = 4;
        }
        let v = (self.bits & 0xFFFF) as usize;
        self.bits >>= 16;
        self.left -= 1;
        v
    }
    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f32 {
        (self.u16() as f32 + 0.5) / 65536.0
    }
    /// Uniform integer in `lo..=hi` (`hi - lo < 65536`).
    fn range(&mut self, lo: i32, hi: i32) -> i32 {
        lo + ((self.u16() as i64 * (hi - lo + 1) as i64) >> 16) as i32
    }
}

/// 65536 equally likely values of N(0, 1) (its quantiles at (i + ½)/65536), scaled to exactly
/// unit variance: drawing an entry with 16 random bits is a fast normal sample.
fn normal_table() -> &'static [f32] {
    static T: OnceLock<Vec<f32>> = OnceLock::new();
    T.get_or_init(|| {
        let mut t: Vec<f64> = (0..65536)
            .map(|i| inv_normal_cdf((i as f64 + 0.5) / 65536.0))
            .collect();
        let rms = (t.iter().map(|x| x * x).sum::<f64>() / t.len() as f64).sqrt();
        t.iter_mut().for_each(|x| *x /= rms);
        t.into_iter().map(|x| x as f32).collect()
    })
}

/// The standard normal quantile function (Acklam's rational approximation, relative error
/// < 1.2e-9).
fn inv_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    const P_LOW: f64 = 0.02425;
    if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - P_LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

/// How a quantized type's random codes are drawn: `round(center + sigma·z)` clipped to
/// `lo..=hi`, each sub-block scale uniform in `sub_lo..=sub_hi` (1..=1 for types without
/// sub-blocks). The decoded value is `d·scale·(code − center)`.
#[derive(Clone, Copy)]
struct CodeSpec {
    lo: i32,
    hi: i32,
    center: f32,
    sigma: f32,
    sub_lo: i32,
    sub_hi: i32,
}

fn code_spec(ty: TensorType) -> Option<CodeSpec> {
    let c = |lo, hi, center, sigma, sub_lo, sub_hi| {
        Some(CodeSpec {
            lo,
            hi,
            center,
            sigma,
            sub_lo,
            sub_hi,
        })
    };
    match ty {
        TensorType::Q8_0 => c(-127, 127, 0.0, 40.0, 1, 1),
        TensorType::Q4_0 => c(-8, 7, 0.0, 2.5, 1, 1),
        TensorType::Q4_1 => c(0, 15, 7.5, 2.5, 1, 1),
        TensorType::Q5_0 => c(-16, 15, 0.0, 5.0, 1, 1),
        TensorType::Q5_1 => c(0, 31, 15.5, 5.0, 1, 1),
        // The min of the K types with one (m·dmin) is set to center·scale·d exactly: m = scale,
        // dmin = center·d.
        TensorType::Q2_K => c(0, 3, 1.5, 1.0, 8, 15),
        TensorType::Q3_K => c(-4, 3, 0.0, 1.5, 16, 31),
        TensorType::Q4_K => c(0, 15, 7.5, 2.5, 32, 63),
        TensorType::Q5_K => c(0, 31, 15.5, 5.0, 32, 63),
        TensorType::Q6_K => c(-32, 31, 0.0, 10.0, 64, 127),
        _ => None,
    }
}

/// Per-block scale factor: uniform in [0.5, 1.5), so E[f²] = 13/12.
const BLOCK_F2: f32 = 13.0 / 12.0;

/// Draws the blocks of one tensor.
struct Generator {
    ty: TensorType,
    /// Float types: the stored bytes of `mean + std·z` for each entry `z` of the normal table.
    values: Vec<u8>,
    /// Quantized types: 65536 equally likely codes.
    codes: Vec<i8>,
    code: Option<CodeSpec>,
    /// Quantized types: the block scale `d` before the per-block factor.
    d_base: f32,
}

impl Generator {
    fn new(ty: TensorType, mean: f32, std: f32) -> Self {
        let normal = normal_table();
        let Some(cs) = code_spec(ty) else {
            let values = normal
                .iter()
                .flat_map(|z| {
                    let v = mean + std * z;
                    match ty {
                        TensorType::F16 => f16::from_f32(v).to_le_bytes().to_vec(),
                        TensorType::BF16 => bf16::from_f32(v).to_le_bytes().to_vec(),
                        _ => v.to_le_bytes().to_vec(),
                    }
                })
                .collect();
            return Generator {
                ty,
                values,
                codes: Vec::new(),
                code: None,
                d_base: 0.0,
            };
        };
        let codes: Vec<i8> = normal
            .iter()
            .map(|z| {
                (cs.center + cs.sigma * z)
                    .round()
                    .clamp(cs.lo as f32, cs.hi as f32) as i8
            })
            .collect();
        let code_ms = codes
            .iter()
            .map(|&c| (c as f64 - cs.center as f64).powi(2))
            .sum::<f64>()
            / codes.len() as f64;
        let sub_ms = (cs.sub_lo..=cs.sub_hi)
            .map(|s| (s as f64).powi(2))
            .sum::<f64>()
            / (cs.sub_hi - cs.sub_lo + 1) as f64;
        let d_base = std as f64 / (BLOCK_F2 as f64 * sub_ms * code_ms).sqrt();
        Generator {
            ty,
            values: Vec::new(),
            codes,
            code: Some(cs),
            d_base: d_base as f32,
        }
    }

    /// Appends `n` random blocks.
    fn blocks(&self, rng: &mut Rng, n: usize, out: &mut Vec<u8>) {
        if self.code.is_none() {
            let size = self.ty.block_bytes();
            for _ in 0..n {
                let i = rng.u16() * size;
                out.extend_from_slice(&self.values[i..i + size]);
            }
            return;
        }
        for _ in 0..n {
            self.block(rng, out);
        }
    }

    /// Appends one random block of a quantized type.
    fn block(&self, rng: &mut Rng, out: &mut Vec<u8>) {
        let Some(cs) = self.code else {
            return;
        };
        let n = self.ty.block_elems();
        let mut codes = [0i8; 256];
        for c in &mut codes[..n] {
            *c = self.codes[rng.u16()];
        }
        let n_sub = match self.ty {
            TensorType::Q4_K | TensorType::Q5_K => 8,
            TensorType::Q2_K | TensorType::Q3_K | TensorType::Q6_K => 16,
            _ => 0,
        };
        let mut subs = [0u8; 16];
        for s in &mut subs[..n_sub] {
            *s = rng.range(cs.sub_lo, cs.sub_hi) as u8;
        }
        let d = f16::from_f32(self.d_base * (0.5 + rng.unit()));
        pack_block(self.ty, &codes[..n], &subs[..n_sub], d, out);
    }
}

/// Appends one block of type `ty` holding `codes` (one per element, in element order, in the
/// range of the type's [`CodeSpec`]), with sub-block scales `subs` (K types; element `e` is in
/// sub-block `e / (256 / subs.len())`) and block scale `d`. Types with a min get
/// `min = center·scale·d`, so the decoded value is `d·scale·(code − center)`.
fn pack_block(ty: TensorType, codes: &[i8], subs: &[u8], d: f16, out: &mut Vec<u8>) {
    let dmin = |center: f32| f16::from_f32(center * d.to_f32());
    let u = |c: i8, offset: i32| (c as i32 + offset) as u8;
    match ty {
        TensorType::Q8_0 => {
            out.extend(d.to_le_bytes());
            out.extend(codes.iter().map(|&c| c as u8));
        }
        TensorType::Q4_0 | TensorType::Q4_1 => {
            let off = if ty == TensorType::Q4_0 { 8 } else { 0 };
            out.extend(d.to_le_bytes());
            if ty == TensorType::Q4_1 {
                out.extend(f16::from_f32(-7.5 * d.to_f32()).to_le_bytes());
            }
            out.extend((0..16).map(|j| u(codes[j], off) | (u(codes[j + 16], off) << 4)));
        }
        TensorType::Q5_0 | TensorType::Q5_1 => {
            let off = if ty == TensorType::Q5_0 { 16 } else { 0 };
            out.extend(d.to_le_bytes());
            if ty == TensorType::Q5_1 {
                out.extend(f16::from_f32(-15.5 * d.to_f32()).to_le_bytes());
            }
            let qh = (0..32).fold(0u32, |h, e| h | (((u(codes[e], off) >> 4) as u32 & 1) << e));
            out.extend(qh.to_le_bytes());
            out.extend(
                (0..16).map(|j| (u(codes[j], off) & 0xF) | ((u(codes[j + 16], off) & 0xF) << 4)),
            );
        }
        TensorType::Q2_K => {
            // scales (low nibble: scale, high nibble: min), qs, d, dmin.
            out.extend(subs.iter().map(|&s| s | (s << 4)));
            let mut qs = [0u8; 64];
            for (e, &c) in codes.iter().enumerate() {
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                qs[n * 32 + l] |= (c as u8 & 3) << (2 * j);
            }
            out.extend(qs);
            out.extend(d.to_le_bytes());
            out.extend(dmin(1.5).to_le_bytes());
        }
        TensorType::Q3_K => {
            // hmask, qs, 16 6-bit scales (stored + 32), d. code = low2 − (high bit ? 0 : 4).
            let mut hmask = [0u8; 32];
            let mut qs = [0u8; 64];
            for (e, &c) in codes.iter().enumerate() {
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                qs[n * 32 + l] |= (c as u8 & 3) << (2 * j);
                if c >= 0 {
                    hmask[l] |= 1 << (n * 4 + j);
                }
            }
            let s: Vec<u8> = subs.iter().map(|&x| x + 32).collect();
            let mut sc = [0u8; 12];
            for j in 0..4 {
                sc[j] = (s[j] & 0xF) | ((s[j + 8] & 0xF) << 4);
                sc[j + 4] = (s[j + 4] & 0xF) | ((s[j + 12] & 0xF) << 4);
                sc[j + 8] = (s[j] >> 4)
                    | ((s[j + 4] >> 4) << 2)
                    | ((s[j + 8] >> 4) << 4)
                    | ((s[j + 12] >> 4) << 6);
            }
            out.extend(hmask);
            out.extend(qs);
            out.extend(sc);
            out.extend(d.to_le_bytes());
        }
        TensorType::Q4_K | TensorType::Q5_K => {
            // d, dmin, 8 (scale, min) 6-bit pairs in 12 bytes, [qh,] qs.
            let center = if ty == TensorType::Q4_K { 7.5 } else { 15.5 };
            out.extend(d.to_le_bytes());
            out.extend(dmin(center).to_le_bytes());
            let (sc, m) = (subs, subs);
            let mut packed = [0u8; 12];
            for j in 0..4 {
                packed[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
                packed[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
                packed[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
            }
            out.extend(packed);
            let mut qs = [0u8; 128];
            let mut qh = [0u8; 32];
            for (e, &c) in codes.iter().enumerate() {
                let c = c as u8;
                qs[(e / 64) * 32 + e % 32] |= (c & 0xF) << (4 * ((e / 32) & 1));
                qh[e % 32] |= ((c >> 4) & 1) << (e / 32);
            }
            if ty == TensorType::Q5_K {
                out.extend(qh);
            }
            out.extend(qs);
        }
        TensorType::Q6_K => {
            // ql, qh, 16 i8 scales, d; code stored + 32.
            let mut ql = [0u8; 128];
            let mut qh = [0u8; 64];
            for (e, &c) in codes.iter().enumerate() {
                let q = u(c, 32);
                let (idx, r) = (e / 128, e % 128);
                let (qq, l) = (r / 32, r % 32);
                ql[64 * idx + l + (qq & 1) * 32] |= (q & 0xF) << (4 * (qq >> 1));
                qh[32 * idx + l] |= (q >> 4) << (2 * qq);
            }
            out.extend(ql);
            out.extend(qh);
            out.extend(subs.iter().copied());
            out.extend(d.to_le_bytes());
        }
        _ => unreachable!("pack_block is only called for the quantized SYNTH_TYPES"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{storage_type, SYNTH_TYPES};
    use super::*;
    use candle_core::quantized::{QStorage, QTensor};
    use candle_core::Device;
    use std::borrow::Cow;

    fn dequantize(ty: TensorType, bytes: &[u8], n: usize) -> Vec<f32> {
        let storage =
            QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, ty.to_candle()).unwrap();
        let t = QTensor::new(storage, (n,)).unwrap();
        t.dequantize(&Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// Every packer puts every code and scale where ggml's dequantization (candle's) reads it.
    #[test]
    fn packed_blocks_decode_to_d_scale_code() {
        for ty in SYNTH_TYPES.into_iter().filter(|t| t.is_quantized()) {
            let cs = code_spec(ty).unwrap();
            let n = ty.block_elems();
            let n_sub = match n {
                32 => 0,
                _ if matches!(ty, TensorType::Q4_K | TensorType::Q5_K) => 8,
                _ => 16,
            };
            for round in 0..4u64 {
                let mut rng = Rng::new(mix(round + 100 * ty as u64));
                let codes: Vec<i8> = (0..n)
                    .map(|e| match round {
                        0 => (cs.lo + (e as i32 % (cs.hi - cs.lo + 1))) as i8,
                        1 => cs.lo as i8,
                        2 => cs.hi as i8,
                        _ => rng.range(cs.lo, cs.hi) as i8,
                    })
                    .collect();
                let subs: Vec<u8> = (0..n_sub)
                    .map(|_| rng.range(cs.sub_lo, cs.sub_hi) as u8)
                    .collect();
                let d = f16::from_f32(0.01);
                let mut bytes = Vec::new();
                pack_block(ty, &codes, &subs, d, &mut bytes);
                assert_eq!(bytes.len(), ty.block_bytes(), "{ty}");
                let got = dequantize(ty, &bytes, n);
                for e in 0..n {
                    let s = match n.checked_div(n_sub) {
                        Some(width) => subs[e / width] as f32,
                        None => 1.0,
                    };
                    let want = d.to_f32() * s * (codes[e] as f32 - cs.center);
                    let tol = 2e-3 * d.to_f32() * s * (cs.hi - cs.lo) as f32;
                    assert!(
                        (got[e] - want).abs() <= tol,
                        "{ty} round {round} element {e}: got {} want {want}",
                        got[e]
                    );
                }
            }
        }
    }

    #[test]
    fn normal_table_is_standard() {
        let t = normal_table();
        let mean = t.iter().map(|&x| x as f64).sum::<f64>() / t.len() as f64;
        let var = t.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / t.len() as f64;
        assert!(
            mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5,
            "{mean} {var}"
        );
        assert!((inv_normal_cdf(0.975) - 1.959_964).abs() < 1e-5);
        assert!(t.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn output_is_deterministic_and_chunked_in_parallel_alike() {
        // More than one chunk, so the parallel path runs.
        let n = 3 * (CHUNK_BYTES as u64 / 34 + 7) * 32;
        let a = random_tensor_bytes(TensorType::Q8_0, n, 0.0, 0.1, 7);
        let b = random_tensor_bytes(TensorType::Q8_0, n, 0.0, 0.1, 7);
        let c = random_tensor_bytes(TensorType::Q8_0, n, 0.0, 0.1, 8);
        assert_eq!(a.len() as u64, n / 32 * 34);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn rows_that_do_not_fit_fall_back() {
        assert_eq!(storage_type(TensorType::Q4_K, 512), TensorType::Q4_K);
        assert_eq!(storage_type(TensorType::Q4_K, 896), TensorType::Q5_0);
        assert_eq!(storage_type(TensorType::Q6_K, 896), TensorType::Q8_0);
        assert_eq!(storage_type(TensorType::Q8_0, 48), TensorType::F16);
        assert_eq!(storage_type(TensorType::F32, 7), TensorType::F32);
    }
}
