// CUDA backend of the selection primitives: kNN (docs/spec.md §1.2) and batch-wide hardest negatives (docs/spec.md §1.3):
// flashdml::knn_fwd / hardest_negatives_fwd (schemas: csrc/ops.cpp). normalize = true: the rows are normalised on
// entry (once in self mode; normalize_rows.h). knn_fwd_cuda has external linkage (ops_cuda.h): the contextual op
// calls it directly.
//
// Nothing B x M is stored: S = x y^T is recomputed in 64 x 64 tiles (tile_gemm.cuh, pair_tiles.cuh) and reduced on
// the spot (kernels: selection_kernels.cuh; keys and list insertion: flashdml/topk_select.h). Deterministic: the
// only atomics are integer histogram counts; lists are merged in split order.
//
// kNN: ceil(k / 32) rounds of knn_partial_kernel (per row and column split the 32 largest keys below the previous
//      round's last key, in shared memory) + knn_merge_kernel (splits merged in order, values / indices written,
//      the round's last key kept as the next bound). Memory O((B + M) d + B k).
// Hardest negatives: radix select on the order-preserving uint32 keys of the negative S values: three histogram
//      passes (11 + 11 + 10 bits, hn_select_kernel picks the bin on the device) give the exact k-th key T and how
//      many entries equal to T belong to the top k; a count pass (per row and split: keys > T, == T), exclusive
//      prefix sums in flat order, and a collect pass put every selected entry into a fixed slot; one stable sort
//      of the k results (value descending after flat index ascending) finishes. Memory O((B + M) d + k + B splits).
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
#include "normalize_rows.h"
#include "ops_cuda.h"
#include "selection_kernels.cuh"

namespace flashdml {
namespace cuda {
namespace {

using namespace sel;

void check_xy(const char* op, const at::Tensor& x, const at::Tensor& y) {
  check_row_tensors(op, x, y, kBM);
  TORCH_CHECK(y.size(0) < int64_t(UINT32_MAX), op, ": y has too many rows (at most 2^32 - 2)");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_fwd_cuda(const at::Tensor& x_raw, const at::Tensor& y_raw, int64_t k,
                                                bool exclude_diagonal, bool normalize) {
  // The CPU op's checks (flashdml/op_checks.h), then this kernel's limits (non-empty, grid size, M < 2^32 - 1).
  check::knn_fwd_inputs("knn_fwd", x_raw, y_raw, k, exclude_diagonal);
  check_xy("knn_fwd", x_raw, y_raw);
  const int64_t B = x_raw.size(0), M = y_raw.size(0);
  const c10::cuda::CUDAGuard guard(x_raw.device());
  at::Tensor x_in, y_in;
  std::tie(x_in, y_in) = kernel_rows(x_raw, y_raw, normalize);
  const at::Tensor x = vec_ready(x_in.contiguous());
  const at::Tensor y = y_in.is_same(x_in) ? x : vec_ready(y_in.contiguous());
  const int64_t d = x.size(1);
  at::Tensor values = new_output({B, k}, x.options().dtype(at::kFloat));
  at::Tensor indices = new_output({B, k}, x.options().dtype(at::kLong));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t nrb = (B + kBM - 1) / kBM, ntiles = (M + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  const auto kopts = x.options().dtype(at::kLong);
  at::Tensor part = at::empty({nsplit * B * kK}, kopts);
  const int64_t rounds = (k + kK - 1) / kK;
  at::Tensor bound = at::empty({rounds > 1 ? B : 1}, kopts);
  uint64_t* part_p = reinterpret_cast<uint64_t*>(part.data_ptr<int64_t>());
  uint64_t* bound_p = reinterpret_cast<uint64_t*>(bound.data_ptr<int64_t>());
  const bool tf32 = fp32_matmul_tf32_opted_in();  // fp32 S tiles in TF32 (flashdml/tf32.h), the same every round
  for (int64_t r = 0; r < rounds; ++r) {
    FLASHDML_CUDA_DTYPE_DISPATCH(x.scalar_type(), "selection", [&] {
      using DT = typename DeviceType<scalar_t>::type;
      const auto kernel = tf32 ? knn_partial_kernel<DT, kTf32Able<DT>> : knn_partial_kernel<DT, false>;
      kernel<<<dim3(unsigned(nrb), unsigned(nsplit)), kThreads, 0, stream>>>(
              dptr<scalar_t>(x), dptr<scalar_t>(y), B, M, d, tps, exclude_diagonal, r > 0 ? bound_p : nullptr,
              part_p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    knn_merge_kernel<<<unsigned((B + kMergeRows - 1) / kMergeRows), kMergeRows, 0, stream>>>(
        part_p, B, int(nsplit), k, r * kK, int(std::min<int64_t>(kK, k - r * kK)), values.data_ptr<float>(),
        indices.data_ptr<int64_t>(), r + 1 < rounds ? bound_p : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {values, indices};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> hardest_negatives_fwd_cuda(const at::Tensor& x_raw,
                                                                          const at::Tensor& y_raw,
                                                                          const at::Tensor& labels_in,
                                                                          const at::Tensor& ref_labels_in, int64_t k,
                                                                          bool self_mode, bool normalize) {
  // The CPU op's checks (flashdml/op_checks.h), then this kernel's limits. k <= the number of negative pairs costs
  // a sort of ref_labels, two binary searches per row and one host sync (check::negative_pairs).
  check::hardest_negatives_fwd_inputs("hardest_negatives_fwd", x_raw, y_raw, labels_in, ref_labels_in, k, self_mode);
  check_xy("hardest_negatives_fwd", x_raw, y_raw);
  const int64_t B = x_raw.size(0), M = y_raw.size(0);
  const c10::cuda::CUDAGuard guard(x_raw.device());
  at::Tensor x_in, y_in;
  std::tie(x_in, y_in) = kernel_rows(x_raw, y_raw, normalize);
  const at::Tensor x = vec_ready(x_in.contiguous());
  const at::Tensor y = y_in.is_same(x_in) ? x : vec_ready(y_in.contiguous());
  const at::Tensor labels = labels_in.contiguous(), ref_labels = ref_labels_in.contiguous();
  const int64_t d = x.size(1);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t nrb = (B + kBM - 1) / kBM, ntiles = (M + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  const auto lopts = x.options().dtype(at::kLong);
  at::Tensor state = at::tensor({int64_t(0), k, int64_t(0), int64_t(0)}, lopts.device(at::kCPU)).to(x.device());
  at::Tensor hist = at::empty({kNBins}, lopts);
  at::Tensor cnt = at::empty({2, B, nsplit}, lopts);
  at::Tensor values = new_output({k}, x.options().dtype(at::kFloat));
  at::Tensor flat = new_output({k}, lopts);
  auto* hist_p = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  const int passes[3][2] = {{21, 32}, {10, 21}, {0, 10}};
  const bool tf32 = fp32_matmul_tf32_opted_in();  // fp32 S tiles in TF32 (flashdml/tf32.h), the same every pass
  FLASHDML_CUDA_DTYPE_DISPATCH(x.scalar_type(), "selection", [&] {
    using DT = typename DeviceType<scalar_t>::type;
    const dim3 grid(static_cast<unsigned>(nrb), static_cast<unsigned>(nsplit));
    constexpr bool kTf = kTf32Able<DT>;
    const auto pass0 = tf32 ? hn_pass_kernel<DT, 0, kTf> : hn_pass_kernel<DT, 0, false>;
    const auto pass1 = tf32 ? hn_pass_kernel<DT, 1, kTf> : hn_pass_kernel<DT, 1, false>;
    const auto pass2 = tf32 ? hn_pass_kernel<DT, 2, kTf> : hn_pass_kernel<DT, 2, false>;
    for (const auto& p : passes) {
      hist.zero_();
      pass0<<<grid, kThreads, 0, stream>>>(
          dptr<scalar_t>(x), dptr<scalar_t>(y), labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), B, M, d,
          tps, int(nsplit), self_mode, p[0], p[1], state.data_ptr<int64_t>(), hist_p, nullptr, nullptr, nullptr,
          nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      hn_select_kernel<<<1, 32, 0, stream>>>(hist_p, p[1] - p[0], k, state.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    pass1<<<grid, kThreads, 0, stream>>>(
        dptr<scalar_t>(x), dptr<scalar_t>(y), labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), B, M, d,
        tps, int(nsplit), self_mode, 0, 0, state.data_ptr<int64_t>(), nullptr, cnt.data_ptr<int64_t>(), nullptr,
        nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor c2 = cnt.reshape({2, B * nsplit});
    const at::Tensor base = (c2.cumsum(1) - c2).contiguous();
    pass2<<<grid, kThreads, 0, stream>>>(
        dptr<scalar_t>(x), dptr<scalar_t>(y), labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), B, M, d,
        tps, int(nsplit), self_mode, 0, 0, state.data_ptr<int64_t>(), nullptr, nullptr, base.data_ptr<int64_t>(),
        values.data_ptr<float>(), flat.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // order: value descending, then flat index ascending (flat indices are unique)
  const at::Tensor by_flat = std::get<1>(at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor v1 = values.index_select(0, by_flat), f1 = flat.index_select(0, by_flat);
  auto [v_sorted, by_value] = at::sort(v1, /*stable=*/true, /*dim=*/0, /*descending=*/true);
  const at::Tensor f_sorted = f1.index_select(0, by_value);
  const at::Tensor rows = at::div(f_sorted, M, "floor");
  return {v_sorted, rows, f_sorted - rows * M};
}

}  // namespace
}  // namespace cuda
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CUDA, m) {
  m.impl("knn_fwd", &flashdml::cuda::knn_fwd_cuda);
  m.impl("hardest_negatives_fwd", &flashdml::cuda::hardest_negatives_fwd_cuda);
}
