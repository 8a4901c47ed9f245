// Causal attention of a prompt batch over the KV cache, one pass (flash attention), for hypura's
// prompt batches on CUDA (src/backend/flash.rs). Without it a batch at depth wrote, masked,
// soft-maxed and read a [n_head, t, n_kv] F32 score tensor per layer through candle's ops.
//
// Inputs: q [n_head, t, HD] F32 (after RoPE, not scaled), the model's KV cache k, v
// [n_head_kv, n_ctx, HD] F32 holding n_kv = pos + t keys (this batch's already written at
// pos..). Query i (position pos + i) sees keys 0 ..= pos + i. Output [t, n_head · HD] F32, head
// h at columns h·HD.. (the o projection's input).
//
// Arithmetic: F16 tensor cores (mma.sync m16n8k16, F32 accumulators), as llama.cpp's CUDA flash
// attention: q (scaled by 1/sqrt(HD) · log2 e), k and v rounded to F16 as they are loaded;
// scores, the running max and sum, and the output in F32; the probabilities rounded to F16 for
// their product with v. Softmax in base 2 (exp2 of log2-scaled scores: the same values).
//
// Layout: a block is W warps over 16 W queries of one head (warp w: queries 16w .. 16w + 15);
// it walks the keys in tiles of 64 up to its last query's. Each tile of k and v is copied as F32
// into shared memory by cp.async while the previous one is multiplied, then converted to F16
// there (v transposed, so both products read their B fragments as 32-bit words; rows padded by
// 8 halves against bank conflicts); then per warp: S = Q Kᵀ (16 × 64), the online
// softmax update, O += P V (16 × HD). Fragment layouts: PTX ISA, "Matrix Fragments for
// mma.m16n8k16" (A: rows g and g + 8, columns 2t, 2t + 1 and + 8; B: rows 2t, 2t + 1 and + 8,
// column g; C: rows g and g + 8, columns 2t, 2t + 1; g = lane / 4, t = lane % 4).

#include <cuda_fp16.h>
#include <stdint.h>

#define FA_BK 64              // keys a tile
#define FA_PAD 8              // halves of padding per shared row

__device__ __forceinline__ uint32_t fa_pack(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// c += a · b (m16n8k16, F16 inputs, F32 accumulators).
__device__ __forceinline__ void fa_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int HD, int W>
__device__ __forceinline__ void flash_attn_t(const float* __restrict__ q,
                                             const float* __restrict__ kc,
                                             const float* __restrict__ vc, float* __restrict__ out,
                                             int t, int pos, int n_head, int n_head_kv, int n_ctx,
                                             float scale) {
  static_assert(HD % 16 == 0 && HD <= 256, "head width a multiple of 16");
  constexpr int BQ = 16 * W; // queries a block
  // Dynamic shared memory (flash_smem_bytes): the next tile's k and v as F32, copied by cp.async
  // while the current one is multiplied, then its F16 copies.
  extern __shared__ __align__(16) uint8_t fa_smem[];
  float* sk = reinterpret_cast<float*>(fa_smem);                   // [FA_BK][HD]
  float* sv = sk + FA_BK * HD;                                      // [FA_BK][HD + 4]
  auto ks = reinterpret_cast<__half(*)[HD + FA_PAD]>(sv + FA_BK * (HD + 4)); // ks[key][dim]
  auto vt = reinterpret_cast<__half(*)[FA_BK + FA_PAD]>(&ks[FA_BK][0]);    // vt[dim][key]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const int h = blockIdx.y, kvh = h / (n_head / n_head_kv);
  const int q0 = blockIdx.x * BQ;
  const int r0 = q0 + 16 * warp + g, r1 = r0 + 8; // this thread's two query rows
  const float qs = scale * 1.4426950408889634f;   // scores in log2 units

  // Q as A fragments, one per 16 dims.
  uint32_t qa[HD / 16][4];
  {
    const float* qh = q + (size_t)h * t * HD;
#pragma unroll
    for (int s = 0; s < HD / 16; ++s) {
      const int c = 16 * s + 2 * tq;
      float2 a = {0.f, 0.f}, b = {0.f, 0.f}, c2 = {0.f, 0.f}, d = {0.f, 0.f};
      if (r0 < t) {
        a = *reinterpret_cast<const float2*>(qh + (size_t)r0 * HD + c);
        c2 = *reinterpret_cast<const float2*>(qh + (size_t)r0 * HD + c + 8);
      }
      if (r1 < t) {
        b = *reinterpret_cast<const float2*>(qh + (size_t)r1 * HD + c);
        d = *reinterpret_cast<const float2*>(qh + (size_t)r1 * HD + c + 8);
      }
      qa[s][0] = fa_pack(a.x * qs, a.y * qs);
      qa[s][1] = fa_pack(b.x * qs, b.y * qs);
      qa[s][2] = fa_pack(c2.x * qs, c2.y * qs);
      qa[s][3] = fa_pack(d.x * qs, d.y * qs);
    }
  }
  float o[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  const float* kh = kc + (size_t)kvh * n_ctx * HD;
  const float* vh = vc + (size_t)kvh * n_ctx * HD;
  const int last_key = pos + min(q0 + BQ, t) - 1; // the block's last query sees up to here
  // Tile k0's rows of k and v (F32) into sk, sv by cp.async, zeros past last_key; one group.
  auto issue = [&](int k0) {
    for (int i = threadIdx.x; i < FA_BK * HD / 4; i += 32 * W) {
      const int key = i / (HD / 4), d = 4 * (i % (HD / 4));
      const bool in = k0 + key <= last_key;
      const size_t row = (size_t)(in ? k0 + key : 0) * HD + d;
      const unsigned n = in ? 16u : 0u; // 0: zero-fill
      const unsigned dk = (unsigned)__cvta_generic_to_shared(sk + key * HD + d);
      const unsigned dv = (unsigned)__cvta_generic_to_shared(sv + key * (HD + 4) + d);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dk), "l"(kh + row), "r"(n) : "memory");
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dv), "l"(vh + row), "r"(n) : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
  issue(0);
  for (int k0 = 0; k0 <= last_key; k0 += FA_BK) {
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads(); // the tile has landed, and every warp is done with the previous F16 tile
    // F32 → F16: k row by row (a warp converts whole rows), v transposed (each 8-lane phase of
    // a warp reads 8 keys of one 4-dim group: sv's rows are padded by 4 floats so those land in
    // distinct banks).
    for (int i = threadIdx.x; i < FA_BK * HD / 4; i += 32 * W) {
      const int key = i / (HD / 4), d = 4 * (i % (HD / 4));
      const float4 kv = *reinterpret_cast<const float4*>(sk + key * HD + d);
      *reinterpret_cast<uint2*>(&ks[key][d]) = make_uint2(fa_pack(kv.x, kv.y), fa_pack(kv.z, kv.w));
    }
    for (int i = threadIdx.x; i < FA_BK * HD / 4; i += 32 * W) {
      const int wi = i / 32, l = i % 32;
      const int key = 8 * (wi % (FA_BK / 8)) + l % 8, d = 4 * (4 * (wi / (FA_BK / 8)) + l / 8);
      const float4 vv = *reinterpret_cast<const float4*>(sv + key * (HD + 4) + d);
      vt[d][key] = __float2half_rn(vv.x);
      vt[d + 1][key] = __float2half_rn(vv.y);
      vt[d + 2][key] = __float2half_rn(vv.z);
      vt[d + 3][key] = __float2half_rn(vv.w);
    }
    __syncthreads(); // the F16 tile is ready and sk, sv are free
    if (k0 + FA_BK <= last_key) issue(k0 + FA_BK); // overlaps this tile's products
    // Warps whose queries all precede the tile skip it (causal), as do warps past the batch.
    if (q0 + 16 * warp >= t || k0 > pos + q0 + 16 * warp + 15) continue;
    // S = Q Kᵀ: 8 column tiles of 8 keys.
    float s[FA_BK / 8][4];
#pragma unroll
    for (int n = 0; n < FA_BK / 8; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      const __half* kr = &ks[8 * n + g][2 * tq];
#pragma unroll
      for (int d = 0; d < HD / 16; ++d) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(kr + 16 * d);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(kr + 16 * d + 8);
        fa_mma(s[n], qa[d], b0, b1);
      }
    }
    // Causal mask (and nothing past the batch's keys), then the online softmax.
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int n = 0; n < FA_BK / 8; ++n) {
      const int key = k0 + 8 * n + 2 * tq;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (key + e > pos + r0) s[n][e] = -INFINITY;
        if (key + e > pos + r1) s[n][2 + e] = -INFINITY;
        mx0 = fmaxf(mx0, s[n][e]);
        mx1 = fmaxf(mx1, s[n][2 + e]);
      }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float nm0 = fmaxf(m0, mx0), nm1 = fmaxf(m1, mx1);
    // A row with no visible key yet keeps max −∞: its probabilities are 0, its state unchanged.
    const float b0 = nm0 == -INFINITY ? 0.f : nm0, b1 = nm1 == -INFINITY ? 0.f : nm1;
    const float f0 = exp2f(m0 - b0), f1 = exp2f(m1 - b1);
    m0 = nm0, m1 = nm1;
    float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
    for (int n = 0; n < FA_BK / 8; ++n) {
      s[n][0] = exp2f(s[n][0] - b0), s[n][1] = exp2f(s[n][1] - b0);
      s[n][2] = exp2f(s[n][2] - b1), s[n][3] = exp2f(s[n][3] - b1);
      ps0 += s[n][0] + s[n][1];
      ps1 += s[n][2] + s[n][3];
    }
    l0 = l0 * f0 + ps0; // this thread's share; the row's 4 threads are summed at the end
    l1 = l1 * f1 + ps1;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) o[n][0] *= f0, o[n][1] *= f0, o[n][2] *= f1, o[n][3] *= f1;
    // O += P V: P's C fragments of key tiles 2j, 2j + 1 are the A fragment of keys 16j ...
#pragma unroll
    for (int j = 0; j < FA_BK / 16; ++j) {
      const uint32_t pa[4] = {fa_pack(s[2 * j][0], s[2 * j][1]), fa_pack(s[2 * j][2], s[2 * j][3]),
                              fa_pack(s[2 * j + 1][0], s[2 * j + 1][1]),
                              fa_pack(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
      for (int n = 0; n < HD / 8; ++n) {
        const __half* vr = &vt[8 * n + g][16 * j + 2 * tq];
        fa_mma(o[n], pa, *reinterpret_cast<const uint32_t*>(vr),
               *reinterpret_cast<const uint32_t*>(vr + 8));
      }
    }
  }
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  const int width = n_head * HD;
#pragma unroll
  for (int n = 0; n < HD / 8; ++n) {
    const int c = h * HD + 8 * n + 2 * tq;
    if (r0 < t)
      *reinterpret_cast<float2*>(out + (size_t)r0 * width + c) = make_float2(o[n][0] / l0, o[n][1] / l0);
    if (r1 < t)
      *reinterpret_cast<float2*>(out + (size_t)r1 * width + c) = make_float2(o[n][2] / l1, o[n][3] / l1);
  }
}

// Dynamic shared memory of flash_attn_<hd>_*: the F32 staging (v's rows padded by 4 floats) and
// the F16 tiles.
__host__ __device__ constexpr int flash_smem_bytes(int hd) {
  return FA_BK * hd * 4 + FA_BK * (hd + 4) * 4 + FA_BK * (hd + FA_PAD) * 2 + hd * (FA_BK + FA_PAD) * 2;
}

// flash_attn_<HD>_<W>: W warps a block (16 W queries). More warps share each tile's loads and
// conversions among more queries (H200, 8B shape, pp512 at depth 4096: 264 µs a layer with 8,
// 363 with 4); the host takes 4 for batches of ≤ 64 tokens, which 8 would leave half idle.
#define FLASH_ATTN(HD, W)                                                                    \
  extern "C" __global__ void __launch_bounds__(32 * W)                                       \
      flash_attn_##HD##_##W(const float* q, const float* kc, const float* vc, float* out,    \
                            int t, int pos, int n_head, int n_head_kv, int n_ctx,            \
                            float scale) {                                                   \
    flash_attn_t<HD, W>(q, kc, vc, out, t, pos, n_head, n_head_kv, n_ctx, scale);            \
  }
FLASH_ATTN(32, 4)
FLASH_ATTN(64, 4)
FLASH_ATTN(128, 4)
FLASH_ATTN(32, 8)
FLASH_ATTN(64, 8)
FLASH_ATTN(128, 8)
