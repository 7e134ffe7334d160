// The anchor-LSE losses (docs/spec.md §6.1-6.3): SupCon, Multi-Similarity and Circle. Each anchor's row of S
// reduces to an LSE over its positives of a "positive logit" f_p(s) and an LSE over its negatives of a "negative
// logit" f_n(s); the backward gives every pair
//   dL/ds = w_a * exp(f(s) - L) * f'(s)          (f'(s): with Circle's self-paced weights treated as constants)
// plus, for SupCon's positives, the constant -u_a / tau. The per-pair formulas live here, shared by every backend
// (host and device); the reductions live in the kernels.
#pragma once

#include "flashdml/common.h"

namespace flashdml {
namespace anchor_lse {

enum Kind : int { kSupCon = 0, kMultiSimilarity = 1, kCircle = 2 };

// Columns of row_stats (fp32 [B, kStats]): the LSEs the backward needs and the row's weights.
//  kLsePos: SupCon LSE over P(a) u N(a) of z; MS log(1 + sum_P e^{f_p}); Circle LSE_P a_p   (-inf when empty)
//  kLseNeg: SupCon same as kLsePos; MS log(1 + sum_N e^{f_n}); Circle LSE_N a_n
//  kWeight: w_a = dL/d(the LSEs): SupCon c_a, MS c_a, Circle c_a * sigmoid(LSE_P + LSE_N); c_a = dL/dl_a
//  kLinear: SupCon c_a / |P(a)| (the mean over positives' part), 0 for the others
constexpr int kLsePos = 0, kLseNeg = 1, kWeight = 2, kLinear = 3, kStats = 4;

// The scalars of each kind: SupCon {1/tau}, MS {alpha, beta, base}, Circle {m, gamma}.
struct Params {
  float p0, p1, p2;
};

template <int K>
FLASHDML_HD float pos_logit(float s, const Params& p) {
  if constexpr (K == kSupCon) {
    return s * p.p0;
  } else if constexpr (K == kMultiSimilarity) {
    return -p.p0 * (s - p.p2);
  } else {  // a_p = -gamma [1 + m - s]_+ (s - (1 - m))
    const float w = 1.f + p.p0 - s;
    return -p.p1 * (w > 0.f ? w : 0.f) * (s - (1.f - p.p0));
  }
}

template <int K>
FLASHDML_HD float neg_logit(float s, const Params& p) {
  if constexpr (K == kSupCon) {
    return s * p.p0;
  } else if constexpr (K == kMultiSimilarity) {
    return p.p1 * (s - p.p2);
  } else {  // a_n = gamma [s + m]_+ (s - m)
    const float w = s + p.p0;
    return p.p1 * (w > 0.f ? w : 0.f) * (s - p.p0);
  }
}

// d f / d s with the self-paced weights held constant (Circle) and MS's 1/alpha, 1/beta folded in (its w_a is
// c_a, not c_a / alpha).
template <int K>
FLASHDML_HD float pos_slope(float s, const Params& p) {
  if constexpr (K == kSupCon) {
    return p.p0;
  } else if constexpr (K == kMultiSimilarity) {
    return -1.f;
  } else {
    const float w = 1.f + p.p0 - s;
    return -p.p1 * (w > 0.f ? w : 0.f);
  }
}

template <int K>
FLASHDML_HD float neg_slope(float s, const Params& p) {
  if constexpr (K == kSupCon) {
    return p.p0;
  } else if constexpr (K == kMultiSimilarity) {
    return 1.f;
  } else {
    const float w = s + p.p0;
    return p.p1 * (w > 0.f ? w : 0.f);
  }
}

}  // namespace anchor_lse
}  // namespace flashdml
