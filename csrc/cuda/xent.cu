// CUDA backend of cross-example softmax (docs/spec.md §2.2, global_partition = true) and NT-Xent (docs/spec.md §2.1b,
// global_partition = false): flashdml::xent_fwd / xent_bwd (schemas and output meaning: csrc/ops.cpp).
//
// Nothing B x M is stored: every kernel recomputes 64 x 64 tiles of S = x y^T (tile_gemm.cuh: wmma for fp16 / bf16,
// exact-fp32 FFMA for fp32 or wmma TF32 after the TF32 opt-in; pair_tiles.cuh: rectangular tiles) and reduces them on
// the spot. Per-element formulas: flashdml/xent.h. Deterministic: no atomics, every partial is reduced in a fixed
// order; column work is split across blocks ("splits") for occupancy at small B. temperature / grad_loss are read on
// the device.
// normalize = true: the rows are normalised on entry (once in self mode) and dx, dy mapped back to the raw rows
// (normalize_rows.h).
//
// Forward:  xe_count_kernel (|P| per row block: binary searches in the sorted ref_labels, exact int64)
//           xe_lse_kernel   -> per-split (max, sum) of the negatives' z per row;  xe_row_lse_kernel -> row states
//                              (NT-Xent: lse[i]);  xe_scalars_kernel -> |P| and (XE) the global lse[0]
//           xe_pos_kernel   -> per-split softplus / sigmoid sums of the positives (tiles without a positive are
//                              skipped before their GEMM);  xe_rows_kernel (NT-Xent: coef[i]);  xe_final_kernel
//                              -> loss (and XE coef[0]).
// Backward: xe_count_kernel + xe_bwd_prep_kernel -> the scalars of xent_grad_scalars (|P|, cmax = max coef);
//           pair_grad_kernel (x, y) -> dx partials (+ sum g z);  pair_reduce_kernel -> dx;
//           dy: pair_grad_kernel on (y, x) + reduce, or, for XE in self mode (G is symmetric and y = x), dy = dx;
//           xe_dtau_kernel -> dtemperature.
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
#include "flashdml/xent.h"
#include "pair_tiles.cuh"
#include "normalize_rows.h"
#include "xent_kernels.cuh"

namespace flashdml {
namespace cuda {
namespace {

using namespace xe;
using pair::pair_grad_kernel_for;
using pair::pair_reduce_kernel;

// |P| partials: one int64 per block of 256 rows of x (cnt_part, ncnt entries).
void run_count(const at::Tensor& labels, const at::Tensor& ref_labels, bool self_mode, int64_t* cnt_part, int64_t ncnt,
               cudaStream_t stream) {
  const at::Tensor sorted = std::get<0>(ref_labels.sort());
  xe_count_kernel<<<unsigned(ncnt), kRowThreads, 0, stream>>>(labels.data_ptr<int64_t>(), labels.size(0),
                                                              sorted.data_ptr<int64_t>(), sorted.size(0), self_mode,
                                                              cnt_part);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out = w[2] * G Oth over the rows of Out (kOutY: Out = y, the dy pass); gz_part (dx pass) gets the sums of g s.
// x, y: vec_ready (padded length d); out: [rows, out.size(1)] with out.size(1) <= d.
template <typename T, bool kOutY>
void run_grad(const at::Tensor& x, const at::Tensor& y, const XentOp& op, const float* w, at::Tensor& out,
              at::Tensor* gz_part, bool tf32, cudaStream_t stream) {
  using DT = typename DeviceType<T>::type;
  const int64_t nx = x.size(0), ny = y.size(0), d = x.size(1), d_out = out.size(1);
  const int64_t nout = kOutY ? ny : nx, noth = kOutY ? nx : ny;
  const int64_t nrb = (nout + kBM - 1) / kBM, ntiles = (noth + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);  // no chunk axis: the d chunks loop inside each block
  at::Tensor part = at::empty({nsplit * nout * d}, x.options().dtype(at::kFloat));
  float* gzp = nullptr;
  if (gz_part != nullptr) {
    *gz_part = at::empty({nsplit * nrb}, x.options().dtype(at::kFloat));
    gzp = gz_part->data_ptr<float>();
  }
  // one chunk of d: the accumulator stays in registers; more: running sums per chunk in part (pair_tiles.cuh)
  const auto kernel = pair_grad_kernel_for<DT, XentOp, kOutY, false>(d, tf32);
  kernel<<<dim3(unsigned(nrb), 1u, unsigned(nsplit)), kThreads, 0,
                                               stream>>>(dptr<T>(x), dptr<T>(y), nx, ny, d, op, tps,
                                                         part.data_ptr<float>(), gzp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = nout * d_out;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + 255) / 256, 8 * int64_t(sm_count())));
  pair_reduce_kernel<DT><<<unsigned(blocks), 256, 0, stream>>>(part.data_ptr<float>(), int(nsplit), nout, d, d_out,
                                                               w + 2, reinterpret_cast<DT*>(out.data_ptr<T>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> xent_fwd_cuda(const at::Tensor& x_raw, const at::Tensor& y_raw,
                                                             const at::Tensor& labels_in,
                                                             const at::Tensor& ref_labels_in,
                                                             const at::Tensor& temperature, bool global_partition,
                                                             bool self_mode, bool normalize) {
  // The CPU op's checks (flashdml/op_checks.h), then this kernel's limits (non-empty, grid size).
  check::xent_fwd_inputs("xent_fwd", x_raw, y_raw, labels_in, ref_labels_in, temperature, self_mode);
  check_row_tensors("xent_fwd", x_raw, y_raw, kBM);
  const c10::cuda::CUDAGuard guard(x_raw.device());
  at::Tensor x_in, y_in;
  std::tie(x_in, y_in) = kernel_rows(x_raw, y_raw, normalize);
  const at::Tensor x = vec_ready(x_in.contiguous());
  const at::Tensor y = y_in.is_same(x_in) ? x : vec_ready(y_in.contiguous());
  const at::Tensor labels = labels_in.contiguous(), ref_labels = ref_labels_in.contiguous();
  const at::Tensor tau = temperature.to(at::kFloat).contiguous();
  const int64_t B = x.size(0), M = y.size(0), d = x.size(1);
  const auto fopts = x.options().dtype(at::kFloat);
  const int64_t nstat = global_partition ? 1 : B;
  at::Tensor loss = new_output(at::IntArrayRef{}, fopts);
  at::Tensor lse = new_output({nstat}, fopts);
  at::Tensor coef = new_output({nstat}, fopts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int64_t nrb = (B + kBM - 1) / kBM, ntiles = (M + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  const int64_t nrow_blk = (B + kRowThreads - 1) / kRowThreads;
  at::Tensor fws = at::empty({2 * nsplit * B + 2 * B}, fopts);
  float* part_a = fws.data_ptr<float>();  // LSE max, later softplus sums
  float* part_b = part_a + nsplit * B;    // LSE sum, later sigmoid sums
  float* row_max = part_b + nsplit * B;
  float* row_sum = row_max + B;
  at::Tensor iws = at::empty({nrow_blk + 1}, x.options().dtype(at::kLong));
  int64_t* cnt_part = iws.data_ptr<int64_t>();
  int64_t* npos = cnt_part + nrow_blk;
  at::Tensor dws = at::empty({2 * nrow_blk}, x.options().dtype(at::kDouble));
  const float* tp = tau.data_ptr<float>();
  const int64_t* lx = labels.data_ptr<int64_t>();
  const int64_t* ly = ref_labels.data_ptr<int64_t>();

  run_count(labels, ref_labels, self_mode, cnt_part, nrow_blk, stream);
  const bool tf32 = fp32_matmul_tf32_opted_in();  // fp32 S tiles in TF32 (flashdml/tf32.h), both tile passes
  FLASHDML_CUDA_DTYPE_DISPATCH(x.scalar_type(), "xent", [&] {
    using DT = typename DeviceType<scalar_t>::type;
    const auto kernel = tf32 ? xe_lse_kernel<DT, kTf32Able<DT>> : xe_lse_kernel<DT, false>;
    kernel<<<dim3(unsigned(nrb), unsigned(nsplit)), kThreads, 0, stream>>>(
        dptr<scalar_t>(x), dptr<scalar_t>(y), lx, ly, B, M, d, tp, self_mode, tps, part_a, part_b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  xe_row_lse_kernel<<<unsigned(nrow_blk), kRowThreads, 0, stream>>>(part_a, part_b, int(nsplit), B, row_max, row_sum,
                                                                    global_partition ? nullptr : lse.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  xe_scalars_kernel<<<1, kOneBlock, 0, stream>>>(cnt_part, nrow_blk, global_partition ? row_max : nullptr, row_sum, B,
                                                 npos, lse.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  FLASHDML_CUDA_DTYPE_DISPATCH(x.scalar_type(), "xent", [&] {
    using DT = typename DeviceType<scalar_t>::type;
    const auto kernel = tf32 ? xe_pos_kernel<DT, kTf32Able<DT>> : xe_pos_kernel<DT, false>;
    kernel<<<dim3(unsigned(nrb), unsigned(nsplit)), kThreads, 0, stream>>>(
        dptr<scalar_t>(x), dptr<scalar_t>(y), lx, ly, B, M, d, tp, lse.data_ptr<float>(), !global_partition,
        self_mode, tps, part_a, part_b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  xe_rows_kernel<<<unsigned(nrow_blk), kRowThreads, 0, stream>>>(part_a, part_b, int(nsplit), B, npos,
                                                                 global_partition ? nullptr : coef.data_ptr<float>(),
                                                                 dws.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  xe_final_kernel<<<1, kOneBlock, 0, stream>>>(dws.data_ptr<double>(), nrow_blk, npos, loss.data_ptr<float>(),
                                               global_partition ? coef.data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse, coef};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> xent_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x_raw, const at::Tensor& y_raw, const at::Tensor& labels_in,
    const at::Tensor& ref_labels_in, const at::Tensor& temperature, bool global_partition, bool self_mode,
    bool normalize, const at::Tensor& lse_in, const at::Tensor& coef_in) {
  check::xent_bwd_inputs("xent_bwd", grad_loss, x_raw, y_raw, labels_in, ref_labels_in, temperature,
                         global_partition, self_mode, lse_in, coef_in);  // flashdml/op_checks.h
  check_row_tensors("xent_bwd", x_raw, y_raw, kBM);
  const int64_t B = x_raw.size(0);
  const int64_t nstat = global_partition ? 1 : B;
  const c10::cuda::CUDAGuard guard(x_raw.device());
  at::Tensor x_in, y_in;
  std::tie(x_in, y_in) = kernel_rows(x_raw, y_raw, normalize);
  const at::Tensor x = vec_ready(x_in.contiguous());
  const at::Tensor y = y_in.is_same(x_in) ? x : vec_ready(y_in.contiguous());
  const at::Tensor labels = labels_in.contiguous(), ref_labels = ref_labels_in.contiguous();
  const at::Tensor tau = temperature.to(at::kFloat).contiguous();
  const at::Tensor grad = grad_loss.to(at::kFloat).contiguous();
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous(), coef = coef_in.to(at::kFloat).contiguous();
  at::Tensor dx = new_output(x_in.sizes(), x.options());
  at::Tensor dy = new_output(y_in.sizes(), y.options());
  at::Tensor dtemp = new_output(at::IntArrayRef{}, x.options().dtype(at::kFloat));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int64_t nrow_blk = (B + kRowThreads - 1) / kRowThreads;
  at::Tensor iws = at::empty({nrow_blk}, x.options().dtype(at::kLong));
  at::Tensor w = at::empty({4}, x.options().dtype(at::kFloat));
  run_count(labels, ref_labels, self_mode, iws.data_ptr<int64_t>(), nrow_blk, stream);
  xe_bwd_prep_kernel<<<1, kOneBlock, 0, stream>>>(iws.data_ptr<int64_t>(), nrow_blk, coef.data_ptr<float>(), nstat,
                                                  grad.data_ptr<float>(), tau.data_ptr<float>(), w.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  XentOp op{};
  op.lab_x = labels.data_ptr<int64_t>();
  op.lab_y = ref_labels.data_ptr<int64_t>();
  op.lse = lse.data_ptr<float>();
  op.coef = coef.data_ptr<float>();
  op.tau = tau.data_ptr<float>();
  op.w = w.data_ptr<float>();
  op.per_row = !global_partition;
  op.self_mode = self_mode;
  at::Tensor gz_part;
  const bool tf32 = fp32_matmul_tf32_opted_in();  // the S tiles the backward recomputes (flashdml/tf32.h)
  FLASHDML_CUDA_DTYPE_DISPATCH(x.scalar_type(), "xent", [&] {
    run_grad<scalar_t, false>(x, y, op, w.data_ptr<float>(), dx, &gz_part, tf32, stream);
    if (global_partition && self_mode) {
      dy.copy_(dx);  // G is symmetric (same sets, same weights for (i, j) and (j, i)) and y = x: G^T x = G y
    } else {
      run_grad<scalar_t, true>(x, y, op, w.data_ptr<float>(), dy, nullptr, tf32, stream);
    }
  });
  xe_dtau_kernel<<<1, kOneBlock, 0, stream>>>(gz_part.data_ptr<float>(), gz_part.numel(), w.data_ptr<float>(),
                                              dtemp.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {raw_rows_grad(dx, x_raw, normalize), raw_rows_grad(dy, y_raw, normalize), dtemp};
}

}  // namespace
}  // namespace cuda
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CUDA, m) {
  m.impl("xent_fwd", &flashdml::cuda::xent_fwd_cuda);
  m.impl("xent_bwd", &flashdml::cuda::xent_bwd_cuda);
}
