// Device kernels of the selection CUDA backend: kNN (docs/spec.md §1.2) and batch-wide hardest negatives (docs/spec.md §1.3). Host
// wrappers and registration live in selection.cu (see there for the pipeline). ATen-free, so the emulation harness
// compiles it. Keys, list insertion and the radix bin choice: flashdml/topk_select.h; tiles: tile_gemm.cuh,
// pair_tiles.cuh (every pass computes the tile of x rows I and y rows J with the same s_tile_rect call, so all
// passes see bitwise the same fp32 values).
#pragma once

#include <cstdint>

#include "flashdml/common.h"
#include "flashdml/topk_select.h"
#include "pair_tiles.cuh"
#include "tile_gemm.cuh"

namespace flashdml {
namespace cuda {
namespace sel {

using pair::s_tile_rect;

constexpr int kK = 32;            // list length of one kNN round (k > 32: rounds below the previous round's key)
constexpr int kCols = kBN / 4;    // columns of a tile per thread: thread t has row t % 64, columns 16 (t / 64) ..
constexpr int kNBins = 2048;      // radix-select histogram (11 + 11 + 10 bits)
constexpr int kMergeRows = 64;    // rows per block of knn_merge_kernel

// ---- knn_partial_kernel ------------------------------------------------------------------------------------
// grid (ceil(B / 64), nsplit), 256 threads; block (rb, s): x rows 64 rb .. against the y tiles of split s. Each
// row keeps its kK largest keys (pack_key) in shared memory; per tile the four threads of a row insert their
// candidates one after another (barrier between them). With `bound` only keys < bound[row] are candidates.
// part[(s B + row) kK + j] = the row's list, descending (kNoKey where the split has fewer candidates).
// Shared memory: staging + St + lists = 43776 B (fp16 / bf16), 42240 B (fp32), static.
template <typename T, bool kTF32 = false>
__global__ void __launch_bounds__(kThreads, 2)
    knn_partial_kernel(const T* __restrict__ X, const T* __restrict__ Y, int64_t B, int64_t M, int64_t d,
                       int64_t tiles_per_split, bool exclude_diag, const uint64_t* __restrict__ bound,
                       uint64_t* __restrict__ part) {
  using C = TileCfg<T>;
  constexpr int kOffY = C::kStageBytes;
  constexpr int kOffS = 2 * C::kStageBytes;
  constexpr int kOffL = kOffS + kBN * kLdS * 4;
  constexpr int kBytes = kOffL + kBM * kK * 8;
  __shared__ __align__(128) unsigned char smem[kBytes];
  float* St = reinterpret_cast<float*>(smem + kOffS);
  uint64_t* lists = reinterpret_cast<uint64_t*>(smem + kOffL);

  const int t = threadIdx.x;
  const int r = t % kBM, q = t / kBM;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t gi = row0 + r;
  const uint64_t ub = bound != nullptr && gi < B ? bound[gi] : ~uint64_t(0);
  uint64_t* list = lists + r * kK;
  for (int j = q; j < kK; j += kThreads / kBM) list[j] = kNoKey;
  const int64_t ntiles = (M + kBN - 1) / kBN;
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = tile_begin + tiles_per_split < ntiles ? tile_begin + tiles_per_split : ntiles;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t col0 = tile * kBN;
    __syncthreads();  // the previous tile's St is consumed, the lists are initialised
    s_tile_rect<T, kTF32>(X, B, Y, M, d, row0, col0, smem, smem + kOffY, St);
    __syncthreads();
    const int ncols = gi < B ? (M - col0 < kBN ? int(M - col0) : kBN) : 0;
    for (int p = 0; p < kThreads / kBM; ++p) {
      if (p == q) {
        for (int cc = 0; cc < kCols; ++cc) {
          const int c = q * kCols + cc;
          const int64_t col = col0 + c;
          if (c < ncols && !(exclude_diag && col == gi)) {
            const uint64_t key = pack_key(St[c * kLdS + r], uint32_t(col));
            if (key < ub) topk_insert(list, kK, key);
          }
        }
      }
      __syncthreads();
    }
  }
  __syncthreads();
  if (gi < B) {
    uint64_t* out = part + (int64_t(blockIdx.y) * B + gi) * kK;
    for (int j = q; j < kK; j += kThreads / kBM) out[j] = list[j];
  }
}

// ---- knn_merge_kernel --------------------------------------------------------------------------------------
// grid ceil(B / 64), 64 threads, one row each: merges the nsplit lists in split order into one list of kK keys
// (each split's list is sorted, so its insertion stops at the first key that does not make it), writes the first
// n_take at columns col_off .. of values / indices [B, k_total]; bound_out (nullable) = the row's kK-th key.
static __global__ void __launch_bounds__(kMergeRows, 1)
    knn_merge_kernel(const uint64_t* __restrict__ part, int64_t B, int nsplit, int64_t k_total, int64_t col_off,
                     int n_take, float* __restrict__ values, int64_t* __restrict__ indices,
                     uint64_t* __restrict__ bound_out) {
  __shared__ uint64_t lists[kMergeRows * kK];
  const int t = threadIdx.x;
  const int64_t gi = int64_t(blockIdx.x) * kMergeRows + t;
  if (gi >= B) return;
  uint64_t* list = lists + t * kK;
  for (int j = 0; j < kK; ++j) list[j] = kNoKey;
  for (int s = 0; s < nsplit; ++s) {
    const uint64_t* src = part + (int64_t(s) * B + gi) * kK;
    for (int j = 0; j < kK; ++j) {
      const uint64_t key = src[j];
      if (key <= list[kK - 1]) break;
      topk_insert(list, kK, key);
    }
  }
  for (int j = 0; j < n_take; ++j) {
    values[gi * k_total + col_off + j] = packed_value(list[j]);
    indices[gi * k_total + col_off + j] = packed_col(list[j]);
  }
  if (bound_out != nullptr) bound_out[gi] = list[kK - 1];
}

// ---- hn_pass_kernel ----------------------------------------------------------------------------------------
// grid (ceil(B / 64), nsplit), 256 threads; block (rb, s): the negatives (labels differ; self_mode drops (i, i))
// of x rows 64 rb .. against the y tiles of split s, key = order_key(S).
//  kPass 0 (histogram): hist[(key >> bin_shift) & (2^(match_shift - bin_shift) - 1)] += 1 over the keys with
//    key >> match_shift == state[0] (shared-memory histogram, flushed with integer atomics: deterministic).
//  kPass 1 (count): cnt[(c B + row) nsplit + s] = the row's negatives in the split with key > T (c = 0) and
//    == T (c = 1), T = state[0].
//  kPass 2 (collect): each key > T goes to slot base[(0 B + row) nsplit + s] + (its rank among the row's keys > T
//    in the split, in column order); each key == T with rank e = base[(1 B + row) nsplit + s] + (rank) < state[3]
//    goes to slot state[2] + e. values[slot] = S, flat[slot] = row M + col. A key > T whose slot would reach
//    state[2] is not written: every store stays below k = state[2] + state[3].
// Shared memory: staging + St + 64 column labels + (pass 0) 2048-bin histogram + 2 x 256 int64 rank counts:
// at most 40448 B (fp16 / bf16 histogram pass), static.
template <typename T, int kPass, bool kTF32 = false>
__global__ void __launch_bounds__(kThreads, 2)
    hn_pass_kernel(const T* __restrict__ X, const T* __restrict__ Y, const int64_t* __restrict__ lab_x,
                   const int64_t* __restrict__ lab_y, int64_t B, int64_t M, int64_t d, int64_t tiles_per_split,
                   int nsplit, bool self_mode, int bin_shift, int match_shift, const int64_t* __restrict__ state,
                   unsigned long long* __restrict__ hist, int64_t* __restrict__ cnt, const int64_t* __restrict__ base,
                   float* __restrict__ values, int64_t* __restrict__ flat) {
  using C = TileCfg<T>;
  constexpr int kOffY = C::kStageBytes;
  constexpr int kOffS = 2 * C::kStageBytes;
  constexpr int kOffLab = kOffS + kBN * kLdS * 4;
  constexpr int kOffH = kOffLab + kBN * 8;
  constexpr int kOffR = kOffH + (kPass == 0 ? kNBins * 4 : 0);
  constexpr int kBytes = kOffR + 2 * kThreads * 8;
  __shared__ __align__(128) unsigned char smem[kBytes];
  float* St = reinterpret_cast<float*>(smem + kOffS);
  int64_t* lab_c = reinterpret_cast<int64_t*>(smem + kOffLab);
  unsigned* sh_hist = reinterpret_cast<unsigned*>(smem + kOffH);
  int64_t* rank_gt = reinterpret_cast<int64_t*>(smem + kOffR);  // [4][64]
  int64_t* rank_eq = rank_gt + kThreads;

  const int t = threadIdx.x;
  const int r = t % kBM, q = t / kBM;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t gi = row0 + r;
  const int64_t lab_i = gi < B ? lab_x[gi] : 0;
  const uint64_t thr = uint64_t(state[0]);
  const uint32_t bin_mask = (1u << (match_shift - bin_shift)) - 1u;
  if constexpr (kPass == 0) {
    for (int b = t; b < kNBins; b += kThreads) sh_hist[b] = 0u;
  }
  const int64_t cell = (gi * nsplit) + blockIdx.y;
  int64_t n_gt = 0, n_eq = 0;  // pass 1: counts; pass 2: running ranks
  int64_t slot_eq0 = 0, r_eq = 0;
  if constexpr (kPass == 2) {
    if (gi < B) {
      n_gt = base[cell];
      n_eq = base[B * nsplit + cell];
    }
    slot_eq0 = state[2];
    r_eq = state[3];
  }
  const int64_t ntiles = (M + kBN - 1) / kBN;
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = tile_begin + tiles_per_split < ntiles ? tile_begin + tiles_per_split : ntiles;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t col0 = tile * kBN;
    __syncthreads();  // the previous tile's St, lab_c and rank counts are consumed
    if (t < kBN) lab_c[t] = col0 + t < M ? lab_y[col0 + t] : 0;
    s_tile_rect<T, kTF32>(X, B, Y, M, d, row0, col0, smem, smem + kOffY, St);
    __syncthreads();
    const int ncols = gi < B ? (M - col0 < kBN ? int(M - col0) : kBN) : 0;
    int my_gt = 0, my_eq = 0;
    for (int cc = 0; cc < kCols; ++cc) {
      const int c = q * kCols + cc;
      if (c < ncols && lab_c[c] != lab_i && !(self_mode && col0 + c == gi)) {
        const uint64_t key = order_key(St[c * kLdS + r]);
        if constexpr (kPass == 0) {
          if ((key >> match_shift) == thr) atomicAdd(sh_hist + (uint32_t(key >> bin_shift) & bin_mask), 1u);
        } else {
          my_gt += key > thr ? 1 : 0;
          my_eq += key == thr ? 1 : 0;
        }
      }
    }
    if constexpr (kPass == 1) {
      n_gt += my_gt;
      n_eq += my_eq;
    }
    if constexpr (kPass == 2) {
      rank_gt[q * kBM + r] = my_gt;
      rank_eq[q * kBM + r] = my_eq;
      __syncthreads();
      int64_t at_gt = n_gt, at_eq = n_eq;
      for (int p = 0; p < kThreads / kBM; ++p) {
        const int64_t g = rank_gt[p * kBM + r], e = rank_eq[p * kBM + r];
        if (p < q) {
          at_gt += g;
          at_eq += e;
        }
        n_gt += g;
        n_eq += e;
      }
      if (my_gt + my_eq > 0) {
        for (int cc = 0; cc < kCols; ++cc) {
          const int c = q * kCols + cc;
          if (c < ncols && lab_c[c] != lab_i && !(self_mode && col0 + c == gi)) {
            const float s = St[c * kLdS + r];
            const uint64_t key = order_key(s);
            int64_t slot = -1;
            if (key > thr) {
              // keys > T own slots [0, state[2]), keys == T [state[2], state[2] + state[3]) = [.., k): bounded
              // stores, so a pass whose S disagreed with the count pass's drops entries instead of writing past k
              if (at_gt < slot_eq0) slot = at_gt;
              ++at_gt;
            } else if (key == thr) {
              if (at_eq < r_eq) slot = slot_eq0 + at_eq;
              ++at_eq;
            }
            if (slot >= 0) {
              values[slot] = s == 0.f ? 0.f : s;
              flat[slot] = gi * M + col0 + c;
            }
          }
        }
      }
    }
  }
  __syncthreads();
  if constexpr (kPass == 0) {
    for (int b = t; b < kNBins; b += kThreads) {
      if (sh_hist[b] != 0u) atomicAdd(hist + b, static_cast<unsigned long long>(sh_hist[b]));
    }
  }
  if constexpr (kPass == 1) {
    rank_gt[q * kBM + r] = n_gt;
    rank_eq[q * kBM + r] = n_eq;
    __syncthreads();
    if (q == 0 && gi < B) {
      int64_t g = 0, e = 0;
      for (int p = 0; p < kThreads / kBM; ++p) {
        g += rank_gt[p * kBM + r];
        e += rank_eq[p * kBM + r];
      }
      cnt[cell] = g;
      cnt[B * nsplit + cell] = e;
    }
  }
}

// ---- hn_select_kernel --------------------------------------------------------------------------------------
// One thread, after a histogram pass over bins of `width` bits: state[0] = (state[0] << width) | b and
// state[1] = keys of bin b still needed, b = the bin of the state[1]-th largest key; then state[2] = k - state[1]
// (keys above the bin) and state[3] = state[1]. After the last pass state[0] is the exact k-th key T, state[2]
// the number of keys > T and state[3] the number of keys == T that belong to the top k.
static __global__ void __launch_bounds__(32, 1)
    hn_select_kernel(const unsigned long long* __restrict__ hist, int width, int64_t k, int64_t* __restrict__ state) {
  if (threadIdx.x != 0) return;
  int64_t need_in_bin = 0;
  const int b = radix_select_bin(hist, kNBins, state[1], &need_in_bin);
  state[0] = (state[0] << width) | b;
  state[1] = need_in_bin;
  state[2] = k - need_in_bin;
  state[3] = need_in_bin;
}

}  // namespace sel
}  // namespace cuda
}  // namespace flashdml
