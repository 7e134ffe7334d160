// Fused similarity + top-k selection on the CPU: knn (docs/spec.md §1.2) and hardest negatives (docs/spec.md §1.3, the
// selection of Cross-Example Negative Mining). S = x y^T is streamed in 128 x 512 tiles (cpu_tiles.h); each
// tile is folded into the selection while it is in L2 and then dropped, so nothing B x M is ever stored.
//
// knn, two scans with the same results:
//  * tiled: one TopKBuffer per row of the row block (flashdml/topk.h): a row of a tile is skipped outright when
//    its (vectorised) maximum is below the row's current k-th value, otherwise the entries at or above it are
//    offered. Memory O((B + M) d + B k).
//  * screened (knn_screen.h, large B and M, AVX2): an int16 GEMM bounds every S entry; only the entries that can
//    still enter a row's top k are kept, and only those that can still be selected at the end are computed
//    exactly (sequential fp32 FMA). About half the tiled scan's time. Taken automatically only where a probe has
//    shown that at::mm's tiles equal the sequential FMA bit for bit, so the two scans return identical values
//    and indices. Memory O((B + M) d + B k) (int16 copies of x and y).
//
// hardest negatives, two strategies with the same result (the k best negatives in the order "value descending,
// flat index i*M + j ascending", a total order, so the set does not depend on the tiling or thread count):
//  * one pass (small k): one TopKBuffer of capacity 2k per task over all its rows; task lists are merged.
//    Memory O(T k) for T tasks (threads); used while T k <= kOnePassEntries.
//  * radix select (any k): pass 1 histograms the high 16 bits of the order-preserving key of every negative
//    value (65536 int64 bins per task) and finds the bin holding the k-th value. Pass 2 collects every negative
//    above that bin (fewer than k) and, when the bin is small, the bin itself, then selects in memory. When the
//    bin is large (heavy ties or a very narrow value range), pass 2 histograms the low 16 bits inside the bin
//    instead, which gives the k-th value exactly, and pass 3 collects the entries above it plus the entries
//    equal to it with the lowest flat indices (each task keeps at most its quota of them). Memory O(k) plus the
//    histograms, whatever k is.
// Every pass recomputes the same tiles with the same single-threaded GEMM, so S values agree bitwise between
// passes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "cpu_tiles.h"
#include "flashdml/op_checks.h"
#include "knn_screen.h"
#include "flashdml/poison.h"
#include "flashdml/topk.h"
#include "label_index.h"

namespace flashdml {

// Test hook (ops.cpp: _set_selection_strategy): 0 = automatic, 1 = always one pass, 2 = always radix select.
std::atomic<int64_t>& selection_strategy() {
  static std::atomic<int64_t> s{0};
  return s;
}

// Test hooks (ops.cpp: _set_knn_strategy, _knn_last_path): how knn_fwd scans (0 = automatic, 1 = always the
// tiled scan, 2 = the screened scan whenever it can run, without the probe), and which scan the last call used
// (1 tiled, 2 screened).
std::atomic<int64_t>& knn_strategy() {
  static std::atomic<int64_t> s{0};
  return s;
}
std::atomic<int64_t>& knn_last_path() {
  static std::atomic<int64_t> s{0};
  return s;
}

namespace cpu {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int64_t kBins = 65536;
constexpr int64_t kOnePassEntries = int64_t(1) << 18;  // T * k below this: the one-pass strategy
constexpr int64_t kSmallBin = int64_t(1) << 20;       // a boundary bin this small is collected in pass 2
constexpr int64_t kScreenMinRows = 512;   // knn: fewer query rows do not pay for the screen of y
constexpr int64_t kScreenMinCols = 2048;  // knn: nor do fewer columns
constexpr double kScreenMaxExact = 1.0 / 32;  // knn: exact evaluations per entry beyond which the tiles are faster
// knn: a row admits about k (1 + ln(M / k)) candidates at ~50 ns each; measured break-even with the tiled scan
// near M = 100 k (d = 128: M = 10^4, k = 100: 0.97x; M = 3 10^4, k = 300: 0.96x; M = 10^5, k = 1000: 1.02x).
constexpr int64_t kScreenColsPerK = 128;

// Rows of x and y as the kernels use them (fp32, normalised when asked); y aliases x when the caller passed the
// same tensor twice (self mode).
struct Rows {
  at::Tensor x, y;
};

// Call check::rows first.
Rows prepare_rows(const at::Tensor& x_in, const at::Tensor& y_in, bool normalize) {
  at::Tensor inv;
  Rows r;
  r.x = normalized_rows(x_in, normalize, &inv);
  r.y = y_in.is_same(x_in) ? r.x : normalized_rows(y_in, normalize, &inv);
  return r;
}

// ------------------------------------------------------------------------------------------------- knn
// Two paths with the same results (knn_screen.h): the tiled scan (S tiles through at::mm, each row of a tile
// offered to the row's TopKBuffer) and the screened scan (the first columns through the same tiles, the rest
// bounded by an int16 GEMM and computed exactly only where they can enter the top k).

// How the tiled path computes a tile entry: at::mm on the tile, as for_each_row_block runs it. Whether that equals
// the sequential FMA dot product (the screened path's values) bit for bit is probed once per tile shape and
// context on random rows laid out like the real ones (same address alignment); the answer is cached.
bool tile_gemm_is_sequential_fma(int64_t rn, int64_t cn, int64_t d, const float* x_like, const float* y_like) {
  const bool parallel = at::in_parallel_region();
  const int64_t xa = int64_t(reinterpret_cast<uintptr_t>(x_like) % 64), ya = int64_t(reinterpret_cast<uintptr_t>(y_like) % 64);
  auto& ctx = at::globalContext();  // the fp32 matmul precision setting can route at::mm to oneDNN (bf16, tf32)
  const int prec = int(ctx.float32Precision(at::Float32Backend::GENERIC, at::Float32Op::ALL)) * 16 +
                   int(ctx.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL));
  const auto key = std::make_tuple(rn, cn, d, xa, ya, parallel, prec);
  static std::mutex mu;
  static std::map<decltype(key), bool> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto fopts = at::TensorOptions().dtype(at::kFloat);
  auto rows_like = [&](int64_t n, int64_t align, uint64_t seed) {
    at::Tensor buf = at::empty({n * d + 16}, fopts);
    const int64_t have = int64_t(reinterpret_cast<uintptr_t>(buf.data_ptr<float>()) % 64);
    const int64_t off = (((align - have) % 64 + 64) % 64) / 4;
    at::Tensor t = buf.narrow(0, off, n * d).view({n, d});
    float* p = t.data_ptr<float>();
    uint64_t st = seed;
    for (int64_t i = 0; i < n * d; ++i) {
      st = st * 6364136223846793005ull + 1442695040888963407ull;
      p[i] = float(int64_t(st >> 40) - (int64_t(1) << 23)) * 0x1p-23f;  // uniform in [-1, 1), 24 bits
    }
    return t;
  };
  const at::Tensor px = rows_like(rn, xa, 1), py = rows_like(cn, ya, 2);
  at::Tensor scratch = at::empty({kTileRows, kTileCols}, fopts);
  gemm_tile(scratch, px, 0, rn, py, 0, cn);
  const float* S = scratch.data_ptr<float>();
  const float* a = px.data_ptr<float>();
  const float* b = py.data_ptr<float>();
  bool same = true;
  for (int64_t r = 0; r < rn && same; ++r)
    for (int64_t c = 0; c < cn && same; ++c) {
      const float v = knn_screen::seq_fma_dot(a + r * d, b + c * d, d);
      same = std::memcmp(&v, S + r * kTileCols + c, sizeof(float)) == 0;
    }
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = same;
  return same;
}

// The tiled scan over columns [c_begin, c_end) of rows [r0, r1) (r0 a multiple of kTileRows, c_begin of
// kTileCols): exactly the tiles, GEMMs and offers of the tiled path.
void offer_tiles(const at::Tensor& x, const at::Tensor& y, at::Tensor& scratch, int64_t r0, int64_t r1,
                 int64_t c_begin, int64_t c_end, bool exclude_diagonal, std::vector<TopKBuffer>& bufs) {
  const int64_t M = y.size(0);
  for (int64_t rr0 = r0; rr0 < r1; rr0 += kTileRows) {
    const int64_t rn = std::min(kTileRows, r1 - rr0);
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kTileCols) {
      const int64_t cn = std::min(kTileCols, M - c0);
      gemm_tile(scratch, x, rr0, rn, y, c0, cn);
      float* S = scratch.data_ptr<float>();
      for (int64_t r = 0; r < rn; ++r) {
        const int64_t i = rr0 + r;
        float* s = S + r * kTileCols;
        if (exclude_diagonal && i >= c0 && i < c0 + cn) s[i - c0] = kNaN;
        offer_tile_row(bufs[size_t(rr0 - r0 + r)], s, cn, c0);
      }
    }
  }
}

void write_rows(std::vector<TopKBuffer>& bufs, int64_t r0, int64_t rn, int64_t k, float* vp, int64_t* ip) {
  for (int64_t r = 0; r < rn; ++r) {
    const auto& e = bufs[size_t(r)].finish();
    TORCH_CHECK(int64_t(e.size()) == k, "knn_fwd: row ", r0 + r, " has fewer than k finite candidates (NaN input?)");
    for (int64_t j = 0; j < k; ++j) {
      vp[(r0 + r) * k + j] = e[j].value;
      ip[(r0 + r) * k + j] = e[j].index;
    }
  }
}

void knn_tiled(const at::Tensor& x, const at::Tensor& y, int64_t k, bool exclude_diagonal, int64_t capacity,
               float* vp, int64_t* ip) {
  const int64_t B = x.size(0), M = y.size(0);
  auto fopts = x.options().dtype(at::kFloat);
  const TaskPlan plan = plan_row_tasks(B);
  for_each_row_block(plan, B, [&](int64_t, int64_t r0, int64_t r1) {
    at::Tensor scratch = at::empty({kTileRows, kTileCols}, fopts);
    std::vector<TopKBuffer> bufs(size_t(r1 - r0));
    for (auto& b : bufs) b.reset(k, capacity);
    offer_tiles(x, y, scratch, r0, r1, 0, M, exclude_diagonal, bufs);
    write_rows(bufs, r0, r1 - r0, k, vp, ip);
  });
}

#if FLASHDML_KNN_SCREEN
// Exact values of the pending candidates of rows (each entry: row, col), offered to their rows' exact buffers.
void evaluate_exactly(const float* xp, const float* yp, int64_t d, const std::vector<knn_screen::Hit>& todo,
                      std::vector<knn_screen::RowCandidates>& rows, int64_t r0) {
  float vals[8];
  const size_t row_bytes = size_t(d) * sizeof(float);
  for (size_t h = 0; h < todo.size(); h += 8) {
    const int n = int(std::min<size_t>(8, todo.size() - h));
    // The next chunk's rows of y are scattered over all of y: prefetch them while this chunk computes.
    for (size_t u = h + 8; u < std::min(todo.size(), h + 16); ++u) {
      const char* row = reinterpret_cast<const char*>(yp + int64_t(todo[u].col) * d);
      for (size_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(row + o);
    }
    knn_screen::exact_values(xp, yp, d, todo.data() + h, n, vals);
    for (int u = 0; u < n; ++u) rows[size_t(todo[h + size_t(u)].row - r0)].exact.offer(vals[u], todo[h + size_t(u)].col);
  }
}

// The screened scan (knn_screen.h). Tasks own the same row ranges as the tiled path (plan_row_tasks(B)), in
// super-blocks of kSuperRows rows; each super-block streams all of y's int16 rows, one kCV-group panel at a time.
// max_exact: when a super-block would evaluate more than this many entries exactly (heavy ties), it is done by
// the tiled scan instead (same results; negative: never).
void knn_screened(const at::Tensor& x, const at::Tensor& y, int64_t k, bool exclude_diagonal, int64_t capacity,
                  const knn_screen::Screen& sc, const TaskPlan& plan, double max_exact_per_entry, float* vp,
                  int64_t* ip) {
  using namespace knn_screen;
  const int64_t B = x.size(0), M = y.size(0), d = x.size(1), dp = sc.dp, G = sc.G;
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const int16_t* qx = sc.qx.data_ptr<int16_t>();
  const int16_t* qy = sc.qy.data_ptr<int16_t>();
  auto fopts = x.options().dtype(at::kFloat);
  at::parallel_for(0, plan.num_tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<RowCandidates> rows(static_cast<size_t>(kSuperRows));
    std::vector<int32_t> tm1(static_cast<size_t>(kSuperRows + kR));
    std::vector<Hit> todo;
    alignas(32) int32_t acc[kR][kCV][kGroup];
    uint64_t bits[2];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ra = plan.first_block(t) * plan.rows_per_block;
      const int64_t rb = std::min(B, plan.first_block(t + 1) * plan.rows_per_block);
      for (int64_t r0 = ra; r0 < rb; r0 += kSuperRows) {
        const int64_t r1 = std::min(rb, r0 + kSuperRows), rn = r1 - r0;
        const double max_exact = max_exact_per_entry * double(rn) * double(M);
        int64_t n_exact = 0;
        for (int64_t r = 0; r < rn; ++r) rows[size_t(r)].reset(k, sc.du[size_t(r0 + r)], capacity);
        for (int64_t r = 0; r < kSuperRows + kR; ++r) tm1[size_t(r)] = r < rn ? kAllPass : kNonePass;
        // A row whose pending list is full: prune it; when that frees too little (ties within the bound), its
        // pending entries are evaluated exactly.
        auto make_room = [&](int64_t r) {
          RowCandidates& rc = rows[size_t(r)];
          rc.prune();
          tm1[size_t(r)] = rc.tm1();
          if (rc.crowded()) {
            todo.clear();
            for (const Pending& e : rc.pend) todo.push_back({int32_t(r0 + r), e.col});
            rc.pend.clear();
            evaluate_exactly(xp, yp, d, todo, rows, r0);
            n_exact += int64_t(todo.size());
          }
        };
        bool fallback = false;
        for (int64_t g = 0; g < G && !fallback; g += kCV) {
          const int16_t* qy0 = qy + g * dp * kGroup;
          for (int64_t r = 0; r < rn; r += kR) {
            if (!micro_tile(qx + (r0 + r) * dp, dp, qy0, qy0 + dp * kGroup, tm1.data() + r, acc, bits)) continue;
            for (int w = 0; w < 2; ++w)
              for (uint64_t m = bits[w]; m; m &= m - 1) {
                const int f = w * 64 + __builtin_ctzll(m);  // = a * 16 + c * 8 + l
                const int a = f >> 4;
                const int64_t i = r0 + r + a, j = g * kGroup + (f & 15);
                if (j >= M || (exclude_diagonal && j == i)) continue;
                RowCandidates& rc = rows[size_t(r + a)];
                if (rc.add((&acc[0][0][0])[f], int32_t(j))) tm1[size_t(r + a)] = rc.tm1();
                if (rc.full()) make_room(r + a);
              }
          }
          if (max_exact >= 0 && double(n_exact) > max_exact) fallback = true;
        }
        if (fallback) {  // heavy ties: the tiled scan for this super-block
          at::Tensor scratch_tile = at::empty({kTileRows, kTileCols}, fopts);
          std::vector<TopKBuffer> bufs(static_cast<size_t>(rn));
          for (auto& b : bufs) b.reset(k, capacity);
          offer_tiles(x, y, scratch_tile, r0, r1, 0, M, exclude_diagonal, bufs);
          write_rows(bufs, r0, rn, k, vp, ip);
          continue;
        }
        // The rest of the pending entries that can still be selected, exactly.
        todo.clear();
        for (int64_t r = 0; r < rn; ++r) {
          RowCandidates& rc = rows[size_t(r)];
          rc.prune();
          for (const Pending& e : rc.pend) todo.push_back({int32_t(r0 + r), e.col});
          rc.pend.clear();
        }
        evaluate_exactly(xp, yp, d, todo, rows, r0);
        for (int64_t r = 0; r < rn; ++r) {
          const auto& e = rows[size_t(r)].exact.finish();
          TORCH_CHECK(int64_t(e.size()) == k, "knn_fwd: row ", r0 + r, " has fewer than k candidates");
          for (int64_t j = 0; j < k; ++j) {
            vp[(r0 + r) * k + j] = e[size_t(j)].value;
            ip[(r0 + r) * k + j] = e[size_t(j)].index;
          }
        }
      }
    }
  });
}
#endif

std::tuple<at::Tensor, at::Tensor> knn_fwd_cpu(const at::Tensor& x_in, const at::Tensor& y_in, int64_t k,
                                               bool exclude_diagonal, bool normalize) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* op = "knn_fwd";
  check::knn_fwd_inputs(op, x_in, y_in, k, exclude_diagonal);  // flashdml/op_checks.h
  const Rows rows = prepare_rows(x_in, y_in, normalize);
  const at::Tensor &x = rows.x, &y = rows.y;
  const int64_t B = x.size(0), M = y.size(0), d = x.size(1);
  auto fopts = x.options().dtype(at::kFloat);
  at::Tensor values = new_output({B, k}, fopts);
  at::Tensor indices = new_output({B, k}, x.options().dtype(at::kLong));
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  const int64_t capacity = k + std::max<int64_t>(k, 64);

#if FLASHDML_KNN_SCREEN
  // Screened path: automatic when there is enough to screen (B and M large, k small against M) and the probe
  // confirms that the tiles at::mm computes equal the sequential FMA bit for bit.
  const int64_t strategy = knn_strategy().load();
  const bool wanted = strategy == 2 || (strategy == 0 && B >= kScreenMinRows && M >= kScreenMinCols &&
                                        k * kScreenColsPerK <= M && d >= 2);
  if (wanted && B > 0 && B < (int64_t(1) << 31) && M < (int64_t(1) << 31)) {  // rows, columns as int32
    const TaskPlan plan = plan_row_tasks(B);
    bool exact_tiles = strategy == 2;
    if (!exact_tiles) {
      // Probe in the context the tiled path runs its tiles in (task 0 of the same parallel_for).
      std::vector<std::pair<int64_t, int64_t>> shapes;
      for (int64_t rn : {std::min(B, kTileRows), B % kTileRows})
        for (int64_t cn : {std::min(M, kTileCols), M % kTileCols})
          if (rn > 0 && cn > 0) shapes.emplace_back(rn, cn);
      exact_tiles = true;
      at::parallel_for(0, plan.num_tasks, 1, [&](int64_t t0, int64_t) {
        if (t0 != 0) return;
        for (const auto& s : shapes)
          exact_tiles = exact_tiles && tile_gemm_is_sequential_fma(s.first, s.second, d, x.data_ptr<float>(),
                                                                   y.data_ptr<float>());
      });
    }
    if (exact_tiles) {
      const knn_screen::Screen sc = knn_screen::build_screen(x, y);
      if (sc.ok) {
        knn_last_path().store(2);
        knn_screened(x, y, k, exclude_diagonal, capacity, sc, plan, strategy == 2 ? -1.0 : kScreenMaxExact, vp, ip);
        return {values, indices};
      }
    }
  }
#endif
  knn_last_path().store(1);
  knn_tiled(x, y, k, exclude_diagonal, capacity, vp, ip);
  return {values, indices};
}

// ----------------------------------------------------------------------------------- hardest negatives
// Runs fn(task, i, c0, cn, s) for every row i of every S tile, with the non-negative pairs of the row set to
// NaN (s has cn valid entries, columns c0..c0+cn).
template <typename Fn>
void for_each_negative_row(const at::Tensor& x, const at::Tensor& y, const LabelIndex& lab, bool self_mode,
                           const TaskPlan& plan, const Fn& fn) {
  const int64_t B = x.size(0), M = y.size(0);
  const int32_t* col_class = lab.col_class.data();
  auto fopts = x.options().dtype(at::kFloat);
  for_each_row_block(plan, B, [&](int64_t task, int64_t r0, int64_t r1) {
    at::Tensor scratch = at::empty({kTileRows, kTileCols}, fopts);
    const int64_t rn = r1 - r0;
    for (int64_t c0 = 0; c0 < M; c0 += kTileCols) {
      const int64_t cn = std::min(kTileCols, M - c0);
      gemm_tile(scratch, x, r0, rn, y, c0, cn);
      float* S = scratch.data_ptr<float>();
      for (int64_t r = 0; r < rn; ++r) {
        const int64_t i = r0 + r;
        float* s = S + r * kTileCols;
        const int32_t rc = lab.row_class[i];
        const int32_t* cc = col_class + c0;
#pragma omp simd
        for (int64_t c = 0; c < cn; ++c) s[c] = cc[c] != rc ? s[c] : kNaN;
        if (self_mode && i >= c0 && i < c0 + cn) s[i - c0] = kNaN;
        fn(task, i, c0, cn, s);
      }
    }
  });
}

// Sorted best first; writes the outputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> write_selection(std::vector<TopKEntry>& sel, int64_t k, int64_t M,
                                                               const at::TensorOptions& opts) {
  TORCH_CHECK(int64_t(sel.size()) >= k, "hardest_negatives_fwd: found ", sel.size(), " of ", k,
              " negatives (NaN input?)");
  if (int64_t(sel.size()) > k) std::nth_element(sel.begin(), sel.begin() + (k - 1), sel.end(), TopKCmp());
  sel.resize(size_t(k));
  std::sort(sel.begin(), sel.end(), TopKCmp());
  at::Tensor values = new_output({k}, opts.dtype(at::kFloat));
  at::Tensor rows = new_output({k}, opts.dtype(at::kLong));
  at::Tensor cols = new_output({k}, opts.dtype(at::kLong));
  float* vp = values.data_ptr<float>();
  int64_t* rp = rows.data_ptr<int64_t>();
  int64_t* cp = cols.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) {
    vp[j] = sel[j].value;
    rp[j] = sel[j].index / M;
    cp[j] = sel[j].index % M;
  }
  return {values, rows, cols};
}

std::vector<TopKEntry> select_one_pass(const at::Tensor& x, const at::Tensor& y, const LabelIndex& lab,
                                       bool self_mode, int64_t k, const TaskPlan& plan) {
  const int64_t M = y.size(0);
  std::vector<TopKBuffer> bufs(plan.num_tasks);
  for (auto& b : bufs) b.reset(k, 2 * k);
  for_each_negative_row(x, y, lab, self_mode, plan, [&](int64_t task, int64_t i, int64_t c0, int64_t cn, float* s) {
    offer_tile_row(bufs[task], s, cn, i * M + c0);
  });
  std::vector<TopKEntry> all;
  for (auto& b : bufs) {
    const auto& e = b.finish();
    all.insert(all.end(), e.begin(), e.end());
  }
  return all;
}

// Histogram of (key >> shift) & 0xffff over the negatives whose key matches `prefix` above bit shift + 16
// (prefix_shift = 32: all), summed over tasks in task order; per-task histograms kept when asked.
std::vector<int64_t> key_histogram(const at::Tensor& x, const at::Tensor& y, const LabelIndex& lab, bool self_mode,
                                   const TaskPlan& plan, int shift, uint32_t prefix, int prefix_shift,
                                   std::vector<std::vector<int64_t>>* per_task) {
  std::vector<std::vector<int64_t>> hist(plan.num_tasks, std::vector<int64_t>(kBins, 0));
  for_each_negative_row(x, y, lab, self_mode, plan, [&](int64_t task, int64_t, int64_t, int64_t cn, float* s) {
    int64_t* h = hist[task].data();
    for (int64_t c = 0; c < cn; ++c) {
      if (s[c] != s[c]) continue;
      const uint32_t key = order_key(s[c]);
      if (prefix_shift < 32 && (key >> prefix_shift) != prefix) continue;
      ++h[(key >> shift) & 0xffffu];
    }
  });
  std::vector<int64_t> total(kBins, 0);
  for (const auto& h : hist)
    for (int64_t b = 0; b < kBins; ++b) total[b] += h[b];
  if (per_task) *per_task = std::move(hist);
  return total;
}

// The bin (from the top) where the cumulative count reaches `need`; *above = the count in the bins above it.
int64_t find_bin(const std::vector<int64_t>& hist, int64_t need, int64_t* above) {
  int64_t acc = 0;
  for (int64_t b = kBins - 1; b >= 0; --b) {
    if (acc + hist[b] >= need) {
      *above = acc;
      return b;
    }
    acc += hist[b];
  }
  TORCH_CHECK(false, "hardest_negatives_fwd: fewer negatives than k (NaN input?)");
  return 0;
}

std::vector<TopKEntry> select_radix(const at::Tensor& x, const at::Tensor& y, const LabelIndex& lab, bool self_mode,
                                    int64_t k, const TaskPlan& plan) {
  const int64_t M = y.size(0);
  int64_t above1 = 0;
  const std::vector<int64_t> hi = key_histogram(x, y, lab, self_mode, plan, 16, 0, 32, nullptr);
  const uint32_t bin = uint32_t(find_bin(hi, k, &above1));
  const int64_t need1 = k - above1;
  std::vector<std::vector<TopKEntry>> kept(plan.num_tasks);
  std::vector<TopKEntry> all;
  if (hi[bin] <= std::max(k, kSmallBin)) {
    // Pass 2: everything above the bin plus the whole bin (O(k + kSmallBin) entries), then select in memory.
    for_each_negative_row(x, y, lab, self_mode, plan, [&](int64_t task, int64_t i, int64_t c0, int64_t cn, float* s) {
      auto& out = kept[task];
      for (int64_t c = 0; c < cn; ++c)
        if (s[c] == s[c] && (order_key(s[c]) >> 16) >= bin) out.push_back({s[c], i * M + c0 + c});
    });
    for (auto& v : kept) all.insert(all.end(), v.begin(), v.end());
    return all;
  }
  // Pass 2: the low 16 bits inside the bin give the k-th key exactly.
  std::vector<std::vector<int64_t>> lo_task;
  const std::vector<int64_t> lo = key_histogram(x, y, lab, self_mode, plan, 0, bin, 16, &lo_task);
  int64_t above2 = 0;
  const uint32_t low = uint32_t(find_bin(lo, need1, &above2));
  const uint32_t thr_key = (bin << 16) | low;
  int64_t need2 = need1 - above2;  // entries equal to the k-th value to keep: the lowest flat indices
  // Tasks own increasing row ranges, so the lowest flat indices come from the first tasks: per-task quotas.
  std::vector<int64_t> quota(plan.num_tasks, 0);
  for (int64_t t = 0; t < plan.num_tasks && need2 > 0; ++t) {
    quota[t] = std::min(need2, lo_task[t][low]);
    need2 -= quota[t];
  }
  lo_task.clear();
  std::vector<TopKBuffer> equal(plan.num_tasks);
  for (int64_t t = 0; t < plan.num_tasks; ++t)
    if (quota[t] > 0) equal[t].reset(quota[t], 2 * quota[t]);
  // Pass 3: entries above the k-th value, and each task's quota of those equal to it.
  for_each_negative_row(x, y, lab, self_mode, plan, [&](int64_t task, int64_t i, int64_t c0, int64_t cn, float* s) {
    auto& out = kept[task];
    for (int64_t c = 0; c < cn; ++c) {
      if (s[c] != s[c]) continue;
      const uint32_t key = order_key(s[c]);
      if (key > thr_key) out.push_back({s[c], i * M + c0 + c});
      else if (key == thr_key && quota[task] > 0) equal[task].offer(s[c], i * M + c0 + c);
    }
  });
  for (int64_t t = 0; t < plan.num_tasks; ++t) {
    all.insert(all.end(), kept[t].begin(), kept[t].end());
    if (quota[t] > 0) {
      const auto& e = equal[t].finish();
      all.insert(all.end(), e.begin(), e.end());
    }
  }
  return all;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hardest_negatives_fwd_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                                         const at::Tensor& labels,
                                                                         const at::Tensor& ref_labels, int64_t k,
                                                                         bool self_mode, bool normalize) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* op = "hardest_negatives_fwd";
  check::hardest_negatives_fwd_inputs(op, x_in, y_in, labels, ref_labels, k, self_mode);  // flashdml/op_checks.h
  const LabelIndex lab = build_label_index(labels, ref_labels);
  const Rows rows = prepare_rows(x_in, y_in, normalize);
  const at::Tensor &x = rows.x, &y = rows.y;
  const int64_t B = x.size(0), M = y.size(0);
  const TaskPlan plan = plan_row_tasks(B);
  const int64_t strategy = selection_strategy().load();
  const bool one_pass = strategy == 1 || (strategy == 0 && k * plan.num_tasks <= kOnePassEntries);
  std::vector<TopKEntry> sel = one_pass ? select_one_pass(x, y, lab, self_mode, k, plan)
                                        : select_radix(x, y, lab, self_mode, k, plan);
  return write_selection(sel, k, M, x.options());
}

}  // namespace
}  // namespace cpu
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CPU, m) {
  m.impl("knn_fwd", &flashdml::cpu::knn_fwd_cpu);
  m.impl("hardest_negatives_fwd", &flashdml::cpu::hardest_negatives_fwd_cpu);
}
