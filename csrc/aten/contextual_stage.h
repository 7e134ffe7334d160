// The sparse stage of the contextual loss (docs/spec.md §2.5 steps 4-8 and the closed-form backward) for device tensors: ATen
// ops on the neighbour lists, O(B·k²), nothing B x B. Compiled into every build (it has no CUDA code) and
// registered as the ops flashdml::contextual_stage_loss / _grad / _grad_parts (schemas and outputs: csrc/ops.cpp),
// so it runs on CPU and CUDA tensors. The CUDA op (csrc/cuda/contextual.cu) calls these functions directly, the
// Triton backend (triton_kernels/contextual.py) the registered ops. The CPU op has its own loop version of the same
// algorithm (csrc/cpu/contextual_sparse.h, contextual_backward.h); both take the flag bits, the W formula (ctx_h)
// and the error messages from flashdml/contextual.h.
//
// Every function takes N(i) as CSR: nbr_ptr int64 [B + 1], nbr int32 [nnz] (ascending columns per row), nbr_flags
// uint8 [nnz] (kCtxInP, kCtxClamped), and labels int64 [B] (any values: only equality counts), all on one device.
// A collapsed batch (|N(i)| = B) or an empty R(i) raises ValueError (c10::ValueError).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace flashdml {
namespace ctx_stage {

// L_ctx = (1/B²) Σ_{i≠j} (y_ij − js_ij)²: float64 0-dim on the lists' device.
at::Tensor loss(const at::Tensor& nbr_ptr, const at::Tensor& nbr, const at::Tensor& nbr_flags,
                const at::Tensor& labels);

// The L_ctx part of dL/dF for the rows F [B, d] (docs/spec.md's closed form without the 2·ste_slope·grad factor):
// (G + Gᵀ) F with G = C ⊙ (SP + u 1ᵀ + LB); float64 [B, d]. The row-constant and label-block parts go through
// per-class sums of F, the clamp mask C through corrections on the flagged entries.
at::Tensor grad(const at::Tensor& nbr_ptr, const at::Tensor& nbr, const at::Tensor& nbr_flags,
                const at::Tensor& labels, const at::Tensor& rows);

// The same gradient in the parts a tile kernel that recomputes S (and so C) consumes:
//  * sparse_grad (rows' dtype [B, d]) = (SP + SPᵀ) F, SP the sparse part with the clamped entries removed;
//  * row_const (float64 [B]) = u;  nbr_count (float64 [B]) = a_i = |N(i)| (c_i = B − a_i);
//  * slot_label (int64 [B, n_slots]) / slot_coef (float64 [B, n_slots]): per row the labels κ of the classes of R(i)
//    and −(β/2) ρ_i(κ) / c_i (unused slots: label −2, coefficient 0), so that
//    LB_ij = Σ_{slots q of row i with κ_q = labels_j} coef_q · (c_i − a_j).
// Then G F + Gᵀ F = sparse_grad + the tile sums of C ⊙ (u 1ᵀ + LB) (and their transposes).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grad_parts(const at::Tensor& nbr_ptr,
                                                                                 const at::Tensor& nbr,
                                                                                 const at::Tensor& nbr_flags,
                                                                                 const at::Tensor& labels,
                                                                                 const at::Tensor& rows);

}  // namespace ctx_stage
}  // namespace flashdml
