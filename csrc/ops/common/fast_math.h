// Branch-free float32 log2/exp2 used by the GeM kernels on host and device.
//
// Plain loops over these functions auto-vectorise on the CPU (the libm versions do not), which is
// what makes the fused GeM kernel faster than eager PyTorch. Relative error is below 1e-7 over the
// range GeM needs (inputs clamped to >= eps > 0); NaN and +Inf propagate as in libm.
#pragma once

#include <cstdint>
#include <cmath>

#include "../../macros.h"

namespace reid_ops {

REID_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return __builtin_bit_cast(uint32_t, x);
#endif
}

REID_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}

// log2(x) for normal x > 0 (GeM clamps inputs to eps >= float32's smallest normal first); +Inf and NaN are returned
// as they are (log2 of either is itself), so they propagate like PyTorch's pow instead of becoming ~128.
REID_HOST_DEVICE float fast_log2(float x) {
  const uint32_t u = float_bits(x);
  int32_t exponent = static_cast<int32_t>((u >> 23) & 0xffu) - 127;
  // mantissa in [1, 2); fold to [sqrt(1/2), sqrt(2)) so the series argument stays small.
  float m = bits_float((u & 0x007fffffu) | 0x3f800000u);
  const bool fold = m > 1.41421356f;
  m = fold ? m * 0.5f : m;
  exponent += fold ? 1 : 0;
  // ln(m) = 2 atanh(z), z = (m - 1) / (m + 1), |z| <= 0.1716
  const float z = (m - 1.0f) / (m + 1.0f);
  const float z2 = z * z;
  const float series =
      1.0f + z2 * (1.0f / 3.0f + z2 * (1.0f / 5.0f + z2 * (1.0f / 7.0f + z2 * (1.0f / 9.0f))));
  const float result = static_cast<float>(exponent) + 2.0f * z * series * 1.44269504088896341f;
  return (u & 0x7f800000u) == 0x7f800000u ? x : result;  // Inf / NaN (branch-free select: still vectorises)
}

// 2^y; returns 0 below 2^-126, overflows to +Inf from y = 128 on (as exp2) and propagates NaN.
REID_HOST_DEVICE float fast_exp2(float y) {
  // 2^y = 2 * 2^(y - 1) above 126, so the scale's exponent stays <= 127 up to y < 128 (no saturation)
  const float doubled = y > 126.0f ? 1.0f : 0.0f;
  float r = y - doubled;
  r = r > 127.0f ? 127.0f : (r >= -127.0f ? r : -127.0f);  // NaN -> -127: no undefined float-to-int conversion
  // round to nearest with the 1.5 * 2^23 trick (exact for |r| < 2^22; vectorises, rintf does not)
  const float rounded = (r + 12582912.0f) - 12582912.0f;
  const float f = (r - rounded) * 0.69314718055994531f;  // |f| <= ln(2)/2
  const float poly =
      1.0f +
      f * (1.0f +
           f * (0.5f +
                f * (1.0f / 6.0f +
                     f * (1.0f / 24.0f + f * (1.0f / 120.0f + f * (1.0f / 720.0f + f * (1.0f / 5040.0f)))))));
  const int32_t n = static_cast<int32_t>(rounded);
  const float scale = bits_float(static_cast<uint32_t>(n + 127) << 23);
  float result = r <= -127.0f ? 0.0f : poly * scale;
  result = doubled > 0.0f ? result * 2.0f : result;  // y >= 128: 2^127 * 2 overflows to +Inf
  return y == y ? result : y;                         // NaN in, NaN out
}

}  // namespace reid_ops
