// The sparse stage of the contextual loss on the CPU (docs/spec.md §2.5 steps 4-8), from the neighbour lists N(i) that the
// streaming pass collected: everything here is O(B·k²) time and O(B·k²) memory at most, nothing B x B.
//
//  * Nbr: N(i) as CSR (ascending int32 columns, one flag byte each: in P(i), clamped C_ij = 0) and its transpose
//    NT(i) = {l : i ∈ N(l)} (with the position of the (l, i) entry, so per-entry values of N can be read from NT).
//  * Context: a = |N|, c = B − a, R(i) = {j ∈ P(i) : i ∈ P(j)}, r = |R|, W on N (|N(i) ∩ N(j)| by marking N(i)),
//    and js = ½(Z + Zᵀ), Z = (1/r) R W, as CSR rows (double), with Z's values on js's support.
// Rows are processed in parallel contiguous chunks with per-task dense scratch of length B (a sparse accumulator),
// and chunks are concatenated in row order, so the results do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "flashdml/contextual.h"

namespace flashdml {
namespace cpu {
namespace ctx {

struct Csr {
  std::vector<int64_t> ptr;  // [rows + 1]
  std::vector<int32_t> col;  // ascending within a row
  std::vector<double> val;
  int64_t begin(int64_t i) const { return ptr[i]; }
  int64_t end(int64_t i) const { return ptr[i + 1]; }
  // Value at (i, j), 0 when absent (binary search in row i).
  double at(int64_t i, int32_t j) const {
    const int32_t* b = col.data() + ptr[i];
    const int32_t* e = col.data() + ptr[i + 1];
    const int32_t* p = std::lower_bound(b, e, j);
    return (p != e && *p == j) ? val[p - col.data()] : 0.0;
  }
};

// A dense row of doubles with the list of touched columns: add() in O(1); the touched columns in ascending order
// by sorting them or, when they are dense enough, by scanning a bitmap of the row (B / 64 words).
struct SparseAcc {
  std::vector<double> v;
  std::vector<uint8_t> on;
  std::vector<uint64_t> bits;
  std::vector<int32_t> idx;
  explicit SparseAcc(int64_t n = 0) : v(n, 0.0), on(n, 0), bits((n + 63) / 64, 0) {}
  void touch(int32_t j) {
    if (!on[j]) {
      on[j] = 1;
      bits[j >> 6] |= uint64_t(1) << (j & 63);
      idx.push_back(j);
    }
  }
  void add(int32_t j, double x) {
    touch(j);
    v[j] += x;
  }
  void set(int32_t j, double x) {
    touch(j);
    v[j] = x;
  }
  // fn(j) for every touched column, ascending.
  template <typename Fn>
  void for_each_ascending(const Fn& fn) {
    const int64_t n = int64_t(idx.size()), words = int64_t(bits.size());
    if (n * 16 < words) {  // sparse: sorting n keys beats scanning the words
      std::sort(idx.begin(), idx.end());
      for (int32_t j : idx) fn(j);
      return;
    }
    for (int64_t w = 0; w < words; ++w)
      for (uint64_t m = bits[w]; m; m &= m - 1) fn(int32_t(w * 64 + __builtin_ctzll(m)));
  }
  void clear() {
    for (int32_t j : idx) {
      v[j] = 0.0;
      on[j] = 0;
      bits[j >> 6] = 0;
    }
    idx.clear();
  }
};

// Below this many rows every stage runs on the calling thread: there a parallel region costs more than the work
// it splits (each region waits until every thread has been scheduled, longer on a loaded machine).
// The heavy O(B²·d) / O(B·nnz·d) stages go parallel from kSerialBelowRows rows, the light O(B·k²) ones from
// kSerialSparseRows rows.
constexpr int64_t kSerialBelowRows = 768;
constexpr int64_t kSerialSparseRows = 512;

inline int64_t stage_tasks(int64_t rows, int64_t units, int64_t serial_below = kSerialBelowRows) {
  if (rows < serial_below) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units));
}

inline int64_t num_row_tasks(int64_t rows) { return stage_tasks(rows, rows, kSerialSparseRows); }

// Runs fn(task, i) for every row, tasks over contiguous row chunks in parallel.
template <typename Fn>
void for_each_row(int64_t rows, const Fn& fn) {
  const int64_t T = num_row_tasks(rows);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = t * rows / T; i < (t + 1) * rows / T; ++i) fn(t, i);
  });
}

// Builds a CSR whose row i is what row_fn(task, i, cols, vals) appends (ascending columns). max_nnz, when given,
// bounds the total from above: each task reserves its share once instead of growing (each regrowth of a large
// vector is a fresh mapping to fault in, and the copy).
// Without it, the first kSampleRows rows of a task set its reservation (the rest grows as needed).
template <typename RowFn>
Csr build_rows(int64_t rows, const RowFn& row_fn, int64_t max_nnz = 0) {
  constexpr int64_t kSampleRows = 32;
  const int64_t T = num_row_tasks(rows);
  std::vector<std::vector<int32_t>> cols(T);
  std::vector<std::vector<double>> vals(T);
  Csr out;
  out.ptr.assign(rows + 1, 0);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = t * rows / T; i < (t + 1) * rows / T; ++i) {
        const int64_t first = t * rows / T, n = (t + 1) * rows / T - first;
        if (i == first && max_nnz > 0) {
          cols[t].reserve(max_nnz / T + rows);
          vals[t].reserve(max_nnz / T + rows);
        } else if (max_nnz == 0 && i == first + kSampleRows && n > 2 * kSampleRows) {  // no bound: extrapolate
          const size_t guess = cols[t].size() * size_t(n) / kSampleRows * 5 / 4;
          cols[t].reserve(guess);
          vals[t].reserve(guess);
        }
        const size_t before = cols[t].size();
        row_fn(t, i, cols[t], vals[t]);
        out.ptr[i + 1] = int64_t(cols[t].size() - before);
      }
  });
  for (int64_t i = 0; i < rows; ++i) out.ptr[i + 1] += out.ptr[i];
  out.col.reserve(out.ptr[rows]);
  out.val.reserve(out.ptr[rows]);
  for (int64_t t = 0; t < T; ++t) {
    out.col.insert(out.col.end(), cols[t].begin(), cols[t].end());
    out.val.insert(out.val.end(), vals[t].begin(), vals[t].end());
  }
  return out;
}

// Transpose of a square CSR (counting sort; rows of the result ascending).
inline Csr transpose(const Csr& a, int64_t n) {
  Csr t;
  t.ptr.assign(n + 1, 0);
  for (int32_t j : a.col) ++t.ptr[j + 1];
  for (int64_t i = 0; i < n; ++i) t.ptr[i + 1] += t.ptr[i];
  t.col.resize(a.col.size());
  t.val.resize(a.col.size());
  std::vector<int64_t> fill(t.ptr.begin(), t.ptr.end() - 1);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t e = a.begin(i); e < a.end(i); ++e) {
      const int64_t p = fill[a.col[e]]++;
      t.col[p] = int32_t(i);
      t.val[p] = a.val[e];
    }
  return t;
}

struct Nbr {
  int64_t B = 0;
  const int64_t* ptr = nullptr;
  const int32_t* col = nullptr;
  const uint8_t* flag = nullptr;
  std::vector<int64_t> tptr;  // NT(i) = trow[tptr[i] .. tptr[i+1]), ascending
  std::vector<int32_t> trow;
  std::vector<int64_t> tpos;  // index e of the entry (trow, i) in col / flag

  int64_t size(int64_t i) const { return ptr[i + 1] - ptr[i]; }
  // Position of j in N(i), or -1.
  int64_t find(int64_t i, int32_t j) const {
    const int32_t* b = col + ptr[i];
    const int32_t* e = col + ptr[i + 1];
    const int32_t* p = std::lower_bound(b, e, j);
    return (p != e && *p == j) ? int64_t(p - col) : -1;
  }
};

// with_transpose = false: the CSR view only (tptr / trow / tpos left empty).
inline Nbr make_nbr(int64_t B, const int64_t* ptr, const int32_t* col, const uint8_t* flag, bool with_transpose = true) {
  Nbr n;
  n.B = B;
  n.ptr = ptr;
  n.col = col;
  n.flag = flag;
  if (!with_transpose) return n;
  const int64_t nnz = ptr[B];
  n.tptr.assign(B + 1, 0);
  for (int64_t e = 0; e < nnz; ++e) ++n.tptr[col[e] + 1];
  for (int64_t i = 0; i < B; ++i) n.tptr[i + 1] += n.tptr[i];
  n.trow.resize(nnz);
  n.tpos.resize(nnz);
  std::vector<int64_t> fill(n.tptr.begin(), n.tptr.end() - 1);
  for (int64_t l = 0; l < B; ++l)
    for (int64_t e = ptr[l]; e < ptr[l + 1]; ++e) {
      const int64_t p = fill[col[e]]++;
      n.trow[p] = int32_t(l);
      n.tpos[p] = e;
    }
  return n;
}

// |N(i)| = B makes J 0/0 (docs/spec.md §2.5 step 4): a clear error instead of NaN (messages: flashdml/contextual.h).
inline void check_not_collapsed(int64_t i, int64_t a, int64_t B) {
  TORCH_CHECK_VALUE(a < B, ctx_collapsed_batch_message(i, B));
}

inline void check_reciprocal_set(int64_t i, double r) { TORCH_CHECK_VALUE(r > 0, ctx_empty_reciprocal_message(i)); }

struct Context {
  std::vector<double> a, c, r;  // |N(i)|, B − |N(i)|, |R(i)|
  Csr R;                        // reciprocal half-neighbourhoods (values unused)
  std::vector<double> w;        // W_ij on the entries of N (aligned with Nbr::col)
  Csr js;                       // js = ½(Z + Zᵀ), Z = (1/r) R W
  std::vector<double> zj;       // Z_ij on the entries of js (0 where only Zᵀ has one)
};

// Steps 4-7 of docs/spec.md §2.5. Raises ValueError for a collapsed batch (|N(i)| = B) or an empty R(i).
inline Context build_context(const Nbr& nb) {
  const int64_t B = nb.B;
  const double Bd = double(B);
  Context cx;
  cx.a.resize(B);
  cx.c.resize(B);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t a = nb.size(i);
    check_not_collapsed(i, a, B);
    cx.a[i] = double(a);
    cx.c[i] = Bd - double(a);
  }
  cx.R = build_rows(B, [&](int64_t, int64_t i, std::vector<int32_t>& cols, std::vector<double>& vals) {
    for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
      if (!(nb.flag[e] & kCtxInP)) continue;
      const int32_t j = nb.col[e];
      const int64_t back = nb.find(j, int32_t(i));
      if (back >= 0 && (nb.flag[back] & kCtxInP)) {
        cols.push_back(j);
        vals.push_back(1.0);
      }
    }
  });
  cx.r.resize(B);
  for (int64_t i = 0; i < B; ++i) {
    cx.r[i] = double(cx.R.end(i) - cx.R.begin(i));
    check_reciprocal_set(i, cx.r[i]);
  }
  cx.w.resize(nb.ptr[B]);
  const int64_t T = num_row_tasks(B);
  {  // n_ij = |N(i) ∩ N(j)| by marking N(i) once and counting the marks on each N(j)
    std::vector<std::vector<uint8_t>> mark(T, std::vector<uint8_t>(B, 0));
    for_each_row(B, [&](int64_t t, int64_t i) {
      uint8_t* mk = mark[t].data();
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) mk[nb.col[e]] = 1;
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
        const int32_t j = nb.col[e];
        int64_t n = 0;
        for (int64_t e2 = nb.ptr[j]; e2 < nb.ptr[j + 1]; ++e2) n += mk[nb.col[e2]];
        cx.w[e] = ctx_h(double(n), cx.a[i], cx.a[j], Bd);
      }
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) mk[nb.col[e]] = 0;
    });
  }
  // js row i = ½(Z_i + (Zᵀ)_i) in one pass, Z = D_r R W and Zᵀ = Wᵀ R D_r: (Zᵀ)_ij = Z_ji is summed here over
  // m ∈ NT(i) ∩ R(j) in ascending m, the order in which row j's Z sum takes l ∈ R(j), so js is bit-for-bit
  // symmetric. Z_ij on js's support is kept (zj) for the backward's gr.
  std::vector<SparseAcc> z(T, SparseAcc(B)), zt(T, SparseAcc(B));
  std::vector<std::vector<double>> zpart(T);
  double max_nnz = 0.0;  // |supp Z_i| + |supp Zᵀ_i| <= Σ_{l∈R(i)} a_l + Σ_{m∈NT(i)} r_m, summed: 2 Σ_l r_l a_l
  for (int64_t l = 0; l < B; ++l) max_nnz += 2.0 * cx.r[l] * cx.a[l];
  cx.js = build_rows(B, [&](int64_t t, int64_t i, std::vector<int32_t>& cols, std::vector<double>& vals) {
    SparseAcc &zi = z[t], &zti = zt[t];
    if (zpart[t].empty()) zpart[t].reserve(cols.capacity());
    for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) {
      const int32_t l = cx.R.col[q];
      for (int64_t e = nb.ptr[l]; e < nb.ptr[l + 1]; ++e) zi.add(nb.col[e], cx.w[e]);
    }
    for (int64_t q = nb.tptr[i]; q < nb.tptr[i + 1]; ++q) {
      const double wmi = cx.w[nb.tpos[q]];
      const int32_t m = nb.trow[q];
      for (int64_t e = cx.R.begin(m); e < cx.R.end(m); ++e) {
        zti.add(cx.R.col[e], wmi);
        zi.touch(cx.R.col[e]);  // zi's columns: the union of both supports
      }
    }
    const double inv_ri = 1.0 / cx.r[i];
    zi.for_each_ascending([&](int32_t j) {
      const double zij = zi.v[j] * inv_ri, ztij = zti.on[j] ? zti.v[j] * (1.0 / cx.r[j]) : 0.0;
      cols.push_back(j);
      vals.push_back(0.5 * (zij + ztij));
      zpart[t].push_back(zij);
    });
    zi.clear();
    zti.clear();
  }, int64_t(std::min(max_nnz, double(B) * double(B))));
  cx.zj.reserve(cx.js.col.size());
  for (const auto& part : zpart) cx.zj.insert(cx.zj.end(), part.begin(), part.end());
  return cx;
}

}  // namespace ctx
}  // namespace cpu
}  // namespace flashdml
