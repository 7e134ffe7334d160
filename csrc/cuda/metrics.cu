// CUDA backend of the metrics pass (docs/spec.md §3): flashdml::metrics_pass for CUDA tensors (schema and output contract:
// csrc/ops.cpp; the same outputs as the CPU kernel, csrc/cpu/metrics.cpp, and the Triton one).
//
// One streaming pass over S = x[rows] y^T in 64 x 64 tiles (metrics_kernels.cuh), nothing R x M stored:
//  * round 0 adds every pair to the fine histograms (flashdml/histogram.h bins; self mode the pairs j > i) and, for
//    OPIS, to its row's class histograms (positives j > i, negatives any j), [2, 2^16] and [T_rows, 2, bins]
//    integer counts (deterministic), gathered per block in a shared-memory hash table that reaches global memory
//    once per key and flush (metrics_kernels.cuh, BlockCounts; its size: hash_log2 below);
//  * per-row top-k: ceil(max keep / 32) rounds of metrics_pass_kernel, each keeping per row and column split the 32
//    largest packed keys below the previous round's last key (shared-memory lists), merged in split order by the kNN
//    merge kernel (selection_kernels.cuh) and copied into the ragged outputs (metrics_scatter_kernel). Blocks whose
//    rows keep no more than 32 round are skipped; every round runs the same tiles, so S is bitwise the same.
// x[rows] is gathered once into a contiguous copy (O(R d)); the label classes are dense ids over the distinct
// ref_labels (ATen sort / searchsorted on the device). Host syncs: the output sizes (sum keep, class range) and the
// input checks, as the op's data-dependent shapes require.
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
#include "metrics_kernels.cuh"

namespace flashdml {
namespace cuda {
namespace {

using namespace met;

// log2 of the hash table's slots for metrics_pass_kernel `kernel` on the current device: the largest table (at most
// 2^kHashMaxLog2 slots) that keeps two blocks per SM — the kernel's launch bounds — next to its static shared memory
// and the per-block reservation (sm_80: 4096 slots, sm_86 / sm_89: 512, sm_90: 8192). Opts the kernel in to that
// much dynamic shared memory (above the default 48 KiB per block when needed). 0 (no table) if even the smallest
// does not fit one block.
int hash_log2(const void* kernel) {
  int dev = 0, per_sm = 0, optin = 0, reserved = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev));
  cudaFuncAttributes fa{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
  const int64_t fits = int64_t(optin) - int64_t(fa.sharedSizeBytes);
  const int64_t two_per_sm = std::min<int64_t>(int64_t(per_sm) / 2 - reserved - int64_t(fa.sharedSizeBytes), fits);
  int lg = kHashMaxLog2;
  while (lg > kHashMinLog2 && hash_table_bytes(lg) > two_per_sm) --lg;
  if (hash_table_bytes(lg) > fits) return 0;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, hash_table_bytes(lg)));
  // a hint: the shared-memory / L1 split that holds two such blocks (the tiles are staged in shared memory anyway)
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      int(cudaSharedmemCarveoutMaxShared)));
  return lg;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> metrics_pass_cuda(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& labels_in, const at::Tensor& ref_labels_in,
    const at::Tensor& rows_in, const at::Tensor& keep_in, bool self_mode, bool pair_hist, int64_t opis_bins) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  // The CPU op's checks (flashdml/op_checks.h; rows and keep in range: two O(R) reductions, one host sync each),
  // then this kernel's limits.
  check::metrics_pass_inputs("metrics_pass", x_in, y_in, labels_in, ref_labels_in, rows_in, keep_in, self_mode,
                             opis_bins);
  TORCH_CHECK(x_in.size(1) > 0, "metrics_pass: d must be >= 1");
  TORCH_CHECK(y_in.size(0) < int64_t(UINT32_MAX), "metrics_pass: y has too many rows (at most 2^32 - 2)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto st = x_in.scalar_type();
  const bool native = st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
  const at::Tensor x = native ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  const at::Tensor y = self_mode ? x : y_in.to(x.scalar_type()).contiguous();
  const at::Tensor rows = rows_in.to(at::kLong).contiguous(), keep = keep_in.to(at::kLong).contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous(), ref_labels = ref_labels_in.to(at::kLong).contiguous();
  const int64_t M = y.size(0), R = rows.numel();
  TORCH_CHECK(R <= int64_t(INT_MAX) * kBM, "metrics_pass: too many rows");
  const bool opis = opis_bins > 0;
  int shift = 0;
  while (opis && (kSimBins >> shift) > opis_bins) ++shift;  // a power of two: checked above
  // dense class ids over the distinct ref_labels; a row label absent from them gets -1 (matches nothing)
  const at::Tensor classes = std::get<0>(at::sort(ref_labels));
  const at::Tensor uniq = M > 0 ? std::get<0>(at::unique_consecutive(classes)) : classes;
  const at::Tensor col_cls = at::searchsorted(uniq, ref_labels).to(at::kInt).contiguous();
  const at::Tensor row_lab = labels.index_select(0, rows);
  at::Tensor row_cls = at::searchsorted(uniq, row_lab);
  if (uniq.numel() > 0 && R > 0) {
    const at::Tensor found = uniq.index_select(0, row_cls.clamp_max(uniq.numel() - 1)) == row_lab;
    row_cls = at::where(found, row_cls, at::full_like(row_cls, -1));
  } else {
    row_cls = at::full_like(row_cls, -1);
  }
  row_cls = row_cls.to(at::kInt).contiguous();
  int32_t cls_first = 0;
  int64_t n_cls = 0;
  if (opis && R > 0) {
    TORCH_CHECK(!(row_cls.slice(0, 1) < row_cls.slice(0, 0, R - 1)).any().item<bool>(),
                "metrics_pass: rows must be sorted by class");
    cls_first = row_cls[0].item<int32_t>();
    n_cls = int64_t(row_cls[R - 1].item<int32_t>()) - cls_first + 1;
  }

  const auto lopts = x.options().dtype(at::kLong);
  at::Tensor offsets = at::zeros({R + 1}, lopts);
  if (R > 0) offsets.slice(0, 1).copy_(keep.cumsum(0));
  const int64_t total = offsets[R].item<int64_t>();
  at::Tensor out_idx = new_output({total}, lopts);
  at::Tensor out_val = new_output({total}, x.options().dtype(at::kFloat));
  const bool fine = pair_hist || opis;
  at::Tensor hist = at::zeros({fine ? 2 : 0, fine ? kSimBins : 0}, lopts);
  at::Tensor cls_hist = at::zeros({opis ? n_cls : 0, 2, opis ? opis_bins : 0}, lopts);
  const int64_t max_keep = R > 0 ? keep.max().item<int64_t>() : 0;
  const int64_t rounds = (max_keep + kK - 1) / kK;
  if (R > 0 && M > 0 && (rounds > 0 || fine)) {
    const at::Tensor xq = vec_ready(x.index_select(0, rows));
    const at::Tensor yv = vec_ready(y);
    const int64_t d = xq.size(1);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int64_t nrb = (R + kBM - 1) / kBM, ntiles = (M + kBN - 1) / kBN;
    const auto [nsplit, tps] = plan_splits(nrb, ntiles);
    at::Tensor part = at::empty({rounds > 0 ? nsplit * R * kK : 1}, lopts);
    at::Tensor bound = at::empty({R}, lopts);
    at::Tensor vals = at::empty({R * kK}, x.options().dtype(at::kFloat));
    at::Tensor idx = at::empty({R * kK}, lopts);
    auto* part_p = reinterpret_cast<uint64_t*>(part.data_ptr<int64_t>());
    auto* bound_p = reinterpret_cast<uint64_t*>(bound.data_ptr<int64_t>());
    auto* hist_p = fine ? reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()) : nullptr;
    auto* cls_p = opis && n_cls > 0 ? reinterpret_cast<unsigned long long*>(cls_hist.data_ptr<int64_t>()) : nullptr;
    for (int64_t rd = 0; rd < std::max<int64_t>(rounds, 1); ++rd) {
      FLASHDML_CUDA_DTYPE_DISPATCH(x.scalar_type(), "metrics_pass", [&] {
        auto* kernel = &metrics_pass_kernel<typename DeviceType<scalar_t>::type>;
        const int lg = rd == 0 && fine ? hash_log2(reinterpret_cast<const void*>(kernel)) : 0;
        kernel<<<dim3(unsigned(nrb), unsigned(nsplit)), kThreads, hash_table_bytes(lg), stream>>>(
                dptr<scalar_t>(xq), R, dptr<scalar_t>(yv), M, d, tps, rows.data_ptr<int64_t>(),
                keep.data_ptr<int64_t>(), row_cls.data_ptr<int32_t>(), col_cls.data_ptr<int32_t>(), cls_first,
                self_mode, shift, opis_bins, int(rd), rd > 0 ? bound_p : nullptr, rounds > 0 ? part_p : nullptr,
                rd == 0 ? hist_p : nullptr, rd == 0 ? cls_p : nullptr, lg);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      if (rounds == 0) break;
      sel::knn_merge_kernel<<<unsigned((R + sel::kMergeRows - 1) / sel::kMergeRows), sel::kMergeRows, 0, stream>>>(
          part_p, R, int(nsplit), kK, 0, kK, vals.data_ptr<float>(), idx.data_ptr<int64_t>(),
          rd + 1 < rounds ? bound_p : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t n = R * kK;
      metrics_scatter_kernel<<<unsigned(std::min<int64_t>((n + 255) / 256, 4096)), 256, 0, stream>>>(
          vals.data_ptr<float>(), idx.data_ptr<int64_t>(), R, offsets.data_ptr<int64_t>(), keep.data_ptr<int64_t>(),
          int(rd), out_val.data_ptr<float>(), out_idx.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // an empty list slot (packed_col(kNoKey) = 2^32 - 1) taken: a row ran out of (finite) candidates
    TORCH_CHECK(total == 0 || !(out_idx >= M).any().item<bool>(),
                "metrics_pass: fewer candidates than keep (non-finite similarities?)");
  }
  at::Tensor class_pos = cls_hist.select(1, 0).clone(at::MemoryFormat::Contiguous);
  at::Tensor class_neg = cls_hist.select(1, 1).clone(at::MemoryFormat::Contiguous);
  return {offsets, out_idx, out_val, hist, class_pos, class_neg};
}

}  // namespace
}  // namespace cuda
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CUDA, m) { m.impl("metrics_pass", &flashdml::cuda::metrics_pass_cuda); }
