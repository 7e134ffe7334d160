// The one place that lists every compiled op (TORCH_LIBRARY schemas). Per-device kernels register their
// implementations with TORCH_LIBRARY_IMPL in cpu/*.cpp and cuda/*.cu; fake (meta) kernels and autograd are
// registered from Python (flashdml/ops/*.py) with torch.library.register_fake / register_autograd.
//
// Conventions shared by all ops (see SPEC.md section 0):
// * x, y: fp32, fp16 or bf16 rows; all accumulation is fp32. Losses and statistics are fp32; gradients come
//   back in the input dtype. With normalize=true the kernel L2-normalises the rows itself (x / max(|x|, 1e-12))
//   and returns gradients with respect to the raw rows, so no normalised copy is kept between the passes.
//   (The CUDA kernels take normalize=false only: Python normalises for them; see flashdml/ops/.)
// * temperature is a 0-dim fp32 tensor on the same device (read on device, so no host sync on CUDA).
// * labels are int64 or None (None: no label masking).
#include <Python.h>
#include <torch/library.h>

#include "flashdml/poison.h"

namespace {

void set_poison(bool enabled) { flashdml::poison_flag().store(enabled); }

bool get_poison() { return flashdml::poison_flag().load(); }

}  // namespace

TORCH_LIBRARY(flashdml, m) {
  // Test support: fill every op output with NaN / a sentinel before the kernel writes it.
  m.def("_set_poison(bool enabled) -> ()", &set_poison);
  m.def("_get_poison() -> bool", &get_poison);

  // SPEC 2.1. Row i's positive is column i; columns j != i with labels[j] == labels[i] are dropped.
  // Returns the loss, the per-row LSE of z = S / temperature over row i's allowed set, and (symmetric) the
  // per-column LSE; col_lse is empty when symmetric is false.
  m.def(
      "batch_softmax_fwd(Tensor x, Tensor y, Tensor? labels, Tensor temperature, bool symmetric, bool normalize) -> "
      "(Tensor loss, Tensor row_lse, Tensor col_lse)");
  // Recomputes S tile by tile; returns dx, dy (input dtype) and d loss / d temperature (0-dim fp32).
  m.def(
      "batch_softmax_bwd(Tensor grad_loss, Tensor x, Tensor y, Tensor? labels, Tensor temperature, "
      "bool symmetric, bool normalize, Tensor row_lse, Tensor col_lse) -> (Tensor dx, Tensor dy, Tensor dtemperature)");

  // Cross-example softmax (SPEC 2.2, global_partition = true: one LSE over all negative pairs of the batch) and
  // NT-Xent (SPEC 2.1b, global_partition = false: one LSE per row over that row's negatives). labels and
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

  // ---- hinge-pair losses (TCM SPEC 2.3, margin contrastive SPEC 2.4): schemas below this line ----
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

  // ---- metrics (SPEC 3): schemas below this line ----
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
}

// Importing flashdml._C loads the schemas above and all kernel registrations; there is no Python API in the
// module itself (pytorch/extension-cpp pattern).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
