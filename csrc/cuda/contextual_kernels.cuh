// Device kernel of the contextual-loss CUDA backend (docs/spec.md §2.5): the neighbour-list pass. Host wrappers, the sparse
// stage (ATen ops on the device) and registration live in contextual.cu. ATen-free, so the emulation harness
// (tests/cuda_emulation/contextual_driver.cpp) compiles it. Per-element rules: flashdml/contextual.h; tiles:
// tile_gemm.cuh, pair_tiles.cuh. The thresholds t_i / h_i come from the kNN kernels (selection_kernels.cuh), which
// compute every tile with the same s_tile_rect call, so this pass sees bitwise the S values they ranked.
#pragma once

#include <cstdint>

#include "flashdml/common.h"
#include "flashdml/contextual.h"
#include "pair_tiles.cuh"
#include "tile_gemm.cuh"

namespace flashdml {
namespace cuda {
namespace ctxk {

using pair::s_tile_rect;

constexpr int kCols = kBN / 4;  // columns of a tile per thread: thread t has row t % 64, columns 16 (t / 64) ..

// ---- ctx_list_kernel ---------------------------------------------------------------------------------------
// grid (ceil(na / 64), nsplit), 256 threads; block (rb, sp): rows 64 rb .. of Xa (na rows: the batch itself, or a
// gathered copy of the rows that overflowed, `rows` mapping them to batch indices; nullptr = identity) against the
// column tiles tps sp .. tps (sp + 1) - 1 of X (B rows). Row lr is batch row i = rows[lr]; u = fl(−D + eps) with
// −D = ctx_neg_distance(s); j ∈ N(i) iff u >= thr[2 i] (t_i), with flag kCtxInP iff u >= thr[2 i + 1] (h_i) and
// kCtxClamped iff −D == 0. Per tile the four threads of a row count their members, a prefix over the four (shared
// memory) gives each its slots, and the members go to col / flag[(lr nsplit + sp) cap + slot] for slot < cap in
// ascending column order; cnt[lr nsplit + sp] = |N(i) ∩ the split's columns| (all of it, also past cap: the host
// reruns such rows with a larger cap). The host concatenates a row's split lists in split order (= ascending
// columns), so the lists do not depend on nsplit. Shared memory: staging + St + 1 KiB of counts.
template <typename T, bool kTF32 = false>
__global__ void __launch_bounds__(kThreads, 2)
    ctx_list_kernel(const T* __restrict__ Xa, int64_t na, const int64_t* __restrict__ rows, const T* __restrict__ X,
                    int64_t B, int64_t d, const float* __restrict__ thr, float eps, int64_t cap, int64_t tps,
                    int32_t* __restrict__ col, uint8_t* __restrict__ flag, int32_t* __restrict__ cnt) {
  using C = TileCfg<T>;
  constexpr int kOffY = C::kStageBytes;
  constexpr int kOffS = 2 * C::kStageBytes;
  constexpr int kOffC = kOffS + kBN * kLdS * 4;
  constexpr int kBytes = kOffC + 4 * kBM * 4;
  __shared__ __align__(128) unsigned char smem[kBytes];
  float* St = reinterpret_cast<float*>(smem + kOffS);
  int* part = reinterpret_cast<int*>(smem + kOffC);

  const int t = threadIdx.x;
  const int r = t % kBM, q = t / kBM;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t lr = row0 + r;
  const bool ok = lr < na;
  const int64_t gi = ok ? (rows != nullptr ? rows[lr] : lr) : 0;
  const float ti = ok ? thr[2 * gi] : 0.f, hi = ok ? thr[2 * gi + 1] : 0.f;
  const int64_t ntiles = (B + kBN - 1) / kBN;
  const int64_t t_lo = int64_t(blockIdx.y) * tps;
  const int64_t t_hi = t_lo + tps < ntiles ? t_lo + tps : ntiles;
  const int64_t at = lr * int64_t(gridDim.y) + blockIdx.y;  // (row, split) of the [na, nsplit] counts / lists
  int64_t n = 0;  // members so far (the same in the row's four threads)
  for (int64_t tile = t_lo; tile < t_hi; ++tile) {
    const int64_t col0 = tile * kBN;
    __syncthreads();  // the previous tile's St and counts are consumed
    s_tile_rect<T, kTF32>(Xa, na, X, B, d, row0, col0, smem, smem + kOffY, St);
    __syncthreads();
    const int ncols = ok ? (B - col0 < kBN ? int(B - col0) : kBN) : 0;
    unsigned members = 0;
    int mine = 0;
#pragma unroll
    for (int cc = 0; cc < kCols; ++cc) {
      const int c = q * kCols + cc;
      const float u = ctx_band_value(ctx_neg_distance(St[c * kLdS + r]), eps);
      const bool in = c < ncols && u >= ti;
      members |= in ? 1u << cc : 0u;
      mine += in ? 1 : 0;
    }
    part[q * kBM + r] = mine;
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int v = part[w * kBM + r];
      before += w < q ? v : 0;
      total += v;
    }
    int64_t slot = n + before;
    for (int cc = 0; cc < kCols; ++cc) {
      if (!((members >> cc) & 1u)) continue;
      const int c = q * kCols + cc;
      if (slot < cap) {
        const float nd = ctx_neg_distance(St[c * kLdS + r]);
        const float u = ctx_band_value(nd, eps);
        col[at * cap + slot] = int32_t(col0 + c);
        flag[at * cap + slot] = uint8_t((u >= hi ? kCtxInP : 0) | (ctx_clamped(nd) ? kCtxClamped : 0));
      }
      ++slot;
    }
    n += total;
  }
  if (ok && q == 0) cnt[at] = int32_t(n);
}

}  // namespace ctxk
}  // namespace cuda
}  // namespace flashdml
