// Emulated run of the contextual-loss CUDA list kernel (csrc/cuda/contextual_kernels.cuh) against a dense float64
// reference. The host pipeline below mirrors neighbour_lists() in csrc/cuda/contextual.cu: the list pass over every
// row with a fixed capacity, then the rows whose count exceeds it gathered (a fresh padded copy, the batch index
// map `rows`) and rerun with a capacity of their largest count, then the lists merged in row order. The thresholds
// t_i / h_i are the k-th / (k/2)-th largest −D of the reference's S (as the CUDA op takes them from the kNN kernel).
// Embeddings are multiples of 1/8 (rows drawn from a small pool, so many rows repeat and −D ties everywhere), so
// every similarity is exact in fp32 in any summation order and the fp32 tests of docs/spec.md §2.5 step 3 must give exactly the
// reference's N(i), P(i) flags and clamp flags, in ascending column order. Usage: contextual_driver [dtype 0|1|2].
#include "emu.h"
#include "driver_common.h"
#include "contextual_kernels.cuh"

#include <functional>
#include <random>

using namespace flashdml;
using namespace flashdml::cuda;
using namespace flashdml::cuda::ctxk;

struct Lists {
  std::vector<int64_t> ptr;
  std::vector<int32_t> col;
  std::vector<uint8_t> flag;
};

// contextual.cu's neighbour_lists on the emulated kernel.
template <class T>
Lists list_pipeline(const std::vector<T>& x, int64_t B, int64_t dp, const std::vector<float>& thr, float eps,
                    int64_t cap, int64_t* n_over) {
  auto run = [&](const T* xa, int64_t na, const int64_t* rows, int64_t cp, std::vector<int32_t>& col,
                 std::vector<uint8_t>& flag, std::vector<int32_t>& cnt) {
    col.assign(na * cp, -7777777);
    flag.assign(na * cp, 0xFC);
    cnt.assign(na, -7777777);
    emu_launch({U((na + kBM - 1) / kBM), 1, 1}, kThreads, [&] {
      ctx_list_kernel<T>(xa, na, rows, x.data(), B, dp, thr.data(), eps, cp, col.data(), flag.data(), cnt.data()); });
  };
  std::vector<int32_t> col, cnt, col2, cnt2;
  std::vector<uint8_t> flag, flag2;
  run(x.data(), B, nullptr, cap, col, flag, cnt);
  std::vector<int64_t> over;
  for (int64_t i = 0; i < B; ++i) if (cnt[i] > cap) over.push_back(i);
  *n_over = int64_t(over.size());
  int64_t big = 0;
  if (!over.empty()) {
    std::vector<T> xo(over.size() * dp);
    for (size_t o = 0; o < over.size(); ++o) std::copy_n(x.data() + over[o] * dp, dp, xo.data() + o * dp);
    for (int64_t i : over) big = std::max<int64_t>(big, cnt[i]);
    big = (big + 15) / 16 * 16;
    run(xo.data(), int64_t(over.size()), over.data(), big, col2, flag2, cnt2);
  }
  Lists out;
  out.ptr.assign(B + 1, 0);
  size_t o = 0;
  for (int64_t i = 0; i < B; ++i) {
    const bool ov = o < over.size() && over[o] == i;
    const int64_t n = ov ? cnt2[o] : cnt[i];
    if (ov && cnt2[o] != cnt[i]) { std::printf("recount differs at row %ld\n", long(i)); std::abort(); }
    for (int64_t s = 0; s < n; ++s) {
      out.col.push_back(ov ? col2[o * big + s] : col[i * cap + s]);
      out.flag.push_back(ov ? flag2[o * big + s] : flag[i * cap + s]);
    }
    out.ptr[i + 1] = out.ptr[i] + n;
    o += ov;
  }
  return out;
}

template <class T>
void one_case(int64_t B, int64_t d, int64_t k, float eps, int64_t cap, unsigned seed) {
  std::mt19937 gen(seed);
  const int64_t pool = std::max<int64_t>(2, B / 3);
  std::uniform_int_distribution<int> val(-4, 4), pick(0, int(pool - 1));
  std::vector<float> base(pool * d);
  for (float& v : base) v = float(val(gen)) / 8.f;
  std::vector<T> xr(B * d);
  std::vector<double> xd(B * d);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t p = pick(gen);
    for (int64_t q = 0; q < d; ++q) {
      xr[i * d + q] = to_t<T>(base[p * d + q]);
      xd[i * d + q] = base[p * d + q];
    }
  }
  int64_t dp;
  const std::vector<T> x = padded(xr.data(), B, d, TileCfg<T>::kVW, dp);
  // reference: S in float64 (exact, and exact in fp32), −D and the thresholds, then docs/spec.md §2.5 step 3 in fp32
  std::vector<float> nd(B * B), thr(2 * B), row(B);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t j = 0; j < B; ++j) {
      double s = 0.0;
      for (int64_t q = 0; q < d; ++q) s += xd[i * d + q] * xd[j * d + q];
      nd[i * B + j] = ctx_neg_distance(float(s));
      row[j] = nd[i * B + j];
    }
    std::sort(row.begin(), row.end(), std::greater<float>());
    thr[2 * i] = row[k - 1];
    thr[2 * i + 1] = row[k / 2 - 1];
  }
  int64_t n_over = 0;
  const Lists got = list_pipeline(x, B, dp, thr, eps, cap, &n_over);
  Lists want;
  want.ptr.assign(B + 1, 0);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t j = 0; j < B; ++j) {
      const float u = ctx_band_value(nd[i * B + j], eps);
      if (!(u >= thr[2 * i])) continue;
      want.col.push_back(int32_t(j));
      want.flag.push_back(uint8_t((u >= thr[2 * i + 1] ? kCtxInP : 0) | (ctx_clamped(nd[i * B + j]) ? kCtxClamped : 0)));
    }
    want.ptr[i + 1] = int64_t(want.col.size());
  }
  char tag[200];
  std::snprintf(tag, sizeof tag, "%s B=%ld d=%ld k=%ld eps=%g cap=%ld (nnz %ld, overflow rows %ld)",
                sizeof(T) == 4 ? "fp32" : (std::is_same_v<T, __half> ? "fp16" : "bf16"), long(B), long(d), long(k),
                double(eps), long(cap), long(want.col.size()), long(n_over));
  if (std::getenv("VERBOSE")) std::printf("%s\n", tag);
  ++checks;
  if (got.ptr != want.ptr || got.col != want.col || got.flag != want.flag) {
    ++failures;
    std::printf("FAIL %s: lists differ (nnz got %ld)\n", tag, long(got.col.size()));
  }
}

int main(int argc, char** argv) {
  const int which = argc > 1 ? std::atoi(argv[1]) : -1;
  struct S { int64_t B, d, k; float eps; int64_t cap; };
  const std::vector<S> cases = {
      {2, 1, 2, 0.f, 16},      {5, 3, 2, 0.f, 16},      {5, 3, 4, 0.05f, 2},     {37, 16, 4, 0.05f, 16},
      {37, 129, 2, 0.f, 4},    {64, 8, 8, 0.5f, 16},    {65, 3, 4, 0.f, 8},      {70, 16, 4, 0.05f, 64},
      {130, 33, 9, 0.f, 16},   {130, 8, 2, 1.f, 32},    {200, 40, 16, 0.05f, 16}, {150, 72, 5, 0.25f, 4},
  };
  for (const S& s : cases) {
    const unsigned seed = unsigned(s.B * 1000 + s.d * 10 + s.k);
    if (which < 0 || which == 0) one_case<float>(s.B, s.d, s.k, s.eps, s.cap, seed);
    if (which < 0 || which == 1) one_case<__half>(s.B, s.d, s.k, s.eps, s.cap, seed);
    if (which < 0 || which == 2) one_case<__nv_bfloat16>(s.B, s.d, s.k, s.eps, s.cap, seed);
  }
  std::printf("%zu cases, %d checks, %d failures\n", cases.size(), checks, failures);
  return failures != 0;
}
