// Per-element math shared by the CPU and CUDA kernels of the multi-tensor ops
// (multi_tensor_dot, fused_sgd_): the fixed chunk sizes that make results independent of the
// thread count, and one SGD element update with exactly torch.optim.SGD's order of operations.
#pragma once

#include <cstdint>
#include <type_traits>
#if !defined(__CUDA_ARCH__)
#include <bit>
#endif

#if !defined(MPL_HOST_DEVICE)
#if defined(__CUDACC__)
#define MPL_HOST_DEVICE __host__ __device__
#else
#define MPL_HOST_DEVICE
#endif
#endif

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
//   d = maximize ? -g : g;  d += wd * p (when wd != 0);
//   buf = first_step ? d : momentum * buf + one_minus_dampening * d;       (momentum != 0)
//   d = nesterov ? d + momentum * buf : buf;                                (momentum != 0)
//   p -= lr * d.
// Written as selects (pick), never branches, so CPU loops over it vectorise; the unused side
// of each select is computed but discarded, so the result is torch's exactly.
// `buf` is left unchanged when momentum == 0.
template <typename acc_t>
MPL_HOST_DEVICE MPL_INLINE acc_t sgd_element(acc_t p, acc_t g, acc_t& buf, const SgdHyper<acc_t>& h) {
  const bool has_momentum = h.momentum != acc_t(0);
  acc_t d = pick(h.maximize, -g, g);
  d = pick(h.weight_decay != acc_t(0), d + h.weight_decay * p, d);
  const acc_t new_buf = pick(h.first_step, d, h.momentum * buf + h.one_minus_dampening * d);
  const acc_t step = pick(has_momentum, pick(h.nesterov, d + h.momentum * new_buf, new_buf), d);
  buf = pick(has_momentum, new_buf, buf);
  return p - h.lr * step;
}

}  // namespace mpl_fast
