// The CUDA ops' normalize = true (csrc/ops.cpp conventions): the op L2-normalises its rows on entry and maps the
// kernels' gradients back to the raw rows, as ATen ops on the device (O(B·d), one normalised copy of the rows).
// Mirrors flashdml._math.normalized_rows / normalized_rows_backward (the Triton ops' in-op normalisation), so every
// GPU backend normalises with the same arithmetic.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace flashdml {
namespace cuda {

constexpr double kNormEps = 1e-12;  // x / max(|x|, 1e-12) (SPEC section 0)

// (x^, |x|): norms [B, 1] in fp32, x^ = x / max(|x|, 1e-12) computed in fp32 and cast back to x's dtype (the
// kernels' tensor-core GEMMs read fp16 / bf16 rows). Not differentiable: the backward ops map their gradients back
// with normalized_rows_backward.
inline std::pair<at::Tensor, at::Tensor> normalized_rows(const at::Tensor& x) {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor n = at::linalg_vector_norm(xf, 2, at::IntArrayRef{1}, /*keepdim=*/true);
  return {(xf / n.clamp_min(kNormEps)).to(x.scalar_type()).contiguous(), n};
}

// The gradient with respect to the raw rows x of a function of x^ = x / max(|x|, eps) whose gradient with respect
// to x^ is g: (g - x^ (x^ . g)) / |x| where |x| >= eps, g / eps below (the clamp passes no gradient to the norm),
// the same as autograd through the normalisation. Computed in fp32, returned in x's dtype.
inline at::Tensor normalized_rows_backward(const at::Tensor& g, const at::Tensor& x) {
  const at::Tensor xf = x.to(at::kFloat), gf = g.to(at::kFloat);
  const at::Tensor n = at::linalg_vector_norm(xf, 2, at::IntArrayRef{1}, /*keepdim=*/true);
  const at::Tensor nc = n.clamp_min(kNormEps);
  const at::Tensor xh = xf / nc;
  const at::Tensor active = (n >= kNormEps).to(at::kFloat);
  return ((gf - active * xh * (xh * gf).sum(1, /*keepdim=*/true)) / nc).to(x.scalar_type());
}

// The rows an op's kernels read: (x, y) as given (normalize = false) or normalised; in self mode (y is x) one
// normalised tensor fills both slots, so the kernels still see y.is_same(x).
inline std::pair<at::Tensor, at::Tensor> kernel_rows(const at::Tensor& x, const at::Tensor& y, bool normalize) {
  if (!normalize) return {x, y};
  at::Tensor xh = normalized_rows(x).first;
  at::Tensor yh = y.is_same(x) ? xh : normalized_rows(y).first;
  return {xh, yh};
}

// A gradient of the kernels (with respect to the rows they read) as the op returns it: with respect to the raw rows.
inline at::Tensor raw_rows_grad(const at::Tensor& g, const at::Tensor& x, bool normalize) {
  return normalize ? normalized_rows_backward(g, x) : g;
}

}  // namespace cuda
}  // namespace flashdml
