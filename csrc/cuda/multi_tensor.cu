// CUDA kernels of the multi-tensor ops (multi_tensor_dot, fused_sgd_), multi-tensor-apply
// style: the addresses and sizes of up to kDotTensors / kSgdTensors tensors travel in a
// fixed-size kernel-argument struct (under the classic 4 KB limit), one block per 64K-element
// chunk; longer lists, and lists mixing dtypes, take several launches. The dot writes one
// partial per chunk into a scratch buffer (8 bytes per 64K values) and a final one-block kernel
// sums them in index order: deterministic and free of host syncs.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <type_traits>
#include <utility>
#include <vector>

#include "multi_tensor.h"
#include "multi_tensor_checks.h"

namespace mpl_fast {
namespace {

constexpr int kThreads = 512;
constexpr int kDotTensors = 96;  // 96 * 32 B + 24 B = 3.1 KB of kernel arguments
constexpr int kSgdTensors = 64;  // 64 * 48 B + 16 B = 3.1 KB of kernel arguments

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

template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: f(c10::BFloat16{}); break;  // the checks admit only these four
  }
}

at::Tensor multi_tensor_dot_cuda(at::TensorList xs, at::TensorList ys,
                                 const c10::optional<at::Tensor>& found_inf) {
  at::Device device(at::kCUDA);
  const auto pairs = prepare_dot_pairs(xs, ys, found_inf, &device);
  c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();

  // Chunks are numbered in list order, whatever launch handles them.
  std::vector<int64_t> first_partial(pairs.size());
  int64_t total_chunks = 0;
  for (size_t k = 0; k < pairs.size(); ++k) {
    first_partial[k] = total_chunks;
    total_chunks += (pairs[k].first.numel() + kCudaChunk - 1) / kCudaChunk;
  }
  // Scratch: one fp64 partial per chunk. Partials of one launch are contiguous, so each
  // launch takes a run of same-dtype tensors that are also consecutive in the list.
  at::Tensor partials = at::empty({total_chunks}, at::TensorOptions().dtype(at::kDouble).device(device));
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(device));

  size_t k = 0;
  while (k < pairs.size()) {
    const at::ScalarType xt = pairs[k].first.scalar_type(), yt = pairs[k].second.scalar_type();
    DotLaunch args{};
    args.partial_offset = first_partial[k];
    int64_t blocks = 0;
    while (k < pairs.size() && args.num_tensors < kDotTensors &&
           pairs[k].first.scalar_type() == xt && pairs[k].second.scalar_type() == yt) {
      const int j = args.num_tensors++;
      args.x[j] = pairs[k].first.const_data_ptr();
      args.y[j] = pairs[k].second.const_data_ptr();
      args.n[j] = pairs[k].first.numel();
      args.first_block[j] = blocks;
      blocks += (args.n[j] + kCudaChunk - 1) / kCudaChunk;
      ++k;
    }
    dispatch_float(xt, [&](auto x_tag) {
      dispatch_float(yt, [&](auto y_tag) {
        using X = decltype(x_tag);
        using Y = decltype(y_tag);
        dot_chunks_kernel<X, Y><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            args, partials.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  float* flag = (found_inf.has_value() && found_inf->defined()) ? found_inf->mutable_data_ptr<float>() : nullptr;
  dot_finish_kernel<<<1, kThreads, 0, stream>>>(partials.const_data_ptr<double>(), total_chunks,
                                                out.mutable_data_ptr<float>(), flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor multi_tensor_dot_plain_cuda(at::TensorList xs, at::TensorList ys) {
  return multi_tensor_dot_cuda(xs, ys, c10::nullopt);
}

at::Tensor multi_tensor_dot_found_inf_cuda(at::TensorList xs, at::TensorList ys, at::Tensor& found_inf) {
  return multi_tensor_dot_cuda(xs, ys, found_inf);
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
__global__ void __launch_bounds__(kThreads) sgd_chunks_kernel(SgdLaunch args, SgdHyper<at::opmath_type<scalar_t>> h,
                                                              LrSource lr, const float* found_inf,
                                                              float* found_inf_out) {
  using acc_t = at::opmath_type<scalar_t>;
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

template <typename scalar_t>
void launch_sgd(const SgdLaunch& args, int64_t blocks, const SgdArgs& a, const LrSource& lr,
                const float* found_inf, float* found_inf_out, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const SgdHyper<acc_t> h{static_cast<acc_t>(lr.value), static_cast<acc_t>(a.momentum),
                          static_cast<acc_t>(1.0 - a.dampening), static_cast<acc_t>(a.weight_decay),
                          a.nesterov, a.maximize, a.first_step};
  const bool momentum = a.momentum != 0, update = args.upd[0] != nullptr;
  const dim3 grid(static_cast<unsigned>(blocks));
#define MPL_SGD_LAUNCH(M, U)                                                                  \
  sgd_chunks_kernel<scalar_t, M, U><<<grid, kThreads, 0, stream>>>(args, h, lr, found_inf, \
                                                                   found_inf_out)
  if (momentum && update) MPL_SGD_LAUNCH(true, true);
  else if (momentum) MPL_SGD_LAUNCH(true, false);
  else if (update) MPL_SGD_LAUNCH(false, true);
  else MPL_SGD_LAUNCH(false, false);
#undef MPL_SGD_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fused_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList update_out, double lr, const c10::optional<at::Tensor>& lr_tensor,
                    double momentum, double dampening, double weight_decay, bool nesterov,
                    bool maximize, bool first_step, const c10::optional<at::Tensor>& found_inf,
                    const c10::optional<at::Tensor>& found_inf_out) {
  const SgdArgs a{lr, lr_tensor, momentum, dampening, weight_decay, nesterov, maximize, first_step};
  const auto grads_read =
      prepare_sgd_lists(params, grads, momentum_buffers, update_out, a, found_inf, found_inf_out);
  if (params.empty()) return;
  c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();

  LrSource lr_source{lr, nullptr, false};
  at::Tensor lr_device;  // keeps a converted copy alive until the launches are queued
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    if (lr_tensor->device().is_cpu()) {
      lr_source.value = lr_tensor->item<double>();  // a CPU tensor: read on the host, no sync
    } else {
      lr_device = (lr_tensor->scalar_type() == at::kFloat || lr_tensor->scalar_type() == at::kDouble)
                      ? *lr_tensor : lr_tensor->to(at::kFloat);  // tiny scratch for other dtypes
      lr_source.ptr = lr_device.const_data_ptr();
      lr_source.is_double = lr_device.scalar_type() == at::kDouble;
    }
  }
  const float* skip = (found_inf.has_value() && found_inf->defined()) ? found_inf->const_data_ptr<float>() : nullptr;
  float* report = (found_inf_out.has_value() && found_inf_out->defined())
                      ? found_inf_out->mutable_data_ptr<float>() : nullptr;
  const bool with_update = !update_out.empty();

  size_t i = 0;
  while (i < params.size()) {
    const at::ScalarType dtype = params[i].scalar_type();
    SgdLaunch args{};
    int64_t blocks = 0;
    // Consecutive tensors of one dtype share a launch; empty tensors need no block.
    while (i < params.size() && args.num_tensors < kSgdTensors && params[i].scalar_type() == dtype) {
      if (params[i].numel() > 0) {
        const int j = args.num_tensors++;
        args.p[j] = params[i].mutable_data_ptr();
        args.g[j] = grads_read[i].const_data_ptr();
        args.buf[j] = momentum != 0 ? momentum_buffers[i].mutable_data_ptr() : nullptr;
        args.upd[j] = with_update ? update_out[i].mutable_data_ptr() : nullptr;
        args.n[j] = params[i].numel();
        args.first_block[j] = blocks;
        blocks += (args.n[j] + kCudaChunk - 1) / kCudaChunk;
      }
      ++i;
    }
    if (args.num_tensors == 0) continue;
    dispatch_float(dtype, [&](auto tag) {
      launch_sgd<decltype(tag)>(args, blocks, a, lr_source, skip, report, stream);
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mpl_fast, CUDA, m) {
  m.impl("multi_tensor_dot", &multi_tensor_dot_plain_cuda);
  m.impl("multi_tensor_dot.found_inf", &multi_tensor_dot_found_inf_cuda);
  m.impl("fused_sgd_", &fused_sgd_cuda);
}

}  // namespace mpl_fast
