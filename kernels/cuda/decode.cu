// hypura's fused single-token decode kernels (CUDA).
//
// One decode step of a dense Llama/Qwen block is a fixed sequence of these kernels over
// preallocated buffers; the token id and position are read from device memory (`step`), so the
// whole step can be captured once into a CUDA graph and replayed for every token.
//
// Activations are F32; weights stay in ggml's block layout and are decoded in registers
// (quant.cuh). Q4_K, Q5_K and Q6_K rows (all of a Q4_K_M or Q5_K_M file) multiply int8 copies of the
// activations with dp4a, as llama.cpp's CUDA mat-vec kernels do: each kernel that produces a
// mat-vec input also writes that copy. Q8_0 and F32 rows use the F32 activations. What each
// kernel costs on an H200, and why it is shaped this way, is in docs/cuda.md; bench.cu times
// the variants.
//
// Per layer (5 launches): matvec_qkv, attention (with RoPE and the KV-cache write; past 256
// keys also attention_merge), matvec_norm_<type> (o, + residual, and the next norm's input),
// matvec_swiglu, matvec_norm_st_<type> (down, quantizing SwiGLU's output itself and staging its
// weights through shared memory, + residual, and the next norm's input; matvec_norm_qin_<type>,
// reading them in place, where n_ff is not a multiple of 2048 or the device lacks the shared
// memory). The RMS norms fold into the mat-vecs around them (see NormIn); where
// they cannot (the first layer, F32 or Q8_0 consumers, MoE blocks) `rms_norm` runs before its
// consumer, and o and down are plain `matvec`s (down after quantize_q8). A mixture-of-experts
// block replaces the last three with moe_router (the router's product and top-k on the device;
// it waits for the host when a chosen expert is not in device memory), moe_swiglu and
// moe_down_st_<type> (or _qin_: quantizing the hidden states itself) over the chosen experts, and
// moe_combine.
//
// Conventions: `step[0]` = token id, `step[1]` = position of that token (= tokens already cached).
// Matrices are row-major `[rows, cols]`, one row per output; `y[r] = dot(W[r], x) (+ bias[r])
// (+ res[r])`, where `res` may alias `y` (the residual stream updated in place).

#include "quant.cuh"

// Programmatic dependent launch (sm_90): inside a captured step the decoder launches each kernel
// allowed to start before the previous one has finished. Every kernel first waits for the
// previous grid to complete with its writes visible (so each kernel still sees all earlier ones:
// each completes only after its own wait), then lets the next kernel launch, whose blocks take
// their places as this one's last wave runs instead of after it. Without the launch attribute
// both instructions do nothing. (Issuing each mat-vec's first weight loads before the wait, into
// registers or as L2 prefetches, was measured and is not faster: docs/cuda.md.)
__device__ __forceinline__ void pdl_entry() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

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

// ---- RMS norms folded into the mat-vecs around them. A norm's producer (`matvec_norm_*`: o or
// down, plus the residual) writes the residual stream x, the int8 copy of x ⊙ w (w the norm's
// weight) and each block's Σx² (`part`); its consumers (q/k/v, SwiGLU, the output matrix) take
// that int8 copy as their input and scale each dot product by 1 / sqrt(mean(x²) + eps) at the
// end. Int8 blocks are scale-free (q = round(v / (max|v| / 127))), so this is the product with
// the normed input; no norm kernel runs in between.

struct NormIn {
  const float* part; // [n_part] the producer's Σx² per block; null: the input is normed already
  int n_part;
  float inv_n; // 1 / n_embd
  float eps;
};

// This lane's share of Σ part (issued before the dot products, so the loads overlap them).
__device__ __forceinline__ float norm_lane_sum(const NormIn& n) {
  float s = 0.f;
  if (n.part)
    for (int i = threadIdx.x % WARP; i < n.n_part; i += WARP) s += n.part[i];
  return s;
}

// The scale, the same in every warp (the same sums in the same order); all 32 lanes call it.
__device__ __forceinline__ float norm_scale(const NormIn& n, float lane_sum) {
  if (!n.part) return 1.f; // the same in every thread
  return rsqrtf(warp_sum(lane_sum) * n.inv_n + n.eps);
}

// x [n] → int8 blocks of 32 (see Q8x); one warp per block, n a multiple of 32.
extern "C" __global__ void quantize_q8(const float* __restrict__ x, int8_t* __restrict__ q,
                                       float* __restrict__ d, float* __restrict__ s, int n) {
  pdl_entry();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return; // whole warps: n is a multiple of 32
  warp_quantize(x[i], i, q, d, s);
}

// ---- Mat-vecs. A block is MV_WARPS warps: MV_WARPS / KS groups of KS warps, each group R
// consecutive rows (the host picks R and KS from the row count: kernels `<name>_<R>_<KS>`).

#define MV_WARPS 4

template <int R, int KS>
__device__ __forceinline__ int mv_first_row() {
  return (blockIdx.x * (MV_WARPS / KS) + threadIdx.y / KS) * R;
}

// Sums each lane's partials over the warp and the group's KS warps. Returns true in lanes
// i < R of the group's first warp, with row i's total in `total`. Every thread of the block
// must call it (it synchronizes the block when KS > 1).
template <int R, int KS>
__device__ __forceinline__ bool mv_combine(float (&acc)[R], float& total) {
  __shared__ float red[MV_WARPS][R];
  const int lane = threadIdx.x;
#pragma unroll
  for (int i = 0; i < R; ++i) acc[i] = warp_sum(acc[i]);
  if (KS == 1) {
    total = acc[0];
#pragma unroll
    for (int i = 1; i < R; ++i)
      if (lane == i) total = acc[i];
    return lane < R;
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < R; ++i) red[threadIdx.y][i] = acc[i];
  }
  __syncthreads();
  if (threadIdx.y % KS != 0 || lane >= R) return false;
  total = 0.f;
#pragma unroll
  for (int k = 0; k < KS; ++k) total += red[threadIdx.y + k][lane];
  return true;
}

// y = W x (+ bias) (+ res). `rows` is a multiple of R. TY: the rows' type, or -1 for `ty`'s.
template <int R, int KS, int U = 1, int TY = -1>
__device__ __forceinline__ void matvec_t(const uint8_t* __restrict__ w, int ty,
                                         const float* __restrict__ x, Q8x xq, float* y,
                                         int rows, int cols, const float* bias,
                                         const float* res, const NormIn& nin) {
  const int row = mv_first_row<R, KS>();
  const float ns = norm_lane_sum(nin);
  float acc[R] = {};
  if (row < rows) {
    if constexpr (TY < 0)
      rows_dot<R, KS, U>(w, ty, row, x, xq, cols, threadIdx.y % KS, acc);
    else
      rows_dot_t<TY, R, KS, U>(w, row, x, xq, cols, threadIdx.y % KS, acc);
  }
  const float scale = norm_scale(nin, ns);
  float t;
  if (mv_combine<R, KS>(acc, t) && row < rows) {
    const int r = row + threadIdx.x;
    t *= scale;
    if (bias) t += bias[r];
    if (res) t += res[r];
    y[r] = t;
  }
}

// q, k and v of one token in one launch: rows [0, rq) are q's, then k's, then v's (each count
// a multiple of R).
template <int R, int KS>
__device__ __forceinline__ void matvec_qkv_t(const float* __restrict__ x, Q8x xq, int cols,
                                             const uint8_t* wq, int tq, float* yq,
                                             const float* bq, int rq, const uint8_t* wk,
                                             int tk, float* yk, const float* bk, int rk,
                                             const uint8_t* wv, int tv, float* yv,
                                             const float* bv, int rv, const NormIn& nin) {
  int row = mv_first_row<R, KS>();
  const float ns = norm_lane_sum(nin);
  const uint8_t* w = wq;
  int ty = tq;
  float* y = yq;
  const float* b = bq;
  bool live = true;
  if (row >= rq) {
    row -= rq;
    w = wk, ty = tk, y = yk, b = bk;
    if (row >= rk) {
      row -= rk;
      w = wv, ty = tv, y = yv, b = bv;
      live = row < rv;
    }
  }
  float acc[R] = {};
  if (live) rows_dot<R, KS>(w, ty, row, x, xq, cols, threadIdx.y % KS, acc);
  const float scale = norm_scale(nin, ns);
  float t;
  if (mv_combine<R, KS>(acc, t) && live) {
    const int r = row + threadIdx.x;
    t *= scale;
    y[r] = b ? t + b[r] : t;
  }
}

#define MV_ARGS                                                                             \
  const uint8_t *__restrict__ w, int ty, const float *__restrict__ x, const int8_t *xq,     \
      const float *xd, const float *xs, float *y, int rows, int cols, const float *bias,    \
      const float *res, NormIn nin
#define QKV_ARGS                                                                            \
  const float *__restrict__ x, const int8_t *xq, const float *xd, const float *xs, int cols, \
      const uint8_t *wq, int tq, float *yq, const float *bq, int rq, const uint8_t *wk,      \
      int tk, float *yk, const float *bk, int rk, const uint8_t *wv, int tv, float *yv,      \
      const float *bv, int rv, NormIn nin
#define MATVEC(R, KS)                                                                       \
  extern "C" __global__ void __launch_bounds__(WARP * MV_WARPS) matvec_##R##_##KS(MV_ARGS) { \
    pdl_entry();                                                                            \
    matvec_t<R, KS>(w, ty, x, Q8x{xq, xd, xs}, y, rows, cols, bias, res, nin);              \
  }
#define MATVEC_QKV(R, KS)                                                                   \
  extern "C" __global__ void __launch_bounds__(WARP * MV_WARPS)                              \
      matvec_qkv_##R##_##KS(QKV_ARGS) {                                                     \
    pdl_entry();                                                                            \
    matvec_qkv_t<R, KS>(x, Q8x{xq, xd, xs}, cols, wq, tq, yq, bq, rq, wk, tk, yk, bk, rk,   \
                        wv, tv, yv, bv, rv, nin);                                           \
  }
// Row pairs in one warp (the shape of every matrix of ≥ 4096 rows: the output matrix, and o and
// down where their norm does not fold), one kernel per format, U warp iterations of the Q4_K /
// Q5_K loop unrolled: `matvec_2_1_<type>`. (In one kernel over every format the unrolled Q4_K
// loop cost the Q6_K output matrix 9 µs on an H200: 132.6 against 124.1, bench.cu.)
#define MATVEC_2_1(NAME, TY, U)                                                             \
  extern "C" __global__ void __launch_bounds__(WARP * MV_WARPS) NAME(MV_ARGS) {              \
    pdl_entry();                                                                            \
    matvec_t<2, 1, U, TY>(w, ty, x, Q8x{xq, xd, xs}, y, rows, cols, bias, res, nin);        \
  }

MATVEC(1, 1)
MATVEC(1, 2)
MATVEC(2, 2)
MATVEC_2_1(matvec_2_1_q4_k, T_Q4_K, 2)
MATVEC_2_1(matvec_2_1_q5_k, T_Q5_K, 2)
MATVEC_2_1(matvec_2_1_q6_k, T_Q6_K, 1)
MATVEC_2_1(matvec_2_1_q8_0, T_Q8_0, 1)
MATVEC_2_1(matvec_2_1_f32, T_F32, 1)
MATVEC_QKV(1, 1)
MATVEC_QKV(1, 2)
MATVEC_QKV(2, 1)
MATVEC_QKV(2, 2)

// A norm's producer (see NormIn): y = W x (+ res) for rows of type TY, 32 rows a block (one int8
// block: the rows' groups of KS warps own R rows each, R · NORM_WARPS / KS = 32), then warp 0
// writes the int8 copy of its rows of y ⊙ nw (nw: the next norm's weight) to (nq, nd, ns) and
// their Σ y² to npart[blockIdx.x]. The int8 copy goes to buffers of its own: other blocks may
// still be reading this kernel's input. (Spreading an int8 block's rows over several thread
// blocks, the last to finish writing the copy, cost more than the norm kernel it saves:
// docs/cuda.md.)
//
// QIN (k-quant rows; down, whose input is SwiGLU's F32 output): the block first quantizes its
// F32 input x (`cols` of it) into shared memory, int8 blocks padded by 16 bytes every 64 against
// bank conflicts (dynamic shared memory: qin_smem_bytes), and reads its activations there. Every
// block repeats that work (57 KB of x from L2 at n_ff 14336), and no quantize_q8 kernel runs
// between SwiGLU and down, which cost 4 µs a layer in drains and launches (docs/cuda.md).
#define NORM_WARPS 32
#define QIN_PAD 16

__host__ __device__ constexpr int qin_smem_bytes(int cols) {
  return cols / 64 * (64 + QIN_PAD) + cols / 32 * 8;
}

// Quantizes x [cols] into shared memory as Q8x, padded by QIN_PAD bytes every 64 (see above);
// 8 consecutive values a lane, 4 lanes an int8 block, the same values as quantize_q8's.
__device__ __forceinline__ Q8x quantize_to_smem(const float* __restrict__ x, int cols,
                                                int8_t* smem) {
  int8_t* sq = smem;
  float* sd = reinterpret_cast<float*>(smem + cols / 64 * (64 + QIN_PAD));
  float* ss = sd + cols / 32;
  const float4* x4 = reinterpret_cast<const float4*>(x);
  const int lane = threadIdx.x;
  for (int i = threadIdx.y * WARP + lane; i < cols / 8; i += blockDim.y * WARP) {
    const float4 a = x4[2 * i], b = x4[2 * i + 1]; // whole warps: cols / 8 % 32 == 0
    float amax = fmaxf(fmaxf(fmaxf(fabsf(a.x), fabsf(a.y)), fmaxf(fabsf(a.z), fabsf(a.w))),
                       fmaxf(fmaxf(fabsf(b.x), fabsf(b.y)), fmaxf(fabsf(b.z), fabsf(b.w))));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    const float dq = amax / 127.f;
    auto qz = [&](float v) { return amax == 0.f ? 0 : __float2int_rn(v / dq); };
    const int q0 = qz(a.x), q1 = qz(a.y), q2 = qz(a.z), q3 = qz(a.w);
    const int q4 = qz(b.x), q5 = qz(b.y), q6 = qz(b.z), q7 = qz(b.w);
    float sum = (float)(q0 + q1 + q2 + q3 + q4 + q5 + q6 + q7);
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int e = 8 * i;
    const uint2 pk = make_uint2(__byte_perm(__byte_perm(q0, q1, 0x40), __byte_perm(q2, q3, 0x40), 0x5410),
                                __byte_perm(__byte_perm(q4, q5, 0x40), __byte_perm(q6, q7, 0x40), 0x5410));
    *reinterpret_cast<uint2*>(sq + e / 64 * (64 + QIN_PAD) + e % 64) = pk;
    if ((lane & 3) == 0) {
      sd[e / 32] = dq;
      ss[e / 32] = dq * sum;
    }
  }
  __syncthreads();
  return Q8x{sq, sd, ss};
}

// The totals of a block's 32 rows (NORM_WARPS warps, groups of KS warps owning R rows each, `acc`
// each lane's partial sums): lane l of warp 0 returns row l's (row g · R + i: l = (g, i)).
// Every thread of the block must call it.
template <int R, int KS>
__device__ __forceinline__ float rows32_total(float (&acc)[R]) {
  __shared__ float red[NORM_WARPS][R];
  const int lane = threadIdx.x;
#pragma unroll
  for (int i = 0; i < R; ++i) acc[i] = warp_sum(acc[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < R; ++i) red[threadIdx.y][i] = acc[i];
  }
  __syncthreads();
  float t = 0.f;
  if (threadIdx.y == 0) {
#pragma unroll
    for (int k = 0; k < KS; ++k) t += red[lane / R * KS + k][lane % R];
  }
  return t;
}

// Warp 0 of a norm producer's block: `t` (lane l: row 32 · blockIdx.x + l's total) + res into y,
// then the int8 copy of y ⊙ nw and the block's Σ y². Every thread calls it.
__device__ __forceinline__ void norm_out(float t, float* y, const float* res,
                                         const float* __restrict__ nw, int8_t* nq, float* nd,
                                         float* ns, float* npart) {
  if (threadIdx.y != 0) return;
  const int lane = threadIdx.x, r = blockIdx.x * 32 + lane;
  if (res) t += res[r];
  y[r] = t;
  const float ss = warp_sum(t * t);
  if (lane == 0) npart[blockIdx.x] = ss;
  warp_quantize(t * nw[r], r, nq, nd, ns);
}

template <int TY, bool QIN>
__device__ __forceinline__ void matvec_norm_t(const uint8_t* __restrict__ w,
                                              const float* __restrict__ x, Q8x q8, float* y,
                                              int cols, const float* res,
                                              const float* __restrict__ nw, int8_t* nq,
                                              float* nd, float* ns, float* npart) {
  constexpr int R = 2, KS = 2;
  static_assert(R * NORM_WARPS / KS == 32, "one int8 block of rows per thread block");
  const int g = threadIdx.y / KS, ks = threadIdx.y % KS;
  float acc[R] = {};
  const int row = blockIdx.x * 32 + g * R;
  if constexpr (QIN) {
    extern __shared__ __align__(16) int8_t qin_smem[];
    // Every thread calls this once, after its first weight loads: wait, then quantize.
    rows_dot_t<TY, R, KS, 1, QIN_PAD>(w, row, x, quantize_to_smem(x, cols, qin_smem), cols, ks,
                                      acc);
  } else {
    rows_dot_t<TY, R, KS>(w, row, x, q8, cols, ks, acc);
  }
  norm_out(rows32_total<R, KS>(acc), y, res, nw, nq, nd, ns, npart);
}

#define MATVEC_NORM(NAME, TY, QIN)                                                          \
  extern "C" __global__ void __launch_bounds__(WARP * NORM_WARPS)                            \
      NAME(const uint8_t* __restrict__ w, const float* __restrict__ x, const int8_t* xq,     \
           const float* xd, const float* xs, float* y, int cols, const float* res,           \
           const float* __restrict__ nw, int8_t* nq, float* nd, float* ns, float* npart) {   \
    pdl_entry();                                                                            \
    matvec_norm_t<TY, QIN>(w, x, Q8x{xq, xd, xs}, y, cols, res, nw, nq, nd, ns, npart);      \
  }
MATVEC_NORM(matvec_norm_q4_k, T_Q4_K, false)
MATVEC_NORM(matvec_norm_q5_k, T_Q5_K, false)
MATVEC_NORM(matvec_norm_q6_k, T_Q6_K, false)
MATVEC_NORM(matvec_norm_q8_0, T_Q8_0, false)
MATVEC_NORM(matvec_norm_f32, T_F32, false)
MATVEC_NORM(matvec_norm_qin_q4_k, T_Q4_K, true)
MATVEC_NORM(matvec_norm_qin_q5_k, T_Q5_K, true)
MATVEC_NORM(matvec_norm_qin_q6_k, T_Q6_K, true)

// Down staged through shared memory (k-quant rows, cols a multiple of 2048): each warp owns one
// row (32 a block) and copies its next 8 super-blocks (a 16-byte aligned run) into its own
// shared buffer with cp.async, 16 bytes a lane, nst_stages deep; the lanes then read their
// words there. Q6_K's 210-byte super-blocks are only 2-byte aligned, so read in place
// (dot_q6_k) each lane makes 24 32-bit loads per super-block, scattered over 8 super-blocks per
// warp instruction. The first stages are issued before the dependency wait (weights do not
// depend on the previous kernel, and cp.async holds no registers), so they arrive while the
// block quantizes its input (as the _qin_ kernels). Runs copied ahead: nst_stages (each type's
// faster on an H200, kbench pdl). Dynamic shared memory: nst_smem_bytes (past the default
// 48 KiB: the host opts in). H200, [4096, 14336] in a chain of dependent launches, against
// matvec_norm_qin_<t>: Q4_K 13.6 → 11.1 µs, Q5_K 15.2 → 13.5, Q6_K 20.5 → 17.7.
__host__ __device__ constexpr int nst_stages(int ty) { return ty == T_Q6_K ? 2 : 3; }

__host__ __device__ constexpr int kq_block_bytes(int ty) {
  return ty == T_Q4_K ? 144 : ty == T_Q5_K ? 176 : 210;
}

__host__ __device__ constexpr int nst_smem_bytes(int ty, int cols, int stages = 0) {
  return qin_smem_bytes(cols) +
         NORM_WARPS * (stages ? stages : nst_stages(ty)) * 8 * kq_block_bytes(ty);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa), "l"(gmem) : "memory");
}

// This warp's copy of run g (super-blocks 8g .. 8g+7, G bytes) of `row` into `buf`, as one
// cp.async group (empty past the row's end, so the group count stays the same).
template <int G>
__device__ __forceinline__ void nst_issue(const uint8_t* row, int g, int ng, uint8_t* buf) {
  if (g < ng) {
    const uint8_t* src = row + (size_t)g * G;
    for (int j = threadIdx.x; j < G / 16; j += WARP) cp_async16(buf + 16 * j, src + 16 * j);
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// This lane's partial sum of its warp's row `wr` (cols of type TY) · x, staged as above in this
// warp's part of the dynamic shared memory. x is F32: the block quantizes it into shared memory
// first (the stages lie past that copy; every thread of the block must call this). EARLY: the
// weights do not depend on the previous kernel, so the first copies go out before the
// dependency wait (which this then does); else the caller has waited.
template <int TY, bool EARLY, int ST = nst_stages(TY)>
__device__ __forceinline__ float staged_row_dot(const uint8_t* __restrict__ wr,
                                                const float* __restrict__ x, int cols) {
  constexpr int BB = kq_block_bytes(TY), G = 8 * BB, XP = QIN_PAD;
  extern __shared__ __align__(16) int8_t nst_smem[];
  const int lane = threadIdx.x, c = lane & 3, ng = cols / 2048;
  uint8_t* stage =
      reinterpret_cast<uint8_t*>(nst_smem) + qin_smem_bytes(cols) + threadIdx.y * ST * G;
#pragma unroll
  for (int g = 0; g < ST - 1; ++g) nst_issue<G>(wr, g, ng, stage + g * G);
  if (EARLY) pdl_entry();
  const Q8x xq = quantize_to_smem(x, cols, nst_smem);
  float acc = 0.f;
  for (int g = 0; g < ng; ++g) {
    const int gi = g + ST - 1;
    nst_issue<G>(wr, gi, ng, stage + (gi % ST) * G);
    asm volatile("cp.async.wait_group %0;" ::"n"(ST - 1) : "memory");
    __syncwarp();
    const int b = 8 * g + (lane >> 2);
    const uint8_t* blk = stage + (g % ST) * G + (lane >> 2) * BB;
    if constexpr (TY == T_Q6_K)
      q6_lane_add(blk, q6_lane_x<XP>(xq, b, 8 * c), c, acc);
    else
      qk_lane_add<TY == T_Q5_K>(blk, qk_lane_x<XP>(xq, b, c), c, acc);
    __syncwarp(); // every lane has read this stage before it is refilled
  }
  return acc;
}

template <int TY, int ST = nst_stages(TY)>
__device__ __forceinline__ void matvec_norm_st_t(const uint8_t* __restrict__ w,
                                                 const float* __restrict__ x, float* y,
                                                 int cols, const float* res,
                                                 const float* __restrict__ nw, int8_t* nq,
                                                 float* nd, float* ns, float* npart) {
  const size_t rb = (size_t)(cols / 256) * kq_block_bytes(TY);
  const uint8_t* wr = w + (blockIdx.x * 32 + threadIdx.y) * rb;
  float acc[1] = {staged_row_dot<TY, true, ST>(wr, x, cols)};
  norm_out(rows32_total<1, 1>(acc), y, res, nw, nq, nd, ns, npart);
}

#define MATVEC_NORM_ST(NAME, TY)                                                            \
  extern "C" __global__ void __launch_bounds__(WARP * NORM_WARPS)                            \
      NAME(const uint8_t* __restrict__ w, const float* __restrict__ x, const int8_t* xq,     \
           const float* xd, const float* xs, float* y, int cols, const float* res,           \
           const float* __restrict__ nw, int8_t* nq, float* nd, float* ns, float* npart) {   \
    matvec_norm_st_t<TY>(w, x, y, cols, res, nw, nq, nd, ns, npart);                         \
  }
MATVEC_NORM_ST(matvec_norm_st_q4_k, T_Q4_K)
MATVEC_NORM_ST(matvec_norm_st_q5_k, T_Q5_K)
MATVEC_NORM_ST(matvec_norm_st_q6_k, T_Q6_K)

// The SwiGLU hidden state: out[r] = silu(gate[r] · x) * (up[r] · x); one warp per row. Two Q4_K
// (or two Q5_K) rows run interleaved, sharing each activation load.
template <int U = 1>
__device__ __forceinline__ void swiglu_row(const float* __restrict__ x, Q8x q8, int cols,
                                           const uint8_t* __restrict__ wg, int tg,
                                           const uint8_t* __restrict__ wu, int tu,
                                           float* __restrict__ out, int rows,
                                           const NormIn& nin) {
  const int row = blockIdx.x * MV_WARPS + threadIdx.y;
  if (row >= rows) return; // the whole warp
  const float ns = norm_lane_sum(nin);
  float g, u;
  if (tg == tu && (tg == T_Q4_K || tg == T_Q5_K)) {
    const size_t rb = row_bytes(tg, cols);
    const uint8_t* const rs[2] = {wg + row * rb, wu + row * rb};
    float acc[2] = {};
    if (tg == T_Q4_K)
      dot_qk<2, 1, false, U>(rs, q8, cols / 256, 0, acc);
    else
      dot_qk<2, 1, true, U>(rs, q8, cols / 256, 0, acc);
    g = warp_sum(acc[0]);
    u = warp_sum(acc[1]);
  } else {
    float a[1] = {}, c[1] = {};
    rows_dot<1, 1>(wg, tg, row, x, q8, cols, 0, a);
    rows_dot<1, 1>(wu, tu, row, x, q8, cols, 0, c);
    g = warp_sum(a[0]);
    u = warp_sum(c[0]);
  }
  const float scale = norm_scale(nin, ns);
  g *= scale;
  u *= scale;
  if (threadIdx.x == 0) out[row] = g / (1.f + expf(-g)) * u;
}

extern "C" __global__ void __launch_bounds__(WARP * MV_WARPS)
    matvec_swiglu(const float* __restrict__ x, const int8_t* xq, const float* xd,
                  const float* xs, int cols, const uint8_t* __restrict__ wg, int tg,
                  const uint8_t* __restrict__ wu, int tu, float* __restrict__ out, int rows,
                  NormIn nin) {
  pdl_entry();
  swiglu_row(x, Q8x{xq, xd, xs}, cols, wg, tg, wu, tu, out, rows, nin);
}

// ---- Mixture of experts. The router's logits → `moe_route` → `route` = [MOE_MAX_USED expert ids
// (as floats), MOE_MAX_USED mixing weights] (each MoE block its own 16 floats, so the step's whole
// routing stays readable after it); then the experts of ranks 0 .. gridDim.y (blockIdx.y = rank)
// run SwiGLU into ffn[rank], its int8 copy, and down into ys[rank]; `moe_combine` adds
// x += Σ_r w[r] · ys[r] in rank order. Expert weights come from the block's `table`: 3 addresses
// per expert (gate, up, down), 0 for an expert not in device memory.
//
// Experts behind the host's caches: when a chosen expert's entry is 0, `moe_route` posts the
// block and its chosen ids to the host through `MoeMail` (page-locked host memory mapped into the
// device's address space) and waits. The host copies the experts into device slots, updates the
// table, and answers; the step then goes on inside the same graph. A step whose experts are all
// in device memory never waits. If no answer comes within MOE_WAIT_NS, the kernel counts a
// timeout and goes on; the expert kernels skip an expert whose address is still 0 (no access
// outside memory), and the host reports the step as failed.

#define MOE_MAX_USED 8

// Top-k of n logits (n ≤ 256; one warp), ties to the lower id; the weights are the softmax over
// the chosen k (= the full softmax renormalized over them), summed in rank order.
struct MoeMail {
  unsigned int req;  // device → host: sequence number of the latest request
  unsigned int layer;
  unsigned int n;
  unsigned int ids[MOE_MAX_USED];
  unsigned int done;     // host → device: the sequence number last answered
  unsigned int timeouts; // device → host: requests the device stopped waiting for
};

#define MOE_WAIT_NS 60000000000ull // 60 s: a disk read of a few experts takes well under one

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// The chosen experts of block `layer` (route[0..k] as floats) into device memory: if one's table
// entry is 0, ask the host through `mail` and wait for its answer (one thread).
__device__ void moe_fetch(const uint64_t* table, const float* route, int k, int layer,
                          MoeMail* mail) {
  bool missing = false;
  for (int r = 0; r < k; ++r) {
    const uint64_t* t = table + 3 * (int)route[r];
    missing |= t[0] == 0 || t[1] == 0 || t[2] == 0;
  }
  if (!missing) return;
  volatile MoeMail* m = mail;
  const unsigned int seq = m->req + 1;
  m->layer = (unsigned int)layer;
  m->n = (unsigned int)k;
  for (int r = 0; r < k; ++r) m->ids[r] = (unsigned int)route[r];
  __threadfence_system();
  m->req = seq;
  __threadfence_system();
  const unsigned long long t0 = global_ns();
  while (m->done != seq) {
    if (global_ns() - t0 > MOE_WAIT_NS) {
      m->timeouts = m->timeouts + 1;
      break;
    }
    __nanosleep(1000);
  }
  __threadfence_system();
}

// Top-k of the n logits (one warp; see moe_route) into `route`, then the experts' fetch.
__device__ __forceinline__ void route_warp(const float* logits, int n, int k,
                                           float* __restrict__ route, const uint64_t* table,
                                           int layer, MoeMail* mail) {
  const int lane = threadIdx.x;
  float v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int e = lane + WARP * j;
    v[j] = e < n ? logits[e] : -INFINITY;
  }
  float top[MOE_MAX_USED];
  for (int r = 0; r < k; ++r) {
    float best = -INFINITY;
    int id = 0x7fffffff;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int e = lane + WARP * j;
      if (e < n && (v[j] > best || (v[j] == best && e < id))) best = v[j], id = e;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, id, o);
      if (ob > best || (ob == best && oi < id)) best = ob, id = oi;
    }
    if (id >= n) id = r; // NaN logits: any valid id rather than an address outside the table
    top[r] = best;
    if ((id & (WARP - 1)) == lane) v[id / WARP] = -INFINITY; // taken
    if (lane == 0) route[r] = (float)id;
  }
  if (lane == 0) {
    float sum = 0.f;
    for (int r = 0; r < k; ++r) sum += expf(top[r] - top[0]);
    for (int r = 0; r < k; ++r) route[MOE_MAX_USED + r] = expf(top[r] - top[0]) / sum;
    if (mail) moe_fetch(table, route, k, layer, mail);
  }
}

extern "C" __global__ void moe_route(const float* __restrict__ logits, int n, int k,
                                     float* __restrict__ route, const uint64_t* table, int layer,
                                     MoeMail* mail) {
  pdl_entry();
  route_warp(logits, n, k, route, table, layer, mail);
}

// The router's product and the routing in one block: logits[r] = Σ_j router[r, j] · x[j] for
// an F32 router of n ≤ 256 rows, each row over `wpr` warps (so that few rows still use all 32),
// then moe_route's top-k in warp 0. (One launch instead of two: Mixtral 275.5 against 275.0
// tok/s. Also norming x here, with the norm folded into o, was slower: docs/cuda.md.)
#define ROUTER_WARPS 32
extern "C" __global__ void __launch_bounds__(WARP * ROUTER_WARPS)
    moe_router(const float* __restrict__ router, int n, int d, const float* __restrict__ x,
               int k, float* __restrict__ route, const uint64_t* table, int layer,
               MoeMail* mail) {
  pdl_entry();
  __shared__ float logits[256];
  __shared__ float part[ROUTER_WARPS];
  const int warp = threadIdx.y, lane = threadIdx.x;
  int wpr = 1; // warps per row: the largest power of two with n · wpr ≤ 32
  while (2 * wpr * n <= ROUTER_WARPS) wpr *= 2;
  const int rows_at_once = ROUTER_WARPS / wpr, sub = warp % wpr;
  const float4* x4 = reinterpret_cast<const float4*>(x);
  for (int r0 = 0; r0 < n; r0 += rows_at_once) {
    const int r = r0 + warp / wpr;
    float acc = 0.f;
    if (r < n) {
      const float4* row = reinterpret_cast<const float4*>(router + (size_t)r * d);
      for (int j = sub * WARP + lane; j < d / 4; j += wpr * WARP) {
        const float4 a = x4[j], m = row[j];
        acc += m.x * a.x + m.y * a.y + m.z * a.z + m.w * a.w;
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (sub == 0 && lane == 0 && r < n) {
      float t = 0.f;
      for (int i = 0; i < wpr; ++i) t += part[warp + i];
      logits[r] = t;
    }
    __syncthreads();
  }
  if (warp == 0) route_warp(logits, n, k, route, table, layer, mail);
}

// Expert `rank`'s matrix m (0 gate, 1 up, 2 down); null when not in device memory.
__device__ __forceinline__ const uint8_t* expert_w(const uint64_t* table, const float* route,
                                                   int rank, int m) {
  return reinterpret_cast<const uint8_t*>(table[3 * (int)route[rank] + m]);
}

// ffn[rank] = swiglu(xn) of the expert of rank blockIdx.y.
extern "C" __global__ void __launch_bounds__(WARP * MV_WARPS)
    moe_swiglu(const float* __restrict__ x, const int8_t* xq, const float* xd, const float* xs,
               int cols, int tg, int tu, float* __restrict__ ffn, int rows,
               const uint64_t* table, const float* route) {
  pdl_entry();
  const int rank = blockIdx.y;
  const uint8_t* wg = expert_w(table, route, rank, 0);
  const uint8_t* wu = expert_w(table, route, rank, 1);
  if (!wg || !wu) return; // the host did not answer: the step fails (see moe_fetch)
  swiglu_row(x, Q8x{xq, xd, xs}, cols, wg, tg, wu, tu, ffn + (size_t)rank * rows, rows,
             NormIn{});
}

// ys[rank] = down · ffn[rank] (its int8 copy at the same offsets) for rank blockIdx.y.
#define MOE_DOWN(R, KS)                                                                       \
  extern "C" __global__ void __launch_bounds__(WARP * MV_WARPS) moe_down_##R##_##KS(          \
      int ty, const float* ffn, const int8_t* fq, const float* fd, const float* fs, float* ys, \
      int rows, int cols, const uint64_t* table, const float* route) {                       \
    pdl_entry();                                                                            \
    const int rank = blockIdx.y;                                                              \
    const size_t o = (size_t)rank * cols;                                                     \
    const uint8_t* w = expert_w(table, route, rank, 2);                                       \
    if (!w) return;                                                                           \
    matvec_t<R, KS>(w, ty, ffn + o, Q8x{fq + o, fd + o / 32, fs + o / 32},                    \
                    ys + (size_t)rank * rows, rows, cols, nullptr, nullptr, NormIn{});        \
  }
MOE_DOWN(1, 1)
MOE_DOWN(1, 2)
MOE_DOWN(2, 1)
MOE_DOWN(2, 2)

// The same quantizing ffn[rank] itself into shared memory (as matvec_norm_qin_*): no quantize_q8
// between moe_swiglu and it. Grid (rows / 32, ranks), NORM_WARPS warps; k-quant rows.
// STAGED (`moe_down_st_<t>`, see matvec_norm_st_t; cols a multiple of 2048; dynamic shared memory
// nst_smem_bytes): each warp one row of its rank's expert, its weights staged. The expert's
// address comes from the table after the wait, so no copy goes out before it. cp.async needs
// 16-byte aligned runs: a cache slot's matrices are allocations of their own, and resident
// experts lie whole matrices apart (rows × cols / 256 × block bytes, a multiple of 16 when cols
// is a multiple of 2048). Else (`moe_down_qin_<t>`: dynamic shared memory qin_smem_bytes) read
// in place, pairs of warps sharing two rows.
template <int TY, bool STAGED>
__device__ __forceinline__ void moe_down_t(const float* ffn, float* ys, int rows, int cols,
                                           const uint64_t* table, const float* route) {
  const int rank = blockIdx.y;
  const uint8_t* w = expert_w(table, route, rank, 2);
  if (!w) return; // the whole block (see moe_fetch)
  const float* x = ffn + (size_t)rank * cols;
  float t;
  if constexpr (STAGED) {
    const size_t rb = (size_t)(cols / 256) * kq_block_bytes(TY);
    const uint8_t* wr = w + (blockIdx.x * 32 + threadIdx.y) * rb;
    float acc[1] = {staged_row_dot<TY, false>(wr, x, cols)};
    t = rows32_total<1, 1>(acc);
  } else {
    constexpr int R = 2, KS = 2;
    extern __shared__ __align__(16) int8_t qin_smem[];
    const int g = threadIdx.y / KS, ks = threadIdx.y % KS;
    float acc[R] = {};
    rows_dot_t<TY, R, KS, 1, QIN_PAD>(w, blockIdx.x * 32 + g * R, x,
                                      quantize_to_smem(x, cols, qin_smem), cols, ks, acc);
    t = rows32_total<R, KS>(acc);
  }
  if (threadIdx.y == 0) ys[(size_t)rank * rows + blockIdx.x * 32 + threadIdx.x] = t;
}

#define MOE_DOWN_K(NAME, TY, STAGED)                                                        \
  extern "C" __global__ void __launch_bounds__(WARP * NORM_WARPS)                            \
      NAME(const float* ffn, float* ys, int rows, int cols, const uint64_t* table,           \
           const float* route) {                                                            \
    pdl_entry();                                                                            \
    moe_down_t<TY, STAGED>(ffn, ys, rows, cols, table, route);                               \
  }
MOE_DOWN_K(moe_down_qin_q4_k, T_Q4_K, false)
MOE_DOWN_K(moe_down_qin_q5_k, T_Q5_K, false)
MOE_DOWN_K(moe_down_qin_q6_k, T_Q6_K, false)
MOE_DOWN_K(moe_down_st_q4_k, T_Q4_K, true)
MOE_DOWN_K(moe_down_st_q5_k, T_Q5_K, true)
MOE_DOWN_K(moe_down_st_q6_k, T_Q6_K, true)

// x += Σ_r w[r] · ys[r], in rank order whatever order the experts ran in.
extern "C" __global__ void moe_combine(float* x, const float* __restrict__ ys, int k, int n,
                                       const float* __restrict__ route) {
  pdl_entry();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float t = 0.f;
    for (int r = 0; r < k; ++r) t += route[MOE_MAX_USED + r] * ys[(size_t)r * n + i];
    x[i] += t;
  }
}

// ---- Embedding: x = row step[0] of the table, dequantized.

#define EMBED(NAME, ROW_BYTES, AT)                                                           \
  extern "C" __global__ void NAME(const uint8_t* __restrict__ w, const uint32_t* step,     \
                                  float* x, int cols) {                                     \
    pdl_entry();                                                                            \
    const uint8_t* row = w + (size_t)step[0] * (ROW_BYTES);                                  \
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cols; i += gridDim.x * blockDim.x) \
      x[i] = AT(row, i);                                                                     \
  }

EMBED(embed_q4_k, (size_t)(cols / 256) * 144, q4k_at)
EMBED(embed_q5_k, (size_t)(cols / 256) * 176, q5k_at)
EMBED(embed_q6_k, (size_t)(cols / 256) * 210, q6k_at)
EMBED(embed_q8_0, (size_t)(cols / 32) * 34, q8_0_at)
EMBED(embed_f32, (size_t)cols * 4, f32_at)

// ---- RMS norm: out = x / sqrt(mean(x²) + eps) * w, and out as int8 blocks (q, d, s; see
// Q8x). One block: `rms_norm4` (n a multiple of 128) takes a float4 per thread and step, 8
// lanes per int8 block; `rms_norm` (n a multiple of 32) one float, a warp per int8 block.

// Σ v over the block, in every thread (`part` holds 32 floats of shared memory).
__device__ __forceinline__ float block_sum(float v, float* part) {
  const int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
  v = warp_sum(v);
  if (lane == 0) part[wid] = v;
  __syncthreads();
  return warp_sum(lane < blockDim.x / WARP ? part[lane] : 0.f);
}

extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ out, int n, float eps, int8_t* q,
                                    float* d, float* qs) {
  pdl_entry();
  __shared__ float part[32];
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i] * x[i];
  const float scale = rsqrtf(block_sum(s, part) / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) { // whole warps (n % 32 == 0)
    const float v = x[i] * scale * w[i];
    out[i] = v;
    warp_quantize(v, i, q, d, qs);
  }
}

extern "C" __global__ void rms_norm4(const float* __restrict__ x, const float* __restrict__ w,
                                     float* __restrict__ out, int n, float eps, int8_t* q,
                                     float* d, float* qs) {
  pdl_entry();
  __shared__ float part[32];
  const float4* x4 = reinterpret_cast<const float4*>(x);
  const int n4 = n / 4;
  float s = 0.f;
  for (int i = threadIdx.x; i < n4; i += blockDim.x) {
    const float4 v = x4[i];
    s += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  const float scale = rsqrtf(block_sum(s, part) / n + eps);
  for (int i = threadIdx.x; i < n4; i += blockDim.x) { // whole warps (n4 % 32 == 0)
    const float4 v = x4[i], g = reinterpret_cast<const float4*>(w)[i];
    const float4 o = make_float4(v.x * scale * g.x, v.y * scale * g.y, v.z * scale * g.z,
                                 v.w * scale * g.w);
    reinterpret_cast<float4*>(out)[i] = o;
    float amax = fmaxf(fmaxf(fabsf(o.x), fabsf(o.y)), fmaxf(fabsf(o.z), fabsf(o.w)));
#pragma unroll
    for (int m = 1; m < 8; m <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
    const float dq = amax / 127.f;
    const int q0 = amax == 0.f ? 0 : __float2int_rn(o.x / dq);
    const int q1 = amax == 0.f ? 0 : __float2int_rn(o.y / dq);
    const int q2 = amax == 0.f ? 0 : __float2int_rn(o.z / dq);
    const int q3 = amax == 0.f ? 0 : __float2int_rn(o.w / dq);
    float sum = (float)(q0 + q1 + q2 + q3);
#pragma unroll
    for (int m = 1; m < 8; m <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, m);
    reinterpret_cast<char4*>(q)[i] =
        make_char4((signed char)q0, (signed char)q1, (signed char)q2, (signed char)q3);
    if ((threadIdx.x & 7) == 0) {
      d[i / 8] = dq;
      qs[i / 8] = dq * sum;
    }
  }
}

// ---- Attention for one query token over keys 0..=pos, with RoPE. Grid: n_head blocks of
// (32, W) (times n_split, below); caches are [n_head_kv, n_ctx, hd]; head_dim ≤ 32 · PL.
// Each block rotates its head's q and its kv head's k for this position (style 0: interleaved
// pairs (2i, 2i+1); style 1: half-split pairs (i, i + rope_dim/2); dims ≥ rope_dim unrotated),
// and the first block of each kv group stores this token's k and v into the cache. Each warp
// keeps an online softmax over runs of KEYS keys (warp w: keys KEYS·w.., then KEYS·(w + W)..,
// ...); the warps are merged at the end.
//
// A run's K and V rows are loaded together, with plain global loads, before any of its scores
// (row `pos`, this token's, is then replaced by its value from shared memory: other blocks may
// not have stored it yet). The first run's loads are issued before the dependency wait: those
// rows were written by earlier steps, so they overlap the q/k/v mat-vec's tail. (H200, 32 heads
// of 128, bench.cu: 4.3 -> 3.1 µs at 9 keys, 6.4 -> 3.4 at 128; docs/cuda.md.)

// Element t of a head after RoPE with cosines `cs` and sines `sn` of this position.
__device__ __forceinline__ float rope_at(const float* x, int t, int rope_dim, int style,
                                         const float* cs, const float* sn) {
  if (t >= rope_dim) return x[t];
  const int half = rope_dim / 2;
  const int i = style == 0 ? t / 2 : t % half;
  const bool first = style == 0 ? (t & 1) == 0 : t < half;
  const int i0 = style == 0 ? 2 * i : i, i1 = style == 0 ? 2 * i + 1 : i + half;
  const float x0 = x[i0], x1 = x[i1], c = cs[i], s = sn[i];
  return first ? x0 * c - x1 * s : x0 * s + x1 * c;
}

// How many blocks share a head's n_kv keys (each at least `chunk_min` of them, at most
// `n_split` blocks), and how many keys each takes.
__device__ __forceinline__ int att_splits(int n_kv, int n_split, int chunk_min, int& chunk) {
  const int s = min(n_split, (n_kv + chunk_min - 1) / chunk_min);
  chunk = (n_kv + s - 1) / s;
  return s;
}

// Grid (n_head, n_split). Block (h, c) takes keys [c·chunk, (c+1)·chunk) of head h. When one
// block covers all keys it writes the output; otherwise each writes its softmax partial (max,
// Σ exp, unnormalized output: `part` [n_head, n_split, hd + 2]) and `attention_merge` combines
// them. With `oq` (head_dim a multiple of 32), the output is also written as int8 blocks (Q8x).
#define ATT_ARGS                                                                             \
  const float *__restrict__ q, const float *__restrict__ k, const float *__restrict__ v,      \
      float *kc, float *vc, float *__restrict__ out, const float *__restrict__ cos_t,          \
      const float *__restrict__ sin_t, const uint32_t *step, int n_head, int n_head_kv, int hd, \
      int rope_dim, int style, int n_ctx, float scale, int8_t *oq, float *od, float *os,       \
      float *part, int n_split, int chunk_min

template <int W, int KEYS, int PL>
__device__ __forceinline__ void attention_t(ATT_ARGS) {
  __shared__ float sm_m[W], sm_l[W], sm_f[W];
  __shared__ float sm_acc[W][WARP * PL];
  __shared__ float sm_raw[2][WARP * PL]; // this token's q, k before RoPE
  __shared__ float sm_new[3][WARP * PL]; // q, k after RoPE; v
  const int group = n_head / n_head_kv, h = blockIdx.x, kvh = h / group, c = blockIdx.y;
  const int lane = threadIdx.x, wid = threadIdx.y, t = wid * WARP + lane;
  const int pos = step[1], n_kv = pos + 1; // step is written by the host before the step
  int chunk;
  const int splits = att_splits(n_kv, n_split, chunk_min, chunk);
  if (c >= splits) return; // the whole block (exiting also lets the next kernel launch)
  const int j0 = c * chunk, j1 = min(n_kv, j0 + chunk);
  float* K = kc + (size_t)kvh * n_ctx * hd;
  float* V = vc + (size_t)kvh * n_ctx * hd;
  float kr[KEYS][PL], vr[KEYS][PL];
  auto load = [&](int j) { // keys past the chunk: a valid row, weighed 0 below
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      const size_t o = (size_t)min(j + u, j1 - 1) * hd;
#pragma unroll
      for (int i = 0; i < PL; ++i) {
        const int d = lane + WARP * i;
        kr[u][i] = d < hd ? K[o + d] : 0.f;
        vr[u][i] = d < hd ? V[o + d] : 0.f;
      }
    }
  };
  int j = j0 + KEYS * wid;
  load(j);
  pdl_entry();
  if (t < hd) {
    sm_raw[0][t] = q[(size_t)h * hd + t];
    sm_raw[1][t] = k[(size_t)kvh * hd + t];
    sm_new[2][t] = v[(size_t)kvh * hd + t];
  }
  __syncthreads();
  if (t < hd) {
    const float* cs = cos_t + (size_t)pos * (rope_dim / 2);
    const float* sn = sin_t + (size_t)pos * (rope_dim / 2);
    const float kt = rope_at(sm_raw[1], t, rope_dim, style, cs, sn);
    sm_new[0][t] = rope_at(sm_raw[0], t, rope_dim, style, cs, sn);
    sm_new[1][t] = kt;
    if (h % group == 0 && c == 0) {
      K[(size_t)pos * hd + t] = kt;
      V[(size_t)pos * hd + t] = sm_new[2][t];
    }
  }
  __syncthreads();
  float qr[PL], acc[PL];
#pragma unroll
  for (int i = 0; i < PL; ++i) {
    const int d = lane + WARP * i;
    qr[i] = d < hd ? sm_new[0][d] * scale : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (bool first = true; j < j1; j += KEYS * W, first = false) {
    if (!first) load(j);
    float sc[KEYS];
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      if (min(j + u, j1 - 1) == pos) { // this token's key and value, from shared memory
#pragma unroll
        for (int i = 0; i < PL; ++i) {
          const int d = lane + WARP * i;
          kr[u][i] = d < hd ? sm_new[1][d] : 0.f;
          vr[u][i] = d < hd ? sm_new[2][d] : 0.f;
        }
      }
      sc[u] = 0.f;
#pragma unroll
      for (int i = 0; i < PL; ++i) sc[u] += qr[i] * kr[u][i];
    }
    float m2 = m;
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      sc[u] = j + u < j1 ? warp_sum(sc[u]) : -INFINITY;
      m2 = fmaxf(m2, sc[u]);
    }
    const float cf = expf(m - m2); // 0 on the first run (m = -inf; m2 is finite: key j)
    float p[KEYS];
    l *= cf;
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      p[u] = expf(sc[u] - m2); // 0 past the chunk
      l += p[u];
    }
#pragma unroll
    for (int i = 0; i < PL; ++i) {
      float a = acc[i] * cf;
#pragma unroll
      for (int u = 0; u < KEYS; ++u) a += p[u] * vr[u][i];
      acc[i] = a;
    }
    m = m2;
  }
  if (lane == 0) {
    sm_m[wid] = m;
    sm_l[wid] = l;
  }
#pragma unroll
  for (int i = 0; i < PL; ++i) sm_acc[wid][lane + WARP * i] = acc[i];
  __syncthreads();
  // Merge (lane w < W of warp 0 weighs warp w's partial softmax), then one thread per output
  // element. Warp 0 saw key j0, so the block's max is finite.
  float* pp = part + ((size_t)h * n_split + c) * (hd + 2);
  if (wid == 0) {
    const float mw = lane < W ? sm_m[lane] : -INFINITY, mm = warp_max(mw);
    const float f = mw == -INFINITY ? 0.f : expf(mw - mm); // warps that saw no key weigh 0
    const float ll = warp_sum(lane < W ? sm_l[lane] * f : 0.f);
    if (lane < W) sm_f[lane] = splits == 1 ? f / ll : f;
    if (splits > 1 && lane == 0) {
      pp[hd] = mm;
      pp[hd + 1] = ll;
    }
  }
  __syncthreads();
  for (int dd = wid * WARP + lane; dd < hd; dd += W * WARP) { // whole warps when hd % 32 == 0
    float o = 0.f;
#pragma unroll 8
    for (int w = 0; w < W; ++w) o += sm_acc[w][dd] * sm_f[w];
    if (splits > 1) {
      pp[dd] = o;
      continue;
    }
    out[(size_t)h * hd + dd] = o;
    if (oq) warp_quantize(o, h * hd + dd, oq, od, os);
  }
}

// attention_<W>_<KEYS> for head_dim ≤ 128, attention_<W>_<KEYS>_256 for head_dim ≤ 256 (fewer
// keys a run: the rows are twice as long in registers).
#define ATTENTION(NAME, W, KEYS, PL)                                                        \
  extern "C" __global__ void __launch_bounds__(WARP * W) NAME(ATT_ARGS) {                    \
    attention_t<W, KEYS, PL>(q, k, v, kc, vc, out, cos_t, sin_t, step, n_head, n_head_kv, hd, \
                             rope_dim, style, n_ctx, scale, oq, od, os, part, n_split,        \
                             chunk_min);                                                      \
  }
ATTENTION(attention_32_4, 32, 4, 4)
ATTENTION(attention_8_4, 8, 4, 4)
ATTENTION(attention_32_1_256, 32, 1, 8)
ATTENTION(attention_8_2_256, 8, 2, 8)

// Combines the per-block partials of `attention` when a head's keys were split (else returns
// at once). Grid: n_head blocks of head_dim threads, rounded up to whole warps.
extern "C" __global__ void attention_merge(const float* __restrict__ part, float* out,
                                           const uint32_t* step, int hd, int n_split,
                                           int chunk_min, int8_t* oq, float* od, float* os) {
  pdl_entry();
  int chunk;
  const int splits = att_splits(step[1] + 1, n_split, chunk_min, chunk), h = blockIdx.x,
            t = threadIdx.x;
  if (splits == 1 || t >= hd) return; // whole warps when hd % 32 == 0
  const float* pp = part + (size_t)h * n_split * (hd + 2);
  float mm = -INFINITY;
  for (int c = 0; c < splits; ++c) mm = fmaxf(mm, pp[c * (hd + 2) + hd]);
  float ll = 0.f, o = 0.f;
  for (int c = 0; c < splits; ++c) {
    const float f = expf(pp[c * (hd + 2) + hd] - mm);
    ll += pp[c * (hd + 2) + hd + 1] * f;
    o += pp[c * (hd + 2) + t] * f;
  }
  o /= ll;
  out[(size_t)h * hd + t] = o;
  if (oq) warp_quantize(o, h * hd + t, oq, od, os);
}

// Greedy decoding on the device: the next token is the argmax of the step's logits, written into
// `step` with the position advanced (step[0] = id, step[1] += 1), so the next step's graph can be
// launched before the host has read this one's token. The host's `argmax` rules: the first of
// equal maxima wins, NaNs are passed over, a NaN at index 0 gives 0 (and so does a vocabulary of
// -inf only, whose first entry is the first maximum). One block of ARGMAX_THREADS threads.
#define ARGMAX_THREADS 1024
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
    argmax_next(const float* __restrict__ logits, int n, uint32_t* step) {
  pdl_entry();
  __shared__ float sm_m[ARGMAX_THREADS / WARP];
  __shared__ unsigned sm_i[ARGMAX_THREADS / WARP];
  float m = -INFINITY;
  unsigned mi = 0xFFFFFFFFu;
  // Each thread's candidates in increasing index order: a later one wins only if larger, or if
  // it is the first -inf seen (mi unset); NaN compares false everywhere.
  for (int i = threadIdx.x; i < n; i += ARGMAX_THREADS) {
    const float x = logits[i];
    if (x > m || (x == m && mi == 0xFFFFFFFFu)) m = x, mi = (unsigned)i;
  }
  // Reduce: the larger value, the lower index among equals.
#pragma unroll
  for (int o = WARP / 2; o > 0; o /= 2) {
    const float om = __shfl_xor_sync(0xFFFFFFFFu, m, o);
    const unsigned oi = __shfl_xor_sync(0xFFFFFFFFu, mi, o);
    if (om > m || (om == m && oi < mi)) m = om, mi = oi;
  }
  const int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
  if (lane == 0) sm_m[w] = m, sm_i[w] = mi;
  __syncthreads();
  if (w == 0) {
    m = lane < ARGMAX_THREADS / WARP ? sm_m[lane] : -INFINITY;
    mi = lane < ARGMAX_THREADS / WARP ? sm_i[lane] : 0xFFFFFFFFu;
#pragma unroll
    for (int o = WARP / 2; o > 0; o /= 2) {
      const float om = __shfl_xor_sync(0xFFFFFFFFu, m, o);
      const unsigned oi = __shfl_xor_sync(0xFFFFFFFFu, mi, o);
      if (om > m || (om == m && oi < mi)) m = om, mi = oi;
    }
    if (lane == 0) {
      const bool nan_first = n > 0 && isnan(logits[0]);
      step[0] = nan_first || mi == 0xFFFFFFFFu ? 0u : mi;
      step[1] += 1;
    }
  }
}

// Candidates for top-k sampling, picked where the logits are: every block of 64 logits
// (`64 b .. 64 b + 64`) whose maximum is at least the k-th largest block maximum — the blocks
// the host's sampler keeps before its heap (src/generate/sampling.rs), so they hold the k most
// likely tokens — in increasing b. out_ids[0] = how many (TOPK_FALLBACK if a logit is NaN or
// the vocabulary has more than TOPK_MAX_BLOCKS blocks: the host then takes all logits), then
// the first `cap` of their b; out_vals = those blocks' 64 logits each (-inf past n). Needs
// 1 <= k < the number of blocks. One block of TOPK_THREADS threads, launched after the step.
#define TOPK_THREADS 1024
#define TOPK_MAX_BLOCKS 8192
#define TOPK_MAX_CAP 512
#define TOPK_FALLBACK 0xFFFFFFFFu

// Float bits in an unsigned order that matches f32::total_cmp (NaN aside).
__device__ __forceinline__ unsigned ordered_key(float f) {
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    topk_blocks(const float* __restrict__ logits, int n, int k, int cap, uint32_t* out_ids,
                float* out_vals) {
  __shared__ unsigned key[TOPK_MAX_BLOCKS];
  __shared__ unsigned hist[256];
  __shared__ unsigned sm_ids[TOPK_MAX_CAP];
  __shared__ unsigned warp_tot[TOPK_THREADS / WARP];
  __shared__ unsigned sm_prefix, sm_k, sm_total;
  __shared__ int sm_nan;
  const int t = threadIdx.x, lane = t % WARP, w = t / WARP, nw = TOPK_THREADS / WARP;
  const int nb = (n + 63) / 64;
  if (nb > TOPK_MAX_BLOCKS) {
    if (t == 0) out_ids[0] = TOPK_FALLBACK;
    return;
  }
  if (t == 0) sm_nan = 0;
  __syncthreads();
  // 1. Each block's maximum (fmaxf passes NaNs over; any NaN sends the host to all logits).
  for (int b = w; b < nb; b += nw) {
    const int i0 = 64 * b + lane, i1 = i0 + 32;
    const float v0 = i0 < n ? logits[i0] : -INFINITY, v1 = i1 < n ? logits[i1] : -INFINITY;
    if (__any_sync(0xFFFFFFFFu, isnan(v0) || isnan(v1)) && lane == 0) sm_nan = 1;
    const float m = warp_max(fmaxf(v0, v1));
    if (lane == 0) key[b] = ordered_key(m);
  }
  if (t == 0) sm_prefix = 0, sm_k = (unsigned)k;
  __syncthreads();
  if (sm_nan) {
    if (t == 0) out_ids[0] = TOPK_FALLBACK;
    return;
  }
  // 2. The k-th largest key, 8 bits at a time from the top (a radix select).
  unsigned mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (t < 256) hist[t] = 0;
    __syncthreads();
    const unsigned prefix = sm_prefix;
    for (int b = t; b < nb; b += TOPK_THREADS)
      if ((key[b] & mask) == prefix) atomicAdd(&hist[(key[b] >> shift) & 255u], 1u);
    __syncthreads();
    if (w == 0) {
      // Lane l holds digits 255 - 8l down to 248 - 8l: counts of larger digits come first.
      unsigned c[8], s = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) c[j] = hist[255 - 8 * lane - j], s += c[j];
      unsigned incl = s;
#pragma unroll
      for (int o = 1; o < WARP; o *= 2) {
        const unsigned v = __shfl_up_sync(0xFFFFFFFFu, incl, o);
        if (lane >= o) incl += v;
      }
      const unsigned kk = sm_k, excl = incl - s;
      if (excl < kk && kk <= incl) {
        unsigned cum = excl;
        for (int j = 0; j < 8; ++j) {
          if (cum + c[j] >= kk) {
            sm_prefix = prefix | ((unsigned)(255 - 8 * lane - j) << shift);
            sm_k = kk - cum;
            break;
          }
          cum += c[j];
        }
      }
    }
    mask |= 255u << shift;
    __syncthreads();
  }
  const unsigned floor_key = sm_prefix;
  // 3. The kept blocks' ids in order: a contiguous run of blocks per thread, a block-wide scan.
  const int per = (nb + TOPK_THREADS - 1) / TOPK_THREADS, b0 = t * per,
            b1 = min(nb, b0 + per);
  unsigned mine = 0;
  for (int b = b0; b < b1; ++b) mine += key[b] >= floor_key;
  unsigned incl = mine;
#pragma unroll
  for (int o = 1; o < WARP; o *= 2) {
    const unsigned v = __shfl_up_sync(0xFFFFFFFFu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == WARP - 1) warp_tot[w] = incl;
  __syncthreads();
  if (w == 0) {
    unsigned v = warp_tot[lane], wi = v;
#pragma unroll
    for (int o = 1; o < WARP; o *= 2) {
      const unsigned u = __shfl_up_sync(0xFFFFFFFFu, wi, o);
      if (lane >= o) wi += u;
    }
    warp_tot[lane] = wi - v; // exclusive
    if (lane == WARP - 1) sm_total = wi;
  }
  __syncthreads();
  unsigned at = warp_tot[w] + incl - mine;
  for (int b = b0; b < b1; ++b)
    if (key[b] >= floor_key) {
      if (at < (unsigned)cap) sm_ids[at] = (unsigned)b, out_ids[1 + at] = (unsigned)b;
      ++at;
    }
  if (t == 0) out_ids[0] = sm_total;
  __syncthreads();
  // 4. Their logits.
  const unsigned kept = min(sm_total, (unsigned)cap);
  for (unsigned j = w; j < kept; j += nw) {
    const int base = 64 * (int)sm_ids[j];
    for (int i = lane; i < 64; i += WARP)
      out_vals[64 * j + i] = base + i < n ? logits[base + i] : -INFINITY;
  }
}
