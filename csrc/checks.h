// Argument checks shared by every kernel. Each message names the argument (and the list
// index when there is one), what was expected and what came, so a user never has to read
// a bare "Expected a.sizes() == b.sizes()".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mpl_fast {

// TORCH_CHECK_VALUE raises a Python ValueError.
#define MPL_CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, "mpl_fast: ", __VA_ARGS__)

inline void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name) {
  MPL_CHECK_ARG(a.sizes() == b.sizes(), "`", b_name, "` must have the shape of `", a_name,
                "` ", a.sizes(), ", got ", b.sizes());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  MPL_CHECK_ARG(a.device() == b.device(), "`", b_name, "` is on ", b.device(), " but `",
                a_name, "` is on ", a.device());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  MPL_CHECK_ARG(at::isFloatingType(t.scalar_type()), "`", name,
                "` must be a floating-point tensor, got ", t.scalar_type());
}

}  // namespace mpl_fast
