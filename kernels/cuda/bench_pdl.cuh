// `kbench pdl`: the decoder's kernels in chains of programmatic dependent launches, as in the
// step's graph (each kernel's start overlaps the previous one's tail): Llama-3-8B's dense layer
// as the decoder launches it, a norm producer after the quantize_q8 it replaced, and attention
// at short contexts.

#pragma once

// Staging depths other than the decoder's (bench only).
#define ST_VARIANT(NAME, TY, ST)                                                             \
  __global__ void __launch_bounds__(WARP * NORM_WARPS)                                       \
      NAME(const uint8_t* __restrict__ w, const float* __restrict__ x, const int8_t*,        \
           const float*, const float*, float* y, int cols, const float* res,                 \
           const float* __restrict__ nw, int8_t* nq, float* nd, float* ns, float* npart) {   \
    matvec_norm_st_t<TY, ST>(w, x, y, cols, res, nw, nq, nd, ns, npart);                     \
  }
ST_VARIANT(st2_q4_k, T_Q4_K, 2)
ST_VARIANT(st4_q4_k, T_Q4_K, 4)
ST_VARIANT(st3_q6_k, T_Q6_K, 3)

// A norm's producer over `rows × cols` of type ty: quantize_q8 of its F32 input then
// matvec_norm_<t> (the decoder before stop 16), matvec_norm_qin_<t>, matvec_norm_<t> alone, and
// `staged` if given (taking `staged_smem` bytes). err: max |Δ| of y against the first (0: the
// same sums).
static void pdl_producer(const char* shape, int ty, int rows, int cols, NormKernel plain,
                         NormKernel qin, NormKernel staged = nullptr, int staged_smem = 0) {
  Mat m = make_mat(ty, rows, cols, 11);
  Act a = make_act(cols);
  float* y;
  CK(cudaMalloc(&y, rows * 4));
  const NormOut o = make_norm_out(rows, a.x, cols);
  const int n = std::max(8, std::min(64, 2 * m.copies));
  auto wp = [&](int i) { return m.p + (i % m.copies) * m.bytes; };
  std::vector<float> ref;
  auto run = [&](const char* name, const std::function<void(cudaStream_t, int)>& f) {
    CK(cudaMemset(y, 0, rows * 4));
    f(0, 0);
    CK(cudaDeviceSynchronize());
    CK(cudaGetLastError());
    const auto out = download(y, rows);
    if (ref.empty()) ref = out;
    report(shape, name, time_graph(f, n), m.bytes, max_abs_diff(out, ref));
  };
  const dim3 block(32, NORM_WARPS);
  auto norm = [&](NormKernel k, size_t smem, cudaStream_t s, int i) {
    pdl(k, rows / 32, block, smem, s, wp(i), a.x, a.q, a.d, a.s, y, cols, nullptr, o.w, o.q, o.d,
        o.s, o.part);
  };
  run("quantize_q8 + matvec_norm", [&](cudaStream_t s, int i) {
    pdl(quantize_q8, (cols + 255) / 256, 256, 0, s, a.x, a.q, a.d, a.s, cols);
    norm(plain, 0, s, i);
  });
  run("matvec_norm_qin", [&](cudaStream_t s, int i) { norm(qin, qin_smem_bytes(cols), s, i); });
  run("matvec_norm alone", [&](cudaStream_t s, int i) { norm(plain, 0, s, i); });
  if (staged) {
    CK(cudaFuncSetAttribute(staged, cudaFuncAttributeMaxDynamicSharedMemorySize, staged_smem));
    run("matvec_norm_st (staged)", [&](cudaStream_t s, int i) { norm(staged, staged_smem, s, i); });
  }
  auto variant = [&](const char* name, NormKernel k, int stages) {
    const int sm = nst_smem_bytes(ty, cols, stages);
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, sm));
    run(name, [&](cudaStream_t s, int i) { norm(k, sm, s, i); });
  };
  if (ty == T_Q4_K) {
    variant("staged, 2 stages", st2_q4_k, 2);
    variant("staged, 4 stages", st4_q4_k, 4);
  }
  if (ty == T_Q6_K) variant("staged, 3 stages", st3_q6_k, 3);
  CK(cudaFree(m.p));
  CK(cudaFree(y));
}

// Llama-3-8B Q4_K_M's dense block as the decoder's graph runs it (norms folded): matvec_qkv_2_1,
// attention_32_4 at 64 keys, matvec_norm_q4_k (o), matvec_swiglu, matvec_norm_qin (down: Q4_K
// and Q6_K in alternate layers), `n_layer` of them over weight copies larger than L2.
static void pdl_layer(const char* name, NormKernel down4, int smem4, NormKernel down6,
                      int smem6) {
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
  auto at = [](const Mat& m, int i) { return m.p + (i % m.copies) * m.bytes; };
  auto f = [&](cudaStream_t s, int i) {
    pdl(matvec_qkv_2_1, (d + 2 * nkv * hd) / 8, dim3(32, MV_WARPS), 0, s, xn.x, xn.q, xn.d,
        xn.s, d, at(wq, i), T_Q4_K, q, nullptr, d, at(wk, i), T_Q4_K, k, nullptr, nkv * hd,
        at(wv, i), T_Q6_K, v, nullptr, nkv * hd, nin);
    pdl(attention_32_4, dim3(nh, 1), dim3(32, 32), 0, s, q, k, v, kc.x, vc.x, att.x, cs, sn,
        step, nh, nkv, hd, hd, 0, n_ctx, 0.088f, att.q, att.d, att.s, part, 1, 256);
    pdl(matvec_norm_q4_k, d / 32, dim3(32, NORM_WARPS), 0, s, at(wo, i), att.x, att.q, att.d,
        att.s, x.x, d, x.x, nw, xn.q, xn.d, xn.s, npart);
    pdl(matvec_swiglu, ff / MV_WARPS, dim3(32, MV_WARPS), 0, s, xn.x, xn.q, xn.d, xn.s, d,
        at(wg, i), T_Q4_K, at(wu, i), T_Q4_K, ffn.x, ff, nin);
    if (i % 2)
      pdl(down6, d / 32, dim3(32, NORM_WARPS), smem6, s, at(w6, i),
          ffn.x, ffn.q, ffn.d, ffn.s, x.x, ff, x.x, nw, xn.q, xn.d, xn.s, npart);
    else
      pdl(down4, d / 32, dim3(32, NORM_WARPS), smem4, s, at(w4, i),
          ffn.x, ffn.q, ffn.d, ffn.s, x.x, ff, x.x, nw, xn.q, xn.d, xn.s, npart);
  };
  f(0, 0);
  f(0, 1);
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  const double bytes = wq.bytes + wk.bytes + wv.bytes + wo.bytes + wg.bytes + wu.bytes +
                       (w4.bytes + w6.bytes) / 2.0;
  report("8B dense layer (5 kernels, 64 keys)", name, time_graph(f, n_layer),
         bytes, 0.f);
  for (Mat* m : {&wq, &wk, &wv, &wo, &wg, &wu, &w4, &w6}) CK(cudaFree(m->p));
}

typedef void (*MoeQinKernel)(const float*, float*, int, int, const uint64_t*, const float*);

// A MoE block's two experts' down [4096, 14336] of type ty: quantize_q8 of their hidden states
// then moe_down_2_1 (the decoder before), and moe_down_qin_<t> (now). err: max |Δ| of ys.
static void pdl_moe_down(const char* shape, int ty, MoeQinKernel qin, MoeQinKernel staged) {
  const int rows = 4096, cols = 14336, k = 2;
  Mat m = make_mat(ty, rows, cols, 31);
  Act h = make_act(k * cols);
  float *ys, *route;
  uint64_t* table;
  CK(cudaMalloc(&ys, k * rows * 4));
  CK(cudaMalloc(&route, 2 * MOE_MAX_USED * 4));
  CK(cudaMalloc(&table, 2 * 3 * 8));
  const float rt[2 * MOE_MAX_USED] = {0.f, 1.f, 0, 0, 0, 0, 0, 0, 0.5f, 0.5f};
  CK(cudaMemcpy(route, rt, sizeof rt, cudaMemcpyHostToDevice));
  const int c1 = std::min(1, m.copies - 1);
  const uint64_t tb[6] = {0, 0, (uint64_t)m.p, 0, 0, (uint64_t)(m.p + c1 * m.bytes)};
  CK(cudaMemcpy(table, tb, sizeof tb, cudaMemcpyHostToDevice));
  std::vector<float> ref;
  auto run = [&](const char* name, const std::function<void(cudaStream_t, int)>& f) {
    CK(cudaMemset(ys, 0, k * rows * 4));
    f(0, 0);
    CK(cudaDeviceSynchronize());
    CK(cudaGetLastError());
    const auto out = download(ys, k * rows);
    if (ref.empty()) ref = out;
    report(shape, name, time_graph(f, 32), k * (double)m.bytes, max_abs_diff(out, ref));
  };
  run("quantize_q8 + moe_down_2_1", [&](cudaStream_t s, int) {
    pdl(quantize_q8, k * cols / 256, 256, 0, s, h.x, h.q, h.d, h.s, k * cols);
    pdl(moe_down_2_1, dim3(rows / 8, k), dim3(32, MV_WARPS), 0, s, ty, h.x, h.q, h.d, h.s, ys,
        rows, cols, table, route);
  });
  run("moe_down_qin", [&](cudaStream_t s, int) {
    pdl(qin, dim3(rows / 32, k), dim3(32, NORM_WARPS), qin_smem_bytes(cols), s, h.x, ys, rows,
        cols, table, route);
  });
  const int sm = nst_smem_bytes(ty, cols);
  CK(cudaFuncSetAttribute(staged, cudaFuncAttributeMaxDynamicSharedMemorySize, sm));
  run("moe_down_st (staged)", [&](cudaStream_t s, int) {
    pdl(staged, dim3(rows / 32, k), dim3(32, NORM_WARPS), sm, s, h.x, ys, rows, cols, table,
        route);
  });
  CK(cudaFree(m.p));
}

static void bench_pdl() {
  pdl_moe_down("Q5_K [4096, 14336] x2 (experts' down)", T_Q5_K, moe_down_qin_q5_k,
               moe_down_st_q5_k);
  pdl_moe_down("Q6_K [4096, 14336] x2 (experts' down)", T_Q6_K, moe_down_qin_q6_k,
               moe_down_st_q6_k);
  const int st4 = nst_smem_bytes(T_Q4_K, 14336), st6 = nst_smem_bytes(T_Q6_K, 14336);
  CK(cudaFuncSetAttribute(matvec_norm_st_q4_k, cudaFuncAttributeMaxDynamicSharedMemorySize, st4));
  CK(cudaFuncSetAttribute(matvec_norm_st_q6_k, cudaFuncAttributeMaxDynamicSharedMemorySize, st6));
  for (int rep = 0; rep < 2; ++rep) {
    pdl_layer("pdl chain of 32 layers", matvec_norm_qin_q4_k, qin_smem_bytes(14336),
              matvec_norm_qin_q6_k, qin_smem_bytes(14336));
    pdl_layer("the same, Q6_K down staged", matvec_norm_qin_q4_k, qin_smem_bytes(14336),
              matvec_norm_st_q6_k, st6);
    pdl_layer("the same, both downs staged", matvec_norm_st_q4_k, st4, matvec_norm_st_q6_k, st6);
  }
  pdl_producer("Q4_K [4096, 14336] (down)", T_Q4_K, 4096, 14336, matvec_norm_q4_k,
               matvec_norm_qin_q4_k, matvec_norm_st_q4_k, nst_smem_bytes(T_Q4_K, 14336));
  pdl_producer("Q5_K [4096, 14336] (down)", T_Q5_K, 4096, 14336, matvec_norm_q5_k,
               matvec_norm_qin_q5_k, matvec_norm_st_q5_k, nst_smem_bytes(T_Q5_K, 14336));
  pdl_producer("Q6_K [4096, 14336] (down)", T_Q6_K, 4096, 14336, matvec_norm_q6_k,
               matvec_norm_qin_q6_k, matvec_norm_st_q6_k, nst_smem_bytes(T_Q6_K, 14336));
  for (int n_kv : {9, 64, 128, 256}) {
    bench_attention(n_kv, 1, "attention_32_4 (pdl)", attention_32_4, 32, 4096, true);
    bench_attention(n_kv, 1, "attention_32_1_256 (pdl)", attention_32_1_256, 32, 4096, true);
  }
  // Heads over 128 wide (the _256 kernels; no fixture model has them): 256 and 192.
  for (int hd : {256, 192}) {
    bench_attention(9, 1, "attention_32_1_256 (pdl)", attention_32_1_256, 32, 4096, true, hd);
    bench_attention(300, 2, "attention_32_1_256 (pdl)", attention_32_1_256, 32, 256, true, hd);
    bench_attention(1024, 16, "attention_8_2_256 (pdl)", attention_8_2_256, 8, 64, true, hd);
  }
}
