// ATen glue of the CUDA `augment_apply`: argument checks, output and scratch allocation, then
// the kernel and launch planning of augment_kernels.cuh (which the emulated tests run on the
// CPU from the same source).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "augment_checks.h"
#include "checks.h"
#include "cuda/augment_kernels.cuh"

namespace mpl_fast {
namespace {

at::Tensor augment_apply_cuda(const at::Tensor& images, const at::Tensor& codes, const at::Tensor& params,
                              at::IntArrayRef fill) {
  check_augment_args(images, codes, params, fill);
  c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor in = images.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  const int64_t n = in.size(0), C = in.size(1), H = in.size(2), W = in.size(3), num_ops = codes.size(1);
  const int64_t numel = C * H * W;
  if (n == 0 || numel == 0) return out;
  MPL_CHECK_ARG(n <= 2147483647, "`images` has too many images for one launch: ", n);
  const at::Tensor codes_c = codes.contiguous(), params_c = params.contiguous();
  const AugmentLaunchPlan plan = plan_augment(C, H, W);
  at::Tensor scratch;
  if (!plan.in_shared) scratch = at::empty({n, numel}, in.options());
  uint8_t fills[kMaxChannels];
  for (size_t c = 0; c < kMaxChannels; ++c) fills[c] = static_cast<uint8_t>(fill[std::min(c, fill.size() - 1)]);
  launch_augment(plan, in.const_data_ptr<uint8_t>(), out.mutable_data_ptr<uint8_t>(),
                 plan.in_shared ? nullptr : scratch.mutable_data_ptr<uint8_t>(), codes_c.const_data_ptr<int32_t>(),
                 params_c.const_data_ptr<float>(), n, num_ops, C, H, W, fills, c10::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mpl_fast, CUDA, m) { m.impl("augment_apply", &augment_apply_cuda); }

}  // namespace mpl_fast
