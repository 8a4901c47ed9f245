// Micro-benchmark and check of flash.cu: causal attention of a prompt batch of t queries at
// depth pos (n_kv = pos + t keys), 32 heads / 8 kv heads (Llama-3-8B) of width HD, against a
// reference of one thread per output element in F32.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -o kflash kernels/cuda/bench_flash.cu && ./kflash
//
// (scripts/gpu.sh step `kflash` builds it here and runs it on the GPU.)

#include "flash.cu"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bench_util.cuh"

// out[i, h·hd + d] for query i of head h: softmax over keys 0 ..= pos + i in F32.
__global__ void ref_flash(const float* q, const float* kc, const float* vc, float* out, int t,
                          int pos, int nh, int nkv, int hd, int n_ctx, float scale) {
  const int i = blockIdx.x, h = blockIdx.y, d = threadIdx.x, kvh = h / (nh / nkv);
  if (d >= hd) return;
  const float* qr = q + ((size_t)h * t + i) * hd;
  const float* K = kc + (size_t)kvh * n_ctx * hd;
  const float* V = vc + (size_t)kvh * n_ctx * hd;
  float m = -INFINITY;
  for (int j = 0; j <= pos + i; ++j) {
    float s = 0.f;
    for (int e = 0; e < hd; ++e) s += qr[e] * K[(size_t)j * hd + e];
    m = fmaxf(m, s * scale);
  }
  float l = 0.f, o = 0.f;
  for (int j = 0; j <= pos + i; ++j) {
    float s = 0.f;
    for (int e = 0; e < hd; ++e) s += qr[e] * K[(size_t)j * hd + e];
    const float p = expf(s * scale - m);
    l += p;
    o += p * V[(size_t)j * hd + d];
  }
  out[(size_t)i * nh * hd + h * hd + d] = o / l;
}

__global__ void fill(float* p, size_t n, uint32_t seed, float amp) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    uint32_t x = (uint32_t)i * 2654435761u ^ seed;
    x ^= x >> 13, x *= 0x5bd1e995u, x ^= x >> 15;
    p[i] = ((x >> 8) / 16777216.f - 0.5f) * 2.f * amp;
  }
}

typedef void (*FlashKernel)(const float*, const float*, const float*, float*, int, int, int, int,
                            int, float);

static void run(FlashKernel k, int warps, int hd, int t, int pos, bool check) {
  const int nh = 32, nkv = 8, n_ctx = pos + t;
  const float scale = 1.f / sqrtf((float)hd);
  float *q, *kc, *vc, *out, *ref;
  const size_t nq = (size_t)nh * t * hd, nc = (size_t)nkv * n_ctx * hd, no = (size_t)t * nh * hd;
  CK(cudaMalloc(&q, nq * 4));
  CK(cudaMalloc(&kc, nc * 4));
  CK(cudaMalloc(&vc, nc * 4));
  CK(cudaMalloc(&out, no * 4));
  CK(cudaMalloc(&ref, no * 4));
  fill<<<1024, 256>>>(q, nq, 1, 3.f); // scores of a few units: a peaked softmax
  fill<<<1024, 256>>>(kc, nc, 2, 1.f);
  fill<<<1024, 256>>>(vc, nc, 3, 1.f);
  const dim3 grid((t + 16 * warps - 1) / (16 * warps), nh);
  const int smem = flash_smem_bytes(hd);
  CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  k<<<grid, 32 * warps, smem>>>(q, kc, vc, out, t, pos, nh, nkv, n_ctx, scale);
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  float err = -1.f, mref = 0.f;
  if (check) {
    ref_flash<<<dim3(t, nh), ((hd + 31) / 32) * 32>>>(q, kc, vc, ref, t, pos, nh, nkv, hd, n_ctx,
                                                     scale);
    CK(cudaDeviceSynchronize());
    std::vector<float> a(no), b(no);
    CK(cudaMemcpy(a.data(), out, no * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(b.data(), ref, no * 4, cudaMemcpyDeviceToHost));
    err = 0.f;
    for (size_t i = 0; i < no; ++i) {
      err = fmaxf(err, fabsf(a[i] - b[i]));
      mref = fmaxf(mref, fabsf(b[i]));
      if (!(a[i] == a[i])) err = INFINITY;
    }
  }
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  const int reps = 20;
  CK(cudaEventRecord(e0));
  for (int r = 0; r < reps; ++r)
    k<<<grid, 32 * warps, smem>>>(q, kc, vc, out, t, pos, nh, nkv, n_ctx, scale);
  CK(cudaEventRecord(e1));
  CK(cudaEventSynchronize(e1));
  float ms;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  const double us = ms * 1e3 / reps;
  // Useful FLOPs: two products over the visible keys (causal).
  const double pairs = (double)t * pos + (double)t * (t + 1) / 2;
  const double tflops = 4.0 * nh * hd * pairs / (us * 1e-6) * 1e-12;
  printf("flash_attn_%d_%d t %4d pos %5d: %9.1f us  %6.1f TFLOP/s  max|d| %.2e (max|ref| %.2f)\n", hd, warps,
         t, pos, us, tflops, err, mref);
  fflush(stdout);
  for (float* p : {q, kc, vc, out, ref}) CK(cudaFree(p));
}

int main() {
  cudaDeviceProp p;
  CK(cudaGetDeviceProperties(&p, 0));
  printf("%s, %d SMs\n", p.name, p.multiProcessorCount);
  // Correctness: partial tiles, a batch not a multiple of the block, with and without past keys.
  for (int w : {4, 8})
    for (int hd : {32, 64, 128}) {
      FlashKernel k = w == 4 ? (hd == 32 ? flash_attn_32_4 : hd == 64 ? flash_attn_64_4 : flash_attn_128_4)
                             : (hd == 32 ? flash_attn_32_8 : hd == 64 ? flash_attn_64_8 : flash_attn_128_8);
      for (int t : {1, 100, 300})
        for (int pos : {0, 37, 200}) run(k, w, hd, t, pos, true);
    }
  // Speed: Llama-3-8B's shape, pp512 from empty and at depth 4096.
  for (int w : {4, 8}) {
    FlashKernel k = w == 4 ? flash_attn_128_4 : flash_attn_128_8;
    run(k, w, 128, 512, 0, w == 8);
    run(k, w, 128, 512, 4096, w == 8);
    run(k, w, 128, 2048, 0, false);
    run(k, w, 128, 64, 4096, false);
  }
  return 0;
}
