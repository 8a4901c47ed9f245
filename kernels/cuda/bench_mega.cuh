// `kbench mega`: a prototype, measured slower than the chain it would replace and not in the
// decoder (docs/cuda.md, stop 20). One persistent kernel for every dense layer of
// a decode step (Llama-3-8B's shapes, every matrix Q4_K), against the decoder's chain of 5
// dependent launches a layer over the same weights.
//
// Why: in the chain each kernel's weights are requested only after its dependency wait, so the
// memory idles while a kernel fills and drains and while attention runs (docs/cuda.md: the
// layer takes 50.5 µs where its 131 MB need 31 at the measured bandwidth). Here one block per
// SM (32 warps) runs every phase of every layer, with grid barriers between phases. Each warp
// walks one stream of weight runs (8 super-blocks, 1152 bytes) across all phases and layers,
// copied by cp.async into a ring of ST slots of its own: the copies for the next phase go out
// before the barrier that its inputs wait for, so the memory never waits for a barrier.
//
// Phases of a layer (each block's activations quantized into its shared memory after the
// barrier, read through L2): q/k/v over the attention norm (each block computes Σx² itself),
// attention (blocks < n_head: the decoder's own attention_t), o (+ residual), gate/up over the
// FFN norm (silu(g)·u), down (+ residual).

#pragma once

#define MG_RUN 1152 // one run: 8 Q4_K super-blocks (2048 columns)

struct MgLayer {
  const uint8_t *wq, *wk, *wv, *wo, *wg, *wu, *wd;
};

struct MgArgs {
  const MgLayer* layers;
  int n_layer;
  float *x, *q, *k, *v, *att, *h;
  float *kc, *vc;
  const float *cs, *sn;
  const uint32_t* step;
  const float *wn_att, *wn_ffn;
  unsigned* bar;
  unsigned long long* ts; // [n_layer · 5]: block 0's clock after each barrier (null: none)
  int d, ff, nh, nkv, hd, n_ctx;
  float scale, eps;
};

// Every block arrives, then waits for all gridDim.x of them (`epoch`: the count to wait for,
// growing by gridDim.x each barrier; the counter is zeroed before the launch). Block 0 writes
// the time it left barrier i to ts[i].
// BV (bench variants): 0 as described; 2: no fences (timing only: nothing orders the writes).
template <int BV = 0>
__device__ __forceinline__ void mg_barrier(unsigned* bar, unsigned& epoch,
                                           unsigned long long* ts) {
  epoch += gridDim.x;
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    if (BV != 2) __threadfence();
    atomicAdd(bar, 1u);
    unsigned v;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
    } while (v < epoch);
    if (BV != 2) __threadfence();
    if (ts && blockIdx.x == 0) {
      unsigned long long t;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      ts[epoch / gridDim.x - 1] = t;
    }
  }
  __syncthreads();
}

// x [cols] (⊙ w where given) into shared memory as Q8x (quantize_to_smem's layout and values),
// read through L2 (other blocks wrote it since this one last read it). Returns the block's Σ x²
// (of x itself) in every thread.
__device__ float mg_quantize(const float* x, const float* w, int cols, int8_t* smem,
                             float* red) {
  int8_t* sq = smem;
  float* sd = reinterpret_cast<float*>(smem + cols / 64 * (64 + QIN_PAD));
  float* ss = sd + cols / 32;
  const float4* x4 = reinterpret_cast<const float4*>(x);
  const float4* w4 = reinterpret_cast<const float4*>(w);
  const int lane = threadIdx.x;
  float sq_sum = 0.f;
  for (int i = threadIdx.y * WARP + lane; i < cols / 8; i += blockDim.y * WARP) {
    float4 a = __ldcg(x4 + 2 * i), b = __ldcg(x4 + 2 * i + 1);
    sq_sum += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w + b.x * b.x + b.y * b.y +
              b.z * b.z + b.w * b.w;
    if (w) {
      const float4 wa = w4[2 * i], wb = w4[2 * i + 1];
      a = make_float4(a.x * wa.x, a.y * wa.y, a.z * wa.z, a.w * wa.w);
      b = make_float4(b.x * wb.x, b.y * wb.y, b.z * wb.z, b.w * wb.w);
    }
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
    const uint2 pk =
        make_uint2(__byte_perm(__byte_perm(q0, q1, 0x40), __byte_perm(q2, q3, 0x40), 0x5410),
                   __byte_perm(__byte_perm(q4, q5, 0x40), __byte_perm(q6, q7, 0x40), 0x5410));
    *reinterpret_cast<uint2*>(sq + e / 64 * (64 + QIN_PAD) + e % 64) = pk;
    if ((lane & 3) == 0) {
      sd[e / 32] = dq;
      ss[e / 32] = dq * sum;
    }
  }
  const float s = warp_sum(sq_sum);
  if (lane == 0) red[threadIdx.y] = s;
  __syncthreads();
  float tot = 0.f;
  for (int i = 0; i < WARP; ++i) tot += red[i];
  __syncthreads();
  return tot;
}

// mg_quantize's copy of `cols` values, as Q8x.
__device__ __forceinline__ Q8x mg_q8(const int8_t* smem, int cols) {
  const float* d = reinterpret_cast<const float*>(smem + cols / 64 * (64 + QIN_PAD));
  return Q8x{smem, d, d + cols / 32};
}

// A warp's runs: item i of phase ph (0 q/k/v, 2 o, 3 gate/up, 4 down; 1 attention has none)
// is row gw + i · nw, all its runs (gate/up: a run of gate, then of up, per 2048 columns). The
// producer walks them from a table of this warp's rows for its current layer (MgSeg, in shared
// memory: ≤ 2 + 1 + 4 + 1 of them here), rebuilt when it enters the next layer, so a copy costs
// a few instructions. (A first version worked out each run's address from its phase, item and
// run: 55.6 µs a layer; this one 58.7. Both lose to the chain's 45.7: docs/cuda.md.)
#define MG_SEGS 8

struct MgSeg {
  const uint8_t *p0, *p1; // p1: the second matrix of an interleaved pair (gate/up), else null
  int n;                  // runs
};

__device__ __forceinline__ int mg_rows(const MgArgs& a, int ph) {
  return ph == 0 ? a.d + 2 * a.nkv * a.hd : ph == 1 ? 0 : ph == 3 ? a.ff : a.d;
}

// This warp's rows of layer l, in the order the consumer walks them; returns how many.
__device__ __forceinline__ int mg_table(const MgArgs& a, int l, MgSeg* t) {
  const MgLayer& L = a.layers[l];
  const int gw = blockIdx.x * 32 + threadIdx.y, nw = gridDim.x * 32;
  const size_t rb = (size_t)(a.d / 256) * 144, rbf = (size_t)(a.ff / 256) * 144;
  const int nq = a.d, nk = a.nkv * a.hd, runs_d = a.d / 2048;
  int n = 0;
  for (int r = gw; r < mg_rows(a, 0); r += nw)
    t[n++] = {r < nq ? L.wq + r * rb : r < nq + nk ? L.wk + (r - nq) * rb : L.wv + (r - nq - nk) * rb,
              nullptr, runs_d};
  for (int r = gw; r < a.d; r += nw) t[n++] = {L.wo + r * rb, nullptr, runs_d};
  for (int r = gw; r < a.ff; r += nw) t[n++] = {L.wg + r * rb, L.wu + r * rb, 2 * runs_d};
  for (int r = gw; r < a.d; r += nw) t[n++] = {L.wd + r * rbf, nullptr, a.ff / 2048};
  return n;
}

template <int ST>
struct MgRing {
  uint8_t* base; // this warp's ST slots
  MgSeg* seg;    // this warp's table (MG_SEGS)
  int issued, used;
  int layer, n_seg, si, k; // the producer: its layer, the table's size, row si, run k of it

  __device__ __forceinline__ void start(const MgArgs& a) {
    layer = 0;
    si = k = 0;
    n_seg = mg_table(a, 0, seg);
    __syncwarp();
  }
  // Copies the producer's next run into its slot (an empty group past the last).
  __device__ __forceinline__ void issue(const MgArgs& a) {
    if (layer < a.n_layer) {
      const MgSeg s = seg[si];
      const uint8_t* src = s.p1 ? ((k & 1) ? s.p1 : s.p0) + (k >> 1) * MG_RUN : s.p0 + k * MG_RUN;
      uint8_t* dst = base + (issued % ST) * MG_RUN;
      for (int j = threadIdx.x; j < MG_RUN / 16; j += WARP) cp_async16(dst + 16 * j, src + 16 * j);
      if (++k == s.n) {
        k = 0;
        if (++si == n_seg) {
          si = 0;
          __syncwarp();
          if (++layer < a.n_layer) n_seg = mg_table(a, layer, seg);
          __syncwarp();
        }
      }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    ++issued;
  }
  // The next run the consumer walks (in the producer's order), once it has landed; the caller
  // __syncwarp()s after reading it.
  __device__ __forceinline__ const uint8_t* next(const MgArgs& a) {
    issue(a);
    asm volatile("cp.async.wait_group %0;" ::"n"(ST - 1) : "memory");
    __syncwarp();
    return base + (used++ % ST) * MG_RUN;
  }
};

// One phase's products (not attention): this warp's rows against the activations xq;
// `out(row, g, u)` gets each row's totals (u: gate/up's up, else 0). Lane 0 calls it.
template <int ST, typename Out>
__device__ __forceinline__ void mg_phase(const MgArgs& a, MgRing<ST>& ring, int ph,
                                         const Q8x& xq, Out out) {
  const int lane = threadIdx.x, c4 = lane & 3, sb = lane >> 2;
  const int gw = blockIdx.x * 32 + threadIdx.y, nw = gridDim.x * 32;
  const int n_col = (ph == 4 ? a.ff : a.d) / 2048;
  for (int row = gw; row < mg_rows(a, ph); row += nw) {
    float g = 0.f, u = 0.f;
    for (int j = 0; j < n_col; ++j) {
      const QKx qx = qk_lane_x<QIN_PAD>(xq, 8 * j + sb, c4);
      qk_lane_add<false>(ring.next(a) + sb * 144, qx, c4, g);
      __syncwarp();
      if (ph == 3) {
        qk_lane_add<false>(ring.next(a) + sb * 144, qx, c4, u);
        __syncwarp();
      }
    }
    g = warp_sum(g);
    if (ph == 3) u = warp_sum(u);
    if (lane == 0) out(row, g, u);
  }
}

template <int ST, int BV = 0>
__global__ void __launch_bounds__(WARP * 32, 1) mega_layers(MgArgs a) {
  extern __shared__ __align__(16) uint8_t mg_smem[];
  __shared__ float red[WARP];
  __shared__ MgSeg segs[32][MG_SEGS];
  int8_t* xs = reinterpret_cast<int8_t*>(mg_smem);
  const int wid = threadIdx.y;
  MgRing<ST> ring{mg_smem + qin_smem_bytes(a.ff) + wid * ST * MG_RUN, segs[wid], 0, 0};
  ring.start(a);
  for (int i = 0; i < ST - 1; ++i) ring.issue(a);
  unsigned epoch = 0;
  const int nq = a.d, nk = a.nkv * a.hd;
  for (int l = 0; l < a.n_layer; ++l) {
    // q, k, v = W (x ⊙ w_att) / rms(x)
    float sc = rsqrtf(mg_quantize(a.x, a.wn_att, a.d, xs, red) / a.d + a.eps);
    const Q8x xq = mg_q8(xs, a.d);
    mg_phase(a, ring, 0, xq, [&](int r, float t, float) {
      (r < nq ? a.q + r : r < nq + nk ? a.k + r - nq : a.v + r - nq - nk)[0] = t * sc;
    });
    mg_barrier<BV>(a.bar, epoch, a.ts);
    if (blockIdx.x < a.nh)
      attention_t<32, 4, 4>(a.q, a.k, a.v, a.kc, a.vc, a.att, a.cs, a.sn, a.step, a.nh, a.nkv,
                            a.hd, a.hd, 1, a.n_ctx, a.scale, nullptr, nullptr, nullptr, nullptr,
                            1, 256);
    mg_barrier<BV>(a.bar, epoch, a.ts);
    // x += W_o att
    mg_quantize(a.att, nullptr, a.d, xs, red);
    mg_phase(a, ring, 2, xq, [&](int r, float t, float) { a.x[r] = __ldcg(a.x + r) + t; });
    mg_barrier<BV>(a.bar, epoch, a.ts);
    // h = silu(W_g xn) · (W_u xn), xn = x ⊙ w_ffn / rms(x)
    sc = rsqrtf(mg_quantize(a.x, a.wn_ffn, a.d, xs, red) / a.d + a.eps);
    mg_phase(a, ring, 3, xq, [&](int r, float g, float u) {
      g *= sc;
      u *= sc;
      a.h[r] = g / (1.f + expf(-g)) * u;
    });
    mg_barrier<BV>(a.bar, epoch, a.ts);
    // x += W_d h
    mg_quantize(a.h, nullptr, a.ff, xs, red);
    mg_phase(a, ring, 4, mg_q8(xs, a.ff), [&](int r, float t, float) { a.x[r] = __ldcg(a.x + r) + t; });
    mg_barrier<BV>(a.bar, epoch, a.ts);
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
}

__host__ constexpr int mg_smem_bytes(int ff, int st) { return qin_smem_bytes(ff) + 32 * st * MG_RUN; }

__global__ void ref_rms_norm(const float* x, const float* w, float* y, int n, float eps) {
  __shared__ float part[32];
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i] * x[i];
  s = warp_sum(s);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  float t = 0.f;
  for (int i = 0; i < (int)blockDim.x / 32; ++i) t += part[i];
  const float r = rsqrtf(t / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = x[i] * r * w[i];
}

__global__ void add_to(float* x, const float* t, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] += t[i];
}

static void bench_mega() {
  const int d = 4096, ff = 14336, nh = 32, nkv = 8, hd = 128, n_ctx = 256, n_layer = 32;
  const int nk = nkv * hd;
  const float eps = 1e-5f, scale = 1.f / sqrtf((float)hd);
  Mat wq = make_mat(T_Q4_K, d, d, 21), wk = make_mat(T_Q4_K, nk, d, 22),
      wv = make_mat(T_Q4_K, nk, d, 23), wo = make_mat(T_Q4_K, d, d, 24),
      wg = make_mat(T_Q4_K, ff, d, 25), wu = make_mat(T_Q4_K, ff, d, 26),
      wd = make_mat(T_Q4_K, d, ff, 27);
  auto at = [](const Mat& m, int i) { return m.p + (i % m.copies) * m.bytes; };
  Act x0 = make_act(d), wna = make_act(d), wnf = make_act(d);
  Act kc = make_act(nkv * n_ctx * hd), vc = make_act(nkv * n_ctx * hd);
  float *x, *q, *k, *v, *att, *h, *cs, *sn, *t, *g, *u, *xn, *part;
  for (float** p : {&x, &q, &k, &v, &att, &t, &xn}) CK(cudaMalloc(p, d * 4));
  for (float** p : {&h, &g, &u}) CK(cudaMalloc(p, ff * 4));
  CK(cudaMalloc(&part, nh * (hd + 2) * 4));
  CK(cudaMalloc(&cs, n_ctx * hd / 2 * 4));
  CK(cudaMalloc(&sn, n_ctx * hd / 2 * 4));
  const std::vector<float> ones(n_ctx * hd / 2, 1.f);
  CK(cudaMemcpy(cs, ones.data(), ones.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(sn, 0, n_ctx * hd / 2 * 4));
  uint32_t* step;
  unsigned* bar;
  CK(cudaMalloc(&step, 8));
  CK(cudaMalloc(&bar, 4));
  const uint32_t st[2] = {0, 63};
  CK(cudaMemcpy(step, st, 8, cudaMemcpyHostToDevice));
  std::vector<MgLayer> hl(n_layer);
  for (int i = 0; i < n_layer; ++i)
    hl[i] = {at(wq, i), at(wk, i), at(wv, i), at(wo, i), at(wg, i), at(wu, i), at(wd, i)};
  MgLayer* dl;
  CK(cudaMalloc(&dl, n_layer * sizeof(MgLayer)));
  CK(cudaMemcpy(dl, hl.data(), n_layer * sizeof(MgLayer), cudaMemcpyHostToDevice));
  std::vector<MgLayer> same(2, hl[0]);
  MgLayer* dl0;
  CK(cudaMalloc(&dl0, 2 * sizeof(MgLayer)));
  CK(cudaMemcpy(dl0, same.data(), 2 * sizeof(MgLayer), cudaMemcpyHostToDevice));

  // The reference: two layers (copy 0's weights both times) in F32, element by element.
  CK(cudaMemcpy(x, x0.x, d * 4, cudaMemcpyDeviceToDevice));
  for (int l = 0; l < 2; ++l) {
    ref_rms_norm<<<1, 1024>>>(x, wna.x, xn, d, eps);
    ref_matvec<<<d / 128, 128>>>(wq.p, T_Q4_K, xn, q, d, d);
    ref_matvec<<<nk / 128, 128>>>(wk.p, T_Q4_K, xn, k, nk, d);
    ref_matvec<<<nk / 128, 128>>>(wv.p, T_Q4_K, xn, v, nk, d);
    attention_32_4<<<dim3(nh, 1), dim3(32, 32)>>>(q, k, v, kc.x, vc.x, att, cs, sn, step, nh,
                                                   nkv, hd, hd, 1, n_ctx, scale, nullptr,
                                                   nullptr, nullptr, part, 1, 256);
    ref_matvec<<<d / 128, 128>>>(wo.p, T_Q4_K, att, t, d, d);
    add_to<<<d / 256, 256>>>(x, t, d);
    ref_rms_norm<<<1, 1024>>>(x, wnf.x, xn, d, eps);
    ref_matvec<<<ff / 128, 128>>>(wg.p, T_Q4_K, xn, g, ff, d);
    ref_matvec<<<ff / 128, 128>>>(wu.p, T_Q4_K, xn, u, ff, d);
    silu_mul<<<ff / 256, 256>>>(g, u, h, ff);
    ref_matvec<<<d / 128, 128>>>(wd.p, T_Q4_K, h, t, d, ff);
    add_to<<<d / 256, 256>>>(x, t, d);
  }
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  const auto x_ref = download(x, d), h_ref = download(h, ff);

  int n_sm;
  CK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, 0));
  unsigned long long* ts;
  CK(cudaMalloc(&ts, n_layer * 5 * 8));
  MgArgs a{dl0, 2, x, q, k, v, att, h, kc.x, vc.x, cs, sn, step, wna.x, wnf.x, bar, nullptr,
           d, ff, nh, nkv, hd, n_ctx, scale, eps};
  const double bytes = wq.bytes + wk.bytes + wv.bytes + wo.bytes + wg.bytes + wu.bytes + wd.bytes;
  auto mega = [&](auto kern, int stages, const char* how) {
    const int smem = mg_smem_bytes(ff, stages);
    CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    a.layers = dl0;
    a.n_layer = 2;
    CK(cudaMemcpy(x, x0.x, d * 4, cudaMemcpyDeviceToDevice));
    CK(cudaMemset(bar, 0, 4));
    kern<<<n_sm, dim3(32, 32), smem>>>(a);
    CK(cudaDeviceSynchronize());
    CK(cudaGetLastError());
    const float ex = rel_err(download(x, d), x_ref), eh = rel_err(download(h, ff), h_ref);
    a.layers = dl;
    a.n_layer = n_layer;
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    const int reps = 5;
    CK(cudaMemsetAsync(bar, 0, 4));
    kern<<<n_sm, dim3(32, 32), smem>>>(a); // warm
    CK(cudaEventRecord(e0));
    for (int r = 0; r < reps; ++r) {
      CK(cudaMemsetAsync(bar, 0, 4));
      kern<<<n_sm, dim3(32, 32), smem>>>(a);
    }
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    CK(cudaGetLastError());
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    const std::string name = std::string("mega, ") + how + ", " + std::to_string(stages) + " slots";
    report("8B dense layer, all Q4_K", name.c_str(), ms * 1e3f / (reps * n_layer), bytes, ex);
    printf("%-34s %-26s h err %.2e (x err above, both against F32 after 2 layers)\n", "", "", eh);
    // Phase times from block 0's barrier exits (layers 1..n-1): q/k/v (from the previous
    // layer's last barrier), attention, o, gate/up, down.
    a.ts = ts;
    CK(cudaMemset(bar, 0, 4));
    kern<<<n_sm, dim3(32, 32), smem>>>(a);
    CK(cudaDeviceSynchronize());
    a.ts = nullptr;
    std::vector<unsigned long long> hts(n_layer * 5);
    CK(cudaMemcpy(hts.data(), ts, hts.size() * 8, cudaMemcpyDeviceToHost));
    double ph[5] = {};
    for (int l = 1; l < n_layer; ++l)
      for (int p = 0; p < 5; ++p) ph[p] += (hts[l * 5 + p] - hts[l * 5 + p - 1]) * 1e-3 / (n_layer - 1);
    printf("%-34s phases (us): qkv %.2f  attention %.2f  o %.2f  gate/up %.2f  down %.2f\n", "",
           ph[0], ph[1], ph[2], ph[3], ph[4]);
  };

  // The decoder's chain over the same weights (norms folded, down staged), all Q4_K.
  Act xa = make_act(d), xn8 = make_act(d), at8 = make_act(d), ffn = make_act(ff);
  float* npart;
  CK(cudaMalloc(&npart, d / 8));
  CK(cudaMemset(npart, 0, d / 8));
  const NormIn nin{npart, d / 32, 1.f / d, eps};
  const int st4 = nst_smem_bytes(T_Q4_K, ff);
  CK(cudaFuncSetAttribute(matvec_norm_st_q4_k, cudaFuncAttributeMaxDynamicSharedMemorySize, st4));
  auto chain = [&](cudaStream_t s, int i) {
    pdl(matvec_qkv_2_1, (d + 2 * nk) / 8, dim3(32, MV_WARPS), 0, s, xn8.x, xn8.q, xn8.d, xn8.s, d,
        at(wq, i), T_Q4_K, q, nullptr, d, at(wk, i), T_Q4_K, k, nullptr, nk, at(wv, i), T_Q4_K,
        v, nullptr, nk, nin);
    pdl(attention_32_4, dim3(nh, 1), dim3(32, 32), 0, s, q, k, v, kc.x, vc.x, at8.x, cs, sn,
        step, nh, nkv, hd, hd, 1, n_ctx, scale, at8.q, at8.d, at8.s, part, 1, 256);
    pdl(matvec_norm_q4_k, d / 32, dim3(32, NORM_WARPS), 0, s, at(wo, i), at8.x, at8.q, at8.d,
        at8.s, xa.x, d, xa.x, wnf.x, xn8.q, xn8.d, xn8.s, npart);
    pdl(matvec_swiglu, ff / MV_WARPS, dim3(32, MV_WARPS), 0, s, xn8.x, xn8.q, xn8.d, xn8.s, d,
        at(wg, i), T_Q4_K, at(wu, i), T_Q4_K, ffn.x, ff, nin);
    pdl(matvec_norm_st_q4_k, d / 32, dim3(32, NORM_WARPS), st4, s, at(wd, i), ffn.x, ffn.q,
        ffn.d, ffn.s, xa.x, ff, xa.x, wna.x, xn8.q, xn8.d, xn8.s, npart);
  };
  for (int rep = 0; rep < 2; ++rep) {
    report("8B dense layer, all Q4_K", "chain of 5 (the decoder)", time_graph(chain, n_layer),
           bytes, 0.f);
    mega(mega_layers<3>, 3, "table");
    mega(mega_layers<4>, 4, "table");
    mega(mega_layers<5>, 5, "table");
    mega(mega_layers<3, 2>, 3, "table, no fence");
  }
}
