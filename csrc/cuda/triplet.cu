// CUDA backend of the triplet margin loss over every triplet of the batch (docs/spec.md §6.4):
// flashdml::triplet_fwd / triplet_bwd, the same ops, outputs and semantics as the CPU kernel (csrc/cpu/triplet.cpp).
//
//   L = sum over (a, p, n) of [d_ap - d_an + margin]_+  /  #{(a, p, n) : d_ap - d_an + margin > 0},
// d = |x^_a - y^_j| on the normalised rows. Nothing B x M and no triplet list is stored: the anchor-positive
// distances (sum_a |P_a| of them) are computed first from the row differences into a CSR list; the 64 x 64 S
// tiles are recomputed on the fly (tile_gemm.cuh, pair_tiles.cuh) and each negative entry meets its anchor's
// positives there (triplet_kernels.cuh).
//
// Forward:  class ids, positive CSR (ATen, one host read of its size), tri_pos_dist_kernel -> d_ap;
//           tri_stats_kernel<kPos = false> -> per-block sums / counts; loss = sum / count (ATen, on the device).
// Backward: the same setup; tri_stats_kernel<kPos = true> -> #{active n} per positive pair; pair_grad_kernel
//           with TripletOp (G_an = #{active p} / d_an) on the augmented rows -> G y^ and rowsum(G) (dx pass),
//           G^T x^ and colsum(G) (dy pass, reading the forward's tiles transposed); the d_an gradient is
//           s (G y^ - rowsum x^) for dx and s (G^T x^ - colsum y^) for dy, s = grad / count; then
//           tri_pos_grad_kernel adds the d_ap terms; the normalisation's backward maps both to the raw rows.
// Deterministic: no float atomics, fixed-order reductions, exact int64 counts. grad_loss and counts are read on
// the device; the only host read is the size of the positive list (and its longest row).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <tuple>

#include "flashdml/op_checks.h"
#include "flashdml/poison.h"
#include "launch_utils.cuh"
#include "normalize_rows.h"
#include "pair_tiles.cuh"
#include "triplet_kernels.cuh"

namespace flashdml {
namespace cuda {
namespace {

using namespace tri;
using pair::pair_grad_kernel_for;
using pair::pair_reduce_kernel;

// Everything both passes derive from the inputs.
struct Setup {
  at::Tensor xh, yh;            // normalised rows, input dtype [B, d] / [M, d] (yh is xh when y is x)
  at::Tensor xa, ya;            // augmented rows [n, dp]: [x^, 1, 0, 0..], [y^, 0, 1, 0..]
  at::Tensor xsq, ysq;          // fp32 |x^_i|^2, |y^_j|^2
  at::Tensor cls_x, cls_y;      // int32 class ids shared by labels and ref_labels
  at::Tensor pos_ptr;           // int64 [B + 1]
  at::Tensor pos_anchor, pos_col;  // int64 [P]
  at::Tensor pos_dist;          // fp32 [P]
  int64_t B = 0, M = 0, d = 0, dp = 0, npos = 0, max_pos = 0;
  bool tf32 = false;            // fp32 S tiles in TF32 (flashdml/tf32.h), read once per op call
};

at::Tensor augmented(const at::Tensor& rows, int64_t dp, int64_t one_col) {
  at::Tensor a = at::zeros({rows.size(0), dp}, rows.options());
  a.narrow(1, 0, rows.size(1)).copy_(rows);
  a.select(1, one_col).fill_(1);
  return a;
}

// Call check::triplet_*_inputs first.
Setup make_setup(const at::Tensor& x_raw, const at::Tensor& y_raw, const at::Tensor& labels,
                 const at::Tensor& ref_labels, bool self_mode, cudaStream_t stream) {
  Setup s;
  s.tf32 = fp32_matmul_tf32_opted_in();
  std::tie(s.xh, s.yh) = kernel_rows(x_raw, y_raw, /*normalize=*/true);
  s.B = s.xh.size(0);
  s.M = s.yh.size(0);
  s.d = s.xh.size(1);
  TORCH_CHECK(s.B < INT_MAX && s.M < INT_MAX, "triplet: more than 2^31 - 1 rows");
  const int64_t vw = s.xh.scalar_type() == at::kFloat ? 4 : 8;
  s.dp = (s.d + 2 + vw - 1) / vw * vw;
  s.xa = augmented(s.xh, s.dp, s.d);
  s.ya = augmented(s.yh, s.dp, s.d + 1);
  const at::Tensor xf = s.xh.to(at::kFloat);
  s.xsq = (xf * xf).sum(1).contiguous();
  if (s.yh.is_same(s.xh)) {
    s.ysq = s.xsq;
  } else {
    const at::Tensor yf = s.yh.to(at::kFloat);
    s.ysq = (yf * yf).sum(1).contiguous();
  }

  // Class ids over both label sets, y's columns sorted by (class, index), and each anchor's range there.
  const at::Tensor inverse = std::get<1>(at::_unique2(at::cat({labels.contiguous(), ref_labels.contiguous()}),
                                                      /*sorted=*/true, /*return_inverse=*/true));
  const at::Tensor cx = inverse.narrow(0, 0, s.B).contiguous(), cy = inverse.narrow(0, s.B, s.M).contiguous();
  s.cls_x = cx.to(at::kInt).contiguous();
  s.cls_y = cy.to(at::kInt).contiguous();
  at::Tensor sorted, perm;
  std::tie(sorted, perm) = at::sort(cy, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor lo = at::searchsorted(sorted, cx, /*out_int32=*/false, /*right=*/false);
  const at::Tensor hi = at::searchsorted(sorted, cx, /*out_int32=*/false, /*right=*/true);
  at::Tensor np = hi - lo;
  if (self_mode) np = (np - 1).clamp_min(0);  // (a, a) is not a positive
  s.pos_ptr = at::cat({at::zeros({1}, np.options()), np.cumsum(0)});
  const at::Tensor sizes = at::stack({s.pos_ptr[s.B], np.max()}).cpu();  // the one host read
  s.npos = sizes[0].item<int64_t>();
  s.max_pos = sizes[1].item<int64_t>();
  if (s.npos == 0) return s;

  const auto lopts = np.options();
  s.pos_anchor = at::repeat_interleave(at::arange(s.B, lopts), np, /*dim=*/0, /*output_size=*/s.npos);
  at::Tensor idx = at::arange(s.npos, lopts) - s.pos_ptr.index_select(0, s.pos_anchor) +
                   lo.index_select(0, s.pos_anchor);
  if (self_mode) {  // skip the anchor's own place in its class
    at::Tensor where = at::empty_like(perm);
    where.scatter_(0, perm, at::arange(s.M, lopts));
    idx = idx + (idx >= where.index_select(0, s.pos_anchor)).to(at::kLong);
  }
  s.pos_col = perm.index_select(0, idx).contiguous();
  s.pos_dist = at::empty({s.npos}, s.xh.options().dtype(at::kFloat));
  FLASHDML_CUDA_DTYPE_DISPATCH(s.xh.scalar_type(), "triplet", [&] {
    tri_pos_dist_kernel<typename DeviceType<scalar_t>::type>
        <<<unsigned((s.npos + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
            dptr<scalar_t>(s.xa), dptr<scalar_t>(s.ya), s.dp, s.d, s.pos_anchor.data_ptr<int64_t>(),
            s.pos_col.data_ptr<int64_t>(), s.npos, s.pos_dist.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return s;
}

// tri_stats_kernel over every tile: (part_sum, part_cnt) for kPos = false, pos_cnt [nsplit, P] for kPos = true.
template <bool kPos>
void run_stats(const Setup& s, double margin, at::Tensor& part_sum, at::Tensor& part_cnt, at::Tensor& pos_cnt,
               cudaStream_t stream) {
  const int64_t nrb = (s.B + kBM - 1) / kBM, ntiles = (s.M + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  const auto opts = s.xh.options();
  if constexpr (kPos) {
    pos_cnt = at::zeros({nsplit, s.npos}, opts.dtype(at::kInt));
  } else {
    part_sum = at::empty({nrb * nsplit}, opts.dtype(at::kDouble));
    part_cnt = at::empty({nrb * nsplit}, opts.dtype(at::kLong));
  }
  FLASHDML_CUDA_DTYPE_DISPATCH(s.xh.scalar_type(), "triplet", [&] {
    using DT = typename DeviceType<scalar_t>::type;
    const auto kernel = s.tf32 ? tri_stats_kernel<DT, kPos, kTf32Able<DT>> : tri_stats_kernel<DT, kPos, false>;
    kernel<<<dim3(unsigned(nrb), unsigned(nsplit)), kThreads, 0, stream>>>(
            dptr<scalar_t>(s.xa), dptr<scalar_t>(s.ya), s.B, s.M, s.dp, tps, s.cls_x.data_ptr<int32_t>(),
            s.cls_y.data_ptr<int32_t>(), s.xsq.data_ptr<float>(), s.ysq.data_ptr<float>(),
            s.pos_ptr.data_ptr<int64_t>(), s.pos_dist.data_ptr<float>(), static_cast<float>(margin),
            kPos ? nullptr : part_sum.data_ptr<double>(), kPos ? nullptr : part_cnt.data_ptr<int64_t>(),
            kPos ? pos_cnt.data_ptr<int32_t>() : nullptr, s.npos);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// fp32 [n_out, dp] = *scale * (G Oth~) over the rows of Out (kOutY: the dy pass on the forward's tiles).
template <typename T, bool kOutY>
at::Tensor run_grad(const Setup& s, const TripletOp& op, const float* scale, cudaStream_t stream) {
  using DT = typename DeviceType<T>::type;
  const int64_t nx = s.B, ny = s.M, d = s.dp;
  const int64_t nout = kOutY ? ny : nx, noth = kOutY ? nx : ny;
  const int64_t nrb = (nout + kBM - 1) / kBM, ntiles = (noth + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);  // no chunk axis: the d chunks loop inside each block
  const auto fopts = s.xh.options().dtype(at::kFloat);
  at::Tensor part = at::empty({nsplit * nout * d}, fopts);
  // one chunk of d: the accumulator stays in registers; more: running sums per chunk in part (pair_tiles.cuh)
  const auto kernel = pair_grad_kernel_for<DT, TripletOp, kOutY, kOutY>(d, s.tf32);
  kernel<<<dim3(unsigned(nrb), 1u, unsigned(nsplit)), kThreads, 0,
                                                  stream>>>(dptr<T>(s.xa), dptr<T>(s.ya), nx, ny, d, op, tps,
                                                            part.data_ptr<float>(), nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor out = at::empty({nout, d}, fopts);
  const int64_t total = nout * d;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + 255) / 256, 8 * int64_t(sm_count())));
  pair_reduce_kernel<float><<<unsigned(blocks), 256, 0, stream>>>(part.data_ptr<float>(), int(nsplit), nout, d, d,
                                                                  scale, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// out[i] += sum over row i's list of w (own_i - other_j) (tri_pos_grad_kernel).
void run_pos_grad(const at::Tensor& ptr, const at::Tensor& widx, const at::Tensor& oidx, const at::Tensor& w,
                  const at::Tensor& own, const at::Tensor& other, int64_t d, at::Tensor& out, cudaStream_t stream) {
  const int64_t n = own.size(0);
  FLASHDML_CUDA_DTYPE_DISPATCH(own.scalar_type(), "triplet", [&] {
    tri_pos_grad_kernel<typename DeviceType<scalar_t>::type><<<unsigned(n), 128, 0, stream>>>(
        ptr.data_ptr<int64_t>(), widx.data_ptr<int64_t>(), oidx.data_ptr<int64_t>(), w.data_ptr<float>(),
        dptr<scalar_t>(own), dptr<scalar_t>(other), own.size(1), d, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_fwd_cuda(const at::Tensor& x_raw, const at::Tensor& y_raw,
                                                                const at::Tensor& labels,
                                                                const at::Tensor& ref_labels, double margin,
                                                                bool self_mode) {
  check::triplet_fwd_inputs("triplet_fwd", x_raw, y_raw, labels, ref_labels, self_mode);  // op_checks.h
  check_row_tensors("triplet_fwd", x_raw, y_raw, kBM);
  const c10::cuda::CUDAGuard guard(x_raw.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Setup s = make_setup(x_raw, y_raw, labels, ref_labels, self_mode, stream);
  const auto fopts = x_raw.options().dtype(at::kFloat);
  at::Tensor loss = new_output(at::IntArrayRef{}, fopts);
  at::Tensor sums = new_output({1}, fopts);
  at::Tensor counts = new_output({1}, fopts.dtype(at::kLong));
  if (s.npos == 0) {  // no positive pair: no triplet
    loss.zero_();
    sums.zero_();
    counts.zero_();
    return {loss, sums, counts};
  }
  at::Tensor part_sum, part_cnt, unused;
  run_stats<false>(s, margin, part_sum, part_cnt, unused, stream);
  const at::Tensor total = part_sum.sum();  // fixed-order device reductions
  const at::Tensor count = part_cnt.sum();
  loss.copy_(at::where(count > 0, total / count.clamp_min(1).to(at::kDouble), at::zeros_like(total)).reshape({}));
  sums.copy_(total.reshape({1}));
  counts.copy_(count.reshape({1}));
  return {loss, sums, counts};
}

std::tuple<at::Tensor, at::Tensor> triplet_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& x_raw,
                                                    const at::Tensor& y_raw, const at::Tensor& labels,
                                                    const at::Tensor& ref_labels, double margin, bool self_mode,
                                                    const at::Tensor& counts_in) {
  check::triplet_bwd_inputs("triplet_bwd", grad_loss, x_raw, y_raw, labels, ref_labels, self_mode,
                            counts_in);  // op_checks.h
  check_row_tensors("triplet_bwd", x_raw, y_raw, kBM);
  const c10::cuda::CUDAGuard guard(x_raw.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor grad = grad_loss.to(at::kDouble).reshape({});
  const at::Tensor count = counts_in.to(at::kLong).reshape({});
  const bool same = x_raw.is_same(y_raw);
  // The glue's non-finite rule sends NaN upstream: a non-finite grad_loss gives NaN everywhere, as on the CPU.
  const auto finish = [&](const at::Tensor& g) {
    return at::where(at::isfinite(grad), g, at::full({}, std::numeric_limits<float>::quiet_NaN(), g.options()));
  };

  const Setup s = make_setup(x_raw, y_raw, labels, ref_labels, self_mode, stream);
  if (s.npos == 0) {
    return {finish(at::zeros_like(x_raw)), finish(at::zeros_like(y_raw))};
  }
  at::Tensor unused_sum, unused_cnt, pos_cnt;
  run_stats<true>(s, margin, unused_sum, unused_cnt, pos_cnt, stream);
  const at::Tensor n_act = pos_cnt.sum(at::IntArrayRef{0}, /*keepdim=*/false, at::kLong);  // #{active n} per positive pair, exact
  const at::Tensor scale = grad / count.clamp_min(1).to(at::kDouble);     // dL/dhinge, 0 count -> no active term

  // G scale: c = 2^-e with 2^e >= max |P_a|; the reduction applies scale * 2^e.
  const int e = s.max_pos > 1 ? int(std::ceil(std::log2(double(s.max_pos)))) : 0;
  const at::Tensor red_scale = (scale * std::ldexp(1.0, e)).to(at::kFloat).reshape({1});
  TripletOp op{};
  op.cls_x = s.cls_x.data_ptr<int32_t>();
  op.cls_y = s.cls_y.data_ptr<int32_t>();
  op.xsq = s.xsq.data_ptr<float>();
  op.ysq = s.ysq.data_ptr<float>();
  op.pos_ptr = s.pos_ptr.data_ptr<int64_t>();
  op.pos_dist = s.pos_dist.data_ptr<float>();
  op.margin = static_cast<float>(margin);
  op.c = static_cast<float>(std::ldexp(1.0, -e));
  at::Tensor gx, gy;
  FLASHDML_CUDA_DTYPE_DISPATCH(s.xh.scalar_type(), "triplet", [&] {
    gx = run_grad<scalar_t, false>(s, op, red_scale.data_ptr<float>(), stream);
    gy = run_grad<scalar_t, true>(s, op, red_scale.data_ptr<float>(), stream);
  });
  // dL/dx^ = s (G y^ - rowsum(G) x^): rowsum is column d + 1 of G y~; dy: colsum is column d of G^T x~.
  gx = (gx.narrow(1, 0, s.d) - gx.narrow(1, s.d + 1, 1) * s.xh.to(at::kFloat)).contiguous();
  gy = (gy.narrow(1, 0, s.d) - gy.narrow(1, s.d, 1) * s.yh.to(at::kFloat)).contiguous();

  // The d_ap terms: dL/dd_ap = #{active n} * scale; w_q = that / d_ap (0 at d_ap = 0: cdist's subgradient).
  const at::Tensor w = at::where((n_act > 0) & (s.pos_dist > 0),
                                 n_act.to(at::kDouble) * scale / s.pos_dist.to(at::kDouble).clamp_min(1e-30),
                                 at::zeros({}, scale.options()))
                           .to(at::kFloat)
                           .contiguous();
  run_pos_grad(s.pos_ptr, at::arange(s.npos, s.pos_ptr.options()), s.pos_col, w, s.xa, s.ya, s.d, gx, stream);
  at::Tensor by_col, tperm;  // the same pairs listed by their positive (stable: anchors in order)
  std::tie(by_col, tperm) = at::sort(s.pos_col, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor tptr = at::searchsorted(by_col, at::arange(s.M + 1, by_col.options()));
  run_pos_grad(tptr, tperm.contiguous(), s.pos_anchor.index_select(0, tperm).contiguous(), w, s.ya, s.xa, s.d, gy,
               stream);

  if (same) {  // y is x: both roles' gradients go to x, as the CPU kernel returns them
    gx.add_(gy);
    return {finish(normalized_rows_backward(gx, x_raw)), finish(at::zeros_like(y_raw))};
  }
  return {finish(normalized_rows_backward(gx, x_raw)), finish(normalized_rows_backward(gy, y_raw))};
}

}  // namespace cuda
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CUDA, m) {
  m.impl("triplet_fwd", &flashdml::cuda::triplet_fwd_cuda);
  m.impl("triplet_bwd", &flashdml::cuda::triplet_bwd_cuda);
}
