// CUDA-only tile helpers for the "S tile" kernels: S[m][n] = sum_k A[row0 + m][k] * B[col0 + n][k] over a
// 64 x 64 tile, recomputed on the fly (FlashAttention pattern), plus the second product acc += G * Bchunk that
// backward passes use (dx = G y). All math accumulates in fp32.
//
// One block = kThreads = 256 threads (8 warps). Two flavours, chosen by the element type T:
//  * fp16 / bf16 (TileCfg<T>::kTensorCore): nvcuda::wmma 16x16x16 tensor-core MMA, fp32 accumulate.
//      K slice kBK = 32; staging Xs/Ys row-major [64][kBK + 8] (16-byte loads/stores, 80-byte row pitch).
//      S tile: warp w owns rows 16*(w%4).., cols 32*(w/4).. (1 x 2 fragments).
//      G*B product: 64 x kDV (= 128) output, warp w owns rows 32*(w%2).., cols 32*(w/2).. (2 x 2 fragments);
//      or, when d <= kDVNarrow (= 64, the host's choice: gb_plan), 64 x 64 output, warp w owns rows 16*(w%4)..,
//      cols 32*(w/4).. (1 x 2 fragments), so no half of the product is zero padding.
//  * fp32: exact-fp32 SIMT FFMA (no TF32), register tile 4 x 4 per thread (thread t: rows 4*(t/16)..,
//      cols 4*(t%16)..). K slice kBK = 16; staging transposed [kBK][64 + 4] so every k step reads one float4
//      of A and one of B. G*B product: 64 x kDV (= 64) output, same 4 x 4 mapping.
//  * fp32 with kTF32 = true (the host's choice when the user opted into TF32 for fp32 matmuls, see
//      launch_utils.cuh: use_tf32): the S tile only, on tensor cores: nvcuda::wmma m16n16k8 with tf32 operand
//      fragments, each element rounded by __float_to_tf32 (round to nearest, ties away, 10 mantissa bits),
//      fp32 accumulation. Same staging, K slice and block shape as the exact fp32 flavour (the fragments read
//      the transposed buffers as col-major A / row-major B), same warp layout as the 16-bit path (warp w:
//      rows 16*(w%4).., cols 32*(w/4)..). The G*B product stays exact fp32 SIMT.
// Global loads go through one 16-byte chunk per thread per operand per K slice (64 rows x 4 chunks), with a
// register prefetch of the next slice while the current one is multiplied. Rows >= n and k >= d are
// zero-filled, so ragged B and any d >= 1 need no other special case. Vector (16-byte) loads are used only
// when both base pointers are 16-byte aligned and d is a multiple of the chunk width (host decides `vec`).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

namespace flashdml {
namespace cuda {

constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 64;        // rows of A per block
constexpr int kBN = 64;        // rows of B (= columns of S) per tile
constexpr int kLdS = kBM + 4;  // S tile kept column-major in shared memory: St[n * kLdS + m] (fp32)

constexpr int round_up(int v, int m) { return (v + m - 1) / m * m; }

template <typename T>
struct TileCfg;

template <>
struct TileCfg<float> {
  static constexpr bool kTensorCore = false;
  using Raw = uint32_t;                 // bit pattern of one element
  using GType = float;                  // type of the G tile fed to the second product
  static constexpr int kVW = 4;         // elements per 16-byte chunk
  static constexpr int kBK = 16;        // K slice of the S product
  static constexpr int kDV = 64;        // output columns of the G * B product per block
  static constexpr int kDVNarrow = 64;  // no narrower product for fp32 (same as kDV: same instantiation)
  static constexpr int kLdX = kBM + 4;  // Xs[k][m], Ys[k][n] (transposed staging)
  static constexpr int kStageBytes = kBK * kLdX * 4;
  static constexpr int kLdG = kBM + 4;  // Gt[k][m] (fp32)
  static constexpr int kLdY = kDV + 4;  // Yc[k][n] (fp32)
};

struct TileCfg16 {
  static constexpr bool kTensorCore = true;
  using Raw = uint16_t;
  static constexpr int kVW = 8;
  static constexpr int kBK = 32;
  static constexpr int kDV = 128;
  static constexpr int kDVNarrow = 64;  // output columns of the one-chunk product when d <= 64
  static constexpr int kLdX = kBK + 8;  // Xs[m][k], Ys[n][k] (row-major staging)
  static constexpr int kStageBytes = kBM * kLdX * 2;
  static constexpr int kLdG = kBM + 8;  // Gt[k][m] (16-bit)
  static constexpr int kLdY = kDV + 8;  // Yc[k][n] (16-bit)
};
template <>
struct TileCfg<__half> : TileCfg16 {
  using GType = __half;
};
template <>
struct TileCfg<__nv_bfloat16> : TileCfg16 {
  using GType = __nv_bfloat16;
};

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Loads the 16-byte chunk base[row][k .. k + kVW) of a row-major [nrows, ncols] matrix; elements outside the
// matrix read as 0. `vec` promises 16-byte alignment and ncols % kVW == 0 (then k < ncols implies the whole
// chunk is inside the row, because k is always a multiple of kVW).
template <typename T>
__device__ __forceinline__ uint4 load_chunk(const T* __restrict__ base, int64_t row, int64_t nrows, int64_t k,
                                            int64_t ncols, bool vec) {
  using Raw = typename TileCfg<T>::Raw;
  constexpr int VW = TileCfg<T>::kVW;
  constexpr int kPerWord = 4 / int(sizeof(Raw));  // elements per 32-bit word: 2 (16-bit types) or 1 (fp32)
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (row < nrows && k < ncols) {
    const Raw* src = reinterpret_cast<const Raw*>(base) + row * ncols + k;
    if (vec) {
      v = __ldg(reinterpret_cast<const uint4*>(src));
    } else {  // ragged d: element by element, packed little-endian into the four 32-bit words
      uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int e = 0; e < VW; ++e) {
        if (k + e < ncols) w[e / kPerWord] |= uint32_t(__ldg(src + e)) << (16 * (e % kPerWord));
      }
      v = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
  return v;
}

// Puts the chunk of (local) row `row`, columns kc .. kc + kVW into the K-slice staging buffer.
template <typename T>
__device__ __forceinline__ void stage_chunk(void* buf, int row, int kc, uint4 v) {
  using C = TileCfg<T>;
  if constexpr (C::kTensorCore) {
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(buf) + row * C::kLdX + kc) = v;  // Xs[row][kc..]
  } else {
    float* xs = static_cast<float*>(buf);  // transposed: Xs[k][row]
    xs[(kc + 0) * C::kLdX + row] = __uint_as_float(v.x);
    xs[(kc + 1) * C::kLdX + row] = __uint_as_float(v.y);
    xs[(kc + 2) * C::kLdX + row] = __uint_as_float(v.z);
    xs[(kc + 3) * C::kLdX + row] = __uint_as_float(v.w);
  }
}

// acc[a][b] += sum_{k < K} As[k * lda + 4 ty + a] * Bs[k * ldb + 4 tx + b]   (exact fp32 FFMA)
template <int K>
__device__ __forceinline__ void simt_mma_4x4(float (&acc)[4][4], const float* As, int lda, const float* Bs, int ldb,
                                             int ty, int tx) {
#pragma unroll 8
  for (int k = 0; k < K; ++k) {
    const float4 a4 = *reinterpret_cast<const float4*>(As + k * lda + 4 * ty);
    const float4 b4 = *reinterpret_cast<const float4*>(Bs + k * ldb + 4 * tx);
    const float av[4] = {a4.x, a4.y, a4.z, a4.w};
    const float bv[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(av[a], bv[b], acc[a][b]);
    }
  }
}

// S tile: St[n * kLdS + m] = sum_k A[row0 + m][k] * B[col0 + n][k], m, n < 64, fp32, rows >= nrows are 0.
// Xs / Ys: two staging buffers of TileCfg<T>::kStageBytes. Contains __syncthreads(); every thread of the block
// must call it. On return St is written by this thread but NOT yet visible to others: the caller syncs.
// The first in-loop barrier also guarantees that every thread has finished whatever it did before the call
// (d >= 1, so the loop runs at least once), so St / Xs / Ys may be reused freely by the caller before.
// Rounds every element of a tf32 operand fragment to TF32 (what the tensor cores multiply; without it they
// would drop the low 13 bits instead of rounding).
template <class Frag>
__device__ __forceinline__ void round_to_tf32(Frag& f) {
#pragma unroll
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = nvcuda::wmma::__float_to_tf32(f.x[i]);
}

// The accumulator of one S tile and the products of one K slice of it, per flavour (see the top of the file).
// Xs / Ys hold the staged slice; store writes the finished tile to St[n * kLdS + m].
template <typename T, bool kTF32, bool kTC = TileCfg<T>::kTensorCore>
struct STileAcc;

// The wmma flavours' accumulator (k = 16 for fp16 / bf16, 8 for TF32): warp w holds the S rows 16 (w % 4) .. and
// columns 32 (w / 4) .. as two 16 x 16 fragments.
template <int kK>
struct WarpPairAcc {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kK, float> acc[2];

  __device__ __forceinline__ void zero() {
    nvcuda::wmma::fill_fragment(acc[0], 0.f);
    nvcuda::wmma::fill_fragment(acc[1], 0.f);
  }
  __device__ __forceinline__ void store(float* St) {
    const int warp = threadIdx.x / 32, wm = warp % 4, wn = warp / 4;
#pragma unroll
    for (int j = 0; j < 2; ++j) {  // (m, n) at St[n * kLdS + m]
      nvcuda::wmma::store_matrix_sync(St + (32 * wn + 16 * j) * kLdS + 16 * wm, acc[j], kLdS,
                                      nvcuda::wmma::mem_col_major);
    }
  }
};

template <typename T, bool kTF32>
struct STileAcc<T, kTF32, true> : WarpPairAcc<16> {  // fp16 / bf16: wmma 16x16x16
  using C = TileCfg<T>;

  __device__ __forceinline__ void slice(const void* Xs, const void* Ys) {
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / 32, wm = warp % 4, wn = warp / 4;
    const T* xs = static_cast<const T*>(Xs);
    const T* ys = static_cast<const T*>(Ys);
#pragma unroll
    for (int kk = 0; kk < C::kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;  // (m, k) at xs[m * ld + k]
      wmma::load_matrix_sync(fa, xs + (16 * wm) * C::kLdX + kk, C::kLdX);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // (k, n) at ys[n * ld + k]
        wmma::load_matrix_sync(fb, ys + (32 * wn + 16 * j) * C::kLdX + kk, C::kLdX);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  }
};

template <typename T>
struct STileAcc<T, false, false> {  // exact fp32 SIMT: thread t: rows 4 (t / 16) .., cols 4 (t % 16) ..
  using C = TileCfg<T>;
  float acc[4][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
    }
  }
  __device__ __forceinline__ void slice(const void* Xs, const void* Ys) {
    simt_mma_4x4<C::kBK>(acc, static_cast<const float*>(Xs), C::kLdX, static_cast<const float*>(Ys), C::kLdX,
                         threadIdx.x / 16, threadIdx.x % 16);
  }
  __device__ __forceinline__ void store(float* St) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int b = 0; b < 4; ++b) {  // column 4 tx + b holds rows 4 ty .. 4 ty + 3
      *reinterpret_cast<float4*>(St + (4 * tx + b) * kLdS + 4 * ty) =
          make_float4(acc[0][b], acc[1][b], acc[2][b], acc[3][b]);
    }
  }
};

template <typename T>
struct STileAcc<T, true, false> : WarpPairAcc<8> {  // fp32 in TF32: wmma m16n16k8 tf32, same warp layout
  using C = TileCfg<T>;
  static_assert(C::kBK % 8 == 0 && C::kLdX % 4 == 0, "k steps of 8; ldm a multiple of 16 bytes");

  __device__ __forceinline__ void slice(const void* Xs, const void* Ys) {
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / 32, wm = warp % 4, wn = warp / 4;
    const float* xs = static_cast<const float*>(Xs);  // transposed staging: (m, k) at xs[k * ld + m]
    const float* ys = static_cast<const float*>(Ys);  //                     (k, n) at ys[k * ld + n]
#pragma unroll
    for (int kk = 0; kk < C::kBK; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fa;
      wmma::load_matrix_sync(fa, xs + kk * C::kLdX + 16 * wm, C::kLdX);
      round_to_tf32(fa);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, ys + kk * C::kLdX + 32 * wn + 16 * j, C::kLdX);
        round_to_tf32(fb);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  }
};

// S tile: St[n * kLdS + m] = sum_k A[row0 + m][k] * B[col0 + n][k], m, n < 64, fp32, rows >= nrows are 0.
// kTF32 (fp32 rows only; ignored for fp16 / bf16): the products on tensor cores in TF32 (STileAcc).
// Xs / Ys: two staging buffers of TileCfg<T>::kStageBytes. Contains __syncthreads(); every thread of the block
// must call it. On return St is written by this thread but NOT yet visible to others: the caller syncs.
// The first in-loop barrier also guarantees that every thread has finished whatever it did before the call
// (d >= 1, so the loop runs at least once), so St / Xs / Ys may be reused freely by the caller before.
template <typename T, bool kTF32 = false>
__device__ __forceinline__ void s_tile(const T* __restrict__ A, const T* __restrict__ Bm, int64_t nrows, int64_t d,
                                       int64_t row0, int64_t col0, bool vec, void* Xs, void* Ys, float* St) {
  using C = TileCfg<T>;
#ifdef FLASHDML_EMULATION
  flashdml_emu_on_s_tile();  // tests/cuda_emulation/emu.h counts the S tiles a launch computes
#endif
  const int t = threadIdx.x;
  const int lrow = t / 4;             // 0..63: local row of the chunk this thread loads
  const int lk = (t % 4) * C::kVW;    // first k of the chunk inside the K slice
  static_assert(kThreads / 4 == kBM && kBM == kBN && 4 * C::kVW == C::kBK, "one chunk per thread per operand");

  uint4 pa = load_chunk<T>(A, row0 + lrow, nrows, lk, d, vec);
  uint4 pb = load_chunk<T>(Bm, col0 + lrow, nrows, lk, d, vec);

  STileAcc<T, kTF32> acc;
  acc.zero();
  for (int64_t k0 = 0; k0 < d; k0 += C::kBK) {
    __syncthreads();  // nobody still reads the staging buffers (or anything from before the call)
    stage_chunk<T>(Xs, lrow, lk, pa);
    stage_chunk<T>(Ys, lrow, lk, pb);
    __syncthreads();
    if (k0 + C::kBK < d) {  // prefetch the next slice while this one is multiplied
      pa = load_chunk<T>(A, row0 + lrow, nrows, k0 + C::kBK + lk, d, vec);
      pb = load_chunk<T>(Bm, col0 + lrow, nrows, k0 + C::kBK + lk, d, vec);
    }
    acc.slice(Xs, Ys);
  }
  acc.store(St);
}

}  // namespace cuda
}  // namespace flashdml

namespace flashdml {
namespace cuda {

// Second product of the backward passes: acc[64 x kDV] += G[64 x 64] * Yc[64 x kDV], where the G tile is kept
// column-major in shared memory as Gt[k * kLdG + m] (GType) and Yc[k * kLdY + n] holds rows col0 .. col0 + 63,
// columns dv0 .. dv0 + kDV - 1 of the B operand (zero outside the matrix). store writes acc to a row-major fp32
// matrix and load reads it back with the same element-to-thread mapping, so a backward pass with d > kDV can keep
// one running sum per chunk of d in global memory while computing each S tile only once.
// kW: the product's output width (columns of d per chunk), TileCfg's kDV or, for the 16-bit one-chunk case
// d <= 64, kDVNarrow; Yc keeps its kLdY pitch either way.
template <typename T, int kW = TileCfg<T>::kDV, bool kTC = TileCfg<T>::kTensorCore>
struct GbProduct;

// 16-byte chunks of the 64 x kW chunk of B per thread (4 for kDV, 2 for the 16-bit kDVNarrow).
template <typename T, int kW>
constexpr int kYcPer = kBN * (kW / TileCfg<T>::kVW) / kThreads;

// Loads (into registers) the 64 x kW chunk of B that the product needs: kYcPer chunks of 16 bytes per thread,
// chunk idx = t + 256 p covers row idx / (kW / kVW), columns (idx % (kW / kVW)) * kVW .. + kVW.
template <typename T, int kW>
__device__ __forceinline__ void load_yc(uint4 (&pre)[kYcPer<T, kW>], const T* __restrict__ Bm, int64_t nrows,
                                        int64_t d, int64_t col0, int64_t dv0, bool vec) {
  using C = TileCfg<T>;
  constexpr int kCpr = kW / C::kVW;  // chunks per row
  static_assert(kBN * kCpr == kYcPer<T, kW> * kThreads && kW <= C::kDV, "Yc chunk mapping");
#pragma unroll
  for (int p = 0; p < kYcPer<T, kW>; ++p) {
    const int idx = threadIdx.x + kThreads * p;
    pre[p] = load_chunk<T>(Bm, col0 + idx / kCpr, nrows, dv0 + (idx % kCpr) * C::kVW, d, vec);
  }
}

template <typename T, int kW>
__device__ __forceinline__ void store_yc(void* Yc, const uint4 (&pre)[kYcPer<T, kW>]) {
  using C = TileCfg<T>;
  using Raw = typename C::Raw;
  constexpr int kCpr = kW / C::kVW;
#pragma unroll
  for (int p = 0; p < kYcPer<T, kW>; ++p) {
    const int idx = threadIdx.x + kThreads * p;
    *reinterpret_cast<uint4*>(static_cast<Raw*>(Yc) + (idx / kCpr) * C::kLdY + (idx % kCpr) * C::kVW) = pre[p];
  }
}

// Tensor cores, 8 warps over the 64 x kW output in 16 x 16 fragments, 32 columns per warp: kW = 128: warp w owns
// rows 32 (w % 2) .., cols 32 (w / 2) .. (2 x 2 frags); kW = 64: rows 16 (w % 4) .., cols 32 (w / 4) .. (1 x 2).
template <typename T, int kW>
struct GbProduct<T, kW, true> {
  using C = TileCfg<T>;
  static_assert(kW == 64 || kW == 128, "8 warps x 32 columns: 64 or 128 output columns");
  static constexpr int kFM = kW / 64;       // fragments per warp along m
  static constexpr int kWM = 4 / kFM;       // warps along m
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[kFM][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kFM; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
    }
  }

  __device__ __forceinline__ void mma(const void* Gt_, const void* Yc_) {
    namespace wmma = nvcuda::wmma;
    const T* Gt = static_cast<const T*>(Gt_);
    const T* Yc = static_cast<const T*>(Yc_);
    const int warp = threadIdx.x / 32;
    const int wm = warp % kWM, wn = warp / kWM;
#pragma unroll 1
    for (int kk = 0; kk < kBN; kk += 16) {  // not unrolled: keeps only one k step of fragments live
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[kFM];  // (m, k) at Gt[k * ld + m]
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];    // (k, n) at Yc[k * ld + n]
#pragma unroll
      for (int i = 0; i < kFM; ++i) {
        wmma::load_matrix_sync(fa[i], Gt + kk * C::kLdG + 16 * kFM * wm + 16 * i, C::kLdG);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Yc + kk * C::kLdY + 32 * wn + 16 * j, C::kLdY);
#pragma unroll
      for (int i = 0; i < kFM; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  }

  // out[(row0 + m) * ld + dv0 + n] = acc(m, n) for rows < nrows, columns < ncols. `stage`: kWarps * 320 floats
  // of shared memory nobody else uses now (each warp goes through its own 16 x 20 slice).
  __device__ __forceinline__ void store(float* __restrict__ out, int64_t ld, int64_t row0, int64_t nrows,
                                        int64_t dv0, int64_t ncols, float* stage) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp % kWM, wn = warp / kWM;
    float* ws = stage + warp * (16 * 20);
#pragma unroll
    for (int i = 0; i < kFM; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::store_matrix_sync(ws, acc[i][j], 20, nvcuda::wmma::mem_row_major);
        __syncwarp();
#pragma unroll 1  // a rolled loop: unrolled, the 32 global addresses of load / store are hoisted out of a
                  // backward pass's chunk loop and spill at the (256, 2) register cap
        for (int e = 0; e < 8; ++e) {
          const int idx = lane + 32 * e;
          const int rr = idx / 16, cc = idx % 16;
          const int64_t gr = row0 + 16 * kFM * wm + 16 * i + rr;
          const int64_t gc = dv0 + 32 * wn + 16 * j + cc;
          if (gr < nrows && gc < ncols) out[gr * ld + gc] = ws[rr * 20 + cc];
        }
        __syncwarp();
      }
    }
  }

  // The inverse of store: acc(m, n) = in[(row0 + m) * ld + dv0 + n] (0 outside rows < nrows, columns < ncols).
  // `in` is deliberately not const __restrict__: the kernel writes this memory, so the load must not be turned
  // into a read-only-cache (ld.global.nc) load.
  // Every lane reads exactly the global elements it wrote in store (same idx -> (rr, cc) mapping), so a value
  // stored earlier by this block needs no barrier before it is read back here. The values pass through the
  // warp's own 16 x 20 slice of `stage` (the same slices as store), ordered by __syncwarp on both sides.
  __device__ __forceinline__ void load(const float* in, int64_t ld, int64_t row0, int64_t nrows,
                                       int64_t dv0, int64_t ncols, float* stage) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp % kWM, wn = warp / kWM;
    float* ws = stage + warp * (16 * 20);
#pragma unroll
    for (int i = 0; i < kFM; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll 1  // as in store
        for (int e = 0; e < 8; ++e) {
          const int idx = lane + 32 * e;
          const int rr = idx / 16, cc = idx % 16;
          const int64_t gr = row0 + 16 * kFM * wm + 16 * i + rr;
          const int64_t gc = dv0 + 32 * wn + 16 * j + cc;
          ws[rr * 20 + cc] = gr < nrows && gc < ncols ? in[gr * ld + gc] : 0.f;
        }
        __syncwarp();
        nvcuda::wmma::load_matrix_sync(acc[i][j], ws, 20, nvcuda::wmma::mem_row_major);
        __syncwarp();  // every lane has its fragment before the slice is written again
      }
    }
  }
};

template <typename T, int kW>
struct GbProduct<T, kW, false> {  // exact fp32 SIMT: thread t owns rows 4 (t / 16) .., cols 4 (t % 16) ..
  using C = TileCfg<T>;
  static_assert(kW == C::kDV, "one width for fp32");
  float acc[4][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
    }
  }

  __device__ __forceinline__ void mma(const void* Gt, const void* Yc) {
    simt_mma_4x4<kBN>(acc, static_cast<const float*>(Gt), C::kLdG, static_cast<const float*>(Yc), C::kLdY,
                      threadIdx.x / 16, threadIdx.x % 16);
  }

  __device__ __forceinline__ void store(float* __restrict__ out, int64_t ld, int64_t row0, int64_t nrows,
                                        int64_t dv0, int64_t ncols, float* /*stage*/) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int64_t gr = row0 + 4 * ty + a;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int64_t gc = dv0 + 4 * tx + b;
        if (gr < nrows && gc < ncols) out[gr * ld + gc] = acc[a][b];
      }
    }
  }

  // The inverse of store (each thread reads back the elements it wrote; 0 outside the bounds).
  __device__ __forceinline__ void load(const float* in, int64_t ld, int64_t row0, int64_t nrows,
                                       int64_t dv0, int64_t ncols, float* /*stage*/) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int64_t gr = row0 + 4 * ty + a;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int64_t gc = dv0 + 4 * tx + b;
        acc[a][b] = gr < nrows && gc < ncols ? in[gr * ld + gc] : 0.f;
      }
    }
  }
};


// The G·B products of one tile of a gradient kernel, once Gt (the tile's weights) is complete: the caller's S tile
// staging (St, which Yc aliases) is consumed by the first barrier here. Output rows row0 .. of the block, the other
// side's rows col0 .. as B (nb rows, d columns); part: this split's partial rows [nrows][d].
//  * kChunked = false (the host's choice for d <= kDV): one chunk, prod accumulates in registers across the tiles
//    and the caller stores it once at the end. Its column offset blockIdx.y * kDV is 0 (grid y = 1) but kept a
//    run-time value on purpose: with a literal 0 ptxas (CUDA 13.0) spills 4-68 bytes in some fp16 / bf16 versions
//    of the gradient kernels (sm_80, sm_90).
//  * kChunked = true (any d): every kDV chunk of d in turn; the block's running sum for the chunk is read back from
//    part (what this thread stored on the previous tile; zero on the split's first tile), multiplied into and
//    stored again — the rows belong to this block alone, so no atomics. stage: kWarps x 16 x 20 floats of shared
//    memory free at this point (the wmma path's staging).
// kW: the chunk width (TileCfg's kDV; kDVNarrow for the one-chunk 16-bit case d <= 64, see gb_plan).
template <typename T, bool kChunked, int kW = TileCfg<T>::kDV>
__device__ __forceinline__ void gb_tile_products(GbProduct<T, kW>& prod, const void* Gt, void* Yc,
                                                 const T* __restrict__ Bm, int64_t nb, int64_t d, int64_t col0,
                                                 bool vec, float* part, int64_t nrows, int64_t row0, bool first_tile,
                                                 float* stage) {
  static_assert(!kChunked || kW == TileCfg<T>::kDV, "the chunk loop uses the full width");
  if constexpr (!kChunked) {
    __syncthreads();  // St consumed (Yc overwrites it), Gt complete
    {
      uint4 pre[kYcPer<T, kW>];
      load_yc<T, kW>(pre, Bm, nb, d, col0, int64_t(blockIdx.y) * kW, vec);
      store_yc<T, kW>(Yc, pre);
    }
    __syncthreads();  // Yc visible
    prod.mma(Gt, Yc);
  } else {
    const int64_t nch = (d + kW - 1) / kW;
#pragma unroll 1  // one chunk's product at a time (an unrolled copy would hold a second set of addresses)
    for (int64_t ch = 0; ch < nch; ++ch) {
      const int64_t dv0 = ch * kW;
      __syncthreads();  // ch = 0: St consumed (Yc overwrites it), Gt complete; later: previous chunk's Yc read
      {
        uint4 pre[kYcPer<T, kW>];
        load_yc<T, kW>(pre, Bm, nb, d, col0, dv0, vec);
        store_yc<T, kW>(Yc, pre);
      }
      if (first_tile) {
        prod.zero();
      } else {
        prod.load(part, d, row0, nrows, dv0, d, stage);
      }
      __syncthreads();  // Yc visible
      prod.mma(Gt, Yc);
      prod.store(part, d, row0, nrows, dv0, d, stage);
    }
  }
}

// The host's choice of G·B product for a gradient launch of d columns, shared by every gradient kernel's launcher
// (and the emulation drivers): kNarrow: one chunk of kDVNarrow columns (16-bit rows, d <= 64; for fp32 kDVNarrow
// = kDV, so this is kOne); kOne: one chunk of kDV columns, accumulated in registers; kChunked: the chunk loop.
enum class GbPlan { kNarrow, kOne, kChunked };
template <typename T>
inline GbPlan gb_plan(int64_t d) {
  if (d <= TileCfg<T>::kDVNarrow) return GbPlan::kNarrow;
  return d <= TileCfg<T>::kDV ? GbPlan::kOne : GbPlan::kChunked;
}

}  // namespace cuda
}  // namespace flashdml
