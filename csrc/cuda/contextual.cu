// CUDA backend of the contextual loss (docs/spec.md §2.5): flashdml::contextual_fwd / contextual_bwd for CUDA tensors (schemas
// and output meaning: csrc/ops.cpp). normalize = true: the rows are normalised on entry and dx is mapped back to the
// raw rows (normalize_rows.h); everything below works on the normalised rows F.
//
// Forward, nothing B x B stored:
//  1. t_i / h_i: the k-th / (k/2)-th largest −D_i = the −D of the k-th / (k/2)-th largest S_i (−D is monotone in S),
//     from the kNN op (knn_fwd_cuda, self included); L_con's hinge sums / counts from hinge_pair_fwd_cuda (strict,
//     diagonal kept); both called directly (ops_cuda.h). Both compute each tile with the same s_tile_rect call as the
//     list pass below, so all passes see bitwise the same fp32 S.
//  2. ctx_list_kernel (contextual_kernels.cuh): N(i) in a fixed-capacity list per row and column split with the
//     exact count, split lists concatenated in split order; rows over the capacity are gathered and rerun with a
//     capacity of their largest count (exact always).
//  3. The sparse stage (|N(i) ∩ N(j)|, W, R, Z, js, L_ctx) as ATen ops on the device, O(B·k²):
//     ctx_stage::loss (csrc/aten/contextual_stage.h, the device-generic stage the Triton backend uses too).
// Backward (docs/spec.md's closed form as in the CPU op: dL_ctx/dS = 2·ste_slope·C ⊙ (SP + u 1ᵀ + LB)): ctx_stage::grad
// applies the sparse part from the lists and the row-constant and label-block parts through per-class sums, with the
// mask C as corrections on the clamped entries the forward flagged, in float64 on the device; L_reg's constant is
// rank one; L_con's gradient is hinge_pair_bwd_cuda (its recompute pass).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../aten/contextual_stage.h"
#include "contextual_kernels.cuh"
#include "flashdml/op_checks.h"
#include "flashdml/poison.h"
#include "launch_utils.cuh"
#include "normalize_rows.h"
#include "ops_cuda.h"

namespace flashdml {
namespace cuda {
namespace {

using at::Tensor;
using ctxk::ctx_list_kernel;

// What the kernels need beyond the CPU op's checks (flashdml/op_checks.h): x on a CUDA device, d >= 1.
void check_cuda_limits(const char* op, const Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.size(1) > 0, op, ": x must be a CUDA [B, d] tensor with d >= 1");
}

// ------------------------------------------------------------------------------------------ the list pass
// Column splits (plan_splits): a small B still fills the GPU. Each (row, split) keeps up to cap columns and its
// exact count; outputs col / flag [na, nsplit, cap], cnt [na, nsplit].
template <typename T>
void launch_lists(const Tensor& xa, const Tensor& rows, const Tensor& x, const Tensor& thr, float eps, int64_t cap,
                  int64_t nsplit, int64_t tps, Tensor& col, Tensor& flag, Tensor& cnt, bool tf32,
                  cudaStream_t stream) {
  using DT = typename DeviceType<T>::type;
  const int64_t na = xa.size(0);
  const auto kernel = tf32 ? ctx_list_kernel<DT, kTf32Able<DT>> : ctx_list_kernel<DT, false>;
  kernel<<<dim3(unsigned((na + kBM - 1) / kBM), unsigned(nsplit)), kThreads, 0, stream>>>(
      dptr<T>(xa), na, rows.defined() ? rows.data_ptr<int64_t>() : nullptr, dptr<T>(x), x.size(0), x.size(1),
      thr.data_ptr<float>(), eps, cap, tps, col.data_ptr<int32_t>(), flag.data_ptr<uint8_t>(),
      cnt.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// N(i) as CSR, exact whatever the split: a row's split lists are concatenated in split order (ascending columns);
// rows with a split over the capacity are gathered and rerun with a capacity of their largest split count.
std::tuple<Tensor, Tensor, Tensor> neighbour_lists(const Tensor& x, const Tensor& thr, float eps, int64_t cap) {
  const int64_t B = x.size(0);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // fp32 S tiles in TF32 (flashdml/tf32.h): read like knn_fwd_cuda / hinge_pair_fwd_cuda read it in the same op
  // call, so the list pass sees the S values the thresholds were taken from
  const bool tf32 = fp32_matmul_tf32_opted_in();
  auto run = [&](const Tensor& xa, const Tensor& rows, int64_t cp) {
    const int64_t na = xa.size(0);
    const auto [nsplit, tps] = plan_splits((na + kBM - 1) / kBM, (B + kBN - 1) / kBN);
    Tensor col = at::empty({na, nsplit, cp}, x.options().dtype(at::kInt));
    Tensor flag = at::empty({na, nsplit, cp}, x.options().dtype(at::kByte));
    Tensor cnt = at::empty({na, nsplit}, x.options().dtype(at::kInt));
    FLASHDML_CUDA_DTYPE_DISPATCH(x.scalar_type(), "contextual_fwd", [&] {
      launch_lists<scalar_t>(xa, rows, x, thr, eps, cp, nsplit, tps, col, flag, cnt, tf32, stream);
    });
    return std::make_tuple(col, flag, cnt.to(at::kLong));
  };
  auto [col, flag, cnt] = run(x, Tensor(), cap);
  const int64_t ns = cnt.size(1);
  Tensor keep = at::arange(cap, cnt.options()).view({1, 1, cap}) < cnt.unsqueeze(2);
  const Tensor over = at::nonzero((cnt > cap).any(1)).reshape(-1);
  Tensor c_out, f_out;
  if (over.numel() > 0) {  // the exact overflow path: these rows again, gathered, with room for all neighbours
    const int64_t big = (cnt.index_select(0, over).max().item<int64_t>() + 15) / 16 * 16;
    auto [col2, flag2, cnt2] = run(vec_ready(x.index_select(0, over)), over, big);
    keep.index_fill_(0, over, false);
    const Tensor keep2 = at::arange(big, cnt.options()).view({1, 1, big}) < cnt2.unsqueeze(2);
    const Tensor r1 = at::arange(B, cnt.options()).view({B, 1, 1}).expand({B, ns, cap}).masked_select(keep);
    const Tensor r2 = over.view({-1, 1, 1}).expand({over.numel(), cnt2.size(1), big}).masked_select(keep2);
    const Tensor cc = at::cat({col.masked_select(keep), col2.masked_select(keep2)});
    const Tensor order = at::argsort(at::cat({r1, r2}) * B + cc.to(at::kLong));
    c_out = cc.index_select(0, order);
    f_out = at::cat({flag.masked_select(keep), flag2.masked_select(keep2)}).index_select(0, order);
  } else {
    c_out = col.masked_select(keep);
    f_out = flag.masked_select(keep);
  }
  Tensor ptr = at::zeros({B + 1}, cnt.options());
  ptr.narrow(0, 1, B).copy_(at::cumsum(cnt.sum(1), 0));
  return {ptr, c_out, f_out};
}

using FwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

FwdOut contextual_fwd_cuda(const Tensor& x_raw, const Tensor& labels_in, int64_t k, double eps, double context_weight,
                           double contrastive_weight, double reg_weight, double reg_target, double pos_margin,
                           double neg_margin, double ste_slope, bool normalize) {
  (void)ste_slope;
  check::contextual_fwd_inputs("contextual_fwd", x_raw, labels_in, k, eps);  // flashdml/op_checks.h
  check_cuda_limits("contextual_fwd", x_raw);
  const c10::cuda::CUDAGuard guard(x_raw.device());
  const int64_t B = x_raw.size(0);
  const Tensor x = vec_ready((normalize ? normalized_rows(x_raw).first : x_raw).contiguous());
  const Tensor labels = labels_in.contiguous();
  const Tensor top = std::get<0>(knn_fwd_cuda(x, x, k, false, false));  // S values, descending, self included
  auto neg_d = [](const Tensor& s) {  // ctx_neg_distance: fl(2 − 2s) (2s exact), clamped to −0
    const Tensor dr = 2.0f - 2.0f * s;
    return at::where(dr > 0, -dr, at::zeros({}, dr.options()));
  };
  const Tensor thr = at::stack({neg_d(top.select(1, k - 1)), neg_d(top.select(1, k / 2 - 1))}, 1).contiguous();
  auto [lcon, sums, counts] =
      hinge_pair_fwd_cuda(x, x, labels, labels, pos_margin, neg_margin, 1.0, 1.0, false, true, false);
  (void)sums;
  const int64_t cap = std::max<int64_t>(64, 4 * k + 15) / 16 * 16;
  auto [ptr, col, flag] = neighbour_lists(x, thr, float(eps), cap);
  const Tensor lc = ctx_stage::loss(ptr, col, flag, labels);
  const Tensor colsum = x.to(at::kDouble).sum(0);
  const Tensor lr = (colsum.square().sum() / (double(B) * double(B)) - reg_target).square();
  const Tensor lcd = lcon.to(at::kDouble);
  const auto fopts = x.options().dtype(at::kFloat);
  Tensor loss = new_output(at::IntArrayRef{}, fopts), terms = new_output({3}, fopts);
  loss.copy_(context_weight * lc + reg_weight * lr + contrastive_weight * lcd);
  terms.copy_(at::stack({lc, lr, lcd}));
  return {loss, terms, ptr, col, flag, counts};
}

Tensor contextual_bwd_cuda(const Tensor& grad_loss, const Tensor& x_raw, const Tensor& labels_in, int64_t k, double eps,
                           double context_weight, double contrastive_weight, double reg_weight, double reg_target,
                           double pos_margin, double neg_margin, double ste_slope, bool normalize, const Tensor& ptr,
                           const Tensor& col, const Tensor& flag, const Tensor& counts) {
  // flashdml/op_checks.h; the neighbour lists are O(B + nnz), copied to the host once (one sync).
  check::contextual_bwd_inputs("contextual_bwd", grad_loss, x_raw, labels_in, k, eps, ptr, col, flag, counts);
  check_cuda_limits("contextual_bwd", x_raw);
  const c10::cuda::CUDAGuard guard(x_raw.device());
  const int64_t B = x_raw.size(0);
  const Tensor x = (normalize ? normalized_rows(x_raw).first : x_raw).contiguous();
  const Tensor labels = labels_in.contiguous();
  const Tensor g = grad_loss.reshape({}).to(at::kDouble);
  const Tensor F = x.to(at::kDouble);
  const double B2 = double(B) * double(B);
  const Tensor colsum = F.sum(0, true);
  // L_reg: dL/dS_ij = g_reg everywhere, so G F + Gᵀ F = 2 g_reg Σ_j F_j on every row
  Tensor out = (2.0 * g * reg_weight * 2.0 * (colsum.square().sum() / B2 - reg_target) / B2) * colsum.expand_as(F);
  if (contrastive_weight != 0.0) {
    auto [dx, dy] = hinge_pair_bwd_cuda(grad_loss.reshape({}).to(at::kFloat), x, x, labels, labels, pos_margin,
                                        neg_margin, contrastive_weight, contrastive_weight, false, true, false,
                                        counts.to(at::kLong));
    out = out + dx.to(at::kDouble) + dy.to(at::kDouble);
  }
  if (context_weight * ste_slope != 0.0)
    out = out + (g * context_weight * 2.0 * ste_slope) * ctx_stage::grad(ptr, col, flag, labels, F);
  Tensor dx = new_output(x_raw.sizes(), x_raw.options());
  dx.copy_(normalize ? normalized_rows_backward(out, x_raw) : out);
  return dx;
}

}  // namespace
}  // namespace cuda
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CUDA, m) {
  m.impl("contextual_fwd", &flashdml::cuda::contextual_fwd_cuda);
  m.impl("contextual_bwd", &flashdml::cuda::contextual_bwd_cuda);
}
