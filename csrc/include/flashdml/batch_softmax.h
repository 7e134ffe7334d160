// Per-element logic of the batch softmax / InfoNCE loss (docs/spec.md §2.1), shared by the CPU (.cpp) and CUDA (.cu)
// kernels so that the CPU build exercises exactly the formulas the GPU kernels use.
//
// Notation: z_ij = (x_i . y_j) / tau, B == M rows, a = 1/2 if symmetric else 1.
//   allowed(i, j)  = i == j or labels[i] != labels[j] (no labels: always). Symmetric in (i, j), so the same
//                    test serves row i's set A_i and column j's set.
//   row_lse_i      = log sum_{j allowed} exp(z_ij);  col_lse_j = log sum_{i allowed} exp(z_ij)
//   loss           = (a / B) * (sum_i (row_lse_i - z_ii) + [symmetric] sum_j (col_lse_j - z_jj))
//   dL/dz_ij       = (a / B) * g_ij, with the *unscaled* weight
//   g_ij           = (exp(z_ij - row_lse_i) [allowed] - [i == j])
//                  + [symmetric] (exp(z_ij - col_lse_j) [allowed] - [i == j])        (|g_ij| <= 2)
//   dx = (grad * a / (B tau)) * g y;  dy = (grad * a / (B tau)) * g^T x;
//   dtemperature = -(grad * a / (B tau)) * sum_ij g_ij z_ij.
// Kernels keep g_ij unscaled (it fits fp16/bf16 without underflow trouble) and apply the scalar factor once.
#pragma once

#include <cmath>
#include <cstdint>

#include "flashdml/common.h"

namespace flashdml {

// Pair (i, j) takes part in row i's softmax (and in column j's, symmetric loss): the positive (i == j) or a
// negative (labels differ). Same-label off-diagonal pairs (false negatives) are dropped.
// Label is int64 (CUDA) or a dense int32 class id (CPU, which vectorises next to fp32 lanes).
template <typename Label>
FLASHDML_HD bool batch_softmax_allowed(bool same_index, bool has_labels, Label label_i, Label label_j) {
  return same_index || !has_labels || label_i != label_j;
}

// One direction's share of the unscaled gradient weight: softmax probability over the allowed set minus
// the one-hot target on the positive.
FLASHDML_HD float batch_softmax_dz_term(float z, float lse, bool allowed, bool same_index) {
  return (allowed ? expf(z - lse) : 0.f) - (same_index ? 1.f : 0.f);
}

// The full unscaled weight g_ij (see above); use_col is the `symmetric` flag.
FLASHDML_HD float batch_softmax_dz_unscaled(float z, bool allowed, bool same_index, float row_lse, bool use_col,
                                            float col_lse) {
  float g = batch_softmax_dz_term(z, row_lse, allowed, same_index);
  if (use_col) g += batch_softmax_dz_term(z, col_lse, allowed, same_index);
  return g;
}

// a / B: dL/dz_ij = batch_softmax_scale(B, symmetric) * g_ij, and loss = batch_softmax_scale * sum of terms.
FLASHDML_HD float batch_softmax_scale(int64_t batch, bool symmetric) {
  return static_cast<float>((symmetric ? 0.5 : 1.0) / static_cast<double>(batch));
}

}  // namespace flashdml
