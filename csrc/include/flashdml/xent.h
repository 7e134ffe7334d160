// Per-element logic of cross-example softmax (docs/spec.md §2.2, one global negative partition) and NT-Xent (docs/spec.md §2.1b,
// one partition per row of x), shared by the CUDA kernels and their CPU emulation.
//
// Notation: z = S / tau; lse(p) = the negative LSE of positive p's partition (global, or p's row); |P| = number
// of positive pairs (exact int64).
//   negative pair (i, j): labels differ;  positive: labels equal and not (self mode and i == j)
//   loss        = (1/|P|) sum_p softplus(lse(p) - z_p)              (softplus(-inf) = 0: a partition w/o negatives)
//   coef        = (1/|P|) sum_p sigmoid(lse(p) - z_p)               (global, or per row)
//   dL/dz       = -sigmoid(lse(p) - z_p) / |P| on positives,  coef * exp(z_n - lse) on negatives, 0 elsewhere.
// Every |dL/dz| is <= cmax = max coef (a positive's sigmoid / |P| is one term of its partition's coef, and
// exp(z_n - lse) <= 1), so kernels store the *scaled* weight  g = dL/dz * kXentGScale / cmax  (|g| <= 2^14: fits
// fp16 with headroom, and the typical tiny weights stay normal numbers) and apply cmax / kXentGScale once, with
// grad / tau, when the products are reduced.
#pragma once

#include <cmath>
#include <cstdint>

#include "flashdml/common.h"

namespace flashdml {

constexpr float kXentGScale = 16384.f;  // 2^14

FLASHDML_HD bool xent_positive(int64_t label_i, int64_t label_j, bool self_mode, bool same_index) {
  return label_i == label_j && !(self_mode && same_index);
}

FLASHDML_HD bool xent_negative(int64_t label_i, int64_t label_j, bool self_mode, bool same_index) {
  return label_i != label_j && !(self_mode && same_index);
}

// log(1 + e^u), stable for any u; softplus(-inf) = 0.
FLASHDML_HD float xent_softplus(float u) { return fmaxf(u, 0.f) + log1pf(expf(-fabsf(u))); }

// 1 / (1 + e^-u), stable for any u; sigmoid(-inf) = 0.
FLASHDML_HD float xent_sigmoid(float u) {
  const float e = expf(-fabsf(u));  // in (0, 1]
  const float p = 1.f / (1.f + e);
  return u >= 0.f ? p : e * p;
}

// Scaled weight g (see above) of one pair. lse / coef: the pair's partition; wpos = kXentGScale / (|P| cmax),
// wneg = kXentGScale / cmax (both 0 when there is no gradient at all). One exp per pair: with e = exp(z - lse),
// sigmoid(lse - z) = 1 / (1 + e); lse = -inf (a partition without negatives) gives e = inf and weight 0 for its
// positives (such a partition has no negatives, so the other branch never meets it).
FLASHDML_HD float xent_weight(float z, bool positive, bool negative, float lse, float coef, float wpos, float wneg) {
  const float e = expf(z - lse);
  return positive ? -wpos / (1.f + e) : (negative ? coef * wneg * e : 0.f);
}

// The backward's scalars from |P|, cmax = max coef, the upstream gradient and tau:
//   w[0] = wpos, w[1] = wneg (weights above), w[2] = grad cmax / (tau kXentGScale) (dx = w[2] * g y),
//   w[3] = -w[2] / tau (dtemperature = -grad sum dL/dz z / tau = w[3] * sum g s, s = S_ij = z tau).
//   All 0 when there is no positive or cmax is 0.
FLASHDML_HD void xent_grad_scalars(int64_t num_pos, float cmax, float grad, float tau, float* w) {
  if (num_pos <= 0 || !(cmax > 0.f)) {
    w[0] = w[1] = w[2] = w[3] = 0.f;
    return;
  }
  // fp32 on purpose (a double division is a slow-path call with a stack frame on the GPU); |P| as fp32 is exact
  // to 2^24 and within 6e-8 relative above.
  const float inv_c = 1.f / cmax;
  w[0] = kXentGScale * inv_c / static_cast<float>(num_pos);
  w[1] = kXentGScale * inv_c;
  w[2] = grad * (cmax / kXentGScale) / tau;
  w[3] = -w[2] / tau;
}

}  // namespace flashdml
