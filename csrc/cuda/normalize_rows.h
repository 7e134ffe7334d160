// The CUDA ops' normalize = true (csrc/ops.cpp conventions): the op L2-normalises its rows on entry and maps the
// kernels' gradients back to the raw rows, as ATen ops on the device (O(B·d), one normalised copy of the rows).
// Mirrors flashdml._math.normalized_rows / normalized_rows_backward (the Triton ops' in-op normalisation: rows divided
// by a power of two at least their largest |entry| before the norm), so every GPU backend normalises with the same arithmetic.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <utility>

namespace flashdml {
namespace cuda {

constexpr double kNormEps = 1e-12;  // x / max(|x|, 1e-12) (docs/spec.md §0)

// Per row the power of two just above its largest |entry| (1 for an all-zero row), [B, 1]: rows are divided by it
// before their norm is taken, so the squares cannot overflow (a row of norm 2e19 would square to inf in fp32); a
// power of two makes the division exact, so the result is bit for bit x / |x| wherever that does not overflow.
inline at::Tensor row_scale(const at::Tensor& xf) {
  const at::Tensor amax = xf.abs().amax(1, /*keepdim=*/true);
  return at::ldexp(at::ones_like(amax), std::get<1>(at::frexp(amax)));
}

// |x| per row, [B, 1], finite whenever the norm itself is.
inline at::Tensor row_norms(const at::Tensor& xf, const at::Tensor& s) {
  return at::linalg_vector_norm(xf / s, 2, at::IntArrayRef{1}, /*keepdim=*/true) * s;
}

// x / max(|x|, 1e-12) computed as (x/s) / max(|x/s|, 1e-12/s): the same function, without overflow.
inline at::Tensor unit_rows(const at::Tensor& xf, const at::Tensor& s) {
  const at::Tensor xs = xf / s;
  return xs / at::maximum(at::linalg_vector_norm(xs, 2, at::IntArrayRef{1}, /*keepdim=*/true),
                          s.reciprocal() * kNormEps);
}

// (x^, |x|): norms [B, 1] in fp32, x^ = x / max(|x|, 1e-12) computed in fp32 and cast back to x's dtype (the
// kernels' tensor-core GEMMs read fp16 / bf16 rows). Not differentiable: the backward ops map their gradients back
// with normalized_rows_backward.
inline std::pair<at::Tensor, at::Tensor> normalized_rows(const at::Tensor& x) {
  const at::Tensor xf = x.to(at::kFloat), s = row_scale(xf);
  return {unit_rows(xf, s).to(x.scalar_type()).contiguous(), row_norms(xf, s)};
}

// The gradient with respect to the raw rows x of a function of x^ = x / max(|x|, eps) whose gradient with respect
// to x^ is g: (g - x^ (x^ . g)) / |x| where |x| >= eps, g / eps below (the clamp passes no gradient to the norm),
// the same as autograd through the normalisation. Computed in fp32, returned in x's dtype.
inline at::Tensor normalized_rows_backward(const at::Tensor& g, const at::Tensor& x) {
  const at::Tensor xf = x.to(at::kFloat), gf = g.to(at::kFloat), s = row_scale(xf);
  const at::Tensor n = row_norms(xf, s);
  const at::Tensor xh = unit_rows(xf, s);
  const at::Tensor active = (n >= kNormEps).to(at::kFloat);
  return ((gf - active * xh * (xh * gf).sum(1, /*keepdim=*/true)) / n.clamp_min(kNormEps)).to(x.scalar_type());
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
