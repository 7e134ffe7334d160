// Device pieces shared by the pair-loss CUDA backends (xent.cu: cross-example softmax / NT-Xent; hinge_pair.cu:
// TCM / margin contrastive), on top of tile_gemm.cuh:
//  * s_tile_rect: the 64 x 64 S tile of x [nx, d] against y [ny, d] with nx != ny;
//  * pair_grad_kernel: the weighted-gradient pass dx = G y or dy = G^T x, G given per element by a functor;
//  * pair_reduce_kernel: sums the per-split partial products in a fixed order and applies a device scalar.
// Everything here is a template (each .cu instantiates its own; no duplicate host stubs at link time) and free
// of ATen, so the emulation harness (tests/cuda_emulation) compiles it too.
// The pair-loss kernels only take the 16-byte vector-load path of tile_gemm.cuh (`vec` = true): the host hands
// them rows whose base is 16-byte aligned and whose length d is a multiple of TileCfg<T>::kVW, zero-padding a
// copy when the input is not (zero columns add exact zeros to every product, so S is unchanged). Compiling
// only that path keeps the scalar loads' hoisted addresses out of the (256, 2) register budget.
#pragma once

#include <cstdint>
#include <type_traits>

#include "flashdml/common.h"
#include "tile_gemm.cuh"

namespace flashdml {
namespace cuda {
namespace pair {

// St[n * kLdS + m] = A[row0 + m] . B[col0 + n] for m < min(64, na - row0), n < min(64, nb - col0) (others 0).
// s_tile zero-fills local rows at or past one bound shared by both operands; shifting each operand's base
// pointer by (64 - its valid rows) gives every operand its own bound while every load still reads the same
// address (A + (row0 + l) d). The k loop and the products are those of s_tile, so two calls on the same
// (x rows, y rows) tile give bitwise the same values. (The shifted base may point before the allocation when
// na < 64; only in-bounds addresses are dereferenced, and d % kVW == 0 keeps it 16-byte aligned.)
template <typename T, bool kTF32 = false>
__device__ __forceinline__ void s_tile_rect(const T* __restrict__ A, int64_t na, const T* __restrict__ Bm, int64_t nb,
                                            int64_t d, int64_t row0, int64_t col0, void* Xs, void* Ys, float* St) {
  const int64_t sa = na - row0 >= kBM ? 0 : kBM - (na - row0);
  const int64_t sb = nb - col0 >= kBN ? 0 : kBN - (nb - col0);
  s_tile<T, kTF32>(A + (row0 - sa) * d, Bm + (col0 - sb) * d, kBM, d, sa, sb, /*vec=*/true, Xs, Ys, St);
}

// ---- pair_grad_kernel ------------------------------------------------------------------------------------
// grid (ceil(nout / 64), 1, nsplit), 256 threads: the structure of bs_grad_kernel (batch softmax) for a
// rectangular S and any per-element weight. Block (rb, 0, s): output rows 64 rb .. (rows of x when kOutY = false
// -> dx, rows of y when kOutY = true -> dy), all d output columns, tiles of the other side in split s. Per tile:
// S tile and weights g = op.weight(...) -> Gt (GType: the input type on the tensor-core path; ops keep
// |g| <= 2^14), each computed once; then for each chunk of kDV columns of d: acc += G * (other side's rows,
// those columns). kChunked = false (the host's choice when d <= kDV: one chunk): the 64 x kDV accumulator stays
// in registers across the tiles and is stored once at the end; with 16-bit rows and d <= 64 the product is
// kW = kDVNarrow = 64 columns wide instead of kDV = 128 (no half of it zero padding; pair_grad_kernel_for).
// kChunked = true (any d): each chunk's running sum lives in this block's own rows of part[s] (unscaled fp32): read back (GbProduct::load; nothing to read on
// the split's first tile), multiplied, stored again. Two instantiations rather than a run-time branch: the
// accumulator live across the S tile in the first and the chunk loop's state in the second do not both fit the
// (256, 2) register budget (a run-time branch spilled 8-16 bytes, bs_grad_kernel fp16 / bf16 on sm_80). Only
// this block touches those rows and each thread reads back what it wrote itself, so it is deterministic and needs
// no atomics or extra barriers. With Op::kGz the block also writes the sum of g s over
// its entries to gz_part[s * gridDim.x + rb] (once per block: g is formed once per tile).
// Splits are never empty (plan_splits), so every block writes all of its rows of part[s].
// The S tile of the dy pass: kExact = false computes it as y x^T (natural layout); kExact = true computes it as
// x y^T, the exact call the forward made on that tile, so the weights see bitwise the forward's values (needed
// where a weight is a threshold test on s), and reads it transposed with a conflict-free thread mapping.
// Op (by value): struct XInfo, YInfo (per-row data of x / y, trivially copyable); XInfo xinfo(i), YInfo yinfo(j);
// void load() (reads device scalars once per thread); float weight(XInfo, YInfo, bool same_index, float s)
// (must not trap on zeroed infos: entries outside the matrix are evaluated and then masked); static constexpr
// bool kGz (accumulate sum g s).
// Shared memory: staging 2 x 5120 / 2 x 4352 B (also the per-warp epilogue staging of the chunk loop on the
// tensor-core path, 10240 B); St 17408 B (reused for the B chunk and the final epilogue staging); Gt 9216 /
// 17408 B; 64 tile-side and 64 output-row infos (16 B slots); 32 B = 38944 B (fp16 / bf16), 45600 B (fp32),
// static. (256, 2): <= 128 registers, 2 blocks / SM, no spills (ptxas, sm_80 and sm_90).
template <typename T, class Op, bool kOutY, bool kExact, bool kChunked, bool kTF32 = false,
          int kW = TileCfg<T>::kDV>
__global__ void __launch_bounds__(kThreads, 2)
    pair_grad_kernel(const T* __restrict__ X, const T* __restrict__ Y, int64_t nx, int64_t ny, int64_t d, Op op,
                     int64_t tiles_per_split, float* __restrict__ part, float* __restrict__ gz_part) {
  using C = TileCfg<T>;
  using GType = typename C::GType;
  using OutInfo = std::conditional_t<kOutY, typename Op::YInfo, typename Op::XInfo>;
  using TileInfo = std::conditional_t<kOutY, typename Op::XInfo, typename Op::YInfo>;
  static_assert(kOutY || !kExact, "kExact only changes the dy pass");
  static_assert(sizeof(TileInfo) <= 16 && sizeof(OutInfo) <= 16, "row info too large");
  constexpr int kOffY = C::kStageBytes;
  constexpr int kOffS = 2 * C::kStageBytes;
  constexpr int kOffG = kOffS + kBN * kLdS * 4;
  constexpr int kOffInfo = kOffG + round_up(kBN * C::kLdG * int(sizeof(GType)), 128);
  constexpr int kOffOut = kOffInfo + kBN * 16;
  constexpr int kOffRed = kOffOut + kBM * 16;
  constexpr int kBytes = kOffRed + kWarps * 4;
  static_assert(kBN * C::kLdY * int(sizeof(typename C::Raw)) <= kBN * kLdS * 4, "Yc fits in St");
  static_assert(kWarps * 16 * 20 * 4 <= kBN * kLdS * 4, "epilogue staging fits in St");
  __shared__ __align__(128) unsigned char smem[kBytes];
  void* Xs = smem;
  void* Ys = smem + kOffY;
  float* St = reinterpret_cast<float*>(smem + kOffS);
  void* Yc = smem + kOffS;  // aliases St once the weights are formed
  GType* Gt = reinterpret_cast<GType*>(smem + kOffG);
  TileInfo* tinfo = reinterpret_cast<TileInfo*>(smem + kOffInfo);
  OutInfo* oinfo = reinterpret_cast<OutInfo*>(smem + kOffOut);  // in shared memory, not registers: the (256, 2)
                                                                 // register budget is spent on the accumulators
  float* red = reinterpret_cast<float*>(smem + kOffRed);

  const T* Out = kOutY ? Y : X;  // rows of the gradient this block writes
  const T* Oth = kOutY ? X : Y;  // rows the tiles run over (the second product's B operand)
  const int64_t nout = kOutY ? ny : nx, noth = kOutY ? nx : ny;
  const int t = threadIdx.x;
  // Entry mapping: thread owns output row r and 16 tile columns c = cb + cs * cc. Natural layout (St[c][r]):
  // r = t % 64, 16 consecutive c. Transposed read (St[r][c]): 8 rows x 4 columns per warp, so the 32 lanes hit
  // 32 different banks (kLdS = 68 = 4 mod 32) and still own one output row each.
  const int r = kExact ? 8 * (t / 32) + (t % 32) / 4 : t % kBM;
  const int cb = kExact ? t % 4 : (t / kBM) * (kBN / 4);
  constexpr int cs = kExact ? 4 : 1;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t go = row0 + r;
  Op o = op;
  o.load();
  if (t < kBM) {  // visible after the first in-loop barrier
    OutInfo oi{};
    if (row0 + t < nout) {
      if constexpr (kOutY) oi = o.yinfo(row0 + t); else oi = o.xinfo(row0 + t);
    }
    oinfo[t] = oi;
  }
  const int64_t ntiles = (noth + kBN - 1) / kBN;
  const int64_t tile_begin = int64_t(blockIdx.z) * tiles_per_split;
  const int64_t tile_end = tile_begin + tiles_per_split < ntiles ? tile_begin + tiles_per_split : ntiles;
  float* stage = static_cast<float*>(Xs);  // kChunked: free between s_tile calls; kWarps x 16 x 20 floats (wmma)
  static_assert(!C::kTensorCore || 2 * C::kStageBytes >= kWarps * 16 * 20 * 4, "chunk-loop staging fits in Xs, Ys");

  GbProduct<T, kW> prod;
  prod.zero();
  float gz = 0.f;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t col0 = tile * kBN;
    __syncthreads();  // the previous tile's Gt, Yc (= St), tinfo, staging are fully consumed
    if (t < kBN) {
      TileInfo ti{};
      if (col0 + t < noth) {
        if constexpr (kOutY) ti = o.xinfo(col0 + t); else ti = o.yinfo(col0 + t);
      }
      tinfo[t] = ti;
    }
    if constexpr (kExact) {
      s_tile_rect<T, kTF32>(X, nx, Y, ny, d, col0, row0, Xs, Ys, St);  // x rows col0.. vs y rows row0..
    } else {
      s_tile_rect<T, kTF32>(Out, nout, Oth, noth, d, row0, col0, Xs, Ys, St);
    }
    __syncthreads();  // St, tinfo visible
    // Valid tile columns (0 for a row outside the matrix) and the local column of the pair (i, i), in int.
    const int ncols = go < nout ? (noth - col0 < kBN ? int(noth - col0) : kBN) : 0;
    const int cdiag = go >= col0 && go < col0 + kBN ? int(go - col0) : -1;
#pragma unroll  // fully: partial unrolling spills at the (256, 2) cap (bf16, sm_80)
    for (int cc = 0; cc < kBN / 4; ++cc) {
      const int c = cb + cs * cc;
      // Branch-free: every entry is evaluated (outside the matrix St is 0 and the infos are zeroed), then
      // masked by a select (a weight of garbage input may be inf / NaN; the select still gives 0).
      const float s = kExact ? St[r * kLdS + c] : St[c * kLdS + r];
      float g;
      if constexpr (kOutY) g = o.weight(tinfo[c], oinfo[r], c == cdiag, s); else g = o.weight(oinfo[r], tinfo[c], c == cdiag, s);
      g = c < ncols ? g : 0.f;
      if constexpr (Op::kGz) gz = fmaf(g, s, gz);
      Gt[c * C::kLdG + r] = from_float<GType>(g);
    }
    gb_tile_products<T, kChunked, kW>(prod, Gt, Yc, Oth, noth, d, col0, /*vec=*/true,
                                  part + int64_t(blockIdx.z) * nout * d, nout, row0, tile == tile_begin, stage);
  }
  if constexpr (!kChunked) {
    __syncthreads();  // all products done: the St region is free for the epilogue staging
    prod.store(part + int64_t(blockIdx.z) * nout * d, d, row0, nout, int64_t(blockIdx.y) * kW, d, St);
  }

  if constexpr (Op::kGz) {
    if (gz_part != nullptr) {  // uniform per block
#pragma unroll
      for (int off = 16; off > 0; off /= 2) gz += __shfl_xor_sync(0xffffffffu, gz, off);
      if (t % 32 == 0) red[t / 32] = gz;
      __syncthreads();
      if (t == 0) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += red[w];
        gz_part[int64_t(blockIdx.z) * gridDim.x + blockIdx.x] = s;
      }
    }
  }
}

// The pair_grad_kernel instantiation a launch of d columns uses (gb_plan): kChunked iff d > kDV, a kDVNarrow-wide
// product iff d <= kDVNarrow (16-bit rows; for fp32 that is the kDV instantiation); kTF32 iff the op call decided
// TF32 and the rows are fp32 (fp16 / bf16 have one flavour). Host code (the .cu files, the emulation).
template <typename T, class Op, bool kOutY, bool kExact>
auto pair_grad_kernel_for(int64_t d, bool tf32) {
  constexpr bool kTf = std::is_same_v<T, float>;
  constexpr int kN = TileCfg<T>::kDVNarrow;
  const GbPlan plan = gb_plan<T>(d);
  if (plan == GbPlan::kNarrow) {
    return tf32 ? pair_grad_kernel<T, Op, kOutY, kExact, false, kTf, kN>
                : pair_grad_kernel<T, Op, kOutY, kExact, false, false, kN>;
  }
  if (plan == GbPlan::kOne) {
    return tf32 ? pair_grad_kernel<T, Op, kOutY, kExact, false, kTf>
                : pair_grad_kernel<T, Op, kOutY, kExact, false, false>;
  }
  return tf32 ? pair_grad_kernel<T, Op, kOutY, kExact, true, kTf> : pair_grad_kernel<T, Op, kOutY, kExact, true, false>;
}

// ---- pair_reduce_kernel ----------------------------------------------------------------------------------
// out[row][col] = *scale * sum_s part[s][row][col] (splits in order) for col < d_out; part rows have d_in >= d_out
// columns (the padded length). Grid-stride over rows * d_out elements.
template <typename T>
__global__ void pair_reduce_kernel(const float* __restrict__ part, int nsplit, int64_t rows, int64_t d_in,
                                   int64_t d_out, const float* __restrict__ scale, T* __restrict__ out) {
  const float k = __ldg(scale);
  const int64_t total = rows * d_out, stride = rows * d_in;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t src = d_in == d_out ? e : (e / d_out) * d_in + e % d_out;
    float s = 0.f;
    for (int sp = 0; sp < nsplit; ++sp) s += part[sp * stride + src];
    out[e] = from_float<T>(k * s);
  }
}

}  // namespace pair
}  // namespace cuda
}  // namespace flashdml
