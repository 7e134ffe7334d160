// Per-element logic of the hinge-pair losses, shared by the CPU (.cpp) and CUDA (.cu) kernels:
// Threshold-Consistent Margin (docs/spec.md §2.3, inclusive tests, self mode drops the diagonal) and margin contrastive
// (docs/spec.md §2.4, strict tests, self mode keeps the diagonal as a positive pair). Both are one streaming pass that
// reduces S to four numbers: the hinge sums and the exact int64 counts of the "hard" positive and negative pairs.
//
// Pair (i, j), s = S_ij in fp32, m+ / m- the margins rounded to fp32 (what an fp32 `S <= m` compares with):
//   positive pair: labels equal (and j != i when the diagonal is dropped); negative pair: labels differ
//   hard positive: inclusive s <= m+   strict s < m+   (strict <=> the hinge m+ - s is > 0)
//   hard negative: inclusive s >= m-   strict s > m-
//   hinges m+ - s and s - m- are formed in double (exact for fp32 operands) and summed in double.
//   loss   = w+ * sum_hp (m+ - s) / #hp + w- * sum_hn (s - m-) / #hn        (a term is 0 when its count is 0)
//   dL/ds  = -w+ / #hp on hard positives, +w- / #hn on hard negatives, 0 elsewhere.
// NaN similarities fail every test: they are neither counted nor given a gradient (as in the reference).
#pragma once

#include <cstdint>

#include "flashdml/common.h"

namespace flashdml {

FLASHDML_HD bool hinge_hard_positive(float s, float pos_margin, bool strict) {
  return strict ? s < pos_margin : s <= pos_margin;
}

FLASHDML_HD bool hinge_hard_negative(float s, float neg_margin, bool strict) {
  return strict ? s > neg_margin : s >= neg_margin;
}

// w / count, or 0 for an empty set: the per-pair gradient magnitude of one term (before the upstream gradient).
FLASHDML_HD double hinge_term_scale(double weight, int64_t count) {
  return count > 0 ? weight / static_cast<double>(count) : 0.0;
}

// The loss from the four statistics (double, rounded once by the caller).
FLASHDML_HD double hinge_pair_loss(double pos_sum, int64_t pos_count, double neg_sum, int64_t neg_count,
                                   double pos_weight, double neg_weight) {
  const double pos = pos_count > 0 ? pos_weight * (pos_sum / static_cast<double>(pos_count)) : 0.0;
  const double neg = neg_count > 0 ? neg_weight * (neg_sum / static_cast<double>(neg_count)) : 0.0;
  return pos + neg;
}

}  // namespace flashdml
