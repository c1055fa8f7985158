// CPU kernel of `augment_apply`: every image of a uint8 (N, C, H, W) batch gets its own sequence
// of ops (codes and parameters per image). Images run in parallel (at::parallel_for); inside an
// image the ops run one after the other on two buffers: the output and a per-thread scratch
// image. Scratch (the only allocation besides the output) is per thread and per call: one image,
// one plane and one row of indices, reused across the images of a chunk.
//
// The per-image work (cpu/augment_image_kernels.h) is compiled three times: for baseline x86-64
// (SSE2), AVX2 and AVX-512 (F/BW/VL/VBMI); the widest the CPU supports runs. The extension is
// built without -march flags, so without these copies the per-pixel loops would only get SSE2.
// All three give the same bits (FMA contraction is off below; tests/test_augment_isa.py
// compares them). MPL_FAST_AUGMENT_ISA=scalar|avx2|avx512 caps the choice (tests, benchmarks).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define MPL_AUG_MULTI_ISA 1
#else
#define MPL_AUG_MULTI_ISA 0
#endif

// The kernels reproduce torchvision's float32 arithmetic operation by operation: a multiply
// and an add must not fuse into an FMA (GCC contracts by default in C++ once FMA is available,
// which AVX-512 implies).
#pragma GCC optimize("fp-contract=off")

#include "augment.h"
#include "augment_checks.h"
#include "checks.h"

#if defined(__GNUC__)
#define MPL_AUG_INLINE inline __attribute__((always_inline))
#else
#define MPL_AUG_INLINE inline
#endif

namespace mpl_fast {
namespace {

using namespace augment;

struct Image {
  int64_t channels, height, width;
  int64_t plane() const { return height * width; }
  int64_t numel() const { return channels * height * width; }
};

// Per-thread working memory, reused across the images of a chunk: a row of source indices
// (affine), one plane of bytes (grayscale for Color, a smoothed row for Sharpness) and, for RGB
// images, one plane of packed pixels (affine gathers all channels of a pixel at once).
struct Scratch {
  std::vector<int32_t> index;
  std::vector<uint8_t> bytes;
  std::vector<uint32_t> pixels;
  explicit Scratch(const Image& im)
      : index(im.width), bytes(std::max(im.plane(), im.width)), pixels(im.channels == 3 ? im.plane() : 0) {}
};

// One call's batch: contiguous images, per-image codes and parameters, fill values.
struct Batch {
  Image image;
  const uint8_t* src;
  uint8_t* dst;
  const int32_t* codes;
  const float* params;
  int64_t num_ops;
  const uint8_t* fill;
};

#define MPL_AUG_ISA 0
namespace isa_baseline {
#include "cpu/augment_image_kernels.h"
}  // namespace isa_baseline

#if MPL_AUG_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2")
#undef MPL_AUG_ISA
#define MPL_AUG_ISA 1
namespace isa_avx2 {
#include "cpu/augment_image_kernels.h"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,avx512f,avx512bw,avx512vl,avx512vbmi")
#pragma GCC diagnostic push
// GCC 12's own avx512fintrin.h trips this (its _mm512_undefined_* placeholders).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#undef MPL_AUG_ISA
#define MPL_AUG_ISA 2
namespace isa_avx512 {
#include "cpu/augment_image_kernels.h"
}  // namespace isa_avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
#undef MPL_AUG_ISA

using ImagesFn = void (*)(const Batch&, int64_t, int64_t);

// The widest copy this CPU runs, capped by MPL_FAST_AUGMENT_ISA (read per call so that a test
// can switch it; an unknown value is ignored).
ImagesFn pick_isa() {
#if MPL_AUG_MULTI_ISA
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi");
  const char* cap = std::getenv("MPL_FAST_AUGMENT_ISA");
  const std::string_view limit = cap ? cap : "";
  if (has_avx512 && limit != "scalar" && limit != "avx2") return &isa_avx512::augment_images;
  if (has_avx2 && limit != "scalar") return &isa_avx2::augment_images;
#endif
  return &isa_baseline::augment_images;
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
  const int32_t* code_p = codes_c.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < codes_c.numel(); ++i) {
    MPL_CHECK_ARG(code_p[i] >= 0 && code_p[i] < kNumOpCodes, "`codes[", i / num_ops, "][", i % num_ops,
                  "]` must be an op code in [0, ", int(kNumOpCodes), "), got ", code_p[i]);
  }
  uint8_t fill_values[kMaxChannels];
  for (int64_t ch = 0; ch < im.channels; ++ch) fill_values[ch] = static_cast<uint8_t>(fill[fill.size() == 1 ? 0 : ch]);
  const Batch batch{im, in.const_data_ptr<uint8_t>(), out.mutable_data_ptr<uint8_t>(), code_p,
                    params_c.const_data_ptr<float>(), num_ops, fill_values};
  const ImagesFn run = pick_isa();
  // Grain: about 64K pixels of work per task, so tiny images are batched per thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, im.numel()));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { run(batch, begin, end); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mpl_fast, CPU, m) { m.impl("augment_apply", &augment_apply_cpu); }

}  // namespace mpl_fast
