#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "scaled_add.h"

namespace mpl_fast {
namespace {

template <typename scalar_t>
__global__ void scaled_add_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                  scalar_t* __restrict__ out, at::opmath_type<scalar_t> alpha, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = scaled_add_one(x[i], y[i], alpha);
  }
}

at::Tensor scaled_add_cuda(const at::Tensor& x, const at::Tensor& y, double alpha) {
  check_same_shape(x, "x", y, "y");
  check_same_device(x, "x", y, "y");
  check_floating(x, "x");
  MPL_CHECK_ARG(x.scalar_type() == y.scalar_type(), "`y` must have the dtype of `x` (",
                x.scalar_type(), "), got ", y.scalar_type());
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous(), yc = y.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scaled_add_cuda", [&] {
    scaled_add_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), static_cast<at::opmath_type<scalar_t>>(alpha), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mpl_fast, CUDA, m) { m.impl("scaled_add", &scaled_add_cuda); }

}  // namespace mpl_fast
