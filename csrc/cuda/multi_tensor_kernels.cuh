// CUDA kernels of the multi-tensor ops (multi_tensor_dot, fused_sgd_) and their launch planning,
// free of ATen so that the same code also runs under the SIMT emulator (tests/emulated_build.py);
// csrc/cuda/multi_tensor.cu is the ATen glue.
//
// Multi-tensor-apply style: the addresses and sizes of up to kDotTensors / kSgdTensors tensors
// travel in a fixed-size kernel-argument struct (under the classic 4 KB limit), one block per
// 64K-element chunk; longer lists, and lists mixing dtypes, take several launches. The dot
// writes one partial per chunk into a scratch buffer (8 bytes per 64K values) and a final
// one-block kernel sums them in index order: deterministic and free of host syncs.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "cuda/launch.cuh"
#include "multi_tensor.h"

namespace mpl_fast {
namespace {

constexpr int kThreads = 512;
constexpr int kDotTensors = 96;  // 96 * 32 B + 24 B = 3.1 KB of kernel arguments
constexpr int kSgdTensors = 64;  // 64 * 48 B + 16 B = 3.1 KB of kernel arguments

// The four dtypes the checks admit, as the planning sees them (the glue maps ScalarType).
enum class FloatKind : int32_t { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

// at::opmath_type of those four: float, except double for double.
template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename F>
void dispatch_float(FloatKind t, F&& f) {
  switch (t) {
    case FloatKind::kFloat: f(float{}); break;
    case FloatKind::kDouble: f(double{}); break;
    case FloatKind::kHalf: f(c10::Half{}); break;
    default: f(c10::BFloat16{}); break;
  }
}

// ------------------------------------------------------------------ block reduction

// Fixed shuffle tree then fixed shared-memory tree: the same bits on every run.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;  // valid in thread 0
}

// Which tensor of the launch block b belongs to: first_block is a prefix sum of chunk counts.
__device__ inline int tensor_of_block(const int64_t* first_block, int num_tensors, int64_t b) {
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_block[mid] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// ------------------------------------------------------------------ multi_tensor_dot

struct DotLaunch {
  const void* x[kDotTensors];
  const void* y[kDotTensors];
  int64_t n[kDotTensors];
  int64_t first_block[kDotTensors];
  int num_tensors;
  int64_t partial_offset;  // index of this launch's first chunk in the partials buffer
};

template <typename X, typename Y>
using dot_acc_t = std::conditional_t<std::is_same_v<X, double> || std::is_same_v<Y, double>,
                                     double, float>;

template <typename X, typename Y>
__global__ void __launch_bounds__(kThreads) dot_chunks_kernel(DotLaunch args, double* partials) {
  using acc_t = dot_acc_t<X, Y>;
  const int t = tensor_of_block(args.first_block, args.num_tensors, blockIdx.x);
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) - args.first_block[t]) * kCudaChunk;
  const int64_t n = min(args.n[t] - begin, kCudaChunk);
  const X* __restrict__ x = static_cast<const X*>(args.x[t]) + begin;
  const Y* __restrict__ y = static_cast<const Y*>(args.y[t]) + begin;
  // Four independent accumulators keep four loads of each input in flight per thread.
  acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t i = threadIdx.x;
  for (; i + 3 * kThreads < n; i += 4 * kThreads) {
    a0 += static_cast<acc_t>(x[i]) * static_cast<acc_t>(y[i]);
    a1 += static_cast<acc_t>(x[i + kThreads]) * static_cast<acc_t>(y[i + kThreads]);
    a2 += static_cast<acc_t>(x[i + 2 * kThreads]) * static_cast<acc_t>(y[i + 2 * kThreads]);
    a3 += static_cast<acc_t>(x[i + 3 * kThreads]) * static_cast<acc_t>(y[i + 3 * kThreads]);
  }
  for (; i < n; i += kThreads) a0 += static_cast<acc_t>(x[i]) * static_cast<acc_t>(y[i]);
  const acc_t sum = block_sum<acc_t>((a0 + a1) + (a2 + a3));
  if (threadIdx.x == 0) partials[args.partial_offset + blockIdx.x] = static_cast<double>(sum);
}

__global__ void __launch_bounds__(kThreads) dot_finish_kernel(const double* partials, int64_t count,
                                                             float* out, float* found_inf) {
  double v = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) v += partials[i];
  v = block_sum<double>(v);
  if (threadIdx.x == 0) {
    const float result = static_cast<float>(v);
    *out = result;
    // inf/nan inputs always make the sum non-finite (inf*0, inf-inf are nan).
    if (found_inf != nullptr && !isfinite(result)) *found_inf = 1.0f;
  }
}

// One (x, y) pair of the dot, as the planning needs it: device addresses, length, dtypes.
struct DotPairRef {
  const void* x;
  const void* y;
  int64_t n;
  FloatKind x_kind, y_kind;
};

inline int64_t chunks_of(int64_t n) { return (n + kCudaChunk - 1) / kCudaChunk; }

// Size of the partials buffer launch_multi_tensor_dot needs: one fp64 value per chunk.
inline int64_t dot_partials_count(const DotPairRef* pairs, size_t count) {
  int64_t total = 0;
  for (size_t k = 0; k < count; ++k) total += chunks_of(pairs[k].n);
  return total;
}

// The whole dot: one chunk launch per run of consecutive same-dtype pairs (at most kDotTensors
// each; chunks are numbered in list order whatever launch handles them, so each launch's
// partials are contiguous), then the finish kernel. `out` receives the float32 result.
inline void launch_multi_tensor_dot(const DotPairRef* pairs, size_t count, double* partials, float* out,
                                    float* found_inf, cudaStream_t stream) {
  int64_t next_partial = 0;
  size_t k = 0;
  while (k < count) {
    const FloatKind xt = pairs[k].x_kind, yt = pairs[k].y_kind;
    DotLaunch args{};
    args.partial_offset = next_partial;
    int64_t blocks = 0;
    while (k < count && args.num_tensors < kDotTensors && pairs[k].x_kind == xt && pairs[k].y_kind == yt) {
      const int j = args.num_tensors++;
      args.x[j] = pairs[k].x;
      args.y[j] = pairs[k].y;
      args.n[j] = pairs[k].n;
      args.first_block[j] = blocks;
      blocks += chunks_of(args.n[j]);
      ++k;
    }
    next_partial += blocks;
    // Only empty tensors (the glue drops them, the planning does not rely on it): a launch of
    // zero blocks is an invalid configuration on a GPU.
    if (blocks == 0) continue;
    dispatch_float(xt, [&](auto x_tag) {
      dispatch_float(yt, [&](auto y_tag) {
        using X = decltype(x_tag);
        using Y = decltype(y_tag);
        MPL_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, dot_chunks_kernel<X, Y>)(args, partials);
        MPL_LAUNCH_CHECK();
      });
    });
  }
  MPL_LAUNCH(1, kThreads, 0, stream, dot_finish_kernel)(partials, next_partial, out, found_inf);
  MPL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------ fused_sgd_

struct SgdLaunch {
  void* p[kSgdTensors];
  const void* g[kSgdTensors];
  void* buf[kSgdTensors];
  void* upd[kSgdTensors];
  int64_t n[kSgdTensors];
  int64_t first_block[kSgdTensors];
  int num_tensors;
};

// lr from a device tensor (float32 or float64) when given, so a scheduler never syncs.
struct LrSource {
  double value;
  const void* ptr;
  bool is_double;
};

template <typename scalar_t, bool kMomentum, bool kUpdate>
__global__ void __launch_bounds__(kThreads) sgd_chunks_kernel(SgdLaunch args, SgdHyper<opmath_t<scalar_t>> h,
                                                              LrSource lr, const float* found_inf,
                                                              float* found_inf_out) {
  using acc_t = opmath_t<scalar_t>;
  const int t = tensor_of_block(args.first_block, args.num_tensors, blockIdx.x);
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) - args.first_block[t]) * kCudaChunk;
  const int64_t n = min(args.n[t] - begin, kCudaChunk);
  scalar_t* __restrict__ p = static_cast<scalar_t*>(args.p[t]) + begin;
  const scalar_t* __restrict__ g = static_cast<const scalar_t*>(args.g[t]) + begin;
  scalar_t* __restrict__ buf = kMomentum ? static_cast<scalar_t*>(args.buf[t]) + begin : nullptr;
  scalar_t* __restrict__ upd = kUpdate ? static_cast<scalar_t*>(args.upd[t]) + begin : nullptr;
  if (found_inf != nullptr && *found_inf != 0.0f) {  // skipped step: the applied update is 0
    if constexpr (kUpdate) {
      for (int64_t i = threadIdx.x; i < n; i += kThreads) upd[i] = scalar_t(0);
    }
    return;
  }
  if (lr.ptr != nullptr) {
    h.lr = static_cast<acc_t>(lr.is_double ? *static_cast<const double*>(lr.ptr)
                                           : static_cast<double>(*static_cast<const float*>(lr.ptr)));
  }
  bool nonfinite = false;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const acc_t p_old = static_cast<acc_t>(p[i]);
    const acc_t gi = static_cast<acc_t>(g[i]);
    acc_t b = kMomentum ? static_cast<acc_t>(buf[i]) : acc_t(0);
    const scalar_t p_new = static_cast<scalar_t>(sgd_element<acc_t>(p_old, gi, b, h));
    p[i] = p_new;
    if constexpr (kMomentum) buf[i] = static_cast<scalar_t>(b);
    if constexpr (kUpdate) upd[i] = static_cast<scalar_t>(static_cast<acc_t>(p_new) - p_old);
    nonfinite |= !isfinite(gi) || !isfinite(static_cast<acc_t>(p_new));
  }
  if (found_inf_out != nullptr) {
    // Every block that sees an inf/nan writes the same 1: a benign race.
    if (__syncthreads_or(nonfinite) && threadIdx.x == 0) *found_inf_out = 1.0f;
  }
}

// The scalar arguments of fused_sgd_ (lr_tensor, if any, arrives as an LrSource).
struct SgdScalars {
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
  bool first_step;
};

template <typename scalar_t>
void launch_sgd(const SgdLaunch& args, int64_t blocks, const SgdScalars& a, const LrSource& lr,
                const float* found_inf, float* found_inf_out, cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  const SgdHyper<acc_t> h{static_cast<acc_t>(lr.value), static_cast<acc_t>(a.momentum),
                          static_cast<acc_t>(1.0 - a.dampening), static_cast<acc_t>(a.weight_decay),
                          a.nesterov, a.maximize, a.first_step};
  const bool momentum = a.momentum != 0, update = args.upd[0] != nullptr;
  const dim3 grid(static_cast<unsigned>(blocks));
#define MPL_SGD_LAUNCH(M, U) \
  MPL_LAUNCH(grid, kThreads, 0, stream, sgd_chunks_kernel<scalar_t, M, U>)(args, h, lr, found_inf, found_inf_out)
  if (momentum && update) MPL_SGD_LAUNCH(true, true);
  else if (momentum) MPL_SGD_LAUNCH(true, false);
  else if (update) MPL_SGD_LAUNCH(false, true);
  else MPL_SGD_LAUNCH(false, false);
#undef MPL_SGD_LAUNCH
  MPL_LAUNCH_CHECK();
}

// One tensor of fused_sgd_: param, grad (as read), momentum buffer and update_out (nullptr
// when absent), length and dtype.
struct SgdTensorRef {
  void* p;
  const void* g;
  void* buf;
  void* upd;
  int64_t n;
  FloatKind kind;
};

// The whole step: one launch per run of consecutive same-dtype tensors (at most kSgdTensors
// each); empty tensors take no block. `skip` (found_inf) and `report` (found_inf_out) may be
// nullptr.
inline void launch_fused_sgd(const SgdTensorRef* tensors, size_t count, const SgdScalars& a, const LrSource& lr,
                             const float* skip, float* report, cudaStream_t stream) {
  size_t i = 0;
  while (i < count) {
    const FloatKind kind = tensors[i].kind;
    SgdLaunch args{};
    int64_t blocks = 0;
    while (i < count && args.num_tensors < kSgdTensors && tensors[i].kind == kind) {
      if (tensors[i].n > 0) {
        const int j = args.num_tensors++;
        args.p[j] = tensors[i].p;
        args.g[j] = tensors[i].g;
        args.buf[j] = tensors[i].buf;
        args.upd[j] = tensors[i].upd;
        args.n[j] = tensors[i].n;
        args.first_block[j] = blocks;
        blocks += chunks_of(args.n[j]);
      }
      ++i;
    }
    if (args.num_tensors == 0) continue;
    dispatch_float(kind, [&](auto tag) { launch_sgd<decltype(tag)>(args, blocks, a, lr, skip, report, stream); });
  }
}

}  // namespace
}  // namespace mpl_fast
