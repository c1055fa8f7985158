// Per-element math shared by the CPU and CUDA kernels of the multi-tensor ops
// (multi_tensor_dot, fused_sgd_): the fixed chunk sizes that make results independent of the
// thread count, and one SGD element update with exactly torch.optim.SGD's order of operations.
#pragma once

#include <cstdint>
#include <type_traits>
#if !defined(__CUDA_ARCH__)
#include <bit>
#endif

#include "host_device.h"

// Force-inlined: the CPU kernels are also compiled as AVX2 clones (cpu/cpu_isa.h), and GCC
// only inlines a default-target function into one of those when told to.
#if defined(__CUDACC__)
#define MPL_INLINE __forceinline__
#elif defined(__GNUC__)
#define MPL_INLINE inline __attribute__((always_inline))
#else
#define MPL_INLINE inline
#endif

namespace mpl_fast {

// Work is cut into chunks of a fixed number of elements (never "one piece per thread"), each
// chunk reduced into its own partial, and the partials summed in index order: the same inputs
// give the same bits whatever the number of threads or blocks.
constexpr int64_t kCpuChunk = int64_t{1} << 15;
constexpr int64_t kCudaChunk = int64_t{1} << 16;

template <typename acc_t>
struct SgdHyper {
  acc_t lr;
  acc_t momentum;
  acc_t one_minus_dampening;  // 1 - dampening, rounded once on the host as torch does
  acc_t weight_decay;
  bool nesterov;
  bool maximize;
  bool first_step;  // momentum buffers hold nothing yet: buf = d_p instead of momentum*buf + ...
};

// cond ? a : b for a loop-invariant cond. On the CPU as a bit mask: GCC keeps a ternary on an
// invariant flag as control flow and then refuses to vectorise the loop; a mask blend
// vectorises and is exact (the unused side is computed and discarded).
template <typename acc_t>
MPL_HOST_DEVICE MPL_INLINE acc_t pick(bool cond, acc_t a, acc_t b) {
#if defined(__CUDA_ARCH__)
  return cond ? a : b;
#else
  using bits_t = std::conditional_t<sizeof(acc_t) == 8, uint64_t, uint32_t>;
  const bits_t mask = bits_t(0) - static_cast<bits_t>(cond);
  return std::bit_cast<acc_t>((std::bit_cast<bits_t>(a) & mask) | (std::bit_cast<bits_t>(b) & ~mask));
#endif
}

// One element of torch.optim.SGD's step, in its order of operations (all in acc_t):
//   d = maximize ? -g : g;  d += wd * p                                    (wd != 0 only);
//   buf = first_step ? d : momentum * buf + one_minus_dampening * d;       (momentum != 0 only)
//   d = nesterov ? d + momentum * buf : buf;                                (momentum != 0 only)
//   p -= lr * d.
// The flags that change which operations run are template parameters (CPU loops then carry
// no control flow and vectorise); maximize and first_step are selects (pick) whose unused side
// is discarded, so the result is torch's exactly. `buf` is unchanged when !kMomentum.
template <typename acc_t, bool kMomentum, bool kNesterov, bool kWeightDecay>
MPL_HOST_DEVICE MPL_INLINE acc_t sgd_element_static(acc_t p, acc_t g, acc_t& buf, const SgdHyper<acc_t>& h) {
  acc_t d = g * pick(h.maximize, acc_t(-1), acc_t(1));  // exact: a sign flip or nothing
  if constexpr (kWeightDecay) d = d + h.weight_decay * p;
  if constexpr (kMomentum) {
    buf = pick(h.first_step, d, h.momentum * buf + h.one_minus_dampening * d);
    if constexpr (kNesterov) {
      d = d + h.momentum * buf;
    } else {
      d = buf;
    }
  }
  return p - h.lr * d;
}

// The same with the flags read at run time (the CUDA kernels: a uniform branch costs nothing
// there, and fewer template instantiations keep the .cu compile short).
template <typename acc_t>
MPL_HOST_DEVICE MPL_INLINE acc_t sgd_element(acc_t p, acc_t g, acc_t& buf, const SgdHyper<acc_t>& h) {
  const bool wd = h.weight_decay != acc_t(0);
  if (h.momentum == acc_t(0)) {
    return wd ? sgd_element_static<acc_t, false, false, true>(p, g, buf, h)
              : sgd_element_static<acc_t, false, false, false>(p, g, buf, h);
  }
  if (h.nesterov) {
    return wd ? sgd_element_static<acc_t, true, true, true>(p, g, buf, h)
              : sgd_element_static<acc_t, true, true, false>(p, g, buf, h);
  }
  return wd ? sgd_element_static<acc_t, true, false, true>(p, g, buf, h)
            : sgd_element_static<acc_t, true, false, false>(p, g, buf, h);
}

}  // namespace mpl_fast
