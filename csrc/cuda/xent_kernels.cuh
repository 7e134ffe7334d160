// Device kernels of the cross-example softmax (docs/spec.md §2.2) / NT-Xent (docs/spec.md §2.1b) CUDA backend; host wrappers and
// registration live in xent.cu (see there for the pipeline). ATen-free, so the emulation harness compiles it.
// Per-element formulas: flashdml/xent.h; online LSE: flashdml/online_lse.h; tiles: tile_gemm.cuh, pair_tiles.cuh.
#pragma once

#include <cstdint>

#include "flashdml/common.h"
#include "flashdml/online_lse.h"
#include "flashdml/xent.h"
#include "pair_tiles.cuh"
#include "tile_gemm.cuh"

namespace flashdml {
namespace cuda {
namespace xe {

using pair::s_tile_rect;

constexpr int kRowThreads = 256;  // one thread per row (count / row kernels)
constexpr int kOneBlock = 512;    // single-block reductions

// Fixed-order tree over kRowThreads values in shared memory; returns the total in thread 0.
template <typename V, int N>
__device__ __forceinline__ V block_sum(V* red, V v) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int w = N / 2; w > 0; w /= 2) {
    if (int(threadIdx.x) < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  return red[0];
}

// ---- xe_count_kernel -------------------------------------------------------------------------------------
// Exact |P| per block of rows: #{j : ref_labels[j] == labels[i]} by two binary searches in the sorted
// ref_labels, minus the pair (i, i) in self mode. grid ceil(B / 256), 256 threads -> cnt_part[blockIdx.x].
__global__ void __launch_bounds__(kRowThreads, 1)
    xe_count_kernel(const int64_t* __restrict__ labels, int64_t B, const int64_t* __restrict__ sorted_ref, int64_t M,
                    bool self_mode, int64_t* __restrict__ cnt_part) {
  __shared__ int64_t red[kRowThreads];
  const int64_t i = int64_t(blockIdx.x) * kRowThreads + threadIdx.x;
  int64_t cnt = 0;
  if (i < B) {
    const int64_t v = labels[i];
    int64_t lo = 0, hi = M;  // first >= v
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (sorted_ref[mid] < v) lo = mid + 1; else hi = mid;
    }
    int64_t lo2 = lo, hi2 = M;  // first > v
    while (lo2 < hi2) {
      const int64_t mid = lo2 + (hi2 - lo2) / 2;
      if (sorted_ref[mid] <= v) lo2 = mid + 1; else hi2 = mid;
    }
    cnt = lo2 - lo - (self_mode ? 1 : 0);
  }
  const int64_t total = block_sum<int64_t, kRowThreads>(red, cnt);
  if (threadIdx.x == 0) cnt_part[blockIdx.x] = total;
}

// ---- xe_lse_kernel ---------------------------------------------------------------------------------------
// grid (ceil(B / 64), nsplit), 256 threads; block (rb, s): x rows 64 rb .. against the y tiles of split s.
// Thread t owns row r = t % 64 and tile columns 16 (t / 64) .. + 15; per tile it folds the negatives' z into its
// OnlineLse (one merge of the tile's (max, sum)); the 4 states of a row merge in fixed order into
// part_max / part_sum[s][row]. Shared: staging + St + column labels + merge = 30208 / 28672 B (as bs_lse_kernel).
template <typename T, bool kTF32 = false>
__global__ void __launch_bounds__(kThreads, 2)
    xe_lse_kernel(const T* __restrict__ X, const T* __restrict__ Y, const int64_t* __restrict__ lab_x,
                  const int64_t* __restrict__ lab_y, int64_t B, int64_t M, int64_t d, const float* __restrict__ tau,
                  bool self_mode, int64_t tiles_per_split, float* __restrict__ part_max,
                  float* __restrict__ part_sum) {
  using C = TileCfg<T>;
  constexpr int kOffY = C::kStageBytes;
  constexpr int kOffS = 2 * C::kStageBytes;
  constexpr int kOffLab = kOffS + kBN * kLdS * 4;
  constexpr int kOffRed = kOffLab + kBN * 8;
  constexpr int kBytes = kOffRed + 2 * 4 * kBM * 4;
  __shared__ __align__(128) unsigned char smem[kBytes];
  float* St = reinterpret_cast<float*>(smem + kOffS);
  int64_t* lab_c = reinterpret_cast<int64_t*>(smem + kOffLab);
  float* red_max = reinterpret_cast<float*>(smem + kOffRed);
  float* red_sum = red_max + 4 * kBM;

  const int t = threadIdx.x;
  const int r = t % kBM, q = t / kBM;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t gi = row0 + r;
  const int64_t lab_i = gi < B ? lab_x[gi] : 0;
  const float inv_tau = 1.f / __ldg(tau);
  const int64_t ntiles = (M + kBN - 1) / kBN;
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = tile_begin + tiles_per_split < ntiles ? tile_begin + tiles_per_split : ntiles;

  OnlineLse st;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t col0 = tile * kBN;
    __syncthreads();  // the previous tile's St and lab_c are consumed
    if (t < kBN) lab_c[t] = col0 + t < M ? lab_y[col0 + t] : 0;
    s_tile_rect<T, kTF32>(X, B, Y, M, d, row0, col0, smem, smem + kOffY, St);
    __syncthreads();
    float zs[kBN / 4];
    float tmax = kNegInf;
#pragma unroll
    for (int cc = 0; cc < kBN / 4; ++cc) {
      const int c = q * (kBN / 4) + cc;
      const int64_t gj = col0 + c;
      float v = kNegInf;
      if (gi < B && gj < M && xent_negative(lab_i, lab_c[c], self_mode, gi == gj)) v = St[c * kLdS + r] * inv_tau;
      zs[cc] = v;
      tmax = fmaxf(tmax, v);
    }
    if (tmax != kNegInf) {
      float s = 0.f;
#pragma unroll
      for (int cc = 0; cc < kBN / 4; ++cc) s += expf(zs[cc] - tmax);  // expf(-inf) = 0
      st.merge(tmax, s);
    }
  }
  red_max[q * kBM + r] = st.max;
  red_sum[q * kBM + r] = st.sum;
  __syncthreads();
  if (t < kBM && gi < B) {
    OnlineLse m;
#pragma unroll
    for (int qq = 0; qq < 4; ++qq) m.merge(red_max[qq * kBM + t], red_sum[qq * kBM + t]);
    part_max[int64_t(blockIdx.y) * B + gi] = m.max;
    part_sum[int64_t(blockIdx.y) * B + gi] = m.sum;
  }
}

// ---- xe_row_lse_kernel -----------------------------------------------------------------------------------
// One thread per row: merges the nsplit partials in split order -> row_max / row_sum[i]; lse_out[i] = its value
// when given (NT-Xent: the op's lse output).
__global__ void xe_row_lse_kernel(const float* __restrict__ part_max, const float* __restrict__ part_sum, int nsplit,
                                  int64_t B, float* __restrict__ row_max, float* __restrict__ row_sum,
                                  float* __restrict__ lse_out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B) return;
  OnlineLse st;
  for (int s = 0; s < nsplit; ++s) st.merge(part_max[s * B + i], part_sum[s * B + i]);
  row_max[i] = st.max;
  row_sum[i] = st.sum;
  if (lse_out != nullptr) lse_out[i] = st.value();
}

// ---- xe_scalars_kernel -----------------------------------------------------------------------------------
// One block of 512: npos[0] = sum of the count partials (int64); with row states (XE) also lse_out[0] = the
// global LSE, the row states merged in a fixed order (strided per thread, then a fixed tree).
__global__ void __launch_bounds__(kOneBlock, 1)
    xe_scalars_kernel(const int64_t* __restrict__ cnt_part, int64_t ncnt, const float* __restrict__ row_max,
                      const float* __restrict__ row_sum, int64_t B, int64_t* __restrict__ npos,
                      float* __restrict__ lse_out) {
  __shared__ int64_t red_c[kOneBlock];
  __shared__ float red_m[kOneBlock], red_s[kOneBlock];
  const int t = threadIdx.x;
  int64_t c = 0;
  for (int64_t k = t; k < ncnt; k += kOneBlock) c += cnt_part[k];
  const int64_t total = block_sum<int64_t, kOneBlock>(red_c, c);
  if (t == 0) npos[0] = total;
  if (row_max == nullptr) return;  // uniform
  OnlineLse st;
  for (int64_t i = t; i < B; i += kOneBlock) st.merge(row_max[i], row_sum[i]);
  red_m[t] = st.max;
  red_s[t] = st.sum;
  __syncthreads();
  for (int w = kOneBlock / 2; w > 0; w /= 2) {
    if (t < w) {
      OnlineLse a;
      a.merge(red_m[t], red_s[t]);
      a.merge(red_m[t + w], red_s[t + w]);
      red_m[t] = a.max;
      red_s[t] = a.sum;
    }
    __syncthreads();
  }
  if (t == 0) {
    OnlineLse a;
    a.merge(red_m[0], red_s[0]);
    lse_out[0] = a.value();
  }
}

// ---- xe_pos_kernel ---------------------------------------------------------------------------------------
// grid (ceil(B / 64), nsplit), 256 threads, mapping of xe_lse_kernel. Per tile of split s: the labels decide
// first whether the tile holds any positive (pair mode / class-sorted batches: most tiles do not) and only those
// tiles are multiplied; thread (r, q) sums softplus(lse - z) and sigmoid(lse - z) over its positives
// (lse = lse[0] for XE, lse[row] for NT-Xent; lse = -inf adds 0 to both). The 4 partials of a row are added in
// fixed order -> part_sp / part_sg[s][row]. Shared: as xe_lse_kernel + one flag (30224 / 28688 B).
template <typename T, bool kTF32 = false>
__global__ void __launch_bounds__(kThreads, 2)
    xe_pos_kernel(const T* __restrict__ X, const T* __restrict__ Y, const int64_t* __restrict__ lab_x,
                  const int64_t* __restrict__ lab_y, int64_t B, int64_t M, int64_t d, const float* __restrict__ tau,
                  const float* __restrict__ lse, bool per_row, bool self_mode, int64_t tiles_per_split,
                  float* __restrict__ part_sp, float* __restrict__ part_sg) {
  using C = TileCfg<T>;
  constexpr int kOffY = C::kStageBytes;
  constexpr int kOffS = 2 * C::kStageBytes;
  constexpr int kOffLab = kOffS + kBN * kLdS * 4;
  constexpr int kOffRed = kOffLab + kBN * 8;
  constexpr int kOffFlag = kOffRed + 2 * 4 * kBM * 4;
  constexpr int kBytes = kOffFlag + 16;
  __shared__ __align__(128) unsigned char smem[kBytes];
  float* St = reinterpret_cast<float*>(smem + kOffS);
  int64_t* lab_c = reinterpret_cast<int64_t*>(smem + kOffLab);
  float* red_sp = reinterpret_cast<float*>(smem + kOffRed);
  float* red_sg = red_sp + 4 * kBM;
  volatile int* flag = reinterpret_cast<volatile int*>(smem + kOffFlag);

  const int t = threadIdx.x;
  const int r = t % kBM, q = t / kBM;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t gi = row0 + r;
  const int64_t lab_i = gi < B ? lab_x[gi] : 0;
  const float l = gi < B ? lse[per_row ? gi : 0] : kNegInf;
  const float inv_tau = 1.f / __ldg(tau);
  const int64_t ntiles = (M + kBN - 1) / kBN;
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = tile_begin + tiles_per_split < ntiles ? tile_begin + tiles_per_split : ntiles;

  float sp = 0.f, sg = 0.f;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t col0 = tile * kBN;
    __syncthreads();  // the previous tile's St, lab_c and flag reads are done
    if (t < kBN) lab_c[t] = col0 + t < M ? lab_y[col0 + t] : 0;
    if (t == 0) flag[0] = 0;
    __syncthreads();
    bool any = false;
#pragma unroll
    for (int cc = 0; cc < kBN / 4; ++cc) {
      const int c = q * (kBN / 4) + cc;
      any |= gi < B && col0 + c < M && xent_positive(lab_i, lab_c[c], self_mode, gi == col0 + c);
    }
    if (any) flag[0] = 1;  // every writer stores the same value
    __syncthreads();
    if (flag[0] == 0) continue;  // uniform: no positive in this tile
    s_tile_rect<T, kTF32>(X, B, Y, M, d, row0, col0, smem, smem + kOffY, St);
    __syncthreads();
#pragma unroll 4
    for (int cc = 0; cc < kBN / 4; ++cc) {
      const int c = q * (kBN / 4) + cc;
      const int64_t gj = col0 + c;
      if (gi < B && gj < M && l != kNegInf && xent_positive(lab_i, lab_c[c], self_mode, gi == gj)) {
        const float u = l - St[c * kLdS + r] * inv_tau;
        sp += xent_softplus(u);
        sg += xent_sigmoid(u);
      }
    }
  }
  __syncthreads();
  red_sp[q * kBM + r] = sp;
  red_sg[q * kBM + r] = sg;
  __syncthreads();
  if (t < kBM && gi < B) {
    part_sp[int64_t(blockIdx.y) * B + gi] = ((red_sp[t] + red_sp[kBM + t]) + red_sp[2 * kBM + t]) + red_sp[3 * kBM + t];
    part_sg[int64_t(blockIdx.y) * B + gi] = ((red_sg[t] + red_sg[kBM + t]) + red_sg[2 * kBM + t]) + red_sg[3 * kBM + t];
  }
}

// ---- xe_rows_kernel --------------------------------------------------------------------------------------
// One thread per row: the row's softplus / sigmoid sums over the splits (in order); NT-Xent writes
// coef[i] = sigmoid sum / |P|. Per block, fixed trees of the row sums in double -> blk_sums[2 b], [2 b + 1].
__global__ void __launch_bounds__(kRowThreads, 1)
    xe_rows_kernel(const float* __restrict__ part_sp, const float* __restrict__ part_sg, int nsplit, int64_t B,
                   const int64_t* __restrict__ npos, float* __restrict__ coef_rows, double* __restrict__ blk_sums) {
  __shared__ double red[kRowThreads];
  const int64_t i = int64_t(blockIdx.x) * kRowThreads + threadIdx.x;
  float sp = 0.f, sg = 0.f;
  if (i < B) {
    for (int s = 0; s < nsplit; ++s) {
      sp += part_sp[s * B + i];
      sg += part_sg[s * B + i];
    }
    if (coef_rows != nullptr) {
      const int64_t n = npos[0];
      coef_rows[i] = n > 0 ? static_cast<float>(double(sg) / double(n)) : 0.f;
    }
  }
  const double tsp = block_sum<double, kRowThreads>(red, double(sp));
  __syncthreads();  // everyone has read red[0]
  const double tsg = block_sum<double, kRowThreads>(red, double(sg));
  if (threadIdx.x == 0) {
    blk_sums[2 * blockIdx.x] = tsp;
    blk_sums[2 * blockIdx.x + 1] = tsg;
  }
}

// ---- xe_final_kernel -------------------------------------------------------------------------------------
// One block: loss = sum softplus / |P| (0 without positives); XE: coef[0] = sum sigmoid / |P|.
__global__ void __launch_bounds__(kOneBlock, 1)
    xe_final_kernel(const double* __restrict__ blk_sums, int64_t nblk, const int64_t* __restrict__ npos,
                    float* __restrict__ loss, float* __restrict__ coef_global) {
  __shared__ double red[kOneBlock];
  double sp = 0.0, sg = 0.0;
  for (int64_t k = threadIdx.x; k < nblk; k += kOneBlock) {
    sp += blk_sums[2 * k];
    sg += blk_sums[2 * k + 1];
  }
  const double tsp = block_sum<double, kOneBlock>(red, sp);
  __syncthreads();
  const double tsg = block_sum<double, kOneBlock>(red, sg);
  if (threadIdx.x == 0) {
    const int64_t n = npos[0];
    loss[0] = n > 0 ? static_cast<float>(tsp / double(n)) : 0.f;
    if (coef_global != nullptr) coef_global[0] = n > 0 ? static_cast<float>(tsg / double(n)) : 0.f;
  }
}

// ---- backward ----------------------------------------------------------------------------------------------
// xe_bwd_prep_kernel: one block of 512: |P| from the count partials, cmax = max coef (fixed tree), then
// w[0..3] = xent_grad_scalars(|P|, cmax, grad, tau).
__global__ void __launch_bounds__(kOneBlock, 1)
    xe_bwd_prep_kernel(const int64_t* __restrict__ cnt_part, int64_t ncnt, const float* __restrict__ coef,
                       int64_t ncoef, const float* __restrict__ grad, const float* __restrict__ tau,
                       float* __restrict__ w) {
  __shared__ int64_t red_c[kOneBlock];
  __shared__ float red_m[kOneBlock];
  const int t = threadIdx.x;
  int64_t c = 0;
  for (int64_t k = t; k < ncnt; k += kOneBlock) c += cnt_part[k];
  const int64_t npos = block_sum<int64_t, kOneBlock>(red_c, c);
  float m = 0.f;
  for (int64_t k = t; k < ncoef; k += kOneBlock) m = fmaxf(m, coef[k]);
  red_m[t] = m;
  __syncthreads();
  for (int s = kOneBlock / 2; s > 0; s /= 2) {
    if (t < s) red_m[t] = fmaxf(red_m[t], red_m[t + s]);
    __syncthreads();
  }
  if (t == 0) xent_grad_scalars(npos, red_m[0], __ldg(grad), __ldg(tau), w);
}

// Weight functor of pair_grad_kernel: x rows carry (label, lse, coef) of their partition, y rows their label.
struct XentOp {
  const int64_t* lab_x;
  const int64_t* lab_y;
  const float* lse;   // [1] (XE) or [B] (NT-Xent)
  const float* coef;  // same shape
  const float* tau;
  const float* w;     // xe_bwd_prep_kernel's scalars
  bool per_row, self_mode;
  float inv_tau, wpos, wneg;  // set by load()
  static constexpr bool kGz = true;
  struct XInfo {
    int64_t label;
    float lse, coef;
  };
  struct YInfo {
    int64_t label;
  };
  __device__ __forceinline__ void load() {
    inv_tau = 1.f / __ldg(tau);
    wpos = __ldg(w);
    wneg = __ldg(w + 1);
  }
  __device__ __forceinline__ XInfo xinfo(int64_t i) const {
    const int64_t k = per_row ? i : 0;
    return {lab_x[i], lse[k], coef[k]};
  }
  __device__ __forceinline__ YInfo yinfo(int64_t j) const { return {lab_y[j]}; }
  __device__ __forceinline__ float weight(const XInfo& a, const YInfo& b, bool same_index, float s) const {
    return xent_weight(s * inv_tau, xent_positive(a.label, b.label, self_mode, same_index),
                       xent_negative(a.label, b.label, self_mode, same_index), a.lse, a.coef, wpos, wneg);
  }
};

// xe_dtau_kernel: one block: out[0] = w[3] * sum(gz_part) (fixed order).
__global__ void __launch_bounds__(kOneBlock, 1)
    xe_dtau_kernel(const float* __restrict__ gz_part, int64_t len, const float* __restrict__ w,
                   float* __restrict__ out) {
  __shared__ float red[kOneBlock];
  float s = 0.f;
  for (int64_t k = threadIdx.x; k < len; k += kOneBlock) s += gz_part[k];
  const float total = block_sum<float, kOneBlock>(red, s);
  if (threadIdx.x == 0) out[0] = __ldg(w + 3) * total;
}

}  // namespace xe
}  // namespace cuda
}  // namespace flashdml
