// Emulated run of the anchor-LSE CUDA kernels (csrc/cuda/anchor_lse_kernels.cuh, pair_tiles.cuh) for SupCon,
// Multi-Similarity and Circle against a dense float64 computation of each loss written from its definition
// (docs/spec.md §6.1-6.3). The host pipeline below mirrors csrc/cuda/anchor_lse.cu launch by launch; the rows are
// given unit-norm (the .cu normalises them with ATen before the kernels, which the emulation does not run).
// Usage: anchor_lse_driver [dtype 0|1|2] ; prints "N cases, K checks, F failures".
#include "emu.h"
#include "driver_common.h"
#include "anchor_lse_kernels.cuh"

#include <algorithm>
#include <random>
#include <string>

using namespace flashdml;
using namespace flashdml::cuda;
using namespace flashdml::cuda::al;

struct Fwd { float loss; std::vector<float> stats; };

template <class T, int K>
Fwd run_fwd(const T* x, const T* y, int64_t B, int64_t M, int64_t d, const std::vector<int64_t>& lab,
            const std::vector<int64_t>& ref, const float* tau, Params prm, double p0, double p1, bool self) {
  const int64_t nrb = (B + kBM - 1) / kBM, ntiles = (M + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  const int64_t nrow_blk = (B + kRowThreads - 1) / kRowThreads;
  std::vector<int64_t> sorted = ref;
  std::sort(sorted.begin(), sorted.end());
  std::vector<float> part(kParts * nsplit * B, std::nanf(""));
  std::vector<double> ell(B, std::nan(""));
  std::vector<int64_t> iws(B + 2 * nrow_blk, -777);
  int64_t* npos_row = iws.data();
  int64_t* blk = npos_row + B;
  Fwd o{std::nanf(""), std::vector<float>(B * kStats, std::nanf(""))};
  emu_launch({U(nrb), U(nsplit), 1}, kThreads, [&] {
    al_fwd_kernel<T, K, kEmuTf32<T>>(x, y, lab.data(), ref.data(), B, M, d, tau, prm, self, tps, part.data()); });
  emu_launch({U(nrow_blk), 1, 1}, kRowThreads, [&] {
    al_rows_kernel(part.data(), int(nsplit), B, M, lab.data(), sorted.data(), self, K, p0, p1, o.stats.data(),
                   ell.data(), npos_row, blk); });
  emu_launch({1, 1, 1}, kOneBlock, [&] {
    al_final_kernel(blk, nrow_blk, ell.data(), npos_row, B, M, self, K, o.stats.data(), &o.loss); });
  return o;
}

template <class T, int K, bool kOutY>
void run_grad(const T* x, const T* y, int64_t nx, int64_t ny, int64_t d, int64_t d_out, const AnchorOp<K>& op,
              const float* sc, T* out, std::vector<float>* gz) {
  const int64_t nout = kOutY ? ny : nx, noth = kOutY ? nx : ny;
  const int64_t nrb = (nout + kBM - 1) / kBM, ntiles = (noth + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  std::vector<float> part(nsplit * nout * d, std::nanf(""));
  float* gzp = nullptr;
  if (gz) { gz->assign(nsplit * nrb, std::nanf("")); gzp = gz->data(); }
  launch_counting_s_tiles("anchor_lse grad pass", d, nrb, ntiles, [&] {
    emu_launch({U(nrb), 1, U(nsplit)}, kThreads, [&] {
      pair::pair_grad_kernel_for<T, AnchorOp<K>, kOutY, false>(d, kEmuTf32<T>)(x, y, nx, ny, d, op, tps, part.data(), gzp); }); });
  emu_launch({3, 1, 1}, 256, [&] { pair::pair_reduce_kernel<T>(part.data(), int(nsplit), nout, d, d_out, sc + 1, out); });
}

enum Mode { kSelf, kCross, kPair };
enum Labels { kClasses, kOneClass, kDistinct };

// The float64 loss: per row the positive and negative logits (and slopes, self-paced weights held), pml's
// reducers and zero cases, dL/dS per pair; returns loss, row LSEs and dL/dS [B * M], dL/dtau.
struct Ref { double loss = 0, dtau = 0; std::vector<double> lse_pos, lse_neg, g; };

Ref reference(int kind, const std::vector<double>& S, const std::vector<char>& pos, const std::vector<char>& neg,
              int64_t B, int64_t M, double a, double b, double c) {
  auto fp = [&](double s) { return kind == 0 ? s * a : kind == 1 ? -a * (s - c) : -b * std::max(0.0, 1 + a - s) * (s - (1 - a)); };
  auto fn = [&](double s) { return kind == 0 ? s * a : kind == 1 ? b * (s - c) : b * std::max(0.0, s + a) * (s - a); };
  auto dp = [&](double s) { return kind == 0 ? a : kind == 1 ? -a : -b * std::max(0.0, 1 + a - s); };
  auto dn = [&](double s) { return kind == 0 ? a : kind == 1 ? b : b * std::max(0.0, s + a); };
  Ref r;
  r.lse_pos.assign(B, -INFINITY); r.lse_neg.assign(B, -INFINITY); r.g.assign(B * M, 0.0);
  std::vector<double> ell(B, 0.0);
  std::vector<int64_t> np(B, 0), nn(B, 0);
  int64_t n_pos = 0, n_neg = 0;
  auto lse = [](const std::vector<double>& v) {
    double m = -INFINITY; for (double e : v) m = std::max(m, e);
    if (m == -INFINITY) return m; double s = 0; for (double e : v) s += std::exp(e - m); return m + std::log(s); };
  for (int64_t i = 0; i < B; ++i) {
    std::vector<double> P, N, all;
    double lin = 0;
    for (int64_t j = 0; j < M; ++j) {
      const double s = S[i * M + j];
      if (pos[i * M + j]) { P.push_back(fp(s)); all.push_back(fp(s)); lin += fp(s); ++np[i]; }
      if (neg[i * M + j]) { N.push_back(fn(s)); all.push_back(fn(s)); ++nn[i]; }
    }
    n_pos += np[i]; n_neg += nn[i];
    if (kind == 0) {
      r.lse_pos[i] = r.lse_neg[i] = lse(all);
      if (np[i] > 0) ell[i] = r.lse_pos[i] - lin / double(np[i]);
    } else if (kind == 1) {
      P.push_back(0.0); N.push_back(0.0);  // log(1 + sum e^f)
      r.lse_pos[i] = lse(P); r.lse_neg[i] = lse(N);
      ell[i] = r.lse_pos[i] / a + r.lse_neg[i] / b;
    } else {
      r.lse_pos[i] = lse(P); r.lse_neg[i] = lse(N);
      if (np[i] > 0 && nn[i] > 0) { const double v = r.lse_pos[i] + r.lse_neg[i]; ell[i] = v > 0 ? v + std::log1p(std::exp(-v)) : std::log1p(std::exp(v)); }
    }
  }
  const bool zero = (n_pos <= 1 && n_neg <= 1) || (kind == 0 && (n_pos == 0 || n_neg == 0));
  int64_t count = 0;
  for (int64_t i = 0; i < B; ++i) count += kind == 1 || ell[i] > 0 ? 1 : 0;
  const double inv = zero || count == 0 ? 0.0 : 1.0 / double(count);
  for (int64_t i = 0; i < B; ++i) {
    const double ci = kind == 1 || ell[i] > 0 ? inv : 0.0;
    r.loss += ci * ell[i];
    if (ci == 0.0) continue;
    double w = ci;
    if (kind == 2) w = ci / (1 + std::exp(-(r.lse_pos[i] + r.lse_neg[i])));
    for (int64_t j = 0; j < M; ++j) {
      const double s = S[i * M + j];
      double g = 0;
      // MS: ell = LSE_P / alpha + LSE_N / beta, so each LSE's derivative is divided by its scale
      const double wp = kind == 1 ? w / a : w, wn = kind == 1 ? w / b : w;
      if (pos[i * M + j]) g = wp * std::exp(fp(s) - r.lse_pos[i]) * dp(s) - (kind == 0 ? ci / double(np[i]) * a : 0.0);
      if (neg[i * M + j]) g = wn * std::exp(fn(s) - r.lse_neg[i]) * dn(s);
      r.g[i * M + j] = g;
      if (kind == 0) r.dtau -= g * s * a;
    }
  }
  return r;
}

template <class T, int K>
void one_case(int64_t B, int64_t M, int64_t d, Mode mode, Labels lk, double tol, unsigned seed, bool misalign) {
  if (mode != kCross) M = B;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<T> xb(B * d + 16), yb(M * d + 16);
  T* x = xb.data() + (misalign ? 1 : 0);
  T* y = mode == kSelf ? x : yb.data() + (misalign ? 1 : 0);
  auto fill = [&](T* p, int64_t n, const T* base) {
    for (int64_t i = 0; i < n; ++i) {
      std::vector<float> v(d); double nn = 0;
      for (int64_t k = 0; k < d; ++k) { v[k] = nd(rng) + (base && i < B ? 2.f * float(tod(base[i * d + k])) : 0.f); nn += double(v[k]) * v[k]; }
      for (int64_t k = 0; k < d; ++k) p[i * d + k] = to_t<T>(float(v[k] / std::sqrt(nn)));
    }
  };
  fill(x, B, nullptr);
  if (mode != kSelf) fill(y, M, mode == kPair ? x : nullptr);
  std::vector<int64_t> lab(B), ref(M);
  const int64_t ncls = std::max<int64_t>(1, B / 4);
  for (int64_t i = 0; i < B; ++i) lab[i] = lk == kOneClass ? 3 : (lk == kDistinct || mode == kPair ? i : int64_t(rng() % ncls));
  for (int64_t j = 0; j < M; ++j) ref[j] = lk == kOneClass ? 3 : (lk == kDistinct || mode == kPair ? j : int64_t(rng() % (ncls + 1)));
  if (mode == kSelf) ref = lab;
  const bool self = mode == kSelf;
  const float tau = 0.1f, grad = 0.7f;
  // the op's parameters (p0, p1, p2) as fd.supcon / multi_similarity / circle pass them
  const double p0 = K == kSupCon ? 0.0 : K == kMultiSimilarity ? 2.0 : 0.4;
  const double p1 = K == kSupCon ? 0.0 : K == kMultiSimilarity ? 50.0 : 80.0;
  const double p2 = K == kMultiSimilarity ? 0.5 : 0.0;
  const Params prm = K == kSupCon ? Params{0.f, 0.f, 0.f} : Params{float(p0), float(p1), float(p2)};

  std::vector<double> S(B * M);
  std::vector<char> pos(B * M), neg(B * M);
  for (int64_t i = 0; i < B; ++i) for (int64_t j = 0; j < M; ++j) {
    double s = 0; for (int64_t k = 0; k < d; ++k) s += tod(x[i * d + k]) * tod(y[j * d + k]);
    S[i * M + j] = s;
    const bool diag = self && i == j;
    pos[i * M + j] = lab[i] == ref[j] && !diag; neg[i * M + j] = lab[i] != ref[j] && !diag;
  }
  const double a = K == kSupCon ? 1.0 / double(tau) : p0;
  const Ref r = reference(K, S, pos, neg, B, M, a, p1, p2);
  std::vector<double> dx(B * d, 0), dy(M * d, 0);
  for (int64_t i = 0; i < B; ++i) for (int64_t j = 0; j < M; ++j) {
    const double G = grad * r.g[i * M + j];
    if (G == 0) continue;
    for (int64_t k = 0; k < d; ++k) { dx[i * d + k] += G * tod(y[j * d + k]); dy[j * d + k] += G * tod(x[i * d + k]); }
  }

  // emulated pipeline (mirrors anchor_lse.cu): padded copies unless aligned with d % kVW == 0
  int64_t dp = d;
  std::vector<T> xp, yp;
  const T* xk = x; const T* yk = y;
  if (misalign || d % TileCfg<T>::kVW != 0) {
    xp = padded(x, B, d, TileCfg<T>::kVW, dp); xk = xp.data();
    if (self) yk = xk; else { yp = padded(y, M, d, TileCfg<T>::kVW, dp); yk = yp.data(); }
  }
  const Fwd f = run_fwd<T, K>(xk, yk, B, M, dp, lab, ref, &tau, prm, p0, p1, self);
  std::vector<float> sc(4, std::nanf(""));
  emu_launch({1, 1, 1}, kOneBlock, [&] { al_bwd_prep_kernel(f.stats.data(), B, &grad, &tau, K, float(p1), sc.data()); });
  AnchorOp<K> op{};
  op.lab_x = lab.data(); op.lab_y = ref.data(); op.stats = f.stats.data(); op.sc = sc.data(); op.prm = prm;
  op.self_mode = self;
  std::vector<T> gx(B * d, to_t<T>(std::nanf(""))), gy(M * d, to_t<T>(std::nanf("")));
  std::vector<float> gz;
  float dtau_out = std::nanf("");
  run_grad<T, K, false>(xk, yk, B, M, dp, d, op, sc.data(), gx.data(), K == kSupCon ? &gz : nullptr);
  run_grad<T, K, true>(xk, yk, B, M, dp, d, op, sc.data(), gy.data(), nullptr);
  emu_launch({1, 1, 1}, kOneBlock, [&] {
    al_dtemp_kernel(gz.empty() ? nullptr : gz.data(), int64_t(gz.size()), sc.data(), &dtau_out); });

  char tag[200];
  std::snprintf(tag, sizeof tag, "%s%s kind=%d B=%ld M=%ld d=%ld mode=%d labels=%d sms=%d padded=%d",
                sizeof(T) == 4 ? "fp32" : (std::is_same_v<T, __half> ? "fp16" : "bf16"), kEmuTf32<T> ? " tf32" : "", K, long(B), long(M), long(d),
                int(mode), int(lk), g_sms, int(dp != d || misalign));
  std::vector<double> lp(B), ln(B);
  for (int64_t i = 0; i < B; ++i) { lp[i] = f.stats[i * kStats + kLsePos]; ln[i] = f.stats[i * kStats + kLseNeg]; }
  // the LSEs' unit: the logits' scale (1/tau, or gamma / beta) times one similarity unit
  const double lunit = K == kSupCon ? 1.0 / tau : K == kMultiSimilarity ? 1.0 : 10.0;
  if constexpr (kEmuTf32<T>) {
    // TF32 S tiles (every S entry within dS): the loss within lip dS absolutely, lip its Lipschitz constant in
    // max |dS|: SupCon 2 / tau (an LSE of S / tau minus a positive's logit), Multi-Similarity 2 (two log(1 + sum
    // exp) over their own scale), Circle 2 gamma (1 + 2 m) (logits gamma [O - s]_+ (s - D), slope <= gamma (1 + 2 m)
    // on unit rows, in two LSEs); the LSEs and gradients relatively, 16 u times the logits' scale (1 / tau,
    // beta = 50, gamma = 80) as tests/test_triton_tf32.py allows the gradients.
    const double lip = K == kSupCon ? 2.0 / tau : K == kMultiSimilarity ? 2.0 : 2.0 * p1 * (1.0 + 2.0 * p0);
    const double scale = K == kSupCon ? 1.0 / tau : p1;
    check_abs(std::string(tag) + " loss", {double(f.loss)}, {r.loss}, lip * tf32_delta_s(d));
    tol = 16 * std::ldexp(1.0, -11) * scale;
  } else {
    check(std::string(tag) + " loss", {double(f.loss)}, {r.loss}, tol);
  }
  check(std::string(tag) + " lse_pos", lp, r.lse_pos, tol, lunit);
  check(std::string(tag) + " lse_neg", ln, r.lse_neg, tol, lunit);
  double gmax = 0;
  for (double v : dx) gmax = std::max(gmax, std::abs(v));
  for (double v : dy) gmax = std::max(gmax, std::abs(v));
  check(std::string(tag) + " dx", vd(gx), dx, tol, std::max(gmax, 1e-6));
  check(std::string(tag) + " dy", vd(gy), dy, tol, std::max(gmax, 1e-6));
  if (K == kSupCon) check(std::string(tag) + " dtau", {double(dtau_out)}, {grad * r.dtau}, tol, grad / tau * 1e-2);
  else check(std::string(tag) + " dtau", {double(dtau_out)}, {0.0}, 0.0);
}

int main(int argc, char** argv) {
  const int which = argc > 1 ? std::atoi(argv[1]) : -1;
  struct Case { int64_t B, M, d; Mode mode; Labels lk; int sms; bool mis; };
  const std::vector<Case> cases = {
      {1, 1, 3, kSelf, kClasses, 132, false},    {2, 3, 5, kCross, kClasses, 132, false},
      {5, 5, 3, kSelf, kClasses, 132, false},    {5, 37, 16, kCross, kClasses, 132, false},
      {37, 5, 16, kCross, kClasses, 1, true},    {37, 37, 129, kSelf, kClasses, 132, false},
      {70, 70, 16, kPair, kDistinct, 132, false}, {70, 130, 3, kCross, kClasses, 1, false},
      {130, 70, 16, kCross, kClasses, 132, true}, {130, 130, 24, kSelf, kClasses, 1, false},
      {70, 70, 8, kSelf, kOneClass, 132, false}, {37, 37, 16, kSelf, kDistinct, 132, false},
      // d over several kDV chunks (389 = 3 x 128 + 5 = 6 x 64 + 5, padded to 392), split with several tiles (1 SM)
      {130, 70, 389, kCross, kClasses, 1, false}, {70, 70, 389, kSelf, kClasses, 132, true},
  };
  int n = 0;
  for (const Case& c : cases) {
    g_sms = c.sms;
    const unsigned seed = unsigned(c.B * 1000 + c.M * 10 + c.d + int(c.mode) * 7 + int(c.lk));
    auto all_kinds = [&](auto tag, double tol) {
      using T = decltype(tag);
      one_case<T, kSupCon>(c.B, c.M, c.d, c.mode, c.lk, tol, seed, c.mis);
      one_case<T, kMultiSimilarity>(c.B, c.M, c.d, c.mode, c.lk, tol, seed, c.mis);
      one_case<T, kCircle>(c.B, c.M, c.d, c.mode, c.lk, tol, seed, c.mis);
    };
    if (which < 0 || which == 0) all_kinds(float{}, 2e-4);
    if (which < 0 || which == 1) all_kinds(__half{}, 3e-2);
    if (which < 0 || which == 2) all_kinds(__nv_bfloat16{}, 8e-2);
    ++n;
  }
  std::printf("%d cases, %d checks, %d failures\n", n, checks, failures);
  return failures != 0;
}
