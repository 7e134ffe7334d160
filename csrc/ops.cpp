// The one place that lists every compiled op (TORCH_LIBRARY schemas). Per-device kernels register their
// implementations with TORCH_LIBRARY_IMPL in cpu/*.cpp and cuda/*.cu, device-generic ATen code in aten/*.cpp;
// fake (meta) kernels and autograd are registered from Python (flashdml/ops/*.py) with torch.library.register_fake /
// register_autograd.
//
// Conventions shared by all ops (see docs/spec.md §0):
// * x, y: fp32, fp16 or bf16 rows; all accumulation is fp32. Losses and statistics are fp32; gradients come
//   back in the input dtype. With normalize=true the kernel L2-normalises the rows itself (x / max(|x|, 1e-12))
//   and returns gradients with respect to the raw rows: the CPU kernels per row inside their passes (no normalised
//   copy kept between them), the CUDA ops on entry (fp32 norms, normalised rows cast back to the input dtype for
//   the kernels; csrc/cuda/normalize_rows.h) and on the way out (dx = (g - x^ (x^ . g)) / |x|).
// * temperature is a 0-dim fp32 tensor on the same device (read on device, so no host sync on CUDA).
// * labels are int64 or None (None: no label masking).
// * Every entry, CPU and CUDA alike, first checks its arguments against these comments with its op's one check
//   function, flashdml::check::<op>_inputs (flashdml/op_checks.h, built on flashdml/check.h): TypeError for a
//   wrong dtype, ValueError for a wrong shape, size, device or out-of-range value, the message naming the op and
//   the argument (tests/test_op_input_checks.py on the CPU; tests/test_cuda_checks_source.py checks that every
//   CUDA entry calls the same function). The CUDA entries then check their kernels' own limits (non-empty
//   inputs, grid sizes: cuda/launch_utils.cuh).
#include <Python.h>
#include <torch/library.h>

#include <atomic>

#include "flashdml/poison.h"

namespace flashdml {
std::atomic<int64_t>& selection_strategy();  // cpu/selection.cpp
std::atomic<int64_t>& contextual_dense_mode();  // cpu/contextual.cpp
std::atomic<int64_t>& knn_strategy();        // cpu/selection.cpp
std::atomic<int64_t>& knn_last_path();       // cpu/selection.cpp
}  // namespace flashdml

namespace {

void set_poison(bool enabled) { flashdml::poison_flag().store(enabled); }

bool get_poison() { return flashdml::poison_flag().load(); }

void set_selection_strategy(int64_t s) {
  TORCH_CHECK(s >= 0 && s <= 2, "_set_selection_strategy: 0 (auto), 1 (one pass) or 2 (radix select)");
  flashdml::selection_strategy().store(s);
}

void set_contextual_dense(int64_t s) {
  TORCH_CHECK(s >= 0 && s <= 2, "_set_contextual_dense: 0 (auto), 1 (always sparse) or 2 (always dense when it fits)");
  flashdml::contextual_dense_mode().store(s);
}

void set_knn_strategy(int64_t s) {
  TORCH_CHECK(s >= 0 && s <= 2, "_set_knn_strategy: 0 (auto), 1 (tiled scan) or 2 (screened scan)");
  flashdml::knn_strategy().store(s);
}

int64_t knn_last_path() { return flashdml::knn_last_path().load(); }

}  // namespace

TORCH_LIBRARY(flashdml, m) {
  // Test support: fill every op output with NaN / a sentinel before the kernel writes it.
  m.def("_set_poison(bool enabled) -> ()", &set_poison);
  m.def("_get_poison() -> bool", &get_poison);
  // Test support: how the CPU hardest_negatives_fwd selects (0 automatic, 1 one pass, 2 radix select).
  m.def("_set_selection_strategy(int strategy) -> ()", &set_selection_strategy);
  // Test support: the CPU contextual loss's path for B > 256 (0 automatic, 1 always the sparse stage, 2 always the
  // dense B x B path when B <= 16384).
  m.def("_set_contextual_dense(int mode) -> ()", &set_contextual_dense);
  // Test support: whether the CPU contextual op takes the dense path for the forward's neighbour lists (ptr, nbr,
  // flags of contextual_fwd), under the current _set_contextual_dense mode.
  m.def("_contextual_dense_path(Tensor ptr, Tensor col, Tensor flag) -> bool");
  // Test support: how the CPU knn_fwd scans (0 automatic, 1 tiled, 2 screened whenever it can run, unprobed), and
  // which scan its last call used (1 tiled, 2 screened).
  m.def("_set_knn_strategy(int strategy) -> ()", &set_knn_strategy);
  m.def("_knn_last_path() -> int", &knn_last_path);

  // docs/spec.md §2.1. Row i's positive is column i; columns j != i with labels[j] == labels[i] are dropped.
  // Returns the loss, the per-row LSE of z = S / temperature over row i's allowed set, and (symmetric) the
  // per-column LSE; col_lse is empty when symmetric is false.
  m.def(
      "batch_softmax_fwd(Tensor x, Tensor y, Tensor? labels, Tensor temperature, bool symmetric, bool normalize) -> "
      "(Tensor loss, Tensor row_lse, Tensor col_lse)");
  // Recomputes S tile by tile; returns dx, dy (input dtype) and d loss / d temperature (0-dim fp32).
  m.def(
      "batch_softmax_bwd(Tensor grad_loss, Tensor x, Tensor y, Tensor? labels, Tensor temperature, "
      "bool symmetric, bool normalize, Tensor row_lse, Tensor col_lse) -> (Tensor dx, Tensor dy, Tensor dtemperature)");

  // Cross-example softmax (docs/spec.md §2.2, global_partition = true: one LSE over all negative pairs of the batch) and
  // NT-Xent (docs/spec.md §2.1b, global_partition = false: one LSE per row over that row's negatives). labels and
  // ref_labels are int64 (arange in pair mode); self_mode drops the pairs (i, i) (y is then x itself: autograd
  // adds the dx and dy slots). Returns the loss, the negative LSE(s) `lse` ([1] or [B], -inf when empty) and
  // `coef` ([1] or [B]): c = sum over the positives of sigmoid(lse - z_p) / |P|, which the backward needs.
  m.def(
      "xent_fwd(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, Tensor temperature, bool global_partition, "
      "bool self_mode, bool normalize) -> (Tensor loss, Tensor lse, Tensor coef)");
  m.def(
      "xent_bwd(Tensor grad_loss, Tensor x, Tensor y, Tensor labels, Tensor ref_labels, Tensor temperature, "
      "bool global_partition, bool self_mode, bool normalize, Tensor lse, Tensor coef) -> "
      "(Tensor dx, Tensor dy, Tensor dtemperature)");

  // ---- hinge-pair losses (TCM docs/spec.md §2.3, margin contrastive docs/spec.md §2.4): schemas below this line ----
  // One streaming pass shared by both losses: over the positive pairs (labels[i] == ref_labels[j]; with
  // drop_diagonal the pairs (i, i) are neither positive nor negative) and the negative pairs, the sums of the hinges
  // m+ - s and s - m- of the "hard" pairs and their exact counts. Hard: s <= m+ / s >= m- (strict = false, TCM) or
  // s < m+ / s > m- (strict = true, margin contrastive: only non-zero hinges count). Margins are compared in fp32.
  // loss = pos_weight * sums[0] / counts[0] + neg_weight * sums[1] / counts[1] (a term is 0 when its count is 0),
  // computed in double from the double sums; sums (fp32 [2]) and counts (int64 [2]) are [positive, negative].
  // TCM: drop_diagonal = self mode, strict = false. Contrastive: drop_diagonal = false, strict = true, weights 1.
  // Self mode passes x as both x and y (autograd adds the dx and dy slots).
  m.def(
      "hinge_pair_fwd(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, float pos_margin, float neg_margin, "
      "float pos_weight, float neg_weight, bool drop_diagonal, bool strict, bool normalize) -> "
      "(Tensor loss, Tensor sums, Tensor counts)");
  // Recomputes S tile by tile (the same tiles as the forward, so the same pairs are hard) and returns dx, dy
  // (input dtype): dL/ds = -pos_weight/counts[0] on hard positives, +neg_weight/counts[1] on hard negatives.
  m.def(
      "hinge_pair_bwd(Tensor grad_loss, Tensor x, Tensor y, Tensor labels, Tensor ref_labels, float pos_margin, "
      "float neg_margin, float pos_weight, float neg_weight, bool drop_diagonal, bool strict, bool normalize, "
      "Tensor counts) -> (Tensor dx, Tensor dy)");

  // ---- triplet margin loss over every triplet (docs/spec.md §6.4): schemas below this line ----
  // pml's TripletMarginLoss (all triplets, L2 distance of the normalised rows, AvgNonZeroReducer). labels int64
  // [B], ref_labels int64 [M]; self_mode drops (i, i) from the positives (y is then x itself: autograd adds the dx
  // and dy slots). Returns the loss = sums[0] / counts[0] (0 when counts[0] = 0), sums fp32 [1] = the sum of the
  // positive hinges d_ap - d_an + margin, counts int64 [1] = their exact number. Memory O((B + M) d + sum |P_a|).
  m.def(
      "triplet_fwd(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, float margin, bool self_mode) -> "
      "(Tensor loss, Tensor sums, Tensor counts)");
  // Recomputes the forward's tiles (so the same triplets are active) and returns dx, dy (input dtype).
  m.def(
      "triplet_bwd(Tensor grad_loss, Tensor x, Tensor y, Tensor labels, Tensor ref_labels, float margin, "
      "bool self_mode, Tensor counts) -> (Tensor dx, Tensor dy)");

  // ---- selection (docs/spec.md §1.2, 1.3) ----
  // Per row, the k largest S entries: values fp32 [B, k] sorted descending, indices int64 [B, k], ties -> lower
  // column index. exclude_diagonal: column i is not a candidate for row i (self mode passes x as y).
  // Memory O((B + M) d + B k). Not differentiable itself: flashdml/ops/selection.py registers the autograd
  // (the values' gradient reaches x and y through the selected pairs).
  m.def("knn_fwd(Tensor x, Tensor y, int k, bool exclude_diagonal, bool normalize) -> (Tensor values, Tensor indices)");
  // The k largest S entries over the negative pairs (labels[i] != ref_labels[j]; self_mode also drops (i, i)) of
  // the whole batch, sorted descending, ties -> lower flat index i*M + j (int64): values fp32 [k], rows and cols
  // int64 [k]. 1 <= k <= number of negatives. Memory O((B + M) d + k) plus fixed-size histograms.
  m.def(
      "hardest_negatives_fwd(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, int k, bool self_mode, "
      "bool normalize) -> (Tensor values, Tensor rows, Tensor cols)");
  // ---- contextual loss (docs/spec.md §2.5): schemas below this line ----
  // Self mode only (x is the batch, labels int64 [B], 2 <= k <= B, eps >= 0). Computes
  // loss = context_weight * L_ctx + reg_weight * L_reg + contrastive_weight * L_con in one streaming pass over
  // S = F F^T tiles (per-row top-k of -D, neighbour candidates, the margin-contrastive hinge sums and counts of
  // docs/spec.md §2.4) plus an O(B k^2) sparse stage. terms (fp32 [3]) = [L_ctx, L_reg, L_con] unweighted. The
  // neighbourhoods N(i) = {j : fl(-D_ij + eps) >= t_i} come back as CSR: nbr_ptr (int64 [B + 1]), nbr (int32 [nnz],
  // ascending columns per row) and nbr_flags (uint8 [nnz]: bit 0 = j in P(i), bit 1 = C_ij = 0, i.e. S_ij >= 1);
  // con_counts (int64 [2]) = the numbers of hard positive / negative pairs. A collapsed batch (|N(i)| = B) raises
  // ValueError. ste_slope is unused by the forward (an input so that autograd hands it to the backward).
  m.def(
      "contextual_fwd(Tensor x, Tensor labels, int k, float eps, float context_weight, float contrastive_weight, "
      "float reg_weight, float reg_target, float pos_margin, float neg_margin, float ste_slope, bool normalize) -> "
      "(Tensor loss, Tensor terms, Tensor nbr_ptr, Tensor nbr, Tensor nbr_flags, Tensor con_counts)");
  // docs/spec.md §2.5's closed-form straight-through gradient (sparse + row-constant + label-block parts, from the
  // neighbour lists) plus the L_reg and L_con gradients, applied in one recompute pass over the forward's S tiles
  // (so C and the hard pairs are the forward's): dx (input dtype).
  m.def(
      "contextual_bwd(Tensor grad_loss, Tensor x, Tensor labels, int k, float eps, float context_weight, "
      "float contrastive_weight, float reg_weight, float reg_target, float pos_margin, float neg_margin, "
      "float ste_slope, bool normalize, Tensor nbr_ptr, Tensor nbr, Tensor nbr_flags, Tensor con_counts) -> Tensor dx");
  // The contextual loss's sparse stage for device tensors (csrc/aten/contextual_stage.cpp, plain ATen registered for
  // every device; the CUDA op calls it directly, the Triton backend through these ops). Inputs: N(i) as the CSR
  // lists contextual_fwd returns (nbr_ptr int64 [B + 1], nbr int32 [nnz] ascending per row, nbr_flags uint8 [nnz])
  // and labels int64 [B], all on one device. A collapsed batch or an empty R(i) raises ValueError.
  // L_ctx (float64 0-dim).
  m.def("contextual_stage_loss(Tensor nbr_ptr, Tensor nbr, Tensor nbr_flags, Tensor labels) -> Tensor");
  // The L_ctx part of dL/dF for the rows F [B, d] without the factor 2*ste_slope*grad: (G + G^T) F with
  // G = C o (SP + u 1^T + LB) (o: elementwise; docs/spec.md §2.5's closed form), float64 [B, d].
  m.def(
      "contextual_stage_grad(Tensor nbr_ptr, Tensor nbr, Tensor nbr_flags, Tensor labels, Tensor rows) -> Tensor");
  // The same gradient in parts, for a kernel that recomputes the S tiles (and so C) itself:
  //  * sparse_grad (rows' dtype [B, d]) = (SP + SP^T) F, the clamped entries of SP removed;
  //  * row_const (float64 [B]) = u;  nbr_count (float64 [B]) = a_i = |N(i)|  (c_i = B - a_i);
  //  * slot_label (int64 [B, n_slots]), slot_coef (float64 [B, n_slots]): per row the labels kappa of the classes of
  //    R(i) and -(beta/2) rho_i(kappa) / c_i (unused slots: label -2, coefficient 0), so that
  //    LB_ij = (sum over the slots of row i with kappa == labels_j of slot_coef) * (c_i - a_j).
  m.def(
      "contextual_stage_grad_parts(Tensor nbr_ptr, Tensor nbr, Tensor nbr_flags, Tensor labels, Tensor rows) -> "
      "(Tensor sparse_grad, Tensor row_const, Tensor nbr_count, Tensor slot_label, Tensor slot_coef)");
  // ---- metrics (docs/spec.md §3): schemas below this line ----
  // One streaming pass over S = x y^T (x, y: rows used as given, normalise them first) for the query rows
  // `rows` (int64 indices into x, processed in that order). Returns
  //  * offsets [R + 1], indices [sum keep] int64, values [sum keep] fp32: row r's keep[r] best references,
  //    value descending, ties -> lower index, (i, i) excluded in self mode (keep[r] <= number of candidates);
  //  * pair_hist [2, 2^16] int64 (empty unless pair_hist or opis_bins > 0): positive / negative pair counts per
  //    fine bin (flashdml/histogram.h) of these rows: cross mode all pairs, self mode the pairs j > i;
  //  * class_pos / class_neg [T_rows, opis_bins] int64 (empty unless opis_bins > 0; self mode, rows sorted by
  //    class): per class of these rows (dense ids in label order, from the first row's class on) its positive
  //    pairs with j > i and its negative pairs (one end in the class) per coarse bin.
  m.def(
      "metrics_pass(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, Tensor rows, Tensor keep, bool self_mode, "
      "bool pair_hist, int opis_bins) -> (Tensor offsets, Tensor indices, Tensor values, Tensor pair_hist, "
      "Tensor class_pos, Tensor class_neg)");
  // ---- anchor-LSE losses (docs/spec.md §6.1-6.3): schemas below this line ----
  // SupCon (kind 0, temperature read, p0..p2 unused), Multi-Similarity (kind 1: p0 = alpha, p1 = beta, p2 = base;
  // temperature unused) and Circle (kind 2: p0 = m, p1 = gamma). Cosine always (the rows are normalised inside).
  // labels int64 [B], ref_labels int64 [M]; self_mode drops the pairs (i, i) (y is then x itself: autograd adds
  // the dx and dy slots). Returns the loss (fp32 0-dim, the reducer of each loss applied) and row_stats fp32 [B, 4]
  // per anchor: the positive-set and negative-set LSEs and the row's weights (flashdml/anchor_lse.h).
  m.def(
      "anchor_lse_fwd(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, Tensor temperature, int kind, float p0, "
      "float p1, float p2, bool self_mode) -> (Tensor loss, Tensor row_stats)");
  // Recomputes S tile by tile; returns dx, dy (input dtype) and d loss / d temperature (0-dim fp32; 0 unless SupCon).
  m.def(
      "anchor_lse_bwd(Tensor grad_loss, Tensor x, Tensor y, Tensor labels, Tensor ref_labels, Tensor temperature, "
      "int kind, float p0, float p1, float p2, bool self_mode, Tensor row_stats) -> "
      "(Tensor dx, Tensor dy, Tensor dtemperature)");
}

// Importing flashdml._C loads the schemas above and all kernel registrations; there is no Python API in the
// module itself (pytorch/extension-cpp pattern).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
