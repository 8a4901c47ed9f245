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

// 32 bits at a 2-byte-aligned address (Q8_0 blocks are only 2-byte aligned).
__device__ __forceinline__ uint32_t ld_u32_a2(const uint8_t* p) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
  return (uint32_t)h[0] | ((uint32_t)h[1] << 16);
}

// dp4a of unsigned bytes `a` and signed bytes `b`: acc + Σ a[i]·b[i].
__device__ __forceinline__ int dp4a_us(uint32_t a, int b, int acc) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(acc));
  return d;
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

// The 6-bit scales and mins of sub-blocks 2j and 2j + 1 (ggml's get_scale_min_k4), as the bytes
// [sc(2j), sc(2j + 1), m(2j), m(2j + 1)], from the header words y, z, w (scale bytes 0..11).
// With o = 2(j & 1), y.o = scales[o] and z.o = scales[4 + o]:
//   j < 2:  sc = scales[k] & 63, m = scales[k + 4] & 63;
//   j ≥ 2:  sc = (scales[k + 4] & 15) | (scales[k - 4] >> 6) << 4,
//           m = (scales[k + 4] >> 4) | (scales[k] >> 6) << 4, where scales[k + 4] = w.o.
// Byte permutes with selectors fixed per lane, so no per-byte selects.
__device__ __forceinline__ uint32_t q4k_sm_pair(int j, uint32_t y, uint32_t z, uint32_t w) {
  const uint32_t o = 2 * (j & 1);
  const uint32_t a = __byte_perm(y, z, o | (o + 1) << 4 | (o + 4) << 8 | (o + 5) << 12);
  if (j < 2) return a & 0x3F3F3F3Fu;
  const uint32_t b = __byte_perm(w, 0, o | (o + 1) << 4 | o << 8 | (o + 1) << 12);
  return (b & 0x00000F0Fu) | ((b >> 4) & 0x0F0F0000u) | (((a >> 6) & 0x03030303u) << 4);
}

// Q5_K is Q4_K with a fifth bit: 256 weights in 176 bytes: d, dmin, the same 12 scale bytes,
// qh[32] (bit 2j of qh[l] is the high bit of position l of sub-block 2j, bit 2j + 1 that of
// sub-block 2j + 1), then the 128 bytes of nibbles. Super-blocks are 16-byte aligned (176 = 11 · 16).
template <bool Q5>
struct QK {
  static constexpr int BYTES = Q5 ? 176 : 144;
  static constexpr int NIBBLES = Q5 ? 48 : 16; // offset of the nibbles in the block
};

// One lane's share of a Q4_K (Q5 false) or Q5_K super-block · x: lane j (0..3) holds all 32
// nibble bytes of sub-blocks 2j (low nibbles, `qa` positions 0..15 and `qb` 16..31) and 2j + 1
// (high nibbles), so one scale/min decode and one pair of activation scales serve 64 weights.
// `xl0`, `xl1` are sub-block 2j's activations (positions 0..15, 16..31), `xh0`, `xh1` sub-block
// 2j + 1's; `ha`, `hb` the Q5_K high-bit bytes of positions 0..15 and 16..31 (bit 2j for sub-block
// 2j, bit 2j + 1 for 2j + 1).
template <bool Q5>
__device__ __forceinline__ float qk_part(uint4 hd, uint4 qa, uint4 qb, uint4 ha, uint4 hb,
                                         int4 xl0, int4 xl1, int4 xh0, int4 xh1, int j,
                                         float2 xd, float2 xs) {
  const float2 dm = __half22float2(*reinterpret_cast<const __half2*>(&hd.x));
  const uint32_t sm = q4k_sm_pair(j, hd.y, hd.z, hd.w);
  const float sc0 = (float)(sm & 0xFF), sc1 = (float)((sm >> 8) & 0xFF);
  const float m0 = (float)((sm >> 16) & 0xFF), m1 = (float)(sm >> 24);
  const int sl = 2 * j, sh = 2 * j + 1;
  // Low and high nibbles of one word, with their fifth bits for Q5_K. Q4_K's high nibbles stay
  // in place: unsigned bytes 16·v, multiplied by 16·dot and scaled by 1/16 below (exact).
  auto lo = [&](uint32_t q, uint32_t h) {
    uint32_t v = q & 0x0F0F0F0Fu;
    if constexpr (Q5) v |= ((h >> sl) & 0x01010101u) << 4;
    return (int)v;
  };
  auto hi_dot = [&](uint32_t q, uint32_t h, int x, int acc) {
    if constexpr (Q5)
      return __dp4a((int)(((q >> 4) & 0x0F0F0F0Fu) | (((h >> sh) & 0x01010101u) << 4)), x, acc);
    else
      return dp4a_us(q & 0xF0F0F0F0u, x, acc);
  };
  int dl = 0, dh = 0;
  dl = __dp4a(lo(qa.x, ha.x), xl0.x, dl);
  dl = __dp4a(lo(qa.y, ha.y), xl0.y, dl);
  dl = __dp4a(lo(qa.z, ha.z), xl0.z, dl);
  dl = __dp4a(lo(qa.w, ha.w), xl0.w, dl);
  dl = __dp4a(lo(qb.x, hb.x), xl1.x, dl);
  dl = __dp4a(lo(qb.y, hb.y), xl1.y, dl);
  dl = __dp4a(lo(qb.z, hb.z), xl1.z, dl);
  dl = __dp4a(lo(qb.w, hb.w), xl1.w, dl);
  dh = hi_dot(qa.x, ha.x, xh0.x, dh);
  dh = hi_dot(qa.y, ha.y, xh0.y, dh);
  dh = hi_dot(qa.z, ha.z, xh0.z, dh);
  dh = hi_dot(qa.w, ha.w, xh0.w, dh);
  dh = hi_dot(qb.x, hb.x, xh1.x, dh);
  dh = hi_dot(qb.y, hb.y, xh1.y, dh);
  dh = hi_dot(qb.z, hb.z, xh1.z, dh);
  dh = hi_dot(qb.w, hb.w, xh1.w, dh);
  const float sh_scale = Q5 ? 1.f : 0.0625f; // Q4_K's dh is 16 times the dot
  return dm.x * (sc0 * xd.x * (float)dl + sc1 * (xd.y * sh_scale) * (float)dh) -
         dm.y * (m0 * xs.x + m1 * xs.y);
}

// A lane's activations for its share (lane j of 4) of Q4_K / Q5_K super-block b (see qk_part),
// and that share of a super-block at `blk` (global or shared memory) · them: dot_qk's inner
// step, for the staged kernels. (dot_qk loads its activations itself: calling these functions
// from it cost moe_swiglu 14 registers, 56 → 70; the block's part is one QK_BLOCK_DOT for both.)
// XP: see dot_qk.
struct QKx {
  int4 xl0, xl1, xh0, xh1;
  float2 xd, xs;
};

template <int XP = 0>
__device__ __forceinline__ QKx qk_lane_x(Q8x x, int b, int j) {
  const int8_t* xq = x.q + (b * 4 + j) * (64 + XP);
  QKx a;
  a.xl0 = *reinterpret_cast<const int4*>(xq);
  a.xl1 = *reinterpret_cast<const int4*>(xq + 16);
  a.xh0 = *reinterpret_cast<const int4*>(xq + 32);
  a.xh1 = *reinterpret_cast<const int4*>(xq + 48);
  a.xd = *reinterpret_cast<const float2*>(x.d + b * 8 + 2 * j);
  a.xs = *reinterpret_cast<const float2*>(x.s + b * 8 + 2 * j);
  return a;
}

// Lane j's part of one Q4_K / Q5_K super-block `blk_` (its words loaded here) against the
// activations xl0..xs, added to `acc`. A macro, as Q6_BLOCK_DOT below: dot_qk's loop and the
// staged kernels' qk_lane_add expand the same code, and the PTX stays what each had inline.
#define QK_BLOCK_DOT(Q5_, blk_, j, xl0, xl1, xh0, xh1, xd, xs, acc)                            \
  do {                                                                                        \
    const uint8_t* qb_ = (blk_);                                                              \
    const uint4 hd = *reinterpret_cast<const uint4*>(qb_); /* d, dmin, scales[12] */          \
    const uint8_t* qs = qb_ + QK<Q5_>::NIBBLES + 32 * (j);                                    \
    const uint4 qa = *reinterpret_cast<const uint4*>(qs);                                     \
    const uint4 qb = *reinterpret_cast<const uint4*>(qs + 16);                                \
    uint4 ha{}, hb{};                                                                         \
    if constexpr (Q5_) {                                                                      \
      ha = *reinterpret_cast<const uint4*>(qb_ + 16);                                         \
      hb = *reinterpret_cast<const uint4*>(qb_ + 32);                                         \
    }                                                                                         \
    acc += qk_part<Q5_>(hd, qa, qb, ha, hb, xl0, xl1, xh0, xh1, (j), xd, xs);                 \
  } while (0)

template <bool Q5>
__device__ __forceinline__ void qk_lane_add(const uint8_t* blk, const QKx& a, int j, float& acc) {
  QK_BLOCK_DOT(Q5, blk, j, a.xl0, a.xl1, a.xh0, a.xh1, a.xd, a.xs, acc);
}

// R Q4_K (Q5 false) or Q5_K rows · x: 4 lanes per super-block, 8 super-blocks per warp iteration
// (see qk_part); slice `ks` of KS takes iterations ks, ks + KS, ... (Measured against 8 lanes
// per super-block, 16 bytes each: 1.2-1.4x faster, docs/cuda.md.) XP: padding bytes after every
// 64 int8 activations (0 in global memory; a copy in shared memory is padded against bank
// conflicts).
template <int R, int KS, bool Q5, int U = 1, int XP = 0>
__device__ __forceinline__ void dot_qk(const uint8_t* const (&rows)[R], Q8x x, int nb, int ks,
                                       float (&acc)[R]) {
  const int lane = threadIdx.x, j = lane & 3;
#pragma unroll U
  for (int b = (lane >> 2) + 8 * ks; b < nb; b += 8 * KS) {
    const int8_t* xq = x.q + (b * 4 + j) * (64 + XP);
    const int4 xl0 = *reinterpret_cast<const int4*>(xq);
    const int4 xl1 = *reinterpret_cast<const int4*>(xq + 16);
    const int4 xh0 = *reinterpret_cast<const int4*>(xq + 32);
    const int4 xh1 = *reinterpret_cast<const int4*>(xq + 48);
    const float2 xd = *reinterpret_cast<const float2*>(x.d + b * 8 + 2 * j);
    const float2 xs = *reinterpret_cast<const float2*>(x.s + b * 8 + 2 * j);
#pragma unroll
    for (int r = 0; r < R; ++r)
      QK_BLOCK_DOT(Q5, rows[r] + (size_t)b * QK<Q5>::BYTES, j, xl0, xl1, xh0, xh1, xd, xs,
                   acc[r]);
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

// A Q6_K super-block (210 bytes, 2-byte aligned) read with aligned 32-bit loads: `base` is its
// start rounded down to 4 bytes, `sh` 16 where it was not 4-byte aligned (else 0).
struct Q6Block {
  const uint32_t* base;
  uint32_t sh;
  __device__ __forceinline__ explicit Q6Block(const uint8_t* blk) {
    const uint32_t off = (uint32_t)reinterpret_cast<size_t>(blk) & 2;
    base = reinterpret_cast<const uint32_t*>(blk - off); // derived from blk: a global load
    sh = off * 8;
  }
  // The N words at byte `o` (a multiple of 4) of the block, funnel-shifted from the aligned
  // words around them. Reads 2 bytes past them when shifted (inside the block for every `o`
  // the caller passes: the last word read ends at byte 208, before `d`).
  template <int N>
  __device__ __forceinline__ void words(int o, uint32_t (&w)[N]) const {
    uint32_t v[N + 1];
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = base[o / 4 + i];
    v[N] = sh ? base[o / 4 + N] : 0u;
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = __funnelshift_r(v[i], v[i + 1], sh);
  }
};

// A lane's activations for its share of Q6_K super-block b (see dot_q6_k): the 8 runs' int8
// scales, its 8 values of each run, and -32 · their sum (the zero point).
struct Q6x {
  float dx[8];
  int2 xv[8];
  int zp[8];
};

template <int XP = 0>
__device__ __forceinline__ Q6x q6_lane_x(Q8x x, int b, int l0) {
  Q6x a;
  const float4 d0 = *reinterpret_cast<const float4*>(x.d + b * 8);
  const float4 d1 = *reinterpret_cast<const float4*>(x.d + b * 8 + 4);
  a.dx[0] = d0.x, a.dx[1] = d0.y, a.dx[2] = d0.z, a.dx[3] = d0.w;
  a.dx[4] = d1.x, a.dx[5] = d1.y, a.dx[6] = d1.z, a.dx[7] = d1.w;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    a.xv[k] = *reinterpret_cast<const int2*>(x.q + (b * 4 + k / 2) * (64 + XP) + 32 * (k & 1) + l0);
    a.zp[k] = __dp4a((int)0xE0E0E0E0u, a.xv[k].x, __dp4a((int)0xE0E0E0E0u, a.xv[k].y, 0));
  }
  return a;
}

// One Q6_K super-block at `blk` (global or shared memory) · a lane's activations (dx, xv, zp:
// see dot_q6_k; l0 = 8c, s = c / 2 for lane c of its 4), added into `acc`. A macro, not a
// function: as a function called from dot_q6_k it cost the run-time-typed mat-vecs 16
// registers (80 → 96 in matvec_qkv_2_1, a second wave of blocks on an 8B's q/k/v).
#define Q6_BLOCK_DOT(blk_, dx, xv, zp, l0, s, acc)                                           \
  do {                                                                                      \
    const uint8_t* const q6b_ = (blk_);                                                      \
    const Q6Block qb(q6b_);                                                                  \
    uint32_t L[4][2], H[2][2], S[4];                                                         \
    _Pragma("unroll") for (int t = 0; t < 4; ++t) qb.words<2>(32 * t + (l0), L[t]);          \
    _Pragma("unroll") for (int n = 0; n < 2; ++n) qb.words<2>(128 + 32 * n + (l0), H[n]);    \
    qb.words<4>(192, S);                                                                     \
    const float D = f16_at(q6b_ + 208);                                                      \
    float part = 0.f;                                                                        \
    _Pragma("unroll") for (int k = 0; k < 8; ++k) {                                          \
      const int n = k >> 2, q = k & 3;                                                       \
      int dot = (zp)[k];                                                                     \
      /* Bits 0..3 from the low or high nibble of ql, bits 4..5 from bits 2q.. of qh. */    \
      _Pragma("unroll") for (int w = 0; w < 2; ++w) {                                        \
        const uint32_t lw = L[2 * n + (q & 1)][w], hw = H[n][w];                             \
        const uint32_t lo = (q >> 1 ? lw >> 4 : lw) & 0x0F0F0F0Fu;                           \
        const uint32_t hi =                                                                  \
            (q == 0 ? hw << 4 : q == 1 ? hw << 2 : q == 2 ? hw : hw >> 2) & 0x30303030u;     \
        dot = __dp4a((int)(lo | hi), w ? (xv)[k].y : (xv)[k].x, dot);                        \
      }                                                                                      \
      /* Scale 2k + s: byte s of the k-th 16-bit pair. */                                   \
      const float sc = (float)(int8_t)(S[k >> 1] >> (16 * (k & 1) + 8 * (s)));               \
      part += sc * (dx)[k] * (float)dot;                                                     \
    }                                                                                        \
    (acc) += D * part;                                                                       \
  } while (0)

// acc += a lane's share (lane c of its 4) of one Q6_K super-block at `blk` · its activations
// `a`, for the staged kernels.
__device__ __forceinline__ void q6_lane_add(const uint8_t* blk, const Q6x& a, int c, float& acc) {
  Q6_BLOCK_DOT(blk, a.dx, a.xv, a.zp, 8 * c, c >> 1, acc);
}

// R Q6_K rows · x: 4 lanes per super-block, 8 super-blocks per warp iteration; lane c takes
// positions 8c..8c+7 of all 8 runs of 32 (k = 4n + q), two dp4a each, so the scales (byte
// 8c / 16 of each pair) are loaded once per 64 weights, and with aligned 32-bit loads. The zero
// point comes off once per run for all R rows: dot(v - 32, x) = dot(v, x) + dot(-32, x).
template <int R, int KS, int XP = 0>
__device__ __forceinline__ void dot_q6_k(const uint8_t* const (&rows)[R], Q8x x, int nb, int ks,
                                         float (&acc)[R]) {
  const int lane = threadIdx.x, c = lane & 3, l0 = 8 * c, s = c >> 1;
  for (int b = (lane >> 2) + 8 * ks; b < nb; b += 8 * KS) {
    const float4 d0 = *reinterpret_cast<const float4*>(x.d + b * 8);
    const float4 d1 = *reinterpret_cast<const float4*>(x.d + b * 8 + 4);
    const float dx[8] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
    int2 xv[8];
    int zp[8]; // -32 · Σ of this lane's 8 activations of run k
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      xv[k] = *reinterpret_cast<const int2*>(x.q + (b * 4 + k / 2) * (64 + XP) + 32 * (k & 1) + l0);
      zp[k] = __dp4a((int)0xE0E0E0E0u, xv[k].x, __dp4a((int)0xE0E0E0E0u, xv[k].y, 0));
    }
#pragma unroll
    for (int r = 0; r < R; ++r) Q6_BLOCK_DOT(rows[r] + (size_t)b * 210, dx, xv, zp, l0, s, acc[r]);
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

// This lane's partial sums of rows row..row+R of a matrix of type TY · x (slice `ks` of KS);
// U: how many warp iterations of the Q4_K / Q5_K loop are unrolled (their loads issued together;
// Q6_K's loop, already heavy in registers and instructions, was slower unrolled: docs/cuda.md).
// XP: see dot_qk. A kernel instantiated for one type allocates registers for that type's loop
// alone.
template <int TY, int R, int KS, int U = 1, int XP = 0>
__device__ __forceinline__ void rows_dot_t(const uint8_t* __restrict__ w, int row,
                                           const float* __restrict__ x, Q8x xq, int cols, int ks,
                                           float (&acc)[R]) {
  const size_t rb = row_bytes(TY, cols);
  const uint8_t* rows[R];
#pragma unroll
  for (int i = 0; i < R; ++i) rows[i] = w + (size_t)(row + i) * rb;
  if constexpr (TY == T_Q4_K) {
    dot_qk<R, KS, false, U, XP>(rows, xq, cols / 256, ks, acc);
  } else if constexpr (TY == T_Q5_K) {
    dot_qk<R, KS, true, U, XP>(rows, xq, cols / 256, ks, acc);
  } else if constexpr (TY == T_Q6_K) {
    dot_q6_k<R, KS, XP>(rows, xq, cols / 256, ks, acc);
  } else if constexpr (TY == T_Q8_0) {
#pragma unroll
    for (int i = 0; i < R; ++i) acc[i] += dot_q8_0<KS>(rows[i], x, cols, ks);
  } else {
#pragma unroll
    for (int i = 0; i < R; ++i) acc[i] += dot_f32<KS>(rows[i], x, cols, ks);
  }
}

// The same for a type known only at run time (every format's loop in one kernel).
template <int R, int KS, int U = 1>
__device__ __forceinline__ void rows_dot(const uint8_t* __restrict__ w, int ty, int row,
                                         const float* __restrict__ x, Q8x xq, int cols, int ks,
                                         float (&acc)[R]) {
  switch (ty) {
    case T_Q4_K: rows_dot_t<T_Q4_K, R, KS, U>(w, row, x, xq, cols, ks, acc); break;
    case T_Q5_K: rows_dot_t<T_Q5_K, R, KS, U>(w, row, x, xq, cols, ks, acc); break;
    case T_Q6_K: rows_dot_t<T_Q6_K, R, KS, U>(w, row, x, xq, cols, ks, acc); break;
    case T_Q8_0: rows_dot_t<T_Q8_0, R, KS, U>(w, row, x, xq, cols, ks, acc); break;
    default: rows_dot_t<T_F32, R, KS, U>(w, row, x, xq, cols, ks, acc); break;
  }
}
