// CUDA backend of batch softmax / InfoNCE (docs/spec.md §2.1): flashdml::batch_softmax_fwd / batch_softmax_bwd.
//
// Nothing B x B is ever stored: every kernel recomputes 64 x 64 tiles of S = x y^T (tile_gemm.cuh: wmma tensor cores
// for fp16 / bf16, exact-fp32 SIMT FFMA for fp32 or TF32 tensor cores after the user's TF32 opt-in) and reduces them on
// the spot. Per-element formulas (allowed pairs, gradient weight) come from flashdml/batch_softmax.h and the online LSE
// from flashdml/online_lse.h, shared with the CPU kernels. Deterministic: no atomics; column work split across blocks
// ("splits", for occupancy at small B) produces partials that later kernels reduce in a fixed order.
//
// Forward:  bs_lse_kernel (x, y)  -> per-split (max, sum) per row + z_ii;  finalize_lse_kernel -> row_lse,
//           per-row loss terms;  symmetric: the same two on (y, x) -> col_lse (the allowed test is symmetric
//           and z^T = y x^T);  scaled_sum_kernel -> loss.
// Backward: bs_grad_kernel (x, y) -> per-split fp32 partials of g y (+ partial sums of g z for dtemperature);
//           reduce_splits_kernel -> dx;  bs_grad_kernel (y, x) -> g^T x partials;  reduce -> dy;
//           scaled_sum_kernel -> dtemperature.  (g = unscaled dL/dz, see batch_softmax.h.)
// temperature and grad_loss are read on the device (no host sync). normalize = true: the rows are normalised on entry
// and dx, dy mapped back to the raw rows (normalize_rows.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <tuple>

#include "flashdml/batch_softmax.h"
#include "flashdml/online_lse.h"
#include "flashdml/op_checks.h"
#include "flashdml/poison.h"
#include "launch_utils.cuh"
#include "batch_softmax_kernels.cuh"
#include "normalize_rows.h"

namespace flashdml {
namespace cuda {
namespace {

using namespace bs;  // the kernels (batch_softmax_kernels.cuh)

// ---- host side -------------------------------------------------------------------------------------------

template <typename DT>
bool use_vec(const at::Tensor& a, const at::Tensor& b, int64_t d) {
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return aligned(a.data_ptr()) && aligned(b.data_ptr()) && d % TileCfg<DT>::kVW == 0;
}

// Per-row LSE of z = A B^T / tau over the allowed set -> lse[0 .. n), terms[0 .. n) = lse_i - z_ii.
template <typename T>
void run_lse(const at::Tensor& A, const at::Tensor& Bm, const int64_t* labels, const float* tau, float* lse,
             float* terms, bool tf32, cudaStream_t stream) {
  using DT = typename DeviceType<T>::type;
  const int64_t n = A.size(0), d = A.size(1);
  const int64_t nrb = (n + kBM - 1) / kBM, ntiles = (n + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  at::Tensor ws = at::empty({(2 * nsplit + 1) * n}, A.options().dtype(at::kFloat));
  float* part_max = ws.data_ptr<float>();
  float* part_sum = part_max + nsplit * n;
  float* diag = part_sum + nsplit * n;
  const auto kernel = tf32 ? bs_lse_kernel<DT, kTf32Able<DT>> : bs_lse_kernel<DT, false>;
  kernel<<<dim3(unsigned(nrb), unsigned(nsplit)), kThreads, 0, stream>>>(
      dptr<T>(A), dptr<T>(Bm), labels, tau, n, d, tps, use_vec<DT>(A, Bm, d), part_max, part_sum, diag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_lse_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(part_max, part_sum, diag, int(nsplit), n, lse,
                                                                     terms);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out = (host_scale * grad / tau) * G B with G_ij the unscaled weight of (A row i, B row j); also writes the
// per-block sums of g z to dtau_part (nsplit * nrb floats) when given.
template <typename T>
void run_grad(const at::Tensor& A, const at::Tensor& Bm, const int64_t* labels, const float* tau, const float* lse_r,
              const float* lse_c, float host_scale, const float* grad, at::Tensor& out, at::Tensor* dtau_part,
              bool tf32, cudaStream_t stream) {
  using DT = typename DeviceType<T>::type;
  const int64_t n = A.size(0), d = A.size(1);
  const int64_t nrb = (n + kBM - 1) / kBM, ntiles = (n + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);  // no chunk axis: the d chunks loop inside each block
  at::Tensor part = at::empty({nsplit * n * d}, A.options().dtype(at::kFloat));
  float* dtp = nullptr;
  if (dtau_part != nullptr) {
    *dtau_part = at::empty({nsplit * nrb}, A.options().dtype(at::kFloat));
    dtp = dtau_part->data_ptr<float>();
  }
  // one chunk of d (64 columns wide for 16-bit rows at d <= 64): the accumulator stays in registers; more:
  // running sums per chunk in part
  const auto kernel = bs_grad_kernel_for<DT>(d, tf32);
  kernel<<<dim3(unsigned(nrb), 1u, unsigned(nsplit)), kThreads, 0, stream>>>(
      dptr<T>(A), dptr<T>(Bm), labels, tau, lse_r, lse_c, n, d, tps, use_vec<DT>(A, Bm, d), part.data_ptr<float>(),
      dtp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = n * d;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + 255) / 256, 8 * int64_t(sm_count())));
  reduce_splits_kernel<DT><<<unsigned(blocks), 256, 0, stream>>>(
      part.data_ptr<float>(), int(nsplit), total, host_scale, grad, tau,
      reinterpret_cast<DT*>(out.data_ptr<T>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_softmax_fwd_cuda(const at::Tensor& x_raw, const at::Tensor& y_raw,
                                                                      const std::optional<at::Tensor>& labels_in,
                                                                      const at::Tensor& temperature, bool symmetric,
                                                                      bool normalize) {
  // The CPU op's checks (flashdml/op_checks.h), then this kernel's limits (non-empty, grid size).
  check::batch_softmax_fwd_inputs("batch_softmax_fwd", x_raw, y_raw, labels_in, temperature);
  check_row_tensors("batch_softmax_fwd", x_raw, y_raw, kBM);
  const c10::cuda::CUDAGuard guard(x_raw.device());
  at::Tensor xk, yk;
  std::tie(xk, yk) = kernel_rows(x_raw, y_raw, normalize);
  const at::Tensor x = xk.contiguous(), y = yk.contiguous();
  const at::Tensor tau = temperature.to(at::kFloat).contiguous();
  at::Tensor labels;
  if (labels_in.has_value()) labels = labels_in->contiguous();
  const int64_t* lab = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
  const int64_t n = x.size(0);
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor loss = new_output(at::IntArrayRef{}, fopts);
  at::Tensor row_lse = new_output({n}, fopts);
  at::Tensor col_lse = new_output({symmetric ? n : 0}, fopts);
  at::Tensor terms = at::empty({symmetric ? 2 * n : n}, fopts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool tf32 = fp32_matmul_tf32_opted_in();  // fp32 S tiles in TF32 (flashdml/tf32.h), both passes
  const float* tp = tau.data_ptr<float>();
  FLASHDML_CUDA_DTYPE_DISPATCH(x.scalar_type(), "batch_softmax", [&] {
    run_lse<scalar_t>(x, y, lab, tp, row_lse.data_ptr<float>(), terms.data_ptr<float>(), tf32, stream);
    if (symmetric) {
      run_lse<scalar_t>(y, x, lab, tp, col_lse.data_ptr<float>(), terms.data_ptr<float>() + n, tf32, stream);
    }
  });
  scaled_sum_kernel<<<1, kSumThreads, 0, stream>>>(terms.data_ptr<float>(), terms.numel(),
                                                   batch_softmax_scale(n, symmetric), nullptr, nullptr,
                                                   loss.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_softmax_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x_raw, const at::Tensor& y_raw,
    const std::optional<at::Tensor>& labels_in, const at::Tensor& temperature, bool symmetric, bool normalize,
    const at::Tensor& row_lse_in, const at::Tensor& col_lse_in) {
  check::batch_softmax_bwd_inputs("batch_softmax_bwd", grad_loss, x_raw, y_raw, labels_in, temperature, symmetric,
                                  row_lse_in, col_lse_in);  // flashdml/op_checks.h
  check_row_tensors("batch_softmax_bwd", x_raw, y_raw, kBM);
  const int64_t n = x_raw.size(0);
  const c10::cuda::CUDAGuard guard(x_raw.device());
  at::Tensor xk, yk;
  std::tie(xk, yk) = kernel_rows(x_raw, y_raw, normalize);
  const at::Tensor x = xk.contiguous(), y = yk.contiguous();
  const at::Tensor tau = temperature.to(at::kFloat).contiguous();
  const at::Tensor grad = grad_loss.to(at::kFloat).contiguous();
  const at::Tensor row_lse = row_lse_in.to(at::kFloat).contiguous();
  const at::Tensor col_lse = symmetric ? col_lse_in.to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor labels;
  if (labels_in.has_value()) labels = labels_in->contiguous();
  const int64_t* lab = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
  at::Tensor dx = new_output(x.sizes(), x.options());
  at::Tensor dy = new_output(y.sizes(), y.options());
  at::Tensor dtemp = new_output(at::IntArrayRef{}, x.options().dtype(at::kFloat));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float scale = batch_softmax_scale(n, symmetric);
  const float* tp = tau.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  const float* rl = row_lse.data_ptr<float>();
  const float* cl = symmetric ? col_lse.data_ptr<float>() : nullptr;
  at::Tensor dtau_part;
  const bool tf32 = fp32_matmul_tf32_opted_in();  // the S tiles the backward recomputes (flashdml/tf32.h)
  FLASHDML_CUDA_DTYPE_DISPATCH(x.scalar_type(), "batch_softmax", [&] {
    run_grad<scalar_t>(x, y, lab, tp, rl, cl, scale, gp, dx, &dtau_part, tf32, stream);
    run_grad<scalar_t>(y, x, lab, tp, cl, rl, scale, gp, dy, nullptr, tf32, stream);
  });
  scaled_sum_kernel<<<1, kSumThreads, 0, stream>>>(dtau_part.data_ptr<float>(), dtau_part.numel(), -scale, gp, tp,
                                                   dtemp.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {raw_rows_grad(dx, x_raw, normalize), raw_rows_grad(dy, y_raw, normalize), dtemp};
}

}  // namespace
}  // namespace cuda
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CUDA, m) {
  m.impl("batch_softmax_fwd", &flashdml::cuda::batch_softmax_fwd_cuda);
  m.impl("batch_softmax_bwd", &flashdml::cuda::batch_softmax_bwd_cuda);
}
