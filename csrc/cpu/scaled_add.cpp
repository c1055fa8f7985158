#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "checks.h"
#include "scaled_add.h"

namespace mpl_fast {
namespace {

at::Tensor scaled_add_cpu(const at::Tensor& x, const at::Tensor& y, double alpha) {
  check_same_shape(x, "x", y, "y");
  check_same_device(x, "x", y, "y");
  check_floating(x, "x");
  MPL_CHECK_ARG(x.scalar_type() == y.scalar_type(), "`y` must have the dtype of `x` (",
                x.scalar_type(), "), got ", y.scalar_type());
  at::Tensor xc = x.contiguous(), yc = y.contiguous();
  at::Tensor out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scaled_add_cpu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const auto a = static_cast<at::opmath_type<scalar_t>>(alpha);
    at::parallel_for(0, xc.numel(), 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) op[i] = scaled_add_one(xp[i], yp[i], a);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mpl_fast, CPU, m) { m.impl("scaled_add", &scaled_add_cpu); }

}  // namespace mpl_fast
