// The first stage of the CPU contextual loss forward (docs/spec.md §2.5 steps 1-3, and the docs/spec.md §2.4 hard negatives of L_con):
// the neighbour lists N(i) with their flags (in P(i), clamped C = 0), from the fp32 values of one GEMM of S = F Fᵀ.
//
//  * neighbour_pass: one streaming pass over S tiles (row blocks x column tiles, cpu_tiles.h gemm_tile): per row a
//    values-only min-heap of the k largest −D (query included), a candidate list of the entries with
//    fl(−D + ε) >= the running k-th largest (32-column chunks whose largest S cannot pass are skipped), and the
//    hard-negative sum / count (hinge_pair.h rules). The running threshold only rises to the final t_i, so every
//    final neighbour is a candidate; the list is compacted against the current threshold whenever it doubles, so
//    it stays O(|band|) per row whatever the column order (no fixed capacity, no overflow). At the end of a row
//    block t_i / h_i are read off the heap and the candidates filtered with the inclusive fp32 tests of
//    flashdml/contextual.h.
//  * one_tile_lists: the same lists for B <= kOneTileRows, where S is one tile: one GEMM, then every row scanned
//    once (no candidate lists). Both give the same lists for the same S values.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "contextual_grad.h"
#include "contextual_sparse.h"
#include "cpu_tiles.h"
#include "flashdml/contextual.h"
#include "flashdml/hinge_pair.h"
#include "label_index.h"

namespace flashdml {
namespace cpu {
namespace ctx {

// Row tasks of the S tile passes: one on the calling thread for small batches (see ctx::stage_tasks).
inline TaskPlan tile_plan(int64_t B) {
  TaskPlan plan = plan_row_tasks(B);
  if (B < ctx::kSerialBelowRows) plan.num_tasks = 1;
  return plan;
}

// ----------------------------------------------------------------------------------------- streaming pass
struct Cand {
  int32_t col;
  float neg_d;
};

// Values-only min-heap of the k largest −D of one row.
struct TopK {
  float* h;
  int64_t n = 0, k;
  float threshold() const { return n < k ? -std::numeric_limits<float>::infinity() : h[0]; }
  void offer(float v) {
    if (n < k) {
      int64_t i = n++;
      while (i > 0 && h[(i - 1) / 2] > v) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
      }
      h[i] = v;
    } else if (v > h[0]) {
      int64_t i = 0;
      for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= k) break;
        if (c + 1 < k && h[c + 1] < h[c]) ++c;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
      }
      h[i] = v;
    }
  }
};

inline void compact(std::vector<Cand>& cv, float theta, float eps) {
  size_t o = 0;
  for (const Cand& c : cv)
    if (ctx_band_value(c.neg_d, eps) >= theta) cv[o++] = c;
  cv.resize(o);
}

struct HingeStats {
  double pos_sum = 0.0, neg_sum = 0.0;
  int64_t pos_count = 0, neg_count = 0;
};

struct NbrLists {
  std::vector<HingeStats> con;  // per task: the margin-contrastive sums and counts (docs/spec.md §2.4)
  std::vector<int64_t> size;  // [B]
  std::vector<std::vector<int32_t>> col;  // per task, rows in order
  std::vector<std::vector<uint8_t>> flag;
};

// docs/spec.md §2.4 hard negatives on one tile row (strict test): labels differ and s > m-. Hard positives are same-class
// pairs and come from the per-class pass (class_hinge), not from the tiles.
inline void hinge_negatives_row(const float* s, int64_t cn, const int32_t* col_class, int32_t ci, float mn,
                                HingeStats& st) {
  int64_t hits = 0;
#pragma omp simd reduction(+ : hits)
  for (int64_t c = 0; c < cn; ++c) hits += (col_class[c] != ci) & hinge_hard_negative(s[c], mn, true);
  if (hits == 0) return;
  for (int64_t c = 0; c < cn; ++c)
    if ((col_class[c] != ci) & hinge_hard_negative(s[c], mn, true)) st.neg_sum += double(s[c]) - double(mn);
  st.neg_count += hits;
}

// docs/spec.md §2.4 hard positives of one class (the diagonal kept as a positive): s_ij = pair_sim, symmetric.
inline void class_hinge(const ctx::Rows& rows, const LabelIndex& cls, int64_t c, float mp, HingeStats& st) {
  const int64_t* mem = cls.cols_by_class.data() + cls.class_start[c];
  const int64_t n = cls.class_start[c + 1] - cls.class_start[c];
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = a; b < n; ++b) {
      const float v = ctx::pair_sim(rows, mem[a], mem[b]);
      if (!hinge_hard_positive(v, mp, true)) continue;
      const int64_t mult = a == b ? 1 : 2;
      st.pos_sum += double(mult) * (double(mp) - double(v));
      st.pos_count += mult;
    }
}

// The end of one row: t_i / h_i read off its (full) top-k heap, then every candidate (column, −D) given by
// for_each_cand kept when fl(−D + ε) >= t_i, with its flags (in P: >= h_i; clamped: −D = 0). Returns |N(i)|.
template <typename ForEachCand>
inline int64_t emit_neighbours(const TopK& tk, std::vector<float>& sorted, float eps, const ForEachCand& for_each_cand,
                               std::vector<int32_t>& cols, std::vector<uint8_t>& flags) {
  const int64_t k = tk.k;
  std::copy(tk.h, tk.h + k, sorted.begin());
  std::sort(sorted.begin(), sorted.end(), [](float a, float b) { return a > b; });
  const float t = sorted[k - 1], h = sorted[k / 2 - 1];
  int64_t n = 0;
  for_each_cand([&](int32_t col, float neg_d) {
    const float u = ctx_band_value(neg_d, eps);
    if (!(u >= t)) return;
    cols.push_back(col);
    flags.push_back(uint8_t((u >= h ? kCtxInP : 0) | (ctx_clamped(neg_d) ? kCtxClamped : 0)));
    ++n;
  });
  return n;
}

inline NbrLists neighbour_pass(const at::Tensor& F, const LabelIndex& cls, int64_t k, float eps, float mn) {
  constexpr int64_t kChunk = 32;
  const int64_t B = F.size(0);
  const TaskPlan plan = tile_plan(B);
  NbrLists out;
  out.con.resize(plan.num_tasks);
  out.size.assign(B, 0);
  out.col.resize(plan.num_tasks);
  out.flag.resize(plan.num_tasks);
  auto fopts = F.options().dtype(at::kFloat);
  for_each_row_block(plan, B, [&](int64_t task, int64_t r0, int64_t r1) {
    const int64_t rn = r1 - r0;
    at::Tensor scratch = at::empty({kTileRows, kTileCols}, fopts);
    const float* S = scratch.data_ptr<float>();
    std::vector<float> heaps(rn * k), sorted(k);
    std::vector<TopK> top(rn);
    std::vector<std::vector<Cand>> cands(rn);
    const size_t min_compact = size_t(2 * k + 64);
    std::vector<size_t> compact_at(rn, min_compact);
    for (int64_t r = 0; r < rn; ++r) top[r] = TopK{heaps.data() + r * k, 0, k};
    for (int64_t c0 = 0; c0 < B; c0 += kTileCols) {
      const int64_t cn = std::min(kTileCols, B - c0);
      gemm_tile(scratch, F, r0, rn, F, c0, cn);
      for (int64_t r = 0; r < rn; ++r) {
        const float* s = S + r * kTileCols;
        hinge_negatives_row(s, cn, cls.col_class.data() + c0, cls.row_class[r0 + r], mn, out.con[task]);
        TopK& tk = top[r];
        std::vector<Cand>& cv = cands[r];
        float theta = tk.threshold();
        // fl(−D + ε) is non-decreasing in s, so a chunk whose largest s fails the test has no candidate (NaN counts
        // as +inf here: its −D is −0, which the exact test below admits, as the reference does).
        for (int64_t b0 = 0; b0 < cn; b0 += kChunk) {
          const int64_t b1 = std::min(cn, b0 + kChunk);
          float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
          for (int64_t c = b0; c < b1; ++c) mx = std::max(mx, s[c] == s[c] ? s[c] : std::numeric_limits<float>::infinity());
          if (!(ctx_band_value(ctx_neg_distance(mx), eps) >= theta)) continue;
          for (int64_t c = b0; c < b1; ++c) {
            const float nd = ctx_neg_distance(s[c]);
            if (ctx_band_value(nd, eps) >= theta) {
              cv.push_back({int32_t(c0 + c), nd});
              tk.offer(nd);
              theta = tk.threshold();
            }
          }
        }
        if (cv.size() >= compact_at[r]) {
          compact(cv, theta, eps);
          compact_at[r] = std::max(min_compact, 2 * cv.size());
        }
      }
    }
    for (int64_t r = 0; r < rn; ++r)
      out.size[r0 + r] = emit_neighbours(top[r], sorted, eps, [&](auto&& fn) {
        for (const Cand& c : cands[r]) fn(c.col, c.neg_d);
      }, out.col[task], out.flag[task]);
  });
  return out;
}


// The lists of neighbour_pass for a batch that is one tile (B <= kOneTileRows): S in one GEMM, each row scanned once.
inline NbrLists one_tile_lists(const at::Tensor& F, const LabelIndex& cls, int64_t k, float eps, float mn) {
  const int64_t B = F.size(0);
  const at::Tensor S = at::mm(F, F.t());
  NbrLists out;
  out.con.resize(1);
  out.size.assign(B, 0);
  out.col.resize(1);
  out.flag.resize(1);
  std::vector<float> heap(k), sorted(k), nd(B);
  for (int64_t r = 0; r < B; ++r) {
    const float* s = S.data_ptr<float>() + r * B;
    hinge_negatives_row(s, B, cls.col_class.data(), cls.row_class[r], mn, out.con[0]);
#pragma omp simd
    for (int64_t c = 0; c < B; ++c) nd[c] = ctx_neg_distance(s[c]);
    TopK tk{heap.data(), 0, k};
    for (int64_t c = 0; c < B; ++c) tk.offer(nd[c]);
    out.size[r] = emit_neighbours(tk, sorted, eps, [&](auto&& fn) {
      for (int64_t c = 0; c < B; ++c) fn(int32_t(c), nd[c]);
    }, out.col[0], out.flag[0]);
  }
  return out;
}

}  // namespace ctx
}  // namespace cpu
}  // namespace flashdml
