// hypura's fused single-token decode kernels (CUDA).
//
// One decode step of a dense Llama/Qwen block is a fixed sequence of these kernels over
// preallocated buffers; the token id and position are read from device memory (`step`), so the
// whole step can be captured once into a CUDA graph and replayed for every token.
//
// Activations are F32; weights stay in ggml's block layout and are decoded in registers. Q4_K
// rows (most of a Q4_K_M file) multiply int8 copies of the activations with dp4a, as llama.cpp's
// CUDA mat-vec kernels do (each kernel that produces a mat-vec input also writes that copy);
// Q6_K, Q8_0 and F32 rows use the F32 activations. What each kernel costs on an H200, and why
// it is shaped this way, is in docs/cuda.md.
//
// Per layer (9 launches): rms_norm, matvec_qkv, rope_kv, attention, matvec (o, + residual),
// rms_norm, matvec_swiglu, quantize_q8, matvec (down, + residual).
//
// Conventions: `step[0]` = token id, `step[1]` = position of that token (= tokens already cached).
// Matrices are row-major `[rows, cols]`, one row per output; `y[r] = dot(W[r], x) (+ bias[r])
// (+ res[r])`, where `res` may alias `y` (the residual stream updated in place).

#include <cuda_fp16.h>
#include <stdint.h>

#define WARP 32
#define MV_WARPS 4 // rows (one warp each) per matvec block

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
#define T_Q6_K 14

__device__ __forceinline__ size_t row_bytes(int ty, int cols) {
  switch (ty) {
    case T_Q4_K: return (size_t)(cols / 256) * 144;
    case T_Q6_K: return (size_t)(cols / 256) * 210;
    case T_Q8_0: return (size_t)(cols / 32) * 34;
    default: return (size_t)cols * 4;
  }
}

// ---- Q4_K: 256 weights in 144 bytes: d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 of nibbles.

__device__ __forceinline__ void q4k_scale_min(int j, const uint8_t* s, float& sc, float& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Activations quantized to int8 in blocks of 32, as llama.cpp's CUDA mat-vec kernels use them:
// value i is q[i] * d[i / 32]; s[i / 32] = d * Σq over the block (for the Q4_K min term).
struct Q8x {
  const int8_t* __restrict__ q;
  const float* __restrict__ d;
  const float* __restrict__ s;
};

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

// This lane's part of dot(row, x) with int8 activations: 8 lanes per super-block, 4
// super-blocks per warp iteration. Lane chunk c (16 bytes of nibbles) holds positions
// 16*(c&1)..+16 of sub-blocks 2j (low nibbles) and 2j+1 (high nibbles), j = c>>1: four dp4a
// each. Sub-block k lines up with activation block 8b + k.
__device__ __forceinline__ float dot_q4_k(const uint8_t* __restrict__ wr, Q8x x, int cols) {
  const int lane = threadIdx.x, c = lane & 7, j = c >> 1, h = c & 1;
  const int nb = cols / 256;
  float acc = 0.f;
#pragma unroll 2
  for (int b = lane >> 3; b < nb; b += 4) {
    const uint8_t* blk = wr + (size_t)b * 144;
    const uint4 hd = *reinterpret_cast<const uint4*>(blk); // d, dmin, scales[12]
    const uint4 qv = *reinterpret_cast<const uint4*>(blk + 16 + c * 16);
    const int8_t* xq = x.q + b * 256 + j * 64 + h * 16;
    const int4 xl = *reinterpret_cast<const int4*>(xq);
    const int4 xh = *reinterpret_cast<const int4*>(xq + 32);
    const int xb = b * 8 + 2 * j;
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
    acc += dm.x * (sc0 * x.d[xb] * (float)dl + sc1 * x.d[xb + 1] * (float)dh);
    // The min term covers whole sub-blocks: counted once, by the lane with the first half.
    if (h == 0) acc -= dm.y * (m0 * x.s[xb] + m1 * x.s[xb + 1]);
  }
  return acc;
}

__device__ __forceinline__ float q4k_at(const uint8_t* row, int i) {
  const uint8_t* blk = row + (size_t)(i / 256) * 144;
  const int r = i % 256, j = r / 64, l = r % 32, hi = (r % 64) >= 32;
  float sc, m;
  q4k_scale_min(2 * j + hi, blk + 4, sc, m);
  const uint8_t q = blk[16 + 32 * j + l];
  return f16_at(blk) * sc * (hi ? (q >> 4) : (q & 0xF)) - f16_at(blk + 2) * m;
}

// ---- Q6_K: 256 weights in 210 bytes: ql[128] low nibbles, qh[64] high 2 bits, int8 scales[16], d.

// One super-block per warp iteration; lane i takes positions 4i..4i+3 of each 128-half n
// (coalesced x loads). Position 128n + 32q + l: low bits from nibble q/2 of ql byte
// 64n + 32(q&1) + l, high bits 2q.. of qh byte 32n + l, scale 8n + l/16 + 2q. Super-blocks are
// only 2-byte aligned: 16-bit loads.
__device__ __forceinline__ uint32_t ld_u32_a2(const uint8_t* p) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
  return (uint32_t)h[0] | ((uint32_t)h[1] << 16);
}

__device__ __forceinline__ float dot_q6_k(const uint8_t* __restrict__ wr,
                                          const float* __restrict__ x, int cols) {
  const int lane = threadIdx.x, q = lane >> 3, l = 4 * (lane & 7);
  const int ql = 32 * (q & 1) + l, nib = 4 * (q >> 1), hs = 2 * q;
  const int si = 192 + (l >> 4) + 2 * q;
  const int nb = cols / 256;
  const float Z = TWO23 + 32.f; // 2^23 and the zero point 32
  float acc = 0.f;
#pragma unroll 2
  for (int b = 0; b < nb; ++b) {
    const uint8_t* blk = wr + (size_t)b * 210;
    float part = 0.f;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const uint32_t lo = (ld_u32_a2(blk + 64 * n + ql) >> nib) & 0x0F0F0F0Fu;
      const uint32_t hi = ((ld_u32_a2(blk + 128 + 32 * n + l) >> hs) & 0x03030303u) << 4;
      const uint32_t v = lo | hi;
      const float4 a = *reinterpret_cast<const float4*>(x + b * 256 + 128 * n + 4 * lane);
      const float dot = a.x * (BYTE_F(v, 0) - Z) + a.y * (BYTE_F(v, 1) - Z) +
                        a.z * (BYTE_F(v, 2) - Z) + a.w * (BYTE_F(v, 3) - Z);
      part += (float)reinterpret_cast<const int8_t*>(blk)[si + 8 * n] * dot;
    }
    acc += f16_at(blk + 208) * part;
  }
  return acc;
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

// 8 lanes per block, 4 weights each (two 16-bit loads: blocks are only 2-byte aligned).
__device__ __forceinline__ float dot_q8_0(const uint8_t* __restrict__ wr,
                                          const float* __restrict__ x, int cols) {
  const int lane = threadIdx.x, c = lane & 7;
  const int nb = cols / 32;
  const float Z = TWO23 + 128.f; // 2^23 and the offset that makes int8 unsigned
  float acc = 0.f;
#pragma unroll 4
  for (int b = lane >> 3; b < nb; b += 4) {
    const uint8_t* blk = wr + (size_t)b * 34;
    const uint16_t* qs = reinterpret_cast<const uint16_t*>(blk + 2 + 4 * c);
    const uint32_t v = ((uint32_t)qs[0] | ((uint32_t)qs[1] << 16)) ^ 0x80808080u;
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

__device__ __forceinline__ float dot_f32(const uint8_t* __restrict__ wr,
                                         const float* __restrict__ x, int cols) {
  const float4* w4 = reinterpret_cast<const float4*>(wr);
  const float4* x4 = reinterpret_cast<const float4*>(x);
  float acc = 0.f;
#pragma unroll 4
  for (int i = threadIdx.x; i < cols / 4; i += WARP) {
    const float4 a = w4[i], b = x4[i];
    acc += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
  }
  return acc;
}

// dot(W[row], x) of a matrix of type `ty`, summed over the warp (every lane gets it). Q4_K
// rows read the int8 activations `xq`, every other type the F32 ones `x`.
__device__ __forceinline__ float row_dot(const uint8_t* __restrict__ w, int ty, int row,
                                         const float* __restrict__ x, Q8x xq, int cols) {
  const uint8_t* wr = w + (size_t)row * row_bytes(ty, cols);
  float acc;
  switch (ty) {
    case T_Q4_K: acc = dot_q4_k(wr, xq, cols); break;
    case T_Q6_K: acc = dot_q6_k(wr, x, cols); break;
    case T_Q8_0: acc = dot_q8_0(wr, x, cols); break;
    default: acc = dot_f32(wr, x, cols); break;
  }
  return warp_sum(acc);
}

#define LEAD (threadIdx.x == 0 && threadIdx.y == 0)

// The warp's 32 values (element i = 32·blk + lane) into int8 block `blk` (see Q8x).
__device__ __forceinline__ void warp_quantize(float v, int i, int8_t* q, float* d, float* s) {
  const float amax = warp_max(fabsf(v));
  const float dq = amax / 127.f;
  const int qi = amax == 0.f ? 0 : __float2int_rn(v / dq);
  const float sum = warp_sum((float)qi);
  q[i] = (int8_t)qi;
  if ((threadIdx.x & (WARP - 1)) == 0) {
    d[i / WARP] = dq;
    s[i / WARP] = dq * sum;
  }
}

// x [n] → int8 blocks of 32 (see Q8x); one warp per block, n a multiple of 32.
extern "C" __global__ void quantize_q8(const float* __restrict__ x, int8_t* __restrict__ q,
                                       float* __restrict__ d, float* __restrict__ s, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return; // whole warps: n is a multiple of 32
  warp_quantize(x[i], i, q, d, s);
}

// y = W x (+ bias) (+ res); one warp per row.
extern "C" __global__ void matvec(const uint8_t* __restrict__ w, int ty,
                                  const float* __restrict__ x, const int8_t* xq,
                                  const float* xd, const float* xs, float* y, int rows,
                                  int cols, const float* bias, const float* res) {
  const int row = blockIdx.x * MV_WARPS + threadIdx.y;
  if (row >= rows) return;
  float acc = row_dot(w, ty, row, x, Q8x{xq, xd, xs}, cols);
  if (threadIdx.x == 0) {
    if (bias) acc += bias[row];
    if (res) acc += res[row];
    y[row] = acc;
  }
}

// q, k and v of one token in one launch: rows [0, rq) are q's, then k's, then v's.
extern "C" __global__ void matvec_qkv(const float* __restrict__ x, const int8_t* xq,
                                      const float* xd, const float* xs, int cols,
                                      const uint8_t* __restrict__ wq, int tq, float* yq,
                                      const float* bq, int rq,
                                      const uint8_t* __restrict__ wk, int tk, float* yk,
                                      const float* bk, int rk,
                                      const uint8_t* __restrict__ wv, int tv, float* yv,
                                      const float* bv, int rv) {
  int row = blockIdx.x * MV_WARPS + threadIdx.y;
  const uint8_t* w = wq;
  int ty = tq;
  float* y = yq;
  const float* b = bq;
  if (row >= rq) {
    row -= rq;
    w = wk, ty = tk, y = yk, b = bk;
    if (row >= rk) {
      row -= rk;
      w = wv, ty = tv, y = yv, b = bv;
      if (row >= rv) return;
    }
  }
  float acc = row_dot(w, ty, row, x, Q8x{xq, xd, xs}, cols);
  if (threadIdx.x == 0) y[row] = b ? acc + b[row] : acc;
}

// The SwiGLU hidden state: out[r] = silu(gate[r] · x) * (up[r] · x).
extern "C" __global__ void matvec_swiglu(const float* __restrict__ x, const int8_t* xq,
                                         const float* xd, const float* xs, int cols,
                                         const uint8_t* __restrict__ wg, int tg,
                                         const uint8_t* __restrict__ wu, int tu,
                                         float* __restrict__ out, int rows) {
  const int row = blockIdx.x * MV_WARPS + threadIdx.y;
  if (row >= rows) return;
  const Q8x q8{xq, xd, xs};
  const float g = row_dot(wg, tg, row, x, q8, cols);
  const float u = row_dot(wu, tu, row, x, q8, cols);
  if (threadIdx.x == 0) out[row] = g / (1.f + expf(-g)) * u;
}

// ---- Embedding: x = row step[0] of the table, dequantized.

#define EMBED(NAME, ROW_BYTES, AT)                                                           \
  extern "C" __global__ void NAME(const uint8_t* __restrict__ w, const uint32_t* step,     \
                                  float* x, int cols) {                                      \
    const uint8_t* row = w + (size_t)step[0] * (ROW_BYTES);                                  \
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cols; i += gridDim.x * blockDim.x) \
      x[i] = AT(row, i);                                                                     \
  }

__device__ __forceinline__ float f32_at(const uint8_t* row, int i) {
  return reinterpret_cast<const float*>(row)[i];
}

EMBED(embed_q4_k, (size_t)(cols / 256) * 144, q4k_at)
EMBED(embed_q6_k, (size_t)(cols / 256) * 210, q6k_at)
EMBED(embed_q8_0, (size_t)(cols / 32) * 34, q8_0_at)
EMBED(embed_f32, (size_t)cols * 4, f32_at)

// ---- RMS norm: out = x / sqrt(mean(x²) + eps) * w, and out as int8 blocks. One block of
// 1024 threads.

// Also writes `out` as int8 blocks (q, d, s; see Q8x): n is a multiple of 32.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ out, int n, float eps, int8_t* q,
                                    float* d, float* qs) {
  __shared__ float part[32];
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i] * x[i];
  s = warp_sum(s);
  const int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
  if (lane == 0) part[wid] = s;
  __syncthreads();
  if (wid == 0) {
    s = lane < blockDim.x / WARP ? part[lane] : 0.f;
    s = warp_sum(s);
    if (lane == 0) part[0] = s;
  }
  __syncthreads();
  const float scale = rsqrtf(part[0] / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) { // whole warps (n % 32 == 0)
    const float v = x[i] * scale * w[i];
    out[i] = v;
    warp_quantize(v, i, q, d, qs);
  }
}

// ---- RoPE on q (in place) and k, and this token's k, v into the cache.
// Grid: n_head + n_head_kv blocks. Caches are [n_head_kv, n_ctx, hd].
// style 0: interleaved pairs (2i, 2i+1); style 1: half-split pairs (i, i + rope_dim/2).

extern "C" __global__ void rope_kv(float* q, const float* __restrict__ k,
                                   const float* __restrict__ v, float* kc, float* vc,
                                   const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                   const uint32_t* step, int n_head, int hd, int rope_dim,
                                   int style, int n_ctx) {
  const int pos = step[1], half = rope_dim / 2, hh = blockIdx.x;
  const bool is_q = hh < n_head;
  const int kvh = hh - n_head;
  const float* src = is_q ? q + (size_t)hh * hd : k + (size_t)kvh * hd;
  float* dst = is_q ? q + (size_t)hh * hd : kc + ((size_t)kvh * n_ctx + pos) * hd;
  const float* cs = cos_t + (size_t)pos * half;
  const float* sn = sin_t + (size_t)pos * half;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const int i0 = style == 0 ? 2 * i : i, i1 = style == 0 ? 2 * i + 1 : i + half;
    const float x0 = src[i0], x1 = src[i1], c = cs[i], s = sn[i];
    dst[i0] = x0 * c - x1 * s;
    dst[i1] = x0 * s + x1 * c;
  }
  if (!is_q) {
    for (int i = rope_dim + threadIdx.x; i < hd; i += blockDim.x) dst[i] = src[i];
    float* vd = vc + ((size_t)kvh * n_ctx + pos) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) vd[i] = v[(size_t)kvh * hd + i];
  }
}

// ---- Attention for one query token over keys 0..=pos. Grid: n_head blocks of (32, ATT_WARPS).
// (32 warps: 32 KiB of shared memory for the merge at head_dim 256.)
// Each warp keeps an online softmax over keys w, w + ATT_WARPS, ...; the warps are merged at the
// end. head_dim ≤ 256.

#define ATT_WARPS 32
#define ATT_MAX_PER_LANE 8

// With `oq` (head_dim a multiple of 32), the output is also written as int8 blocks (Q8x).
extern "C" __global__ void attention(const float* __restrict__ q, const float* __restrict__ kc,
                                     const float* __restrict__ vc, float* __restrict__ out,
                                     const uint32_t* step, int n_head, int n_head_kv, int hd,
                                     int n_ctx, float scale, int8_t* oq, float* od,
                                     float* os) {
  __shared__ float sm_m[ATT_WARPS], sm_l[ATT_WARPS];
  __shared__ float sm_acc[ATT_WARPS][WARP * ATT_MAX_PER_LANE];
  const int h = blockIdx.x, kvh = h / (n_head / n_head_kv);
  const int lane = threadIdx.x, wid = threadIdx.y;
  const int n_kv = step[1] + 1;
  const float* K = kc + (size_t)kvh * n_ctx * hd;
  const float* V = vc + (size_t)kvh * n_ctx * hd;
  float qr[ATT_MAX_PER_LANE], acc[ATT_MAX_PER_LANE];
#pragma unroll
  for (int i = 0; i < ATT_MAX_PER_LANE; ++i) {
    const int d = lane + WARP * i;
    qr[i] = d < hd ? q[(size_t)h * hd + d] * scale : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int j = wid; j < n_kv; j += ATT_WARPS) {
    const float* kj = K + (size_t)j * hd;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < ATT_MAX_PER_LANE; ++i) {
      const int d = lane + WARP * i;
      if (d < hd) s += qr[i] * kj[d];
    }
    s = warp_sum(s);
    const float m2 = fmaxf(m, s), c = expf(m - m2), p = expf(s - m2);
    l = l * c + p;
    const float* vj = V + (size_t)j * hd;
#pragma unroll
    for (int i = 0; i < ATT_MAX_PER_LANE; ++i) {
      const int d = lane + WARP * i;
      if (d < hd) acc[i] = acc[i] * c + p * vj[d];
    }
    m = m2;
  }
  if (lane == 0) {
    sm_m[wid] = m;
    sm_l[wid] = l;
  }
#pragma unroll
  for (int i = 0; i < ATT_MAX_PER_LANE; ++i) sm_acc[wid][lane + WARP * i] = acc[i];
  __syncthreads();
  if (wid != 0) return;
  float mm = -INFINITY;
  for (int w = 0; w < ATT_WARPS; ++w) mm = fmaxf(mm, sm_m[w]);
  float ll = 0.f;
  for (int w = 0; w < ATT_WARPS; ++w) ll += sm_l[w] * expf(sm_m[w] - mm);
#pragma unroll
  for (int i = 0; i < ATT_MAX_PER_LANE; ++i) {
    const int d = lane + WARP * i;
    if (d >= hd) continue;
    float o = 0.f;
    for (int w = 0; w < ATT_WARPS; ++w) o += sm_acc[w][d] * expf(sm_m[w] - mm);
    o /= ll;
    out[(size_t)h * hd + d] = o;
    if (oq) warp_quantize(o, h * hd + d, oq, od, os); // d < hd for the whole warp
  }
}
