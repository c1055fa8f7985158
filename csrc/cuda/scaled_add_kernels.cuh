// CUDA kernel of the smoke op `scaled_add` and its launch, free of ATen so that the same code
// also runs under the SIMT emulator (tests/emulated_build.py); csrc/cuda/scaled_add.cu is the
// ATen glue.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "cuda/launch.cuh"
#include "scaled_add.h"

namespace mpl_fast {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void scaled_add_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                  scalar_t* __restrict__ out, acc_t alpha, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = scaled_add_one(x[i], y[i], alpha);
  }
}

// out = x + alpha * y over n >= 1 elements, alpha in acc_t (at::opmath_type of scalar_t).
template <typename scalar_t, typename acc_t>
void launch_scaled_add(const scalar_t* x, const scalar_t* y, scalar_t* out, acc_t alpha, int64_t n,
                       cudaStream_t stream) {
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
  MPL_LAUNCH(blocks, threads, 0, stream, scaled_add_kernel<scalar_t, acc_t>)(x, y, out, alpha, n);
  MPL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace mpl_fast
