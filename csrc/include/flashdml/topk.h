// Fixed-k top-k selection shared by the CPU and CUDA kernels (knn, hardest negatives, the contextual loss's
// neighbour thresholds, recall@k / MAP@R). One total order everywhere (docs/spec.md §0):
//   (value a, index ia) comes before (value b, index ib)  <=>  a > b, or a == b and ia < ib
// ("value descending, then index ascending"), so every backend selects the same indices. -0.0 and +0.0 are
// equal values (as in the reference's sort); NaN is never a candidate (the kernels filter it out).
//
// Pieces:
//  * topk_before / TopKCmp: the order.
//  * TopKList: a sorted list of at most k (value, index) entries in caller-owned arrays; insert() is O(k) and
//    meant for small k (registers / shared memory on the GPU); merge() combines two sorted lists.
//  * TopKBuffer (host only): a candidate buffer with a threshold for any k — candidates above the current k-th
//    entry are appended, and when the buffer is full a partial selection keeps the k best; O(1) amortised per
//    accepted candidate. finish() sorts the k best. offer_tile_row feeds it one row of an S tile with a
//    vectorised threshold pre-filter (the CPU kernels' scan: knn, hardest negatives, metrics).
//  * order_key: the order-preserving uint32 bit pattern of an fp32 value (radix-select / histogram binning).
#pragma once

#include <cstdint>
#include <cstring>

#include "flashdml/common.h"

#if !defined(__CUDACC__)
#include <algorithm>
#include <vector>
#endif

namespace flashdml {

FLASHDML_HD bool topk_before(float a, int64_t ia, float b, int64_t ib) { return a > b || (a == b && ia < ib); }

struct TopKCmp {
  template <typename E>
  FLASHDML_HD bool operator()(const E& a, const E& b) const {
    return topk_before(a.value, a.index, b.value, b.index);
  }
};

// The uint32 whose unsigned order is the fp32 order (-0.0 is mapped to +0.0 first, so equal values have equal
// keys): negative values get all bits flipped, non-negative ones the sign bit set.
FLASHDML_HD uint32_t order_key(float v) {
  v = v + 0.f;  // -0.0 -> +0.0 (round to nearest)
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The fp32 value of an order key (inverse of order_key on non-negative-zero values).
FLASHDML_HD float key_value(uint32_t key) {
  const uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float v;
  memcpy(&v, &u, sizeof(v));
  return v;
}

// A sorted top-k list over caller-owned arrays values[k], indices[k]; size() entries are valid, best first.
struct TopKList {
  float* values;
  int64_t* indices;
  int k;
  int n = 0;

  FLASHDML_HD TopKList(float* v, int64_t* i, int k_) : values(v), indices(i), k(k_) {}

  FLASHDML_HD int size() const { return n; }
  FLASHDML_HD bool full() const { return n == k; }

  // Would (v, i) enter the list?
  FLASHDML_HD bool accepts(float v, int64_t i) const {
    return n < k || topk_before(v, i, values[k - 1], indices[k - 1]);
  }

  // Insert (v, i) at its place (dropping the last entry when full). Returns whether it entered.
  FLASHDML_HD bool insert(float v, int64_t i) {
    if (!accepts(v, i)) return false;
    int p = n < k ? n++ : k - 1;
    while (p > 0 && topk_before(v, i, values[p - 1], indices[p - 1])) {
      values[p] = values[p - 1];
      indices[p] = indices[p - 1];
      --p;
    }
    values[p] = v;
    indices[p] = i;
    return true;
  }

  // out <- the k best of the two sorted lists a and b (out must not alias a or b).
  FLASHDML_HD static int merge(const float* av, const int64_t* ai, int na, const float* bv, const int64_t* bi,
                               int nb, float* ov, int64_t* oi, int k) {
    int x = 0, y = 0, o = 0;
    while (o < k && (x < na || y < nb)) {
      const bool take_a = y >= nb || (x < na && topk_before(av[x], ai[x], bv[y], bi[y]));
      if (take_a) {
        ov[o] = av[x];
        oi[o++] = ai[x++];
      } else {
        ov[o] = bv[y];
        oi[o++] = bi[y++];
      }
    }
    return o;
  }
};

#if !defined(__CUDACC__)

struct TopKEntry {
  float value;
  int64_t index;
};

// Host-side candidate buffer for any k (see the file comment). Memory: capacity entries (>= 2k by default).
class TopKBuffer {
 public:
  TopKBuffer() = default;
  explicit TopKBuffer(int64_t k, int64_t capacity = 0) { reset(k, capacity); }

  void reset(int64_t k, int64_t capacity = 0) {
    k_ = k;
    cap_ = std::max<int64_t>(capacity > 0 ? capacity : 2 * k, k + 16);
    buf_.clear();
    buf_.reserve(size_t(cap_));
    have_threshold_ = false;
    thr_ = kNegInf;
    thr_index_ = -1;
  }

  int64_t k() const { return k_; }

  // Candidates below `threshold()` can be skipped without calling offer (a cheap vectorised pre-filter);
  // values equal to it still need offer (the index decides).
  float threshold() const { return thr_; }
  bool has_threshold() const { return have_threshold_; }

  void offer(float v, int64_t i) {
    if (have_threshold_ && !topk_before(v, i, thr_, thr_index_)) return;
    buf_.push_back({v, i});
    if (int64_t(buf_.size()) >= cap_) compact();
  }

  // Keep only the k best and raise the threshold to the k-th entry.
  void compact() {
    if (int64_t(buf_.size()) <= k_) return;
    std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.end(), TopKCmp());
    const TopKEntry kth = buf_[size_t(k_ - 1)];
    buf_.resize(size_t(k_));
    have_threshold_ = true;
    thr_ = kth.value;
    thr_index_ = kth.index;
  }

  // The k best (fewer if fewer were offered), sorted best first. (nth_element + sort: the same entries in the same
  // order as partial_sort, the order being total, at a fraction of partial_sort's heap cost.)
  const std::vector<TopKEntry>& finish() {
    if (int64_t(buf_.size()) > k_) {
      std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.end(), TopKCmp());
      buf_.resize(size_t(k_));
      std::sort(buf_.begin(), buf_.end(), TopKCmp());
    } else {
      std::sort(buf_.begin(), buf_.end(), TopKCmp());
    }
    return buf_;
  }

  std::vector<TopKEntry>& entries() { return buf_; }

 private:
  int64_t k_ = 0, cap_ = 0;
  std::vector<TopKEntry> buf_;
  bool have_threshold_ = false;
  float thr_ = kNegInf;
  int64_t thr_index_ = -1;
};

// Offers the entries of one tile row s[0:cn] (NaN = not a candidate) to buf, with indices base + c. Once the
// buffer has a threshold, the row is scanned 16 entries at a time with a vectorised "any entry >= threshold"
// test, so the (usual) blocks without a candidate cost one compare per entry.
inline void offer_tile_row(TopKBuffer& buf, const float* s, int64_t cn, int64_t base) {
  if (!buf.has_threshold()) {
    for (int64_t c = 0; c < cn; ++c)
      if (s[c] == s[c]) buf.offer(s[c], base + c);
    return;
  }
  constexpr int64_t kLanes = 16;
  int64_t c = 0;
  for (; c + kLanes <= cn; c += kLanes) {
    const float thr = buf.threshold();
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t j = 0; j < kLanes; ++j) any |= int(s[c + j] >= thr);  // NaN compares false
    if (!any) continue;
    for (int64_t j = 0; j < kLanes; ++j)
      if (s[c + j] >= buf.threshold()) buf.offer(s[c + j], base + c + j);  // offer re-checks the index on ties
  }
  for (; c < cn; ++c)
    if (s[c] >= buf.threshold()) buf.offer(s[c], base + c);
}

#endif  // !__CUDACC__

}  // namespace flashdml
