// Emulated run of the cross-example softmax / NT-Xent CUDA kernels (csrc/cuda/xent_kernels.cuh, pair_tiles.cuh)
// against a dense float64 reference. The host pipeline below mirrors csrc/cuda/xent.cu launch by launch.
// Usage: xent_driver [dtype 0|1|2] ; prints "N cases, K failures".
#include "emu.h"
#include "driver_common.h"
#include "xent_kernels.cuh"

#include <algorithm>
#include <random>
#include <string>

using namespace flashdml;
using namespace flashdml::cuda;
using namespace flashdml::cuda::xe;


static void run_count(const std::vector<int64_t>& lab, const std::vector<int64_t>& ref, bool self, std::vector<int64_t>& cnt) {
  std::vector<int64_t> sorted = ref;
  std::sort(sorted.begin(), sorted.end());
  const int64_t B = int64_t(lab.size()), nblk = (B + kRowThreads - 1) / kRowThreads;
  cnt.assign(nblk + 1, -777);
  emu_launch({U(nblk), 1, 1}, kRowThreads, [&] { xe_count_kernel(lab.data(), B, sorted.data(), int64_t(sorted.size()), self, cnt.data()); });
}

struct FwdOut { float loss; std::vector<float> lse, coef; };

template <class T>
FwdOut run_fwd(const T* x, const T* y, int64_t B, int64_t M, int64_t d, const std::vector<int64_t>& lab,
               const std::vector<int64_t>& ref, const float* tau, bool global, bool self) {
  const int64_t nrb = (B + kBM - 1) / kBM, ntiles = (M + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  const int64_t nrow_blk = (B + kRowThreads - 1) / kRowThreads;
  std::vector<float> fws(2 * nsplit * B + 2 * B, std::nanf(""));
  float* pa = fws.data(); float* pb = pa + nsplit * B; float* rmax = pb + nsplit * B; float* rsum = rmax + B;
  std::vector<int64_t> cnt;
  run_count(lab, ref, self, cnt);
  int64_t* npos = cnt.data() + nrow_blk;
  std::vector<double> dws(2 * nrow_blk, std::nan(""));
  FwdOut o{std::nanf(""), std::vector<float>(global ? 1 : B, std::nanf("")), std::vector<float>(global ? 1 : B, std::nanf(""))};
  const int64_t* lx = lab.data(); const int64_t* ly = ref.data();
  emu_launch({U(nrb), U(nsplit), 1}, kThreads, [&] { xe_lse_kernel<T, kEmuTf32<T>>(x, y, lx, ly, B, M, d, tau, self, tps, pa, pb); });
  emu_launch({U(nrow_blk), 1, 1}, kRowThreads, [&] { xe_row_lse_kernel(pa, pb, int(nsplit), B, rmax, rsum, global ? nullptr : o.lse.data()); });
  emu_launch({1, 1, 1}, kOneBlock, [&] { xe_scalars_kernel(cnt.data(), nrow_blk, global ? rmax : nullptr, rsum, B, npos, o.lse.data()); });
  emu_launch({U(nrb), U(nsplit), 1}, kThreads, [&] { xe_pos_kernel<T, kEmuTf32<T>>(x, y, lx, ly, B, M, d, tau, o.lse.data(), !global, self, tps, pa, pb); });
  emu_launch({U(nrow_blk), 1, 1}, kRowThreads, [&] { xe_rows_kernel(pa, pb, int(nsplit), B, npos, global ? nullptr : o.coef.data(), dws.data()); });
  emu_launch({1, 1, 1}, kOneBlock, [&] { xe_final_kernel(dws.data(), nrow_blk, npos, &o.loss, global ? o.coef.data() : nullptr); });
  return o;
}

template <class T, bool kOutY>
void run_grad(const T* x, const T* y, int64_t nx, int64_t ny, int64_t d, int64_t d_out, const XentOp& op, const float* w,
              T* out, std::vector<float>* gz) {
  const int64_t nout = kOutY ? ny : nx, noth = kOutY ? nx : ny;
  const int64_t nrb = (nout + kBM - 1) / kBM, ntiles = (noth + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  std::vector<float> part(nsplit * nout * d, std::nanf(""));
  float* gzp = nullptr;
  if (gz) { gz->assign(nsplit * nrb, std::nanf("")); gzp = gz->data(); }
  launch_counting_s_tiles("xent grad pass", d, nrb, ntiles, [&] {
    emu_launch({U(nrb), 1, U(nsplit)}, kThreads, [&] {
      pair::pair_grad_kernel_for<T, XentOp, kOutY, false>(d, kEmuTf32<T>)(x, y, nx, ny, d, op, tps, part.data(), gzp); }); });
  emu_launch({3, 1, 1}, 256, [&] { pair::pair_reduce_kernel<T>(part.data(), int(nsplit), nout, d, d_out, w + 2, out); });
}


enum Mode { kSelf, kCross, kPair };
enum Labels { kClasses, kOneClass, kDistinct };

template <class T>
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

  // float64 reference
  std::vector<double> z(B * M);
  std::vector<char> pos(B * M), neg(B * M);
  int64_t npos = 0;
  for (int64_t i = 0; i < B; ++i) for (int64_t j = 0; j < M; ++j) {
    double s = 0; for (int64_t k = 0; k < d; ++k) s += tod(x[i * d + k]) * tod(y[j * d + k]);
    z[i * M + j] = s / double(tau);
    const bool diag = self && i == j;
    pos[i * M + j] = lab[i] == ref[j] && !diag; neg[i * M + j] = lab[i] != ref[j] && !diag;
    npos += pos[i * M + j];
  }
  auto lse_of = [&](auto in) { double m = -INFINITY; for (int64_t i = 0; i < B; ++i) for (int64_t j = 0; j < M; ++j) if (in(i, j) && neg[i * M + j]) m = std::max(m, z[i * M + j]);
    if (m == -INFINITY) return m; double s = 0; for (int64_t i = 0; i < B; ++i) for (int64_t j = 0; j < M; ++j) if (in(i, j) && neg[i * M + j]) s += std::exp(z[i * M + j] - m); return m + std::log(s); };
  for (bool global : {true, false}) {
    std::vector<double> lse(global ? 1 : B);
    if (global) lse[0] = lse_of([](int64_t, int64_t) { return true; });
    else for (int64_t r = 0; r < B; ++r) lse[r] = lse_of([r](int64_t i, int64_t) { return i == r; });
    auto L = [&](int64_t i) { return lse[global ? 0 : i]; };
    double loss = 0; std::vector<double> coef(global ? 1 : B, 0.0);
    for (int64_t i = 0; i < B; ++i) for (int64_t j = 0; j < M; ++j) if (pos[i * M + j] && L(i) != -INFINITY) {
      const double u = L(i) - z[i * M + j];
      loss += u > 0 ? u + std::log1p(std::exp(-u)) : std::log1p(std::exp(u));
      coef[global ? 0 : i] += 1.0 / (1.0 + std::exp(-u));
    }
    if (npos > 0) { loss /= double(npos); for (auto& c : coef) c /= double(npos); } else { loss = 0; }
    std::vector<double> dx(B * d, 0), dy(M * d, 0); double dtau = 0;
    for (int64_t i = 0; i < B; ++i) for (int64_t j = 0; j < M; ++j) {
      const double zz = z[i * M + j]; double g = 0;
      if (npos > 0 && pos[i * M + j] && L(i) != -INFINITY) g = -1.0 / (1.0 + std::exp(zz - L(i))) / double(npos);
      if (neg[i * M + j]) g = coef[global ? 0 : i] * std::exp(zz - L(i));
      const double G = grad * g / double(tau);
      for (int64_t k = 0; k < d; ++k) { dx[i * d + k] += G * tod(y[j * d + k]); dy[j * d + k] += G * tod(x[i * d + k]); }
      dtau -= G * zz;
    }

    // emulated pipeline (mirrors xent.cu)
    // the host side of xent.cu: padded copies unless aligned with d % kVW == 0 (misaligned inputs: copied)
    int64_t dp = d;
    std::vector<T> xp, yp;
    const T* xk = x; const T* yk = y;
    if (misalign || d % TileCfg<T>::kVW != 0) {
      xp = padded(x, B, d, TileCfg<T>::kVW, dp); xk = xp.data();
      if (self) yk = xk; else { yp = padded(y, M, d, TileCfg<T>::kVW, dp); yk = yp.data(); }
    }
    const FwdOut f = run_fwd<T>(xk, yk, B, M, dp, lab, ref, &tau, global, self);
    std::vector<int64_t> cnt;
    run_count(lab, ref, self, cnt);
    std::vector<float> w(4, std::nanf(""));
    const int64_t ncnt = int64_t(cnt.size()) - 1;
    emu_launch({1, 1, 1}, kOneBlock, [&] { xe_bwd_prep_kernel(cnt.data(), ncnt, f.coef.data(), int64_t(f.coef.size()), &grad, &tau, w.data()); });
    XentOp op{};
    op.lab_x = lab.data(); op.lab_y = ref.data(); op.lse = f.lse.data(); op.coef = f.coef.data(); op.tau = &tau;
    op.w = w.data(); op.per_row = !global; op.self_mode = self;
    std::vector<T> gx(B * d, to_t<T>(std::nanf(""))), gy(M * d, to_t<T>(std::nanf("")));
    std::vector<float> gz; float dtau_out = std::nanf("");
    run_grad<T, false>(xk, yk, B, M, dp, d, op, w.data(), gx.data(), &gz);
    if (global && self) gy = gx; else run_grad<T, true>(xk, yk, B, M, dp, d, op, w.data(), gy.data(), nullptr);
    emu_launch({1, 1, 1}, kOneBlock, [&] { xe_dtau_kernel(gz.data(), int64_t(gz.size()), w.data(), &dtau_out); });

    char tag[200];
    std::snprintf(tag, sizeof tag, "%s%s B=%ld M=%ld d=%ld mode=%d labels=%d global=%d sms=%d padded=%d", sizeof(T) == 4 ? "fp32" : (std::is_same_v<T, __half> ? "fp16" : "bf16"),
                  kEmuTf32<T> ? " tf32" : "", long(B), long(M), long(d), int(mode), int(lk), int(global), g_sms, int(dp != d || misalign));
    const double unit = grad / tau / double(std::max<int64_t>(npos, 1));
    if constexpr (kEmuTf32<T>) {
      // TF32 S tiles: every z within dz = dS / tau, each LSE within dz and the loss (softplus of an LSE minus a
      // logit, 1-Lipschitz) within 2 dz, absolutely; coef and the gradients relative 16 u / tau
      const double dz = tf32_delta_s(d) / double(tau);
      tol = 16 * std::ldexp(1.0, -11) / double(tau);
      check_abs(std::string(tag) + " loss", {double(f.loss)}, {loss}, 2 * dz);
      check_abs(std::string(tag) + " lse", vd(f.lse), lse, dz);
    } else {
      check(std::string(tag) + " loss", {double(f.loss)}, {loss}, tol);
      check(std::string(tag) + " lse", vd(f.lse), lse, tol, 1.0);
    }
    check(std::string(tag) + " coef", vd(f.coef), coef, tol, 1.0 / double(std::max<int64_t>(npos, 1)));
    check(std::string(tag) + " dx", vd(gx), dx, tol, unit);
    check(std::string(tag) + " dy", vd(gy), dy, tol, unit);
    check(std::string(tag) + " dtau", {double(dtau_out)}, {dtau}, tol, grad / tau);
  }
}

int main(int argc, char** argv) {
  const int which = argc > 1 ? std::atoi(argv[1]) : -1;
  struct S { int64_t B, M, d; Mode mode; Labels lk; int sms; bool mis; };
  const std::vector<S> cases = {
      {1, 1, 1, kSelf, kClasses, 132, false},    {1, 1, 3, kCross, kClasses, 132, false},
      {5, 5, 3, kSelf, kClasses, 132, false},    {5, 37, 16, kCross, kClasses, 132, false},
      {37, 5, 16, kCross, kClasses, 1, true},    {37, 37, 129, kSelf, kClasses, 132, false},
      {70, 70, 16, kPair, kDistinct, 132, false}, {70, 130, 3, kCross, kClasses, 1, false},
      {130, 70, 16, kCross, kClasses, 132, true}, {130, 130, 16, kSelf, kClasses, 1, false},
      {70, 70, 8, kSelf, kOneClass, 132, false}, {37, 37, 16, kSelf, kDistinct, 132, false},
      {70, 37, 1, kCross, kOneClass, 132, false}, {130, 130, 24, kPair, kDistinct, 1, false},
      // 16-bit d <= 64: the 64-column G·B product over several tiles (d = 64; d = 40 with misaligned inputs; 1 SM: one
      // split holding all the tiles)
      {130, 70, 64, kCross, kClasses, 132, false}, {70, 130, 40, kSelf, kClasses, 1, true},
      // d over several kDV chunks (389 = 3 x 128 + 5 = 6 x 64 + 5, padded to 392): the chunk loop inside a block,
      // with (1 SM) and without (132 SMs) running sums read back across the tiles of a split
      {130, 70, 389, kCross, kClasses, 1, false}, {70, 70, 389, kSelf, kClasses, 132, true},
  };
  int n = 0;
  for (const S& s : cases) {
    g_sms = s.sms;
    const unsigned seed = unsigned(s.B * 1000 + s.M * 10 + s.d + int(s.mode) * 7 + int(s.lk));
    if (which < 0 || which == 0) one_case<float>(s.B, s.M, s.d, s.mode, s.lk, 2e-4, seed, s.mis);
    if (which < 0 || which == 1) one_case<__half>(s.B, s.M, s.d, s.mode, s.lk, 2e-2, seed, s.mis);
    if (which < 0 || which == 2) one_case<__nv_bfloat16>(s.B, s.M, s.d, s.mode, s.lk, 6e-2, seed, s.mis);
    ++n;
  }
  std::printf("%d cases, %d checks, %d failures\n", n, checks, failures);
  return failures != 0;
}
