// Emulated run of the selection CUDA kernels (kNN, hardest negatives: csrc/cuda/selection_kernels.cuh) against a
// dense float64 reference. The host pipeline below mirrors csrc/cuda/selection.cu. Embeddings are multiples of 1/8
// (rows drawn from a small pool, so many rows repeat), so every similarity is exact in fp32 in any summation order
// and huge numbers of exact ties occur: values and indices must equal the reference's bit for bit, ties broken
// toward the lower column / flat index. Usage: selection_driver [dtype 0|1|2].
#include "emu.h"
#include "driver_common.h"

#include <algorithm>
#include <atomic>
#include <numeric>
#include <random>
#include <string>


#include "selection_kernels.cuh"

using namespace flashdml;
using namespace flashdml::cuda;
using namespace flashdml::cuda::sel;


// selection.cu's knn pipeline: rounds of kK keys, each below the previous round's last key.
template <class T>
void knn_pipeline(const T* x, const T* y, int64_t B, int64_t M, int64_t d, int64_t k, bool excl, float* values,
                  int64_t* indices) {
  const int64_t nrb = (B + kBM - 1) / kBM, ntiles = (M + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  std::vector<uint64_t> part(nsplit * B * kK, 12345u), bound(B, 777u);
  const int64_t rounds = (k + kK - 1) / kK;
  for (int64_t r = 0; r < rounds; ++r) {
    const uint64_t* b_in = r > 0 ? bound.data() : nullptr;
    emu_launch({U(nrb), U(nsplit), 1}, kThreads, [&] {
      knn_partial_kernel<T, kEmuTf32<T>>(x, y, B, M, d, tps, excl, b_in, part.data()); });
    uint64_t* b_out = r + 1 < rounds ? bound.data() : nullptr;
    const int take = int(std::min<int64_t>(kK, k - r * kK));
    emu_launch({U((B + kMergeRows - 1) / kMergeRows), 1, 1}, kMergeRows, [&] {
      knn_merge_kernel(part.data(), B, int(nsplit), k, r * kK, take, values, indices, b_out); });
  }
}

// selection.cu's hardest-negatives pipeline: three histogram passes, count, prefix sums, collect, sort.
template <class T>
void hn_pipeline(const T* x, const T* y, const int64_t* lab, const int64_t* ref, int64_t B, int64_t M, int64_t d,
                 int64_t k, bool self_mode, std::vector<float>& vals, std::vector<int64_t>& flat) {
  const int64_t nrb = (B + kBM - 1) / kBM, ntiles = (M + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  std::vector<int64_t> state = {0, k, -1, -1};
  std::vector<unsigned long long> hist(kNBins);
  std::vector<int64_t> cnt(2 * B * nsplit, -777), base(2 * B * nsplit, 0);
  vals.assign(k, std::nanf(""));
  flat.assign(k, -777);
  const int passes[3][2] = {{21, 32}, {10, 21}, {0, 10}};
  for (const auto& p : passes) {
    std::fill(hist.begin(), hist.end(), 0ull);
    emu_launch({U(nrb), U(nsplit), 1}, kThreads, [&] {
      hn_pass_kernel<T, 0, kEmuTf32<T>>(x, y, lab, ref, B, M, d, tps, int(nsplit), self_mode, p[0], p[1], state.data(),
                           hist.data(), nullptr, nullptr, nullptr, nullptr); });
    emu_launch({1, 1, 1}, 32, [&] { hn_select_kernel(hist.data(), p[1] - p[0], k, state.data()); });
  }
  emu_launch({U(nrb), U(nsplit), 1}, kThreads, [&] {
    hn_pass_kernel<T, 1, kEmuTf32<T>>(x, y, lab, ref, B, M, d, tps, int(nsplit), self_mode, 0, 0, state.data(), nullptr,
                         cnt.data(), nullptr, nullptr, nullptr); });
  for (int c = 0; c < 2; ++c) {
    int64_t run = 0;
    for (int64_t e = 0; e < B * nsplit; ++e) { base[c * B * nsplit + e] = run; run += cnt[c * B * nsplit + e]; }
  }
  emu_launch({U(nrb), U(nsplit), 1}, kThreads, [&] {
    hn_pass_kernel<T, 2, kEmuTf32<T>>(x, y, lab, ref, B, M, d, tps, int(nsplit), self_mode, 0, 0, state.data(), nullptr,
                         nullptr, base.data(), vals.data(), flat.data()); });
  std::vector<int64_t> order(k);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return vals[a] != vals[b] ? vals[a] > vals[b] : flat[a] < flat[b]; });
  std::vector<float> v2(k); std::vector<int64_t> f2(k);
  for (int64_t i = 0; i < k; ++i) { v2[i] = vals[order[i]]; f2[i] = flat[order[i]]; }
  vals.swap(v2); flat.swap(f2);
}


template <class T>
void one_case(int64_t B, int64_t M, int64_t d, bool self_mode, int64_t k_knn, int64_t k_hn, bool pair_labels,
              unsigned seed, bool misalign) {
  if (self_mode) M = B;
  std::mt19937 rng(seed);
  const int64_t pool = std::max<int64_t>(1, B / 3);
  std::vector<float> rows_pool(pool * d);
  for (auto& e : rows_pool) e = float(int(rng() % 17) - 8) / 8.f;
  std::vector<T> xb(B * d + 16), yb(M * d + 16);
  T* x = xb.data() + (misalign ? 1 : 0);
  T* y = self_mode ? x : yb.data() + (misalign ? 1 : 0);
  for (int64_t i = 0; i < B; ++i) { const int64_t p = rng() % pool; for (int64_t e = 0; e < d; ++e) x[i * d + e] = to_t<T>(rows_pool[p * d + e]); }
  if (!self_mode) for (int64_t j = 0; j < M; ++j) { const int64_t p = rng() % pool; for (int64_t e = 0; e < d; ++e) y[j * d + e] = to_t<T>(rows_pool[p * d + e]); }
  std::vector<int64_t> lab(B), ref(M);
  const int64_t ncls = std::max<int64_t>(2, B / 4);
  for (int64_t i = 0; i < B; ++i) lab[i] = pair_labels ? i : int64_t(rng() % ncls);
  for (int64_t j = 0; j < M; ++j) ref[j] = pair_labels ? j : int64_t(rng() % (ncls + 2));
  if (self_mode) ref = lab;
  std::vector<double> S(B * M);
  for (int64_t i = 0; i < B; ++i) for (int64_t j = 0; j < M; ++j) {
    double s = 0; for (int64_t e = 0; e < d; ++e) s += tod(x[i * d + e]) * tod(y[j * d + e]); S[i * M + j] = s; }

  int64_t dp = d;
  std::vector<T> xp, yp;
  const T* xk = x; const T* yk = y;
  if (misalign || d % TileCfg<T>::kVW != 0) {
    xp = padded(x, B, d, TileCfg<T>::kVW, dp); xk = xp.data();
    if (self_mode) yk = xk; else { yp = padded(y, M, d, TileCfg<T>::kVW, dp); yk = yp.data(); }
  }
  char tag[200];
  std::snprintf(tag, sizeof tag, "%s B=%ld M=%ld d=%ld self=%d k=%ld/%ld sms=%d padded=%d",
                sizeof(T) == 4 ? "fp32" : (std::is_same_v<T, __half> ? "fp16" : "bf16"), long(B), long(M), long(d),
                int(self_mode), long(k_knn), long(k_hn), g_sms, int(dp != d || misalign));
  if (std::getenv("VERBOSE")) std::printf("%s\n", tag);

  // kNN: candidates per row sorted by (value desc, column asc)
  if (k_knn > 0) {
    std::vector<float> v(B * k_knn, std::nanf(""));
    std::vector<int64_t> idx(B * k_knn, -777);
    knn_pipeline<T>(xk, yk, B, M, dp, k_knn, self_mode, v.data(), idx.data());
    int bad = 0;
    for (int64_t i = 0; i < B; ++i) {
      std::vector<int64_t> c;
      for (int64_t j = 0; j < M; ++j) if (!(self_mode && i == j)) c.push_back(j);
      std::stable_sort(c.begin(), c.end(), [&](int64_t a, int64_t b) { return S[i * M + a] > S[i * M + b]; });
      for (int64_t j = 0; j < k_knn; ++j) bad += idx[i * k_knn + j] != c[j] || double(v[i * k_knn + j]) != S[i * M + c[j]];
    }
    ++checks;
    if (bad) { ++failures; std::printf("FAIL %s knn: %d wrong entries\n", tag, bad); }
  }
  // hardest negatives: all negative pairs sorted by (value desc, flat asc)
  std::vector<int64_t> negs;
  for (int64_t i = 0; i < B; ++i) for (int64_t j = 0; j < M; ++j)
    if (lab[i] != ref[j] && !(self_mode && i == j)) negs.push_back(i * M + j);
  std::stable_sort(negs.begin(), negs.end(), [&](int64_t a, int64_t b) { return S[a] > S[b]; });
  const int64_t kh = k_hn < 0 ? int64_t(negs.size()) : std::min<int64_t>(k_hn, int64_t(negs.size()));
  if (kh > 0) {
    std::vector<float> v; std::vector<int64_t> f;
    hn_pipeline<T>(xk, yk, lab.data(), ref.data(), B, M, dp, kh, self_mode, v, f);
    int bad = 0;
    for (int64_t e = 0; e < kh; ++e) bad += f[e] != negs[e] || double(v[e]) != S[negs[e]];
    ++checks;
    if (bad) { ++failures; std::printf("FAIL %s hardest negatives: %d wrong of %ld\n", tag, bad, long(kh)); }
  }
}

int main(int argc, char** argv) {
  const int which = argc > 1 ? std::atoi(argv[1]) : -1;
  struct C { int64_t B, M, d; bool self; int64_t k_knn, k_hn; bool pair; int sms; bool mis; };
  const std::vector<C> cases = {
      {1, 1, 1, false, 1, 1, true, 132, false},     {2, 3, 3, false, 3, -1, false, 1, false},
      {5, 5, 1, true, 4, -1, true, 132, false},     {37, 70, 3, false, 5, 100, false, 132, false},
      {37, 37, 129, true, 36, 200, false, 1, true}, {70, 130, 16, false, 33, 1000, false, 132, false},
      {9, 200, 8, false, 100, -1, false, 132, true}, {66, 66, 4, true, 65, 1, false, 1, false},
      {130, 70, 16, false, 20, 3000, true, 132, false}, {3, 140, 2, false, 140, 7, false, 132, false},
  };
  int n = 0;
  for (const C& c : cases) {
    g_sms = c.sms;
    const unsigned seed = unsigned(c.B * 1000 + c.M * 10 + c.d + int(c.self) * 7);
    if (which < 0 || which == 0) one_case<float>(c.B, c.M, c.d, c.self, c.k_knn, c.k_hn, c.pair, seed, c.mis);
    if (which < 0 || which == 1) one_case<__half>(c.B, c.M, c.d, c.self, c.k_knn, c.k_hn, c.pair, seed, c.mis);
    if (which < 0 || which == 2) one_case<__nv_bfloat16>(c.B, c.M, c.d, c.self, c.k_knn, c.k_hn, c.pair, seed, c.mis);
    ++n;
  }
  std::printf("%d cases, %d checks, %d failures\n", n, checks, failures);
  return failures != 0;
}
