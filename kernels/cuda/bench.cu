// Kernel micro-benchmark for decode.cu: every mat-vec shape of a Llama-3-8B decode step (each
// R/KS variant), its norm and attention, timed from CUDA graphs over weight copies that do not
// fit in L2 (and, `warm`, over one copy: from L2 where it fits, the kernel's own ceiling), and
// checked against simple reference kernels.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -o kbench kernels/cuda/bench.cu && ./kbench [pdl | att]
//
// `pdl`: kernels in chains of dependent launches, as in the decoder's graph (bench_pdl.cuh);
// `att`: the attention kernels only.
//
// (scripts/gpu.sh step `kbench` builds it here with the PyPI nvcc and runs it on the GPU.)
// Output: one line per (shape, kernel): µs per launch, weight GB/s, and max |Δ| / max |y|
// against a reference that dequantizes the weights and multiplies F32 activations (so the
// int8-activation kernels show their quantization error, ~4e-3).

#include "decode.cu"

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "bench_util.cuh"

// ---------------------------------------------------------------------------------------------
// References: one thread per output, weights dequantized element by element, F32 activations.

__global__ void ref_matvec(const uint8_t* w, int ty, const float* x, float* y, int rows,
                           int cols) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const uint8_t* row = w + (size_t)r * row_bytes(ty, cols);
  float acc = 0.f;
  for (int i = 0; i < cols; ++i)
    acc += (ty == T_Q4_K ? q4k_at(row, i) : ty == T_Q5_K ? q5k_at(row, i) : q6k_at(row, i)) * x[i];
  y[r] = acc;
}

// Softmax attention of head h over keys 0..n_kv-1, one thread per output element.
__global__ void ref_attention(const float* q, const float* kc, const float* vc, float* out,
                              int n_head, int n_head_kv, int hd, int n_ctx, int n_kv,
                              float scale) {
  const int h = blockIdx.x, d = threadIdx.x, kvh = h / (n_head / n_head_kv);
  if (d >= hd) return;
  const float* K = kc + (size_t)kvh * n_ctx * hd;
  const float* V = vc + (size_t)kvh * n_ctx * hd;
  float m = -INFINITY;
  for (int j = 0; j < n_kv; ++j) {
    float s = 0.f;
    for (int e = 0; e < hd; ++e) s += q[h * hd + e] * K[j * hd + e];
    m = fmaxf(m, s * scale);
  }
  float l = 0.f, o = 0.f;
  for (int j = 0; j < n_kv; ++j) {
    float s = 0.f;
    for (int e = 0; e < hd; ++e) s += q[h * hd + e] * K[j * hd + e];
    const float p = expf(s * scale - m);
    l += p;
    o += p * V[j * hd + d];
  }
  out[h * hd + d] = o / l;
}

// ---------------------------------------------------------------------------------------------
// Harness.

__global__ void fill_bytes(uint8_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = (uint8_t)h;
  }
}

// Sane f16 scales in every block of a quantized region: (offset, count) f16 fields per block.
__global__ void fix_scales(uint8_t* p, size_t n_blocks, int block_bytes, int off, int count,
                           float mag) {
  for (size_t b = blockIdx.x * (size_t)blockDim.x + threadIdx.x; b < n_blocks;
       b += (size_t)gridDim.x * blockDim.x) {
    for (int k = 0; k < count; ++k) {
      const float v = mag * (0.25f + (float)((b * 7 + k * 3) % 13) / 13.f);
      __half hv = __float2half(v);
      memcpy(p + b * block_bytes + off + 2 * k, &hv, 2);
    }
  }
}

struct Mat {
  int ty, rows, cols, copies;
  size_t bytes; // one copy
  uint8_t* p;
};

static int block_bytes_h(int ty) { return ty == T_Q4_K ? 144 : ty == T_Q5_K ? 176 : 210; }

static size_t row_bytes_h(int ty, int cols) { return (size_t)(cols / 256) * block_bytes_h(ty); }

static Mat make_mat(int ty, int rows, int cols, uint32_t seed) {
  Mat m{ty, rows, cols, 0, row_bytes_h(ty, cols) * rows, nullptr};
  m.copies = (int)std::max<size_t>(1, (400u << 20) / m.bytes);
  const size_t total = m.bytes * m.copies;
  CK(cudaMalloc(&m.p, total));
  fill_bytes<<<4096, 256>>>(m.p, total, seed);
  const int bb = block_bytes_h(ty);
  if (ty == T_Q4_K || ty == T_Q5_K)
    fix_scales<<<4096, 256>>>(m.p, total / bb, bb, 0, 2, 0.002f);
  else
    fix_scales<<<4096, 256>>>(m.p, total / bb, bb, 208, 1, 0.0005f);
  CK(cudaGetLastError());
  return m;
}

static float time_graph(const std::function<void(cudaStream_t, int)>& launch, int n) {
  cudaStream_t s;
  CK(cudaStreamCreate(&s));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < n; ++i) launch(s, i);
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  CK(cudaGraphLaunch(ge, s));
  CK(cudaStreamSynchronize(s));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  const int reps = 5;
  CK(cudaEventRecord(a, s));
  for (int r = 0; r < reps; ++r) CK(cudaGraphLaunch(ge, s));
  CK(cudaEventRecord(b, s));
  CK(cudaEventSynchronize(b));
  float ms;
  CK(cudaEventElapsedTime(&ms, a, b));
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  CK(cudaStreamDestroy(s));
  return ms * 1e3f / (reps * n);
}

static std::vector<float> download(const float* p, int n) {
  std::vector<float> v(n);
  CK(cudaMemcpy(v.data(), p, n * 4, cudaMemcpyDeviceToHost));
  return v;
}

static float rel_err(const std::vector<float>& a, const std::vector<float>& ref) {
  float md = 0.f, mr = 0.f;
  for (size_t i = 0; i < a.size(); ++i) {
    md = fmaxf(md, fabsf(a[i] - ref[i]));
    mr = fmaxf(mr, fabsf(ref[i]));
  }
  return mr > 0 ? md / mr : md;
}

struct Act { // activations: F32 and int8 copies
  float* x;
  int8_t* q;
  float *d, *s;
  int n;
  Q8x q8() const { return Q8x{q, d, s}; }
};

static Act make_act(int n) {
  Act a{};
  a.n = n;
  std::vector<float> h(n);
  uint32_t st = 12345;
  for (auto& v : h) {
    st = st * 1664525u + 1013904223u;
    v = ((st >> 8) / 16777216.f - 0.5f) * 4.f;
  }
  CK(cudaMalloc(&a.x, n * 4));
  CK(cudaMalloc(&a.q, n));
  CK(cudaMalloc(&a.d, n / 8));
  CK(cudaMalloc(&a.s, n / 8));
  CK(cudaMemcpy(a.x, h.data(), n * 4, cudaMemcpyHostToDevice));
  quantize_q8<<<(n + 255) / 256, 256>>>(a.x, a.q, a.d, a.s, n);
  CK(cudaGetLastError());
  return a;
}

static void report(const char* shape, const char* variant, float us, double bytes, float err) {
  printf("%-34s %-26s %8.2f us %7.0f GB/s  err %.2e\n", shape, variant, us, bytes / us * 1e-3,
         err);
  fflush(stdout);
}


// Launches k as a programmatic dependent launch, as the decoder's graph does.
template <typename... Exp, typename... Act>
static void pdl(void (*k)(Exp...), dim3 g, dim3 b, size_t smem, cudaStream_t s, Act&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = g;
  cfg.blockDim = b;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = at;
  cfg.numAttrs = 1;
  CK(cudaLaunchKernelEx(&cfg, k, std::forward<Act>(args)...));
}

static float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = 0.f;
  for (size_t i = 0; i < a.size(); ++i) m = fmaxf(m, fabsf(a[i] - b[i]));
  return m;
}

typedef void (*NormKernel)(const uint8_t*, const float*, const int8_t*, const float*,
                           const float*, float*, int, const float*, const float*, int8_t*,
                           float*, float*, float*);

// A norm producer's outputs over `rows` (the int8 copy of y ⊙ w, its scales, Σ y² per block),
// w a copy of the first `rows` values of `w_src` (n_src of them).
struct NormOut {
  float *w, *d, *s, *part;
  int8_t* q;
};

static NormOut make_norm_out(int rows, const float* w_src, int n_src) {
  NormOut o{};
  CK(cudaMalloc(&o.w, rows * 4));
  CK(cudaMalloc(&o.d, rows / 8));
  CK(cudaMalloc(&o.s, rows / 8));
  CK(cudaMalloc(&o.part, rows / 8));
  CK(cudaMalloc(&o.q, rows));
  CK(cudaMemcpy(o.w, w_src, std::min(rows, n_src) * 4, cudaMemcpyDeviceToDevice));
  return o;
}

// The decoder's norm producer for rows of type ty.
static NormKernel norm_kernel(int ty) {
  return ty == T_Q4_K ? matvec_norm_q4_k : ty == T_Q5_K ? matvec_norm_q5_k : matvec_norm_q6_k;
}


// Shapes the decoder does not launch, for comparison (decode.cu instantiates 1/2 × 1/2, U 1).
template <int R, int KS, int U = 1>
__global__ void __launch_bounds__(WARP * MV_WARPS) matvec_x(MV_ARGS) {
  matvec_t<R, KS, U>(w, ty, x, Q8x{xq, xd, xs}, y, rows, cols, bias, res, nin);
}

template <int U>
__global__ void __launch_bounds__(WARP * MV_WARPS)
    swiglu_x(const float* __restrict__ x, const int8_t* xq, const float* xd, const float* xs,
             int cols, const uint8_t* __restrict__ wg, int tg, const uint8_t* __restrict__ wu,
             int tu, float* __restrict__ out, int rows, NormIn nin) {
  swiglu_row<U>(x, Q8x{xq, xd, xs}, cols, wg, tg, wu, tu, out, rows, nin);
}

typedef void (*MvKernel)(const uint8_t*, int, const float*, const int8_t*, const float*,
                         const float*, float*, int, int, const float*, const float*, NormIn);

// The decoder's row-pair kernel for rows of type ty.
static MvKernel matvec_2_1_for(int ty) {
  return ty == T_Q4_K ? matvec_2_1_q4_k : ty == T_Q5_K ? matvec_2_1_q5_k : matvec_2_1_q6_k;
}

static void bench_matvec(const char* shape, int ty, int rows, int cols, uint32_t seed) {
  Mat m = make_mat(ty, rows, cols, seed);
  Act a = make_act(cols);
  float *y, *yr;
  CK(cudaMalloc(&y, rows * 4));
  CK(cudaMalloc(&yr, rows * 4));
  const int n = std::max(8, std::min(64, 2 * m.copies));
  ref_matvec<<<(rows + 127) / 128, 128>>>(m.p, ty, a.x, yr, rows, cols);
  CK(cudaDeviceSynchronize());
  const auto r = download(yr, rows);
  struct V {
    const char* name;
    MvKernel k;
    int rows_per_block;
  };
  // `warm`: the same copy every launch (in L2 where it fits: the kernel's own ceiling).
  const V vs[] = {{"matvec_1_1", matvec_1_1, MV_WARPS},
                  {"matvec_1_2", matvec_1_2, MV_WARPS / 2},
                  {"matvec_2_1_<type>", matvec_2_1_for(ty), 2 * MV_WARPS},
                  {"matvec_2_2", matvec_2_2, MV_WARPS},
                  {"(matvec_2_4)", matvec_x<2, 4>, MV_WARPS / 2},
                  {"(matvec_4_2)", matvec_x<4, 2>, 2 * MV_WARPS},
                  {"(matvec_4_4)", matvec_x<4, 4>, MV_WARPS},
                  {"(matvec_2_1 any type)", matvec_x<2, 1, 1>, 2 * MV_WARPS},
                  {"(matvec_2_1 any type, unroll 2)", matvec_x<2, 1, 2>, 2 * MV_WARPS},
                  {"(matvec_2_1 any type, unroll 4)", matvec_x<2, 1, 4>, 2 * MV_WARPS},
                  {"(matvec_1_2 unroll 2)", matvec_x<1, 2, 2>, MV_WARPS / 2}};
  for (const V& v : vs) {
    for (int warm = 0; warm < 2; ++warm) {
      if (warm && v.name[0] == '(') continue;
      auto f = [&](cudaStream_t s, int i) {
        v.k<<<(rows + v.rows_per_block - 1) / v.rows_per_block, dim3(32, MV_WARPS), 0, s>>>(
            m.p + (warm ? 0 : (i % m.copies) * m.bytes), ty, a.x, a.q, a.d, a.s, y, rows, cols,
            nullptr, nullptr, NormIn{});
      };
      CK(cudaMemset(y, 0, rows * 4));
      f(0, 0);
      CK(cudaDeviceSynchronize());
      CK(cudaGetLastError());
      const float e = rel_err(download(y, rows), r);
      const std::string name = std::string(v.name) + (warm ? " warm" : "");
      report(shape, name.c_str(), time_graph(f, n), m.bytes, e);
    }
  }
  if (rows % 32 == 0 && rows <= 8192) {
    // The norm's producer: the same product, then the int8 copy of y ⊙ w and Σ y² per block
    // (err: y against the reference, as above).
    const NormOut o = make_norm_out(rows, a.x, cols);
    auto f = [&](cudaStream_t s, int i) {
      norm_kernel(ty)<<<rows / 32, dim3(32, NORM_WARPS), 0, s>>>(
          m.p + (i % m.copies) * m.bytes, a.x, a.q, a.d, a.s, y, cols, nullptr, o.w, o.q, o.d,
          o.s, o.part);
    };
    CK(cudaMemset(y, 0, rows * 4));
    f(0, 0);
    CK(cudaDeviceSynchronize());
    CK(cudaGetLastError());
    const float e = rel_err(download(y, rows), r);
    report(shape, "matvec_norm", time_graph(f, n), m.bytes, e);
  }
  CK(cudaFree(m.p));
  CK(cudaFree(y));
  CK(cudaFree(yr));
}

__global__ void silu_mul(const float* g, const float* u, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

static void bench_swiglu(const char* what, int ty, int rows, int cols) {
  Mat g = make_mat(ty, rows, cols, 7), u = make_mat(ty, rows, cols, 8);
  Act a = make_act(cols);
  float *y, *yg, *yu, *yr;
  CK(cudaMalloc(&y, rows * 4));
  CK(cudaMalloc(&yg, rows * 4));
  CK(cudaMalloc(&yu, rows * 4));
  CK(cudaMalloc(&yr, rows * 4));
  ref_matvec<<<(rows + 127) / 128, 128>>>(g.p, ty, a.x, yg, rows, cols);
  ref_matvec<<<(rows + 127) / 128, 128>>>(u.p, ty, a.x, yu, rows, cols);
  silu_mul<<<(rows + 255) / 256, 256>>>(yg, yu, yr, rows);
  CK(cudaDeviceSynchronize());
  const auto r = download(yr, rows);
  const int n = std::max(8, std::min(64, 2 * g.copies));
  typedef void (*SwKernel)(const float*, const int8_t*, const float*, const float*, int,
                           const uint8_t*, int, const uint8_t*, int, float*, int, NormIn);
  const std::pair<const char*, SwKernel> ks[] = {{"matvec_swiglu", matvec_swiglu},
                                                 {"(swiglu unroll 2)", swiglu_x<2>}};
  for (const auto& nk : ks) {
    const char* name = nk.first;
    const SwKernel k = nk.second;
    auto f = [&](cudaStream_t s, int i) {
      const size_t o = (i % g.copies) * g.bytes;
      k<<<(rows + MV_WARPS - 1) / MV_WARPS, dim3(32, MV_WARPS), 0, s>>>(
          a.x, a.q, a.d, a.s, cols, g.p + o, ty, u.p + o, ty, y, rows, NormIn{});
    };
    f(0, 0);
    CK(cudaDeviceSynchronize());
    CK(cudaGetLastError());
    report(what, name, time_graph(f, n), 2.0 * g.bytes, rel_err(download(y, rows), r));
  }
  CK(cudaFree(g.p));
  CK(cudaFree(u.p));
}

typedef void (*AttKernel)(const float*, const float*, const float*, float*, float*, float*,
                          const float*, const float*, const uint32_t*, int, int, int, int, int,
                          int, float, int8_t*, float*, float*, float*, int, int);

static void bench_attention(int n_kv, int n_split, const char* kname, AttKernel kern, int warps,
                            int chunk_min, bool dependent = false, int hd = 128) {
  const int nh = 32, nkv = 8, n_ctx = 4096;
  Act q = make_act(nh * hd), kc = make_act(nkv * n_ctx * hd), vc = make_act(nkv * n_ctx * hd);
  float *o, *orf, *od, *os, *part;
  int8_t* oq;
  uint32_t* step;
  CK(cudaMalloc(&o, nh * hd * 4));
  CK(cudaMalloc(&orf, nh * hd * 4));
  CK(cudaMalloc(&oq, nh * hd));
  CK(cudaMalloc(&od, nh * hd / 8));
  CK(cudaMalloc(&os, nh * hd / 8));
  CK(cudaMalloc(&part, nh * n_split * (hd + 2) * 4));
  CK(cudaMalloc(&step, 8));
  const uint32_t st[2] = {0, (uint32_t)(n_kv - 1)};
  CK(cudaMemcpy(step, st, 8, cudaMemcpyHostToDevice));
  const float scale = 1.f / sqrtf((float)hd);
  ref_attention<<<nh, hd>>>(q.x, kc.x, vc.x, orf, nh, nkv, hd, n_ctx, n_kv, scale);
  // This token's k, v (rows n_kv - 1 of the caches) and an identity rotation: the kernel
  // rewrites those cache rows with the same values.
  float *k, *v, *cs, *sn;
  CK(cudaMalloc(&k, nkv * hd * 4));
  CK(cudaMalloc(&v, nkv * hd * 4));
  CK(cudaMalloc(&cs, n_ctx * hd / 2 * 4));
  CK(cudaMalloc(&sn, n_ctx * hd / 2 * 4));
  const std::vector<float> ones(n_ctx * hd / 2, 1.f);
  CK(cudaMemcpy(cs, ones.data(), ones.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(sn, 0, n_ctx * hd / 2 * 4));
  CK(cudaMemcpy2D(k, hd * 4, kc.x + (size_t)(n_kv - 1) * hd, (size_t)n_ctx * hd * 4, hd * 4, nkv,
                  cudaMemcpyDeviceToDevice));
  CK(cudaMemcpy2D(v, hd * 4, vc.x + (size_t)(n_kv - 1) * hd, (size_t)n_ctx * hd * 4, hd * 4, nkv,
                  cudaMemcpyDeviceToDevice));
  auto f = [&](cudaStream_t s, int) {
    if (dependent)
      pdl(kern, dim3(nh, n_split), dim3(32, warps), 0, s, q.x, k, v, kc.x, vc.x, o, cs, sn, step,
          nh, nkv, hd, hd, 1, n_ctx, scale, oq, od, os, part, n_split, chunk_min);
    else
      kern<<<dim3(nh, n_split), dim3(32, warps), 0, s>>>(q.x, k, v, kc.x, vc.x, o, cs, sn, step,
                                                          nh, nkv, hd, hd, 1, n_ctx, scale, oq,
                                                          od, os, part, n_split, chunk_min);
    if (n_split > 1)
      attention_merge<<<nh, hd, 0, s>>>(part, o, step, hd, n_split, chunk_min, oq, od, os);
  };
  f(0, 0);
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  const std::string shape =
      "attention 32/8 x " + std::to_string(hd) + ", n_kv " + std::to_string(n_kv);
  const std::string name = std::string(kname) + " split " + std::to_string(n_split) +
                           " chunk " + std::to_string(chunk_min);
  report(shape.c_str(), name.c_str(), time_graph(f, 64), 0,
         rel_err(download(o, nh * hd), download(orf, nh * hd)));
}

static void bench_norm(int n) {
  Act a = make_act(n);
  float *w, *o, *d, *s, *d2, *s2;
  int8_t *q, *q2;
  CK(cudaMalloc(&w, n * 4));
  CK(cudaMalloc(&o, n * 4));
  CK(cudaMemcpy(w, a.x, n * 4, cudaMemcpyDeviceToDevice));
  CK(cudaMalloc(&q, n));
  CK(cudaMalloc(&q2, n));
  CK(cudaMalloc(&d, n));
  CK(cudaMalloc(&s, n));
  CK(cudaMalloc(&d2, n));
  CK(cudaMalloc(&s2, n));
  auto one = [&](cudaStream_t st, int) { rms_norm<<<1, 1024, 0, st>>>(a.x, w, o, n, 1e-5f, q, d, s); };
  auto four = [&](cudaStream_t st, int) { rms_norm4<<<1, std::min(1024, n / 4), 0, st>>>(a.x, w, o, n, 1e-5f, q2, d2, s2); };
  one(0, 0);
  four(0, 0);
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  std::vector<int8_t> h1(n), h2(n);
  CK(cudaMemcpy(h1.data(), q, n, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(h2.data(), q2, n, cudaMemcpyDeviceToHost));
  int diff = 0;
  for (int i = 0; i < n; ++i) diff += h1[i] != h2[i];
  report("rms_norm [4096]", "rms_norm", time_graph(one, 64), 0, 0.f);
  report("rms_norm [4096]", "rms_norm4 (err: vs rms_norm)", time_graph(four, 64), 0,
         rel_err(download(s2, n / 32), download(s, n / 32)) + diff);
}

#include "bench_pdl.cuh"

// An empty kernel: the floor of one launch in a graph.
__global__ void nothing() {}

int main(int argc, char** argv) {
  cudaDeviceProp p;
  CK(cudaGetDeviceProperties(&p, 0));
  printf("%s, %d SMs, L2 %d MiB\n", p.name, p.multiProcessorCount, p.l2CacheSize >> 20);
  if (argc > 1 && std::string(argv[1]) == "pdl") {
    bench_pdl();
    return 0;
  }
  const bool att_only = argc > 1 && std::string(argv[1]) == "att"; // `kbench att`: attention only
  if (!att_only) {
    report("empty kernel", "<<<1, 32>>>",
           time_graph([](cudaStream_t s, int) { nothing<<<1, 32, 0, s>>>(); }, 64), 0, 0.f);
    bench_norm(4096);
  }
  // The decoder's two shapes (kernels/src/cuda/decoder.rs, AttShape) at n_ctx 4096, and the
  // single-block kernel for comparison.
  for (int n_kv : {9, 128, 300, 512, 513, 1024, 4096}) {
    bench_attention(n_kv, 1, "attention_32_4", attention_32_4, 32, 4096);
    if (n_kv <= 512)
      bench_attention(n_kv, 2, "attention_32_4", attention_32_4, 32, 256);
    else
      bench_attention(n_kv, 16, "attention_8_4", attention_8_4, 8, 64);
  }
  if (att_only) return 0;
  bench_swiglu("swiglu Q4_K [14336, 4096] x2", T_Q4_K, 14336, 4096);
  // Mixtral-8x7B Q5_K_M's experts (gate and up Q5_K; down Q5_K or Q6_K).
  bench_swiglu("swiglu Q5_K [14336, 4096] x2", T_Q5_K, 14336, 4096);
  bench_matvec("Q5_K [4096, 14336] (expert down)", T_Q5_K, 4096, 14336, 7);
  bench_matvec("Q6_K [4096, 14336] (down)", T_Q6_K, 4096, 14336, 1);
  bench_matvec("Q4_K [4096, 14336] (down)", T_Q4_K, 4096, 14336, 2);
  bench_matvec("Q4_K [6144, 4096] (qkv)", T_Q4_K, 6144, 4096, 3);
  bench_matvec("Q4_K [4096, 4096] (o)", T_Q4_K, 4096, 4096, 4);
  bench_matvec("Q6_K [1024, 4096] (v)", T_Q6_K, 1024, 4096, 5);
  bench_matvec("Q6_K [128256, 4096] (output)", T_Q6_K, 128256, 4096, 6);
  return 0;
}
