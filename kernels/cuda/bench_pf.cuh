// `kbench pf`: the 8B dense layer chain (as bench_pdl.cuh's pdl_layer) with each kernel, once
// its own work is done, asking L2 (cp.async.bulk.prefetch.L2) for a share of the weights the
// next kernels will read: down → the next layer's q/k/v, q/k/v → o, o → SwiGLU's first rows.
// The blocks end near their kernel's end, so the reads go out while the next kernel waits or
// starts. An experiment: which of these, if any, shortens the chain.

#pragma once

struct Pf {
  const uint8_t* p[3];
  unsigned long long n[3];
};

// Warp w of nwarps: its share of the ranges in pf (split evenly), by lane 0, in pieces of at
// most 32 KiB.
__device__ __forceinline__ void l2_share_of(const Pf& pf, unsigned long long w,
                                            unsigned long long nwarps) {
  if (threadIdx.x != 0) return;
  for (int i = 0; i < 3; ++i) {
    if (!pf.p[i] || !pf.n[i]) continue;
    const unsigned long long chunk = ((pf.n[i] + nwarps - 1) / nwarps + 255) & ~255ull;
    const unsigned long long off = w * chunk;
    if (off >= pf.n[i]) continue;
    const unsigned long long len = min(chunk, pf.n[i] - off) & ~15ull;
    for (unsigned long long o = 0; o < len; o += 32768) {
      const unsigned piece = (unsigned)min(32768ull, len - o);
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(pf.p[i] + off + o),
                   "r"(piece)
                   : "memory");
    }
  }
}

// Every warp of the grid takes a share (after the block's own work).
__device__ __forceinline__ void l2_share(const Pf& pf) {
  const unsigned long long nwarps = (unsigned long long)gridDim.x * gridDim.y * blockDim.y;
  const unsigned long long w =
      ((unsigned long long)blockIdx.y * gridDim.x + blockIdx.x) * blockDim.y + threadIdx.y;
  l2_share_of(pf, w, nwarps);
}

// Blocks past the first `n_work` only prefetch (placed beside the work, with no dependency
// wait) and exit; returns whether this block is one of them.
__device__ __forceinline__ bool pf_block(const Pf& pf, int n_work) {
  if ((int)blockIdx.x < n_work) return false;
  const unsigned long long nb = gridDim.x - n_work;
  l2_share_of(pf, (blockIdx.x - n_work) * blockDim.y + threadIdx.y, nb * blockDim.y);
  return true;
}

__global__ void __launch_bounds__(WARP * 32) att_pfb(ATT_ARGS, Pf pf, int n_work) {
  if (pf_block(pf, n_work)) return;
  attention_t<32, 4, 4>(q, k, v, kc, vc, out, cos_t, sin_t, step, n_head, n_head_kv, hd,
                        rope_dim, style, n_ctx, scale, oq, od, os, part, n_split, chunk_min);
}

__global__ void __launch_bounds__(WARP * NORM_WARPS)
    o_pfb(const uint8_t* __restrict__ w, const float* __restrict__ x, const int8_t* xq,
          const float* xd, const float* xs, float* y, int cols, const float* res,
          const float* __restrict__ nw, int8_t* nq, float* nd, float* ns, float* npart, Pf pf,
          int n_work) {
  if (pf_block(pf, n_work)) return;
  pdl_entry();
  matvec_norm_t<T_Q4_K, false>(w, x, Q8x{xq, xd, xs}, y, cols, res, nw, nq, nd, ns, npart);
}

template <int TY>
__global__ void __launch_bounds__(WARP * NORM_WARPS)
    down_pfb(const uint8_t* __restrict__ w, const float* __restrict__ x, const int8_t*,
             const float*, const float*, float* y, int cols, const float* res,
             const float* __restrict__ nw, int8_t* nq, float* nd, float* ns, float* npart,
             Pf pf, int n_work) {
  if (pf_block(pf, n_work)) return;
  matvec_norm_st_t<TY>(w, x, y, cols, res, nw, nq, nd, ns, npart);
}

__global__ void __launch_bounds__(WARP * MV_WARPS) qkv_pf(QKV_ARGS, Pf pf) {
  pdl_entry();
  matvec_qkv_t<2, 1>(x, Q8x{xq, xd, xs}, cols, wq, tq, yq, bq, rq, wk, tk, yk, bk, rk, wv, tv,
                     yv, bv, rv, nin);
  l2_share(pf);
}

__global__ void __launch_bounds__(WARP * 32) att_pf(ATT_ARGS, Pf pf) {
  attention_t<32, 4, 4>(q, k, v, kc, vc, out, cos_t, sin_t, step, n_head, n_head_kv, hd,
                        rope_dim, style, n_ctx, scale, oq, od, os, part, n_split, chunk_min);
  l2_share(pf);
}

__global__ void __launch_bounds__(WARP * NORM_WARPS)
    o_pf(const uint8_t* __restrict__ w, const float* __restrict__ x, const int8_t* xq,
         const float* xd, const float* xs, float* y, int cols, const float* res,
         const float* __restrict__ nw, int8_t* nq, float* nd, float* ns, float* npart, Pf pf) {
  pdl_entry();
  matvec_norm_t<T_Q4_K, false>(w, x, Q8x{xq, xd, xs}, y, cols, res, nw, nq, nd, ns, npart);
  l2_share(pf);
}

template <int TY>
__global__ void __launch_bounds__(WARP * NORM_WARPS)
    down_pf(const uint8_t* __restrict__ w, const float* __restrict__ x, const int8_t*,
            const float*, const float*, float* y, int cols, const float* res,
            const float* __restrict__ nw, int8_t* nq, float* nd, float* ns, float* npart,
            Pf pf) {
  matvec_norm_st_t<TY>(w, x, y, cols, res, nw, nq, nd, ns, npart);
  l2_share(pf);
}

// mask: 1 down → next q/k/v, 2 q/k/v → o, 4 attention → o, 8 o → SwiGLU's first `sw_rows`;
// prefetching after each block's work, or (blocks > 0) from `blocks` extra blocks of their own
// in the same grid (bits 1, 4, 8 only; att_blocks for attention's).
static void pf_layer(const char* name, int mask, int sw_rows = 3072, int blocks = 0,
                     int att_blocks = 64) {
  const int d = 4096, ff = 14336, nh = 32, nkv = 8, hd = 128, n_ctx = 256, n_layer = 32;
  Mat wq = make_mat(T_Q4_K, d, d, 21), wk = make_mat(T_Q4_K, nkv * hd, d, 22),
      wv = make_mat(T_Q6_K, nkv * hd, d, 23), wo = make_mat(T_Q4_K, d, d, 24),
      wg = make_mat(T_Q4_K, ff, d, 25), wu = make_mat(T_Q4_K, ff, d, 26),
      w4 = make_mat(T_Q4_K, d, ff, 27), w6 = make_mat(T_Q6_K, d, ff, 28);
  Act x = make_act(d), xn = make_act(d), att = make_act(nh * hd), ffn = make_act(ff);
  Act kc = make_act(nkv * n_ctx * hd), vc = make_act(nkv * n_ctx * hd);
  float *q, *k, *v, *cs, *sn, *part, *npart, *nw;
  uint32_t* step;
  CK(cudaMalloc(&q, nh * hd * 4));
  CK(cudaMalloc(&k, nkv * hd * 4));
  CK(cudaMalloc(&v, nkv * hd * 4));
  CK(cudaMalloc(&part, nh * 2 * (hd + 2) * 4));
  CK(cudaMalloc(&npart, d / 8));
  CK(cudaMalloc(&nw, d * 4));
  CK(cudaMemcpy(nw, x.x, d * 4, cudaMemcpyDeviceToDevice));
  CK(cudaMemset(npart, 0, d / 8));
  CK(cudaMalloc(&cs, n_ctx * hd / 2 * 4));
  CK(cudaMalloc(&sn, n_ctx * hd / 2 * 4));
  CK(cudaMemset(cs, 0, n_ctx * hd / 2 * 4));
  CK(cudaMemset(sn, 0, n_ctx * hd / 2 * 4));
  CK(cudaMalloc(&step, 8));
  const uint32_t st[2] = {0, 63};
  CK(cudaMemcpy(step, st, 8, cudaMemcpyHostToDevice));
  const NormIn nin{npart, d / 32, 1.f / d, 1e-5f};
  const int st4 = nst_smem_bytes(T_Q4_K, ff), st6 = nst_smem_bytes(T_Q6_K, ff);
  CK(cudaFuncSetAttribute(down_pf<T_Q4_K>, cudaFuncAttributeMaxDynamicSharedMemorySize, st4));
  CK(cudaFuncSetAttribute(down_pf<T_Q6_K>, cudaFuncAttributeMaxDynamicSharedMemorySize, st6));
  CK(cudaFuncSetAttribute(down_pfb<T_Q4_K>, cudaFuncAttributeMaxDynamicSharedMemorySize, st4));
  CK(cudaFuncSetAttribute(down_pfb<T_Q6_K>, cudaFuncAttributeMaxDynamicSharedMemorySize, st6));
  auto at = [](const Mat& m, int i) { return m.p + (i % m.copies) * m.bytes; };
  const Pf none{};
  const size_t swb = (size_t)sw_rows * row_bytes_h(T_Q4_K, d);
  auto fb = [&](cudaStream_t s, int i) {
    const Pf to_o = {{at(wo, i), nullptr, nullptr}, {wo.bytes, 0, 0}};
    const Pf to_sw = {{at(wg, i), at(wu, i), nullptr}, {swb, swb, 0}};
    const Pf to_qkv = {{at(wq, i + 1), at(wk, i + 1), at(wv, i + 1)},
                       {wq.bytes, wk.bytes, wv.bytes}};
    pdl(matvec_qkv_2_1, (d + 2 * nkv * hd) / 8, dim3(32, MV_WARPS), 0, s, xn.x, xn.q, xn.d,
        xn.s, d, at(wq, i), T_Q4_K, q, nullptr, d, at(wk, i), T_Q4_K, k, nullptr, nkv * hd,
        at(wv, i), T_Q6_K, v, nullptr, nkv * hd, nin);
    const int ab = (mask & 4) ? att_blocks : 0;
    pdl(att_pfb, dim3(nh + ab, 1), dim3(32, 32), 0, s, q, k, v, kc.x, vc.x, att.x, cs, sn, step,
        nh, nkv, hd, hd, 0, n_ctx, 0.088f, att.q, att.d, att.s, part, 1, 256, to_o, nh);
    const int ob = (mask & 8) ? blocks : 0;
    pdl(o_pfb, d / 32 + ob, dim3(32, NORM_WARPS), 0, s, at(wo, i), att.x, att.q, att.d, att.s,
        x.x, d, x.x, nw, xn.q, xn.d, xn.s, npart, to_sw, d / 32);
    pdl(matvec_swiglu, ff / MV_WARPS, dim3(32, MV_WARPS), 0, s, xn.x, xn.q, xn.d, xn.s, d,
        at(wg, i), T_Q4_K, at(wu, i), T_Q4_K, ffn.x, ff, nin);
    const int db = (mask & 1) ? blocks : 0;
    if (i % 2)
      pdl(down_pfb<T_Q6_K>, d / 32 + db, dim3(32, NORM_WARPS), st6, s, at(w6, i), ffn.x, ffn.q,
          ffn.d, ffn.s, x.x, ff, x.x, nw, xn.q, xn.d, xn.s, npart, to_qkv, d / 32);
    else
      pdl(down_pfb<T_Q4_K>, d / 32 + db, dim3(32, NORM_WARPS), st4, s, at(w4, i), ffn.x, ffn.q,
          ffn.d, ffn.s, x.x, ff, x.x, nw, xn.q, xn.d, xn.s, npart, to_qkv, d / 32);
  };
  auto f = [&](cudaStream_t s, int i) {
    if (blocks > 0) return fb(s, i);
    const Pf to_o = {{at(wo, i), nullptr, nullptr}, {wo.bytes, 0, 0}};
    const Pf to_sw = {{at(wg, i), at(wu, i), nullptr}, {swb, swb, 0}};
    const Pf to_qkv = {{at(wq, i + 1), at(wk, i + 1), at(wv, i + 1)},
                       {wq.bytes, wk.bytes, wv.bytes}};
    pdl(qkv_pf, (d + 2 * nkv * hd) / 8, dim3(32, MV_WARPS), 0, s, xn.x, xn.q, xn.d, xn.s, d,
        at(wq, i), T_Q4_K, q, nullptr, d, at(wk, i), T_Q4_K, k, nullptr, nkv * hd, at(wv, i),
        T_Q6_K, v, nullptr, nkv * hd, nin, (mask & 2) ? to_o : none);
    pdl(att_pf, dim3(nh, 1), dim3(32, 32), 0, s, q, k, v, kc.x, vc.x, att.x, cs, sn, step, nh,
        nkv, hd, hd, 0, n_ctx, 0.088f, att.q, att.d, att.s, part, 1, 256,
        (mask & 4) ? to_o : none);
    pdl(o_pf, d / 32, dim3(32, NORM_WARPS), 0, s, at(wo, i), att.x, att.q, att.d, att.s, x.x, d,
        x.x, nw, xn.q, xn.d, xn.s, npart, (mask & 8) ? to_sw : none);
    pdl(matvec_swiglu, ff / MV_WARPS, dim3(32, MV_WARPS), 0, s, xn.x, xn.q, xn.d, xn.s, d,
        at(wg, i), T_Q4_K, at(wu, i), T_Q4_K, ffn.x, ff, nin);
    const Pf nxt = (mask & 1) ? to_qkv : none;
    if (i % 2)
      pdl(down_pf<T_Q6_K>, d / 32, dim3(32, NORM_WARPS), st6, s, at(w6, i), ffn.x, ffn.q, ffn.d,
          ffn.s, x.x, ff, x.x, nw, xn.q, xn.d, xn.s, npart, nxt);
    else
      pdl(down_pf<T_Q4_K>, d / 32, dim3(32, NORM_WARPS), st4, s, at(w4, i), ffn.x, ffn.q, ffn.d,
          ffn.s, x.x, ff, x.x, nw, xn.q, xn.d, xn.s, npart, nxt);
  };
  f(0, 0);
  f(0, 1);
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  const double bytes = wq.bytes + wk.bytes + wv.bytes + wo.bytes + wg.bytes + wu.bytes +
                       (w4.bytes + w6.bytes) / 2.0;
  report("8B dense layer (5 kernels, 64 keys)", name, time_graph(f, n_layer), bytes, 0.f);
  for (Mat* m : {&wq, &wk, &wv, &wo, &wg, &wu, &w4, &w6}) CK(cudaFree(m->p));
  for (void* p : {(void*)q, (void*)k, (void*)v, (void*)part, (void*)npart, (void*)nw,
                  (void*)cs, (void*)sn, (void*)step})
    CK(cudaFree(p));
}

static void bench_pf() {
  for (int rep = 0; rep < 2; ++rep) {
    pf_layer("no prefetch", 0);
    pf_layer("blocks: none (wrappers only)", 0, 0, 4);
    pf_layer("blocks: att +64 -> o", 4, 0, 4, 64);
    pf_layer("blocks: att +100 -> o", 4, 0, 4, 100);
    pf_layer("blocks: att +16 -> o", 4, 0, 4, 16);
    pf_layer("blocks: o +4 -> SwiGLU 3072", 8, 3072, 4);
    pf_layer("blocks: o +4 -> SwiGLU 1536", 8, 1536, 4);
    pf_layer("blocks: down +4 -> next qkv", 1, 0, 4);
    pf_layer("blocks: down +2 -> next qkv", 1, 0, 2);
    pf_layer("blocks: att64 + o4 (1536)", 12, 1536, 4, 64);
    pf_layer("blocks: all (1536)", 13, 1536, 4, 64);
  }
}
