// Host emulation of the CUDA features the flashdml kernels use: every CUDA thread is a std::thread,
// __syncthreads / __syncwarp are std::barrier, __shared__ is a function-static (blocks run one after another),
// wmma fragments hold the whole 16x16 tile in every lane (the API's semantics, not the hardware layout).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_types.h>
#include <vector_functions.h>
#include <atomic>
#include <barrier>
#include <thread>
#include <vector>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <cassert>
#include <cstdio>
#include <cstdlib>
#include <memory>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __align__
#undef __launch_bounds__
#undef __restrict__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __restrict__

struct EmuDim { unsigned x = 1, y = 1, z = 1; };
inline thread_local EmuDim threadIdx, blockIdx;
inline EmuDim gridDim, blockDim;
inline std::barrier<>* g_block_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_bar;
inline float g_shfl[1024];
inline std::atomic<long> g_shared_writes{0};

// The kernels' emulation hooks (#ifdef FLASHDML_EMULATION): tile_gemm.cuh's s_tile calls this once per S tile a
// block computes; thread 0 counts it, so g_s_tiles is the number of (block, tile) S products since the last reset.
#define FLASHDML_EMULATION 1
inline std::atomic<long> g_s_tiles{0};
inline void flashdml_emu_on_s_tile();

inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { g_warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int off) {
  const int t = threadIdx.x, lane = t % 32, base = t - lane;
  __syncwarp();
  g_shfl[t] = v;
  __syncwarp();
  const float r = g_shfl[base + (lane ^ off)];
  __syncwarp();
  return r;
}
template <class T> inline T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0 || (sizeof(T) == 16 && reinterpret_cast<uintptr_t>(p) % 16 != 0)) {
    std::fprintf(stderr, "misaligned __ldg\n"); std::abort(); }
  return *p; }
inline void flashdml_emu_on_s_tile() { if (threadIdx.x == 0) g_s_tiles.fetch_add(1); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }

namespace nvcuda { namespace wmma {
struct row_major {}; struct col_major {}; struct matrix_a {}; struct matrix_b {}; struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class L = void> struct fragment { float v[16][16]; };
inline float tof(float x) { return x; }
inline float tof(__half x) { return __half2float(x); }
inline float tof(__nv_bfloat16 x) { return __bfloat162float(x); }
inline void check_ptr(const void* p, unsigned ldm, int esize) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) { std::fprintf(stderr, "wmma: pointer not 32-byte aligned\n"); std::abort(); }
  if ((ldm * esize) % 16 != 0) { std::fprintf(stderr, "wmma: bad ldm\n"); std::abort(); }
}
template <class A, class T, class L> void fill_fragment(fragment<A,16,16,16,T,L>& f, float x) {
  for (auto& r : f.v) for (auto& e : r) e = x; }
template <class T> void load_matrix_sync(fragment<matrix_a,16,16,16,T,row_major>& f, const T* p, unsigned ld) {
  check_ptr(p, ld, sizeof(T)); for (int m = 0; m < 16; ++m) for (int k = 0; k < 16; ++k) f.v[m][k] = tof(p[m * ld + k]); }
template <class T> void load_matrix_sync(fragment<matrix_a,16,16,16,T,col_major>& f, const T* p, unsigned ld) {
  check_ptr(p, ld, sizeof(T)); for (int m = 0; m < 16; ++m) for (int k = 0; k < 16; ++k) f.v[m][k] = tof(p[m + k * ld]); }
template <class T> void load_matrix_sync(fragment<matrix_b,16,16,16,T,row_major>& f, const T* p, unsigned ld) {
  check_ptr(p, ld, sizeof(T)); for (int k = 0; k < 16; ++k) for (int n = 0; n < 16; ++n) f.v[k][n] = tof(p[k * ld + n]); }
template <class T> void load_matrix_sync(fragment<matrix_b,16,16,16,T,col_major>& f, const T* p, unsigned ld) {
  check_ptr(p, ld, sizeof(T)); for (int k = 0; k < 16; ++k) for (int n = 0; n < 16; ++n) f.v[k][n] = tof(p[k + n * ld]); }
template <class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator,16,16,16,float>& d, const fragment<matrix_a,16,16,16,TA,LA>& a,
              const fragment<matrix_b,16,16,16,TB,LB>& b, const fragment<accumulator,16,16,16,float>& c) {
  static_assert(std::is_same_v<TA, TB>);
  float out[16][16];
  for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n) {
    float s = c.v[m][n]; for (int k = 0; k < 16; ++k) s += a.v[m][k] * b.v[k][n]; out[m][n] = s; }
  std::memcpy(d.v, out, sizeof out);
}
inline void load_matrix_sync(fragment<accumulator,16,16,16,float>& f, const float* p, unsigned ld, layout_t l) {
  check_ptr(p, ld, 4);
  for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n) f.v[m][n] = l == mem_row_major ? p[m * ld + n] : p[m + n * ld];
}
inline void store_matrix_sync(float* p, const fragment<accumulator,16,16,16,float>& f, unsigned ld, layout_t l) {
  check_ptr(p, ld, 4);
  // only lane 0 writes (all lanes hold the same tile); the caller's barrier orders it before any read
  if (threadIdx.x % 32 != 0) return;
  for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n) (l == mem_row_major ? p[m * ld + n] : p[m + n * ld]) = f.v[m][n];
}

// TF32 (the fp32 S tile's opt-in flavour, tile_gemm.cuh STileAcc<float, true>): m16n16k8 fragments with
// precision::tf32 operands. Operand fragments expose num_elements / x[] like the real ones (here x holds the whole
// 16 x 8 or 8 x 16 operand, row-major); __float_to_tf32 is cvt.rna.tf32.f32 (round to nearest, ties away from zero,
// keep 10 mantissa bits, low 13 bits zero). mma_sync multiplies what the hardware reads of a tf32 operand (the
// top 19 bits, i.e. an unrounded operand is truncated) and accumulates in fp32 in k order.
namespace precision { struct tf32 {}; }
inline float __float_to_tf32(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) { u += 0x1000u; u &= ~0x1fffu; }  // finite: half an ulp up in magnitude, cut
  float r; std::memcpy(&r, &u, 4); return r;
}
inline float tf32_bits(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u &= ~0x1fffu;
  float r; std::memcpy(&r, &u, 4); return r;
}
template <class L> struct fragment<matrix_a, 16, 16, 8, precision::tf32, L> {
  static constexpr int num_elements = 16 * 8; float x[16 * 8];  // (m, k) at x[m * 8 + k]
};
template <class L> struct fragment<matrix_b, 16, 16, 8, precision::tf32, L> {
  static constexpr int num_elements = 8 * 16; float x[8 * 16];  // (k, n) at x[k * 16 + n]
};
inline void fill_fragment(fragment<accumulator,16,16,8,float>& f, float x) { for (auto& r : f.v) for (auto& e : r) e = x; }
inline void load_matrix_sync(fragment<matrix_a,16,16,8,precision::tf32,row_major>& f, const float* p, unsigned ld) {
  check_ptr(p, ld, 4); for (int m = 0; m < 16; ++m) for (int k = 0; k < 8; ++k) f.x[m * 8 + k] = p[m * ld + k]; }
inline void load_matrix_sync(fragment<matrix_a,16,16,8,precision::tf32,col_major>& f, const float* p, unsigned ld) {
  check_ptr(p, ld, 4); for (int m = 0; m < 16; ++m) for (int k = 0; k < 8; ++k) f.x[m * 8 + k] = p[m + k * ld]; }
inline void load_matrix_sync(fragment<matrix_b,16,16,8,precision::tf32,row_major>& f, const float* p, unsigned ld) {
  check_ptr(p, ld, 4); for (int k = 0; k < 8; ++k) for (int n = 0; n < 16; ++n) f.x[k * 16 + n] = p[k * ld + n]; }
inline void load_matrix_sync(fragment<matrix_b,16,16,8,precision::tf32,col_major>& f, const float* p, unsigned ld) {
  check_ptr(p, ld, 4); for (int k = 0; k < 8; ++k) for (int n = 0; n < 16; ++n) f.x[k * 16 + n] = p[k + n * ld]; }
template <class LA, class LB>
void mma_sync(fragment<accumulator,16,16,8,float>& d, const fragment<matrix_a,16,16,8,precision::tf32,LA>& a,
              const fragment<matrix_b,16,16,8,precision::tf32,LB>& b, const fragment<accumulator,16,16,8,float>& c) {
  float out[16][16];
  for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n) {
    float s = c.v[m][n];
    for (int k = 0; k < 8; ++k) s += tf32_bits(a.x[m * 8 + k]) * tf32_bits(b.x[k * 16 + n]);  // product exact in fp32
    out[m][n] = s; }
  std::memcpy(d.v, out, sizeof out);
}
inline void store_matrix_sync(float* p, const fragment<accumulator,16,16,8,float>& f, unsigned ld, layout_t l) {
  check_ptr(p, ld, 4);
  if (threadIdx.x % 32 != 0) return;  // as for 16x16x16: lane 0 writes the tile every lane holds
  for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n) (l == mem_row_major ? p[m * ld + n] : p[m + n * ld]) = f.v[m][n];
}
}}  // namespace nvcuda::wmma

// Runs kernel body for every block of the grid, nthreads std::threads per block.
template <class F> void emu_launch(EmuDim grid, unsigned nthreads, F body) {
  gridDim = grid; blockDim = {nthreads, 1, 1};
  for (unsigned z = 0; z < grid.z; ++z) for (unsigned y = 0; y < grid.y; ++y) for (unsigned x = 0; x < grid.x; ++x) {
    std::barrier<> bar(nthreads);
    g_block_bar = &bar;
    g_warp_bar.clear();
    for (unsigned w = 0; w < (nthreads + 31) / 32; ++w) g_warp_bar.emplace_back(new std::barrier<>(32));
    std::vector<std::thread> th;
    for (unsigned t = 0; t < nthreads; ++t) th.emplace_back([&, t] { threadIdx = {t, 0, 0}; blockIdx = {x, y, z}; body(); });
    for (auto& h : th) h.join();
  }
}

// Dynamic shared memory (`extern __shared__`; a kernel reads it through flashdml_emu_dynamic_smem() under
// FLASHDML_EMULATION): one buffer of dyn_bytes, refilled with a 0xA5 pattern before every block, as the hardware
// gives a block uninitialised shared memory. emu_launch_dyn is emu_launch with the launch's dynamic size.
inline std::vector<unsigned long long> g_dyn_smem;
inline unsigned char* flashdml_emu_dynamic_smem() { return reinterpret_cast<unsigned char*>(g_dyn_smem.data()); }
template <class F> void emu_launch_dyn(EmuDim grid, unsigned nthreads, size_t dyn_bytes, F body) {
  g_dyn_smem.assign((dyn_bytes + 7) / 8 + 1, 0);
  emu_launch(grid, nthreads, [&] {
    if (threadIdx.x == 0) std::memset(g_dyn_smem.data(), 0xA5, g_dyn_smem.size() * 8);
    __syncthreads();  // the block's threads start on the refilled buffer
    body();
  });
}
