// The sparse stage of the contextual loss on the CPU (SPEC 2.5 steps 4-8), from the neighbour lists N(i) that the
// streaming pass collected: everything here is O(B·k²) time and O(B·k²) memory at most, nothing B x B.
//
//  * Nbr: N(i) as CSR (ascending int32 columns, one flag byte each: in P(i), clamped C_ij = 0) and its transpose
//    NT(i) = {l : i ∈ N(l)} (with the position of the (l, i) entry, so per-entry values of N can be read from NT).
//  * Context: a = |N|, c = B − a, R(i) = {j ∈ P(i) : i ∈ P(j)}, r = |R|, W on N (|N(i) ∩ N(j)| by sorted-list
//    intersection), Z = (1/r) R W and js = ½(Z + Zᵀ) as CSR rows (double).
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

// A dense row of doubles with the list of touched columns: add() in O(1), emit() in O(touched · log).
struct SparseAcc {
  std::vector<double> v;
  std::vector<uint8_t> on;
  std::vector<int32_t> idx;
  explicit SparseAcc(int64_t n = 0) : v(n, 0.0), on(n, 0) {}
  void add(int32_t j, double x) {
    if (!on[j]) {
      on[j] = 1;
      idx.push_back(j);
    }
    v[j] += x;
  }
  void set(int32_t j, double x) {
    if (!on[j]) {
      on[j] = 1;
      idx.push_back(j);
    }
    v[j] = x;
  }
  // Appends the touched entries (ascending, times scale) and resets.
  void emit(std::vector<int32_t>& cols, std::vector<double>& vals, double scale) {
    std::sort(idx.begin(), idx.end());
    for (int32_t j : idx) {
      cols.push_back(j);
      vals.push_back(v[j] * scale);
    }
    clear();
  }
  void clear() {
    for (int32_t j : idx) {
      v[j] = 0.0;
      on[j] = 0;
    }
    idx.clear();
  }
};

// Below this many rows every stage runs on the calling thread: a parallel region costs more than the work there,
// and far more on a loaded machine (each region waits until every thread has been scheduled).
// The heavy O(B²·d) / O(B·nnz·d) stages go parallel from kSerialBelowRows, the light O(B·k²) ones from
// kSerialSparseRows.
constexpr int64_t kSerialBelowRows = 768;
constexpr int64_t kSerialSparseRows = 2048;

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

// Builds a CSR whose row i is what row_fn(task, i, cols, vals) appends (ascending columns).
template <typename RowFn>
Csr build_rows(int64_t rows, const RowFn& row_fn) {
  const int64_t T = num_row_tasks(rows);
  std::vector<std::vector<int32_t>> cols(T);
  std::vector<std::vector<double>> vals(T);
  Csr out;
  out.ptr.assign(rows + 1, 0);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = t * rows / T; i < (t + 1) * rows / T; ++i) {
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

// |N(i)| = B makes J 0/0 (SPEC 2.5 step 4): a clear error instead of NaN.
inline void check_not_collapsed(int64_t i, int64_t a, int64_t B) {
  TORCH_CHECK_VALUE(a < B, "contextual_loss: collapsed batch — every sample is in the k-neighbourhood of row ", i,
                    " (|N(i)| = B = ", B, "), so the complement intersection J is 0/0. The embeddings are "
                    "(nearly) identical within eps; use a smaller eps or k, or a batch with more spread.");
}

inline void check_reciprocal_set(int64_t i, double r) {
  TORCH_CHECK_VALUE(r > 0, "contextual_loss: row ", i, " has an empty reciprocal half-neighbourhood R(i) (|R(i)| = 0)");
}

struct Context {
  std::vector<double> a, c, r;  // |N(i)|, B − |N(i)|, |R(i)|
  Csr R;                        // reciprocal half-neighbourhoods (values unused)
  std::vector<double> w;        // W_ij on the entries of N (aligned with Nbr::col)
  Csr Z, js;
};

// Steps 4-7 of SPEC 2.5. Raises ValueError for a collapsed batch (|N(i)| = B) or an empty R(i).
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
  for_each_row(B, [&](int64_t, int64_t i) {
    const int32_t* ni = nb.col + nb.ptr[i];
    for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
      const int32_t j = nb.col[e];
      const double n = double(sorted_intersection_count(ni, nb.size(i), nb.col + nb.ptr[j], nb.size(j)));
      cx.w[e] = ctx_h(n, cx.a[i], cx.a[j], Bd);
    }
  });
  const int64_t T = num_row_tasks(B);
  std::vector<SparseAcc> acc(T, SparseAcc(B));
  cx.Z = build_rows(B, [&](int64_t t, int64_t i, std::vector<int32_t>& cols, std::vector<double>& vals) {
    for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) {
      const int32_t l = cx.R.col[q];
      for (int64_t e = nb.ptr[l]; e < nb.ptr[l + 1]; ++e) acc[t].add(nb.col[e], cx.w[e]);
    }
    acc[t].emit(cols, vals, 1.0 / cx.r[i]);
  });
  const Csr zt = transpose(cx.Z, B);
  cx.js = build_rows(B, [&](int64_t, int64_t i, std::vector<int32_t>& cols, std::vector<double>& vals) {
    int64_t p = cx.Z.begin(i), pe = cx.Z.end(i), q = zt.begin(i), qe = zt.end(i);
    while (p < pe || q < qe) {
      const int32_t jp = p < pe ? cx.Z.col[p] : INT32_MAX, jq = q < qe ? zt.col[q] : INT32_MAX;
      const int32_t j = std::min(jp, jq);
      double v = 0.0;
      if (jp == j) v += cx.Z.val[p++];
      if (jq == j) v += zt.val[q++];
      cols.push_back(j);
      vals.push_back(0.5 * v);
    }
  });
  return cx;
}

}  // namespace ctx
}  // namespace cpu
}  // namespace flashdml
