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

// ---- block-private histogram counts -----------------------------------------------------------------------
// The fine histogram (2 x 2^16 counters) does not fit a block's shared memory, so a block counts its pairs in an
// open-addressing hash table there instead (dynamic shared memory: keys[cap], counts[cap], one fill counter; cap
// = 2^log2cap, chosen by the host from the device's shared memory) and adds each used slot's count to global memory
// once per flush: the global atomics per flush are the number of distinct keys, not of pairs. Keys (32 bit):
//   hist index (same ? 0 : 2^16) + bin                    (< 2^17, top bit clear)
//   kClsKey | (index into cls - the block's first class row) (the block's rows span at most 64 classes; a block
//                                                             whose class rows would not fit 31 bits skips the table)
// A key is inserted with a shared atomicCAS at one of kHashProbes consecutive slots after its hash; when all of them
// hold other keys, the pair's count goes straight to the global atomic (as without the table). So the totals are
// exact whatever the data: every pair adds 1 either to a slot (later flushed once) or to global memory, and integer
// sums do not depend on the order. The table is flushed (each used slot -> one global atomicAdd of its count, then
// cleared) after a tile that leaves it more than half full, every kHashFlushTiles tiles (a slot gets at most 4096
// per tile: its 32-bit count cannot wrap) and at the block's end.
constexpr uint32_t kHashEmpty = 0xffffffffu;
constexpr uint32_t kClsKey = 0x80000000u;
constexpr int kHashProbes = 8;
constexpr int kHashMinLog2 = 8, kHashMaxLog2 = 13;  // the host's range: 256 .. 8192 slots (2 .. 64 KiB)
constexpr int64_t kHashFlushTiles = int64_t(1) << 19;

// Dynamic shared memory of a table with 2^log2cap slots (log2cap <= 0: no table).
FLASHDML_HD constexpr int hash_table_bytes(int log2cap) { return log2cap > 0 ? (8 << log2cap) + 16 : 0; }

struct BlockCounts {
  uint32_t* keys;
  uint32_t* counts;
  uint32_t* used;  // slots claimed before this tile since the last flush (each thread adds its claims per tile)
  int log2cap;     // 0: no table, every count is a global atomic
  unsigned long long* hist;
  unsigned long long* cls;  // cls + the block's first class row (nullptr without OPIS)
  bool cls_keys;            // the block's class offsets fit a key

  __device__ __forceinline__ void global_add(uint32_t key, unsigned long long n) const {
    atomicAdd((key & kClsKey) != 0 ? cls + (key & ~kClsKey) : hist + key, n);
  }
  // Adds 1 to the slot of `key`; false when its probe window is full of other keys. A slot this thread claims
  // counts in `claimed` (added to *used once per tile, not one shared atomic on one word per new key).
  __device__ __forceinline__ bool insert(uint32_t key, uint32_t& claimed) const {
    const uint32_t mask = (1u << log2cap) - 1u;
    const uint32_t h = ((key ^ (key >> 15)) * 0x9E3779B1u) >> (32 - log2cap);
    for (int p = 0; p < kHashProbes; ++p) {
      const uint32_t slot = (h + uint32_t(p)) & mask;
      uint32_t k = *reinterpret_cast<volatile uint32_t*>(keys + slot);  // slots only go empty -> key until a flush
      if (k == kHashEmpty) {
        k = atomicCAS(keys + slot, kHashEmpty, key);
        if (k == kHashEmpty) {
          ++claimed;
          k = key;
        }
      }
      if (k == key) {
        atomicAdd(counts + slot, 1u);
        return true;
      }
    }
    return false;
  }
  __device__ __forceinline__ void add(uint32_t key, uint32_t& claimed) const {
    if (log2cap <= 0 || !insert(key, claimed)) global_add(key, 1ull);
  }
  // one count of cls[off] (off relative to the block's first class row)
  __device__ __forceinline__ void add_cls(int64_t off, uint32_t& claimed) const {
    if (cls_keys) add(kClsKey | uint32_t(off), claimed);
    else atomicAdd(cls + off, 1ull);
  }
  // Every thread of the block: slots t, t + kThreads, .. to global memory, cleared. The caller syncs before (the
  // inserts are done) and after (before the table is used again) and resets *used.
  __device__ __forceinline__ void flush(int t) const {
    for (int s = t; s < (1 << log2cap); s += kThreads) {
      const uint32_t k = keys[s];
      if (k != kHashEmpty) {
        global_add(k, counts[s]);
        keys[s] = kHashEmpty;
        counts[s] = 0;
      }
    }
  }
};

// ---- metrics_pass_kernel -----------------------------------------------------------------------------------
// grid (ceil(R / 64), nsplit), 256 threads; block (rb, s): query rows 64 rb .. (Xq = x[rows], gathered on the host;
// rows[] gives each one's index i in x) against the reference tiles of split s. Thread t owns query row t % 64 and
// the 16 tile columns 16 (t / 64) ...
//  * round 0 with `hist` (nullable): per pair, hist[(same ? 0 : 2^16) + bin] += 1 (self mode: j > i only); with
//    `cls` (nullable): cls[(row_cls - cls_first) 2 bins + (same ? 0 : bins) + (bin >> shift)] += 1 for the
//    positives j > i and every negative (integer counts: deterministic). With log2cap > 0 the counts gather in
//    the block's hash table (BlockCounts, dynamic shared memory of hash_table_bytes(log2cap)) and reach global
//    memory once per key and flush; log2cap = 0 (no dynamic shared memory): one global atomic per count.
//  * with `part` (nullable): rows with keep > round kK keep their kK largest keys (pack_key; NaN and, in self mode,
//    (i, i) are no candidates; with `bound`, only keys < bound[r]) in shared memory — the four threads of a row
//    insert one after another — and part[(s R + r) kK + j] = the list, descending (kNoKey where fewer). A block
//    none of whose rows needs anything skips the tiles (and still writes its empty lists).
// Shared memory: staging + St + lists + 64 column classes + flag = 44292 B (fp16 / bf16), 42756 B (fp32), static,
// plus the table's dynamic shared memory (ptxas, sm_80: 112 / 110 / 106 registers for fp16 / bf16 / fp32 under
// (256, 2); sm_90: 116 / 114 / 105; no spills, no stack).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    metrics_pass_kernel(const T* __restrict__ Xq, int64_t R, const T* __restrict__ Y, int64_t M, int64_t d,
                        int64_t tiles_per_split, const int64_t* __restrict__ rows, const int64_t* __restrict__ keep,
                        const int32_t* __restrict__ row_cls, const int32_t* __restrict__ col_cls, int32_t cls_first,
                        bool self_mode, int shift, int64_t bins, int round, const uint64_t* __restrict__ bound,
                        uint64_t* __restrict__ part, unsigned long long* __restrict__ hist,
                        unsigned long long* __restrict__ cls, int log2cap) {
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
#ifdef FLASHDML_EMULATION
  unsigned char* dyn = flashdml_emu_dynamic_smem();  // tests/cuda_emulation/emu.h
#else
  extern __shared__ __align__(16) unsigned char dyn[];
#endif

  const int t = threadIdx.x;
  const int r = t % kBM, q = t / kBM;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t rq = row0 + r;
  const bool in = rq < R;
  const int64_t gi = in ? rows[rq] : -1;
  const int32_t ci = in ? row_cls[rq] : -1;  // -1: the label is absent among the references (matches nothing)
  const bool topk = part != nullptr && in && keep[rq] > int64_t(round) * kK;
  const uint64_t ub = bound != nullptr && in ? bound[rq] : ~uint64_t(0);
  // the block's rows are sorted by class (with cls): its class rows are cls_lo .. cls_hi
  const int64_t cls_lo = cls != nullptr ? int64_t(row_cls[row0]) : 0;
  const int64_t cls_hi = cls != nullptr ? int64_t(row_cls[row0 + kBM <= R ? row0 + kBM - 1 : R - 1]) : 0;
  const int64_t cls_row = (int64_t(ci) - cls_lo) * 2 * bins;  // relative to the block's first class row
  const int lg = hist != nullptr ? log2cap : 0;
  const BlockCounts tab{reinterpret_cast<uint32_t*>(dyn), reinterpret_cast<uint32_t*>(dyn) + (lg > 0 ? 1 << lg : 0),
                        reinterpret_cast<uint32_t*>(dyn) + (lg > 0 ? 2 << lg : 0), lg, hist,
                        cls != nullptr ? cls + (cls_lo - cls_first) * 2 * bins : nullptr,
                        (cls_hi - cls_lo + 1) * 2 * bins < int64_t(kClsKey) - 1};
  for (int s = t; s < (lg > 0 ? 1 << lg : 0); s += kThreads) {
    tab.keys[s] = kHashEmpty;
    tab.counts[s] = 0;
  }
  if (t == 0 && lg > 0) *tab.used = 0;
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
  int64_t unflushed = 0;  // tiles counted since the table's last flush
  uint32_t claimed = 0;   // table slots this thread claimed in the current tile
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
        if (!self_mode || j > gi) tab.add(uint32_t((same ? 0 : kSimBins) + b), claimed);
        if (cls != nullptr && (!same || j > gi))
          tab.add_cls(cls_row + (same ? 0 : bins) + coarse_bin(b, shift), claimed);
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
    if (lg > 0) {
      if (claimed != 0) atomicAdd(tab.used, claimed);
      claimed = 0;
      __syncthreads();  // the tile's inserts are done; *used is final
      if (*tab.used > (1u << (lg - 1)) || ++unflushed == kHashFlushTiles) {  // uniform over the block
        tab.flush(t);
        unflushed = 0;
        __syncthreads();  // every thread has read *used and flushed its slots
        if (t == 0) *tab.used = 0;
      }
    }
  }
  __syncthreads();
  if (lg > 0 && *tab.used != 0) tab.flush(t);
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
