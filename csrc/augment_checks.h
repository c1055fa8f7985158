// Argument checks of `augment_apply`, shared by its CPU and CUDA kernels. Every message names
// the argument, what was expected and what came (ValueError in Python).
#pragma once

#include <ATen/core/Tensor.h>

#include "augment.h"
#include "checks.h"

namespace mpl_fast {

inline void check_augment_args(const at::Tensor& images, const at::Tensor& codes, const at::Tensor& params,
                               at::IntArrayRef fill) {
  MPL_CHECK_ARG(images.scalar_type() == at::kByte, "`images` must be a uint8 tensor, got ", images.scalar_type());
  MPL_CHECK_ARG(images.dim() == 4, "`images` must have shape (N, C, H, W), got ", images.dim(),
                " dimensions: ", images.sizes());
  const int64_t n = images.size(0), channels = images.size(1);
  MPL_CHECK_ARG(channels == 1 || channels == 3, "`images` must have 1 or 3 channels (dim 1), got ", channels);
  MPL_CHECK_ARG(channels * images.size(2) * images.size(3) < (int64_t(1) << 31),
                "`images` must have fewer than 2^31 values per image (the kernels index an image with int32), got ",
                channels, " x ", images.size(2), " x ", images.size(3));
  MPL_CHECK_ARG(codes.scalar_type() == at::kInt, "`codes` must be an int32 tensor, got ", codes.scalar_type());
  MPL_CHECK_ARG(codes.dim() == 2 && codes.size(0) == n, "`codes` must have shape (N, num_ops) with N = ", n,
                ", got ", codes.sizes());
  MPL_CHECK_ARG(params.scalar_type() == at::kFloat, "`params` must be a float32 tensor, got ",
                params.scalar_type());
  MPL_CHECK_ARG(params.dim() == 3 && params.size(0) == n && params.size(1) == codes.size(1) &&
                    params.size(2) == augment::kParamsPerOp,
                "`params` must have shape (N, num_ops, ", augment::kParamsPerOp, ") = (", n, ", ", codes.size(1),
                ", ", augment::kParamsPerOp, "), got ", params.sizes());
  check_same_device(images, "images", codes, "codes");
  check_same_device(images, "images", params, "params");
  MPL_CHECK_ARG(fill.size() == 1 || static_cast<int64_t>(fill.size()) == channels,
                "`fill` must have 1 or C = ", channels, " values, got ", fill.size());
  for (size_t i = 0; i < fill.size(); ++i)
    MPL_CHECK_ARG(fill[i] >= 0 && fill[i] <= 255, "`fill[", i, "]` must be in [0, 255], got ", fill[i]);
}

}  // namespace mpl_fast
