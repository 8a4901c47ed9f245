// ggml's block formats as the fused decode kernels read them: one element at a time (for the
// embedding row) and a lane's share of row · activation dot products (for the mat-vecs).
//
// Dot products are written for the mat-vec layout of decode.cu: a warp owns R rows of one
// matrix and one of KS slices of their super-blocks (slice `ks` takes warp iterations
// ks, ks + KS, ...), so KS warps of a block split each row and R rows share every activation
// load. Each lane accumulates partial sums in `acc[0..R)`; the caller sums over the warp and the
// KS warps. Q4_K, Q5_K and Q6_K rows multiply int8 copies of the activations with dp4a (`Q8x`, as
// llama.cpp's CUDA mat-vec kernels do); Q8_0 and F32 rows the F32 activations.
//
// Why these shapes: the per-variant timings are in docs/cuda.md (measured with bench.cu).

#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

#define WARP 32

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float f16_at(const uint8_t* p) {
  return __half2float(*reinterpret_cast<const __half*>(p));
}

// Integer → float without the (quarter-rate) conversion instruction: byte k of `v` placed in
// the low mantissa bits of 2^23 gives the float 2^23 + byte, exactly; the caller subtracts 2^23
// (plus any zero point). `__byte_perm` selector 0x754k builds the bytes [v.k, 0, 0, 0x4B].
#define BYTE_F(v, k) __int_as_float(__byte_perm((v), 0x4B000000u, 0x7540u + (k)))
#define TWO23 8388608.f

// ggml type ids the kernels read.
#define T_F32 0
#define T_Q8_0 8
#define T_Q4_K 12
#define T_Q5_K 13
#define T_Q6_K 14

__device__ __forceinline__ size_t row_bytes(int ty, int cols) {
  switch (ty) {
    case T_Q4_K: return (size_t)(cols / 256) * 144;
    case T_Q5_K: return (size_t)(cols / 256) * 176;
    case T_Q6_K: return (size_t)(cols / 256) * 210;
    case T_Q8_0: return (size_t)(cols / 32) * 34;
    default: return (size_t)cols * 4;
  }
}

// Activations quantized to int8 in blocks of 32: value i is q[i] * d[i / 32]; s[i / 32] =
// d * Σq over the block (for the Q4_K / Q5_K min term).
struct Q8x {
  const int8_t* __restrict__ q;
  const float* __restrict__ d;
  const float* __restrict__ s;
};

// 32 bits at a 2-byte-aligned address (Q6_K and Q8_0 blocks are only 2-byte aligned).
__device__ __forceinline__ uint32_t ld_u32_a2(const uint8_t* p) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
  return (uint32_t)h[0] | ((uint32_t)h[1] << 16);
}

// ---- Q4_K: 256 weights in 144 bytes: d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 of
// nibbles. Super-blocks are 16-byte aligned (in rows of whole super-blocks).

__device__ __forceinline__ void q4k_scale_min(int j, const uint8_t* s, float& sc, float& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Byte k (0..11) of the Q4_K scales held in words y, z, w (header bytes 4..16).
__device__ __forceinline__ uint32_t q4k_byte(int k, uint32_t y, uint32_t z, uint32_t w) {
  const uint32_t word = k < 4 ? y : (k < 8 ? z : w);
  return (word >> (8 * (k & 3))) & 0xFF;
}

// ggml's get_scale_min_k4 for sub-block k (0..7), from the header words.
__device__ __forceinline__ void q4k_sm(int k, uint32_t y, uint32_t z, uint32_t w, float& sc,
                                       float& m) {
  const uint32_t a = q4k_byte(k < 4 ? k : k - 4, y, z, w); // scales[k] or scales[k-4]
  const uint32_t b = q4k_byte(k < 4 ? k + 4 : k, y, z, w); // scales[k+4] or scales[k]
  const uint32_t c = q4k_byte(k + 4 < 12 ? k + 4 : 11, y, z, w); // scales[k+4] (k ≥ 4)
  sc = k < 4 ? (float)(a & 63) : (float)((c & 0xF) | ((a >> 6) << 4));
  m = k < 4 ? (float)(b & 63) : (float)((c >> 4) | ((b >> 6) << 4));
}

// Q5_K is Q4_K with a fifth bit: 256 weights in 176 bytes: d, dmin, the same 12 scale bytes,
// qh[32] (bit 2j of qh[l] is the high bit of position l of sub-block 2j, bit 2j + 1 that of
// sub-block 2j + 1), then the 128 bytes of nibbles. Super-blocks are 16-byte aligned (176 = 11 · 16).
template <bool Q5>
struct QK {
  static constexpr int BYTES = Q5 ? 176 : 144;
  static constexpr int NIBBLES = Q5 ? 48 : 16; // offset of the nibbles in the block
};

// One lane's share of a Q4_K super-block · x, from its loaded words: lane chunk c (16 bytes of
// nibbles, `qv`) holds positions 16*(c&1)..+16 of sub-blocks 2j (low nibbles) and 2j+1 (high
// nibbles), j = c>>1; `xl`, `xh` are those positions' activations, in blocks xb and xb + 1.
__device__ __forceinline__ float q4k_part(uint4 hd, uint4 qv, int4 xl, int4 xh, int c, Q8x x,
                                          int xb) {
  const int j = c >> 1;
  const float2 dm = __half22float2(*reinterpret_cast<const __half2*>(&hd.x));
  float sc0, m0, sc1, m1;
  q4k_sm(2 * j, hd.y, hd.z, hd.w, sc0, m0);
  q4k_sm(2 * j + 1, hd.y, hd.z, hd.w, sc1, m1);
  int dl = 0, dh = 0;
  dl = __dp4a((int)(qv.x & 0x0F0F0F0Fu), xl.x, dl);
  dl = __dp4a((int)(qv.y & 0x0F0F0F0Fu), xl.y, dl);
  dl = __dp4a((int)(qv.z & 0x0F0F0F0Fu), xl.z, dl);
  dl = __dp4a((int)(qv.w & 0x0F0F0F0Fu), xl.w, dl);
  dh = __dp4a((int)((qv.x >> 4) & 0x0F0F0F0Fu), xh.x, dh);
  dh = __dp4a((int)((qv.y >> 4) & 0x0F0F0F0Fu), xh.y, dh);
  dh = __dp4a((int)((qv.z >> 4) & 0x0F0F0F0Fu), xh.z, dh);
  dh = __dp4a((int)((qv.w >> 4) & 0x0F0F0F0Fu), xh.w, dh);
  float acc = dm.x * (sc0 * x.d[xb] * (float)dl + sc1 * x.d[xb + 1] * (float)dh);
  // The min term covers whole sub-blocks: counted once, by the lane with the first half.
  if ((c & 1) == 0) acc -= dm.y * (m0 * x.s[xb] + m1 * x.s[xb + 1]);
  return acc;
}

// The same share of a Q5_K super-block: the nibbles of `qv` plus their fifth bits, from the
// qh bytes `qh` of the same positions (bit 2j for sub-block 2j, bit 2j + 1 for 2j + 1).
__device__ __forceinline__ float q5k_part(uint4 hd, uint4 qv, uint4 qh, int4 xl, int4 xh, int c,
                                          Q8x x, int xb) {
  const int j = c >> 1;
  const float2 dm = __half22float2(*reinterpret_cast<const __half2*>(&hd.x));
  float sc0, m0, sc1, m1;
  q4k_sm(2 * j, hd.y, hd.z, hd.w, sc0, m0);
  q4k_sm(2 * j + 1, hd.y, hd.z, hd.w, sc1, m1);
  const int sl = 2 * j, sh = 2 * j + 1;
#define Q5LO(q, h) (int)(((q) & 0x0F0F0F0Fu) | ((((h) >> sl) & 0x01010101u) << 4))
#define Q5HI(q, h) (int)((((q) >> 4) & 0x0F0F0F0Fu) | ((((h) >> sh) & 0x01010101u) << 4))
  int dl = 0, dh = 0;
  dl = __dp4a(Q5LO(qv.x, qh.x), xl.x, dl);
  dl = __dp4a(Q5LO(qv.y, qh.y), xl.y, dl);
  dl = __dp4a(Q5LO(qv.z, qh.z), xl.z, dl);
  dl = __dp4a(Q5LO(qv.w, qh.w), xl.w, dl);
  dh = __dp4a(Q5HI(qv.x, qh.x), xh.x, dh);
  dh = __dp4a(Q5HI(qv.y, qh.y), xh.y, dh);
  dh = __dp4a(Q5HI(qv.z, qh.z), xh.z, dh);
  dh = __dp4a(Q5HI(qv.w, qh.w), xh.w, dh);
#undef Q5LO
#undef Q5HI
  float acc = dm.x * (sc0 * x.d[xb] * (float)dl + sc1 * x.d[xb + 1] * (float)dh);
  if ((c & 1) == 0) acc -= dm.y * (m0 * x.s[xb] + m1 * x.s[xb + 1]);
  return acc;
}

// R Q4_K (Q5 false) or Q5_K rows · x: 8 lanes per super-block, 4 super-blocks per warp
// iteration; the loads of U iterations are issued before their math (more bytes in flight).
template <int R, int U, int KS, bool Q5>
__device__ __forceinline__ void dot_qk(const uint8_t* const (&rows)[R], Q8x x, int nb, int ks,
                                       float (&acc)[R]) {
  const int lane = threadIdx.x, c = lane & 7, j = c >> 1, h = c & 1;
  for (int b0 = (lane >> 3) + 4 * U * ks; b0 < nb; b0 += 4 * U * KS) {
    uint4 hd[R][U], qv[R][U], qh[Q5 ? R : 1][Q5 ? U : 1];
    int4 xl[U], xh[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int b = b0 + 4 * u;
      if (b < nb) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint8_t* blk = rows[r] + (size_t)b * QK<Q5>::BYTES;
          hd[r][u] = *reinterpret_cast<const uint4*>(blk); // d, dmin, scales[12]
          qv[r][u] = *reinterpret_cast<const uint4*>(blk + QK<Q5>::NIBBLES + c * 16);
          if constexpr (Q5) qh[r][u] = *reinterpret_cast<const uint4*>(blk + 16 + h * 16);
        }
        const int8_t* xq = x.q + b * 256 + j * 64 + h * 16;
        xl[u] = *reinterpret_cast<const int4*>(xq);
        xh[u] = *reinterpret_cast<const int4*>(xq + 32);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int b = b0 + 4 * u;
      if (b < nb) {
#pragma unroll
        for (int r = 0; r < R; ++r)
          if constexpr (Q5)
            acc[r] += q5k_part(hd[r][u], qv[r][u], qh[r][u], xl[u], xh[u], c, x, b * 8 + 2 * j);
          else
            acc[r] += q4k_part(hd[r][u], qv[r][u], xl[u], xh[u], c, x, b * 8 + 2 * j);
      }
    }
  }
}

// Element i of a Q4_K (Q5 false) or Q5_K row: sub-block 2j + hi of super-block i / 256.
template <bool Q5>
__device__ __forceinline__ float qk_at(const uint8_t* row, int i) {
  const uint8_t* blk = row + (size_t)(i / 256) * QK<Q5>::BYTES;
  const int r = i % 256, j = r / 64, l = r % 32, hi = (r % 64) >= 32;
  float sc, m;
  q4k_scale_min(2 * j + hi, blk + 4, sc, m);
  const uint8_t q = blk[QK<Q5>::NIBBLES + 32 * j + l];
  int v = hi ? (q >> 4) : (q & 0xF);
  if constexpr (Q5) v += 16 * ((blk[16 + l] >> (2 * j + hi)) & 1);
  return f16_at(blk) * sc * v - f16_at(blk + 2) * m;
}

__device__ __forceinline__ float q4k_at(const uint8_t* row, int i) { return qk_at<false>(row, i); }
__device__ __forceinline__ float q5k_at(const uint8_t* row, int i) { return qk_at<true>(row, i); }

// ---- Q6_K: 256 weights in 210 bytes: ql[128] low nibbles, qh[64] high 2 bits, int8
// scales[16], d. Position 128n + 32q + l (n < 2, q < 4, l < 32): low bits from nibble q/2 of
// ql byte 64n + 32(q&1) + l, high bits 2q.. of qh byte 32n + l, scale 8n + l/16 + 2q.

// R Q6_K rows · x, Q4_K's lane layout: 8 lanes per super-block, 4 super-blocks per warp
// iteration; lane c takes positions 4c..4c+3 of all 8 runs of 32 (k = 4n + q), one dp4a each.
template <int R, int KS>
__device__ __forceinline__ void dot_q6_k(const uint8_t* const (&rows)[R], Q8x x, int nb, int ks,
                                         float (&acc)[R]) {
  const int lane = threadIdx.x, c = lane & 7, l0 = 4 * c, s = l0 >> 4;
  for (int b = (lane >> 3) + 4 * ks; b < nb; b += 4 * KS) {
    uint32_t L[R][4], H[R][2];
    uint16_t S[R][8];
    float D[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = rows[r] + (size_t)b * 210;
#pragma unroll
      for (int t = 0; t < 4; ++t) L[r][t] = ld_u32_a2(blk + 32 * t + l0);
#pragma unroll
      for (int n = 0; n < 2; ++n) H[r][n] = ld_u32_a2(blk + 128 + 32 * n + l0);
#pragma unroll
      for (int k = 0; k < 8; ++k) S[r][k] = reinterpret_cast<const uint16_t*>(blk + 192)[k];
      D[r] = f16_at(blk + 208);
    }
    const float4 d0 = *reinterpret_cast<const float4*>(x.d + b * 8);
    const float4 d1 = *reinterpret_cast<const float4*>(x.d + b * 8 + 4);
    const float dx[8] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
    int xv[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) xv[k] = *reinterpret_cast<const int*>(x.q + b * 256 + 32 * k + l0);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float part = 0.f;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int n = k >> 2, q = k & 3;
        const uint32_t lo = (L[r][2 * n + (q & 1)] >> (4 * (q >> 1))) & 0x0F0F0F0Fu;
        const uint32_t hi = ((H[r][n] >> (2 * q)) & 0x03030303u) << 4;
        const int v = (int)__vsub4(lo | hi, 0x20202020u); // 6-bit values less the zero point 32
        const float sc = (float)(int8_t)(S[r][k] >> (8 * s)); // scale 2k + s
        part += sc * dx[k] * (float)__dp4a(v, xv[k], 0);
      }
      acc[r] += D[r] * part;
    }
  }
}

__device__ __forceinline__ float q6k_at(const uint8_t* row, int i) {
  const uint8_t* blk = row + (size_t)(i / 256) * 210;
  const int r = i % 256, n = r / 128, quarter = (r % 128) / 32, l = r % 32;
  const uint8_t lo = blk[64 * n + l + (quarter & 1) * 32];
  const uint8_t h = blk[128 + 32 * n + l];
  const int q = ((quarter >= 2 ? (lo >> 4) : (lo & 0xF)) | (((h >> (2 * quarter)) & 3) << 4)) - 32;
  const int8_t sc = reinterpret_cast<const int8_t*>(blk + 192)[8 * n + l / 16 + 2 * quarter];
  return f16_at(blk + 208) * sc * q;
}

// ---- Q8_0: 32 weights in 34 bytes: d (f16), int8 qs[32].

// One Q8_0 row · x (F32): 8 lanes per block, 4 weights each, 4 blocks per warp iteration.
template <int KS>
__device__ __forceinline__ float dot_q8_0(const uint8_t* __restrict__ wr,
                                          const float* __restrict__ x, int cols, int ks) {
  const int lane = threadIdx.x, c = lane & 7;
  const int nb = cols / 32;
  const float Z = TWO23 + 128.f; // 2^23 and the offset that makes int8 unsigned
  float acc = 0.f;
#pragma unroll 4
  for (int b = (lane >> 3) + 4 * ks; b < nb; b += 4 * KS) {
    const uint8_t* blk = wr + (size_t)b * 34;
    const uint32_t v = ld_u32_a2(blk + 2 + 4 * c) ^ 0x80808080u;
    const float4 a = *reinterpret_cast<const float4*>(x + b * 32 + 4 * c);
    const float dot = a.x * (BYTE_F(v, 0) - Z) + a.y * (BYTE_F(v, 1) - Z) +
                      a.z * (BYTE_F(v, 2) - Z) + a.w * (BYTE_F(v, 3) - Z);
    acc += f16_at(blk) * dot;
  }
  return acc;
}

__device__ __forceinline__ float q8_0_at(const uint8_t* row, int i) {
  const uint8_t* blk = row + (size_t)(i / 32) * 34;
  return f16_at(blk) * (float)reinterpret_cast<const int8_t*>(blk + 2)[i % 32];
}

// ---- F32 (dense weights; `cols` a multiple of 4 and rows 16-byte aligned).

template <int KS>
__device__ __forceinline__ float dot_f32(const uint8_t* __restrict__ wr,
                                         const float* __restrict__ x, int cols, int ks) {
  const float4* w4 = reinterpret_cast<const float4*>(wr);
  const float4* x4 = reinterpret_cast<const float4*>(x);
  float acc = 0.f;
#pragma unroll 4
  for (int i = threadIdx.x + WARP * ks; i < cols / 4; i += WARP * KS) {
    const float4 a = w4[i], b = x4[i];
    acc += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
  }
  return acc;
}

__device__ __forceinline__ float f32_at(const uint8_t* row, int i) {
  return reinterpret_cast<const float*>(row)[i];
}

// This lane's partial sums of rows row..row+R of a matrix of type `ty` · x (slice `ks` of KS).
template <int R, int KS>
__device__ __forceinline__ void rows_dot(const uint8_t* __restrict__ w, int ty, int row,
                                         const float* __restrict__ x, Q8x xq, int cols, int ks,
                                         float (&acc)[R]) {
  const size_t rb = row_bytes(ty, cols);
  const uint8_t* rows[R];
#pragma unroll
  for (int i = 0; i < R; ++i) rows[i] = w + (size_t)(row + i) * rb;
  switch (ty) {
    case T_Q4_K: dot_qk<R, 1, KS, false>(rows, xq, cols / 256, ks, acc); break;
    case T_Q5_K: dot_qk<R, 1, KS, true>(rows, xq, cols / 256, ks, acc); break;
    case T_Q6_K: dot_q6_k<R, KS>(rows, xq, cols / 256, ks, acc); break;
    case T_Q8_0:
#pragma unroll
      for (int i = 0; i < R; ++i) acc[i] += dot_q8_0<KS>(rows[i], x, cols, ks);
      break;
    default:
#pragma unroll
      for (int i = 0; i < R; ++i) acc[i] += dot_f32<KS>(rows[i], x, cols, ks);
      break;
  }
}
