// Device kernels of the hinge-pair CUDA backend: Threshold-Consistent Margin (docs/spec.md §2.3) and margin contrastive
// (docs/spec.md §2.4). Host wrappers and registration live in hinge_pair.cu (see there for the pipeline). ATen-free, so
// the emulation harness compiles it. Per-element rules: flashdml/hinge_pair.h; tiles: tile_gemm.cuh,
// pair_tiles.cuh.
#pragma once

#include <cstdint>

#include "flashdml/common.h"
#include "flashdml/hinge_pair.h"
#include "pair_tiles.cuh"
#include "tile_gemm.cuh"

namespace flashdml {
namespace cuda {
namespace hp {

using pair::s_tile_rect;

constexpr int kOneBlock = 256;           // single-block reductions
constexpr float kHingeGScale = 16384.f;  // 2^14: the larger of the two gradient magnitudes in the G tile

// Pair (i, j) of S tile value s: +1 hard positive, -1 hard negative, 0 neither (flashdml/hinge_pair.h rules;
// with drop_diagonal the pair (i, i) is neither).
__device__ __forceinline__ int hinge_kind(int64_t label_i, int64_t label_j, bool same_index, float s, float mp,
                                          float mn, bool strict, bool drop_diagonal) {
  if (label_i == label_j) return !(drop_diagonal && same_index) && hinge_hard_positive(s, mp, strict) ? 1 : 0;
  return hinge_hard_negative(s, mn, strict) ? -1 : 0;
}

// ---- hp_stats_kernel -------------------------------------------------------------------------------------
// grid (ceil(B / 64), nsplit), 256 threads; block (rb, s): x rows 64 rb .. against the y tiles of split s.
// Thread (r = t % 64, q = t / 64) tests its 16 entries of each tile; a tile's hinges are added in fp32 (<= 16
// terms: m+ - s and s - m- in fp32), then into per-thread double sums; counts are exact integers. The block's
// 256 partials are reduced by a fixed tree (in the St region) -> part_sum[2 b + {0, 1}] (double),
// part_cnt[2 b + {0, 1}] (int64), b = blockIdx.y * gridDim.x + blockIdx.x; {0, 1} = {positive, negative}.
// Shared memory: staging + St + column labels = 28160 B (fp16 / bf16), 26624 B (fp32).
template <typename T, bool kTF32 = false>
__global__ void __launch_bounds__(kThreads, 2)
    hp_stats_kernel(const T* __restrict__ X, const T* __restrict__ Y, const int64_t* __restrict__ lab_x,
                    const int64_t* __restrict__ lab_y, int64_t B, int64_t M, int64_t d, int64_t tiles_per_split,
                    float mp, float mn, bool strict, bool drop_diagonal, double* __restrict__ part_sum,
                    int64_t* __restrict__ part_cnt) {
  using C = TileCfg<T>;
  constexpr int kOffY = C::kStageBytes;
  constexpr int kOffS = 2 * C::kStageBytes;
  constexpr int kOffLab = kOffS + kBN * kLdS * 4;
  constexpr int kBytes = kOffLab + kBN * 8;
  static_assert(kThreads * 32 <= kBN * kLdS * 4, "reduction fits in St");
  __shared__ __align__(128) unsigned char smem[kBytes];
  float* St = reinterpret_cast<float*>(smem + kOffS);
  int64_t* lab_c = reinterpret_cast<int64_t*>(smem + kOffLab);

  const int t = threadIdx.x;
  const int r = t % kBM, q = t / kBM;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t gi = row0 + r;
  const int64_t lab_i = gi < B ? lab_x[gi] : 0;
  const int64_t ntiles = (M + kBN - 1) / kBN;
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = tile_begin + tiles_per_split < ntiles ? tile_begin + tiles_per_split : ntiles;

  double pos_sum = 0.0, neg_sum = 0.0;
  int64_t pos_cnt = 0, neg_cnt = 0;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t col0 = tile * kBN;
    __syncthreads();  // the previous tile's St and lab_c are consumed
    if (t < kBN) lab_c[t] = col0 + t < M ? lab_y[col0 + t] : 0;
    s_tile_rect<T, kTF32>(X, B, Y, M, d, row0, col0, smem, smem + kOffY, St);
    __syncthreads();
    const int ncols = gi < B ? (M - col0 < kBN ? int(M - col0) : kBN) : 0;
    const int cdiag = gi >= col0 && gi < col0 + kBN ? int(gi - col0) : -1;
    float ps = 0.f, ns = 0.f;
    int pc = 0, nc = 0;
#pragma unroll
    for (int cc = 0; cc < kBN / 4; ++cc) {
      const int c = q * (kBN / 4) + cc;
      if (c < ncols) {
        const float s = St[c * kLdS + r];
        const int k = hinge_kind(lab_i, lab_c[c], c == cdiag, s, mp, mn, strict, drop_diagonal);
        ps += k > 0 ? mp - s : 0.f;
        ns += k < 0 ? s - mn : 0.f;
        pc += k > 0 ? 1 : 0;
        nc += k < 0 ? 1 : 0;
      }
    }
    pos_sum += double(ps);
    neg_sum += double(ns);
    pos_cnt += pc;
    neg_cnt += nc;
  }
  __syncthreads();  // St is free: fixed-tree reduction of the 256 partials
  double* rs = reinterpret_cast<double*>(St);  // [2][256]
  int64_t* rc = reinterpret_cast<int64_t*>(rs + 2 * kThreads);
  rs[t] = pos_sum;
  rs[kThreads + t] = neg_sum;
  rc[t] = pos_cnt;
  rc[kThreads + t] = neg_cnt;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (t < w) {
      rs[t] += rs[t + w];
      rs[kThreads + t] += rs[kThreads + t + w];
      rc[t] += rc[t + w];
      rc[kThreads + t] += rc[kThreads + t + w];
    }
    __syncthreads();
  }
  if (t == 0) {
    const int64_t b = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
    part_sum[2 * b] = rs[0];
    part_sum[2 * b + 1] = rs[kThreads];
    part_cnt[2 * b] = rc[0];
    part_cnt[2 * b + 1] = rc[kThreads];
  }
}

// ---- hp_final_kernel -------------------------------------------------------------------------------------
// One block: the nblk partials in a fixed order -> sums (fp32 [2]), counts (int64 [2]) and
// loss = hinge_pair_loss(...) in double.
__global__ void __launch_bounds__(kOneBlock, 1)
    hp_final_kernel(const double* __restrict__ part_sum, const int64_t* __restrict__ part_cnt, int64_t nblk,
                    double pos_weight, double neg_weight, float* __restrict__ loss, float* __restrict__ sums,
                    int64_t* __restrict__ counts) {
  __shared__ double rs[2 * kOneBlock];
  __shared__ int64_t rc[2 * kOneBlock];
  const int t = threadIdx.x;
  double ps = 0.0, ns = 0.0;
  int64_t pc = 0, nc = 0;
  for (int64_t b = t; b < nblk; b += kOneBlock) {
    ps += part_sum[2 * b];
    ns += part_sum[2 * b + 1];
    pc += part_cnt[2 * b];
    nc += part_cnt[2 * b + 1];
  }
  rs[t] = ps;
  rs[kOneBlock + t] = ns;
  rc[t] = pc;
  rc[kOneBlock + t] = nc;
  __syncthreads();
  for (int w = kOneBlock / 2; w > 0; w /= 2) {
    if (t < w) {
      rs[t] += rs[t + w];
      rs[kOneBlock + t] += rs[kOneBlock + t + w];
      rc[t] += rc[t + w];
      rc[kOneBlock + t] += rc[kOneBlock + t + w];
    }
    __syncthreads();
  }
  if (t == 0) {
    loss[0] = static_cast<float>(hinge_pair_loss(rs[0], rc[0], rs[kOneBlock], rc[kOneBlock], pos_weight, neg_weight));
    sums[0] = static_cast<float>(rs[0]);
    sums[1] = static_cast<float>(rs[kOneBlock]);
    counts[0] = rc[0];
    counts[1] = rc[kOneBlock];
  }
}

// ---- backward ----------------------------------------------------------------------------------------------
// hp_bwd_prep_kernel (one thread): a = w+ / #hp, b = w- / #hn (hinge_term_scale; 0 for an empty set),
// m = max(|a|, |b|); w[0] = -a / m * 2^14 (weight of a hard positive in the G tile), w[1] = b / m * 2^14 (hard
// negative), w[2] = grad * m / 2^14 (applied once to the products). All 0 when a = b = 0.
__global__ void __launch_bounds__(32, 1)
    hp_bwd_prep_kernel(const int64_t* __restrict__ counts, const float* __restrict__ grad, double pos_weight,
                       double neg_weight, float* __restrict__ w) {
  if (threadIdx.x != 0) return;
  const double a = hinge_term_scale(pos_weight, counts[0]);
  const double b = hinge_term_scale(neg_weight, counts[1]);
  const double m = fmax(fabs(a), fabs(b));
  if (!(m > 0.0)) {
    w[0] = w[1] = w[2] = 0.f;
    return;
  }
  w[0] = static_cast<float>(-a / m * kHingeGScale);
  w[1] = static_cast<float>(b / m * kHingeGScale);
  w[2] = static_cast<float>(double(__ldg(grad)) * m / kHingeGScale);
}

// Weight functor of pair_grad_kernel: rows carry their label; the weight is w[0] on hard positives, w[1] on hard
// negatives, 0 elsewhere.
struct HingeOp {
  const int64_t* lab_x;
  const int64_t* lab_y;
  const float* w;  // hp_bwd_prep_kernel's scalars
  float mp, mn;
  bool strict, drop_diagonal;
  float gpos, gneg;  // set by load()
  static constexpr bool kGz = false;
  struct XInfo {
    int64_t label;
  };
  using YInfo = XInfo;
  __device__ __forceinline__ void load() {
    gpos = __ldg(w);
    gneg = __ldg(w + 1);
  }
  __device__ __forceinline__ XInfo xinfo(int64_t i) const { return {lab_x[i]}; }
  __device__ __forceinline__ YInfo yinfo(int64_t j) const { return {lab_y[j]}; }
  __device__ __forceinline__ float weight(const XInfo& a, const YInfo& b, bool same_index, float s) const {
    const int k = hinge_kind(a.label, b.label, same_index, s, mp, mn, strict, drop_diagonal);
    return k > 0 ? gpos : (k < 0 ? gneg : 0.f);
  }
};

}  // namespace hp
}  // namespace cuda
}  // namespace flashdml
