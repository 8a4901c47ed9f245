// What the kernels' micro-benchmarks (bench.cu, bench_flash.cu) share.

#pragma once
#include <cstdio>
#include <cstdlib>

// A CUDA runtime call that must succeed: else the file, line, call and error, and exit 1.
#define CK(x)                                                                         \
  do {                                                                                \
    cudaError_t e_ = (x);                                                             \
    if (e_ != cudaSuccess) {                                                          \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      exit(1);                                                                        \
    }                                                                                 \
  } while (0)
