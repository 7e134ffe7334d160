// Row and class helpers of the CPU contextual loss (docs/spec.md §2.5) that the forward and the backward must share
// bit for bit, and the GEMM-free application of the structured gradient.
//
//  * Rows: F_i = fl(x_i · inv_i) formed on the fly (the same fp32 product normalized_rows stores), so the backward
//    needs no B x d copy of F.
//  * row_dot: S_ij for a same-class pair, one out-of-line function (one instruction sequence, so the forward's
//    hard-positive test and the backward's see the same value). Hard positives are same-class pairs, so they
//    are found per class in O(Σ n_c² d) without touching the B x B tiles; the forward and backward both use
//    s_ij = row_dot(min(i, j), max(i, j)), which makes the positive part exactly symmetric.
//  * for_each_class_task: rows grouped by class, classes split into contiguous chunks (by member offset) over
//    tasks; a task owns the rows of its classes, so the backward writes dF rows without races.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "contextual_sparse.h"
#include "label_index.h"

namespace flashdml {
namespace cpu {
namespace ctx {

struct Rows {
  const float* x = nullptr;    // fp32 [B, d], contiguous
  const float* inv = nullptr;  // 1 / max(|x_i|, 1e-12), or null (normalize=False: F = x)
  int64_t B = 0, d = 0;
  float s(int64_t i) const { return inv ? inv[i] : 1.f; }
  const float* row(int64_t i) const { return x + i * d; }
};

// S_ij = Σ_q fl(x_iq s_i) · fl(x_jq s_j) in fp32. Out of line on purpose (see above).
__attribute__((noinline)) inline float row_dot(const Rows& r, int64_t i, int64_t j) {
  const float* a = r.row(i);
  const float* b = r.row(j);
  const float sa = r.s(i), sb = r.s(j);
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t q = 0; q < r.d; ++q) acc += (a[q] * sa) * (b[q] * sb);
  return acc;
}

// What the backward pieces need of a batch.
struct BatchView {
  const LabelIndex& cls;
  Rows rows;
  int64_t B, d;
};

inline float pair_sim(const Rows& r, int64_t i, int64_t j) { return i <= j ? row_dot(r, i, j) : row_dot(r, j, i); }

inline int64_t num_classes(const LabelIndex& cls) { return int64_t(cls.class_start.size()) - 1; }

// fn(task, class) for every class; tasks in parallel over contiguous class chunks of about B / T members.
template <typename Fn>
void for_each_class_task(const LabelIndex& cls, int64_t T, const Fn& fn) {
  const int64_t nc = num_classes(cls), B = int64_t(cls.cols_by_class.size());
  // task of class c: min(T − 1, its first member's offset · T / B), non-decreasing in c
  auto task_of = [&](int64_t c) { return std::min<int64_t>(T - 1, cls.class_start[c] * T / std::max<int64_t>(B, 1)); };
  std::vector<int64_t> first(T + 1, nc);
  for (int64_t t = 0, c = 0; t < T; ++t) {
    while (c < nc && task_of(c) < t) ++c;
    first[t] = c;
  }
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t c = first[t]; c < first[t + 1]; ++c) fn(t, c);
  });
}

// acc[0:d] += w · F_j (double accumulator).
inline void axpy_row(double* acc, const Rows& r, int64_t j, double w) {
  const float* b = r.row(j);
  const double ws = w * double(r.s(j));
  if (ws == 0.0) return;
#pragma omp simd
  for (int64_t q = 0; q < r.d; ++q) acc[q] += ws * double(b[q]);
}

// Σ_i F_i (double) and, with weights w (or null), Σ_i w_i F_i.
inline void weighted_column_sums(const Rows& r, const double* w, std::vector<double>& plain, std::vector<double>& wsum) {
  plain.assign(r.d, 0.0);
  wsum.assign(r.d, 0.0);
  for (int64_t i = 0; i < r.B; ++i) {
    const float* a = r.row(i);
    const float s = r.s(i);
    const double wi = w ? w[i] : 0.0;
#pragma omp simd
    for (int64_t q = 0; q < r.d; ++q) {
      const double f = double(a[q] * s);
      plain[q] += f;
      wsum[q] += wi * f;
    }
  }
}

// In place: g <- (g − F (F·g)) · inv for one row (the normalisation backward), from the double accumulator.
inline void finish_row(float* out, const double* acc, const Rows& r, int64_t i) {
  if (!r.inv) {
    for (int64_t q = 0; q < r.d; ++q) out[q] = float(acc[q]);
    return;
  }
  const float* a = r.row(i);
  const float s = r.inv[i];
  double dot = 0.0;
#pragma omp simd reduction(+ : dot)
  for (int64_t q = 0; q < r.d; ++q) dot += double(a[q] * s) * acc[q];
  for (int64_t q = 0; q < r.d; ++q) out[q] = float((acc[q] - double(a[q] * s) * dot) * double(s));
}

}  // namespace ctx
}  // namespace cpu
}  // namespace flashdml
