// Host-side launch helpers shared by every CUDA op file (csrc/cuda/*.cu): the ATen -> CUDA dtype map, typed
// device pointers, the column-split plan, the 16-byte vector-load preparation of row tensors, and the dtype
// switch. Kernels themselves live in the *_kernels.cuh headers; per-element math in csrc/include/flashdml/.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "flashdml/tf32.h"

namespace flashdml {
namespace cuda {

// At most this many column splits per row block (each split writes one partial that a later kernel reduces).
constexpr int kMaxSplits = 16;

template <typename T>
struct DeviceType;
template <>
struct DeviceType<float> {
  using type = float;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
inline const typename DeviceType<T>::type* dptr(const at::Tensor& t) {
  return reinterpret_cast<const typename DeviceType<T>::type*>(t.data_ptr<T>());
}

// The S-tile kernels' kTF32 template argument for rows of DT when an op call decided `tf32`
// (fp32_matmul_tf32_opted_in, read once per call so every pass of it sees the same S): only fp32 has a TF32
// flavour, so for fp16 / bf16 both choices name the one instantiation, `tf32 ? k<DT, kTf32Able<DT>> : k<DT, false>`.
template <typename DT>
constexpr bool kTf32Able = std::is_same_v<DT, float>;

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Column splits: enough blocks for ~2 waves of 1 block / SM, at most kMaxSplits, no empty split.
// Returns (number of splits, column tiles per split).
inline std::pair<int64_t, int64_t> plan_splits(int64_t other_blocks, int64_t ntiles) {
  int64_t want = (2 * int64_t(sm_count()) + other_blocks - 1) / other_blocks;
  want = std::max<int64_t>(1, std::min<int64_t>({want, ntiles, int64_t(kMaxSplits)}));
  const int64_t tps = (ntiles + want - 1) / want;
  return {(ntiles + tps - 1) / tps, tps};
}

// Rows 16-byte aligned with d a multiple of the vector width (4 fp32 / 8 fp16 or bf16), as the vector-load
// kernels (pair_tiles.cuh) require; anything else becomes a fresh zero-padded copy (zero columns leave S as it is).
inline at::Tensor vec_ready(const at::Tensor& t) {
  const int64_t vw = t.scalar_type() == at::kFloat ? 4 : 8, d = t.size(1), dp = (d + vw - 1) / vw * vw;
  if (dp == d && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0) return t;
  return dp == d ? t.clone() : at::constant_pad_nd(t, {0, dp - d});
}

// The checks every pair-tile op makes of its row tensors x [B, d], y [M, d]: CUDA tensors on one device, non-empty,
// one dtype of fp32 / fp16 / bf16, and B, M at most INT_MAX blocks of block_rows rows (the grid's x dimension).
inline void check_row_tensors(const char* op, const at::Tensor& x, const at::Tensor& y, int64_t block_rows) {
  TORCH_CHECK(x.is_cuda() && y.device() == x.device(), op, ": x and y must be CUDA tensors on one device");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1), op, ": x [B, d] and y [M, d] expected");
  TORCH_CHECK(x.size(0) > 0 && y.size(0) > 0 && x.size(1) > 0, op, ": empty input");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), op, ": x and y must have the same dtype");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": dtype must be fp32, fp16 or bf16");
  const int64_t max_rows = int64_t(INT_MAX) * block_rows;
  TORCH_CHECK(x.size(0) <= max_rows && y.size(0) <= max_rows, op, ": batch too large");
}

// labels (name: "labels" [B] or "ref_labels" [M]) must be int64 [n] on the device of x.
inline void check_label_tensor(const char* op, const char* name, const char* dim, const at::Tensor& labels,
                               int64_t n, const at::Tensor& x) {
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == n &&
                  labels.device() == x.device(),
              op, ": ", name, " must be int64 [", dim, "] on the device of x");
}

}  // namespace cuda
}  // namespace flashdml

// Runs the lambda-like body with `scalar_t` bound to the ATen type of st (fp32, fp16 or bf16); `op` names the
// operator in the error for any other dtype.
#define FLASHDML_CUDA_DTYPE_DISPATCH(st, op, ...)                                  \
  switch (st) {                                                                    \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }             \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__(); break; }           \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__(); break; }   \
    default: TORCH_CHECK(false, "flashdml ", op, ": unsupported dtype ", st);      \
  }
