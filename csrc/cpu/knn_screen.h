// The screened kNN scan of the CPU knn kernel (selection.cpp): the same results as the tiled scan, with an int16
// GEMM instead of the fp32 one and fp32 dot products only for the few entries that can be selected.
//
//  * quantisation: x̂_i ≈ 2^ex_i · qx_i and ŷ_j ≈ 2^ey · qy_j with int16 qx, qy (power-of-two scales: one per row
//    of x, one for all of y, so the residuals x̂ - 2^e q are exact). |q| <= Q with d·Q² <= 2^30, so
//    P_ij = qx_i · qy_j is exact in int32 (AVX2 vpmaddwd + vpaddd: 16 multiply-adds per pair of instructions;
//    measured 1.6x the fp32 FMA rate on Zen 3).
//  * bound: |S_ij - 2^(ex_i + ey) P_ij| <= E_i for the fp32 S_ij however it is rounded, with
//      E_i = ||x̂_i - xq_i||·max_j||ŷ_j|| + ||xq_i||·max_j||ŷ_j - yq_j|| + γ_(d+1)·||x̂_i||·max_j||ŷ_j|| + tiny
//    (quantisation, then the rounding of a length-d fp32 dot product; norms in double, rounded up). In P units:
//    S_ij ∈ [P_ij - D_i, P_ij + D_i], D_i = ceil(E_i / 2^(ex_i + ey)).
//  * selection, per row (RowCandidates): lam = the k-th largest lower bound P - D seen so far (a min-heap of k),
//    a lower bound of the row's final k-th value. An entry whose upper bound P + D is below lam cannot be
//    selected: the micro-kernel's test P > lam - D - 1 (8 lanes per compare, in registers) drops it; the others
//    are kept by (P, column) and dropped once lam passes them. At the end only the survivors (about k per row)
//    get their exact value, the sequential fp32 FMA dot product s = fma(x_k, y_k, s), k = 0..d-1, from +0, and
//    are offered to a TopKBuffer exactly like the tiled scan offers S entries (value descending, ties -> lower
//    column). Where ties within the bound fill a row's list, its entries are evaluated early.
//
// The values are the sequential-FMA dot products; the tiled scan's are at::mm's (MKL here). selection.cpp takes
// the screened scan automatically only when a probe has confirmed, for every tile shape the tiled scan would use,
// that at::mm's tile equals the sequential FMA bit for bit (MKL does on this machine for d <= 192 and the usual
// tile shapes), so the results do not depend on which scan ran.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "flashdml/topk.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FLASHDML_KNN_SCREEN 1
#else
#define FLASHDML_KNN_SCREEN 0
#endif

namespace flashdml {
namespace cpu {
namespace knn_screen {

constexpr bool kAvailable = FLASHDML_KNN_SCREEN != 0;
constexpr int kR = 6;       // rows per micro-tile of the int16 GEMM
constexpr int kCV = 2;      // 8-column groups per micro-tile
constexpr int kGroup = 8;   // columns per group (one AVX2 register of int32)
constexpr int64_t kSuperRows = 256;   // rows of x screened together: their int16 rows (L2) meet each 16-column panel
                                      // of y (L1) in turn
constexpr int32_t kAllPass = INT32_MIN;  // T - 1 for "every entry passes"
constexpr int32_t kNonePass = INT32_MAX; // T - 1 for "no entry passes" (|P| <= 2^30)

// Sequential-FMA dot product of one pair (the order the hits use), for the probe.
inline float seq_fma_dot(const float* a, const float* b, int64_t d) {
  float s = 0.f;
  for (int64_t k = 0; k < d; ++k) s = std::fma(a[k], b[k], s);
  return s;
}

// The quantised rows and the per-row error bounds.
struct Screen {
  int64_t B = 0, M = 0, d = 0, dp = 0, G = 0;  // dp: d rounded up to even; G: groups, a multiple of kCV
  at::Tensor qx;   // int16 [B + 128 + kR, dp], row-major, zero rows past B
  at::Tensor qy;   // int16 [G, dp / 2, 8, 2]: for each pair of k, the 8 columns' (k, k + 1) values (0 past M)
  std::vector<int32_t> ex;  // 2^ex[i] scales qx row i
  std::vector<int64_t> du;  // D_i = ceil(E_i / 2^(ex_i + ey)): |S_ij / 2^(ex_i + ey) - P_ij| <= D_i
  int32_t ey = 0;
  bool ok = false;          // false: non-finite input or too large a norm (the caller takes the tiled path)
};

// A candidate known through its P value only.
struct Pending {
  int32_t p;
  int32_t col;
};

// The candidates of one row: `pend` known through P (S in [P - du, P + du] in P units), `exact` (a TopKBuffer,
// as in the tiled scan) with their fp32 values; every column is in at most one of them. `top` collects P values
// of the row; when it holds 2k + 8 (or before a prune), the k largest are kept and top_min becomes the k-th
// largest. The P - du bound different columns' S from below, so lam() = top_min - du is a lower bound of the
// row's final k-th value (in P units); it lags the exact k-th largest bound by at most k + 8 admissions, for an
// amortised cost of a few operations per admission (a heap or a sorted array cost 5-10x more here: dependent
// loads and long shifts per admission). Entries whose upper bound is below lam() cannot be selected: they are
// never admitted (the screen test P > tm1()) or dropped (prune).
struct RowCandidates {
  std::vector<Pending> pend;
  std::vector<int32_t> top;
  TopKBuffer exact;
  int64_t du = 0, k = 0;
  int64_t top_min = INT64_MIN;  // the k-th largest P at the last settle (INT64_MIN: fewer than k seen)
  size_t cap = 0, top_cap = 0;

  void reset(int64_t k_, int64_t du_, int64_t exact_capacity) {
    pend.clear();
    top.clear();
    exact.reset(k_, exact_capacity);
    du = du_;
    k = k_;
    top_min = INT64_MIN;
    cap = size_t(2 * k_ + 64);
    top_cap = size_t(2 * k_ + 8);
  }

  int64_t lam() const { return top_min == INT64_MIN ? INT64_MIN : top_min - du; }

  // The screen threshold: P > tm1() <=> P + du >= lam().
  int32_t tm1() const {
    const int64_t lam_ = lam();
    if (lam_ == INT64_MIN) return kAllPass;
    const int64_t t = lam_ - du - 1;
    if (t <= int64_t(kAllPass)) return kAllPass;
    if (t >= int64_t(kNonePass)) return kNonePass;
    return int32_t(t);
  }

  // A candidate that passed the screen. Returns true when lam() has changed.
  bool add(int32_t p, int32_t col) {
    pend.push_back({p, col});
    if (int64_t(p) <= top_min) return false;  // not among the k largest P
    top.push_back(p);
    return top.size() >= top_cap && settle();
  }

  // top <- its k largest, top_min <- the k-th largest. Returns whether lam() changed.
  bool settle() {
    if (int64_t(top.size()) < k || (int64_t(top.size()) == k && top_min != INT64_MIN)) return false;
    std::nth_element(top.begin(), top.begin() + (k - 1), top.end(), std::greater<int32_t>());
    top.resize(size_t(k));
    const int64_t old = top_min;
    top_min = top[size_t(k - 1)];
    return top_min != old;
  }

  bool full() const { return pend.size() >= cap; }

  // After a prune: the pending list still holds more than k entries by half the slack (ties within the bound).
  bool crowded() const { return pend.size() > size_t(k) + (cap - size_t(k)) / 2; }

  // Drops the pending entries whose upper bound is below lam() (settled first).
  void prune() {
    settle();
    const int64_t lam_ = lam(), du_ = du;
    if (lam_ == INT64_MIN) return;
    pend.erase(std::remove_if(pend.begin(), pend.end(), [=](const Pending& e) { return int64_t(e.p) + du_ < lam_; }),
               pend.end());
  }
};

#if FLASHDML_KNN_SCREEN

inline int32_t pow2_exponent(float maxabs, int32_t Q) {
  // smallest e with maxabs / 2^e <= Q (maxabs > 0, finite)
  int e = 0;
  std::frexp(double(maxabs) / double(Q), &e);  // maxabs / Q = m 2^e, 0.5 <= m < 1
  while (std::ldexp(double(maxabs), -e) > Q) ++e;
  while (std::ldexp(double(maxabs), -(e - 1)) <= Q) --e;
  return e;
}

// max |r[k]| over k < d, and whether all are finite.
inline float row_maxabs(const float* r, int64_t d, bool* finite) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  const __m256 inf = _mm256_set1_ps(__builtin_huge_valf());
  int64_t k = 0;
  for (; k + 8 <= d; k += 8) {
    const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(r + k));
    m = _mm256_max_ps(m, a);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // inf or NaN
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  float mx = 0.f;
  for (float v : t) mx = std::max(mx, v);
  bool fin = _mm256_testz_ps(bad, bad);
  for (; k < d; ++k) {
    const float a = std::fabs(r[k]);
    fin &= a < __builtin_huge_valf();
    mx = std::max(mx, a);
  }
  *finite = fin;
  return mx;
}

// q[k] = round(r[k] 2^-e) (|q| <= Q by the choice of e); returns sum r^2, sum (q 2^e)^2, sum (r - q 2^e)^2 in
// double. The products by powers of two and the residual r - q 2^e are exact in fp32 (|residual| <= 2^(e-1)
// and it is a multiple of ulp(r), or r itself when q = 0).
inline void quantize_row(const float* r, int64_t d, int32_t e, int16_t* q, double* n2, double* q2, double* e2) {
  const __m256 down = _mm256_set1_ps(std::ldexp(1.f, -e)), up = _mm256_set1_ps(std::ldexp(1.f, e));
  __m256d sn = _mm256_setzero_pd(), sq = sn, se = sn;
  alignas(32) int32_t qi[8];
  int64_t k = 0;
  auto acc = [](__m256d s, __m256 v) {
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    return _mm256_fmadd_pd(hi, hi, _mm256_fmadd_pd(lo, lo, s));
  };
  for (; k + 8 <= d; k += 8) {
    const __m256 v = _mm256_loadu_ps(r + k);
    const __m256 qf = _mm256_round_ps(_mm256_mul_ps(v, down), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 xq = _mm256_mul_ps(qf, up);
    sn = acc(sn, v);
    sq = acc(sq, xq);
    se = acc(se, _mm256_sub_ps(v, xq));
    _mm256_store_si256(reinterpret_cast<__m256i*>(qi), _mm256_cvtps_epi32(qf));
    for (int l = 0; l < 8; ++l) q[k + l] = int16_t(qi[l]);
  }
  alignas(32) double t[4];
  double a = 0, b = 0, c = 0;
  _mm256_store_pd(t, sn);
  a = (t[0] + t[1]) + (t[2] + t[3]);
  _mm256_store_pd(t, sq);
  b = (t[0] + t[1]) + (t[2] + t[3]);
  _mm256_store_pd(t, se);
  c = (t[0] + t[1]) + (t[2] + t[3]);
  for (; k < d; ++k) {
    const float v = r[k];
    const float qf = std::nearbyint(v * std::ldexp(1.f, -e));
    const float xq = qf * std::ldexp(1.f, e);
    const float er = v - xq;
    a += double(v) * v;
    b += double(xq) * xq;
    c += double(er) * er;
    q[k] = int16_t(qf);
  }
  *n2 = a;
  *q2 = b;
  *e2 = c;
}

// Builds the screen for fp32 contiguous x [B, d], y [M, d]. Memory: 2 (B + M) d bytes of int16.
inline Screen build_screen(const at::Tensor& x, const at::Tensor& y) {
  Screen s;
  const int64_t B = x.size(0), M = y.size(0), d = x.size(1);
  s.B = B;
  s.M = M;
  s.d = d;
  s.dp = d + (d & 1);
  const int64_t dp = s.dp, Greal = (M + kGroup - 1) / kGroup;
  s.G = (Greal + kCV - 1) / kCV * kCV;
  const int32_t Q = int32_t(std::floor(std::sqrt(double(int64_t(1) << 30) / double(dp))));
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  // The scales are powers of two: ldexp(1.f, ±e) must be a normal float.
  auto scale_ok = [](int32_t e) { return e > -120 && e < 120; };

  // y: max |entry| (one scale for all of y), finiteness.
  std::vector<float> ymax(size_t(std::max<int64_t>(Greal, 1)), 0.f);
  std::atomic<bool> finite{true};
  at::parallel_for(0, Greal, 256, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      float m = 0.f;
      for (int64_t j = g * kGroup; j < std::min(M, (g + 1) * kGroup); ++j) {
        bool fin = true;
        m = std::max(m, row_maxabs(yp + j * d, d, &fin));
        if (!fin) finite = false;
      }
      ymax[size_t(g)] = m;
    }
  });
  if (!finite) return s;
  const float ymaxabs = Greal > 0 ? *std::max_element(ymax.begin(), ymax.end()) : 0.f;
  s.ey = ymaxabs > 0.f ? pow2_exponent(ymaxabs, Q) : 0;
  if (!scale_ok(s.ey)) return s;

  // y: quantise, pack per group of 8 rows ([k2][8] int32 pairs), norms of ŷ_j and of its residual.
  s.qy = at::zeros({s.G * dp * kGroup}, at::kShort);
  int32_t* qy32 = reinterpret_cast<int32_t*>(s.qy.data_ptr<int16_t>());
  std::vector<double> ynorm(size_t(std::max<int64_t>(Greal, 1)), 0.0), yres(size_t(std::max<int64_t>(Greal, 1)), 0.0);
  const int32_t ey = s.ey;
  at::parallel_for(0, Greal, 64, [&](int64_t g0, int64_t g1) {
    std::vector<int16_t> rowq(size_t(kGroup * dp), 0);
    for (int64_t g = g0; g < g1; ++g) {
      double gn = 0.0, gr = 0.0;
      std::fill(rowq.begin(), rowq.end(), int16_t(0));
      for (int64_t l = 0; l < kGroup && g * kGroup + l < M; ++l) {
        double n2, q2, e2;
        quantize_row(yp + (g * kGroup + l) * d, d, ey, rowq.data() + l * dp, &n2, &q2, &e2);
        gn = std::max(gn, n2);
        gr = std::max(gr, e2);
      }
      const int32_t* src = reinterpret_cast<const int32_t*>(rowq.data());
      int32_t* dst = qy32 + g * (dp / 2) * kGroup;
      for (int64_t k2 = 0; k2 < dp / 2; ++k2)
        for (int64_t l = 0; l < kGroup; ++l) dst[k2 * kGroup + l] = src[l * (dp / 2) + k2];
      ynorm[size_t(g)] = gn;
      yres[size_t(g)] = gr;
    }
  });
  double ynmax2 = 0.0, yrmax2 = 0.0;
  for (int64_t g = 0; g < Greal; ++g) {
    ynmax2 = std::max(ynmax2, ynorm[size_t(g)]);
    yrmax2 = std::max(yrmax2, yres[size_t(g)]);
  }
  const double up = 1.0 + 0x1p-20;  // rounds the double norms up (their own relative error is below d 2^-52)
  const double Ymax = std::sqrt(ynmax2) * up, EYmax = std::sqrt(yrmax2) * up;

  // x: per-row scale, quantise, bound.
  const int64_t Bpad = B + 128 + kR;
  s.qx = at::zeros({Bpad * dp}, at::kShort);
  int16_t* qx = s.qx.data_ptr<int16_t>();
  s.ex.assign(size_t(B), 0);
  s.du.assign(size_t(B), 0);
  const double gamma = double(d + 1) * 0x1p-24 / (1.0 - double(d + 1) * 0x1p-24);
  const double tiny = double(d + 1) * 0x1p-148;
  std::atomic<bool> xok{true};
  at::parallel_for(0, B, 256, [&](int64_t i0, int64_t i1) {
    bool ok = true;
    for (int64_t i = i0; i < i1 && ok; ++i) {
      const float* r = xp + i * d;
      const float m = row_maxabs(r, d, &ok);
      const int32_t e = m > 0.f ? pow2_exponent(m, Q) : 0;
      if (!ok || !scale_ok(e)) {
        ok = false;
        break;
      }
      double n2, q2, e2;
      quantize_row(r, d, e, qx + i * dp, &n2, &q2, &e2);
      const double xn = std::sqrt(n2) * up, xqn = std::sqrt(q2) * up, xe = std::sqrt(e2) * up;
      if (xn * Ymax > 0x1p100) ok = false;  // S could overflow fp32: leave it to the tiled path
      const double E = (xe * Ymax + xqn * EYmax + gamma * xn * Ymax) * up + tiny;
      const double units = std::ceil(std::ldexp(E, -(e + ey))) + 1.0;  // exact scaling; +1 for good measure
      if (!(units <= 0x1p40)) ok = false;  // (d Q^2 <= 2^30 keeps it far below; never clamp a bound downwards)
      s.ex[size_t(i)] = e;
      s.du[size_t(i)] = int64_t(std::min(units, 0x1p40));
    }
    if (!ok) xok = false;
  });
  s.ok = xok;
  return s;
}

// P for kR rows x (kCV x 8) columns into acc (32-byte aligned). Returns whether any lane has P > tm1[row]; the
// lanes that do are the set bits of bits[0..1]: bit a * 16 + c * 8 + l for row a, group c, lane l (the flat index
// of acc[a][c][l]), rows 0-3 in bits[0], rows 4-5 in bits[1].
inline bool micro_tile(const int16_t* qx, int64_t dp, const int16_t* qy0, const int16_t* qy1, const int32_t* tm1,
                       int32_t acc[kR][kCV][kGroup], uint64_t bits[2]) {
  static_assert(kR == 6 && kCV == 2 && kGroup == 8, "micro_tile is written for 6 x 2 groups of 8");
  const char* x0 = reinterpret_cast<const char*>(qx);
  const char* x3 = x0 + 3 * dp * int64_t(sizeof(int16_t));
  const char* q0 = reinterpret_cast<const char*>(qy0);
  const int64_t ld = dp * int64_t(sizeof(int16_t));
  const int64_t qoff = reinterpret_cast<const char*>(qy1) - q0;
  int64_t n = dp / 2;
  int32_t* out = &acc[0][0][0];
#define FD_MADD(row, y, a) "vpmaddwd %%ymm" #y ", %%ymm14, %%ymm15\n\tvpaddd %%ymm15, %%ymm" #a ", %%ymm" #a "\n\t"
  asm volatile(
      "vpxor %%xmm0, %%xmm0, %%xmm0\n\tvpxor %%xmm1, %%xmm1, %%xmm1\n\tvpxor %%xmm2, %%xmm2, %%xmm2\n\t"
      "vpxor %%xmm3, %%xmm3, %%xmm3\n\tvpxor %%xmm4, %%xmm4, %%xmm4\n\tvpxor %%xmm5, %%xmm5, %%xmm5\n\t"
      "vpxor %%xmm6, %%xmm6, %%xmm6\n\tvpxor %%xmm7, %%xmm7, %%xmm7\n\tvpxor %%xmm8, %%xmm8, %%xmm8\n\t"
      "vpxor %%xmm9, %%xmm9, %%xmm9\n\tvpxor %%xmm10, %%xmm10, %%xmm10\n\tvpxor %%xmm11, %%xmm11, %%xmm11\n\t"
      "1:\n\t"
      "vmovdqa (%[q0]), %%ymm12\n\t"
      "vmovdqa (%[q0],%[qoff]), %%ymm13\n\t"
      "vpbroadcastd (%[x0]), %%ymm14\n\t" FD_MADD(0, 12, 0) FD_MADD(0, 13, 1)
      "vpbroadcastd (%[x0],%[ld]), %%ymm14\n\t" FD_MADD(1, 12, 2) FD_MADD(1, 13, 3)
      "vpbroadcastd (%[x0],%[ld],2), %%ymm14\n\t" FD_MADD(2, 12, 4) FD_MADD(2, 13, 5)
      "vpbroadcastd (%[x3]), %%ymm14\n\t" FD_MADD(3, 12, 6) FD_MADD(3, 13, 7)
      "vpbroadcastd (%[x3],%[ld]), %%ymm14\n\t" FD_MADD(4, 12, 8) FD_MADD(4, 13, 9)
      "vpbroadcastd (%[x3],%[ld],2), %%ymm14\n\t" FD_MADD(5, 12, 10) FD_MADD(5, 13, 11)
      "add $4, %[x0]\n\t"
      "add $4, %[x3]\n\t"
      "add $32, %[q0]\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      "vmovdqa %%ymm0, (%[out])\n\tvmovdqa %%ymm1, 32(%[out])\n\tvmovdqa %%ymm2, 64(%[out])\n\t"
      "vmovdqa %%ymm3, 96(%[out])\n\tvmovdqa %%ymm4, 128(%[out])\n\tvmovdqa %%ymm5, 160(%[out])\n\t"
      "vmovdqa %%ymm6, 192(%[out])\n\tvmovdqa %%ymm7, 224(%[out])\n\tvmovdqa %%ymm8, 256(%[out])\n\t"
      "vmovdqa %%ymm9, 288(%[out])\n\tvmovdqa %%ymm10, 320(%[out])\n\tvmovdqa %%ymm11, 352(%[out])\n\t"
      : [x0] "+r"(x0), [x3] "+r"(x3), [q0] "+r"(q0), [n] "+r"(n)
      : [ld] "r"(ld), [qoff] "r"(qoff), [out] "r"(out)
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
        "xmm13", "xmm14", "xmm15", "memory", "cc");
#undef FD_MADD
  __m256i c[kR][kCV];
  __m256i any = _mm256_setzero_si256();
  for (int r = 0; r < kR; ++r) {
    const __m256i t = _mm256_set1_epi32(tm1[r]);
    for (int g = 0; g < kCV; ++g) {
      c[r][g] = _mm256_cmpgt_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(acc[r][g])), t);
      any = _mm256_or_si256(any, c[r][g]);
    }
  }
  if (_mm256_testz_si256(any, any)) return false;
  uint64_t w[2] = {0, 0};
  for (int r = 0; r < kR; ++r)
    for (int g = 0; g < kCV; ++g) {
      const int bit = r * 16 + g * 8;
      w[bit >> 6] |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(c[r][g])))) << (bit & 63);
    }
  bits[0] = w[0];
  bits[1] = w[1];
  return true;
}

// One entry that passed the screen: row i of x, column j of y.
struct Hit {
  int32_t row;
  int32_t col;
};

// Exact values of up to 8 hits, out[u] = the sequential FMA dot product of x̂[row] and ŷ[col] (8 independent
// scalar FMA chains, interleaved; rows read in place).
inline void exact_values(const float* xp, const float* yp, int64_t d, const Hit* hits, int n, float out[8]) {
  const float* a[8];
  const float* b[8];
  for (int u = 0; u < 8; ++u) {
    const Hit& h = hits[u < n ? u : 0];
    a[u] = xp + int64_t(h.row) * d;
    b[u] = yp + int64_t(h.col) * d;
  }
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, s4 = 0.f, s5 = 0.f, s6 = 0.f, s7 = 0.f;
  for (int64_t k = 0; k < d; ++k) {
    s0 = std::fma(a[0][k], b[0][k], s0);
    s1 = std::fma(a[1][k], b[1][k], s1);
    s2 = std::fma(a[2][k], b[2][k], s2);
    s3 = std::fma(a[3][k], b[3][k], s3);
    s4 = std::fma(a[4][k], b[4][k], s4);
    s5 = std::fma(a[5][k], b[5][k], s5);
    s6 = std::fma(a[6][k], b[6][k], s6);
    s7 = std::fma(a[7][k], b[7][k], s7);
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3, out[4] = s4, out[5] = s5, out[6] = s6, out[7] = s7;
}

#endif  // FLASHDML_KNN_SCREEN

}  // namespace knn_screen
}  // namespace cpu
}  // namespace flashdml
