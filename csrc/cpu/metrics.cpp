// The metrics pass (docs/spec.md §3) on the CPU: one streaming pass over S = x y^T for a subset of query rows, feeding
//  (a) per-row top-k lists (k = keep[r] per row, sorted by value descending, ties -> lower reference index, the
//      query itself excluded in self mode): recall@k and MAP@R are computed from them in Python;
//  (b) fine similarity histograms (histogram.h, 2^16 bins) of the positive and the negative pairs, for PR-AUC and
//      OPIS's FAR range: cross mode all pairs, self mode the unordered pairs j > i (the same PR-AUC as all ordered
//      pairs i != j, whose counts are twice these);
//  (c) per-class histograms on a coarser grid for OPIS (self mode): class c's positive pairs (both ends in c,
//      j > i) and its negative pairs (exactly one end in c). A negative pair {i, j} is counted for class(i) from
//      row i and for class(j) from row j, so one row's "vs other-class columns" histogram goes to its own class.
// Rows must then come sorted by class: tasks are split at class boundaries, so each class's histogram row is
// written by one task only (no per-task T x bins copies), and the output covers only the classes of these rows.
// The dense loop counts every pair as a negative (branch-free, vectorised binning); the positives, a sparse
// list per class (label_index.h), are moved over afterwards.
// Nothing B x M is stored: memory is O((B + M) d + sum(keep) + T_rows * bins + tasks * 2^16).
//
// Top-k: one TopKBuffer per row (flashdml/topk.h, shared with knn / hardest negatives) fed by offer_tile_row's
// vectorised threshold scan; capacity k + slack, so nth_element runs once per >= 256 accepted candidates.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_tiles.h"
#include "flashdml/op_checks.h"
#include "flashdml/histogram.h"
#include "flashdml/poison.h"
#include "flashdml/topk.h"
#include "label_index.h"

namespace flashdml {
namespace cpu {
namespace {

// Task boundaries over rows [0, R): about equal row counts, moved forward to a class change when `classes`
// (the rows' class ids, non-decreasing) is given.
std::vector<int64_t> task_bounds(int64_t R, const std::vector<int32_t>* classes) {
  const int64_t n_blocks = (R + kTileRows - 1) / kTileRows;
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_blocks));
  std::vector<int64_t> b(n_tasks + 1);
  b[0] = 0;
  for (int64_t t = 1; t < n_tasks; ++t) {
    int64_t r = std::max(b[t - 1], R * t / n_tasks);
    if (classes) {
      while (r > 0 && r < R && (*classes)[r] == (*classes)[r - 1]) ++r;
    }
    b[t] = std::min(r, R);
  }
  b[n_tasks] = R;
  return b;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> metrics_pass_cpu(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& labels, const at::Tensor& ref_labels,
    const at::Tensor& rows_in, const at::Tensor& keep_in, bool self_mode, bool pair_hist, int64_t opis_bins) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* op = "metrics_pass";
  check::metrics_pass_inputs(op, x_in, y_in, labels, ref_labels, rows_in, keep_in, self_mode, opis_bins);
  const int64_t R = rows_in.size(0);
  const bool opis = opis_bins > 0;
  int shift = 0;  // coarse bin = fine bin >> shift (opis_bins is a power of two: checked above)
  while (opis && (kSimBins >> shift) > opis_bins) ++shift;
  const at::Tensor x = as_float_contiguous(x_in);
  const at::Tensor y = self_mode ? x : as_float_contiguous(y_in);
  const at::Tensor rows_t = rows_in.contiguous(), keep_t = keep_in.contiguous();
  const int64_t M = y.size(0), d = x.size(1);
  const int64_t* rows = rows_t.data_ptr<int64_t>();
  const int64_t* keep = keep_t.data_ptr<int64_t>();
  const LabelIndex lab = build_label_index(labels, ref_labels);
  std::vector<int32_t> row_cls(R);
  for (int64_t r = 0; r < R; ++r) row_cls[r] = lab.row_class[rows[r]];
  int32_t class_first = 0, n_cls = 0;
  if (opis && R > 0) {
    for (int64_t r = 1; r < R; ++r)
      TORCH_CHECK_VALUE(row_cls[r] >= row_cls[r - 1], op, ": rows must be sorted by class (opis_bins > 0), but row ",
                        rows[r], " (rows[", r, "]) comes after a row of a later class");
    class_first = row_cls[0];
    n_cls = row_cls[R - 1] - class_first + 1;
  }

  auto lopts = x.options().dtype(at::kLong);
  at::Tensor offsets = new_output({R + 1}, lopts);
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t r = 0; r < R; ++r) off[r + 1] = off[r] + keep[r];
  at::Tensor out_idx = new_output({off[R]}, lopts);
  at::Tensor out_val = new_output({off[R]}, x.options());
  at::Tensor class_pos = at::zeros({opis ? n_cls : 0, opis ? opis_bins : 0}, lopts);
  at::Tensor class_neg = at::zeros({opis ? n_cls : 0, opis ? opis_bins : 0}, lopts);
  int64_t* cpos = class_pos.data_ptr<int64_t>();
  int64_t* cneg = class_neg.data_ptr<int64_t>();
  int64_t* oidx = out_idx.data_ptr<int64_t>();
  float* oval = out_val.data_ptr<float>();
  bool any_topk = false;
  for (int64_t r = 0; r < R; ++r) any_topk |= keep[r] > 0;

  const std::vector<int64_t> bounds = task_bounds(R, opis ? &row_cls : nullptr);
  const int64_t n_tasks = int64_t(bounds.size()) - 1;
  // Per-task fine histograms [pos | neg][bin]: self mode counts the pairs j > i (unordered: the same AP, and
  // the negatives are OPIS's FAR counts), cross mode all pairs.
  const bool fine = pair_hist || opis;
  std::vector<std::vector<int64_t>> task_hist(n_tasks);
  const float* xp = x.data_ptr<float>();

  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      std::vector<int64_t>& hist = task_hist[task];
      hist.assign(size_t(fine ? 2 * kSimBins : 0), 0);
      int64_t* h_pos = fine ? hist.data() : nullptr;
      int64_t* h_neg = fine ? hist.data() + kSimBins : nullptr;
      at::Tensor scratch = at::empty({kTileRows, kTileCols}, x.options());
      at::Tensor xb = at::empty({kTileRows, d}, x.options());
      std::vector<int32_t> bins(kTileCols);
      int32_t* bn = bins.data();
      std::vector<TopKBuffer> topk(kTileRows);
      for (int64_t r0 = bounds[task]; r0 < bounds[task + 1]; r0 += kTileRows) {
        const int64_t rn = std::min(bounds[task + 1], r0 + kTileRows) - r0;
        float* xbp = xb.data_ptr<float>();
        for (int64_t r = 0; r < rn; ++r) {
          std::memcpy(xbp + r * d, xp + rows[r0 + r] * d, size_t(d) * sizeof(float));
          if (keep[r0 + r] > 0) {  // capacity k + slack: a compaction (nth_element) every >= 256 accepted entries
            const int64_t k = keep[r0 + r];
            topk[r].reset(k, k + std::min<int64_t>(std::max<int64_t>(2 * k, 256), int64_t(1) << 15));
          }
        }
        for (int64_t c0 = 0; c0 < M; c0 += kTileCols) {
          const int64_t cn = std::min(kTileCols, M - c0);
          gemm_tile(scratch, xb, 0, rn, y, c0, cn);
          const float* S = scratch.data_ptr<float>();
          for (int64_t r = 0; r < rn; ++r) {
            const int64_t i = rows[r0 + r];
            const float* s = S + r * kTileCols;
            const int64_t self_c = self_mode ? i - c0 : -1;  // tile column of (i, i), if inside
            if (fine) {
              // Dense part: every pair counted as a negative; the positives (sparse) are moved below.
#pragma omp simd
              for (int64_t c = 0; c < cn; ++c) bn[c] = similarity_bin(s[c]);
              const int64_t cf = self_mode ? std::clamp<int64_t>(i + 1 - c0, 0, cn) : 0;  // first column j > i
              for (int64_t c = cf; c < cn; ++c) ++h_neg[bn[c]];
              int64_t* cp = nullptr;
              int64_t* cg = nullptr;
              if (opis) {
                const int64_t rc = lab.row_class[i] - class_first;
                cp = cpos + rc * opis_bins;
                cg = cneg + rc * opis_bins;
                for (int64_t c = 0; c < cn; ++c) ++cg[coarse_bin(bn[c], shift)];
              }
              auto [pb, pe] = lab.positives_in(i, c0, c0 + cn);  // includes (i, i) in self mode
              for (const int64_t* p = pb; p != pe; ++p) {
                const int32_t b = bn[*p - c0];
                if (opis) {
                  --cg[coarse_bin(b, shift)];
                  if (*p > i) ++cp[coarse_bin(b, shift)];
                }
                if (!self_mode || *p > i) {
                  --h_neg[b];
                  ++h_pos[b];
                }
              }
            }
            if (keep[r0 + r] > 0) {
              if (self_c >= 0 && self_c < cn) scratch.data_ptr<float>()[r * kTileCols + self_c] = std::numeric_limits<float>::quiet_NaN();  // not a candidate
              offer_tile_row(topk[r], s, cn, c0);
            }
          }
        }
        if (any_topk) {
          for (int64_t r = 0; r < rn; ++r) {
            if (keep[r0 + r] == 0) continue;
            const std::vector<TopKEntry>& best = topk[r].finish();
            TORCH_CHECK(int64_t(best.size()) == keep[r0 + r],
                        "metrics_pass: fewer candidates than keep (non-finite similarities?)");
            for (size_t t = 0; t < best.size(); ++t) {
              oidx[off[r0 + r] + int64_t(t)] = best[t].index;
              oval[off[r0 + r] + int64_t(t)] = best[t].value;
            }
          }
        }
      }
    }
  });

  at::Tensor pairs = at::zeros({fine ? 2 : 0, fine ? kSimBins : 0}, lopts);
  for (int64_t task = 0; task < n_tasks; ++task) {  // task order: deterministic (integer sums anyway)
    const int64_t* h = task_hist[task].data();
    int64_t* p = pairs.data_ptr<int64_t>();
    for (int64_t b = 0; fine && b < 2 * kSimBins; ++b) p[b] += h[b];
  }
  return {offsets, out_idx, out_val, pairs, class_pos, class_neg};
}

}  // namespace
}  // namespace cpu
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CPU, m) { m.impl("metrics_pass", &flashdml::cpu::metrics_pass_cpu); }
