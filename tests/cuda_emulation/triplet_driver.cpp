// Emulated run of the triplet margin loss CUDA kernels (csrc/cuda/triplet_kernels.cuh, pair_tiles.cuh) against a
// float64 computation over every triplet. The host pipeline below mirrors csrc/cuda/triplet.cu (its ATen steps in
// plain C++) from the normalised rows on: the loss, the exact count and dL/dx^, dL/dy^ (the gradients with respect
// to the normalised rows; the normalisation's backward is ATen and shared with the other ops).
// The margin is picked per case among 64 candidates so that no triplet's hinge lies within 2e-5 of 0 (fp32 and
// float64 then agree on every membership test, and the counts must match exactly); rows repeated inside a class
// give d_ap = 0 exactly (the zero subgradient). Usage: triplet_driver [dtype 0|1|2].
#include "emu.h"
#include "driver_common.h"
#include "triplet_kernels.cuh"

#include <algorithm>
#include <map>
#include <numeric>
#include <random>
#include <string>

using namespace flashdml;
using namespace flashdml::cuda;
using namespace flashdml::cuda::tri;

template <class T, bool kOutY>
std::vector<float> run_grad(const T* xa, const T* ya, int64_t B, int64_t M, int64_t dp, const TripletOp& op,
                            const float* scale) {
  const int64_t nout = kOutY ? M : B, noth = kOutY ? B : M;
  const int64_t nrb = (nout + kBM - 1) / kBM, ntiles = (noth + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  std::vector<float> part(nsplit * nout * dp, std::nanf("")), out(nout * dp, std::nanf(""));
  launch_counting_s_tiles("triplet grad pass", dp, nrb, ntiles, [&] {
    emu_launch({U(nrb), 1, U(nsplit)}, kThreads, [&] {
      pair::pair_grad_kernel_for<T, TripletOp, kOutY, kOutY>(dp, kEmuTf32<T>)(xa, ya, B, M, dp, op, tps, part.data(), nullptr); }); });
  emu_launch({3, 1, 1}, 256, [&] { pair::pair_reduce_kernel<float>(part.data(), int(nsplit), nout, dp, dp, scale, out.data()); });
  return out;
}

enum Mode { kSelf, kCross, kPair };
enum Labels { kClasses, kOneClass, kDistinct };

template <class T>
void one_case(int64_t B, int64_t M, int64_t d, Mode mode, Labels lk, double tol, unsigned seed) {
  if (mode != kCross) M = B;
  const bool self = mode == kSelf;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<int64_t> lab(B), ref(M);
  const int64_t ncls = std::max<int64_t>(1, B / 4);
  for (int64_t i = 0; i < B; ++i) lab[i] = lk == kOneClass ? 5 : (lk == kDistinct || mode == kPair ? i : int64_t(rng() % ncls));
  for (int64_t j = 0; j < M; ++j) ref[j] = lk == kOneClass ? 5 : (lk == kDistinct || mode == kPair ? j : int64_t(rng() % (ncls + 1)));
  if (self) ref = lab;
  // normalised rows in the input type (what kernel_rows hands the kernels); every 5th row of x repeats an earlier
  // row of its class (self mode: d_ap = 0)
  auto make_rows = [&](int64_t n, const std::vector<int64_t>& l, bool dup) {
    std::vector<T> r(n * d);
    for (int64_t i = 0; i < n; ++i) {
      int64_t src = -1;
      if (dup && i % 5 == 4) for (int64_t k = 0; k < i; ++k) if (l[k] == l[i]) { src = k; break; }
      if (src >= 0) { for (int64_t k = 0; k < d; ++k) r[i * d + k] = r[src * d + k]; continue; }
      std::vector<float> v(d); double ss = 0;
      for (auto& e : v) { e = nd(rng); ss += double(e) * e; }
      for (int64_t k = 0; k < d; ++k) r[i * d + k] = to_t<T>(float(v[k] / std::sqrt(ss)));
    }
    return r;
  };
  const std::vector<T> xh = make_rows(B, lab, self);
  const std::vector<T> yh = self ? xh : make_rows(M, ref, false);

  // ---- float64 reference over every triplet
  std::vector<double> D(B * M);
  for (int64_t i = 0; i < B; ++i) for (int64_t j = 0; j < M; ++j) {
    double ss = 0; for (int64_t k = 0; k < d; ++k) { const double t = tod(xh[i * d + k]) - tod(yh[j * d + k]); ss += t * t; }
    D[i * M + j] = std::sqrt(ss); }
  auto is_pos = [&](int64_t a, int64_t j) { return lab[a] == ref[j] && !(self && a == j); };
  std::vector<double> h0;  // d_ap - d_an of every triplet
  for (int64_t a = 0; a < B; ++a) for (int64_t p = 0; p < M; ++p) if (is_pos(a, p))
    for (int64_t n = 0; n < M; ++n) if (lab[a] != ref[n]) h0.push_back(D[a * M + p] - D[a * M + n]);
  // TF32 S tiles: d_an = sqrt(2 - 2 s) moves by at most dS / d_an (d_ap is computed exactly), so a hinge within
  // win of 0 may be decided either way; fp32: 2e-5
  double win = 2e-5;
  if (kEmuTf32<T>) {
    double dmin = 2;
    for (int64_t a = 0; a < B; ++a) for (int64_t n = 0; n < M; ++n) if (lab[a] != ref[n]) dmin = std::min(dmin, D[a * M + n]);
    win = 2 * tf32_delta_s(d) / std::max(dmin, 1e-3) + 2e-5;
  }
  float margin = 0.05f; int64_t best = -1;
  for (int c = 0; c < 64; ++c) {
    const float m = 0.02f + 0.01f * float(c);
    int64_t amb = 0; for (double h : h0) amb += std::abs(h + m) < win;
    if (best < 0 || amb < best) { best = amb; margin = m; }
    if (amb == 0) break;
  }
  double sum = 0; int64_t cnt = 0;
  for (double h : h0) if (h + margin > 0) { sum += h + margin; ++cnt; }
  const double loss = cnt ? sum / double(cnt) : 0.0;
  const double grad = 0.7, sc = cnt ? grad / double(cnt) : 0.0;
  std::vector<double> gx(B * d, 0), gy(M * d, 0);
  for (int64_t a = 0; a < B; ++a) for (int64_t p = 0; p < M; ++p) if (is_pos(a, p))
    for (int64_t n = 0; n < M; ++n) {
      if (lab[a] == ref[n] || D[a * M + p] - D[a * M + n] + margin <= 0) continue;
      for (int64_t k = 0; k < d; ++k) {
        const double xa = tod(xh[a * d + k]);
        const double up = D[a * M + p] > 0 ? (xa - tod(yh[p * d + k])) / D[a * M + p] : 0.0;
        const double un = D[a * M + n] > 0 ? (xa - tod(yh[n * d + k])) / D[a * M + n] : 0.0;
        gx[a * d + k] += sc * (up - un); gy[p * d + k] -= sc * up; gy[n * d + k] += sc * un;
      }
    }
  if (self) { for (int64_t e = 0; e < B * d; ++e) gx[e] += gy[e]; std::fill(gy.begin(), gy.end(), 0.0); }

  // ---- emulated pipeline (mirrors triplet.cu's make_setup, forward and backward)
  const int64_t vw = TileCfg<T>::kVW, dp = (d + 2 + vw - 1) / vw * vw;
  std::vector<T> xa(B * dp, to_t<T>(0.f)), ya(M * dp, to_t<T>(0.f));
  for (int64_t i = 0; i < B; ++i) { for (int64_t k = 0; k < d; ++k) xa[i * dp + k] = xh[i * d + k]; xa[i * dp + d] = to_t<T>(1.f); }
  for (int64_t j = 0; j < M; ++j) { for (int64_t k = 0; k < d; ++k) ya[j * dp + k] = yh[j * d + k]; ya[j * dp + d + 1] = to_t<T>(1.f); }
  std::vector<float> xsq(B), ysq(M);
  for (int64_t i = 0; i < B; ++i) { float s = 0; for (int64_t k = 0; k < d; ++k) s += float(tod(xh[i * d + k]) * tod(xh[i * d + k])); xsq[i] = s; }
  for (int64_t j = 0; j < M; ++j) { float s = 0; for (int64_t k = 0; k < d; ++k) s += float(tod(yh[j * d + k]) * tod(yh[j * d + k])); ysq[j] = s; }
  std::map<int64_t, int32_t> ids;
  for (int64_t v : lab) ids[v] = 0;
  for (int64_t v : ref) ids[v] = 0;
  int32_t next = 0; for (auto& kv : ids) kv.second = next++;
  std::vector<int32_t> cx(B), cy(M);
  for (int64_t i = 0; i < B; ++i) cx[i] = ids[lab[i]];
  for (int64_t j = 0; j < M; ++j) cy[j] = ids[ref[j]];
  std::vector<int64_t> pos_ptr(B + 1, 0), pos_anchor, pos_col;
  int64_t max_pos = 0;
  for (int64_t a = 0; a < B; ++a) {
    for (int64_t j = 0; j < M; ++j) if (cy[j] == cx[a] && !(self && j == a)) { pos_anchor.push_back(a); pos_col.push_back(j); }
    pos_ptr[a + 1] = int64_t(pos_col.size());
    max_pos = std::max(max_pos, pos_ptr[a + 1] - pos_ptr[a]);
  }
  const int64_t P = pos_ptr[B];
  std::vector<float> pos_dist(std::max<int64_t>(P, 1), std::nanf(""));
  float loss_out = 0.f; int64_t count_out = 0;
  std::vector<double> kx(B * d, 0), ky(M * d, 0);
  if (P > 0) {
    emu_launch({U((P + kWarps - 1) / kWarps), 1, 1}, kThreads, [&] {
      tri_pos_dist_kernel<T>(xa.data(), ya.data(), dp, d, pos_anchor.data(), pos_col.data(), P, pos_dist.data()); });
    const int64_t nrb = (B + kBM - 1) / kBM, ntiles = (M + kBN - 1) / kBN;
    const auto [nsplit, tps] = plan_splits(nrb, ntiles);
    std::vector<double> part_sum(nrb * nsplit, std::nan(""));
    std::vector<int64_t> part_cnt(nrb * nsplit, -777);
    emu_launch({U(nrb), U(nsplit), 1}, kThreads, [&] {
      tri_stats_kernel<T, false, kEmuTf32<T>>(xa.data(), ya.data(), B, M, dp, tps, cx.data(), cy.data(), xsq.data(), ysq.data(),
                                 pos_ptr.data(), pos_dist.data(), margin, part_sum.data(), part_cnt.data(), nullptr, P); });
    double tot = 0;
    for (int64_t b = 0; b < nrb * nsplit; ++b) { tot += part_sum[b]; count_out += part_cnt[b]; }
    loss_out = float(count_out > 0 ? tot / double(count_out) : 0.0);

    // backward
    std::vector<int32_t> pos_cnt(nsplit * P, 0);
    emu_launch({U(nrb), U(nsplit), 1}, kThreads, [&] {
      tri_stats_kernel<T, true, kEmuTf32<T>>(xa.data(), ya.data(), B, M, dp, tps, cx.data(), cy.data(), xsq.data(), ysq.data(),
                                pos_ptr.data(), pos_dist.data(), margin, nullptr, nullptr, pos_cnt.data(), P); });
    std::vector<int64_t> n_act(P, 0);
    for (int64_t s = 0; s < nsplit; ++s) for (int64_t q = 0; q < P; ++q) n_act[q] += pos_cnt[s * P + q];
    const double scale = grad / double(std::max<int64_t>(count_out, 1));
    const int e = max_pos > 1 ? int(std::ceil(std::log2(double(max_pos)))) : 0;
    const float red_scale = float(scale * std::ldexp(1.0, e));
    TripletOp op{cx.data(), cy.data(), xsq.data(), ysq.data(), pos_ptr.data(), pos_dist.data(), margin,
                 float(std::ldexp(1.0, -e))};
    std::vector<float> ox = run_grad<T, false>(xa.data(), ya.data(), B, M, dp, op, &red_scale);
    std::vector<float> oy = run_grad<T, true>(xa.data(), ya.data(), B, M, dp, op, &red_scale);
    std::vector<float> fx(B * d), fy(M * d);
    for (int64_t i = 0; i < B; ++i) for (int64_t k = 0; k < d; ++k)
      fx[i * d + k] = ox[i * dp + k] - ox[i * dp + d + 1] * float(tod(xh[i * d + k]));
    for (int64_t j = 0; j < M; ++j) for (int64_t k = 0; k < d; ++k)
      fy[j * d + k] = oy[j * dp + k] - oy[j * dp + d] * float(tod(yh[j * d + k]));
    std::vector<float> w(P);
    for (int64_t q = 0; q < P; ++q) w[q] = n_act[q] > 0 && pos_dist[q] > 0 ? float(double(n_act[q]) * scale / double(pos_dist[q])) : 0.f;
    std::vector<int64_t> widx(P), tperm(P), tptr(M + 1, 0), toth(P);
    for (int64_t q = 0; q < P; ++q) widx[q] = q;
    std::iota(tperm.begin(), tperm.end(), 0);
    std::stable_sort(tperm.begin(), tperm.end(), [&](int64_t u, int64_t v) { return pos_col[u] < pos_col[v]; });
    for (int64_t q = 0; q < P; ++q) { ++tptr[pos_col[q] + 1]; toth[q] = pos_anchor[tperm[q]]; }
    for (int64_t j = 0; j < M; ++j) tptr[j + 1] += tptr[j];
    emu_launch({U(B), 1, 1}, 128, [&] {
      tri_pos_grad_kernel<T>(pos_ptr.data(), widx.data(), pos_col.data(), w.data(), xa.data(), ya.data(), dp, d, fx.data()); });
    emu_launch({U(M), 1, 1}, 128, [&] {
      tri_pos_grad_kernel<T>(tptr.data(), tperm.data(), toth.data(), w.data(), ya.data(), xa.data(), dp, d, fy.data()); });
    if (self) { for (int64_t e2 = 0; e2 < B * d; ++e2) fx[e2] += fy[e2]; std::fill(fy.begin(), fy.end(), 0.f); }
    for (int64_t e2 = 0; e2 < B * d; ++e2) kx[e2] = fx[e2];
    for (int64_t e2 = 0; e2 < M * d; ++e2) ky[e2] = fy[e2];
  }

  char tag[200];
  std::snprintf(tag, sizeof tag, "%s%s B=%ld M=%ld d=%ld mode=%d labels=%d sms=%d margin=%.2f (P %ld triplets %ld active %ld ambiguous %ld)",
                sizeof(T) == 4 ? "fp32" : (std::is_same_v<T, __half> ? "fp16" : "bf16"), kEmuTf32<T> ? " tf32" : "", long(B), long(M), long(d), int(mode),
                int(lk), g_sms, double(margin), long(P), long(h0.size()), long(cnt), long(best));
  if (std::getenv("VERBOSE")) std::printf("%s\n", tag);
  ++checks;
  if constexpr (kEmuTf32<T>) {
    // TF32: the `best` triplets within win of their hinge may flip (count off by at most best, each adding or
    // removing less than win to the sum); every other active value moves by less than win. Gradients 16 u of the
    // unit, plus 2 units per triplet that may flip (one triplet moves an entry by at most 2 sc).
    if (std::llabs(count_out - cnt) > best) { ++failures; std::printf("FAIL %s count: got %ld\n", tag, long(count_out)); }
    const double c2 = double(std::max<int64_t>(cnt - best, 1));
    check_abs(std::string(tag) + " loss", {double(loss_out)}, {loss}, win + double(best) * (win + loss) / c2);
    tol = 16 * std::ldexp(1.0, -11) + 2.0 * double(best);
  } else {
    if (count_out != cnt) { ++failures; std::printf("FAIL %s count: got %ld\n", tag, long(count_out)); }
    check(std::string(tag) + " loss", {double(loss_out)}, {loss}, 1e-5);
  }
  const double unit = sc;
  check(std::string(tag) + " dx", vd(kx), gx, tol, unit);
  check(std::string(tag) + " dy", vd(ky), gy, tol, unit);
}

int main(int argc, char** argv) {
  const int which = argc > 1 ? std::atoi(argv[1]) : -1;
  struct S { int64_t B, M, d; Mode mode; Labels lk; int sms; };
  const std::vector<S> cases = {
      {1, 1, 1, kSelf, kClasses, 132},      {5, 5, 3, kSelf, kClasses, 132},      {5, 37, 16, kCross, kClasses, 1},
      {37, 5, 16, kCross, kClasses, 132},   {37, 37, 129, kSelf, kClasses, 132},  {70, 70, 16, kPair, kDistinct, 132},
      {70, 130, 3, kCross, kClasses, 1},    {130, 70, 24, kCross, kClasses, 132}, {130, 130, 16, kSelf, kClasses, 1},
      {70, 70, 8, kSelf, kOneClass, 132},   {37, 37, 16, kSelf, kDistinct, 132},  {70, 37, 5, kCross, kOneClass, 132},
      {150, 150, 72, kSelf, kClasses, 132}, {70, 70, 7, kPair, kDistinct, 1},
      // d over several kDV chunks (389 = 3 x 128 + 5 = 6 x 64 + 5, padded to 392), split with several tiles (1 SM)
      {130, 70, 389, kCross, kClasses, 1},  {70, 70, 389, kSelf, kClasses, 132},
  };
  int n = 0;
  for (const S& s : cases) {
    g_sms = s.sms;
    const unsigned seed = unsigned(s.B * 1000 + s.M * 10 + s.d + int(s.mode) * 7 + int(s.lk) * 3);
    // gradients: the G tile holds #{active p} / d_an in the input type
    if (which < 0 || which == 0) one_case<float>(s.B, s.M, s.d, s.mode, s.lk, 1e-5, seed);
    if (which < 0 || which == 1) one_case<__half>(s.B, s.M, s.d, s.mode, s.lk, 2e-3, seed);
    if (which < 0 || which == 2) one_case<__nv_bfloat16>(s.B, s.M, s.d, s.mode, s.lk, 1e-2, seed);
    ++n;
  }
  std::printf("%d cases, %d checks, %d failures\n", n, checks, failures);
  return failures != 0;
}
