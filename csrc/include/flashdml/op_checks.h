// One input check per compiled op, called first by both its CPU entry (cpu/*.cpp) and its CUDA entry (cuda/*.cu),
// so that the two backends accept and reject the same arguments with the same messages (tests/test_op_input_checks.py
// runs them on the CPU; tests/test_cuda_checks_source.py checks that every entry calls its op's function).
//
// Everything here is device-agnostic: shapes, dtypes, devices and scalar arguments are O(1). The value checks that
// need an O(n) scan say so: on the CPU they read the tensor in place, on a device they use ATen reductions and
// synchronise with the host once (no host loop over device memory). What a backend needs beyond these (the CUDA
// grid limits, non-empty inputs for a kernel launch) it checks after calling them.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "flashdml/check.h"
#include "flashdml/histogram.h"

namespace flashdml {
namespace check {

// ------------------------------------------------------------------------------------------- batch softmax
// x, y [B, d] (row i's positive is column i: B == M), labels int64 [B] or None, temperature 0-dim fp32.
inline void batch_softmax_fwd_inputs(const char* op, const at::Tensor& x, const at::Tensor& y,
                                     const c10::optional<at::Tensor>& labels, const at::Tensor& temperature) {
  rows(op, x, y);
  TORCH_CHECK_VALUE(y.size(0) == x.size(0), op, ": y has ", y.size(0), " rows, expected B = ", x.size(0),
                    " (row i's positive is column i)");
  if (labels.has_value()) check::labels(op, "labels", *labels, x.size(0), "B", x);
  scalar_f32(op, "temperature", temperature, x);
}

// The forward's inputs, grad_loss, row_lse fp32 [B] and (symmetric) col_lse fp32 [B]; without symmetric col_lse
// is not read (the forward returns it empty) and only has to be on the device of x.
inline void batch_softmax_bwd_inputs(const char* op, const at::Tensor& grad_loss, const at::Tensor& x,
                                     const at::Tensor& y, const c10::optional<at::Tensor>& labels,
                                     const at::Tensor& temperature, bool symmetric, const at::Tensor& row_lse,
                                     const at::Tensor& col_lse) {
  batch_softmax_fwd_inputs(op, x, y, labels, temperature);
  check::grad_loss(op, grad_loss, x);
  vector(op, "row_lse", row_lse, at::kFloat, x.size(0), "B", x);
  if (symmetric) {
    vector(op, "col_lse", col_lse, at::kFloat, x.size(0), "B", x);
  } else {
    same_device(op, "col_lse", col_lse, x);
  }
}

// -------------------------------------------------------------------------------------------------- xent
// x [B, d], y [M, d] (self mode: y is x, B == M), labels int64 [B], ref_labels int64 [M], temperature 0-dim fp32.
inline void xent_fwd_inputs(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels,
                            const at::Tensor& ref_labels, const at::Tensor& temperature, bool self_mode) {
  rows(op, x, y);
  TORCH_CHECK_VALUE(!self_mode || y.size(0) == x.size(0), op, ": self_mode needs y = x (B == M), got B = ", x.size(0),
                    " and M = ", y.size(0));
  check::labels(op, "labels", labels, x.size(0), "B", x);
  check::labels(op, "ref_labels", ref_labels, y.size(0), "M", x);
  scalar_f32(op, "temperature", temperature, x);
}

// The forward's inputs, grad_loss, and lse / coef fp32 [1] (global_partition) or [B].
inline void xent_bwd_inputs(const char* op, const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y,
                            const at::Tensor& labels, const at::Tensor& ref_labels, const at::Tensor& temperature,
                            bool global_partition, bool self_mode, const at::Tensor& lse, const at::Tensor& coef) {
  xent_fwd_inputs(op, x, y, labels, ref_labels, temperature, self_mode);
  check::grad_loss(op, grad_loss, x);
  const std::string n_stat = global_partition ? std::string("1 (global_partition)")
                                              : c10::str("B = ", x.size(0), " (global_partition = false)");
  const int64_t n = global_partition ? 1 : x.size(0);
  vector(op, "lse", lse, at::kFloat, n, n_stat, x);
  vector(op, "coef", coef, at::kFloat, n, n_stat, x);
}

// ------------------------------------------------------------------------------------------- hinge pair
// x [B, d], y [M, d] (drop_diagonal: self mode, B == M), labels int64 [B], ref_labels int64 [M].
inline void hinge_pair_fwd_inputs(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels,
                                  const at::Tensor& ref_labels, bool drop_diagonal) {
  rows(op, x, y);
  check::labels(op, "labels", labels, x.size(0), "B", x);
  check::labels(op, "ref_labels", ref_labels, y.size(0), "M", x);
  TORCH_CHECK_VALUE(!drop_diagonal || x.size(0) == y.size(0), op,
                    ": drop_diagonal needs y = x (self mode, B == M), got B = ", x.size(0), " and M = ", y.size(0));
}

// The forward's inputs, grad_loss and counts int64 [2] (values >= 0 checked on the CPU only: see pair_counts).
inline void hinge_pair_bwd_inputs(const char* op, const at::Tensor& grad_loss, const at::Tensor& x,
                                  const at::Tensor& y, const at::Tensor& labels, const at::Tensor& ref_labels,
                                  bool drop_diagonal, const at::Tensor& counts) {
  hinge_pair_fwd_inputs(op, x, y, labels, ref_labels, drop_diagonal);
  check::grad_loss(op, grad_loss, x);
  pair_counts(op, "counts", counts, x);
}

// ---------------------------------------------------------------------------------------------- triplet
// x [B, d], y [M, d] (self mode: y is x, B == M), labels int64 [B], ref_labels int64 [M].
inline void triplet_fwd_inputs(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels,
                               const at::Tensor& ref_labels, bool self_mode) {
  rows(op, x, y);
  TORCH_CHECK_VALUE(!self_mode || x.size(0) == y.size(0), op, ": self_mode needs y = x (B == M), got B = ",
                    x.size(0), " and M = ", y.size(0));
  check::labels(op, "labels", labels, x.size(0), "B", x);
  check::labels(op, "ref_labels", ref_labels, y.size(0), "M", x);
}

// The forward's inputs, grad_loss and counts int64 [1] (the forward's number of active triplets; >= 0 checked on
// the CPU only, where reading it costs no host sync).
inline void triplet_bwd_inputs(const char* op, const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y,
                               const at::Tensor& labels, const at::Tensor& ref_labels, bool self_mode,
                               const at::Tensor& counts) {
  triplet_fwd_inputs(op, x, y, labels, ref_labels, self_mode);
  check::grad_loss(op, grad_loss, x);
  vector(op, "counts", counts, at::kLong, 1, std::string("1 (the forward's count of active triplets)"), x);
  if (counts.is_cpu()) {
    const int64_t c = counts.contiguous().data_ptr<int64_t>()[0];
    TORCH_CHECK_VALUE(c >= 0, op, ": counts must be a count >= 0, got ", c);
  }
}

// -------------------------------------------------------------------------------------------- selection
// x [B, d], y [M, d] (exclude_diagonal: self mode, B == M), 1 <= k <= the candidates per row.
inline void knn_fwd_inputs(const char* op, const at::Tensor& x, const at::Tensor& y, int64_t k,
                           bool exclude_diagonal) {
  rows(op, x, y);
  TORCH_CHECK_VALUE(!exclude_diagonal || x.size(0) == y.size(0), op,
                    ": exclude_diagonal needs y = x (self mode, B == M), got B = ", x.size(0), " and M = ", y.size(0));
  const int64_t m = y.size(0), n_cand = m - (exclude_diagonal ? 1 : 0);
  int_in_range(op, "k", k, 1, n_cand,
               exclude_diagonal ? c10::str("[1, M - 1 = ", n_cand, "] (the candidates per row)")
                                : c10::str("[1, M = ", m, "] (the candidates per row)"));
}

// The number of pairs (i, j) with labels[i] != ref_labels[j], by ATen ops on either device: sort ref_labels, two
// binary searches per row. O((B + M) log M), one host sync on a device.
inline int64_t negative_pairs(const at::Tensor& labels, const at::Tensor& ref_labels) {
  const int64_t B = labels.size(0), M = ref_labels.size(0);
  if (B == 0 || M == 0) return 0;
  const at::Tensor sorted = std::get<0>(ref_labels.contiguous().sort());
  const at::Tensor q = labels.contiguous();
  const at::Tensor same = at::searchsorted(sorted, q, false, /*right=*/true) - at::searchsorted(sorted, q);
  return B * M - same.sum().item<int64_t>();
}

// x [B, d], y [M, d] (self mode: B == M), labels int64 [B], ref_labels int64 [M], 1 <= k <= the negative pairs
// (the last is the O((B + M) log M) count of negative_pairs).
inline void hardest_negatives_fwd_inputs(const char* op, const at::Tensor& x, const at::Tensor& y,
                                         const at::Tensor& labels, const at::Tensor& ref_labels, int64_t k,
                                         bool self_mode) {
  rows(op, x, y);
  TORCH_CHECK_VALUE(!self_mode || x.size(0) == y.size(0), op, ": self_mode needs y = x (B == M), got B = ",
                    x.size(0), " and M = ", y.size(0));
  check::labels(op, "labels", labels, x.size(0), "B", x);
  check::labels(op, "ref_labels", ref_labels, y.size(0), "M", x);
  const int64_t n_neg = negative_pairs(labels, ref_labels);
  int_in_range(op, "k", k, 1, n_neg, c10::str("[1, number of negatives = ", n_neg, "]"));
}

// ---------------------------------------------------------------------------------------------- metrics
// x [B, d], y [M, d] (self mode: B == M), labels int64 [B], ref_labels int64 [M], rows int64 [R] with values in
// [0, B), keep int64 [R] with values in [0, candidates], opis_bins 0 or a power of two <= 2^16 (then self mode).
// (kSimBins, flashdml/histogram.h: the finest histogram). The two value checks are O(R) (one sync each on a device). That rows
// are sorted by class (opis_bins > 0) needs the op's class ids and stays in each backend.
inline void metrics_pass_inputs(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels,
                                const at::Tensor& ref_labels, const at::Tensor& rows_t, const at::Tensor& keep,
                                bool self_mode, int64_t opis_bins) {
  rows(op, x, y);
  TORCH_CHECK_VALUE(!self_mode || x.size(0) == y.size(0), op, ": self_mode needs y = x (B == M), got B = ",
                    x.size(0), " and M = ", y.size(0));
  check::labels(op, "labels", labels, x.size(0), "B", x);
  check::labels(op, "ref_labels", ref_labels, y.size(0), "M", x);
  TORCH_CHECK_VALUE(rows_t.defined() && rows_t.dim() == 1, op, ": rows must be a 1-D tensor of row indices, got ",
                    "shape ", rows_t.defined() ? rows_t.sizes() : at::IntArrayRef{});
  const int64_t R = rows_t.size(0);
  vector(op, "rows", rows_t, at::kLong, R, c10::str("R = ", R), x);
  vector(op, "keep", keep, at::kLong, R, c10::str("R = rows.numel() = ", R), x);
  int_in_range(op, "opis_bins", opis_bins, 0, kSimBins, c10::str("[0, ", kSimBins, "]"));
  if (opis_bins > 0) {
    TORCH_CHECK_VALUE(self_mode, op, ": per-class histograms (opis_bins > 0) need self mode");
    int shift = 0;
    while ((kSimBins >> shift) > opis_bins) ++shift;
    TORCH_CHECK_VALUE((kSimBins >> shift) == opis_bins, op, ": opis_bins must be a power of two <= 2^16, got ",
                      opis_bins);
  }
  const int64_t C = self_mode ? y.size(0) - 1 : y.size(0);  // candidates per row
  values_in_range(op, "rows", rows_t, 0, x.size(0), c10::str("a row of x in [0, B = ", x.size(0), ")"));
  values_in_range(op, "keep", keep, 0, C + 1, c10::str("[0, candidates = ", C, "]"));
}

// ------------------------------------------------------------------------------------------- contextual
// x [B, d] (B < 2^31), labels int64 [B], 2 <= k <= B, eps >= 0.
inline void contextual_fwd_inputs(const char* op, const at::Tensor& x, const at::Tensor& labels, int64_t k,
                                  double eps) {
  row_tensor(op, "x", x);
  check::labels(op, "labels", labels, x.size(0), "B", x);
  TORCH_CHECK_VALUE(x.size(0) < (int64_t(1) << 31), op, ": B must be < 2^31, got ", x.size(0));
  int_in_range(op, "k", k, 2, x.size(0), c10::str("[2, B = ", x.size(0), "]"));
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);
}

// The forward's inputs (k and eps are not used by the backward: checked as the forward checks them), grad_loss,
// the forward's neighbour lists (O(B + nnz), copied to the host once on a device) and con_counts int64 [2].
inline void contextual_bwd_inputs(const char* op, const at::Tensor& grad_loss, const at::Tensor& x,
                                  const at::Tensor& labels, int64_t k, double eps, const at::Tensor& nbr_ptr,
                                  const at::Tensor& nbr, const at::Tensor& nbr_flags, const at::Tensor& con_counts) {
  contextual_fwd_inputs(op, x, labels, k, eps);
  check::grad_loss(op, grad_loss, x);
  neighbour_lists(op, nbr_ptr, nbr, nbr_flags, x.size(0), x);
  pair_counts(op, "con_counts", con_counts, x);
}

// ----------------------------------------------------------------------------------------- anchor-LSE losses
// x [B, d], y [M, d] (self mode: y is x, B == M), labels int64 [B], ref_labels int64 [M], temperature 0-dim fp32
// (read by kind 0 only), kind 0 (SupCon), 1 (Multi-Similarity) or 2 (Circle), p0..p2 finite (kind 1: p0 = alpha
// and p1 = beta non-zero).
inline void anchor_lse_fwd_inputs(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels,
                                  const at::Tensor& ref_labels, const at::Tensor& temperature, int64_t kind,
                                  double p0, double p1, double p2, bool self_mode) {
  rows(op, x, y);
  TORCH_CHECK_VALUE(!self_mode || y.size(0) == x.size(0), op, ": self_mode needs y = x (B == M), got B = ", x.size(0),
                    " and M = ", y.size(0));
  check::labels(op, "labels", labels, x.size(0), "B", x);
  check::labels(op, "ref_labels", ref_labels, y.size(0), "M", x);
  scalar_f32(op, "temperature", temperature, x);
  int_in_range(op, "kind", kind, 0, 2, std::string("[0, 2] (0 supcon, 1 multi_similarity, 2 circle)"));
  TORCH_CHECK_VALUE(std::isfinite(p0) && std::isfinite(p1) && std::isfinite(p2), op,
                    ": p0, p1 and p2 must be finite, got ", p0, ", ", p1, ", ", p2);
  TORCH_CHECK_VALUE(kind != 1 || (p0 != 0 && p1 != 0), op,
                    ": multi_similarity (kind 1) needs alpha = p0 and beta = p1 non-zero, got ", p0, " and ", p1);
}

// The forward's inputs, grad_loss and row_stats fp32 [B, 4].
inline void anchor_lse_bwd_inputs(const char* op, const at::Tensor& grad_loss, const at::Tensor& x,
                                  const at::Tensor& y, const at::Tensor& labels, const at::Tensor& ref_labels,
                                  const at::Tensor& temperature, int64_t kind, double p0, double p1, double p2,
                                  bool self_mode, const at::Tensor& row_stats) {
  anchor_lse_fwd_inputs(op, x, y, labels, ref_labels, temperature, kind, p0, p1, p2, self_mode);
  check::grad_loss(op, grad_loss, x);
  TORCH_CHECK_VALUE(row_stats.defined(), op, ": row_stats is an undefined tensor");
  same_device(op, "row_stats", row_stats, x);
  TORCH_CHECK_TYPE(row_stats.scalar_type() == at::kFloat, op, ": row_stats must be float32, got ",
                   dtype_name(row_stats.scalar_type()));
  TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == x.size(0) && row_stats.size(1) == 4, op,
                    ": row_stats must have shape [B = ", x.size(0), ", 4], got ", row_stats.sizes());
}

}  // namespace check
}  // namespace flashdml
