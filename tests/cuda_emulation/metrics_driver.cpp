// Emulated run of the CUDA metrics pass (csrc/cuda/metrics_kernels.cuh + the kNN merge of selection_kernels.cuh)
// against a dense float64 model. The host pipeline below mirrors csrc/cuda/metrics.cu. Embeddings are multiples of
// 1/8 scaled by 2^-p (4^p >= d, so |S| <= 1; rows drawn from a small pool, so many repeat): every similarity is
// exact in fp32 in any summation order, values sit on bin edges and huge numbers of exact ties occur. Top-k lists
// (values and indices), the fine pair histograms and the per-class OPIS histograms must equal the model's exactly.
// Labels: classes of 1..6 samples (singletons), non-dense label values, in cross mode query labels missing from the
// references. Usage: metrics_driver [dtype 0|1|2].
#include "emu.h"
#include "driver_common.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <numeric>
#include <random>
#include <string>


#include "metrics_kernels.cuh"

using namespace flashdml;
using namespace flashdml::cuda;
using namespace flashdml::cuda::met;

struct PassOut {
  std::vector<int64_t> offsets, idx;
  std::vector<double> val;
  std::vector<int64_t> hist, cpos, cneg;
  int64_t n_cls = 0;
  long atomics = 0;  // global histogram atomics of the round-0 launch
};

// log2 of the block hash table's slots (metrics.cu's hash_log2): 12 = 4096 slots, what an A100 (sm_80) gets.
static int g_hash_log2 = 12;

// metrics.cu's pipeline: classes, gather x[rows] (zero-padded to kVW, aligned), rounds of partial + merge + scatter.
template <class T>
PassOut pipeline(const T* x, const T* y, int64_t B, int64_t M, int64_t d, const std::vector<int64_t>& lab,
                 const std::vector<int64_t>& ref, const std::vector<int64_t>& rows, const std::vector<int64_t>& keep,
                 bool self_mode, bool pair_hist, int64_t opis_bins, int log2cap = g_hash_log2) {
  const int64_t R = int64_t(rows.size());
  int shift = 0;
  while ((kSimBins >> shift) > opis_bins) ++shift;
  std::vector<int64_t> uniq(ref);
  std::sort(uniq.begin(), uniq.end());
  uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());
  auto cls_of = [&](int64_t l) {
    auto it = std::lower_bound(uniq.begin(), uniq.end(), l);
    return it != uniq.end() && *it == l ? int32_t(it - uniq.begin()) : int32_t(-1);
  };
  std::vector<int32_t> col_cls(M), row_cls(R);
  for (int64_t j = 0; j < M; ++j) col_cls[j] = cls_of(ref[j]);
  for (int64_t r = 0; r < R; ++r) row_cls[r] = cls_of(lab[rows[r]]);
  const bool opis = opis_bins > 0, fine = pair_hist || opis;
  PassOut o;
  const int32_t cls_first = opis ? row_cls[0] : 0;
  o.n_cls = opis ? row_cls[R - 1] - cls_first + 1 : 0;
  o.offsets.assign(R + 1, 0);
  for (int64_t r = 0; r < R; ++r) o.offsets[r + 1] = o.offsets[r] + keep[r];
  const int64_t total = o.offsets[R];
  std::vector<float> out_val(total, std::nanf(""));
  o.idx.assign(total, -7777777);
  std::vector<unsigned long long> hist(fine ? 2 * kSimBins : 0, 0ull), cls(o.n_cls * 2 * opis_bins, 0ull);
  const int64_t dp = (d + TileCfg<T>::kVW - 1) / TileCfg<T>::kVW * TileCfg<T>::kVW;
  std::vector<T> xq(R * dp + 8, to_t<T>(0.f)), yv(M * dp + 8, to_t<T>(0.f));
  for (int64_t r = 0; r < R; ++r) for (int64_t k = 0; k < d; ++k) xq[r * dp + k] = x[rows[r] * d + k];
  for (int64_t j = 0; j < M; ++j) for (int64_t k = 0; k < d; ++k) yv[j * dp + k] = y[j * d + k];
  const int64_t max_keep = *std::max_element(keep.begin(), keep.end());
  const int64_t rounds = (max_keep + kK - 1) / kK;
  const int64_t nrb = (R + kBM - 1) / kBM, ntiles = (M + kBN - 1) / kBN;
  const auto [nsplit, tps] = plan_splits(nrb, ntiles);
  std::vector<uint64_t> part(nsplit * R * kK, 12345u), bound(R, 777u);
  std::vector<float> vals(R * kK, std::nanf(""));
  std::vector<int64_t> idx(R * kK, -777);
  for (int64_t rd = 0; rd < std::max<int64_t>(rounds, 1); ++rd) {
    const int lg = rd == 0 && fine ? log2cap : 0;
    g_u64_atomics = 0;
    emu_launch_dyn({U(nrb), U(nsplit), 1}, kThreads, size_t(hash_table_bytes(lg)), [&] {
      metrics_pass_kernel<T>(xq.data(), R, yv.data(), M, dp, tps, rows.data(), keep.data(), row_cls.data(),
                             col_cls.data(), cls_first, self_mode, shift, opis_bins, int(rd),
                             rd > 0 ? bound.data() : nullptr, rounds > 0 ? part.data() : nullptr,
                             rd == 0 && fine ? hist.data() : nullptr, rd == 0 && opis ? cls.data() : nullptr, lg); });
    if (rd == 0) o.atomics = g_u64_atomics.load();
    if (rounds == 0) break;
    emu_launch({U((R + sel::kMergeRows - 1) / sel::kMergeRows), 1, 1}, sel::kMergeRows, [&] {
      sel::knn_merge_kernel(part.data(), R, int(nsplit), kK, 0, kK, vals.data(), idx.data(),
                            rd + 1 < rounds ? bound.data() : nullptr); });
    emu_launch({2, 1, 1}, 64, [&] {
      metrics_scatter_kernel(vals.data(), idx.data(), R, o.offsets.data(), keep.data(), int(rd), out_val.data(),
                             o.idx.data()); });
  }
  o.val.assign(out_val.begin(), out_val.end());
  o.hist.assign(hist.begin(), hist.end());
  for (int64_t c = 0; c < o.n_cls; ++c)
    for (int64_t b = 0; b < opis_bins; ++b) {
      o.cpos.push_back(int64_t(cls[(c * 2 + 0) * opis_bins + b]));
      o.cneg.push_back(int64_t(cls[(c * 2 + 1) * opis_bins + b]));
    }
  return o;
}

// The dense float64 model of the op (csrc/ops.cpp's contract).
PassOut model(const std::vector<double>& S, int64_t M, const std::vector<int64_t>& lab, const std::vector<int64_t>& ref,
              const std::vector<int64_t>& rows, const std::vector<int64_t>& keep, bool self_mode, bool pair_hist,
              int64_t opis_bins) {
  const int64_t R = int64_t(rows.size());
  PassOut o;
  o.offsets.assign(R + 1, 0);
  const bool opis = opis_bins > 0, fine = pair_hist || opis;
  int shift = 0;
  while ((kSimBins >> shift) > opis_bins) ++shift;
  std::map<int64_t, int64_t> cls;
  for (int64_t l : ref) cls.emplace(l, 0);
  int64_t n = 0;
  for (auto& kv : cls) kv.second = n++;
  const int64_t first = opis ? cls[lab[rows[0]]] : 0;
  o.n_cls = opis ? cls[lab[rows[R - 1]]] - first + 1 : 0;
  o.hist.assign(fine ? 2 * kSimBins : 0, 0);
  o.cpos.assign(o.n_cls * opis_bins, 0);
  o.cneg.assign(o.n_cls * opis_bins, 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = rows[r];
    const double* s = S.data() + i * M;
    std::vector<int64_t> c;
    for (int64_t j = 0; j < M; ++j) if (!(self_mode && j == i)) c.push_back(j);
    std::stable_sort(c.begin(), c.end(), [&](int64_t a, int64_t b) { return s[a] > s[b]; });
    for (int64_t t = 0; t < keep[r]; ++t) { o.idx.push_back(c[t]); o.val.push_back(s[c[t]]); }
    o.offsets[r + 1] = o.offsets[r] + keep[r];
    for (int64_t j = 0; j < M; ++j) {
      const int64_t b = std::isnan(s[j]) ? 0  // the kernel's similarity_bin: NaN -> bin 0
                        : std::clamp<int64_t>(int64_t(std::floor((s[j] + 1.0) * (kSimBins / 2))), 0, kSimBins - 1);
      const bool same = lab[i] == ref[j];
      if (fine && (!self_mode || j > i)) ++o.hist[(same ? 0 : kSimBins) + b];
      if (opis) {
        const int64_t rc = cls[lab[i]] - first;
        if (same && j > i) ++o.cpos[rc * opis_bins + (b >> shift)];
        if (!same) ++o.cneg[rc * opis_bins + (b >> shift)];
      }
    }
  }
  return o;
}


std::vector<int64_t> labels_with_singletons(int64_t n, std::mt19937& rng, int64_t offset) {
  std::vector<int64_t> l;
  for (int64_t c = 0; int64_t(l.size()) < n; ++c) {
    const int64_t s = 1 + rng() % 6;
    for (int64_t e = 0; e < s && int64_t(l.size()) < n; ++e) l.push_back(3 * c + offset);
  }
  std::shuffle(l.begin(), l.end(), rng);
  return l;
}

template <class T>
void one_case(int64_t B, int64_t M, int64_t d, bool self_mode, int rows_kind, int keep_kind, bool pair_hist,
              int64_t opis_bins, unsigned seed, int log2cap = g_hash_log2, int nan_rows = 0) {
  if (self_mode) M = B;
  std::mt19937 rng(seed);
  int p = 0;
  while ((int64_t(1) << (2 * p)) < d) ++p;
  const float scale = 1.f / float(1 << p);
  const int64_t pool = std::max<int64_t>(1, B / 3);
  std::vector<float> rows_pool(pool * d);
  for (auto& e : rows_pool) e = float(int(rng() % 17) - 8) / 8.f * scale;
  std::vector<T> xb(B * d), yb(M * d);
  for (int64_t i = 0; i < B; ++i) { const int64_t q = rng() % pool; for (int64_t e = 0; e < d; ++e) xb[i * d + e] = to_t<T>(rows_pool[q * d + e]); }
  for (int64_t j = 0; j < M; ++j) { const int64_t q = rng() % pool; for (int64_t e = 0; e < d; ++e) yb[j * d + e] = to_t<T>(rows_pool[q * d + e]); }
  for (int e = 0; e < nan_rows; ++e) xb[(rng() % B) * d + rng() % d] = to_t<T>(std::nanf(""));  // NaN rows (keep 0)
  const T* x = xb.data();
  const T* y = self_mode ? x : yb.data();
  std::vector<int64_t> lab = labels_with_singletons(B, rng, 1);
  std::vector<int64_t> ref = self_mode ? lab : labels_with_singletons(M, rng, 4);  // 3c+1 vs 3c+4: overlaps + gaps
  std::vector<double> S(B * M);
  for (int64_t i = 0; i < B; ++i) for (int64_t j = 0; j < M; ++j) {
    double s = 0; for (int64_t e = 0; e < d; ++e) s += tod(x[i * d + e]) * tod(y[j * d + e]); S[i * M + j] = s; }
  // rows: all, or a shuffled two-thirds subset; sorted by class (stable) when OPIS is on
  std::vector<int64_t> rows(B);
  std::iota(rows.begin(), rows.end(), 0);
  if (rows_kind == 1) { std::shuffle(rows.begin(), rows.end(), rng); rows.resize(std::max<int64_t>(1, 2 * B / 3)); }
  if (opis_bins > 0) std::stable_sort(rows.begin(), rows.end(), [&](int64_t a, int64_t b) { return lab[a] < lab[b]; });
  const int64_t R = int64_t(rows.size()), C = self_mode ? M - 1 : M;
  std::vector<int64_t> keep(R);
  for (int64_t r = 0; r < R; ++r) {
    keep[r] = keep_kind == 0 ? C : keep_kind == 1 ? 0 : keep_kind == 2 ? int64_t(rng() % (std::min<int64_t>(C, 40) + 1))
                                                                       : int64_t(rng() % (C + 1));
  }
  if (keep_kind >= 2) keep[0] = C;
  char tag[200];
  std::snprintf(tag, sizeof tag, "%s B=%ld M=%ld d=%ld self=%d R=%ld keep=%d hist=%d opis=%ld sms=%d table=2^%d nan=%d",
                sizeof(T) == 4 ? "fp32" : (std::is_same_v<T, __half> ? "fp16" : "bf16"), long(B), long(M), long(d),
                int(self_mode), long(R), keep_kind, int(pair_hist), long(opis_bins), g_sms, log2cap, nan_rows);
  if (std::getenv("VERBOSE")) std::printf("%s\n", tag);
  const PassOut got = pipeline<T>(x, y, B, M, d, lab, ref, rows, keep, self_mode, pair_hist, opis_bins, log2cap);
  const PassOut want = model(S, M, lab, ref, rows, keep, self_mode, pair_hist, opis_bins);
  auto check = [&](bool ok, const char* what) {
    ++checks;
    if (!ok) { ++failures; std::printf("FAIL %s: %s\n", tag, what); }
  };
  check(got.offsets == want.offsets, "offsets");
  check(got.idx == want.idx, "top-k indices");
  check(got.val == want.val, "top-k values");
  check(got.hist == want.hist, "pair histogram");
  check(got.n_cls == want.n_cls && got.cpos == want.cpos && got.cneg == want.cneg, "class histograms");
}

// The block hash tables' global atomics (metrics_kernels.cuh, BlockCounts): rows = normalised (class centre +
// noise · N(0, 1) per coordinate), one class per label. `noise` small: a well-trained, clustered embedding whose
// pairs of one block fall in a few thousand fine bins. The table (2^g_hash_log2 slots) and the per-pair path
// (log2cap 0, one global atomic per count: what the kernel did before the tables) must give the same histograms;
// the per-pair path makes exactly one atomic per count, and with want_few the table at most pairs / 8.
template <class T>
void atomics_case(const char* what, int64_t B, int64_t M, int64_t d, int classes, float noise, bool self_mode,
                  int64_t opis_bins, bool want_few, unsigned seed) {
  if (self_mode) M = B;
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> centre(classes * d);
  for (auto& e : centre) e = g(rng);
  auto rows_of = [&](int64_t n, std::vector<T>& v, std::vector<int64_t>& lab) {
    v.resize(n * d);
    lab.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      lab[i] = int64_t(rng() % classes);
      std::vector<float> r(d);
      double nn = 0;
      for (int64_t e = 0; e < d; ++e) { r[e] = centre[lab[i] * d + e] + noise * g(rng); nn += double(r[e]) * r[e]; }
      for (int64_t e = 0; e < d; ++e) v[i * d + e] = to_t<T>(float(r[e] / std::sqrt(nn)));
    }
  };
  std::vector<T> xb, yb;
  std::vector<int64_t> lab, ref;
  rows_of(B, xb, lab);
  if (self_mode) { yb = xb; ref = lab; } else rows_of(M, yb, ref);
  std::vector<int64_t> rows(B);
  std::iota(rows.begin(), rows.end(), 0);
  if (opis_bins > 0) std::stable_sort(rows.begin(), rows.end(), [&](int64_t a, int64_t b) { return lab[a] < lab[b]; });
  const std::vector<int64_t> keep(B, 0);
  const PassOut tab = pipeline<T>(xb.data(), yb.data(), B, M, d, lab, ref, rows, keep, self_mode, true, opis_bins);
  const PassOut old = pipeline<T>(xb.data(), yb.data(), B, M, d, lab, ref, rows, keep, self_mode, true, opis_bins, 0);
  int64_t pairs = 0, counts = 0;
  for (int64_t c : old.hist) pairs += c;
  counts = pairs;
  for (int64_t c : old.cpos) counts += c;
  for (int64_t c : old.cneg) counts += c;
  char tag[160];
  std::snprintf(tag, sizeof tag, "%s %s B=%ld M=%ld d=%ld self=%d opis=%ld", what,
                sizeof(T) == 4 ? "fp32" : (std::is_same_v<T, __half> ? "fp16" : "bf16"), long(B), long(M), long(d),
                int(self_mode), long(opis_bins));
  std::printf("atomics %s: pairs %ld counts %ld table %ld per-pair %ld\n", tag, long(pairs), long(counts),
              tab.atomics, old.atomics);
  auto check = [&](bool ok, const char* w) {
    ++checks;
    if (!ok) { ++failures; std::printf("FAIL %s: %s\n", tag, w); }
  };
  check(pairs == (self_mode ? B * (B - 1) / 2 : B * M), "every pair counted once");
  check(tab.hist == old.hist, "pair histogram: table == per-pair atomics");
  check(tab.n_cls == old.n_cls && tab.cpos == old.cpos && tab.cneg == old.cneg, "class histograms: table == per-pair");
  check(old.atomics == counts, "per-pair path: one global atomic per count");
  check(tab.atomics <= old.atomics, "the table never adds atomics");
  if (want_few) check(8 * tab.atomics <= pairs, "table: global atomics <= pairs / 8");
}

// The block tables: exact histograms (against the float64 model) with every capacity (0: the per-pair path; 2 and
// 16 slots: the tables overflow all the time, most counts take the global fallback; the default 4096 for the NaN
// cases, main's cases cover the rest), NaN rows, OPIS, ragged sizes, 1 and 132 SMs; then the global atomics of
// clustered and of spread-out (random directions) embeddings.
template <class T>
void table_cases() {
  struct Case { int64_t B, M, d; bool self; int rows, keep; int64_t opis; int sms; int nan; };
  const std::vector<Case> cases = {
      {130, 130, 16, true, 0, 3, 4096, 132, 0}, {37, 70, 129, false, 1, 2, 0, 132, 0},
      {70, 70, 129, true, 1, 2, 65536, 1, 0},   {66, 66, 8, true, 0, 1, 256, 1, 5},
      {70, 45, 5, false, 1, 1, 0, 132, 4},
  };
  for (int lg : {0, 1, 4, g_hash_log2})
    for (const Case& c : cases) {
      if (lg == g_hash_log2 && c.nan == 0) continue;  // the default table: main's cases
      g_sms = c.sms;
      one_case<T>(c.B, c.M, c.d, c.self, c.rows, c.keep, true, c.opis, unsigned(c.B * 31 + c.M + lg), lg, c.nan);
    }
  g_sms = 1;  // one column split: a block streams every tile of its rows, as on a big batch
  atomics_case<T>("clustered", 256, 1024, 32, 4, 0.005f, false, 0, true, 11);
  atomics_case<T>("clustered", 512, 512, 32, 4, 0.005f, true, 256, true, 12);
  atomics_case<T>("random", 256, 1024, 32, 256, 10.f, false, 0, false, 13);
  g_sms = 132;
}

// Usage: metrics_driver [dtype 0|1|2] [table]: with "table", the block hash table cases (table_cases) instead.
int main(int argc, char** argv) {
  const int which = argc > 1 ? std::atoi(argv[1]) : -1;
  if (argc > 2 && std::string(argv[2]) == "table") {
    if (which < 0 || which == 0) table_cases<float>();
    if (which < 0 || which == 1) table_cases<__half>();
    if (which < 0 || which == 2) table_cases<__nv_bfloat16>();
    std::printf("table cases: %d checks, %d failures\n", checks, failures);
    return failures != 0;
  }
  // rows_kind: 0 all, 1 shuffled subset; keep_kind: 0 all candidates, 1 none, 2 mixed <= 40, 3 mixed <= all
  struct Case { int64_t B, M, d; bool self; int rows, keep; bool hist; int64_t opis; int sms; };
  const std::vector<Case> cases = {
      {5, 5, 1, true, 0, 0, true, 256, 132},       {37, 37, 3, true, 0, 2, true, 1024, 1},
      {37, 70, 129, false, 1, 2, true, 0, 132},    {130, 130, 16, true, 0, 3, true, 4096, 132},
      {70, 37, 3, false, 0, 1, true, 0, 1},        {66, 66, 4, true, 1, 2, false, 0, 132},
      {3, 140, 2, false, 0, 0, false, 0, 132},     {70, 70, 129, true, 1, 3, true, 65536, 1},
  };
  for (const Case& c : cases) {
    g_sms = c.sms;
    const unsigned seed = unsigned(c.B * 1000 + c.M * 10 + c.d + int(c.self) * 7);
    if (which < 0 || which == 0) one_case<float>(c.B, c.M, c.d, c.self, c.rows, c.keep, c.hist, c.opis, seed);
    if (which < 0 || which == 1) one_case<__half>(c.B, c.M, c.d, c.self, c.rows, c.keep, c.hist, c.opis, seed);
    if (which < 0 || which == 2) one_case<__nv_bfloat16>(c.B, c.M, c.d, c.self, c.rows, c.keep, c.hist, c.opis, seed);
  }
  std::printf("%zu cases, %d checks, %d failures\n", cases.size(), checks, failures);
  return failures != 0;
}
