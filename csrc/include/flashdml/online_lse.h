// Online log-sum-exp: a running (max, sum of exp(v - max)) pair that can absorb values one by one or merge
// with another partial state. Empty state is (-inf, 0) and yields -inf. Used by every softmax-type kernel
// (batch softmax, NT-Xent, cross-example softmax) on CPU and GPU.
#pragma once

#include <cmath>

#include "flashdml/common.h"

namespace flashdml {

struct OnlineLse {
  float max = kNegInf;
  float sum = 0.f;

  // Absorb one value.
  FLASHDML_HD void add(float v) {
    if (v > max) {
      sum = sum * expf(max - v) + 1.f;  // expf(-inf) = 0 handles the empty state
      max = v;
    } else if (v != kNegInf) {
      sum += expf(v - max);
    }
  }

  // Absorb a partial state whose values were summed relative to `other_max`.
  FLASHDML_HD void merge(float other_max, float other_sum) {
    if (other_max == kNegInf) return;
    if (other_max > max) {
      sum = sum * expf(max - other_max) + other_sum;
      max = other_max;
    } else {
      sum += other_sum * expf(other_max - max);
    }
  }

  FLASHDML_HD void merge(const OnlineLse& o) { merge(o.max, o.sum); }

  // log(sum exp(v)); -inf for the empty state.
  FLASHDML_HD float value() const { return max == kNegInf ? kNegInf : max + logf(sum); }
};

}  // namespace flashdml
