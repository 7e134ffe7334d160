// Device kernels of the CUDA metrics pass (docs/spec.md §3; host pipeline and registration: metrics.cu). ATen-free, so the
// emulation harness (tests/cuda_emulation/metrics_driver.cpp) compiles it. Tiles: tile_gemm.cuh / pair_tiles.cuh
// (every round computes the tile of query rows I and reference rows J with the same s_tile_rect call, so all rounds
// see bitwise the same fp32 values); keys and list insertion: flashdml/topk_select.h (the kNN kernel's scheme,
// selection_kernels.cuh, whose merge kernel finishes each round); bins: flashdml/histogram.h.
#pragma once

#include <cstdint>

#include "flashdml/common.h"
#include "flashdml/histogram.h"
#include "flashdml/topk_select.h"
#include "pair_tiles.cuh"
#include "selection_kernels.cuh"
#include "tile_gemm.cuh"

namespace flashdml {
namespace cuda {
namespace met {

using pair::s_tile_rect;
using sel::kCols;
using sel::kK;

// ---- metrics_pass_kernel -----------------------------------------------------------------------------------
// grid (ceil(R / 64), nsplit), 256 threads; block (rb, s): query rows 64 rb .. (Xq = x[rows], gathered on the host;
// rows[] gives each one's index i in x) against the reference tiles of split s. Thread t owns query row t % 64 and
// the 16 tile columns 16 (t / 64) ...
//  * round 0 with `hist` (nullable): per pair, hist[(same ? 0 : 2^16) + bin] += 1 (self mode: j > i only); with
//    `cls` (nullable): cls[(row_cls - cls_first) 2 bins + (same ? 0 : bins) + (bin >> shift)] += 1 for the
//    positives j > i and every negative (integer atomics: deterministic counts).
//  * with `part` (nullable): rows with keep > round kK keep their kK largest keys (pack_key; NaN and, in self mode,
//    (i, i) are no candidates; with `bound`, only keys < bound[r]) in shared memory — the four threads of a row
//    insert one after another — and part[(s R + r) kK + j] = the list, descending (kNoKey where fewer). A block
//    none of whose rows needs anything skips the tiles (and still writes its empty lists).
// Shared memory: staging + St + lists + 64 column classes + flag = 44292 B (fp16 / bf16), 42756 B (fp32), static
// (ptxas, sm_80: 95 / 108 / 94 registers for fp16 / bf16 / fp32 under (256, 2), no spills).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    metrics_pass_kernel(const T* __restrict__ Xq, int64_t R, const T* __restrict__ Y, int64_t M, int64_t d,
                        int64_t tiles_per_split, const int64_t* __restrict__ rows, const int64_t* __restrict__ keep,
                        const int32_t* __restrict__ row_cls, const int32_t* __restrict__ col_cls, int32_t cls_first,
                        bool self_mode, int shift, int64_t bins, int round, const uint64_t* __restrict__ bound,
                        uint64_t* __restrict__ part, unsigned long long* __restrict__ hist,
                        unsigned long long* __restrict__ cls) {
  using C = TileCfg<T>;
  constexpr int kOffY = C::kStageBytes;
  constexpr int kOffS = 2 * C::kStageBytes;
  constexpr int kOffL = kOffS + kBN * kLdS * 4;
  constexpr int kOffC = kOffL + kBM * kK * 8;
  constexpr int kBytes = kOffC + kBN * 4 + 4;
  __shared__ __align__(128) unsigned char smem[kBytes];
  float* St = reinterpret_cast<float*>(smem + kOffS);
  uint64_t* lists = reinterpret_cast<uint64_t*>(smem + kOffL);
  int32_t* cls_c = reinterpret_cast<int32_t*>(smem + kOffC);
  int* busy = reinterpret_cast<int*>(smem + kOffC + kBN * 4);

  const int t = threadIdx.x;
  const int r = t % kBM, q = t / kBM;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t rq = row0 + r;
  const bool in = rq < R;
  const int64_t gi = in ? rows[rq] : -1;
  const int32_t ci = in ? row_cls[rq] : -1;  // -1: the label is absent among the references (matches nothing)
  const bool topk = part != nullptr && in && keep[rq] > int64_t(round) * kK;
  const uint64_t ub = bound != nullptr && in ? bound[rq] : ~uint64_t(0);
  const int64_t cls_row = (int64_t(ci) - cls_first) * 2 * bins;
  uint64_t* list = lists + r * kK;
  for (int j = q; j < kK; j += kThreads / kBM) list[j] = kNoKey;
  if (t == 0) *busy = 0;
  __syncthreads();
  if (q == 0 && (topk || (hist != nullptr && in))) *busy = 1;  // same value from every writer
  __syncthreads();
  const bool run = *busy != 0;  // uniform over the block

  const int64_t ntiles = (M + kBN - 1) / kBN;
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_stop = tile_begin + tiles_per_split < ntiles ? tile_begin + tiles_per_split : ntiles;
  const int64_t tile_end = run ? tile_stop : tile_begin;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t col0 = tile * kBN;
    __syncthreads();  // the previous tile's St and cls_c are consumed
    if (t < kBN) cls_c[t] = col0 + t < M ? col_cls[col0 + t] : -2;
    s_tile_rect<T>(Xq, R, Y, M, d, row0, col0, smem, smem + kOffY, St);
    __syncthreads();
    const int ncols = in ? (M - col0 < kBN ? int(M - col0) : kBN) : 0;
    if (hist != nullptr) {
      for (int cc = 0; cc < kCols; ++cc) {
        const int c = q * kCols + cc;
        if (c >= ncols) break;
        const int64_t j = col0 + c;
        const int32_t b = similarity_bin(St[c * kLdS + r]);
        const bool same = cls_c[c] == ci;
        if (!self_mode || j > gi) atomicAdd(hist + (same ? 0 : kSimBins) + b, 1ull);
        if (cls != nullptr && (!same || j > gi))
          atomicAdd(cls + cls_row + (same ? 0 : bins) + coarse_bin(b, shift), 1ull);
      }
    }
    if (part != nullptr) {
      for (int p = 0; p < kThreads / kBM; ++p) {
        if (p == q && topk) {
          for (int cc = 0; cc < kCols; ++cc) {
            const int c = q * kCols + cc;
            const int64_t col = col0 + c;
            const float s = St[c * kLdS + r];
            if (c < ncols && s == s && !(self_mode && col == gi)) {
              const uint64_t key = pack_key(s, uint32_t(col));
              if (key < ub) topk_insert(list, kK, key);
            }
          }
        }
        __syncthreads();
      }
    }
  }
  __syncthreads();
  if (part != nullptr && in) {
    uint64_t* out = part + (int64_t(blockIdx.y) * R + rq) * kK;
    for (int j = q; j < kK; j += kThreads / kBM) out[j] = list[j];
  }
}

// ---- metrics_scatter_kernel --------------------------------------------------------------------------------
// After round `round`'s merge (values / indices [R, kK], sel::knn_merge_kernel): entry j of row r goes to
// offsets[r] + round kK + j of the ragged outputs while round kK + j < keep[r]. Grid-stride over R kK.
__global__ void metrics_scatter_kernel(const float* __restrict__ vals, const int64_t* __restrict__ idx, int64_t R,
                                       const int64_t* __restrict__ offsets, const int64_t* __restrict__ keep,
                                       int round, float* __restrict__ out_val, int64_t* __restrict__ out_idx) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < R * kK; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / kK, pos = int64_t(round) * kK + e % kK;
    if (pos < keep[r]) {
      out_val[offsets[r] + pos] = vals[e];
      out_idx[offsets[r] + pos] = idx[e];
    }
  }
}

}  // namespace met
}  // namespace cuda
}  // namespace flashdml
