// CPU kernel of multi_tensor_dot: sum_i <xs[i], ys[i]> in one at::parallel_for over all
// (tensor, chunk) work items. Each fixed-size chunk is reduced into its own partial and the
// partials are summed in order, so the bits never depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/cpu_isa.h"
#include "multi_tensor.h"
#include "multi_tensor_checks.h"

namespace mpl_fast {
namespace {

// fp32 accumulation, fp64 when either side is fp64 (then nothing is lost to the fp32 sum).
template <typename X, typename Y>
using dot_acc_t = std::conditional_t<std::is_same_v<X, double> || std::is_same_v<Y, double>,
                                     double, float>;

// Dot of one chunk with kLanes independent accumulators: the inner loop has no dependency
// between lanes, so GCC -O3 vectorises it without -ffast-math, and the lanes are combined in
// a fixed tree order.
template <typename X, typename Y>
MPL_ALWAYS_INLINE double dot_body(const void* xv, const void* yv, int64_t n) {
  using acc_t = dot_acc_t<X, Y>;
  constexpr int kLanes = 32;
  const X* x = static_cast<const X*>(xv);
  const Y* y = static_cast<const Y*>(yv);
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += load_as<acc_t>(x[i + l]) * load_as<acc_t>(y[i + l]);
  }
  for (int l = 0; i < n; ++i, ++l) lanes[l] += load_as<acc_t>(x[i]) * load_as<acc_t>(y[i]);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return static_cast<double>(lanes[0]);
}

template <typename X, typename Y>
double dot_chunk(const void* x, const void* y, int64_t n) {
  return dot_body<X, Y>(x, y, n);
}

// The same body compiled for AVX2/FMA/F16C, chosen at run time (same machine, same bits).
template <typename X, typename Y>
MPL_TARGET_AVX2 double dot_chunk_avx2(const void* x, const void* y, int64_t n) {
  return dot_body<X, Y>(x, y, n);
}

using DotChunkFn = double (*)(const void*, const void*, int64_t);

template <typename X, typename Y>
DotChunkFn pick_isa() {
  return cpu_has_avx2() ? &dot_chunk_avx2<X, Y> : &dot_chunk<X, Y>;
}

template <typename X>
DotChunkFn pick_y(at::ScalarType y) {
  switch (y) {
    case at::kFloat: return pick_isa<X, float>();
    case at::kDouble: return pick_isa<X, double>();
    case at::kHalf: return pick_isa<X, c10::Half>();
    default: return pick_isa<X, c10::BFloat16>();  // the checks admit only these four
  }
}

DotChunkFn pick_dot_chunk(at::ScalarType x, at::ScalarType y) {
  switch (x) {
    case at::kFloat: return pick_y<float>(y);
    case at::kDouble: return pick_y<double>(y);
    case at::kHalf: return pick_y<c10::Half>(y);
    default: return pick_y<c10::BFloat16>(y);
  }
}

struct DotItem {
  const char* x;
  const char* y;
  int64_t n;
  DotChunkFn fn;
};

at::Tensor multi_tensor_dot_cpu(at::TensorList xs, at::TensorList ys,
                                const c10::optional<at::Tensor>& found_inf) {
  at::Device device(at::kCPU);
  const auto pairs = prepare_dot_pairs(xs, ys, found_inf, &device);
  // Host scratch: one descriptor and one fp64 partial per chunk (~40 bytes per 32K values).
  std::vector<DotItem> items;
  int64_t total_elems = 0;
  for (const auto& [x, y] : pairs) {
    const DotChunkFn fn = pick_dot_chunk(x.scalar_type(), y.scalar_type());
    const auto* xp = static_cast<const char*>(x.const_data_ptr());
    const auto* yp = static_cast<const char*>(y.const_data_ptr());
    const int64_t n = x.numel(), xs_ = x.element_size(), ys_ = y.element_size();
    for (int64_t begin = 0; begin < n; begin += kCpuChunk) {
      items.push_back({xp + begin * xs_, yp + begin * ys_, std::min(kCpuChunk, n - begin), fn});
    }
    total_elems += n;
  }
  std::vector<double> partials(items.size());
  // Small jobs run on the calling thread: waking the pool costs more than it saves.
  const int64_t grain = total_elems < 4 * kCpuChunk ? static_cast<int64_t>(items.size()) + 1 : 1;
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const DotItem& it = items[k];
      partials[k] = it.fn(it.x, it.y, it.n);
    }
  });
  double total = 0;
  for (double p : partials) total += p;
  const float result = static_cast<float>(total);
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(device));
  *out.mutable_data_ptr<float>() = result;
  // A non-finite input can never give a finite sum of products (inf*0 and inf-inf are nan),
  // so checking the result catches every one; an fp32 overflow of finite values is flagged too.
  if (found_inf.has_value() && found_inf->defined() && !std::isfinite(result)) {
    *found_inf->mutable_data_ptr<float>() = 1.0f;
  }
  return out;
}

at::Tensor multi_tensor_dot_plain_cpu(at::TensorList xs, at::TensorList ys) {
  return multi_tensor_dot_cpu(xs, ys, c10::nullopt);
}

at::Tensor multi_tensor_dot_found_inf_cpu(at::TensorList xs, at::TensorList ys, at::Tensor& found_inf) {
  return multi_tensor_dot_cpu(xs, ys, found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(mpl_fast, CPU, m) {
  m.impl("multi_tensor_dot", &multi_tensor_dot_plain_cpu);
  m.impl("multi_tensor_dot.found_inf", &multi_tensor_dot_found_inf_cpu);
}

}  // namespace mpl_fast
