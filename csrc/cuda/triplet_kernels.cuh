// Device kernels of the CUDA triplet margin loss (docs/spec.md §6.4). Host pipeline and registration: triplet.cu.
// ATen-free, so the emulation harness (tests/cuda_emulation/triplet_driver.cpp) compiles it.
//
// The rows the kernels read are the normalised rows augmented with two columns: x~ = [x^, 1, 0, pad],
// y~ = [y^, 0, 1, pad] (pad: zeros up to the vector width). The extra columns add exact zeros to every S entry,
// and they make the weighted-gradient pass of pair_tiles.cuh return the row sums of G (dx pass: G y~, column d + 1)
// and its column sums (dy pass: G^T x~, column d), which the d_an gradient needs next to G y^ and G^T x^.
//
// Every pass that tests a hinge computes the S tile of (x rows I, y rows J) with the same s_tile_rect call and
// turns it into distances with tri_distance, so the forward counts and the backward's weights test bitwise the
// same fp32 values.
#pragma once

#include <cstdint>

#include "pair_tiles.cuh"
#include "tile_gemm.cuh"

namespace flashdml {
namespace cuda {
namespace tri {

using pair::s_tile_rect;

__device__ __forceinline__ float tri_f(float v) { return v; }
__device__ __forceinline__ float tri_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float tri_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// d = sqrt(max(|x^|^2 + |y^|^2 - 2 s, 0)). Written without a multiply (2 s as s + s) so that no pass can contract
// it into an FMA differently from another.
__device__ __forceinline__ float tri_distance(float s, float xsq, float ysq) {
  const float v = (xsq + ysq) - (s + s);
  return sqrtf(v > 0.f ? v : 0.f);
}

// The hinge of one triplet, d_ap - d_an + margin, in one fixed order (no multiply).
__device__ __forceinline__ float tri_hinge(float dap, float dan, float margin) { return (dap - dan) + margin; }

__device__ __forceinline__ float tri_inf() { return __uint_as_float(0x7f800000u); }

// ---- tri_stats_kernel ----------------------------------------------------------------------------------------
// grid (ceil(B / 64), nsplit), 256 threads. Block (rb, s): anchors 64 rb .. against the y tiles of split s.
// Per tile: the S tile, then each entry becomes d_an on a negative pair and +inf elsewhere (+inf never makes an
// active hinge); thread (r = t / 4, k = t % 4) takes anchor row r's positives k, k + 4, .. and tests each against
// the 64 columns (a positive's 64 hinges summed in fp32, then into a double). Positives of an anchor are the
// CSR range pos_ptr[a] .. pos_ptr[a + 1] of pos_dist (d_ap from the row differences).
// kPos = false (forward): per-block double sum and int64 count of the active triplets, by a fixed tree ->
//   part_sum[b], part_cnt[b], b = blockIdx.y * gridDim.x + blockIdx.x.
// kPos = true (backward): pos_cnt[s * npos + q] += #{active n in the split's tiles} for each positive pair q
//   (one thread owns each (s, q): no atomics; the buffer starts at 0).
// Shared memory: staging + St + 4 x 64 row / column entries (fp32: 26624 B, fp16 / bf16: 28672 B).
template <typename T, bool kPos, bool kTF32 = false>
__global__ void __launch_bounds__(kThreads, 2)
    tri_stats_kernel(const T* __restrict__ X, const T* __restrict__ Y, int64_t B, int64_t M, int64_t d,
                     int64_t tiles_per_split, const int32_t* __restrict__ cls_x, const int32_t* __restrict__ cls_y,
                     const float* __restrict__ xsq, const float* __restrict__ ysq,
                     const int64_t* __restrict__ pos_ptr, const float* __restrict__ pos_dist, float margin,
                     double* __restrict__ part_sum, int64_t* __restrict__ part_cnt, int32_t* __restrict__ pos_cnt,
                     int64_t npos) {
  using C = TileCfg<T>;
  constexpr int kOffY = C::kStageBytes;
  constexpr int kOffS = 2 * C::kStageBytes;
  constexpr int kOffInfo = kOffS + kBN * kLdS * 4;
  constexpr int kBytes = kOffInfo + 4 * 64 * 4;
  static_assert(kThreads * 16 <= kBN * kLdS * 4, "reduction fits in St");
  __shared__ __align__(128) unsigned char smem[kBytes];
  float* St = reinterpret_cast<float*>(smem + kOffS);
  int32_t* ccls = reinterpret_cast<int32_t*>(smem + kOffInfo);
  float* csq = reinterpret_cast<float*>(ccls + kBN);
  int32_t* rcls = reinterpret_cast<int32_t*>(csq + kBN);
  float* rsq = reinterpret_cast<float*>(rcls + kBM);

  const int t = threadIdx.x;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  if (t < kBM) {  // visible after the first in-loop barrier
    const int64_t gi = row0 + t;
    rcls[t] = gi < B ? cls_x[gi] : -1;
    rsq[t] = gi < B ? xsq[gi] : 0.f;
  }
  const int r = t / 4, kq = t % 4;
  const int64_t gi = row0 + r;
  const int64_t q0 = gi < B ? pos_ptr[gi] : 0;
  const int64_t np = gi < B ? pos_ptr[gi + 1] - q0 : 0;
  const int64_t ntiles = (M + kBN - 1) / kBN;
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = tile_begin + tiles_per_split < ntiles ? tile_begin + tiles_per_split : ntiles;

  double sum = 0.0;
  int64_t cnt = 0;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t col0 = tile * kBN;
    __syncthreads();  // the previous tile's distances and column entries are consumed
    if (t < kBN) {
      const int64_t gj = col0 + t;
      ccls[t] = gj < M ? cls_y[gj] : -1;
      csq[t] = gj < M ? ysq[gj] : 0.f;
    }
    s_tile_rect<T, kTF32>(X, B, Y, M, d, row0, col0, smem, smem + kOffY, St);
    __syncthreads();
    for (int e = t; e < kBM * kBN; e += kThreads) {
      const int c = e / kBM, rr = e % kBM;
      const bool neg = col0 + c < M && row0 + rr < B && ccls[c] != rcls[rr];
      float& v = St[c * kLdS + rr];
      v = neg ? tri_distance(v, rsq[rr], csq[c]) : tri_inf();
    }
    __syncthreads();
    for (int64_t k = kq; k < np; k += 4) {
      const float dap = pos_dist[q0 + k];
      float hs = 0.f;
      int hc = 0;
      for (int c = 0; c < kBN; ++c) {
        const float h = tri_hinge(dap, St[c * kLdS + r], margin);
        hs += h > 0.f ? h : 0.f;
        hc += h > 0.f ? 1 : 0;
      }
      if constexpr (kPos) {
        pos_cnt[int64_t(blockIdx.y) * npos + q0 + k] += hc;
      } else {
        sum += double(hs);
        cnt += hc;
      }
    }
  }
  if constexpr (!kPos) {
    __syncthreads();  // St is free: fixed-tree reduction of the 256 partials
    double* rs = reinterpret_cast<double*>(St);
    int64_t* rc = reinterpret_cast<int64_t*>(rs + kThreads);
    rs[t] = sum;
    rc[t] = cnt;
    __syncthreads();
    for (int w = kThreads / 2; w > 0; w /= 2) {
      if (t < w) {
        rs[t] += rs[t + w];
        rc[t] += rc[t + w];
      }
      __syncthreads();
    }
    if (t == 0) {
      const int64_t b = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
      part_sum[b] = rs[0];
      part_cnt[b] = rc[0];
    }
  }
}

// ---- tri_pos_dist_kernel -------------------------------------------------------------------------------------
// d_ap = |x^_a - y^_p| for every positive pair q (anchor[q], col[q]) from the row differences (exact 0 for equal
// rows, as the reference's cdist), accumulated in double. One warp per pair: lane-strided partial sums, then
// lane 0 adds the 32 partials in order. grid ceil(P / 8), 256 threads; rows have leading dimension ld.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    tri_pos_dist_kernel(const T* __restrict__ X, const T* __restrict__ Y, int64_t ld, int64_t d,
                        const int64_t* __restrict__ anchor, const int64_t* __restrict__ col, int64_t npos,
                        float* __restrict__ out) {
  __shared__ double red[kThreads];
  const int t = threadIdx.x, lane = t % 32, w = t / 32;
  const int64_t q = int64_t(blockIdx.x) * kWarps + w;
  double ss = 0.0;
  if (q < npos) {
    const T* u = X + anchor[q] * ld;
    const T* v = Y + col[q] * ld;
    for (int64_t k = lane; k < d; k += 32) {
      const double diff = double(tri_f(u[k])) - double(tri_f(v[k]));
      ss += diff * diff;
    }
  }
  red[t] = ss;
  __syncthreads();
  if (lane == 0 && q < npos) {
    double s = 0.0;
    for (int i = 0; i < 32; ++i) s += red[w * 32 + i];
    out[q] = static_cast<float>(sqrt(s));
  }
}

// ---- tri_pos_grad_kernel -------------------------------------------------------------------------------------
// The anchor-positive part of the gradient: out[i] += sum_e w[widx[e]] (own_i - other_{oidx[e]}) over the list
// ptr[i] .. ptr[i + 1] of row i (dx: the anchor's positive pairs; dy: the pairs whose positive is row i, with the
// anchors as `other`), in list order. grid n rows, 128 threads over the d columns; out fp32 [n, d], rows of own /
// other have leading dimension ld.
template <typename T>
__global__ void __launch_bounds__(128)
    tri_pos_grad_kernel(const int64_t* __restrict__ ptr, const int64_t* __restrict__ widx,
                        const int64_t* __restrict__ oidx, const float* __restrict__ w, const T* __restrict__ own,
                        const T* __restrict__ other, int64_t ld, int64_t d, float* __restrict__ out) {
  const int64_t i = blockIdx.x;
  const int64_t e0 = ptr[i], e1 = ptr[i + 1];
  if (e0 == e1) return;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
    const float o = tri_f(own[i * ld + k]);
    float acc = 0.f;
    for (int64_t e = e0; e < e1; ++e) acc += w[widx[e]] * (o - tri_f(other[oidx[e] * ld + k]));
    out[i * d + k] += acc;
  }
}

// Weight functor of pair_grad_kernel (pair_tiles.cuh): G_an = #{p in P_a : active (a, p, n)} * c / d_an on a
// negative pair with d_an > 0, else 0 (the zero subgradient of the distance at 0, and no weight off the negatives).
// c = 2^-e with 2^e >= max |P_a| keeps |G| <= 1 / d_an, well inside the fp16 range of the G tile; the host folds
// 2^e and grad / count into the reduction's scale.
struct TripletOp {
  const int32_t* cls_x;
  const int32_t* cls_y;
  const float* xsq;
  const float* ysq;
  const int64_t* pos_ptr;
  const float* pos_dist;
  float margin;
  float c;
  static constexpr bool kGz = false;
  struct XInfo {
    int32_t row, cls;
    float sq;
    int32_t np;
  };
  struct YInfo {
    int32_t cls;
    float sq;
  };
  __device__ __forceinline__ void load() {}
  __device__ __forceinline__ XInfo xinfo(int64_t i) const {
    return {int32_t(i), cls_x[i], xsq[i], int32_t(pos_ptr[i + 1] - pos_ptr[i])};
  }
  __device__ __forceinline__ YInfo yinfo(int64_t j) const { return {cls_y[j], ysq[j]}; }
  __device__ __forceinline__ float weight(const XInfo& a, const YInfo& b, bool /*same_index*/, float s) const {
    if (a.np == 0 || a.cls == b.cls) return 0.f;  // zeroed infos (outside the matrix) land here too
    const float dan = tri_distance(s, a.sq, b.sq);
    if (!(dan > 0.f)) return 0.f;
    const float* pd = pos_dist + pos_ptr[a.row];
    int n = 0;
    for (int k = 0; k < a.np; ++k) n += tri_hinge(pd[k], dan, margin) > 0.f ? 1 : 0;
    return n == 0 ? 0.f : float(n) * c / dan;
  }
};

}  // namespace tri
}  // namespace cuda
}  // namespace flashdml
