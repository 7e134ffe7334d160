// exp for the CPU hot loops: a branch-free polynomial that GCC vectorises inside `#pragma omp simd` loops
// (glibc's expf does not vectorise without -ffast-math). Max relative error ~2 ulp over the range the softmax
// kernels use (arguments <= 0). Arguments below -87.3 return ~1e-38 rather than 0: callers that need an
// exact 0 (masked entries) select it explicitly. CUDA kernels call expf (the accurate device one: no fast math).
#pragma once

#include <cstdint>
#include <cstring>

#include "flashdml/common.h"

namespace flashdml {

FLASHDML_HD float exp_poly(float x) {
  x = x < -87.33654f ? -87.33654f : (x > 88.72283f ? 88.72283f : x);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |n| < 2^22; no fast-math needed).
  const float shifter = 12582912.f;
  float n = (x * 1.44269504088896341f + shifter) - shifter;
  // r = x - n ln2 in two parts (Cody-Waite) so r is exact to ~1 ulp.
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  // Cephes-style minimax polynomial for exp(r) on [-ln2/2, ln2/2].
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.f;
  // Multiply by 2^n through the exponent bits (n in [-126, 128] after the clamp).
  int32_t e = static_cast<int32_t>(n) + 126;
  int32_t bits = e << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale * 2.f;
}

}  // namespace flashdml
