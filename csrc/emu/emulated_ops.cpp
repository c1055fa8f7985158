// The emulated CUDA ops: the kernels and launch planning of csrc/cuda/*_kernels.cuh, compiled by
// the host compiler on top of the SIMT emulator (csrc/emu/simt.h), behind a C interface that
// tests/emulated_build.py loads with ctypes. "Device" pointers are host memory. Test-only: the
// extension never includes this file. Every entry point returns 0, or 1 with the error in
// mpl_emu_last_error().
//
// MPL_EMU_LAUNCH_BOUNDS (set by the build) lists {"kernel", bound} pairs read from the
// __launch_bounds__ of the kernel sources, so each launch is checked against them.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <exception>
#include <string>

#include "cuda/augment_kernels.cuh"
#include "cuda/multi_tensor_kernels.cuh"
#include "cuda/scaled_add_kernels.cuh"

MPL_EMU_DEFINE_BOUNDS_HANDLER

#ifndef MPL_EMU_LAUNCH_BOUNDS
#define MPL_EMU_LAUNCH_BOUNDS
#endif

namespace mpl_fast {
namespace {

std::string& last_error() {
  static std::string message;
  return message;
}

void register_bounds() {
  static const bool done = [] {
    struct Bound {
      const char* kernel;
      int max_threads;
    };
    const Bound bounds[] = {{"", 0}, MPL_EMU_LAUNCH_BOUNDS};
    for (const Bound& b : bounds)
      if (b.kernel[0] != '\0') ::mpl_emu::register_launch_bounds(b.kernel, b.max_threads);
    return true;
  }();
  (void)done;
}

template <typename F>
int guarded(F&& f) {
  register_bounds();
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error() = e.what();
    return 1;
  }
}

}  // namespace
}  // namespace mpl_fast

using namespace mpl_fast;

// The build hides every symbol (-fvisibility=hidden) but these.
#define MPL_EMU_EXPORT __attribute__((visibility("default")))

extern "C" {

MPL_EMU_EXPORT const char* mpl_emu_last_error() { return last_error().c_str(); }

MPL_EMU_EXPORT void mpl_emu_set_seed(uint64_t seed) { ::mpl_emu::set_seed(seed); }

MPL_EMU_EXPORT int64_t mpl_emu_dot_partials_count(int64_t count, const int64_t* n) {
  int64_t total = 0;
  for (int64_t k = 0; k < count; ++k) total += chunks_of(n[k]);
  return total;
}

MPL_EMU_EXPORT int mpl_emu_multi_tensor_dot(int64_t count, const void* const* xs, const void* const* ys, const int64_t* n,
                             const int32_t* x_kind, const int32_t* y_kind, double* partials, float* out,
                             float* found_inf) {
  return guarded([&] {
    std::vector<DotPairRef> refs(count);
    for (int64_t k = 0; k < count; ++k)
      refs[k] = {xs[k], ys[k], n[k], static_cast<FloatKind>(x_kind[k]), static_cast<FloatKind>(y_kind[k])};
    if (dot_partials_count(refs.data(), refs.size()) != mpl_emu_dot_partials_count(count, n))
      throw ::mpl_emu::Error("partials count disagrees");
    launch_multi_tensor_dot(refs.data(), refs.size(), partials, out, found_inf, nullptr);
  });
}

MPL_EMU_EXPORT int mpl_emu_fused_sgd(int64_t count, void* const* p, const void* const* g, void* const* buf, void* const* upd,
                      const int64_t* n, const int32_t* kind, double lr, const void* lr_ptr, int lr_is_double,
                      double momentum, double dampening, double weight_decay, int nesterov, int maximize,
                      int first_step, const float* skip, float* report) {
  return guarded([&] {
    std::vector<SgdTensorRef> refs(count);
    for (int64_t i = 0; i < count; ++i)
      refs[i] = {p[i], g[i], buf == nullptr ? nullptr : buf[i], upd == nullptr ? nullptr : upd[i], n[i],
                 static_cast<FloatKind>(kind[i])};
    const SgdScalars scalars{momentum, dampening, weight_decay, nesterov != 0, maximize != 0, first_step != 0};
    const LrSource lr_source{lr, lr_ptr, lr_is_double != 0};
    launch_fused_sgd(refs.data(), refs.size(), scalars, lr_source, skip, report, nullptr);
  });
}

MPL_EMU_EXPORT int mpl_emu_augment_needs_scratch(int64_t C, int64_t H, int64_t W) { return plan_augment(C, H, W).in_shared ? 0 : 1; }

MPL_EMU_EXPORT int mpl_emu_augment(const uint8_t* images, uint8_t* out, uint8_t* scratch, const int32_t* codes, const float* params,
                    int64_t n, int64_t num_ops, int64_t C, int64_t H, int64_t W, const uint8_t* fill) {
  return guarded([&] {
    launch_augment(plan_augment(C, H, W), images, out, scratch, codes, params, n, num_ops, C, H, W, fill, nullptr);
  });
}

MPL_EMU_EXPORT int mpl_emu_scaled_add(int32_t kind, const void* x, const void* y, void* out, double alpha, int64_t n) {
  return guarded([&] {
    dispatch_float(static_cast<FloatKind>(kind), [&](auto tag) {
      using T = decltype(tag);
      using A = opmath_t<T>;
      launch_scaled_add(static_cast<const T*>(x), static_cast<const T*>(y), static_cast<T*>(out),
                        static_cast<A>(alpha), n, nullptr);
    });
  });
}

}  // extern "C"
