// The per-image work of the CPU `augment_apply` kernel, written once and compiled once per
// instruction set: csrc/cpu/augment.cpp includes this file several times, each time inside its
// own namespace and `#pragma GCC target` region (baseline x86-64, AVX2, AVX-512), and picks one
// at run time. No include guard on purpose; it needs the includes and types of augment.cpp, and
// MPL_AUG_ISA: 0 baseline, 1 AVX2, 2 AVX-512 F/BW/VL/VBMI (GCC does not define the __AVX*__
// macros inside a C++ target region, so the includer says which intrinsics are allowed).
//
// Every path computes the same bits: the per-pixel math is augment.h's (inlined here, so the
// loops vectorise to the region's width; augment.cpp turns off FMA contraction), lookup tables
// are built by the same scalar code whatever the ISA, and the integer rewrites below (min/max
// instead of a histogram scan, split histograms, 16-bit smoothing sums) give the same integers.

// Pointwise ops are a 256-entry table per channel; applying it is a byte gather, which AVX-512
// VBMI does 64 bytes at a time (vpermi2b on each half of the table, the top bit picks the half).
MPL_AUG_INLINE void apply_lut(const uint8_t* __restrict__ lut, const uint8_t* src, uint8_t* dst, int64_t n) {
#if MPL_AUG_ISA >= 2
  const __m512i t0 = _mm512_loadu_si512(lut), t1 = _mm512_loadu_si512(lut + 64);
  const __m512i t2 = _mm512_loadu_si512(lut + 128), t3 = _mm512_loadu_si512(lut + 192);
  int64_t i = 0;
  auto lookup = [&](__m512i x) {
    const __m512i low = _mm512_permutex2var_epi8(t0, x, t1);
    const __m512i high = _mm512_permutex2var_epi8(t2, x, t3);
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(x), low, high);
  };
  for (; i + 64 <= n; i += 64) _mm512_storeu_si512(dst + i, lookup(_mm512_loadu_si512(src + i)));
  if (i < n) {
    const __mmask64 tail = (uint64_t{1} << (n - i)) - 1;  // n - i < 64
    _mm512_mask_storeu_epi8(dst + i, tail, lookup(_mm512_maskz_loadu_epi8(tail, src + i)));
  }
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = lut[src[i]];
#endif
}

// One row of an affine warp for one channel: out[c] = index[c] < 0 ? fill : s[index[c]].
// AVX-512 gathers 16 source pixels at once as 32-bit words (masked: outside pixels load
// nothing); a word that would run past the plane is read from 1-3 bytes earlier and shifted,
// so nothing outside [s, s + plane) is touched.
MPL_AUG_INLINE void gather_row(const int32_t* __restrict__ index, const uint8_t* __restrict__ s, int64_t plane,
                               uint8_t fill, uint8_t* __restrict__ d, int64_t width) {
  int64_t c = 0;
#if MPL_AUG_ISA >= 2
  if (plane >= 4) {
    const __m512i zero = _mm512_setzero_si512(), last_word = _mm512_set1_epi32(static_cast<int32_t>(plane - 4));
    const __m512i fill_v = _mm512_set1_epi32(fill);
    for (; c < width; c += 16) {
      const __mmask16 live = width - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (width - c)) - 1);
      const __m512i j = _mm512_maskz_loadu_epi32(live, index + c);
      const __mmask16 inside = _mm512_mask_cmpge_epi32_mask(live, j, zero);
      const __m512i start = _mm512_min_epi32(_mm512_max_epi32(j, zero), last_word);
      const __m512i shift = _mm512_slli_epi32(_mm512_sub_epi32(_mm512_max_epi32(j, zero), start), 3);
      __m512i v = _mm512_mask_i32gather_epi32(zero, inside, start, s, 1);
      v = _mm512_mask_blend_epi32(inside, fill_v, _mm512_srlv_epi32(v, shift));
      _mm_mask_storeu_epi8(d + c, live, _mm512_cvtepi32_epi8(v));
    }
    return;
  }
#endif
  for (; c < width; ++c) {  // branch-free: always load, then select
    const int32_t j = index[c];
    const uint8_t v = s[j < 0 ? 0 : j];
    d[c] = j < 0 ? fill : v;
  }
}

// RGB images: the three planes are first packed into one 32-bit word per pixel, so that one
// gather (one index, one load) fetches all three channels; the words are then split back into
// the three output planes. Gray images gather from their single plane.
MPL_AUG_INLINE void gather_rgb_row(const int32_t* __restrict__ index, const uint32_t* __restrict__ pixels,
                                   uint32_t fill, uint8_t* __restrict__ d0, uint8_t* __restrict__ d1,
                                   uint8_t* __restrict__ d2, int64_t width) {
  int64_t c = 0;
#if MPL_AUG_ISA >= 2
  const __m512i zero = _mm512_setzero_si512(), fill_v = _mm512_set1_epi32(static_cast<int32_t>(fill));
  for (; c < width; c += 16) {
    const __mmask16 live = width - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (width - c)) - 1);
    const __m512i j = _mm512_maskz_loadu_epi32(live, index + c);
    const __mmask16 inside = _mm512_mask_cmpge_epi32_mask(live, j, zero);
    const __m512i v = _mm512_mask_i32gather_epi32(fill_v, inside, j, pixels, 4);
    _mm_mask_storeu_epi8(d0 + c, live, _mm512_cvtepi32_epi8(v));
    _mm_mask_storeu_epi8(d1 + c, live, _mm512_cvtepi32_epi8(_mm512_srli_epi32(v, 8)));
    _mm_mask_storeu_epi8(d2 + c, live, _mm512_cvtepi32_epi8(_mm512_srli_epi32(v, 16)));
  }
#else
  for (; c < width; ++c) {  // branch-free: always load, then select
    const int32_t j = index[c];
    const uint32_t w = pixels[j < 0 ? 0 : j];
    const uint32_t v = j < 0 ? fill : w;
    d0[c] = static_cast<uint8_t>(v);
    d1[c] = static_cast<uint8_t>(v >> 8);
    d2[c] = static_cast<uint8_t>(v >> 16);
  }
#endif
}

MPL_AUG_INLINE void affine_image(const float* p, const uint8_t* fill, const Image& im, const uint8_t* src,
                                 uint8_t* dst, Scratch& scratch) {
  const int64_t plane = im.plane(), C = im.channels, W = im.width;
  const auto h32 = static_cast<int32_t>(im.height), w32 = static_cast<int32_t>(W);
  int32_t* __restrict__ index = scratch.index.data();
  uint32_t* __restrict__ pixels = scratch.pixels.data();
  if (C == 3) {
    const uint8_t *r = src, *g = src + plane, *b = src + 2 * plane;
    for (int64_t i = 0; i < plane; ++i) pixels[i] = uint32_t{r[i]} | uint32_t{g[i]} << 8 | uint32_t{b[i]} << 16;
  }
  const uint32_t fill_word = C == 3 ? uint32_t{fill[0]} | uint32_t{fill[1]} << 8 | uint32_t{fill[2]} << 16 : 0;
  for (int32_t r = 0; r < h32; ++r) {
    const AffineRow row = affine_row(p, h32, w32, r);
    for (int32_t c = 0; c < w32; ++c) index[c] = affine_source_index(row, c);
    uint8_t* d = dst + r * W;
    if (C == 3) {
      gather_rgb_row(index, pixels, fill_word, d, d + plane, d + 2 * plane, W);
    } else {
      gather_row(index, src, plane, fill[0], d, W);
    }
  }
}

// Blends a row with its degenerate row; a plain loop over floats, which vectorizes.
// `out` may be `x` (Color runs in place).
MPL_AUG_INLINE void blend_row(const uint8_t* x, const uint8_t* y, uint8_t* out, int64_t n,
                              float ratio, float one_minus_ratio) {
  for (int64_t i = 0; i < n; ++i) out[i] = blend(float(x[i]), float(y[i]), ratio, one_minus_ratio);
}

// Whole-pixel shift (see translate_source_index in augment.h): row by row, memcpy of the part
// that has a source and fill around it.
MPL_AUG_INLINE void translate_image(const float* p, const uint8_t* fill, const Image& im, const uint8_t* src,
                                    uint8_t* dst) {
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

// augment.h's smooth3x3 for the interior of one row, in 16-bit lanes (the weighted sum is at
// most 13 * 255 < 2^16): the same integer sum, the same (s + 6) / 13.
MPL_AUG_INLINE void smooth_row(const uint8_t* __restrict__ up, const uint8_t* __restrict__ mid,
                               const uint8_t* __restrict__ down, uint8_t* __restrict__ out, int64_t width) {
  for (int64_t c = 1; c < width - 1; ++c) {
    const uint16_t s = static_cast<uint16_t>(up[c - 1] + up[c] + up[c + 1] + mid[c - 1] + 5 * mid[c] + mid[c + 1] +
                                             down[c - 1] + down[c] + down[c + 1]);
    // (s + 6) / 13 as a multiply and shift: exact for s + 6 <= 6563 (checked for all s).
    out[c] = static_cast<uint8_t>((static_cast<uint32_t>(s + 6) * 5042u) >> 16);
  }
}

MPL_AUG_INLINE void sharpness_image(const float* p, const Image& im, const uint8_t* src, uint8_t* dst, uint8_t* row) {
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
      smooth_row(s + (r - 1) * W, s + r * W, s + (r + 1) * W, row, W);
      blend_row(s + r * W, row, d + r * W, W, p0, p1);
    }
  }
}

// Grayscale of an RGB plane (augment.h's grayscale, vectorised).
MPL_AUG_INLINE void grayscale_plane(const uint8_t* __restrict__ r, const uint8_t* __restrict__ g,
                                    const uint8_t* __restrict__ b, uint8_t* __restrict__ gray, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gray[i] = grayscale(r[i], g[i], b[i]);
}

// Sum of the grayscale image (Contrast's mean). Blocks of 2^16 pixels sum in int32 (at most
// 255 * 2^16 < 2^31), which vectorises; the blocks add up in int64.
MPL_AUG_INLINE int64_t grayscale_sum(const uint8_t* __restrict__ r, const uint8_t* __restrict__ g,
                                     const uint8_t* __restrict__ b, int64_t n) {
  int64_t sum = 0;
  for (int64_t start = 0; start < n; start += 65536) {
    const int64_t end = std::min<int64_t>(n, start + 65536);
    int32_t part = 0;
    for (int64_t i = start; i < end; ++i) part += grayscale(r[i], g[i], b[i]);
    sum += part;
  }
  return sum;
}

MPL_AUG_INLINE int64_t byte_sum(const uint8_t* __restrict__ s, int64_t n) {
  int64_t sum = 0;
  for (int64_t start = 0; start < n; start += 65536) {
    const int64_t end = std::min<int64_t>(n, start + 65536);
    int32_t part = 0;
    for (int64_t i = start; i < end; ++i) part += s[i];
    sum += part;
  }
  return sum;
}

// Histogram of a plane in four interleaved partial histograms, summed at the end: runs of equal
// pixels (common in photos) then do not serialise on one counter.
MPL_AUG_INLINE void histogram(const uint8_t* __restrict__ s, int64_t n, int32_t* __restrict__ hist) {
  int32_t part[4][kHistBins] = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++part[0][s[i]];
    ++part[1][s[i + 1]];
    ++part[2][s[i + 2]];
    ++part[3][s[i + 3]];
  }
  for (; i < n; ++i) ++part[0][s[i]];
  for (int v = 0; v < kHistBins; ++v) hist[v] = part[0][v] + part[1][v] + part[2][v] + part[3][v];
}

// AutoContrast's bounds: the first and last non-empty histogram bins are the minimum and the
// maximum pixel, which a min/max pass finds without a histogram.
MPL_AUG_INLINE void min_max(const uint8_t* __restrict__ s, int64_t n, int& lo, int& hi) {
  uint8_t mn = 255, mx = 0;
  for (int64_t i = 0; i < n; ++i) {
    mn = s[i] < mn ? s[i] : mn;
    mx = s[i] > mx ? s[i] : mx;
  }
  lo = mn;
  hi = mx;
}

// Applies one op from `src` to `dst` (which may alias `src` unless needs_second_buffer()).
MPL_AUG_INLINE void apply_one(int32_t code, const float* p, const uint8_t* fill, const Image& im, const uint8_t* src,
                              uint8_t* dst, Scratch& scratch) {
  const int64_t plane = im.plane(), C = im.channels, numel = im.numel();
  const float p0 = p[0], p1 = p[1];
  alignas(64) uint8_t lut[kHistBins];
  switch (code) {
    case kAffine:
      affine_image(p, fill, im, src, dst, scratch);
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
      grayscale_plane(src, src + plane, src + 2 * plane, gray, plane);
      for (int64_t ch = 0; ch < 3; ++ch) blend_row(src + ch * plane, gray, dst + ch * plane, plane, p0, p1);
      return;
    }
    case kBrightness:
    case kContrast: {
      float target = 0.f;  // Brightness blends with black, Contrast with the grayscale mean
      if (code == kContrast) {
        const int64_t sum = C == 3 ? grayscale_sum(src, src + plane, src + 2 * plane, plane) : byte_sum(src, plane);
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
        bool identity = false;
        if (code == kEqualize) {
          int32_t hist[kHistBins];
          histogram(s, plane, hist);
          identity = !equalize_lut(hist, lut);
        } else {
          int lo, hi;
          min_max(s, plane, lo, hi);
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

// Runs the op sequences of images [begin, end) of the batch, each from its input into its
// output, with a per-call scratch image as the second buffer.
void augment_images(const Batch& b, int64_t begin, int64_t end) {
  const Image& im = b.image;
  std::vector<uint8_t> second(im.numel());
  Scratch work(im);
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t* in = b.src + i * im.numel();
    uint8_t* out = b.dst + i * im.numel();
    const int32_t* codes = b.codes + i * b.num_ops;
    const float* params = b.params + i * b.num_ops * kParamsPerOp;
    const uint8_t* current = in;
    for (int64_t k = 0; k < b.num_ops; ++k) {
      const int32_t code = codes[k];
      if (code == kIdentity) continue;
      uint8_t* target;
      if (!needs_second_buffer(code)) {
        target = current == in ? out : const_cast<uint8_t*>(current);
      } else {
        target = current == out ? second.data() : out;
      }
      apply_one(code, params + k * kParamsPerOp, b.fill, im, current, target, work);
      current = target;
    }
    if (current != out) std::memcpy(out, current, im.numel());
  }
}
