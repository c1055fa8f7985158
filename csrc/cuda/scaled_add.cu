// ATen glue of the CUDA `scaled_add`: checks, output allocation, dtype dispatch; the kernel and
// its launch are in scaled_add_kernels.cuh (which the emulated tests run on the CPU).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/scaled_add_kernels.cuh"

namespace mpl_fast {
namespace {

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
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scaled_add_cuda", [&] {
    launch_scaled_add(xc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                      static_cast<at::opmath_type<scalar_t>>(alpha), n, stream);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mpl_fast, CUDA, m) { m.impl("scaled_add", &scaled_add_cuda); }

}  // namespace mpl_fast
