// CPU helpers of the multi-tensor kernels: element loads that GCC vectorises (fp16/bf16 to
// fp32 by bit manipulation, exact, inf/nan preserved) and an AVX2+FMA+F16C clone of a kernel
// chosen at run time. The extension is built without -march flags (it must run on any x86-64),
// so without the clone the loops would only get SSE2.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <bit>
#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#define MPL_HAVE_AVX2_CLONE 1
#define MPL_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MPL_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MPL_HAVE_AVX2_CLONE 0
#define MPL_TARGET_AVX2
#define MPL_ALWAYS_INLINE inline
#endif

namespace mpl_fast {

// Branch-free, so loops over it vectorise: exponent and mantissa moved into place and rescaled
// by 2^112 (exact for normals and subnormals); inf/nan selected apart.
MPL_ALWAYS_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const float magnitude = std::bit_cast<float>(em << 13) * 0x1.0p112f;
  const uint32_t special = 0x7f800000u | ((em & 0x3ffu) << 13);
  const uint32_t is_special = 0u - static_cast<uint32_t>(em >= 0x7c00u);  // all ones or zero
  const uint32_t bits = (special & is_special) | (std::bit_cast<uint32_t>(magnitude) & ~is_special);
  return std::bit_cast<float>(bits | sign);
}

template <typename acc_t, typename T>
MPL_ALWAYS_INLINE acc_t load_as(T v) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return static_cast<acc_t>(half_bits_to_float(v.x));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return static_cast<acc_t>(std::bit_cast<float>(static_cast<uint32_t>(v.x) << 16));
  } else {
    return static_cast<acc_t>(v);
  }
}

inline bool cpu_has_avx2() {
#if MPL_HAVE_AVX2_CLONE
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

}  // namespace mpl_fast
