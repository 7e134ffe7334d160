// The CUDA implementations that other CUDA ops call directly (the contextual op, csrc/cuda/contextual.cu: the kNN
// thresholds and the L_con hinge terms), with the signatures of their schemas (csrc/ops.cpp). Defined with external
// linkage in selection.cu and hinge_pair.cu, which also register them as the CUDA kernels of those ops.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace flashdml {
namespace cuda {

// flashdml::knn_fwd on CUDA tensors -> (values, indices).
std::tuple<at::Tensor, at::Tensor> knn_fwd_cuda(const at::Tensor& x, const at::Tensor& y, int64_t k,
                                                bool exclude_diagonal, bool normalize);

// flashdml::hinge_pair_fwd on CUDA tensors -> (loss, sums, counts).
std::tuple<at::Tensor, at::Tensor, at::Tensor> hinge_pair_fwd_cuda(const at::Tensor& x, const at::Tensor& y,
                                                                   const at::Tensor& labels,
                                                                   const at::Tensor& ref_labels, double pos_margin,
                                                                   double neg_margin, double pos_weight,
                                                                   double neg_weight, bool drop_diagonal, bool strict,
                                                                   bool normalize);

// flashdml::hinge_pair_bwd on CUDA tensors -> (dx, dy).
std::tuple<at::Tensor, at::Tensor> hinge_pair_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& x,
                                                       const at::Tensor& y, const at::Tensor& labels,
                                                       const at::Tensor& ref_labels, double pos_margin,
                                                       double neg_margin, double pos_weight, double neg_weight,
                                                       bool drop_diagonal, bool strict, bool normalize,
                                                       const at::Tensor& counts);

}  // namespace cuda
}  // namespace flashdml
