// Contextual loss on the CPU (SPEC 2.5): context_weight·L_ctx + reg_weight·L_reg + contrastive_weight·L_con, with
// nothing B x B stored.
//
// Forward:
//  1. One streaming pass over S = F Fᵀ tiles (row blocks x column tiles, cpu_tiles.h gemm_tile): per row a
//     values-only min-heap of the k largest −D (query included), a candidate list of the entries with
//     fl(−D + ε) >= the running k-th largest, and the margin-contrastive hinge sums / counts (SPEC 2.4, the
//     hinge_pair.h rules). The running threshold only rises to the final t_i, so every final neighbour is a
//     candidate; the list is compacted against the current threshold whenever it doubles, so it stays O(|band|) per
//     row whatever the column order (no fixed capacity, no overflow). At the end of a row block t_i / h_i are read
//     off the heap and the candidates filtered with the inclusive fp32 tests of flashdml/contextual.h — on the fp32
//     values of the one GEMM, so no second pass can round differently.
//  2. The sparse stage (contextual_sparse.h): |N(i) ∩ N(j)|, W, R, Z, js in O(B·k²); L_ctx = (1/B²) Σ_{i≠j}
//     (y − js)², split into the js support and the count of same-label pairs (per-class counts).
//  3. L_reg = (‖Σ F_i‖²/B² − s̃)² in O(B·d).
// The op returns the neighbour lists (CSR + flag bytes: in P, clamped C = 0) and the two hinge counts: all the
// backward needs besides x and labels.
//
// Backward (SPEC's closed form, G … GN): dL_ctx/dS = 2·ste_slope·C ⊙ (SP + u 1ᵀ + LB) with
//  * SP sparse, O(k²) per row (built with a per-task sparse accumulator): GW'⊙H on the support of the js-driven
//    part of GW, the label part of GW times the n part of H, the GI/GJ products with N, GP;
//  * u 1ᵀ row-constant (from −GJ M − GJᵀ M with M = 11ᵀ − N);
//  * LB_ij = −(β/2) ρ_i(κ_j)(1 − a_j/c_i) label-block (the label part of GW, ρ_i(κ) = Σ_{m∈R(i), label κ} 1/r_m,
//    times the dense part of H), evaluated per tile from the class member lists (O(1) memory even for big classes).
// It is applied in one recompute pass over the forward's S tiles (cpu_tiles.h weighted_gradient_pass): each tile
// becomes the whole dL/dS (ctx part masked by C from the recomputed S, the hinge gradients −1/#hp, +1/#hn on the hard
// pairs, the L_reg constant) while it is in cache, then dx += G F, dy += Gᵀ F; then the normalisation backward.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "contextual_grad.h"
#include "contextual_sparse.h"
#include "cpu_tiles.h"
#include "flashdml/contextual.h"
#include "flashdml/hinge_pair.h"
#include "flashdml/poison.h"
#include "label_index.h"

namespace flashdml {
namespace cpu {
namespace {

using ctx::Context;
using ctx::Csr;
using ctx::Nbr;
using ctx::SparseAcc;

struct Setup {
  at::Tensor x32, F, inv;  // fp32 rows as given, the GEMM operand F (normalised when asked), 1 / max(|x|, 1e-12)
  ctx::Rows rows;          // F_i formed on the fly from x32 and inv (bitwise the rows of F)
  LabelIndex cls;
  int64_t B, d;
};

// with_f: materialise F (the forward's tiles, and the backward only when hard negatives need its tiles again).
Setup make_setup(const at::Tensor& x, const at::Tensor& labels, bool normalize, bool with_f) {
  TORCH_CHECK(x.dim() == 2 && at::isFloatingType(x.scalar_type()), "contextual: x must be a 2-D floating tensor");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == x.size(0),
              "contextual: labels must be int64 [B]");
  TORCH_CHECK(x.size(0) < (int64_t(1) << 31), "contextual: B must be < 2^31");
  Setup s;
  s.x32 = as_float_contiguous(x);
  s.B = x.size(0);
  s.d = x.size(1);
  if (with_f) {
    s.F = normalized_rows(s.x32, normalize, &s.inv);
  } else if (normalize) {  // the same 1 / max(|x|, 1e-12) normalized_rows computes
    s.inv = at::empty({s.B}, s.x32.options());
    const float* src = s.x32.data_ptr<float>();
    float* inv = s.inv.data_ptr<float>();
    for (int64_t r = 0; r < s.B; ++r) {
      const float* a = src + r * s.d;
      double ss = 0.0;
      for (int64_t k = 0; k < s.d; ++k) ss += double(a[k]) * double(a[k]);
      inv[r] = 1.f / std::max(float(std::sqrt(ss)), 1e-12f);
    }
  }
  s.rows = ctx::Rows{s.x32.data_ptr<float>(), normalize ? s.inv.data_ptr<float>() : nullptr, s.B, s.d};
  s.cls = build_label_index(labels, labels);
  return s;
}

// Row tasks of the S tile passes: one on the calling thread for small batches (see ctx::stage_tasks).
TaskPlan tile_plan(int64_t B) {
  TaskPlan plan = plan_row_tasks(B);
  if (B < ctx::kSerialBelowRows) plan.num_tasks = 1;
  return plan;
}

// ----------------------------------------------------------------------------------------- streaming pass
struct Cand {
  int32_t col;
  float neg_d;
};

// Values-only min-heap of the k largest −D of one row.
struct TopK {
  float* h;
  int64_t n = 0, k;
  float threshold() const { return n < k ? -std::numeric_limits<float>::infinity() : h[0]; }
  void offer(float v) {
    if (n < k) {
      int64_t i = n++;
      while (i > 0 && h[(i - 1) / 2] > v) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
      }
      h[i] = v;
    } else if (v > h[0]) {
      int64_t i = 0;
      for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= k) break;
        if (c + 1 < k && h[c + 1] < h[c]) ++c;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
      }
      h[i] = v;
    }
  }
};

void compact(std::vector<Cand>& cv, float theta, float eps) {
  size_t o = 0;
  for (const Cand& c : cv)
    if (ctx_band_value(c.neg_d, eps) >= theta) cv[o++] = c;
  cv.resize(o);
}

struct HingeStats {
  double pos_sum = 0.0, neg_sum = 0.0;
  int64_t pos_count = 0, neg_count = 0;
};

struct NbrLists {
  std::vector<HingeStats> con;  // per task: the margin-contrastive sums and counts (SPEC 2.4)
  std::vector<int64_t> size;  // [B]
  std::vector<std::vector<int32_t>> col;  // per task, rows in order
  std::vector<std::vector<uint8_t>> flag;
};

// SPEC 2.4 hard negatives on one tile row (strict test): labels differ and s > m-. Hard positives are same-class
// pairs and come from the per-class pass (class_hinge), not from the tiles.
inline void hinge_negatives_row(const float* s, int64_t cn, const int32_t* col_class, int32_t ci, float mn,
                                HingeStats& st) {
  int64_t hits = 0;
#pragma omp simd reduction(+ : hits)
  for (int64_t c = 0; c < cn; ++c) hits += (col_class[c] != ci) & hinge_hard_negative(s[c], mn, true);
  if (hits == 0) return;
  for (int64_t c = 0; c < cn; ++c)
    if ((col_class[c] != ci) & hinge_hard_negative(s[c], mn, true)) st.neg_sum += double(s[c]) - double(mn);
  st.neg_count += hits;
}

// SPEC 2.4 hard positives of one class (the diagonal kept as a positive): s_ij = pair_sim, symmetric.
inline void class_hinge(const ctx::Rows& rows, const LabelIndex& cls, int64_t c, float mp, HingeStats& st) {
  const int64_t* mem = cls.cols_by_class.data() + cls.class_start[c];
  const int64_t n = cls.class_start[c + 1] - cls.class_start[c];
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = a; b < n; ++b) {
      const float v = ctx::pair_sim(rows, mem[a], mem[b]);
      if (!hinge_hard_positive(v, mp, true)) continue;
      const int64_t mult = a == b ? 1 : 2;
      st.pos_sum += double(mult) * (double(mp) - double(v));
      st.pos_count += mult;
    }
}

NbrLists neighbour_pass(const Setup& p, int64_t k, float eps, float mn) {
  constexpr int64_t kChunk = 32;
  const int64_t B = p.B;
  const TaskPlan plan = tile_plan(B);
  NbrLists out;
  out.con.resize(plan.num_tasks);
  out.size.assign(B, 0);
  out.col.resize(plan.num_tasks);
  out.flag.resize(plan.num_tasks);
  auto fopts = p.F.options().dtype(at::kFloat);
  for_each_row_block(plan, B, [&](int64_t task, int64_t r0, int64_t r1) {
    const int64_t rn = r1 - r0;
    at::Tensor scratch = at::empty({kTileRows, kTileCols}, fopts);
    const float* S = scratch.data_ptr<float>();
    std::vector<float> heaps(rn * k), sorted(k);
    std::vector<TopK> top(rn);
    std::vector<std::vector<Cand>> cands(rn);
    const size_t min_compact = size_t(2 * k + 64);
    std::vector<size_t> compact_at(rn, min_compact);
    for (int64_t r = 0; r < rn; ++r) top[r] = TopK{heaps.data() + r * k, 0, k};
    for (int64_t c0 = 0; c0 < B; c0 += kTileCols) {
      const int64_t cn = std::min(kTileCols, B - c0);
      gemm_tile(scratch, p.F, r0, rn, p.F, c0, cn);
      for (int64_t r = 0; r < rn; ++r) {
        const float* s = S + r * kTileCols;
        hinge_negatives_row(s, cn, p.cls.col_class.data() + c0, p.cls.row_class[r0 + r], mn, out.con[task]);
        TopK& tk = top[r];
        std::vector<Cand>& cv = cands[r];
        float theta = tk.threshold();
        // fl(−D + ε) is non-decreasing in s, so a chunk whose largest s fails the test has no candidate (NaN counts
        // as +inf here: its −D is −0, which the exact test below admits, as the reference does).
        for (int64_t b0 = 0; b0 < cn; b0 += kChunk) {
          const int64_t b1 = std::min(cn, b0 + kChunk);
          float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
          for (int64_t c = b0; c < b1; ++c) mx = std::max(mx, s[c] == s[c] ? s[c] : std::numeric_limits<float>::infinity());
          if (!(ctx_band_value(ctx_neg_distance(mx), eps) >= theta)) continue;
          for (int64_t c = b0; c < b1; ++c) {
            const float nd = ctx_neg_distance(s[c]);
            if (ctx_band_value(nd, eps) >= theta) {
              cv.push_back({int32_t(c0 + c), nd});
              tk.offer(nd);
              theta = tk.threshold();
            }
          }
        }
        if (cv.size() >= compact_at[r]) {
          compact(cv, theta, eps);
          compact_at[r] = std::max(min_compact, 2 * cv.size());
        }
      }
    }
    for (int64_t r = 0; r < rn; ++r) {
      std::copy(top[r].h, top[r].h + k, sorted.begin());
      std::sort(sorted.begin(), sorted.end(), [](float a, float b) { return a > b; });
      const float t = sorted[k - 1], h = sorted[k / 2 - 1];
      int64_t n = 0;
      for (const Cand& c : cands[r]) {
        const float u = ctx_band_value(c.neg_d, eps);
        if (!(u >= t)) continue;
        out.col[task].push_back(c.col);
        out.flag[task].push_back(uint8_t((u >= h ? kCtxInP : 0) | (ctx_clamped(c.neg_d) ? kCtxClamped : 0)));
        ++n;
      }
      out.size[r0 + r] = n;
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------ pieces
// Σ_i F_i in double.
std::vector<double> column_sums(const Setup& p) {
  std::vector<double> s, unused;
  ctx::weighted_column_sums(p.rows, nullptr, s, unused);
  return s;
}

double l_reg(const std::vector<double>& colsum, int64_t B, double target) {
  double ss = 0.0;
  for (double v : colsum) ss += v * v;
  const double m = ss / (double(B) * double(B)) - target;
  return m * m;
}

// L_ctx = (1/B²) [Σ_{i≠j} y_ij + Σ_{(i,j) ∈ supp js, i≠j} (js² − 2 y js)].
double l_ctx(const Context& cx, const LabelIndex& cls, int64_t B) {
  const int64_t T = ctx::num_row_tasks(B);
  std::vector<double> part(T, 0.0);
  ctx::for_each_row(B, [&](int64_t t, int64_t i) {
    double s = 0.0;
    for (int64_t e = cx.js.begin(i); e < cx.js.end(i); ++e) {
      const int32_t j = cx.js.col[e];
      if (j == i) continue;
      const double v = cx.js.val[e];
      s += v * v - (cls.row_class[i] == cls.row_class[j] ? 2.0 * v : 0.0);
    }
    part[t] += s;
  });
  double total = 0.0;
  for (size_t c = 0; c + 1 < cls.class_start.size(); ++c) {
    const double n = double(cls.class_start[c + 1] - cls.class_start[c]);
    total += n * n;
  }
  total -= double(B);
  for (double v : part) total += v;
  return total / (double(B) * double(B));
}

using FwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FwdOut contextual_fwd_cpu(const at::Tensor& x, const at::Tensor& labels, int64_t k, double eps, double context_weight,
                          double contrastive_weight, double reg_weight, double reg_target, double pos_margin,
                          double neg_margin, double ste_slope, bool normalize) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  (void)ste_slope;
  Setup p = make_setup(x, labels, normalize, true);
  const int64_t B = p.B;
  TORCH_CHECK_VALUE(k >= 2 && k <= B, "contextual_loss: k = ", k, " must satisfy 2 <= k <= B = ", B);
  TORCH_CHECK_VALUE(eps >= 0, "contextual_loss: eps must be >= 0, got ", eps);
  NbrLists lists = neighbour_pass(p, k, float(eps), float(neg_margin));
  p.F = at::Tensor();  // the tiles are done: F is not needed any more
  {  // hard positives, per class
    const int64_t T = ctx::stage_tasks(B, ctx::num_classes(p.cls));
    std::vector<HingeStats> part(T);
    ctx::for_each_class_task(p.cls, T, [&](int64_t t, int64_t c) { class_hinge(p.rows, p.cls, c, float(pos_margin), part[t]); });
    lists.con.insert(lists.con.end(), part.begin(), part.end());
  }
  HingeStats con;  // combined in task order: deterministic for a given thread count
  for (const HingeStats& st : lists.con) {
    con.pos_sum += st.pos_sum;
    con.neg_sum += st.neg_sum;
    con.pos_count += st.pos_count;
    con.neg_count += st.neg_count;
  }
  auto lopts = x.options().dtype(at::kLong);
  at::Tensor ptr = new_output({B + 1}, lopts);
  int64_t* pp = ptr.data_ptr<int64_t>();
  pp[0] = 0;
  for (int64_t i = 0; i < B; ++i) pp[i + 1] = pp[i] + lists.size[i];
  at::Tensor col = new_output({pp[B]}, x.options().dtype(at::kInt));
  // uint8 cannot hold new_output's integer sentinel: poisoned flags get the unused high bits instead.
  at::Tensor flag = at::empty({pp[B]}, x.options().dtype(at::kByte));
  if (poison_flag().load()) flag.fill_(0xFC);
  int64_t o = 0;
  for (size_t t = 0; t < lists.col.size(); ++t) {
    std::copy(lists.col[t].begin(), lists.col[t].end(), col.data_ptr<int32_t>() + o);
    std::copy(lists.flag[t].begin(), lists.flag[t].end(), flag.data_ptr<uint8_t>() + o);
    o += int64_t(lists.col[t].size());
  }
  lists = NbrLists();
  const Nbr nb = ctx::make_nbr(B, pp, col.data_ptr<int32_t>(), flag.data_ptr<uint8_t>());
  const Context cx = ctx::build_context(nb);
  const double lc = l_ctx(cx, p.cls, B), lr = l_reg(column_sums(p), B, reg_target);
  const double lcon = hinge_pair_loss(con.pos_sum, con.pos_count, con.neg_sum, con.neg_count, 1.0, 1.0);
  auto fopts = x.options().dtype(at::kFloat);
  at::Tensor loss = new_output({}, fopts), terms = new_output({3}, fopts), counts = new_output({2}, lopts);
  loss.fill_(context_weight * lc + reg_weight * lr + contrastive_weight * lcon);
  float* tp = terms.data_ptr<float>();
  tp[0] = float(lc);
  tp[1] = float(lr);
  tp[2] = float(lcon);
  counts.data_ptr<int64_t>()[0] = con.pos_count;
  counts.data_ptr<int64_t>()[1] = con.neg_count;
  return {loss, terms, ptr, col, flag, counts};
}

// --------------------------------------------------------------------------------------------- backward
struct Backward {
  const Setup& p;
  const std::vector<uint8_t>& big;  // per class: label block applied through class sums, not as sparse entries
  const Nbr& nb;
  const Context& cx;
  double beta;
  std::vector<double> gr, gwn, u, gp1, gp2;
  bool kn_apart = false;  // K N (the GI N, GIᵀ N, GJ N, GJᵀ N products) applied as K (N F) + Nᵀ (K F), not in X

  // K = Kr + Krᵀ, Kr_il = ½ GW_il (1/a_i + 1/c_i) on the entries e = (i, l) of N.
  double kr(int64_t e, int64_t i) const { return 0.5 * gwn[e] * (1.0 / cx.a[i] + 1.0 / cx.c[i]); }
  // (K N)_ij, for the clamped entries (binary searches: there are few of them).
  double kn_at(int64_t i, int32_t j) const {
    double v = 0.0;
    for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e)
      if (nb.find(nb.col[e], j) >= 0) v += kr(e, i);
    for (int64_t q = nb.tptr[i]; q < nb.tptr[i + 1]; ++q)
      if (nb.find(nb.trow[q], j) >= 0) v += kr(nb.tpos[q], nb.trow[q]);
    return v;
  }

  bool same(int64_t i, int64_t j) const { return p.cls.row_class[i] == p.cls.row_class[j]; }
  // G_ij = dL_ctx/dZ_ij = β (js_ij − y_ij) [i ≠ j].
  double G(int64_t i, int32_t j) const { return i == j ? 0.0 : beta * (cx.js.at(i, j) - (same(i, j) ? 1.0 : 0.0)); }
  void prepare() {
    const int64_t B = p.B;
    gr.assign(B, 0.0);
    gwn.assign(nb.ptr[B], 0.0);
    u.assign(B, 0.0);
    ctx::for_each_row(B, [&](int64_t, int64_t i) {
      double s = 0.0;
      for (int64_t e = cx.Z.begin(i); e < cx.Z.end(i); ++e) s += G(i, cx.Z.col[e]) * cx.Z.val[e];
      gr[i] = -s / cx.r[i];
      // GW_il = Σ_{m∈R(i)} G_ml / r_m on l ∈ N(i)
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
        const int32_t l = nb.col[e];
        double g = 0.0;
        for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) g += G(cx.R.col[q], l) / cx.r[cx.R.col[q]];
        gwn[e] = g;
      }
    });
    // u_i = −(Σ_l GJ_il + Σ_l GJ_li); GP on the entries e = (l, i) of N with i ∈ P(l): GR_li (h1, in row l's
    // turn) + GR_il (h2, in row i's turn), each with that row of js scattered densely.
    gp1.assign(nb.ptr[B], 0.0);
    gp2.assign(nb.ptr[B], 0.0);
    const int64_t T = ctx::num_row_tasks(B);
    std::vector<SparseAcc> dense(T, SparseAcc(B));
    ctx::for_each_row(B, [&](int64_t t, int64_t a) {
      double s = 0.0;
      for (int64_t e = nb.ptr[a]; e < nb.ptr[a + 1]; ++e) s += 0.5 * gwn[e] / cx.c[a];
      for (int64_t q = nb.tptr[a]; q < nb.tptr[a + 1]; ++q) s += 0.5 * gwn[nb.tpos[q]] / cx.c[nb.trow[q]];
      u[a] = -s;
      SparseAcc& js_a = dense[t];
      for (int64_t e = cx.js.begin(a); e < cx.js.end(a); ++e) js_a.set(cx.js.col[e], cx.js.val[e]);
      const int32_t ca = p.cls.row_class[a];
      auto GRa = [&](int64_t b) {  // GR_ab = (1/r_a) Σ_{j∈N(b)} G_aj W_bj + gr_a, G_aj from the dense js row
        double acc = 0.0;
        for (int64_t e = nb.ptr[b]; e < nb.ptr[b + 1]; ++e) {
          const int32_t j = nb.col[e];
          if (j == a) continue;
          acc += beta * (js_a.v[j] - (p.cls.row_class[j] == ca ? 1.0 : 0.0)) * cx.w[e];
        }
        return acc / cx.r[a] + gr[a];
      };
      for (int64_t e = nb.ptr[a]; e < nb.ptr[a + 1]; ++e)
        if (nb.flag[e] & kCtxInP) gp1[e] = GRa(nb.col[e]);
      for (int64_t q = nb.tptr[a]; q < nb.tptr[a + 1]; ++q)
        if (nb.flag[nb.tpos[q]] & kCtxInP) gp2[nb.tpos[q]] = GRa(nb.trow[q]);
      js_a.clear();
    });
  }

  // X = the sparse part SP of GN + GP (GN + GP = SP + u 1ᵀ + LB) plus the label block of the small classes, with
  // the clamped entries set so that X + u 1ᵀ + LB_big vanishes there (C ⊙ is applied); rows unsorted.
  struct RowScratch {
    SparseAcc an, ag, o;
    std::vector<double> rh;
    RowScratch(int64_t B, int64_t nc) : an(B), ag(B), o(B), rh(nc, 0.0) {}
  };

  // Row i of X, emit(j, X_ij) for each non-zero (columns unsorted).
  template <typename Emit>
  void sparse_row(RowScratch& sc, int64_t i, const Emit& emit) const {
    const int64_t B = p.B;
    const int32_t* cl = p.cls.row_class.data();
    {
      SparseAcc &an = sc.an, &ag = sc.ag, &o = sc.o;
      std::vector<double>& rh = sc.rh;
      const double ai = cx.a[i], ci = cx.c[i], s_ac = 1.0 / ai + 1.0 / ci;
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {  // n_ij = |N(i) ∩ N(j)|
        const int32_t l = nb.col[e];
        for (int64_t q = nb.tptr[l]; q < nb.tptr[l + 1]; ++q) an.add(nb.trow[q], 1.0);
      }
      for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) {  // js-driven part of GW, and ρ_i
        const int32_t m = cx.R.col[q];
        const double wm = beta / cx.r[m];
        for (int64_t e = cx.js.begin(m); e < cx.js.end(m); ++e)
          if (cx.js.col[e] != m) ag.add(cx.js.col[e], wm * cx.js.val[e]);
        ag.add(m, wm);  // the label part's own diagonal m = j removed from the class sum
        rh[cl[m]] += 1.0 / cx.r[m];
      }
      // GW' ⊙ H (H = ½(1 − a_j/c_i) + ½ n_ij (1/a_i + 1/c_i)) and the label part of GW times the n part of H
      // GW'⊙H, H_ij = ½ s_ac n_ij + ½(1 − a_j/c_i): with kn_apart the second part (T2) goes through apply_factored
      for (int32_t j : ag.idx)
        if (!kn_apart) o.add(j, ag.v[j] * ctx_h(an.v[j], ai, cx.a[j], double(B)));
        else if (an.v[j] != 0.0) o.add(j, ag.v[j] * 0.5 * an.v[j] * s_ac);
      for (int32_t j : an.idx) {
        const double rj = rh[cl[j]];
        if (rj != 0.0) o.add(j, -beta * rj * 0.5 * an.v[j] * s_ac);
      }
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1] && !kn_apart; ++e) {  // GI N − (GJ M − gj 1ᵀ), sparse parts
        const int32_t l = nb.col[e];
        const double coef = kr(e, i);
        for (int64_t e2 = nb.ptr[l]; e2 < nb.ptr[l + 1]; ++e2) o.add(nb.col[e2], coef);
      }
      for (int64_t q = nb.tptr[i]; q < nb.tptr[i + 1]; ++q) {  // GIᵀ N − (GJᵀ M − gjt 1ᵀ), and GP
        const int32_t l = nb.trow[q];
        const double coef = kr(nb.tpos[q], l);
        if (!kn_apart)
          for (int64_t e2 = nb.ptr[l]; e2 < nb.ptr[l + 1]; ++e2) o.add(nb.col[e2], coef);
        if (nb.flag[nb.tpos[q]] & kCtxInP) o.add(l, gp1[nb.tpos[q]] + gp2[nb.tpos[q]]);  // GP_il = P_li (GR_il + GR_li)
      }
      // LB_ij = −(β/2) ρ_i(κ_j)(1 − a_j/c_i) of the small classes, as sparse entries (each class once)
      for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) {
        const int32_t kc = cl[cx.R.col[q]];
        if (big[kc] || rh[kc] == 0.0) continue;
        const double w = -0.5 * beta * rh[kc];
        for (int64_t m = p.cls.class_start[kc]; m < p.cls.class_start[kc + 1]; ++m) {
          const int64_t j = p.cls.cols_by_class[m];
          o.add(int32_t(j), w * (1.0 - cx.a[j] / ci));
        }
        rh[kc] = 0.0;
      }
      // C_ij = 0 (clamped) entries: the whole ctx gradient there, SP + u_i + LB_ij, is removed
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
        if (!(nb.flag[e] & kCtxClamped)) continue;
        const int32_t j = nb.col[e];
        const double lb_big = big[cl[j]] ? -0.5 * beta * rh[cl[j]] * (1.0 - cx.a[j] / ci) : 0.0;
        const double t2 = kn_apart && ag.on[j] ? 0.5 * ag.v[j] * (1.0 - cx.a[j] / ci) : 0.0;
        o.set(j, -u[i] - lb_big - (kn_apart ? kn_at(i, j) + t2 : 0.0));
      }
      for (int32_t j : o.idx) emit(j, o.v[j]);
      o.clear();
      an.clear();
      ag.clear();
      for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) rh[cl[cx.R.col[q]]] = 0.0;
    }
  }

  // dF += s_ctx ((K N) + (K N)ᵀ + T2 + T2ᵀ) F through [B, d] intermediates, every update row-owned:
  //   K N:  K (N F) + Nᵀ (K F)  (K symmetric);
  //   T2 = ½ GW' ⊙ (1 − a_j/c_i) with GW' = β R D_r E (E = js off the diagonal, 1 on it; E, R symmetric):
  //   T2 F = ½β [R D_r (E F) − D_1/c R D_r E (D_a F)],  T2ᵀ F = ½β [E (D_r R F) − D_a E (D_r R D_1/c F)].
  void apply_factored(const ctx::Rows& rows, float* D, double s_ctx) const {
    const int64_t B = p.B, d = p.d;
    std::vector<float> NF(B * d, 0.f), KF(B * d, 0.f), A(B * d, 0.f), Ab(B * d, 0.f), C(B * d, 0.f), Cc(B * d, 0.f);
    auto axpy = [d](float* out, const float* in, float w) {
#pragma omp simd
      for (int64_t q = 0; q < d; ++q) out[q] += w * in[q];
    };
    // E row i: js row i with the diagonal entry replaced by 1 (added when absent)
    auto for_e = [&](int64_t i, auto&& fn) {
      bool diag = false;
      for (int64_t e = cx.js.begin(i); e < cx.js.end(i); ++e) {
        const int32_t j = cx.js.col[e];
        if (j == i) diag = true;
        fn(j, j == i ? 1.0 : cx.js.val[e]);
      }
      if (!diag) fn(int32_t(i), 1.0);
    };
    const int64_t T = ctx::stage_tasks(B, B);
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t i = t0 * B / T; i < t1 * B / T; ++i) {
        float *nf = NF.data() + i * d, *kf = KF.data() + i * d, *a = A.data() + i * d, *ab = Ab.data() + i * d;
        float *c = C.data() + i * d, *cc = Cc.data() + i * d;
        for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
          const int32_t l = nb.col[e];
          axpy(nf, rows.row(l), rows.s(l));
          axpy(kf, rows.row(l), float(kr(e, i)) * rows.s(l));
        }
        for (int64_t q = nb.tptr[i]; q < nb.tptr[i + 1]; ++q) {
          const int32_t l = nb.trow[q];
          axpy(kf, rows.row(l), float(kr(nb.tpos[q], l)) * rows.s(l));
        }
        for_e(i, [&](int32_t j, double v) {
          axpy(a, rows.row(j), float(v) * rows.s(j));
          axpy(ab, rows.row(j), float(v * cx.a[j]) * rows.s(j));
        });
        for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) {
          const int32_t m = cx.R.col[q];
          axpy(c, rows.row(m), float(1.0 / cx.r[i]) * rows.s(m));
          axpy(cc, rows.row(m), float(1.0 / (cx.r[i] * cx.c[m])) * rows.s(m));
        }
      }
    });
    const double h = 0.5 * beta * s_ctx;
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t i = t0 * B / T; i < t1 * B / T; ++i) {
        float* out = D + i * d;
        for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e)
          axpy(out, NF.data() + int64_t(nb.col[e]) * d, float(s_ctx * kr(e, i)));
        for (int64_t q = nb.tptr[i]; q < nb.tptr[i + 1]; ++q) {
          const int64_t l = nb.trow[q];
          axpy(out, NF.data() + l * d, float(s_ctx * kr(nb.tpos[q], l)));
          axpy(out, KF.data() + l * d, float(s_ctx));
        }
        for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) {
          const int64_t m = cx.R.col[q];
          axpy(out, A.data() + m * d, float(h / cx.r[m]));
          axpy(out, Ab.data() + m * d, float(-h / (cx.r[m] * cx.c[i])));
        }
        for_e(i, [&](int32_t j, double v) {
          axpy(out, C.data() + int64_t(j) * d, float(h * v));
          axpy(out, Cc.data() + int64_t(j) * d, float(-h * v * cx.a[i]));
        });
      }
    });
  }

  // dF += s_ctx (X + Xᵀ) F without storing X: every task builds all rows of X (cheap next to applying them) and
  // applies them to its own slice of the d columns, so the scattered Xᵀ updates never race.
  void apply_sparse(const ctx::Rows& rows, float* D, double s_ctx) const {
    const int64_t B = p.B, d = p.d, nc = ctx::num_classes(p.cls);
    const int64_t T = std::min<int64_t>(ctx::stage_tasks(B, B), std::max<int64_t>(1, d / 16));
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t q0 = t == 0 ? 0 : (t * d / T) / 16 * 16, q1 = t + 1 == T ? d : ((t + 1) * d / T) / 16 * 16;
        RowScratch sc(B, nc);
        for (int64_t i = 0; i < B; ++i) {
          const float* fi = rows.row(i);
          float* di = D + i * d;
          const float si = rows.s(i);
          sparse_row(sc, i, [&](int32_t j, double v) {
            const float w = float(s_ctx * v);
            if (w == 0.f) return;
            const float wj = w * rows.s(j), wi = w * si;
            const float* fj = rows.row(j);
            float* dj = D + int64_t(j) * d;
#pragma omp simd
            for (int64_t q = q0; q < q1; ++q) di[q] += wj * fj[q];
#pragma omp simd
            for (int64_t q = q0; q < q1; ++q) dj[q] += wi * fi[q];
          });
        }
      }
    });
  }
};

// Class sums for the label block of the big classes: SF = Σ_{j∈κ} F_j, SaF = Σ_{j∈κ} a_j F_j and
// V = Σ_{m∈κ} Σ_{i∈R(m)} F_i / r_m, U = the same with 1 / (r_m c_i), so that
//   (LB F)_i  = −(β/2) Σ_{m∈R(i), κ_m big} (SF_κm − SaF_κm / c_i) / r_m,   (LBᵀ F)_j = −(β/2)(V_κj − a_j U_κj).
struct BigClassSums {
  std::vector<int64_t> slot;  // per class, index into the sums or -1
  std::vector<double> SF, SaF, V, U;  // [n_big, d]
};

BigClassSums big_class_sums(const Setup& p, const Context& cx, const std::vector<uint8_t>& big) {
  BigClassSums s;
  const int64_t nc = ctx::num_classes(p.cls), d = p.d;
  s.slot.assign(nc, -1);
  int64_t n = 0;
  for (int64_t c = 0; c < nc; ++c)
    if (big[c]) s.slot[c] = n++;
  s.SF.assign(n * d, 0.0);
  s.SaF.assign(n * d, 0.0);
  s.V.assign(n * d, 0.0);
  s.U.assign(n * d, 0.0);
  for (int64_t c = 0; c < nc; ++c) {
    if (!big[c]) continue;
    const int64_t o = s.slot[c] * d;
    for (int64_t q = p.cls.class_start[c]; q < p.cls.class_start[c + 1]; ++q) {
      const int64_t m = p.cls.cols_by_class[q];
      ctx::axpy_row(s.SF.data() + o, p.rows, m, 1.0);
      ctx::axpy_row(s.SaF.data() + o, p.rows, m, cx.a[m]);
      for (int64_t e = cx.R.begin(m); e < cx.R.end(m); ++e) {
        const int32_t i = cx.R.col[e];
        ctx::axpy_row(s.V.data() + o, p.rows, i, 1.0 / cx.r[m]);
        ctx::axpy_row(s.U.data() + o, p.rows, i, 1.0 / (cx.r[m] * cx.c[i]));
      }
    }
  }
  return s;
}

// The SPEC 2.4 hard negatives need the S tiles again (the forward's tiles, so the same pairs): dx_i += 2 g F_j for
// each (G is symmetric up to the fp32 GEMM's rounding); a tile with many of them goes through one GEMM instead.
void hard_negative_pass(const Setup& p, at::Tensor& dx, float g2, float mn) {
  const int64_t B = p.B, d = p.d;
  const TaskPlan plan = tile_plan(B);
  auto fopts = p.F.options();
  const int32_t* cl = p.cls.row_class.data();
  const float* F = p.F.data_ptr<float>();
  float* D = dx.data_ptr<float>();
  for_each_row_block(plan, B, [&](int64_t, int64_t r0, int64_t r1) {
    const int64_t rn = r1 - r0;
    at::Tensor scratch = at::empty({kTileRows, kTileCols}, fopts);
    float* S = scratch.data_ptr<float>();
    for (int64_t c0 = 0; c0 < B; c0 += kTileCols) {
      const int64_t cn = std::min(kTileCols, B - c0);
      at::Tensor G = gemm_tile(scratch, p.F, r0, rn, p.F, c0, cn);
      int64_t hits = 0;
      for (int64_t r = 0; r < rn; ++r) {
        const float* s = S + r * kTileCols;
        const int32_t ci = cl[r0 + r];
#pragma omp simd reduction(+ : hits)
        for (int64_t c = 0; c < cn; ++c) hits += (cl[c0 + c] != ci) & hinge_hard_negative(s[c], mn, true);
      }
      if (hits == 0) continue;
      if (hits * 16 > rn * cn) {  // dense: the tile becomes G, then dx[rows] += G F[cols]
        for (int64_t r = 0; r < rn; ++r) {
          float* s = S + r * kTileCols;
          const int32_t ci = cl[r0 + r];
          for (int64_t c = 0; c < cn; ++c) s[c] = ((cl[c0 + c] != ci) & hinge_hard_negative(s[c], mn, true)) ? g2 : 0.f;
        }
        at::Tensor dx_rows = dx.narrow(0, r0, rn);
        at::addmm_out(dx_rows, dx_rows, G, p.F.narrow(0, c0, cn));
        continue;
      }
      for (int64_t r = 0; r < rn; ++r) {
        const float* s = S + r * kTileCols;
        const int32_t ci = cl[r0 + r];
        float* out = D + (r0 + r) * d;
        for (int64_t c = 0; c < cn; ++c) {
          if (!((cl[c0 + c] != ci) & hinge_hard_negative(s[c], mn, true))) continue;
          const float* f = F + (c0 + c) * d;
#pragma omp simd
          for (int64_t q = 0; q < d; ++q) out[q] += g2 * f[q];
        }
      }
    }
  });
}

constexpr int64_t kBigClass = 32;
// From this batch size on, K N goes through two [B, d] intermediates (fewer, row-owned updates); below it is part
// of X (no B x d buffer besides dx: the B = 1024 memory budget).
constexpr int64_t kKnApartRows = 2048;  // classes above this size take the label block through class sums

at::Tensor contextual_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& labels, int64_t k,
                              double eps, double context_weight, double contrastive_weight, double reg_weight,
                              double reg_target, double pos_margin, double neg_margin, double ste_slope,
                              bool normalize, const at::Tensor& ptr_in, const at::Tensor& col_in,
                              const at::Tensor& flag_in, const at::Tensor& counts_in) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  (void)k;
  (void)eps;
  TORCH_CHECK(grad_loss.numel() == 1, "contextual_bwd: grad_loss must be a scalar");
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  TORCH_CHECK(counts.numel() == 2, "contextual_bwd: counts must have 2 entries (pass the forward's outputs)");
  const double g = grad_loss.item<double>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  const float g_hn = float(g * contrastive_weight * hinge_term_scale(1.0, cp[1]));
  const bool with_neg = g_hn != 0.f;
  Setup p = make_setup(x, labels, normalize, with_neg);
  const int64_t B = p.B, d = p.d;
  const at::Tensor ptr = ptr_in.to(at::kLong).contiguous(), col = col_in.to(at::kInt).contiguous(),
                   flag = flag_in.to(at::kByte).contiguous();
  TORCH_CHECK(ptr.numel() == B + 1 && col.numel() == ptr.data_ptr<int64_t>()[B] && flag.numel() == col.numel(),
              "contextual_bwd: neighbour lists / counts do not match the batch (pass the forward's outputs)");
  const double B2 = double(B) * double(B);
  // dL/dS of each term: L_reg a constant, L_con −1/#hp on hard positives and +1/#hn on hard negatives,
  // L_ctx = s_ctx · C ⊙ (SP + u 1ᵀ + LB) with LB_ij = −(β/2) ρ_i(κ_j)(1 − a_j/c_i). dL/dF = (G + Gᵀ) F, all
  // but the hard negatives without any S tile: constants through Σ F, u 1ᵀ through Σ F and Σ u F, the label block
  // as sparse entries (small classes) or class sums (big ones), X and Xᵀ as sparse rows.
  const double g_hp = -g * contrastive_weight * hinge_term_scale(1.0, cp[0]);
  const float mp = float(pos_margin);
  const double s_ctx = g * context_weight * 2.0 * ste_slope;
  const double beta = 2.0 / B2;
  const bool with_ctx = s_ctx != 0.0;
  const int64_t nc = ctx::num_classes(p.cls);
  std::vector<uint8_t> big(nc, 0);
  for (int64_t c = 0; c < nc; ++c) big[c] = p.cls.class_start[c + 1] - p.cls.class_start[c] > kBigClass;

  const Nbr nb = ctx::make_nbr(B, ptr.data_ptr<int64_t>(), col.data_ptr<int32_t>(), flag.data_ptr<uint8_t>());
  Context cx;
  Backward bw{p, big, nb, cx, beta, {}, {}, {}, {}, {}};
  BigClassSums bs;
  if (with_ctx) {
    cx = ctx::build_context(nb);
    bw.prepare();
    bs = big_class_sums(p, cx, big);
  }
  std::vector<double> colsum, uF;
  ctx::weighted_column_sums(p.rows, with_ctx ? bw.u.data() : nullptr, colsum, uF);
  double ss = 0.0;
  for (double v : colsum) ss += v * v;
  const double g_reg = g * reg_weight * 2.0 * (ss / B2 - reg_target) / B2;

  auto fopts = p.x32.options();
  const bool accumulate = with_neg || with_ctx;
  at::Tensor dx = accumulate ? at::zeros({B, d}, fopts) : new_output({B, d}, fopts);
  if (with_neg) hard_negative_pass(p, dx, 2.f * g_hn, float(neg_margin));
  p.F = at::Tensor();
  float* D = dx.data_ptr<float>();
  if (with_ctx) {
    bw.kn_apart = B >= kKnApartRows;
    if (bw.kn_apart) bw.apply_factored(p.rows, D, s_ctx);
    bw.apply_sparse(p.rows, D, s_ctx);
  }
  const int32_t* cl = p.cls.row_class.data();
  const int64_t T = ctx::stage_tasks(B, nc);
  std::vector<std::vector<double>> accs(T, std::vector<double>(d));
  ctx::for_each_class_task(p.cls, T, [&](int64_t t, int64_t c) {
    double* acc = accs[t].data();
    const int64_t* mem = p.cls.cols_by_class.data() + p.cls.class_start[c];
    const int64_t n = p.cls.class_start[c + 1] - p.cls.class_start[c];
    for (int64_t a = 0; a < n; ++a) {
      const int64_t i = mem[a];
      float* out = D + i * d;
      const double cc = 2.0 * g_reg + (with_ctx ? s_ctx * bw.u[i] : 0.0), cu = with_ctx ? s_ctx : 0.0;
      for (int64_t q = 0; q < d; ++q) acc[q] = (accumulate ? double(out[q]) : 0.0) + cc * colsum[q] + cu * uF[q];
      if (with_ctx) {
        for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) {  // (LB F)_i, big classes
          const int64_t sl = bs.slot[cl[cx.R.col[q]]];
          if (sl < 0) continue;
          const double w = -0.5 * beta * s_ctx / cx.r[cx.R.col[q]], wc = w / cx.c[i];
          const double *sf = bs.SF.data() + sl * d, *saf = bs.SaF.data() + sl * d;
          for (int64_t z = 0; z < d; ++z) acc[z] += w * sf[z] - wc * saf[z];
        }
        if (bs.slot[c] >= 0) {  // (LBᵀ F)_i
          const double w = -0.5 * beta * s_ctx, wa = w * cx.a[i];
          const double *v = bs.V.data() + bs.slot[c] * d, *u = bs.U.data() + bs.slot[c] * d;
          for (int64_t z = 0; z < d; ++z) acc[z] += w * v[z] - wa * u[z];
        }
      }
      if (g_hp != 0.0)  // hard positives of the class, G symmetric: 2 g_hp F_j
        for (int64_t b = 0; b < n; ++b)
          if (hinge_hard_positive(ctx::pair_sim(p.rows, i, mem[b]), mp, true)) ctx::axpy_row(acc, p.rows, mem[b], 2.0 * g_hp);
      ctx::finish_row(out, acc, p.rows, i);
    }
  });
  return grad_output_like(dx, x);
}

}  // namespace
}  // namespace cpu
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CPU, m) {
  m.impl("contextual_fwd", &flashdml::cpu::contextual_fwd_cpu);
  m.impl("contextual_bwd", &flashdml::cpu::contextual_bwd_cpu);
}
