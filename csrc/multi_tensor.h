// Per-element math shared by the CPU and CUDA kernels of the multi-tensor ops
// (multi_tensor_dot, fused_sgd_): the fixed chunk sizes that make results independent of the
// thread count, and one SGD element update with exactly torch.optim.SGD's order of operations.
#pragma once

#include <cstdint>

#if !defined(MPL_HOST_DEVICE)
#if defined(__CUDACC__)
#define MPL_HOST_DEVICE __host__ __device__
#else
#define MPL_HOST_DEVICE
#endif
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

// One element of torch.optim.SGD's step, in its order of operations (all in acc_t):
//   d = maximize ? -g : g;  d += wd * p;
//   buf = first_step ? d : momentum * buf + one_minus_dampening * d;
//   d = nesterov ? d + momentum * buf : buf;   p -= lr * d.
// `buf` is read and written only when momentum != 0.
template <typename acc_t>
MPL_HOST_DEVICE inline acc_t sgd_element(acc_t p, acc_t g, acc_t& buf, const SgdHyper<acc_t>& h) {
  acc_t d = h.maximize ? -g : g;
  if (h.weight_decay != acc_t(0)) d = d + h.weight_decay * p;
  if (h.momentum != acc_t(0)) {
    buf = h.first_step ? d : h.momentum * buf + h.one_minus_dampening * d;
    d = h.nesterov ? d + h.momentum * buf : buf;
  }
  return p - h.lr * d;
}

}  // namespace mpl_fast
