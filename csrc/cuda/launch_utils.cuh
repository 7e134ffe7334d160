// Host-side launch helpers shared by every CUDA op file (csrc/cuda/*.cu): the ATen -> CUDA dtype map, typed
// device pointers, the column-split plan, the 16-byte vector-load preparation of row tensors, and the dtype
// switch. Kernels themselves live in the *_kernels.cuh headers; per-element math in csrc/include/flashdml/.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <utility>

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
