// CUDA backend of the hinge-pair losses: Threshold-Consistent Margin (docs/spec.md §2.3) and margin contrastive
// (docs/spec.md §2.4): flashdml::hinge_pair_fwd / hinge_pair_bwd (schemas and output meaning: csrc/ops.cpp).
//
// Nothing B x M is stored: S = x y^T is recomputed in 64 x 64 tiles (tile_gemm.cuh, pair_tiles.cuh) and reduced
// on the spot. Per-element rules: flashdml/hinge_pair.h. Deterministic: no atomics, fixed-order reductions,
// exact int64 counts. grad_loss and the counts are read on the device.
//
// Forward:  hp_stats_kernel -> per-block hinge sums (double) and counts (int64);  hp_final_kernel -> loss,
//           sums [2], counts [2].
// Backward: hp_bwd_prep_kernel -> the two G-tile weights and the output scale;  pair_grad_kernel (x, y) +
//           pair_reduce_kernel -> dx;  pair_grad_kernel on the transposed tiles + reduce -> dy.
// The membership tests of the backward see bitwise the fp32 values the forward counted: every pass computes
// the tile of x rows I and y rows J with the same call (s_tile_rect(x, y, I, J)); the dy pass reads that tile
// transposed (kExact) instead of multiplying y by x. normalize = true: the rows are normalised on entry (once in
// self mode) and dx, dy mapped back to the raw rows (normalize_rows.h). The two ops have external linkage
// (ops_cuda.h): the contextual op calls them directly.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <tuple>

#include "flashdml/op_checks.h"
#include "flashdml/poison.h"
#include "launch_utils.cuh"
#include "hinge_pair_kernels.cuh"
#include "normalize_rows.h"
#include "ops_cuda.h"
#include "pair_tiles.cuh"

namespace flashdml {
namespace cuda {
namespace {

using namespace hp;
using pair::pair_grad_kernel_for;
using pair::pair_reduce_kernel;

// out = w[2] * G Oth over the rows of Out; kOutY: the dy pass on the forward's (x, y) tiles, read transposed.
template <typename T, bool kOutY>
void run_grad(const at::Tensor& x, const at::Tensor& y, const HingeOp& op, const float* w, at::Tensor& out, bool tf32,
              cudaStream_t stream) {
  using DT = typename DeviceType<T>::type;
  const int64_t nx = x.size(0), ny = y.size(0), d = x.size(1), d_out = out.size(1);
  const int64_t nout = kOutY ? ny : nx, noth = kOutY ? nx : ny;
  const int64_t nrb = (nout + kBM - 1) / kBM, ntiles = (noth + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);  // no chunk axis: the d chunks loop inside each block
  at::Tensor part = at::empty({nsplit * nout * d}, x.options().dtype(at::kFloat));
  // one chunk of d: the accumulator stays in registers; more: running sums per chunk in part (pair_tiles.cuh)
  const auto kernel = pair_grad_kernel_for<DT, HingeOp, kOutY, kOutY>(d, tf32);
  kernel<<<dim3(unsigned(nrb), 1u, unsigned(nsplit)), kThreads, 0,
                                                stream>>>(dptr<T>(x), dptr<T>(y), nx, ny, d, op, tps,
                                                          part.data_ptr<float>(), nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = nout * d_out;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + 255) / 256, 8 * int64_t(sm_count())));
  pair_reduce_kernel<DT><<<unsigned(blocks), 256, 0, stream>>>(part.data_ptr<float>(), int(nsplit), nout, d, d_out,
                                                               w + 2, reinterpret_cast<DT*>(out.data_ptr<T>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> hinge_pair_fwd_cuda(const at::Tensor& x_raw, const at::Tensor& y_raw,
                                                                   const at::Tensor& labels_in,
                                                                   const at::Tensor& ref_labels_in, double pos_margin,
                                                                   double neg_margin, double pos_weight,
                                                                   double neg_weight, bool drop_diagonal, bool strict,
                                                                   bool normalize) {
  // The CPU op's checks (flashdml/op_checks.h), then this kernel's limits (non-empty, grid size).
  check::hinge_pair_fwd_inputs("hinge_pair_fwd", x_raw, y_raw, labels_in, ref_labels_in, drop_diagonal);
  check_row_tensors("hinge_pair_fwd", x_raw, y_raw, kBM);
  const c10::cuda::CUDAGuard guard(x_raw.device());
  at::Tensor x_in, y_in;
  std::tie(x_in, y_in) = kernel_rows(x_raw, y_raw, normalize);
  const at::Tensor x = vec_ready(x_in.contiguous());
  const at::Tensor y = y_in.is_same(x_in) ? x : vec_ready(y_in.contiguous());
  const at::Tensor labels = labels_in.contiguous(), ref_labels = ref_labels_in.contiguous();
  const int64_t B = x.size(0), M = y.size(0), d = x.size(1);
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor loss = new_output(at::IntArrayRef{}, fopts);
  at::Tensor sums = new_output({2}, fopts);
  at::Tensor counts = new_output({2}, x.options().dtype(at::kLong));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int64_t nrb = (B + kBM - 1) / kBM, ntiles = (M + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  const int64_t nblk = nrb * nsplit;
  at::Tensor part_sum = at::empty({2 * nblk}, x.options().dtype(at::kDouble));
  at::Tensor part_cnt = at::empty({2 * nblk}, x.options().dtype(at::kLong));
  const bool tf32 = fp32_matmul_tf32_opted_in();  // fp32 S tiles in TF32 (flashdml/tf32.h)
  FLASHDML_CUDA_DTYPE_DISPATCH(x.scalar_type(), "hinge_pair", [&] {
    using DT = typename DeviceType<scalar_t>::type;
    const auto kernel = tf32 ? hp_stats_kernel<DT, kTf32Able<DT>> : hp_stats_kernel<DT, false>;
    kernel<<<dim3(unsigned(nrb), unsigned(nsplit)), kThreads, 0, stream>>>(
        dptr<scalar_t>(x), dptr<scalar_t>(y), labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), B, M, d,
        tps, static_cast<float>(pos_margin), static_cast<float>(neg_margin), strict, drop_diagonal,
        part_sum.data_ptr<double>(), part_cnt.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  hp_final_kernel<<<1, kOneBlock, 0, stream>>>(part_sum.data_ptr<double>(), part_cnt.data_ptr<int64_t>(), nblk,
                                               pos_weight, neg_weight, loss.data_ptr<float>(), sums.data_ptr<float>(),
                                               counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, sums, counts};
}

std::tuple<at::Tensor, at::Tensor> hinge_pair_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& x_raw,
                                                       const at::Tensor& y_raw, const at::Tensor& labels_in,
                                                       const at::Tensor& ref_labels_in, double pos_margin,
                                                       double neg_margin, double pos_weight, double neg_weight,
                                                       bool drop_diagonal, bool strict, bool normalize,
                                                       const at::Tensor& counts_in) {
  check::hinge_pair_bwd_inputs("hinge_pair_bwd", grad_loss, x_raw, y_raw, labels_in, ref_labels_in, drop_diagonal,
                               counts_in);  // flashdml/op_checks.h
  check_row_tensors("hinge_pair_bwd", x_raw, y_raw, kBM);
  const c10::cuda::CUDAGuard guard(x_raw.device());
  at::Tensor x_in, y_in;
  std::tie(x_in, y_in) = kernel_rows(x_raw, y_raw, normalize);
  const at::Tensor x = vec_ready(x_in.contiguous());
  const at::Tensor y = y_in.is_same(x_in) ? x : vec_ready(y_in.contiguous());
  const at::Tensor labels = labels_in.contiguous(), ref_labels = ref_labels_in.contiguous();
  const at::Tensor grad = grad_loss.to(at::kFloat).contiguous();
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  at::Tensor dx = new_output(x_in.sizes(), x.options());
  at::Tensor dy = new_output(y_in.sizes(), y.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor w = at::empty({3}, x.options().dtype(at::kFloat));
  hp_bwd_prep_kernel<<<1, 32, 0, stream>>>(counts.data_ptr<int64_t>(), grad.data_ptr<float>(), pos_weight, neg_weight,
                                           w.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  HingeOp op{};
  op.lab_x = labels.data_ptr<int64_t>();
  op.lab_y = ref_labels.data_ptr<int64_t>();
  op.w = w.data_ptr<float>();
  op.mp = static_cast<float>(pos_margin);
  op.mn = static_cast<float>(neg_margin);
  op.strict = strict;
  op.drop_diagonal = drop_diagonal;
  // the S tiles the backward recomputes (flashdml/tf32.h); the margin tests see the forward's values only if the
  // setting did not change in between
  const bool tf32 = fp32_matmul_tf32_opted_in();
  FLASHDML_CUDA_DTYPE_DISPATCH(x.scalar_type(), "hinge_pair", [&] {
    run_grad<scalar_t, false>(x, y, op, w.data_ptr<float>(), dx, tf32, stream);
    run_grad<scalar_t, true>(x, y, op, w.data_ptr<float>(), dy, tf32, stream);
  });
  return {raw_rows_grad(dx, x_raw, normalize), raw_rows_grad(dy, y_raw, normalize)};
}

}  // namespace cuda
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CUDA, m) {
  m.impl("hinge_pair_fwd", &flashdml::cuda::hinge_pair_fwd_cuda);
  m.impl("hinge_pair_bwd", &flashdml::cuda::hinge_pair_bwd_cuda);
}
