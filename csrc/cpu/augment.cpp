// CPU kernel of `augment_apply`: every image of a uint8 (N, C, H, W) batch gets its own sequence
// of ops (codes and parameters per image). Images run in parallel (at::parallel_for); inside an
// image the ops run one after the other on two buffers: the output and a per-thread scratch
// image. Scratch (the only allocation besides the output) is per thread and per call: one image,
// one plane and one row of indices, reused across the images of a chunk.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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

// Pointwise ops become a 256-entry lookup table per channel (built with the shared per-pixel
// math), so the pass over the pixels is a gather. Locals are hoisted because a uint8_t store
// may alias anything, which otherwise stops the compiler from keeping bounds in registers.
void apply_lut(const uint8_t* __restrict__ lut, const uint8_t* src, uint8_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = lut[src[i]];
}

// Per-thread working memory, reused across the images of a chunk: a row of source indices
// (affine) and one plane of bytes (grayscale for Color, a smoothed row for Sharpness).
struct Scratch {
  std::vector<int32_t> index;
  std::vector<uint8_t> bytes;
  explicit Scratch(const Image& im) : index(im.width), bytes(std::max(im.plane(), im.width)) {}
};

void affine_image(const float* p, const uint8_t* fill, const Image& im, const uint8_t* src, uint8_t* dst,
                  std::vector<int32_t>& row_index) {
  const int64_t plane = im.plane(), C = im.channels, H = im.height, W = im.width;
  int32_t* __restrict__ index = row_index.data();
  const auto h32 = static_cast<int32_t>(H), w32 = static_cast<int32_t>(W);
  for (int32_t r = 0; r < h32; ++r) {
    const AffineRow row = affine_row(p, h32, w32, r);
    for (int32_t c = 0; c < w32; ++c) index[c] = affine_source_index(row, c);
    for (int64_t ch = 0; ch < C; ++ch) {
      const uint8_t* s = src + ch * plane;
      uint8_t* d = dst + ch * plane + r * W;
      const uint8_t f = fill[ch];
      for (int64_t c = 0; c < W; ++c) {  // branch-free: always load, then select
        const int32_t j = index[c];
        const uint8_t v = s[j < 0 ? 0 : j];
        d[c] = j < 0 ? f : v;
      }
    }
  }
}

// Blends a row with its degenerate row; a plain loop over floats, which vectorizes.
void blend_row(const uint8_t* x, const uint8_t* y, uint8_t* out, int64_t n, float ratio, float one_minus_ratio) {
  for (int64_t i = 0; i < n; ++i) out[i] = blend(float(x[i]), float(y[i]), ratio, one_minus_ratio);
}

// Whole-pixel shift (see translate_source_index in augment.h): row by row, memcpy of the part
// that has a source and fill around it.
void translate_image(const float* p, const uint8_t* fill, const Image& im, const uint8_t* src, uint8_t* dst) {
  const int64_t plane = im.plane(), C = im.channels, H = im.height, W = im.width;
  // Shifts beyond the image leave only fill; clamping keeps the int arithmetic in range.
  const auto dx = static_cast<int64_t>(std::clamp(p[0], -float(W), float(W)));
  const auto dy = static_cast<int64_t>(std::clamp(p[1], -float(H), float(H)));
  const int64_t c0 = std::max<int64_t>(0, dx), c1 = std::min<int64_t>(W, W + dx);  // columns with a source
  for (int64_t ch = 0; ch < C; ++ch) {
    const uint8_t* s = src + ch * plane;
    uint8_t* d = dst + ch * plane;
    for (int64_t r = 0; r < H; ++r) {
      uint8_t* out_row = d + r * W;
      const int64_t sr = r - dy;
      if (sr < 0 || sr >= H || c1 <= c0) {
        std::memset(out_row, fill[ch], W);
        continue;
      }
      std::memset(out_row, fill[ch], c0);
      std::memcpy(out_row + c0, s + sr * W + (c0 - dx), c1 - c0);
      std::memset(out_row + c1, fill[ch], W - c1);
    }
  }
}

void sharpness_image(const float* p, const Image& im, const uint8_t* src, uint8_t* dst, uint8_t* row) {
  const int64_t plane = im.plane(), C = im.channels, H = im.height, W = im.width;
  const float p0 = p[0], p1 = p[1];
  for (int64_t ch = 0; ch < C; ++ch) {
    const uint8_t* s = src + ch * plane;
    uint8_t* d = dst + ch * plane;
    // Border pixels keep their value in the degenerate image (blend of a pixel with itself,
    // which float rounding can still move by one).
    blend_row(s, s, d, W, p0, p1);
    blend_row(s + (H - 1) * W, s + (H - 1) * W, d + (H - 1) * W, W, p0, p1);
    for (int64_t r = 1; r < H - 1; ++r) {
      row[0] = s[r * W];
      row[W - 1] = s[r * W + W - 1];
      for (int64_t c = 1; c < W - 1; ++c) row[c] = smooth3x3(s, W, r, c);
      blend_row(s + r * W, row, d + r * W, W, p0, p1);
    }
  }
}

// Applies one op from `src` to `dst` (which may alias `src` unless needs_second_buffer()).
void apply_one(int32_t code, const float* p, const uint8_t* fill, const Image& im, const uint8_t* src,
               uint8_t* dst, Scratch& scratch) {
  const int64_t plane = im.plane(), C = im.channels, numel = im.numel();
  const float p0 = p[0], p1 = p[1];
  uint8_t lut[kHistBins];
  switch (code) {
    case kAffine:
      affine_image(p, fill, im, src, dst, scratch.index);
      return;
    case kTranslate:
      translate_image(p, fill, im, src, dst);
      return;
    case kSharpness:
      if (im.height <= 2 || im.width <= 2) break;  // torchvision leaves images this small unchanged
      sharpness_image(p, im, src, dst, scratch.bytes.data());
      return;
    case kColor: {
      if (C != 3) break;  // torchvision: saturation of a grayscale image is a no-op
      uint8_t* gray = scratch.bytes.data();
      for (int64_t i = 0; i < plane; ++i) gray[i] = grayscale(src[i], src[plane + i], src[2 * plane + i]);
      for (int64_t ch = 0; ch < 3; ++ch) blend_row(src + ch * plane, gray, dst + ch * plane, plane, p0, p1);
      return;
    }
    case kBrightness:
    case kContrast: {
      float target = 0.f;  // Brightness blends with black, Contrast with the grayscale mean
      if (code == kContrast) {
        int64_t sum = 0;
        if (C == 3) {
          for (int64_t i = 0; i < plane; ++i) sum += grayscale(src[i], src[plane + i], src[2 * plane + i]);
        } else {
          for (int64_t i = 0; i < plane; ++i) sum += src[i];
        }
        target = mean_from_sum(sum, plane);
      }
      for (int v = 0; v < kHistBins; ++v) lut[v] = blend(float(v), target, p0, p1);
      apply_lut(lut, src, dst, numel);
      return;
    }
    case kPosterize:
    case kSolarize:
    case kInvert:
      for (int v = 0; v < kHistBins; ++v) {
        const auto x = static_cast<uint8_t>(v);
        lut[v] = code == kPosterize ? posterize(x, p0) : code == kSolarize ? solarize(x, p0) : invert(x);
      }
      apply_lut(lut, src, dst, numel);
      return;
    case kAutoContrast:
    case kEqualize:
      for (int64_t ch = 0; ch < C; ++ch) {
        const uint8_t* s = src + ch * plane;
        int32_t hist[kHistBins] = {0};
        for (int64_t i = 0; i < plane; ++i) ++hist[s[i]];
        bool identity = false;
        if (code == kEqualize) {
          identity = !equalize_lut(hist, lut);
        } else {
          int lo = 0, hi = kHistBins - 1;
          while (hist[lo] == 0) ++lo;
          while (hist[hi] == 0) --hi;
          const AutoContrastScale scale = autocontrast_scale(lo, hi);
          for (int v = 0; v < kHistBins; ++v) lut[v] = autocontrast(static_cast<uint8_t>(v), scale);
        }
        if (identity) {
          if (dst != src) std::memcpy(dst + ch * plane, s, plane);
        } else {
          apply_lut(lut, s, dst + ch * plane, plane);
        }
      }
      return;
    case kCutout: {
      if (dst != src) std::memcpy(dst, src, numel);
      // Same box as in_cutout(): rows/cols v with y0 <= v < y1 (x likewise), within the image.
      auto first_inside = [](float bound, int64_t size) {
        return static_cast<int64_t>(std::clamp(std::ceil(bound), 0.f, float(size)));
      };
      const int64_t y0 = first_inside(p[0], im.height), y1 = first_inside(p[1], im.height);
      const int64_t x0 = first_inside(p[2], im.width), x1 = first_inside(p[3], im.width);
      if (y1 <= y0 || x1 <= x0) return;
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t r = y0; r < y1; ++r) std::memset(dst + ch * plane + r * im.width + x0, fill[ch], x1 - x0);
      return;
    }
    default:  // kIdentity (codes were validated on entry)
      break;
  }
  if (dst != src) std::memcpy(dst, src, numel);
}

// Runs the op sequence of one image from `in` into `out`, using `scratch` as the second buffer.
void augment_image(const uint8_t* in, uint8_t* out, uint8_t* scratch, const Image& im, const int32_t* codes,
                   const float* params, int64_t num_ops, const uint8_t* fill, Scratch& work) {
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
    apply_one(code, params + k * kParamsPerOp, fill, im, current, target, work);
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
    std::vector<uint8_t> scratch(im.numel());  // the second image buffer
    Scratch work(im);
    for (int64_t i = begin; i < end; ++i) {
      augment_image(src + i * im.numel(), dst + i * im.numel(), scratch.data(), im, code_p + i * num_ops,
                    param_p + i * num_ops * kParamsPerOp, num_ops, fill_values, work);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mpl_fast, CPU, m) { m.impl("augment_apply", &augment_apply_cpu); }

}  // namespace mpl_fast
