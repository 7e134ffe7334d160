// Per-element pieces of the contextual loss (docs/spec.md §2.5), shared by the CPU kernels (csrc/cpu/contextual*.h), the CUDA
// list kernel (csrc/cuda/contextual_kernels.cuh) and the device-generic ATen sparse stage
// (csrc/aten/contextual_stage.cpp, used by the CUDA and Triton backends): the neighbour-list flag bits, the fp32
// neighbourhood test, the W formula and the sparse stage's error messages.
//
// Neighbourhood test, exactly docs/spec.md's fp32 arithmetic (the same operations the fp32 reference runs):
//   Dr = fl(2 - 2 s)        (2 s is exact, so this is one rounding whether or not the compiler fuses it)
//   C  = [Dr > 0]           (the clamp passes gradient; C = 0 <=> s >= 1: the diagonal and exact duplicates)
//   -D = C ? -Dr : -0       (the value the per-row top-k ranks; t_i = k-th, h_i = (k/2)-th largest, query included)
//   u  = fl(-D + eps)       (eps rounded to fp32 once)
//   N_ij = [u >= t_i],  P_ij = [u >= h_i]   (inclusive: ties and the whole eps band count)
// Because -D <= 0 and eps >= 0, a clamped entry (-D = 0) always passes both tests: C = 0 entries are a subset of
// the neighbour lists and are stored as a flag on them.
#pragma once

#include <cstdint>
#include <string>

#include "flashdml/common.h"

namespace flashdml {

// Flags stored with each neighbour j of row i (one byte per entry of the N(i) list; the other bits are 0).
constexpr uint8_t kCtxInP = 1;      // j is in P(i) (the half neighbourhood)
constexpr uint8_t kCtxClamped = 2;  // C_ij = 0: 2 - 2 S_ij <= 0, no gradient through the distance clamp

FLASHDML_HD float ctx_neg_distance(float s) {
  const float dr = 2.f - 2.f * s;
  return dr > 0.f ? -dr : -0.f;
}

// fl(-D + eps): a single fp32 addition (no contraction possible: there is no product).
FLASHDML_HD float ctx_band_value(float neg_d, float eps) { return neg_d + eps; }

// C_ij = 0 <=> -D_ij == 0 (Dr > 0 gives -D < 0; Dr <= 0 or NaN-free clamp gives -0).
FLASHDML_HD bool ctx_clamped(float neg_d) { return neg_d == 0.f; }

// H_ij = ½(I_ij + J_ij) = ½(n/a_i + (B − a_i − a_j + n)/(B − a_i)), with n = |N(i) ∩ N(j)|; W_ij = H_ij on N(i).
// T is double in the CPU stage and a float64 at::Tensor of entries in the ATen stage (the same expression).
template <typename T>
FLASHDML_HD T ctx_h(const T& n, const T& a_i, const T& a_j, double B) {
  return 0.5 * (n / a_i + (B - a_i - a_j + n) / (B - a_i));
}

// The sparse stage's errors (ValueError in Python), raised by the CPU and the ATen stage with these texts.
// |N(i)| = B makes J 0/0 (docs/spec.md §2.5 step 4).
inline std::string ctx_collapsed_batch_message(int64_t i, int64_t B) {
  return "contextual_loss: collapsed batch — every sample is in the k-neighbourhood of row " + std::to_string(i) +
         " (|N(i)| = B = " + std::to_string(B) +
         "), so the complement intersection J is 0/0. The embeddings are (nearly) identical within eps; use a "
         "smaller eps or k, or a batch with more spread.";
}

inline std::string ctx_empty_reciprocal_message(int64_t i) {
  return "contextual_loss: row " + std::to_string(i) +
         " has an empty reciprocal half-neighbourhood R(i) (|R(i)| = 0)";
}

}  // namespace flashdml
