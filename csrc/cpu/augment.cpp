// CPU kernel of `augment_apply`: every image of a uint8 (N, C, H, W) batch gets its own sequence
// of ops (codes and parameters per image). Images run in parallel (at::parallel_for); inside an
// image the ops run one after the other on two buffers: the output and a per-thread scratch
// image (the only allocation besides the output, one image large, reused across a chunk).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "augment.h"
#include "augment_checks.h"
#include "checks.h"

namespace mpl_fast {
namespace {

using namespace augment;

struct Image {
  int64_t channels, height, width;
  int64_t plane() const { return height * width; }
  int64_t numel() const { return channels * height * width; }
};

// Applies one op from `src` to `dst` (which may alias `src` for in-place ops).
void apply_one(int32_t code, const float* p, const uint8_t* fill, const Image& im, const uint8_t* src,
               uint8_t* dst) {
  const int64_t plane = im.plane(), C = im.channels, H = im.height, W = im.width;
  switch (code) {
    case kAffine:
      for (int64_t r = 0; r < H; ++r) {
        for (int64_t c = 0; c < W; ++c) {
          int64_t sr, sc;
          const bool inside = affine_source(p, H, W, r, c, &sr, &sc);
          for (int64_t ch = 0; ch < C; ++ch)
            dst[ch * plane + r * W + c] = inside ? src[ch * plane + sr * W + sc] : fill[ch];
        }
      }
      break;
    case kBrightness:
      for (int64_t i = 0; i < im.numel(); ++i) dst[i] = blend(float(src[i]), 0.f, p[0], p[1]);
      break;
    case kColor:
      if (C == 3) {
        for (int64_t i = 0; i < plane; ++i) {
          const uint8_t g = grayscale(src[i], src[plane + i], src[2 * plane + i]);
          for (int64_t ch = 0; ch < 3; ++ch) dst[ch * plane + i] = blend(float(src[ch * plane + i]), float(g), p[0], p[1]);
        }
      } else if (dst != src) {
        std::memcpy(dst, src, im.numel());  // torchvision: saturation of a grayscale image is a no-op
      }
      break;
    case kContrast: {
      int64_t sum = 0;
      if (C == 3) {
        for (int64_t i = 0; i < plane; ++i) sum += grayscale(src[i], src[plane + i], src[2 * plane + i]);
      } else {
        for (int64_t i = 0; i < plane; ++i) sum += src[i];
      }
      const float mean = mean_from_sum(sum, plane);
      for (int64_t i = 0; i < im.numel(); ++i) dst[i] = blend(float(src[i]), mean, p[0], p[1]);
      break;
    }
    case kSharpness:
      if (H <= 2 || W <= 2) {  // torchvision leaves images this small unchanged
        if (dst != src) std::memcpy(dst, src, im.numel());
        break;
      }
      for (int64_t ch = 0; ch < C; ++ch) {
        const uint8_t* s = src + ch * plane;
        uint8_t* d = dst + ch * plane;
        for (int64_t r = 0; r < H; ++r) {
          for (int64_t c = 0; c < W; ++c) {
            const bool border = r == 0 || c == 0 || r == H - 1 || c == W - 1;
            const uint8_t degenerate = border ? s[r * W + c] : smooth3x3(s, W, r, c);
            d[r * W + c] = blend(float(s[r * W + c]), float(degenerate), p[0], p[1]);
          }
        }
      }
      break;
    case kPosterize:
      for (int64_t i = 0; i < im.numel(); ++i) dst[i] = posterize(src[i], p[0]);
      break;
    case kSolarize:
      for (int64_t i = 0; i < im.numel(); ++i) dst[i] = solarize(src[i], p[0]);
      break;
    case kInvert:
      for (int64_t i = 0; i < im.numel(); ++i) dst[i] = invert(src[i]);
      break;
    case kAutoContrast:
      for (int64_t ch = 0; ch < C; ++ch) {
        const uint8_t* s = src + ch * plane;
        uint8_t* d = dst + ch * plane;
        const auto [lo, hi] = std::minmax_element(s, s + plane);
        const AutoContrastScale scale = autocontrast_scale(*lo, *hi);
        for (int64_t i = 0; i < plane; ++i) d[i] = autocontrast(s[i], scale);
      }
      break;
    case kEqualize:
      for (int64_t ch = 0; ch < C; ++ch) {
        const uint8_t* s = src + ch * plane;
        uint8_t* d = dst + ch * plane;
        int32_t hist[kHistBins] = {0};
        for (int64_t i = 0; i < plane; ++i) ++hist[s[i]];
        uint8_t lut[kHistBins];
        if (equalize_lut(hist, lut)) {
          for (int64_t i = 0; i < plane; ++i) d[i] = lut[s[i]];
        } else if (d != s) {
          std::memcpy(d, s, plane);
        }
      }
      break;
    case kCutout:
      if (dst != src) std::memcpy(dst, src, im.numel());
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t r = 0; r < H; ++r)
          for (int64_t c = 0; c < W; ++c)
            if (in_cutout(p, r, c)) dst[ch * plane + r * W + c] = fill[ch];
      break;
    default:  // kIdentity (codes were validated on entry)
      if (dst != src) std::memcpy(dst, src, im.numel());
      break;
  }
}

// Runs the op sequence of one image from `in` into `out`, using `scratch` as the second buffer.
void augment_image(const uint8_t* in, uint8_t* out, uint8_t* scratch, const Image& im, const int32_t* codes,
                   const float* params, int64_t num_ops, const uint8_t* fill) {
  const uint8_t* current = in;
  for (int64_t k = 0; k < num_ops; ++k) {
    const int32_t code = codes[k];
    if (code == kIdentity) continue;
    uint8_t* target;
    if (!needs_second_buffer(code)) {
      target = current == in ? out : const_cast<uint8_t*>(current);
    } else {
      target = current == out ? scratch : out;
    }
    apply_one(code, params + k * kParamsPerOp, fill, im, current, target);
    current = target;
  }
  if (current != out) std::memcpy(out, current, im.numel());
}

at::Tensor augment_apply_cpu(const at::Tensor& images, const at::Tensor& codes, const at::Tensor& params,
                             at::IntArrayRef fill) {
  check_augment_args(images, codes, params, fill);
  const at::Tensor in = images.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  const Image im{in.size(1), in.size(2), in.size(3)};
  const int64_t n = in.size(0), num_ops = codes.size(1);
  if (n == 0 || im.numel() == 0) return out;
  const at::Tensor codes_c = codes.contiguous(), params_c = params.contiguous();
  const uint8_t* src = in.const_data_ptr<uint8_t>();
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  const int32_t* code_p = codes_c.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < codes_c.numel(); ++i) {
    MPL_CHECK_ARG(code_p[i] >= 0 && code_p[i] < kNumOpCodes, "`codes[", i / num_ops, "][", i % num_ops,
                  "]` must be an op code in [0, ", int(kNumOpCodes), "), got ", code_p[i]);
  }
  const float* param_p = params_c.const_data_ptr<float>();
  uint8_t fill_values[kMaxChannels];
  for (int64_t ch = 0; ch < im.channels; ++ch) fill_values[ch] = static_cast<uint8_t>(fill[fill.size() == 1 ? 0 : ch]);
  // Grain: about 64K pixels of work per task, so tiny images are batched per thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, im.numel()));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> scratch(im.numel());
    for (int64_t i = begin; i < end; ++i) {
      augment_image(src + i * im.numel(), dst + i * im.numel(), scratch.data(), im, code_p + i * num_ops,
                    param_p + i * num_ops * kParamsPerOp, num_ops, fill_values);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mpl_fast, CPU, m) { m.impl("augment_apply", &augment_apply_cpu); }

}  // namespace mpl_fast
