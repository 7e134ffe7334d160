// Emulated run of the hinge-pair CUDA kernels (TCM / margin contrastive: csrc/cuda/hinge_pair_kernels.cuh,
// pair_tiles.cuh) against a dense float64 reference. The host pipeline below mirrors csrc/cuda/hinge_pair.cu.
// The embeddings are multiples of 1/8 and the margins multiples of 1/64, so every similarity is exact in fp32 in
// any summation order: the reference's membership tests are the kernels' bit for bit, and many pairs sit exactly
// on a margin (the inclusive / strict tie rules are exercised). Usage: hinge_pair_driver [dtype 0|1|2].
#include "emu.h"
#include "driver_common.h"
#include "hinge_pair_kernels.cuh"

#include <algorithm>
#include <random>
#include <string>

using namespace flashdml;
using namespace flashdml::cuda;
using namespace flashdml::cuda::hp;


template <class T, bool kOutY>
void run_grad(const T* x, const T* y, int64_t nx, int64_t ny, int64_t d, int64_t d_out, const HingeOp& op,
              const float* w, T* out) {
  const int64_t nout = kOutY ? ny : nx, noth = kOutY ? nx : ny;
  const int64_t nrb = (nout + kBM - 1) / kBM, ntiles = (noth + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  std::vector<float> part(nsplit * nout * d, std::nanf(""));
  launch_counting_s_tiles("hinge_pair grad pass", d, nrb, ntiles, [&] {
    emu_launch({U(nrb), 1, U(nsplit)}, kThreads, [&] {
      pair::pair_grad_kernel_for<T, HingeOp, kOutY, kOutY>(d, kEmuTf32<T>)(x, y, nx, ny, d, op, tps, part.data(), nullptr); }); });
  emu_launch({3, 1, 1}, 256, [&] { pair::pair_reduce_kernel<T>(part.data(), int(nsplit), nout, d, d_out, w + 2, out); });
}


enum Mode { kSelf, kCross, kPair };
enum Labels { kClasses, kOneClass, kDistinct };

template <class T>
void one_case(int64_t B, int64_t M, int64_t d, Mode mode, Labels lk, bool strict, double tol, unsigned seed, bool misalign) {
  if (mode != kCross) M = B;
  std::mt19937 rng(seed);
  std::vector<T> xb(B * d + 16), yb(M * d + 16);
  T* x = xb.data() + (misalign ? 1 : 0);
  T* y = mode == kSelf ? x : yb.data() + (misalign ? 1 : 0);
  for (int64_t e = 0; e < B * d; ++e) x[e] = to_t<T>(float(int(rng() % 9) - 4) / 8.f);
  if (mode != kSelf) for (int64_t e = 0; e < M * d; ++e) y[e] = to_t<T>(float(int(rng() % 9) - 4) / 8.f);
  std::vector<int64_t> lab(B), ref(M);
  const int64_t ncls = std::max<int64_t>(1, B / 4);
  for (int64_t i = 0; i < B; ++i) lab[i] = lk == kOneClass ? 5 : (lk == kDistinct || mode == kPair ? i : int64_t(rng() % ncls));
  for (int64_t j = 0; j < M; ++j) ref[j] = lk == kOneClass ? 5 : (lk == kDistinct || mode == kPair ? j : int64_t(rng() % (ncls + 1)));
  if (mode == kSelf) ref = lab;
  // TCM drops the diagonal in self mode; the contrastive loss keeps it (docs/spec.md §2.3 / 2.4)
  const bool drop = mode == kSelf && !strict;
  const double wp = strict ? 1.0 : 0.75, wn = strict ? 1.0 : 1.25;

  std::vector<double> S(B * M);
  for (int64_t i = 0; i < B; ++i) for (int64_t j = 0; j < M; ++j) {
    double s = 0; for (int64_t k = 0; k < d; ++k) s += tod(x[i * d + k]) * tod(y[j * d + k]); S[i * M + j] = s; }
  // margins on the 1/64 grid near the middle of the data: ties with the margins are frequent
  std::vector<double> sorted = S; std::sort(sorted.begin(), sorted.end());
  const float mp = float(std::round(sorted[sorted.size() / 2] * 64) / 64), mn = float(std::round(sorted[(sorted.size() * 2) / 3] * 64) / 64);
  const float grad = 0.7f;

  // float64 reference
  std::vector<int> kind(B * M, 0);
  double ps = 0, ns = 0; int64_t pc = 0, nc = 0, ties = 0;
  for (int64_t i = 0; i < B; ++i) for (int64_t j = 0; j < M; ++j) {
    const double s = S[i * M + j];
    ties += s == mp || s == mn;
    if (lab[i] == ref[j]) { if (!(drop && i == j) && (strict ? s < mp : s <= mp)) { kind[i * M + j] = 1; ps += mp - s; ++pc; } }
    else if (strict ? s > mn : s >= mn) { kind[i * M + j] = -1; ns += s - mn; ++nc; }
  }
  const double loss = (pc ? wp * ps / double(pc) : 0.0) + (nc ? wn * ns / double(nc) : 0.0);
  std::vector<double> dx(B * d, 0), dy(M * d, 0);
  for (int64_t i = 0; i < B; ++i) for (int64_t j = 0; j < M; ++j) {
    const int k = kind[i * M + j];
    if (k == 0) continue;
    const double G = grad * (k > 0 ? -wp / double(pc) : wn / double(nc));
    for (int64_t e = 0; e < d; ++e) { dx[i * d + e] += G * tod(y[j * d + e]); dy[j * d + e] += G * tod(x[i * d + e]); }
  }

  // emulated pipeline (mirrors hinge_pair.cu)
  int64_t dp = d;
  std::vector<T> xp, yp;
  const T* xk = x; const T* yk = y;
  if (misalign || d % TileCfg<T>::kVW != 0) {
    xp = padded(x, B, d, TileCfg<T>::kVW, dp); xk = xp.data();
    if (mode == kSelf) yk = xk; else { yp = padded(y, M, d, TileCfg<T>::kVW, dp); yk = yp.data(); }
  }
  const int64_t nrb = (B + kBM - 1) / kBM, ntiles = (M + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  const int64_t nblk = nrb * nsplit;
  std::vector<double> part_sum(2 * nblk, std::nan(""));
  std::vector<int64_t> part_cnt(2 * nblk, -777), counts(2, -777);
  float loss_out = std::nanf(""); std::vector<float> sums(2, std::nanf(""));
  emu_launch({U(nrb), U(nsplit), 1}, kThreads, [&] {
    hp_stats_kernel<T, kEmuTf32<T>>(xk, yk, lab.data(), ref.data(), B, M, dp, tps, mp, mn, strict, drop, part_sum.data(), part_cnt.data()); });
  emu_launch({1, 1, 1}, kOneBlock, [&] { hp_final_kernel(part_sum.data(), part_cnt.data(), nblk, wp, wn, &loss_out, sums.data(), counts.data()); });
  std::vector<float> w(3, std::nanf(""));
  emu_launch({1, 1, 1}, 32, [&] { hp_bwd_prep_kernel(counts.data(), &grad, wp, wn, w.data()); });
  HingeOp op{};
  op.lab_x = lab.data(); op.lab_y = ref.data(); op.w = w.data(); op.mp = mp; op.mn = mn; op.strict = strict; op.drop_diagonal = drop;
  std::vector<T> gx(B * d, to_t<T>(std::nanf(""))), gy(M * d, to_t<T>(std::nanf("")));
  run_grad<T, false>(xk, yk, B, M, dp, d, op, w.data(), gx.data());
  run_grad<T, true>(xk, yk, B, M, dp, d, op, w.data(), gy.data());

  char tag[220];
  std::snprintf(tag, sizeof tag, "%s B=%ld M=%ld d=%ld mode=%d labels=%d strict=%d sms=%d padded=%d (hp %ld hn %ld ties %ld)",
                sizeof(T) == 4 ? "fp32" : (std::is_same_v<T, __half> ? "fp16" : "bf16"), long(B), long(M), long(d), int(mode), int(lk),
                int(strict), g_sms, int(dp != d || misalign), long(pc), long(nc), long(ties));
  if (std::getenv("VERBOSE")) std::printf("%s\n", tag);
  if (counts[0] != pc || counts[1] != nc) {
    ++failures; std::printf("FAIL %s counts: got %ld %ld\n", tag, long(counts[0]), long(counts[1]));
  }
  ++checks;
  check(std::string(tag) + " loss", {double(loss_out)}, {loss}, 1e-6);
  check(std::string(tag) + " sums", vd(sums), {ps, ns}, 1e-6);
  const double unit = grad * std::max(wp / double(std::max<int64_t>(pc, 1)), wn / double(std::max<int64_t>(nc, 1)));
  check(std::string(tag) + " dx", vd(gx), dx, tol, unit);
  check(std::string(tag) + " dy", vd(gy), dy, tol, unit);
}

int main(int argc, char** argv) {
  const int which = argc > 1 ? std::atoi(argv[1]) : -1;
  struct S { int64_t B, M, d; Mode mode; Labels lk; bool strict; int sms; bool mis; };
  const std::vector<S> cases = {
      {1, 1, 1, kSelf, kClasses, false, 132, false},   {1, 1, 3, kCross, kClasses, true, 132, false},
      {5, 5, 3, kSelf, kClasses, false, 132, false},   {5, 5, 3, kSelf, kClasses, true, 1, false},
      {5, 37, 16, kCross, kClasses, false, 132, false}, {37, 5, 16, kCross, kClasses, true, 1, true},
      {37, 37, 129, kSelf, kClasses, false, 132, false}, {70, 70, 16, kPair, kDistinct, false, 132, false},
      {70, 130, 3, kCross, kClasses, false, 1, false}, {130, 70, 16, kCross, kClasses, true, 132, true},
      {130, 130, 16, kSelf, kClasses, false, 1, false}, {130, 130, 8, kSelf, kClasses, true, 132, false},
      {70, 70, 8, kSelf, kOneClass, false, 132, false}, {37, 37, 16, kSelf, kDistinct, true, 132, false},
      {70, 37, 1, kCross, kOneClass, true, 132, false},  {200, 150, 40, kCross, kClasses, false, 1, false},
      {150, 150, 72, kSelf, kClasses, true, 132, false}, {150, 150, 72, kSelf, kClasses, false, 132, true},
      // d over several kDV chunks (389 = 3 x 128 + 5 = 6 x 64 + 5, padded to 392), split with several tiles (1 SM)
      {130, 70, 389, kCross, kClasses, false, 1, false}, {70, 70, 389, kSelf, kClasses, true, 132, true},
  };
  int n = 0;
  for (const S& s : cases) {
    g_sms = s.sms;
    const unsigned seed = unsigned(s.B * 1000 + s.M * 10 + s.d + int(s.mode) * 7 + int(s.lk) * 3 + s.strict);
    // dx / dy: the G tile holds the two weights in the input type (scaled so the larger is 2^14)
    if (which < 0 || which == 0) one_case<float>(s.B, s.M, s.d, s.mode, s.lk, s.strict, 1e-5, seed, s.mis);
    if (which < 0 || which == 1) one_case<__half>(s.B, s.M, s.d, s.mode, s.lk, s.strict, 2e-3, seed, s.mis);
    if (which < 0 || which == 2) one_case<__nv_bfloat16>(s.B, s.M, s.d, s.mode, s.lk, s.strict, 1e-2, seed, s.mis);
    ++n;
  }
  std::printf("%d cases, %d checks, %d failures\n", n, checks, failures);
  return failures != 0;
}
