// CUDA backend of the anchor-LSE losses (docs/spec.md §6.1-6.3): flashdml::anchor_lse_fwd / anchor_lse_bwd, the
// same ops, outputs and semantics as csrc/cpu/anchor_lse.cpp (kind 0 SupCon, 1 Multi-Similarity, 2 Circle;
// row_stats columns: flashdml/anchor_lse.h). The rows are always L2-normalised on entry (once in self mode, where
// y is x) and the gradients mapped back to the raw rows (normalize_rows.h).
//
// Nothing B x M is stored: every kernel recomputes 64 x 64 tiles of S = x y^T (tile_gemm.cuh: wmma for fp16 /
// bf16, exact-fp32 FFMA for fp32 or wmma TF32 after the TF32 opt-in; pair_tiles.cuh) and reduces them on the
// spot. Deterministic: no atomics, every partial is reduced in a fixed order, exact int64 counts; temperature and
// grad_loss are read on the device.
//
// Forward:  al_fwd_kernel  -> per split, per row: online LSE of the positives' and the negatives' logits and
//                             the sum of the positive logits;
//           al_rows_kernel -> the row LSEs (row_stats), row losses, |P(a)| (binary searches in the sorted
//                             ref_labels) and per-block counts;
//           al_final_kernel -> the reducer's count, the zero cases, the row weights (row_stats) and the loss.
// Backward: al_bwd_prep_kernel -> the G scale and output scalars; pair_grad_kernel with AnchorOp<kind> on (x, y)
//           -> dx partials (+ sum G s for SupCon), pair_reduce_kernel -> dx; the same on (y, x) -> dy;
//           al_dtemp_kernel -> dtemperature.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>

#include "anchor_lse_kernels.cuh"
#include "flashdml/op_checks.h"
#include "flashdml/poison.h"
#include "launch_utils.cuh"
#include "normalize_rows.h"
#include "pair_tiles.cuh"

namespace flashdml {
namespace cuda {
namespace {

using namespace al;
using pair::pair_grad_kernel_for;
using pair::pair_reduce_kernel;

// The kind as a compile-time constant: fn(std::integral_constant<int, K>{}).
template <class F>
void with_kind(int64_t kind, F&& fn) {
  if (kind == kSupCon) fn(std::integral_constant<int, kSupCon>{});
  else if (kind == kMultiSimilarity) fn(std::integral_constant<int, kMultiSimilarity>{});
  else fn(std::integral_constant<int, kCircle>{});
}

// SupCon's p0 (1 / tau) is read on the device by the kernels.
Params host_params(int64_t kind, double p0, double p1, double p2) {
  if (kind == kSupCon) return {0.f, 0.f, 0.f};
  return {float(p0), float(p1), float(p2)};
}

// The normalised rows the kernels read (vector-load ready; self mode: y is x).
std::pair<at::Tensor, at::Tensor> prepared_rows(const at::Tensor& x_raw, const at::Tensor& y_raw, bool self_mode) {
  at::Tensor x_in, y_in;
  std::tie(x_in, y_in) = kernel_rows(x_raw, self_mode ? x_raw : y_raw, /*normalize=*/true);
  const at::Tensor x = vec_ready(x_in.contiguous());
  const at::Tensor y = self_mode ? x : vec_ready(y_in.contiguous());
  return {x, y};
}

// out = sc[1] * G Oth over the rows of Out (kOutY: Out = y, the dy pass); gz_part (SupCon's dx pass) gets the
// per-block sums of G s. x, y: vec_ready (padded length d); out: [rows, out.size(1)] with out.size(1) <= d.
template <typename T, int K, bool kOutY>
void run_grad(const at::Tensor& x, const at::Tensor& y, const AnchorOp<K>& op, const float* sc, at::Tensor& out,
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
  const auto kernel = pair_grad_kernel_for<DT, AnchorOp<K>, kOutY, false>(d, tf32);
  kernel<<<dim3(unsigned(nrb), 1u, unsigned(nsplit)), kThreads,
                                                    0, stream>>>(dptr<T>(x), dptr<T>(y), nx, ny, d, op, tps,
                                                                 part.data_ptr<float>(), gzp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = nout * d_out;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + 255) / 256, 8 * int64_t(sm_count())));
  pair_reduce_kernel<DT><<<unsigned(blocks), 256, 0, stream>>>(part.data_ptr<float>(), int(nsplit), nout, d, d_out,
                                                               sc + 1, reinterpret_cast<DT*>(out.data_ptr<T>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> anchor_lse_fwd_cuda(const at::Tensor& x_raw, const at::Tensor& y_raw,
                                                       const at::Tensor& labels_in, const at::Tensor& ref_labels_in,
                                                       const at::Tensor& temperature, int64_t kind, double p0,
                                                       double p1, double p2, bool self_mode) {
  // The CPU op's checks (flashdml/op_checks.h), then this kernel's limits (non-empty, grid size).
  check::anchor_lse_fwd_inputs("anchor_lse_fwd", x_raw, y_raw, labels_in, ref_labels_in, temperature, kind, p0, p1,
                               p2, self_mode);
  check_row_tensors("anchor_lse_fwd", x_raw, y_raw, kBM);
  const c10::cuda::CUDAGuard guard(x_raw.device());
  const auto [x, y] = prepared_rows(x_raw, y_raw, self_mode);
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor ref_labels = ref_labels_in.contiguous();  // as the CPU op: the columns carry ref_labels
  const at::Tensor sorted_ref = std::get<0>(ref_labels.sort());
  const at::Tensor tau = temperature.to(at::kFloat).contiguous();
  const int64_t B = x.size(0), M = y.size(0), d = x.size(1);
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor loss = new_output(at::IntArrayRef{}, fopts);
  at::Tensor stats = new_output({B, kStats}, fopts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int64_t nrb = (B + kBM - 1) / kBM, ntiles = (M + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  const int64_t nrow_blk = (B + kRowThreads - 1) / kRowThreads;
  at::Tensor part = at::empty({kParts * nsplit * B}, fopts);
  at::Tensor ell = at::empty({B}, x.options().dtype(at::kDouble));
  at::Tensor iws = at::empty({B + 2 * nrow_blk}, x.options().dtype(at::kLong));
  int64_t* npos_row = iws.data_ptr<int64_t>();
  int64_t* blk = npos_row + B;
  const Params prm = host_params(kind, p0, p1, p2);
  const bool tf32 = fp32_matmul_tf32_opted_in();  // fp32 S tiles in TF32 (flashdml/tf32.h)

  FLASHDML_CUDA_DTYPE_DISPATCH(x.scalar_type(), "anchor_lse_fwd", [&] {
    using DT = typename DeviceType<scalar_t>::type;
    with_kind(kind, [&](auto k) {
      constexpr int K = decltype(k)::value;
      const auto kernel = tf32 ? al_fwd_kernel<DT, K, kTf32Able<DT>> : al_fwd_kernel<DT, K, false>;
      kernel<<<dim3(unsigned(nrb), unsigned(nsplit)), kThreads, 0, stream>>>(
          dptr<scalar_t>(x), dptr<scalar_t>(y), labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), B, M, d,
          tau.data_ptr<float>(), prm, self_mode, tps, part.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  al_rows_kernel<<<unsigned(nrow_blk), kRowThreads, 0, stream>>>(
      part.data_ptr<float>(), int(nsplit), B, M, labels.data_ptr<int64_t>(), sorted_ref.data_ptr<int64_t>(),
      self_mode, int(kind), p0, p1, stats.data_ptr<float>(), ell.data_ptr<double>(), npos_row, blk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  al_final_kernel<<<1, kOneBlock, 0, stream>>>(blk, nrow_blk, ell.data_ptr<double>(), npos_row, B, M, self_mode,
                                               int(kind), stats.data_ptr<float>(), loss.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> anchor_lse_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x_raw, const at::Tensor& y_raw, const at::Tensor& labels_in,
    const at::Tensor& ref_labels_in, const at::Tensor& temperature, int64_t kind, double p0, double p1, double p2,
    bool self_mode, const at::Tensor& row_stats) {
  check::anchor_lse_bwd_inputs("anchor_lse_bwd", grad_loss, x_raw, y_raw, labels_in, ref_labels_in, temperature, kind,
                               p0, p1, p2, self_mode, row_stats);  // flashdml/op_checks.h
  check_row_tensors("anchor_lse_bwd", x_raw, y_raw, kBM);
  const c10::cuda::CUDAGuard guard(x_raw.device());
  const auto [x, y] = prepared_rows(x_raw, y_raw, self_mode);
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor ref_labels = ref_labels_in.contiguous();  // as the CPU op: the columns carry ref_labels
  const at::Tensor tau = temperature.to(at::kFloat).contiguous();
  const at::Tensor grad = grad_loss.to(at::kFloat).contiguous();
  const at::Tensor stats = row_stats.contiguous();
  const int64_t B = x.size(0);
  const at::Tensor& y_src = self_mode ? x_raw : y_raw;
  at::Tensor dx = new_output(x_raw.sizes(), x.options());
  at::Tensor dy = new_output(y_src.sizes(), y.options());
  at::Tensor dtemp = new_output(at::IntArrayRef{}, x.options().dtype(at::kFloat));
  at::Tensor sc = at::empty({4}, x.options().dtype(at::kFloat));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  al_bwd_prep_kernel<<<1, kOneBlock, 0, stream>>>(stats.data_ptr<float>(), B, grad.data_ptr<float>(),
                                                  tau.data_ptr<float>(), int(kind), float(p1), sc.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor gz_part;
  const bool tf32 = fp32_matmul_tf32_opted_in();  // the S tiles the backward recomputes (flashdml/tf32.h)
  FLASHDML_CUDA_DTYPE_DISPATCH(x.scalar_type(), "anchor_lse_bwd", [&] {
    with_kind(kind, [&](auto k) {
      constexpr int K = decltype(k)::value;
      AnchorOp<K> op{};
      op.lab_x = labels.data_ptr<int64_t>();
      op.lab_y = ref_labels.data_ptr<int64_t>();
      op.stats = stats.data_ptr<float>();
      op.sc = sc.data_ptr<float>();
      op.prm = host_params(kind, p0, p1, p2);
      op.self_mode = self_mode;
      run_grad<scalar_t, K, false>(x, y, op, sc.data_ptr<float>(), dx, K == kSupCon ? &gz_part : nullptr, tf32,
                                   stream);
      run_grad<scalar_t, K, true>(x, y, op, sc.data_ptr<float>(), dy, nullptr, tf32, stream);
    });
  });
  al_dtemp_kernel<<<1, kOneBlock, 0, stream>>>(gz_part.defined() ? gz_part.data_ptr<float>() : nullptr,
                                               gz_part.defined() ? gz_part.numel() : 0, sc.data_ptr<float>(),
                                               dtemp.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {raw_rows_grad(dx, x_raw, true), raw_rows_grad(dy, y_src, true), dtemp};
}

}  // namespace
}  // namespace cuda
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CUDA, m) {
  m.impl("anchor_lse_fwd", &flashdml::cuda::anchor_lse_fwd_cuda);
  m.impl("anchor_lse_bwd", &flashdml::cuda::anchor_lse_bwd_cuda);
}
