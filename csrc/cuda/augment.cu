// CUDA kernel of `augment_apply`: ONE launch for the whole batch and all its ops. One block per
// image runs that image's op sequence, with __syncthreads() between ops; the per-channel
// reductions of Contrast, AutoContrast and Equalize use shared memory (integer atomics, so the
// result is deterministic). Small images (both buffers within kSmemBudget) live in shared memory
// for the whole sequence; larger ones ping-pong between the output and one scratch batch of the
// same size (the only allocation besides the output; from the caching allocator, no sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "augment.h"
#include "augment_checks.h"
#include "checks.h"

namespace mpl_fast {
namespace {

using namespace augment;

constexpr int64_t kSmemBudget = 40 * 1024;  // bytes of dynamic shared memory for two images

struct Shared {
  int32_t hist[kMaxChannels][kHistBins];
  uint8_t lut[kMaxChannels][kHistBins];
  int32_t lo[kMaxChannels], hi[kMaxChannels];
  bool lut_valid[kMaxChannels];
  unsigned long long sum;
};

__device__ void copy_block(const uint8_t* src, uint8_t* dst, int32_t n) {
  for (int32_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

// One op of one image, by the whole block. `dst` may alias `src` unless needs_second_buffer().
// 32-bit indexing inside an image (check_augment_args bounds C * H * W below 2^31): 64-bit
// division and modulo are slow on the GPU.
__device__ void apply_one(int32_t code, const float* p, const uint8_t* fill, int32_t C, int32_t H, int32_t W,
                          const uint8_t* src, uint8_t* dst, Shared& sh) {
  const int32_t plane = H * W, numel = C * plane;
  const int32_t tid = threadIdx.x, nthreads = blockDim.x;
  switch (code) {
    case kAffine:
      for (int32_t i = tid; i < plane; i += nthreads) {
        const AffineRow row = affine_row(p, H, W, i / W);
        const int32_t source = affine_source_index(row, i % W);
        for (int32_t ch = 0; ch < C; ++ch) dst[ch * plane + i] = source >= 0 ? src[ch * plane + source] : fill[ch];
      }
      break;
    case kTranslate: {
      const auto dx = static_cast<int32_t>(fminf(fmaxf(p[0], -float(W)), float(W)));
      const auto dy = static_cast<int32_t>(fminf(fmaxf(p[1], -float(H)), float(H)));
      for (int32_t i = tid; i < plane; i += nthreads) {
        const int32_t source = translate_source_index(dx, dy, H, W, i / W, i % W);
        for (int32_t ch = 0; ch < C; ++ch) dst[ch * plane + i] = source >= 0 ? src[ch * plane + source] : fill[ch];
      }
      break;
    }
    case kBrightness:
      for (int32_t i = tid; i < numel; i += nthreads) dst[i] = blend(float(src[i]), 0.f, p[0], p[1]);
      break;
    case kColor:
      if (C == 3) {
        for (int32_t i = tid; i < plane; i += nthreads) {
          const uint8_t r = src[i], g = src[plane + i], b = src[2 * plane + i];
          const float gray = float(grayscale(r, g, b));
          dst[i] = blend(float(r), gray, p[0], p[1]);
          dst[plane + i] = blend(float(g), gray, p[0], p[1]);
          dst[2 * plane + i] = blend(float(b), gray, p[0], p[1]);
        }
      } else if (dst != src) {
        copy_block(src, dst, numel);
      }
      break;
    case kContrast: {
      if (tid == 0) sh.sum = 0;
      __syncthreads();
      unsigned long long local = 0;
      for (int32_t i = tid; i < plane; i += nthreads)
        local += C == 3 ? grayscale(src[i], src[plane + i], src[2 * plane + i]) : src[i];
      atomicAdd(&sh.sum, local);
      __syncthreads();
      const float mean = mean_from_sum(static_cast<int64_t>(sh.sum), plane);
      for (int32_t i = tid; i < numel; i += nthreads) dst[i] = blend(float(src[i]), mean, p[0], p[1]);
      break;
    }
    case kSharpness:
      if (H <= 2 || W <= 2) {
        if (dst != src) copy_block(src, dst, numel);
        break;
      }
      for (int32_t i = tid; i < numel; i += nthreads) {
        const int32_t ch = i / plane, r = (i % plane) / W, c = i % W;
        const uint8_t* s = src + ch * plane;
        const bool border = r == 0 || c == 0 || r == H - 1 || c == W - 1;
        const uint8_t degenerate = border ? s[r * W + c] : smooth3x3(s, W, r, c);
        dst[i] = blend(float(src[i]), float(degenerate), p[0], p[1]);
      }
      break;
    case kPosterize:
      for (int32_t i = tid; i < numel; i += nthreads) dst[i] = posterize(src[i], p[0]);
      break;
    case kSolarize:
      for (int32_t i = tid; i < numel; i += nthreads) dst[i] = solarize(src[i], p[0]);
      break;
    case kInvert:
      for (int32_t i = tid; i < numel; i += nthreads) dst[i] = invert(src[i]);
      break;
    case kAutoContrast: {
      if (tid < C) {
        sh.lo[tid] = 255;
        sh.hi[tid] = 0;
      }
      __syncthreads();
      for (int32_t ch = 0; ch < C; ++ch) {
        int lo = 255, hi = 0;
        for (int32_t i = tid; i < plane; i += nthreads) {
          const int v = src[ch * plane + i];
          lo = min(lo, v);
          hi = max(hi, v);
        }
        atomicMin(&sh.lo[ch], lo);
        atomicMax(&sh.hi[ch], hi);
      }
      __syncthreads();
      for (int32_t i = tid; i < numel; i += nthreads) {
        const int32_t ch = i / plane;
        dst[i] = autocontrast(src[i], autocontrast_scale(sh.lo[ch], sh.hi[ch]));
      }
      break;
    }
    case kEqualize:
      for (int32_t i = tid; i < C * kHistBins; i += nthreads) sh.hist[i / kHistBins][i % kHistBins] = 0;
      __syncthreads();
      for (int32_t i = tid; i < numel; i += nthreads) atomicAdd(&sh.hist[i / plane][src[i]], 1);
      __syncthreads();
      if (tid < C) sh.lut_valid[tid] = equalize_lut(sh.hist[tid], sh.lut[tid]);
      __syncthreads();
      for (int32_t i = tid; i < numel; i += nthreads) {
        const int32_t ch = i / plane;
        dst[i] = sh.lut_valid[ch] ? sh.lut[ch][src[i]] : src[i];
      }
      break;
    case kCutout:
      for (int32_t i = tid; i < numel; i += nthreads) {
        const int32_t ch = i / plane, r = (i % plane) / W, c = i % W;
        dst[i] = in_cutout(p, r, c) ? fill[ch] : src[i];
      }
      break;
    default:  // kIdentity and unknown codes (the wrapper validates codes)
      if (dst != src) copy_block(src, dst, numel);
      break;
  }
  __syncthreads();  // the next op reads what this one wrote
}

constexpr int kMaxThreads = 512;

__global__ void __launch_bounds__(kMaxThreads) augment_kernel(const uint8_t* __restrict__ images, uint8_t* __restrict__ out,
                               uint8_t* __restrict__ scratch, const int32_t* __restrict__ codes,
                               const float* __restrict__ params, int64_t num_ops, int64_t C, int64_t H, int64_t W,
                               uint8_t fill0, uint8_t fill1, uint8_t fill2, bool in_shared) {
  extern __shared__ uint8_t smem[];
  __shared__ Shared sh;
  const uint8_t fill[kMaxChannels] = {fill0, fill1, fill2};
  const int64_t n = blockIdx.x, numel = C * H * W;
  const uint8_t* in = images + n * numel;
  uint8_t* final_out = out + n * numel;
  uint8_t* primary = final_out;
  uint8_t* secondary = scratch == nullptr ? nullptr : scratch + n * numel;
  const uint8_t* current = in;
  if (in_shared) {
    primary = smem;
    secondary = smem + numel;
    copy_block(in, primary, static_cast<int32_t>(numel));
    __syncthreads();
    current = primary;
  }
  const int32_t* my_codes = codes + n * num_ops;
  const float* my_params = params + n * num_ops * kParamsPerOp;
  for (int64_t k = 0; k < num_ops; ++k) {
    const int32_t code = my_codes[k];
    if (code == kIdentity) continue;
    uint8_t* target;
    if (!needs_second_buffer(code)) {
      target = current == in ? primary : const_cast<uint8_t*>(current);
    } else {
      target = current == primary ? secondary : primary;
    }
    apply_one(code, my_params + k * kParamsPerOp, fill, static_cast<int32_t>(C), static_cast<int32_t>(H),
              static_cast<int32_t>(W), current, target, sh);
    current = target;
  }
  if (current != final_out) copy_block(current, final_out, static_cast<int32_t>(numel));
}

at::Tensor augment_apply_cuda(const at::Tensor& images, const at::Tensor& codes, const at::Tensor& params,
                              at::IntArrayRef fill) {
  check_augment_args(images, codes, params, fill);
  c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor in = images.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  const int64_t n = in.size(0), C = in.size(1), H = in.size(2), W = in.size(3), num_ops = codes.size(1);
  const int64_t numel = C * H * W;
  if (n == 0 || numel == 0) return out;
  MPL_CHECK_ARG(n <= 2147483647, "`images` has too many images for one launch: ", n);
  const at::Tensor codes_c = codes.contiguous(), params_c = params.contiguous();
  const bool in_shared = 2 * numel <= kSmemBudget;
  at::Tensor scratch;
  if (!in_shared) scratch = at::empty({n, numel}, in.options());
  const uint8_t f0 = static_cast<uint8_t>(fill[0]);
  const uint8_t f1 = static_cast<uint8_t>(fill[std::min<size_t>(1, fill.size() - 1)]);
  const uint8_t f2 = static_cast<uint8_t>(fill[std::min<size_t>(2, fill.size() - 1)]);
  const int threads = H * W >= 4096 ? kMaxThreads : 256;
  const size_t smem_bytes = in_shared ? static_cast<size_t>(2 * numel) : 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  augment_kernel<<<static_cast<unsigned>(n), threads, smem_bytes, stream>>>(
      in.const_data_ptr<uint8_t>(), out.mutable_data_ptr<uint8_t>(),
      in_shared ? nullptr : scratch.mutable_data_ptr<uint8_t>(), codes_c.const_data_ptr<int32_t>(),
      params_c.const_data_ptr<float>(), num_ops, C, H, W, f0, f1, f2, in_shared);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mpl_fast, CUDA, m) { m.impl("augment_apply", &augment_apply_cuda); }

}  // namespace mpl_fast
