// CUDA kernel of `augment_apply` and its launch planning, free of ATen so that the same code
// also runs under the SIMT emulator (tests/emulated_build.py); csrc/cuda/augment.cu is the
// ATen glue.
//
// ONE launch for the whole batch and all its ops. One block per image runs that image's op
// sequence, with __syncthreads() between ops; the per-channel reductions of Contrast,
// AutoContrast and Equalize use shared memory (integer atomics, so the result is
// deterministic). Small images (both buffers within kSmemBudget) live in shared memory for the
// whole sequence; larger ones ping-pong between the output and one scratch batch of the same
// size (the only allocation besides the output; from the caching allocator, no sync).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/launch.cuh"
#include "augment.h"

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
  MPL_DYNAMIC_SHARED(uint8_t, smem);
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

// How one batch is launched: in shared memory or through a scratch batch, block size, bytes of
// dynamic shared memory.
struct AugmentLaunchPlan {
  bool in_shared;
  int threads;
  size_t shared_bytes;
};

inline AugmentLaunchPlan plan_augment(int64_t C, int64_t H, int64_t W) {
  const int64_t numel = C * H * W;
  const bool in_shared = 2 * numel <= kSmemBudget;
  return {in_shared, H * W >= 4096 ? kMaxThreads : 256, in_shared ? static_cast<size_t>(2 * numel) : 0};
}

// The launch for n >= 1 images of C x H x W >= 1 pixels: `scratch` (n * C * H * W bytes) is
// needed only when !plan.in_shared, else it may be nullptr. `fill` has kMaxChannels values.
inline void launch_augment(const AugmentLaunchPlan& plan, const uint8_t* images, uint8_t* out, uint8_t* scratch,
                           const int32_t* codes, const float* params, int64_t n, int64_t num_ops, int64_t C,
                           int64_t H, int64_t W, const uint8_t* fill, cudaStream_t stream) {
  MPL_LAUNCH(static_cast<unsigned>(n), plan.threads, plan.shared_bytes, stream, augment_kernel)(
      images, out, plan.in_shared ? nullptr : scratch, codes, params, num_ops, C, H, W, fill[0], fill[1], fill[2],
      plan.in_shared);
  MPL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace mpl_fast
