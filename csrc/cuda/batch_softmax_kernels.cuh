// Device kernels of the batch softmax CUDA backend (docs/spec.md §2.1); host wrappers and registration live in
// batch_softmax.cu, the only file that includes this one. Kept free of ATen so the kernels can also be
// compiled on their own (e.g. by a host-side emulation harness); see batch_softmax.cu for the pipeline.
#pragma once

#include <cstdint>
#include <type_traits>

#include "flashdml/batch_softmax.h"
#include "flashdml/common.h"
#include "flashdml/online_lse.h"
#include "tile_gemm.cuh"

namespace flashdml {
namespace cuda {
namespace bs {

// ---- bs_lse_kernel ---------------------------------------------------------------------------------------
// grid (ceil(n / 64), nsplit), 256 threads. Block (rb, s): rows 64 rb .. 64 rb + 63 of A against column tiles
// [s tps, min((s + 1) tps, ceil(n / 64))) of B. Per tile: s_tile (K loop over all of d), then thread t owns
// row r = t % 64 and columns 16 (t / 64) .. + 15 of the tile (reads St[c][r]: consecutive lanes, consecutive
// words, no bank conflicts) and folds the allowed z = S / tau of the tile into its own OnlineLse (one merge
// of the tile's (max, sum) per tile). At the end the 4 states of a row are merged in a fixed order into the
// split's partial (max, sum). The one thread that meets gi == gj writes z_ii to diag[gi] (each column lies in
// exactly one split, so exactly once).
// Shared memory: staging 2 x 5120 B (fp16/bf16) or 2 x 4352 B (fp32) + St 17408 B + column labels 512 B +
// merge 2048 B = 30208 B / 28672 B, static (< 48 KiB).
// (256, 2): without a minimum block count ptxas (CUDA 13.0, sm_80) keeps the fp32 version at 64 registers and
// spills 28 bytes (8 bytes of stack) once expf is the accurate version (no --use_fast_math); with it, 96-110
// registers and no spills on sm_80 / sm_90 (the fp16 / bf16 versions used 72 / 90 before: 2 instead of 3 blocks
// per SM by registers for fp16, which only a GPU can say whether it matters).
template <typename T, bool kTF32 = false>
__global__ void __launch_bounds__(kThreads, 2)
    bs_lse_kernel(const T* __restrict__ A, const T* __restrict__ Bm, const int64_t* __restrict__ labels,
                  const float* __restrict__ tau, int64_t n, int64_t d, int64_t tiles_per_split, bool vec,
                  float* __restrict__ part_max, float* __restrict__ part_sum, float* __restrict__ diag) {
  using C = TileCfg<T>;
  constexpr int kOffY = C::kStageBytes;
  constexpr int kOffS = 2 * C::kStageBytes;
  constexpr int kOffLab = kOffS + kBN * kLdS * 4;
  constexpr int kOffRed = kOffLab + kBN * 8;
  constexpr int kBytes = kOffRed + 2 * 4 * kBM * 4;
  static_assert(kOffY % 128 == 0 && kOffS % 128 == 0 && kOffLab % 128 == 0 && kOffRed % 128 == 0, "align");
  __shared__ __align__(128) unsigned char smem[kBytes];
  void* Xs = smem;
  void* Ys = smem + kOffY;
  float* St = reinterpret_cast<float*>(smem + kOffS);
  int64_t* lab_c = reinterpret_cast<int64_t*>(smem + kOffLab);
  float* red_max = reinterpret_cast<float*>(smem + kOffRed);
  float* red_sum = red_max + 4 * kBM;

  const int t = threadIdx.x;
  const int r = t % kBM, q = t / kBM;  // tile row, quarter of the tile's columns
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t gi = row0 + r;
  const bool has_labels = labels != nullptr;
  const int64_t lab_i = (has_labels && gi < n) ? labels[gi] : 0;
  const float inv_tau = 1.f / __ldg(tau);
  const int64_t ntiles = (n + kBN - 1) / kBN;
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = tile_begin + tiles_per_split < ntiles ? tile_begin + tiles_per_split : ntiles;

  OnlineLse st;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t col0 = tile * kBN;
    __syncthreads();  // the previous tile's St and lab_c are fully consumed
    if (has_labels && t < kBN) lab_c[t] = col0 + t < n ? labels[col0 + t] : 0;
    s_tile<T, kTF32>(A, Bm, n, d, row0, col0, vec, Xs, Ys, St);
    __syncthreads();  // St and lab_c visible
    // This thread's 16 logits of the tile (-inf where not allowed / outside the matrix), folded into its
    // state as one partial (tile max, sum exp(z - tile max)): 17 exps per 16 entries, no divergent branches.
    float zs[kBN / 4];
    float tmax = kNegInf;
#pragma unroll
    for (int cc = 0; cc < kBN / 4; ++cc) {
      const int c = q * (kBN / 4) + cc;
      const int64_t gj = col0 + c;
      float v = kNegInf;
      if (gi < n && gj < n) {
        const float z = St[c * kLdS + r] * inv_tau;
        const bool same = gi == gj;
        if (same) diag[gi] = z;
        if (batch_softmax_allowed(same, has_labels, lab_i, has_labels ? lab_c[c] : 0)) v = z;
      }
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
  if (t < kBM && gi < n) {  // here q == 0 and r == t
    OnlineLse m;
#pragma unroll
    for (int qq = 0; qq < 4; ++qq) m.merge(red_max[qq * kBM + t], red_sum[qq * kBM + t]);
    part_max[int64_t(blockIdx.y) * n + gi] = m.max;
    part_sum[int64_t(blockIdx.y) * n + gi] = m.sum;
  }
}

// ---- finalize_lse_kernel ---------------------------------------------------------------------------------
// One thread per row: merges the nsplit partials in split order -> lse[i]; terms[i] = lse_i - z_ii.
__global__ void finalize_lse_kernel(const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                    const float* __restrict__ diag, int nsplit, int64_t n, float* __restrict__ lse,
                                    float* __restrict__ terms) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  OnlineLse st;
  for (int s = 0; s < nsplit; ++s) st.merge(part_max[s * n + i], part_sum[s * n + i]);
  const float v = st.value();
  lse[i] = v;
  terms[i] = v - diag[i];
}

// ---- scaled_sum_kernel -----------------------------------------------------------------------------------
// out[0] = host_scale * (mul ? *mul : 1) / (div ? *div : 1) * sum(v[0 .. len)). One block of 512 threads:
// strided per-thread sums, then a fixed shared-memory tree -> deterministic.
constexpr int kSumThreads = 512;
__global__ void __launch_bounds__(kSumThreads)
    scaled_sum_kernel(const float* __restrict__ v, int64_t len, float host_scale, const float* __restrict__ mul,
                      const float* __restrict__ div, float* __restrict__ out) {
  __shared__ float red[kSumThreads];
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < len; i += kSumThreads) s += v[i];
  red[threadIdx.x] = s;
  __syncthreads();
  for (int w = kSumThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float scale = host_scale;
    if (mul != nullptr) scale *= *mul;
    if (div != nullptr) scale /= *div;
    out[0] = scale * red[0];
  }
}

// ---- bs_grad_kernel --------------------------------------------------------------------------------------
// grid (ceil(n / 64), 1, nsplit), 256 threads; kDV = 128 (fp16/bf16) or 64 (fp32).
// Block (rb, 0, s): rows 64 rb .. of A, all d output columns of the gradient, column tiles of split s.
// Per tile, once: S tile (K loop over all of d), then thread (r = t % 64, q = t / 64) turns its 16 entries into
// the unscaled weight g (batch_softmax.h) and writes it to Gt[c][r] (GType: the input type on the tensor-core
// path, |g| <= 2 so no range trouble). Then, for each chunk of kDV columns of d:
// acc[64 x kDV] += G * B[col0 .. + 63][chunk]. kChunked = false (the host's choice for d <= kDV): the accumulator
// stays in registers across the tiles and is stored once at the end; kChunked = true (any d): each chunk's running
// sum is kept in this block's own rows of part[s] and read back on the next tile (GbProduct::load / store, the
// same element-to-thread mapping: deterministic, no atomics, no extra barrier), as in pair_grad_kernel
// (pair_tiles.cuh, which also says why these are two instantiations and not a run-time branch).
// Epilogue: acc (unscaled, fp32) -> part[s][row][col]; the block also writes sum(g z) of its entries to
// dtau_part[s * gridDim.x + rb] when dtau_part is given.
// lse_r is indexed by A's rows, lse_c by B's rows; either may be null (term absent).
//   dx: A = x, B = y, lse_r = row_lse, lse_c = symmetric ? col_lse : null
//   dy: A = y, B = x, lse_r = symmetric ? col_lse : null, lse_c = row_lse   (S^T entries, same g_ij)
// Shared memory: staging 2 x 5120 / 2 x 4352 B (also the per-warp staging of the chunk loop's partial sums on
// the tensor-core path, 10240 B); St 17408 B, which is reused for the B chunk Yc (64 x 136 x 2 B
// = 64 x 68 x 4 B = 17408 B) once St is consumed and for the final epilogue staging (10240 B); Gt 9216 B (16-bit)
// or 17408 B (fp32); labels / lse of the tile's columns 768 B; 32 B reduction = 37664 B (fp16/bf16),
// 44320 B (fp32): static, < 48 KiB. __launch_bounds__(256, 2) caps registers at 128 so that 2 blocks (16 warps)
// fit per SM; the 64 x kDV accumulator takes 32 of them (tensor cores) or 16 (fp32). kW: the product's width,
// kDV or (16-bit rows, d <= 64: bs_grad_kernel_for) kDVNarrow = 64, whose accumulator takes 16 registers.
template <typename T, bool kChunked, bool kTF32 = false, int kW = TileCfg<T>::kDV>
__global__ void __launch_bounds__(kThreads, 2)
    bs_grad_kernel(const T* __restrict__ A, const T* __restrict__ Bm, const int64_t* __restrict__ labels,
                   const float* __restrict__ tau, const float* __restrict__ lse_r, const float* __restrict__ lse_c,
                   int64_t n, int64_t d, int64_t tiles_per_split, bool vec, float* __restrict__ part,
                   float* __restrict__ dtau_part) {
  using C = TileCfg<T>;
  using GType = typename C::GType;
  constexpr int kOffY = C::kStageBytes;
  constexpr int kOffS = 2 * C::kStageBytes;
  constexpr int kOffG = kOffS + kBN * kLdS * 4;
  constexpr int kOffLab = kOffG + round_up(kBN * C::kLdG * int(sizeof(GType)), 128);
  constexpr int kOffLse = kOffLab + kBN * 8;
  constexpr int kOffRed = kOffLse + kBN * 4;
  constexpr int kBytes = kOffRed + kWarps * 4;
  static_assert(kBN * C::kLdY * int(sizeof(typename C::Raw)) <= kBN * kLdS * 4, "Yc fits in St");
  static_assert(kWarps * 16 * 20 * 4 <= kBN * kLdS * 4, "epilogue staging fits in St");
  static_assert(kOffS % 128 == 0 && kOffG % 128 == 0 && kOffLab % 128 == 0, "align");
  __shared__ __align__(128) unsigned char smem[kBytes];
  void* Xs = smem;
  void* Ys = smem + kOffY;
  float* St = reinterpret_cast<float*>(smem + kOffS);
  void* Yc = smem + kOffS;  // aliases St (see above)
  GType* Gt = reinterpret_cast<GType*>(smem + kOffG);
  int64_t* lab_c = reinterpret_cast<int64_t*>(smem + kOffLab);
  float* lse_cs = reinterpret_cast<float*>(smem + kOffLse);
  float* red = reinterpret_cast<float*>(smem + kOffRed);

  const int t = threadIdx.x;
  const int r = t % kBM, q = t / kBM;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t gi = row0 + r;
  const bool has_labels = labels != nullptr;
  const bool use_r = lse_r != nullptr, use_c = lse_c != nullptr;
  const int64_t lab_i = (has_labels && gi < n) ? labels[gi] : 0;
  const float lse_i = (use_r && gi < n) ? lse_r[gi] : 0.f;
  const float inv_tau = 1.f / __ldg(tau);
  const int64_t ntiles = (n + kBN - 1) / kBN;
  const int64_t tile_begin = int64_t(blockIdx.z) * tiles_per_split;
  const int64_t tile_end = tile_begin + tiles_per_split < ntiles ? tile_begin + tiles_per_split : ntiles;

  float* stage = static_cast<float*>(Xs);  // kChunked: free between s_tile calls; kWarps x 16 x 20 floats (wmma)
  static_assert(!C::kTensorCore || 2 * C::kStageBytes >= kWarps * 16 * 20 * 4, "chunk-loop staging fits in Xs, Ys");

  GbProduct<T, kW> prod;
  prod.zero();
  float gz = 0.f;  // sum of g * z over this thread's entries (for dtemperature)
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t col0 = tile * kBN;
    __syncthreads();  // the previous tile's Gt, Yc (= St), lab_c, lse_cs, staging are fully consumed
    if (t < kBN) {
      const int64_t gj = col0 + t;
      lab_c[t] = (has_labels && gj < n) ? labels[gj] : 0;
      lse_cs[t] = (use_c && gj < n) ? lse_c[gj] : 0.f;
    }
    s_tile<T, kTF32>(A, Bm, n, d, row0, col0, vec, Xs, Ys, St);
    __syncthreads();  // St, lab_c, lse_cs visible
#pragma unroll
    for (int cc = 0; cc < kBN / 4; ++cc) {
      const int c = q * (kBN / 4) + cc;
      const int64_t gj = col0 + c;
      float g = 0.f;  // entries outside the matrix get weight 0
      if (gi < n && gj < n) {
        const float z = St[c * kLdS + r] * inv_tau;
        const bool same = gi == gj;
        const bool allowed = batch_softmax_allowed(same, has_labels, lab_i, lab_c[c]);
        if (use_r) g += batch_softmax_dz_term(z, lse_i, allowed, same);
        if (use_c) g += batch_softmax_dz_term(z, lse_cs[c], allowed, same);
        gz = fmaf(g, z, gz);
      }
      Gt[c * C::kLdG + r] = from_float<GType>(g);
    }
    // Yc is not prefetched before the weights on purpose: holding 16 more registers there costs spills at the
    // 128-register cap that keeps 2 blocks (16 warps) per SM; the other resident block hides this latency.
    gb_tile_products<T, kChunked, kW>(prod, Gt, Yc, Bm, n, d, col0, vec, part + int64_t(blockIdx.z) * n * d, n, row0,
                                  tile == tile_begin, stage);
  }
  if constexpr (!kChunked) {
    __syncthreads();  // all products done: the St region is free for the epilogue staging
    prod.store(part + int64_t(blockIdx.z) * n * d, d, row0, n, int64_t(blockIdx.y) * kW, d, St);
  }

  if (dtau_part != nullptr) {  // uniform per block
#pragma unroll
    for (int off = 16; off > 0; off /= 2) gz += __shfl_xor_sync(0xffffffffu, gz, off);
    if (t % 32 == 0) red[t / 32] = gz;
    __syncthreads();
    if (t == 0) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += red[w];
      dtau_part[int64_t(blockIdx.z) * gridDim.x + blockIdx.x] = s;
    }
  }
}

// ---- reduce_splits_kernel --------------------------------------------------------------------------------
// out[e] = (host_scale * grad / tau) * sum_s part[s][e], splits summed in order; grid-stride over n * d.
template <typename T>
__global__ void reduce_splits_kernel(const float* __restrict__ part, int nsplit, int64_t total, float host_scale,
                                     const float* __restrict__ grad, const float* __restrict__ tau,
                                     T* __restrict__ out) {
  const float scale = host_scale * __ldg(grad) / __ldg(tau);
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int sp = 0; sp < nsplit; ++sp) s += part[sp * total + e];
    out[e] = from_float<T>(scale * s);
  }
}

// The bs_grad_kernel instantiation a launch of d columns uses (gb_plan, as pair_grad_kernel_for): kChunked iff
// d > kDV, a kDVNarrow-wide product iff d <= kDVNarrow; kTF32 iff tf32 and the rows are fp32. Host code.
template <typename T>
auto bs_grad_kernel_for(int64_t d, bool tf32) {
  constexpr bool kTf = std::is_same_v<T, float>;
  constexpr int kN = TileCfg<T>::kDVNarrow;
  const GbPlan plan = gb_plan<T>(d);
  if (plan == GbPlan::kNarrow) return tf32 ? bs_grad_kernel<T, false, kTf, kN> : bs_grad_kernel<T, false, false, kN>;
  if (plan == GbPlan::kOne) return tf32 ? bs_grad_kernel<T, false, kTf> : bs_grad_kernel<T, false, false>;
  return tf32 ? bs_grad_kernel<T, true, kTf> : bs_grad_kernel<T, true, false>;
}

}  // namespace bs
}  // namespace cuda
}  // namespace flashdml
