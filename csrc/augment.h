// Per-pixel math of the batched RandAugment / Cutout op (`augment_apply`), shared by the CPU
// kernel (csrc/cpu/augment.cpp) and the CUDA kernel (csrc/cuda/augment.cu).
//
// Contract: every function reproduces torchvision's tensor implementation
// (torchvision/transforms/_functional_tensor.py, nearest interpolation) bit for bit, including
// its float32 rounding: blends are `ratio * a + (1 - ratio) * b` in float32, clamped and
// truncated by the cast to uint8. The float operations go through *_rn helpers so that nvcc
// (built with --use_fast_math) neither contracts them into FMAs nor approximates divisions:
// that keeps CPU and CUDA results identical for the same parameters.
//
// Parameters arrive precomputed per image and per op (float32, kParamsPerOp of them); the Python
// wrapper (mpl_fast/ops/augment.py) turns torchvision magnitudes into them.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace mpl_fast {
namespace augment {

// Kernel-level op codes. ShearX/Y and Rotate become kAffine with torchvision's inverse matrix as
// parameters, TranslateX/Y become kTranslate. Keep in sync with the _K_* constants of
// mpl_fast/ops/augment.py.
enum OpCode : int32_t {
  kIdentity = 0,
  kAffine = 1,        // params: gx = x*p0 + y*p1 + p2, gy = x*p3 + y*p4 + p5 (normalized grid)
  kBrightness = 2,    // params: ratio, 1 - ratio (blend with black)
  kColor = 3,         // params: ratio, 1 - ratio (blend with the grayscale image)
  kContrast = 4,      // params: ratio, 1 - ratio (blend with the mean of the grayscale image)
  kSharpness = 5,     // params: ratio, 1 - ratio (blend with the 3x3 smoothed image)
  kPosterize = 6,     // params: bits (0..8)
  kSolarize = 7,      // params: threshold (pixels >= threshold are inverted)
  kAutoContrast = 8,  // no params
  kEqualize = 9,      // no params
  kInvert = 10,       // no params
  kCutout = 11,       // params: y0, y1, x0, x1 (half-open box, already clipped)
  kTranslate = 12,    // params: dx, dy (whole pixels): out[r][c] = in[r - dy][c - dx], else fill
  kNumOpCodes = 13,
};

constexpr int kParamsPerOp = 6;
constexpr int kMaxChannels = 3;
constexpr int kHistBins = 256;

// ---- float32 arithmetic that is the same on host and device ----------------------------------
MPL_HOST_DEVICE inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MPL_HOST_DEVICE inline float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
MPL_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MPL_HOST_DEVICE inline float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
// Round half to even, as torch's nearest grid_sample (std::nearbyint / rintf), for |v| < 2^22.
// On the host, adding and subtracting 1.5 * 2^23 rounds in the default mode and vectorizes
// without SSE4.1; it equals rintf over that range (IEEE arithmetic: compilers do not fold it
// unless built with -ffast-math, which this extension is not on the host).
MPL_HOST_DEVICE inline float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  constexpr float kMagic = 12582912.f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
#endif
}

// float -> uint8 as torch's clamp(0, 255).to(torch.uint8): clamp, then truncate.
// Written as max-then-min selects, which compile to branch-free min/max instructions.
MPL_HOST_DEVICE inline uint8_t clamp_trunc_u8(float v) {
  v = v > 0.f ? v : 0.f;
  v = v < 255.f ? v : 255.f;
  return static_cast<uint8_t>(static_cast<int>(v));
}

// torchvision _blend: (ratio * a + (1 - ratio) * b).clamp(0, 255).to(uint8), in float32.
MPL_HOST_DEVICE inline uint8_t blend(float a, float b, float ratio, float one_minus_ratio) {
  return clamp_trunc_u8(add_rn(mul_rn(ratio, a), mul_rn(one_minus_ratio, b)));
}

// torchvision rgb_to_grayscale on uint8: (0.2989 r + 0.587 g + 0.114 b) in float32, truncated.
MPL_HOST_DEVICE inline uint8_t grayscale(uint8_t r, uint8_t g, uint8_t b) {
  const float v = add_rn(add_rn(mul_rn(0.2989f, float(r)), mul_rn(0.587f, float(g))), mul_rn(0.114f, float(b)));
  return static_cast<uint8_t>(static_cast<int>(v));
}

// Mean that torch.mean gives for an integer-valued float32 image: sum / count in float32.
MPL_HOST_DEVICE inline float mean_from_sum(int64_t sum, int64_t count) {
  return div_rn(static_cast<float>(sum), static_cast<float>(count));
}

// ---- geometric ops ---------------------------------------------------------------------------
// Source pixel of output pixel (row, col) under the normalized inverse affine grid that
// torchvision builds (_gen_affine_grid, then grid_sample nearest, align_corners=False), as a
// linear index row * width + col into the source plane, or -1 when it falls outside the image
// (the pixel takes the fill value). Split into a per-row part (AffineRow: the row's terms, the
// same float32 values torchvision computes) and a branch-free per-pixel part, so that the CPU
// loop over a row vectorizes.
struct AffineRow {
  float p0, p2, p3, p5;  // column coefficients and offsets of gx and gy
  float y_p1, y_p4;      // this row's terms y * p1 and y * p4
  float x_offset;        // x of column 0 is col + (0.5 - width / 2), exact (half-integers)
  float width_f, height_f;
  int32_t width, height;
};

MPL_HOST_DEVICE inline AffineRow affine_row(const float* p, int32_t height, int32_t width, int32_t row) {
  const float y = add_rn(float(row), 0.5f - 0.5f * float(height));  // exact: half-integers
  return {p[0], p[2], p[3], p[5], mul_rn(y, p[1]), mul_rn(y, p[4]), 0.5f - 0.5f * float(width),
          float(width), float(height), width, height};
}

MPL_HOST_DEVICE inline int32_t affine_source_index(const AffineRow& a, int32_t col) {
  const float x = add_rn(float(col), a.x_offset);
  // torchvision's bmm order: (x * p0 + y * p1) + p2.
  const float gx = add_rn(add_rn(mul_rn(x, a.p0), a.y_p1), a.p2);
  const float gy = add_rn(add_rn(mul_rn(x, a.p3), a.y_p4), a.p5);
  // grid_sample's unnormalization for align_corners=False: ((g + 1) * size - 1) / 2.
  float ix = div_rn(sub_rn(mul_rn(add_rn(gx, 1.f), a.width_f), 1.f), 2.f);
  float iy = div_rn(sub_rn(mul_rn(add_rn(gy, 1.f), a.height_f), 1.f), 2.f);
  // Anything beyond one pixel outside stays outside after rounding; clamping keeps the
  // rounding exact and the int conversion defined for huge shears.
  ix = ix > -2.f ? ix : -2.f;
  ix = ix < a.width_f + 1.f ? ix : a.width_f + 1.f;
  iy = iy > -2.f ? iy : -2.f;
  iy = iy < a.height_f + 1.f ? iy : a.height_f + 1.f;
  const int32_t c = static_cast<int32_t>(round_half_even(ix));
  const int32_t r = static_cast<int32_t>(round_half_even(iy));
  // All-ones mask when inside (unsigned compares also reject negatives), else 0; -1 outside.
  const int32_t inside = -static_cast<int32_t>(static_cast<uint32_t>(c) < static_cast<uint32_t>(a.width)) &
                         -static_cast<int32_t>(static_cast<uint32_t>(r) < static_cast<uint32_t>(a.height));
  return ((r * a.width + c) & inside) | ~inside;
}

MPL_HOST_DEVICE inline bool in_cutout(const float* p, int64_t row, int64_t col) {
  return float(row) >= p[0] && float(row) < p[1] && float(col) >= p[2] && float(col) < p[3];
}

// ---- color ops -------------------------------------------------------------------------------
// torchvision posterize: img & -(2 ** (8 - bits)).
MPL_HOST_DEVICE inline uint8_t posterize(uint8_t v, float bits) {
  int b = static_cast<int>(bits);
  b = b < 0 ? 0 : (b > 8 ? 8 : b);
  return static_cast<uint8_t>(v & ((0xFF << (8 - b)) & 0xFF));
}

// torchvision solarize: where(img >= threshold, 255 - img, img), compared in float.
MPL_HOST_DEVICE inline uint8_t solarize(uint8_t v, float threshold) {
  return float(v) >= threshold ? static_cast<uint8_t>(255 - v) : v;
}

MPL_HOST_DEVICE inline uint8_t invert(uint8_t v) { return static_cast<uint8_t>(255 - v); }

// torchvision adjust_sharpness' degenerate image at an interior pixel: the 3x3 kernel
// [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded. The weighted sum s is an integer and s / 13 is never
// exactly .5 away from an integer, so round-to-nearest is the integer (s + 6) / 13.
MPL_HOST_DEVICE inline uint8_t smooth3x3(const uint8_t* plane, int64_t width, int64_t row, int64_t col) {
  const uint8_t* up = plane + (row - 1) * width + col;
  const uint8_t* mid = up + width;
  const uint8_t* down = mid + width;
  const int s = up[-1] + up[0] + up[1] + mid[-1] + 5 * mid[0] + mid[1] + down[-1] + down[0] + down[1];
  return static_cast<uint8_t>((s + 6) / 13);
}

// torchvision autocontrast for one channel: min/max of the channel give an offset and scale;
// a flat channel (max == min) keeps its values. Note 255 / (max - min) is computed by torch as
// reciprocal(max - min) * 255 (Tensor.__rtruediv__).
struct AutoContrastScale {
  float minimum;
  float scale;
};

MPL_HOST_DEVICE inline AutoContrastScale autocontrast_scale(int lo, int hi) {
  if (hi == lo) return {0.f, 1.f};
  return {float(lo), mul_rn(div_rn(1.f, float(hi - lo)), 255.f)};
}

MPL_HOST_DEVICE inline uint8_t autocontrast(uint8_t v, AutoContrastScale s) {
  return clamp_trunc_u8(mul_rn(sub_rn(float(v), s.minimum), s.scale));
}

// torchvision equalize for one channel (PIL's algorithm): step is the pixel count without the
// last non-empty bin, divided by 255; lut[i] = (cumsum(hist)[i-1] + step // 2) // step.
// Returns false (identity) when step == 0.
MPL_HOST_DEVICE inline bool equalize_lut(const int32_t* hist, uint8_t* lut) {
  int64_t total = 0;
  int last = 0;
  for (int i = 0; i < kHistBins; ++i) {
    total += hist[i];
    if (hist[i] != 0) last = hist[i];
  }
  const int64_t step = (total - last) / 255;
  if (step == 0) return false;
  int64_t cumulative = 0;
  for (int i = 0; i < kHistBins; ++i) {
    const int64_t v = (cumulative + step / 2) / step;
    lut[i] = static_cast<uint8_t>(v > 255 ? 255 : v);
    cumulative += hist[i];
  }
  return true;
}

// TranslateX/Y by whole pixels (torchvision truncates the magnitude to int). kAffine with the
// same translation computes source coordinates within float round-off of the integers
// (col - dx, row - dy), far from the .5 where nearest rounding could flip, so both give the same
// image; kTranslate is the fast path. Returns the source index or -1 (fill).
MPL_HOST_DEVICE inline int32_t translate_source_index(int32_t dx, int32_t dy, int32_t height, int32_t width,
                                                      int32_t row, int32_t col) {
  const int32_t r = row - dy, c = col - dx;
  return (r >= 0 && r < height && c >= 0 && c < width) ? r * width + c : -1;
}

// Ops that read only the pixel they write can run in place; the others need a second buffer.
MPL_HOST_DEVICE inline bool needs_second_buffer(int32_t code) {
  return code == kAffine || code == kTranslate || code == kSharpness;
}

}  // namespace augment
}  // namespace mpl_fast
