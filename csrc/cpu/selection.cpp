// Fused similarity + top-k selection on the CPU: knn (docs/spec.md §1.2) and hardest negatives (docs/spec.md §1.3, the
// selection of Cross-Example Negative Mining). S = x y^T is streamed in 128 x 512 tiles (cpu_tiles.h); each
// tile is folded into the selection while it is in L2 and then dropped, so nothing B x M is ever stored.
//
// knn: one TopKBuffer per row of the row block (flashdml/topk.h): a row of a tile is skipped outright when its
// (vectorised) maximum is below the row's current k-th value, otherwise the entries at or above it are offered.
// Memory O((B + M) d + B k).
//
// hardest negatives, two strategies with the same result (the k best negatives in the order "value descending,
// flat index i*M + j ascending", a total order, so the set does not depend on the tiling or thread count):
//  * one pass (small k): one TopKBuffer of capacity 2k per task over all its rows; task lists are merged.
//    Memory O(T k) for T tasks (threads); used while T k <= kOnePassEntries.
//  * radix select (any k): pass 1 histograms the high 16 bits of the order-preserving key of every negative
//    value (65536 int64 bins per task) and finds the bin holding the k-th value. Pass 2 collects every negative
//    above that bin (fewer than k) and, when the bin is small, the bin itself, then selects in memory. When the
//    bin is large (heavy ties or a very narrow value range), pass 2 histograms the low 16 bits inside the bin
//    instead, which gives the k-th value exactly, and pass 3 collects the entries above it plus the entries
//    equal to it with the lowest flat indices (each task keeps at most its quota of them). Memory O(k) plus the
//    histograms, whatever k is.
// Every pass recomputes the same tiles with the same single-threaded GEMM, so S values agree bitwise between
// passes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_tiles.h"
#include "flashdml/op_checks.h"
#include "flashdml/poison.h"
#include "flashdml/topk.h"
#include "label_index.h"

namespace flashdml {

// Test hook (ops.cpp: _set_selection_strategy): 0 = automatic, 1 = always one pass, 2 = always radix select.
std::atomic<int64_t>& selection_strategy() {
  static std::atomic<int64_t> s{0};
  return s;
}

namespace cpu {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int64_t kBins = 65536;
constexpr int64_t kOnePassEntries = int64_t(1) << 18;  // T * k below this: the one-pass strategy
constexpr int64_t kSmallBin = int64_t(1) << 20;       // a boundary bin this small is collected in pass 2

// Rows of x and y as the kernels use them (fp32, normalised when asked); y aliases x when the caller passed the
// same tensor twice (self mode).
struct Rows {
  at::Tensor x, y;
};

// Call check::rows first.
Rows prepare_rows(const at::Tensor& x_in, const at::Tensor& y_in, bool normalize) {
  at::Tensor inv;
  Rows r;
  r.x = normalized_rows(x_in, normalize, &inv);
  r.y = y_in.is_same(x_in) ? r.x : normalized_rows(y_in, normalize, &inv);
  return r;
}

// ------------------------------------------------------------------------------------------------- knn
std::tuple<at::Tensor, at::Tensor> knn_fwd_cpu(const at::Tensor& x_in, const at::Tensor& y_in, int64_t k,
                                               bool exclude_diagonal, bool normalize) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* op = "knn_fwd";
  check::knn_fwd_inputs(op, x_in, y_in, k, exclude_diagonal);  // flashdml/op_checks.h
  const Rows rows = prepare_rows(x_in, y_in, normalize);
  const at::Tensor &x = rows.x, &y = rows.y;
  const int64_t B = x.size(0), M = y.size(0);
  auto fopts = x.options().dtype(at::kFloat);
  at::Tensor values = new_output({B, k}, fopts);
  at::Tensor indices = new_output({B, k}, x.options().dtype(at::kLong));
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  const int64_t capacity = k + std::max<int64_t>(k, 64);

  const TaskPlan plan = plan_row_tasks(B);
  for_each_row_block(plan, B, [&](int64_t, int64_t r0, int64_t r1) {
    at::Tensor scratch = at::empty({kTileRows, kTileCols}, fopts);
    const int64_t rn = r1 - r0;
    std::vector<TopKBuffer> bufs(rn);
    for (auto& b : bufs) b.reset(k, capacity);
    for (int64_t c0 = 0; c0 < M; c0 += kTileCols) {
      const int64_t cn = std::min(kTileCols, M - c0);
      gemm_tile(scratch, x, r0, rn, y, c0, cn);
      float* S = scratch.data_ptr<float>();
      for (int64_t r = 0; r < rn; ++r) {
        const int64_t i = r0 + r;
        float* s = S + r * kTileCols;
        if (exclude_diagonal && i >= c0 && i < c0 + cn) s[i - c0] = kNaN;
        offer_tile_row(bufs[r], s, cn, c0);
      }
    }
    for (int64_t r = 0; r < rn; ++r) {
      const auto& e = bufs[r].finish();
      TORCH_CHECK(int64_t(e.size()) == k, "knn_fwd: row ", r0 + r, " has fewer than k finite candidates (NaN input?)");
      for (int64_t j = 0; j < k; ++j) {
        vp[(r0 + r) * k + j] = e[j].value;
        ip[(r0 + r) * k + j] = e[j].index;
      }
    }
  });
  return {values, indices};
}

// ----------------------------------------------------------------------------------- hardest negatives
// Runs fn(task, i, c0, cn, s) for every row i of every S tile, with the non-negative pairs of the row set to
// NaN (s has cn valid entries, columns c0..c0+cn).
template <typename Fn>
void for_each_negative_row(const at::Tensor& x, const at::Tensor& y, const LabelIndex& lab, bool self_mode,
                           const TaskPlan& plan, const Fn& fn) {
  const int64_t B = x.size(0), M = y.size(0);
  const int32_t* col_class = lab.col_class.data();
  auto fopts = x.options().dtype(at::kFloat);
  for_each_row_block(plan, B, [&](int64_t task, int64_t r0, int64_t r1) {
    at::Tensor scratch = at::empty({kTileRows, kTileCols}, fopts);
    const int64_t rn = r1 - r0;
    for (int64_t c0 = 0; c0 < M; c0 += kTileCols) {
      const int64_t cn = std::min(kTileCols, M - c0);
      gemm_tile(scratch, x, r0, rn, y, c0, cn);
      float* S = scratch.data_ptr<float>();
      for (int64_t r = 0; r < rn; ++r) {
        const int64_t i = r0 + r;
        float* s = S + r * kTileCols;
        const int32_t rc = lab.row_class[i];
        const int32_t* cc = col_class + c0;
#pragma omp simd
        for (int64_t c = 0; c < cn; ++c) s[c] = cc[c] != rc ? s[c] : kNaN;
        if (self_mode && i >= c0 && i < c0 + cn) s[i - c0] = kNaN;
        fn(task, i, c0, cn, s);
      }
    }
  });
}

// Sorted best first; writes the outputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> write_selection(std::vector<TopKEntry>& sel, int64_t k, int64_t M,
                                                               const at::TensorOptions& opts) {
  TORCH_CHECK(int64_t(sel.size()) >= k, "hardest_negatives_fwd: found ", sel.size(), " of ", k,
              " negatives (NaN input?)");
  if (int64_t(sel.size()) > k) std::nth_element(sel.begin(), sel.begin() + (k - 1), sel.end(), TopKCmp());
  sel.resize(size_t(k));
  std::sort(sel.begin(), sel.end(), TopKCmp());
  at::Tensor values = new_output({k}, opts.dtype(at::kFloat));
  at::Tensor rows = new_output({k}, opts.dtype(at::kLong));
  at::Tensor cols = new_output({k}, opts.dtype(at::kLong));
  float* vp = values.data_ptr<float>();
  int64_t* rp = rows.data_ptr<int64_t>();
  int64_t* cp = cols.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) {
    vp[j] = sel[j].value;
    rp[j] = sel[j].index / M;
    cp[j] = sel[j].index % M;
  }
  return {values, rows, cols};
}

std::vector<TopKEntry> select_one_pass(const at::Tensor& x, const at::Tensor& y, const LabelIndex& lab,
                                       bool self_mode, int64_t k, const TaskPlan& plan) {
  const int64_t M = y.size(0);
  std::vector<TopKBuffer> bufs(plan.num_tasks);
  for (auto& b : bufs) b.reset(k, 2 * k);
  for_each_negative_row(x, y, lab, self_mode, plan, [&](int64_t task, int64_t i, int64_t c0, int64_t cn, float* s) {
    offer_tile_row(bufs[task], s, cn, i * M + c0);
  });
  std::vector<TopKEntry> all;
  for (auto& b : bufs) {
    const auto& e = b.finish();
    all.insert(all.end(), e.begin(), e.end());
  }
  return all;
}

// Histogram of (key >> shift) & 0xffff over the negatives whose key matches `prefix` above bit shift + 16
// (prefix_shift = 32: all), summed over tasks in task order; per-task histograms kept when asked.
std::vector<int64_t> key_histogram(const at::Tensor& x, const at::Tensor& y, const LabelIndex& lab, bool self_mode,
                                   const TaskPlan& plan, int shift, uint32_t prefix, int prefix_shift,
                                   std::vector<std::vector<int64_t>>* per_task) {
  std::vector<std::vector<int64_t>> hist(plan.num_tasks, std::vector<int64_t>(kBins, 0));
  for_each_negative_row(x, y, lab, self_mode, plan, [&](int64_t task, int64_t, int64_t, int64_t cn, float* s) {
    int64_t* h = hist[task].data();
    for (int64_t c = 0; c < cn; ++c) {
      if (s[c] != s[c]) continue;
      const uint32_t key = order_key(s[c]);
      if (prefix_shift < 32 && (key >> prefix_shift) != prefix) continue;
      ++h[(key >> shift) & 0xffffu];
    }
  });
  std::vector<int64_t> total(kBins, 0);
  for (const auto& h : hist)
    for (int64_t b = 0; b < kBins; ++b) total[b] += h[b];
  if (per_task) *per_task = std::move(hist);
  return total;
}

// The bin (from the top) where the cumulative count reaches `need`; *above = the count in the bins above it.
int64_t find_bin(const std::vector<int64_t>& hist, int64_t need, int64_t* above) {
  int64_t acc = 0;
  for (int64_t b = kBins - 1; b >= 0; --b) {
    if (acc + hist[b] >= need) {
      *above = acc;
      return b;
    }
    acc += hist[b];
  }
  TORCH_CHECK(false, "hardest_negatives_fwd: fewer negatives than k (NaN input?)");
  return 0;
}

std::vector<TopKEntry> select_radix(const at::Tensor& x, const at::Tensor& y, const LabelIndex& lab, bool self_mode,
                                    int64_t k, const TaskPlan& plan) {
  const int64_t M = y.size(0);
  int64_t above1 = 0;
  const std::vector<int64_t> hi = key_histogram(x, y, lab, self_mode, plan, 16, 0, 32, nullptr);
  const uint32_t bin = uint32_t(find_bin(hi, k, &above1));
  const int64_t need1 = k - above1;
  std::vector<std::vector<TopKEntry>> kept(plan.num_tasks);
  std::vector<TopKEntry> all;
  if (hi[bin] <= std::max(k, kSmallBin)) {
    // Pass 2: everything above the bin plus the whole bin (O(k + kSmallBin) entries), then select in memory.
    for_each_negative_row(x, y, lab, self_mode, plan, [&](int64_t task, int64_t i, int64_t c0, int64_t cn, float* s) {
      auto& out = kept[task];
      for (int64_t c = 0; c < cn; ++c)
        if (s[c] == s[c] && (order_key(s[c]) >> 16) >= bin) out.push_back({s[c], i * M + c0 + c});
    });
    for (auto& v : kept) all.insert(all.end(), v.begin(), v.end());
    return all;
  }
  // Pass 2: the low 16 bits inside the bin give the k-th key exactly.
  std::vector<std::vector<int64_t>> lo_task;
  const std::vector<int64_t> lo = key_histogram(x, y, lab, self_mode, plan, 0, bin, 16, &lo_task);
  int64_t above2 = 0;
  const uint32_t low = uint32_t(find_bin(lo, need1, &above2));
  const uint32_t thr_key = (bin << 16) | low;
  int64_t need2 = need1 - above2;  // entries equal to the k-th value to keep: the lowest flat indices
  // Tasks own increasing row ranges, so the lowest flat indices come from the first tasks: per-task quotas.
  std::vector<int64_t> quota(plan.num_tasks, 0);
  for (int64_t t = 0; t < plan.num_tasks && need2 > 0; ++t) {
    quota[t] = std::min(need2, lo_task[t][low]);
    need2 -= quota[t];
  }
  lo_task.clear();
  std::vector<TopKBuffer> equal(plan.num_tasks);
  for (int64_t t = 0; t < plan.num_tasks; ++t)
    if (quota[t] > 0) equal[t].reset(quota[t], 2 * quota[t]);
  // Pass 3: entries above the k-th value, and each task's quota of those equal to it.
  for_each_negative_row(x, y, lab, self_mode, plan, [&](int64_t task, int64_t i, int64_t c0, int64_t cn, float* s) {
    auto& out = kept[task];
    for (int64_t c = 0; c < cn; ++c) {
      if (s[c] != s[c]) continue;
      const uint32_t key = order_key(s[c]);
      if (key > thr_key) out.push_back({s[c], i * M + c0 + c});
      else if (key == thr_key && quota[task] > 0) equal[task].offer(s[c], i * M + c0 + c);
    }
  });
  for (int64_t t = 0; t < plan.num_tasks; ++t) {
    all.insert(all.end(), kept[t].begin(), kept[t].end());
    if (quota[t] > 0) {
      const auto& e = equal[t].finish();
      all.insert(all.end(), e.begin(), e.end());
    }
  }
  return all;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hardest_negatives_fwd_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                                         const at::Tensor& labels,
                                                                         const at::Tensor& ref_labels, int64_t k,
                                                                         bool self_mode, bool normalize) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* op = "hardest_negatives_fwd";
  check::hardest_negatives_fwd_inputs(op, x_in, y_in, labels, ref_labels, k, self_mode);  // flashdml/op_checks.h
  const LabelIndex lab = build_label_index(labels, ref_labels);
  const Rows rows = prepare_rows(x_in, y_in, normalize);
  const at::Tensor &x = rows.x, &y = rows.y;
  const int64_t B = x.size(0), M = y.size(0);
  const TaskPlan plan = plan_row_tasks(B);
  const int64_t strategy = selection_strategy().load();
  const bool one_pass = strategy == 1 || (strategy == 0 && k * plan.num_tasks <= kOnePassEntries);
  std::vector<TopKEntry> sel = one_pass ? select_one_pass(x, y, lab, self_mode, k, plan)
                                        : select_radix(x, y, lab, self_mode, k, plan);
  return write_selection(sel, k, M, x.options());
}

}  // namespace
}  // namespace cpu
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CPU, m) {
  m.impl("knn_fwd", &flashdml::cpu::knn_fwd_cpu);
  m.impl("hardest_negatives_fwd", &flashdml::cpu::hardest_negatives_fwd_cpu);
}
