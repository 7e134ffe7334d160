// Sortable keys, fixed-size top-k lists and radix-select bin choice for the selection kernels (kNN docs/spec.md §1.2,
// hardest negatives docs/spec.md §1.3). Header-only, host and device (FLASHDML_HD), free of ATen.
//
// * order_key(s) (flashdml/topk.h): an fp32 value as a uint32 whose unsigned order is the value's order (-0.0 and
//   +0.0 give the same key, as they compare equal); key_value inverts it.
// * pack_key(s, col): uint64 (order_key(s) << 32) | (0xFFFFFFFF - col): larger key = larger value, and for
//   equal values the lower column, so one integer comparison does both (docs/spec.md: ties -> lower index). kNoKey (0) is
//   below the key of every real (non-NaN) value, so an empty list slot is never selected while enough real
//   candidates exist. The Triton kernels (triton_kernels/_topk.py) use the same order on signed int64.
// * topk_insert: insertion into a list sorted descending (O(K) shifts; the caller tests key > list[K-1] first).
// * radix_select_bin: the bin of a histogram (counted from the top bin) holding the need-th largest key.
#pragma once

#include <cstdint>
#include <cstring>

#include "flashdml/common.h"
#include "flashdml/topk.h"  // order_key / key_value: the order-preserving uint32 of an fp32 value

namespace flashdml {

constexpr uint64_t kNoKey = 0;

// (order_key(s) << 32) | (0xFFFFFFFF - col): one integer comparison orders by value, then lower column first.
FLASHDML_HD uint64_t pack_key(float s, uint32_t col) {
  return (uint64_t(order_key(s)) << 32) | uint64_t(0xFFFFFFFFu - col);
}

FLASHDML_HD float packed_value(uint64_t key) { return key_value(uint32_t(key >> 32)); }

FLASHDML_HD int64_t packed_col(uint64_t key) { return int64_t(0xFFFFFFFFu - uint32_t(key & 0xFFFFFFFFu)); }

// list[0..K) sorted descending; inserts key if it beats list[K-1] (keys are unique: no equal case).
FLASHDML_HD void topk_insert(uint64_t* list, int K, uint64_t key) {
  if (key <= list[K - 1]) return;
  int p = K - 1;
  while (p > 0 && list[p - 1] < key) {
    list[p] = list[p - 1];
    --p;
  }
  list[p] = key;
}

// hist[0..nbins) counts keys per bin (a larger bin = larger keys). Returns the bin b holding the need-th largest
// key (need >= 1, at most the total count) and sets *need_in_bin to how many keys of bin b are still needed.
template <typename Count>
FLASHDML_HD int radix_select_bin(const Count* hist, int nbins, int64_t need, int64_t* need_in_bin) {
  int64_t above = 0;
  for (int b = nbins - 1; b > 0; --b) {
    if (above + int64_t(hist[b]) >= need) {
      *need_in_bin = need - above;
      return b;
    }
    above += int64_t(hist[b]);
  }
  *need_in_bin = need - above;
  return 0;
}

}  // namespace flashdml
