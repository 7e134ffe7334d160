// Device kernels of the anchor-LSE losses' CUDA backend (docs/spec.md §6.1-6.3: SupCon, Multi-Similarity,
// Circle); host wrappers, registration and the pipeline live in anchor_lse.cu. ATen-free, so the emulation
// harness (tests/cuda_emulation/anchor_lse_driver.cpp) compiles it. Per-pair formulas: flashdml/anchor_lse.h
// (shared with the CPU kernel); online LSE: flashdml/online_lse.h; tiles: tile_gemm.cuh, pair_tiles.cuh.
// Every kernel here is a template (the loss kind, or a dummy parameter), so this header defines no host stub
// that another translation unit could also define.
#pragma once

#include <cstdint>

#include "flashdml/anchor_lse.h"
#include "flashdml/common.h"
#include "flashdml/online_lse.h"
#include "pair_tiles.cuh"
#include "tile_gemm.cuh"

namespace flashdml {
namespace cuda {
namespace al {

using namespace ::flashdml::anchor_lse;
using pair::s_tile_rect;

constexpr int kRowThreads = 256;  // one thread per row (al_rows_kernel)
constexpr int kOneBlock = 512;    // single-block kernels
constexpr int kParts = 5;         // per-row partials of a split: pos (max, sum), neg (max, sum), sum of f_p

// Fixed-order tree over N values in shared memory; every thread gets the total. Contains barriers.
template <typename V, int N>
__device__ __forceinline__ V al_block_sum(V* red, V v) {
  __syncthreads();  // red may still be read by a previous call
  red[threadIdx.x] = v;
  __syncthreads();
  for (int w = N / 2; w > 0; w /= 2) {
    if (int(threadIdx.x) < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  return red[0];
}

// #{j : sorted[j] == v} by two binary searches in the sorted labels.
__device__ __forceinline__ int64_t al_class_size(const int64_t* __restrict__ sorted, int64_t n, int64_t v) {
  int64_t lo = 0, hi = n;  // first >= v
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < v) lo = mid + 1; else hi = mid;
  }
  int64_t lo2 = lo, hi2 = n;  // first > v
  while (lo2 < hi2) {
    const int64_t mid = lo2 + (hi2 - lo2) / 2;
    if (sorted[mid] <= v) lo2 = mid + 1; else hi2 = mid;
  }
  return lo2 - lo;
}

// ---- al_fwd_kernel ---------------------------------------------------------------------------------------
// grid (ceil(B / 64), nsplit), 256 threads; block (rb, s): x rows 64 rb .. against the y tiles of split s.
// Thread t owns row r = t % 64 and tile columns 16 (t / 64) .. + 15. Per tile it forms the logit of each of its
// entries (f_p for a positive, f_n for a negative; the pair (i, i) dropped in self mode) and folds the tile's
// (max, sum) of each set into its two OnlineLse states, plus the plain sum of f_p (SupCon's mean over positives).
// The 4 states of a row merge in fixed order into part[k][s][row], k < kParts. SupCon reads 1 / tau on the
// device (prm.p0 is replaced). Shared: staging + St + column labels + merge (33792 / 32256 B fp16 / fp32).
template <typename T, int K, bool kTF32 = false>
__global__ void __launch_bounds__(kThreads, 2)
    al_fwd_kernel(const T* __restrict__ X, const T* __restrict__ Y, const int64_t* __restrict__ lab_x,
                  const int64_t* __restrict__ lab_y, int64_t B, int64_t M, int64_t d, const float* __restrict__ tau,
                  Params prm, bool self_mode, int64_t tiles_per_split, float* __restrict__ part) {
  using C = TileCfg<T>;
  constexpr int kCols = kBN / 4;
  constexpr int kOffY = C::kStageBytes;
  constexpr int kOffS = 2 * C::kStageBytes;
  constexpr int kOffLab = kOffS + kBN * kLdS * 4;
  constexpr int kOffRed = kOffLab + kBN * 8;
  constexpr int kBytes = kOffRed + kParts * 4 * kBM * 4;
  __shared__ __align__(128) unsigned char smem[kBytes];
  float* St = reinterpret_cast<float*>(smem + kOffS);
  int64_t* lab_c = reinterpret_cast<int64_t*>(smem + kOffLab);
  float* red = reinterpret_cast<float*>(smem + kOffRed);  // [kParts][4][kBM]

  if constexpr (K == kSupCon) prm.p0 = 1.f / __ldg(tau);
  const int t = threadIdx.x;
  const int r = t % kBM, q = t / kBM;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t gi = row0 + r;
  const int64_t lab_i = gi < B ? lab_x[gi] : 0;
  const int64_t ntiles = (M + kBN - 1) / kBN;
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = tile_begin + tiles_per_split < ntiles ? tile_begin + tiles_per_split : ntiles;

  OnlineLse pos, neg;
  float plin = 0.f;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t col0 = tile * kBN;
    __syncthreads();  // the previous tile's St and lab_c are consumed
    if (t < kBN) lab_c[t] = col0 + t < M ? lab_y[col0 + t] : 0;
    s_tile_rect<T, kTF32>(X, B, Y, M, d, row0, col0, smem, smem + kOffY, St);
    __syncthreads();
    float fv[kCols];
    unsigned pmask = 0u, nmask = 0u;
    float pmax = kNegInf, nmax = kNegInf;
#pragma unroll
    for (int cc = 0; cc < kCols; ++cc) {
      const int c = q * kCols + cc;
      const int64_t gj = col0 + c;
      const float s = St[c * kLdS + r];
      const bool valid = gi < B && gj < M && !(self_mode && gi == gj);
      const bool is_pos = valid && lab_c[c] == lab_i;
      const bool is_neg = valid && lab_c[c] != lab_i;
      const float f = is_pos ? pos_logit<K>(s, prm) : neg_logit<K>(s, prm);
      fv[cc] = f;
      if (is_pos) {
        pmask |= 1u << cc;
        pmax = fmaxf(pmax, f);
        if constexpr (K == kSupCon) plin += f;
      }
      if (is_neg) {
        nmask |= 1u << cc;
        nmax = fmaxf(nmax, f);
      }
    }
    if (nmask != 0u) {
      float sum = 0.f;
#pragma unroll
      for (int cc = 0; cc < kCols; ++cc) sum += (nmask >> cc) & 1u ? expf(fv[cc] - nmax) : 0.f;
      neg.merge(nmax, sum);
    }
    if (pmask != 0u) {
      float sum = 0.f;
#pragma unroll
      for (int cc = 0; cc < kCols; ++cc) sum += (pmask >> cc) & 1u ? expf(fv[cc] - pmax) : 0.f;
      pos.merge(pmax, sum);
    }
  }
  red[(0 * 4 + q) * kBM + r] = pos.max;
  red[(1 * 4 + q) * kBM + r] = pos.sum;
  red[(2 * 4 + q) * kBM + r] = neg.max;
  red[(3 * 4 + q) * kBM + r] = neg.sum;
  red[(4 * 4 + q) * kBM + r] = plin;
  __syncthreads();
  if (t < kBM && gi < B) {
    OnlineLse p, n;
    float lin = 0.f;
#pragma unroll
    for (int qq = 0; qq < 4; ++qq) {
      p.merge(red[(0 * 4 + qq) * kBM + t], red[(1 * 4 + qq) * kBM + t]);
      n.merge(red[(2 * 4 + qq) * kBM + t], red[(3 * 4 + qq) * kBM + t]);
      lin += red[(4 * 4 + qq) * kBM + t];
    }
    const int64_t ns = gridDim.y;
    part[(0 * ns + blockIdx.y) * B + gi] = p.max;
    part[(1 * ns + blockIdx.y) * B + gi] = p.sum;
    part[(2 * ns + blockIdx.y) * B + gi] = n.max;
    part[(3 * ns + blockIdx.y) * B + gi] = n.sum;
    part[(4 * ns + blockIdx.y) * B + gi] = lin;
  }
}

__device__ __forceinline__ double al_softplus(double v) {
  return v > 0 ? v + log1p(exp(-v)) : log1p(exp(v));
}
__device__ __forceinline__ double al_sigmoid(double v) {
  return v >= 0 ? 1.0 / (1.0 + exp(-v)) : exp(v) / (1.0 + exp(v));
}

// ---- al_rows_kernel --------------------------------------------------------------------------------------
// One thread per row: merges the row's split partials in split order, takes |P(a)| (exact, binary searches in
// the sorted ref_labels), and forms the two LSEs (stats[i][kLsePos], [kLseNeg]) and the row loss ell[i]
// (double) exactly as the CPU kernel does; npos_row[i] = |P(a)|. Per block of 256 rows (fixed trees):
// blk[2 b] = #{ell > 0}, blk[2 b + 1] = sum |P(a)| (int64). p0, p1: MS's alpha, beta (host doubles).
template <int kDummy = 0>
__global__ void __launch_bounds__(kRowThreads, 1)
    al_rows_kernel(const float* __restrict__ part, int nsplit, int64_t B, int64_t M, const int64_t* __restrict__ lab_x,
                   const int64_t* __restrict__ sorted_ref, bool self_mode, int kind, double p0, double p1,
                   float* __restrict__ stats, double* __restrict__ ell, int64_t* __restrict__ npos_row,
                   int64_t* __restrict__ blk) {
  __shared__ int64_t red[kRowThreads];
  const int64_t i = int64_t(blockIdx.x) * kRowThreads + threadIdx.x;
  int64_t positive = 0, np = 0;
  if (i < B) {
    OnlineLse p, n;
    double lin = 0.0;
    for (int s = 0; s < nsplit; ++s) {
      p.merge(part[(0 * nsplit + s) * B + i], part[(1 * nsplit + s) * B + i]);
      n.merge(part[(2 * nsplit + s) * B + i], part[(3 * nsplit + s) * B + i]);
      lin += double(part[(4 * nsplit + s) * B + i]);
    }
    const int64_t class_cols = al_class_size(sorted_ref, M, lab_x[i]);
    np = class_cols - (self_mode ? 1 : 0);
    const int64_t nn = M - class_cols;
    float lp, ln;
    double e = 0.0;
    if (kind == kSupCon) {
      OnlineLse all = p;
      all.merge(n);
      lp = ln = all.value();
      if (np > 0) e = double(lp) - lin / double(np);
    } else if (kind == kMultiSimilarity) {
      p.merge(0.f, 1.f);  // the "1 +" inside each log
      n.merge(0.f, 1.f);
      lp = p.value();
      ln = n.value();
      e = double(lp) / p0 + double(ln) / p1;
    } else {
      lp = p.value();
      ln = n.value();
      if (np > 0 && nn > 0) e = al_softplus(double(lp) + double(ln));
    }
    stats[i * kStats + kLsePos] = lp;
    stats[i * kStats + kLseNeg] = ln;
    ell[i] = e;
    npos_row[i] = np;
    positive = e > 0.0 ? 1 : 0;
  }
  const int64_t cnt = al_block_sum<int64_t, kRowThreads>(red, positive);
  const int64_t tot = al_block_sum<int64_t, kRowThreads>(red, np);
  if (threadIdx.x == 0) {
    blk[2 * blockIdx.x] = cnt;
    blk[2 * blockIdx.x + 1] = tot;
  }
}

// ---- al_final_kernel -------------------------------------------------------------------------------------
// One block of 512: the reducer. count = B (MS) or #{ell > 0} (SupCon, Circle); pml's zero cases (at most one
// positive and one negative pair; SupCon also no positive or no negative pair) give c = 0. Per row (strided):
// c_a = 1 / count for the anchors in the mean, stats[i][kWeight] = c_a (Circle: c_a sigmoid(LSE_P + LSE_N)),
// stats[i][kLinear] = c_a / |P(a)| (SupCon); loss = sum c_a ell_a (double, fixed tree).
template <int kDummy = 0>
__global__ void __launch_bounds__(kOneBlock, 1)
    al_final_kernel(const int64_t* __restrict__ blk, int64_t nblk, const double* __restrict__ ell,
                    const int64_t* __restrict__ npos_row, int64_t B, int64_t M, bool self_mode, int kind,
                    float* __restrict__ stats, float* __restrict__ loss) {
  __shared__ int64_t red_i[kOneBlock];
  __shared__ double red_d[kOneBlock];
  const int t = threadIdx.x;
  int64_t c = 0, p = 0;
  for (int64_t k = t; k < nblk; k += kOneBlock) {
    c += blk[2 * k];
    p += blk[2 * k + 1];
  }
  const int64_t n_gt0 = al_block_sum<int64_t, kOneBlock>(red_i, c);
  const int64_t n_pos = al_block_sum<int64_t, kOneBlock>(red_i, p);
  const int64_t n_neg = B * M - n_pos - (self_mode ? B : 0);
  const bool zero = (n_pos <= 1 && n_neg <= 1) || (kind == kSupCon && (n_pos == 0 || n_neg == 0));
  const int64_t count = kind == kMultiSimilarity ? B : n_gt0;
  const double inv_count = (zero || count == 0) ? 0.0 : 1.0 / double(count);
  double total = 0.0;
  for (int64_t i = t; i < B; i += kOneBlock) {
    const double e = ell[i];
    const double ci = (kind == kMultiSimilarity || e > 0.0) ? inv_count : 0.0;
    total += ci * e;
    float* row = stats + i * kStats;
    double w = ci;
    if (kind == kCircle && ci != 0.0) w = ci * al_sigmoid(double(row[kLsePos]) + double(row[kLseNeg]));
    row[kWeight] = float(w);
    row[kLinear] = (kind == kSupCon && npos_row[i] > 0) ? float(ci / double(npos_row[i])) : 0.f;
  }
  const double sum = al_block_sum<double, kOneBlock>(red_d, total);
  if (t == 0) loss[0] = float(sum);
}

// ---- backward ----------------------------------------------------------------------------------------------
// al_bwd_prep_kernel: one block of 512. The G tiles (fp16 / bf16 on the tensor-core path) hold dL/dS / scale
// with scale = (1/tau for SupCon, |gamma| for Circle, 1 for MS) * max_a max(w_a, u_a), so their entries stay
// within a few units and the largest ones keep full precision. sc[0] = 1 / scale (the weight functor's factor),
// sc[1] = grad_loss * scale (pair_reduce_kernel's output scale), sc[2] = 1 / tau, sc[3] = dtemperature per unit
// of sum(G s) (SupCon: -grad_loss * scale / tau; 0 otherwise).
template <int kDummy = 0>
__global__ void __launch_bounds__(kOneBlock, 1)
    al_bwd_prep_kernel(const float* __restrict__ stats, int64_t B, const float* __restrict__ grad,
                       const float* __restrict__ tau, int kind, float gamma, float* __restrict__ sc) {
  __shared__ float red[kOneBlock];
  const int t = threadIdx.x;
  float m = 0.f;
  for (int64_t i = t; i < B; i += kOneBlock) {
    m = fmaxf(m, stats[i * kStats + kWeight]);
    m = fmaxf(m, stats[i * kStats + kLinear]);
  }
  red[t] = m;
  __syncthreads();
  for (int s = kOneBlock / 2; s > 0; s /= 2) {
    if (t < s) red[t] = fmaxf(red[t], red[t + s]);
    __syncthreads();
  }
  if (t == 0) {
    const float inv_tau = 1.f / __ldg(tau);
    const float slope = kind == kSupCon ? inv_tau : (kind == kCircle && gamma != 0.f ? fabsf(gamma) : 1.f);
    const float scale = red[0] > 0.f ? slope * red[0] : 1.f;
    const float gl = __ldg(grad);
    sc[0] = 1.f / scale;
    sc[1] = gl * scale;
    sc[2] = inv_tau;
    sc[3] = kind == kSupCon ? -gl * scale * inv_tau : 0.f;
  }
}

// Weight functor of pair_grad_kernel (pair_tiles.cuh) for kind K: dL/dS of pair (a, j) divided by the scale.
// x rows carry their label and their LSEs with log w_a folded in (w_a exp(f - L) = exp(f - (L - log w_a)); an
// anchor with w_a = 0 gets +inf, so exp gives 0); SupCon's one LSE leaves a slot for its linear weight u_a.
// y rows carry their label.
template <int K>
struct AnchorOp {
  const int64_t* lab_x;
  const int64_t* lab_y;
  const float* stats;  // row_stats [B, kStats]
  const float* sc;     // al_bwd_prep_kernel's scalars
  Params prm;          // SupCon's p0 (1 / tau) is read from sc[2] by load()
  bool self_mode;
  float inv_scale;     // set by load()
  static constexpr bool kGz = K == kSupCon;  // sum G s: the temperature's gradient
  struct XInfo {
    int64_t label;
    float lse_pos;  // LSE_P - log w (SupCon: its LSE over P u N - log w)
    float aux;      // LSE_N - log w; SupCon: u_a
  };
  struct YInfo {
    int64_t label;
  };
  __device__ __forceinline__ void load() {
    inv_scale = __ldg(sc);
    if constexpr (K == kSupCon) prm.p0 = __ldg(sc + 2);
  }
  __device__ __forceinline__ XInfo xinfo(int64_t i) const {
    const float* row = stats + i * kStats;
    const float w = row[kWeight];
    const float lw = w > 0.f ? logf(w) : kNegInf;
    XInfo a;
    a.label = lab_x[i];
    a.lse_pos = row[kLsePos] - lw;
    a.aux = K == kSupCon ? row[kLinear] : row[kLseNeg] - lw;
    return a;
  }
  __device__ __forceinline__ YInfo yinfo(int64_t j) const { return {lab_y[j]}; }
  __device__ __forceinline__ float weight(const XInfo& a, const YInfo& b, bool same_index, float s) const {
    const bool is_pos = a.label == b.label;
    float g;
    if (is_pos) {
      g = expf(pos_logit<K>(s, prm) - a.lse_pos) * pos_slope<K>(s, prm);
      if constexpr (K == kSupCon) g -= a.aux * prm.p0;
    } else {
      const float l = K == kSupCon ? a.lse_pos : a.aux;
      g = expf(neg_logit<K>(s, prm) - l) * neg_slope<K>(s, prm);
    }
    return self_mode && same_index ? 0.f : g * inv_scale;
  }
};

// al_dtemp_kernel: one block: out[0] = sc[3] * sum(gz_part) (double, fixed order; len 0 gives 0).
template <int kDummy = 0>
__global__ void __launch_bounds__(kOneBlock, 1)
    al_dtemp_kernel(const float* __restrict__ gz_part, int64_t len, const float* __restrict__ sc,
                    float* __restrict__ out) {
  __shared__ double red[kOneBlock];
  double s = 0.0;
  for (int64_t k = threadIdx.x; k < len; k += kOneBlock) s += double(gz_part[k]);
  const double total = al_block_sum<double, kOneBlock>(red, s);
  if (threadIdx.x == 0) out[0] = float(double(__ldg(sc + 3)) * total);
}

}  // namespace al
}  // namespace cuda
}  // namespace flashdml
