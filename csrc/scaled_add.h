// Per-element math of the smoke op `scaled_add`, shared by the CPU and CUDA kernels.
// It exists to prove the whole op path (schema, kernels, fake kernel, reference) end to end.
#pragma once

#include "host_device.h"

namespace mpl_fast {

template <typename scalar_t, typename acc_t>
MPL_HOST_DEVICE inline scalar_t scaled_add_one(scalar_t x, scalar_t y, acc_t alpha) {
  return static_cast<scalar_t>(static_cast<acc_t>(x) + alpha * static_cast<acc_t>(y));
}

}  // namespace mpl_fast
