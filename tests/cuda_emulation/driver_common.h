// Pieces every emulation driver (tests/cuda_emulation/*_driver.cpp) shares: dtype conversions, the host's
// column-split plan with a settable SM count, the host zero-padding of rows (the .cu files' vec_ready), and the
// tolerance check that counts failures. Include after emu.h.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// The integer atomics the histogram kernels use (selection's radix select, the metrics pass), on host threads.
// g_u64_atomics counts the 64-bit ones: the kernels use them only on global histograms (selection's radix
// select, the metrics pass; the metrics pass's block tables are 32-bit shared memory), so around one launch it
// is that launch's global histogram atomics.
inline std::atomic<long> g_u64_atomics{0};
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  g_u64_atomics.fetch_add(1, std::memory_order_relaxed);
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
// atomicCAS on a 32-bit word (the metrics pass's shared-memory hash table): the old value.
inline unsigned atomicCAS(unsigned* p, unsigned compare, unsigned val) {
  std::atomic_ref<unsigned>(*p).compare_exchange_strong(compare, val);
  return compare;
}

// The TF32 flavour of the fp32 S tile (tile_gemm.cuh, kTF32 = true: what the .cu files launch when the user opted
// into TF32). Built with -DFLASHDML_EMU_TF32=1, the drivers launch it for fp32 and check against TF32 bounds.
#ifndef FLASHDML_EMU_TF32
#define FLASHDML_EMU_TF32 0
#endif
template <class T>
constexpr bool kEmuTf32 = FLASHDML_EMU_TF32 != 0 && std::is_same_v<T, float>;
// One S entry of unit rows with d columns in TF32 is within tf32_delta_s(d) of the exact value: operands rounded to
// TF32 (u = 2^-11 each), fp32 sums (tests/test_triton_tf32.py uses the same bound).
inline double tf32_delta_s(int64_t d) {
  const double u = std::ldexp(1.0, -11);
  return 2 * u + u * u + double(d + 2) * std::ldexp(1.0, -24);
}

// SMs the emulated device has (launch_utils.cuh's plan_splits reads the real count): 132 (H100) or 1.
static int g_sms = 132;

template <class T> T to_t(float v);
template <> inline float to_t<float>(float v) { return v; }
template <> inline __half to_t<__half>(float v) { return __float2half_rn(v); }
template <> inline __nv_bfloat16 to_t<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
static inline double tod(float v) { return v; }
static inline double tod(__half v) { return __half2float(v); }
static inline double tod(__nv_bfloat16 v) { return __bfloat162float(v); }
static inline unsigned U(int64_t v) { return unsigned(v); }
template <class V> static std::vector<double> vd(const V& v) {
  std::vector<double> o;
  for (auto e : v) o.push_back(tod(e));
  return o;
}

// launch_utils.cuh's plan_splits with g_sms SMs.
static inline std::pair<int64_t, int64_t> plan_splits(int64_t other_blocks, int64_t ntiles) {
  int64_t want = (2 * int64_t(g_sms) + other_blocks - 1) / other_blocks;
  want = std::max<int64_t>(1, std::min<int64_t>({want, ntiles, 16}));
  const int64_t tps = (ntiles + want - 1) / want;
  return {(ntiles + tps - 1) / tps, tps};
}

// vec_ready's copy: rows zero-padded to a multiple of vw (the kernels' vector width) in a fresh buffer.
template <class T>
std::vector<T> padded(const T* p, int64_t n, int64_t d, int64_t vw, int64_t& dp) {
  dp = (d + vw - 1) / vw * vw;
  std::vector<T> o(n * dp, to_t<T>(0.f));
  for (int64_t i = 0; i < n; ++i) for (int64_t k = 0; k < d; ++k) o[i * dp + k] = p[i * d + k];
  return o;
}

static int failures = 0, checks = 0;
// Max abs error <= tol * max(unit, max |want|); infinities must match exactly, NaN always fails.
static void check(const std::string& what, const std::vector<double>& got, const std::vector<double>& want, double tol,
                  double unit = 1e-3) {
  ++checks;
  double err = 0, scale = unit;
  bool ok = got.size() == want.size();
  for (size_t i = 0; ok && i < got.size(); ++i) {
    if (std::isinf(want[i]) || std::isinf(got[i])) { ok = got[i] == want[i]; continue; }
    if (!std::isfinite(got[i])) { ok = false; break; }
    err = std::max(err, std::abs(got[i] - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  if (!ok || err > tol * scale) {
    ++failures;
    std::printf("FAIL %s: err %.3e scale %.3e ok %d\n", what.c_str(), err, scale, int(ok));
  }
}

// Max abs error <= bound (for values whose error bound is absolute, e.g. an LSE of TF32 logits); NaN always fails.
static void check_abs(const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
                      double bound) {
  ++checks;
  double err = 0;
  bool ok = got.size() == want.size();
  for (size_t i = 0; ok && i < got.size(); ++i) {
    if (std::isinf(want[i]) || std::isinf(got[i])) { ok = got[i] == want[i]; continue; }
    if (!std::isfinite(got[i])) { ok = false; break; }
    err = std::max(err, std::abs(got[i] - want[i]));
  }
  if (!ok || err > bound) {
    ++failures;
    std::printf("FAIL %s: err %.3e bound %.3e ok %d\n", what.c_str(), err, bound, int(ok));
  }
}

// Runs one backward-pass launch and checks that it computed every S tile exactly once: a pass over nrb row blocks
// and ntiles column tiles makes nrb * ntiles S products (emu.h counts the s_tile calls), however many kDV-column
// chunks of d it loops over. A grid with a chunk axis would recompute each tile once per chunk.
template <class F>
void launch_counting_s_tiles(const char* what, int64_t d, int64_t nrb, int64_t ntiles, F launch) {
  g_s_tiles = 0;
  launch();
  ++checks;
  const long got = g_s_tiles.load(), want = long(nrb * ntiles);
  if (got != want) {
    ++failures;
    std::printf("FAIL %s d=%ld: %ld S tiles computed, want %ld (%ld row blocks x %ld tiles)\n", what, long(d), got,
                want, long(nrb), long(ntiles));
  }
}
