// Contextual loss on the CPU (docs/spec.md §2.5): context_weight·L_ctx + reg_weight·L_reg + contrastive_weight·L_con, with
// nothing B x B stored.
//
// Forward:
//  1. The neighbour lists and the docs/spec.md §2.4 hard negatives from the fp32 values of one GEMM of S (contextual_lists.h):
//     a streaming pass over S tiles, or, for B <= kOneTileRows, one tile scanned row by row.
//  2. docs/spec.md §2.4 hard positives per class (same-class pairs only, contextual_grad.h pair_sim: O(Σ n_c² d)).
//  3. The sparse stage (contextual_sparse.h): |N(i) ∩ N(j)|, W, R, Z, js in O(B·k²); L_ctx = (1/B²) Σ_{i≠j}
//     (y − js)², split into the js support and the count of same-label pairs (per-class counts). For
//     B <= kOneTileRows, Z dense and neighbourhoods as bit rows instead (contextual_one_tile.h); the same dense path
//     for B <= kDenseMaxRows when the neighbourhoods are so wide that the sparse stage would cost more
//     (ctx::use_dense, a function of the lists, so the backward takes the forward's path).
//  4. L_reg = (‖Σ F_i‖²/B² − s̃)² in O(B·d).
// The op returns the neighbour lists (CSR + flag bytes: in P, clamped C = 0) and the two hinge counts: all the
// backward needs besides x and labels.
//
// Backward (docs/spec.md's closed form, G … GN): dL/dF = (G + Gᵀ) F with G = dL/dS, and G never formed:
//  * L_ctx: s_ctx · C ⊙ (SP + u 1ᵀ + LB) (contextual_backward.h): SP sparse (plus, for B >= kKnApartRows, two
//    factored products), u 1ᵀ row-constant (from −GJ M − GJᵀ M, M = 11ᵀ − N), LB_ij = −(β/2) ρ_i(κ_j)(1 − a_j/c_i)
//    the label block (ρ_i(κ) = Σ_{m∈R(i), label κ} 1/r_m): sparse entries for small classes, class sums for big
//    ones; C = 0 only on flagged neighbour-list entries, so the mask is a sparse correction;
//  * L_reg: a constant, through Σ F; L_con: hard positives per class (the forward's pair_sim values), hard negatives
//    (rare once training works) from one recompute of the forward's S tiles only when the forward counted any;
// then the normalisation backward, row by row. No S tile is touched when there are no hard negatives.
// On the dense path (B <= kOneTileRows, or ctx::use_dense) the whole L_ctx term is one dense B x B matrix applied
// with one GEMM (contextual_one_tile.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "contextual_backward.h"
#include "contextual_grad.h"
#include "contextual_lists.h"
#include "contextual_one_tile.h"
#include "contextual_sparse.h"
#include "cpu_tiles.h"
#include "flashdml/op_checks.h"
#include "flashdml/contextual.h"
#include "flashdml/hinge_pair.h"
#include "flashdml/poison.h"
#include "label_index.h"

namespace flashdml {

std::atomic<int64_t>& contextual_dense_mode() {
  static std::atomic<int64_t> mode{0};
  return mode;
}

namespace cpu {
namespace {

using ctx::Backward;
using ctx::BatchView;
using ctx::BigClassSums;
using ctx::Context;
using ctx::HingeStats;
using ctx::Nbr;
using ctx::NbrLists;

struct Setup {
  at::Tensor x32, F, inv;  // fp32 rows as given, the GEMM operand F (normalised when asked), 1 / max(|x|, 1e-12)
  ctx::Rows rows;          // F_i formed on the fly from x32 and inv (bitwise the rows of F)
  LabelIndex cls;
  int64_t B, d;
};

// with_f: materialise F (the forward's tiles, and the backward only when hard negatives need its tiles again).
// Call check::contextual_fwd_inputs (or _bwd_inputs) first.
Setup make_setup(const at::Tensor& x, const at::Tensor& labels, bool normalize, bool with_f) {
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
    for (int64_t r = 0; r < s.B; ++r) inv[r] = inv_row_norm(src + r * s.d, s.d);
  }
  s.rows = ctx::Rows{s.x32.data_ptr<float>(), normalize ? s.inv.data_ptr<float>() : nullptr, s.B, s.d};
  s.cls = build_label_index(labels, labels);
  return s;
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
  check::contextual_fwd_inputs("contextual_fwd", x, labels, k, eps);  // flashdml/op_checks.h
  Setup p = make_setup(x, labels, normalize, true);
  const int64_t B = p.B;
  const bool one_tile = ctx::one_tile(B);
  NbrLists lists = one_tile ? ctx::one_tile_lists(p.F, p.cls, k, float(eps), float(neg_margin))
                            : ctx::neighbour_pass(p.F, p.cls, k, float(eps), float(neg_margin));
  p.F = at::Tensor();  // the tiles are done: F is not needed any more
  {  // hard positives, per class
    const int64_t T = ctx::stage_tasks(B, ctx::num_classes(p.cls), ctx::kSerialSparseRows);
    std::vector<HingeStats> part(T);
    ctx::for_each_class_task(p.cls, T, [&](int64_t t, int64_t c) { ctx::class_hinge(p.rows, p.cls, c, float(pos_margin), part[t]); });
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
  const bool dense = ctx::use_dense(B, pp, flag.data_ptr<uint8_t>(), col.data_ptr<int32_t>());
  const Nbr nb = ctx::make_nbr(B, pp, col.data_ptr<int32_t>(), flag.data_ptr<uint8_t>(), !dense);
  const double lc = dense ? ctx::dense_l_ctx(ctx::dense_context(nb), p.cls.row_class.data())
                          : l_ctx(ctx::build_context(nb), p.cls, B);
  const double lr = l_reg(column_sums(p), B, reg_target);
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

// The docs/spec.md §2.4 hard negatives need the S tiles again (the forward's tiles, so the same pairs): dx_i += 2 g F_j for
// each (G is symmetric up to the fp32 GEMM's rounding); a tile with many of them goes through one GEMM instead.
void hard_negative_pass(const Setup& p, at::Tensor& dx, float g2, float mn) {
  const int64_t B = p.B, d = p.d;
  const TaskPlan plan = ctx::tile_plan(B);
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

constexpr int64_t kBigClass = 32;  // classes above this size take the label block through class sums
// From this batch size on, K N and the dense part of GW'⊙H go through column-chunked [B, ·] intermediates and the
// rest of X is stored with its transpose; below it a row of X has about B non-zeros anyway and X goes through dense
// row blocks and GEMMs (Backward::apply_sparse_dense, 2·64·B floats: the B = 1024 memory budget).
constexpr int64_t kKnApartRows = 2048;

at::Tensor contextual_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& labels, int64_t k,
                              double eps, double context_weight, double contrastive_weight, double reg_weight,
                              double reg_target, double pos_margin, double neg_margin, double ste_slope,
                              bool normalize, const at::Tensor& ptr_in, const at::Tensor& col_in,
                              const at::Tensor& flag_in, const at::Tensor& counts_in) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* op = "contextual_bwd";
  // With the forward's neighbour lists: CSR over the B rows of x, columns in [0, B) (O(B + nnz)).
  check::contextual_bwd_inputs(op, grad_loss, x, labels, k, eps, ptr_in, col_in, flag_in, counts_in);
  const at::Tensor counts = counts_in.contiguous();
  const double g = grad_loss.item<double>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  const float g_hn = float(g * contrastive_weight * hinge_term_scale(1.0, cp[1]));
  const bool with_neg = g_hn != 0.f;
  Setup p = make_setup(x, labels, normalize, with_neg);
  const int64_t B = p.B, d = p.d;
  const at::Tensor ptr = ptr_in.contiguous(), col = col_in.contiguous(), flag = flag_in.contiguous();
  const double B2 = double(B) * double(B);
  // dL/dS of each term: L_reg a constant, L_con −1/#hp on hard positives and +1/#hn on hard negatives,
  // L_ctx = s_ctx · C ⊙ (SP + u 1ᵀ + LB) with LB_ij = −(β/2) ρ_i(κ_j)(1 − a_j/c_i). dL/dF = (G + Gᵀ) F, all
  // but the hard negatives without any S tile: constants through Σ F, u 1ᵀ through Σ F and Σ u F, the label block
  // as sparse entries (small classes) or class sums (big ones), X and Xᵀ as sparse rows.
  const double g_hp = -g * contrastive_weight * hinge_term_scale(1.0, cp[0]);
  const float mp = float(pos_margin);
  const double s_ctx = g * context_weight * 2.0 * ste_slope;
  const double beta = 2.0 / B2;
  // the forward's decision, recomputed from the same lists
  const bool with_ctx = s_ctx != 0.0,
             dense = ctx::use_dense(B, ptr.data_ptr<int64_t>(), flag.data_ptr<uint8_t>(), col.data_ptr<int32_t>());
  const bool sparse_ctx = with_ctx && !dense;  // the L_ctx terms of the sparse path (dense: all in one GEMM)
  const int64_t nc = ctx::num_classes(p.cls);
  std::vector<uint8_t> big(nc, 0);
  for (int64_t c = 0; c < nc; ++c) big[c] = p.cls.class_start[c + 1] - p.cls.class_start[c] > kBigClass;

  const Nbr nb = ctx::make_nbr(B, ptr.data_ptr<int64_t>(), col.data_ptr<int32_t>(), flag.data_ptr<uint8_t>(), !dense);
  Context cx;
  Backward bw{BatchView{p.cls, p.rows, p.B, p.d}, big, nb, cx, beta, {}, {}, {}, {}, {}};
  BigClassSums bs;
  if (sparse_ctx) {
    cx = ctx::build_context(nb);
    bw.prepare();
    bs = ctx::big_class_sums(BatchView{p.cls, p.rows, p.B, p.d}, cx, big);
  }
  std::vector<double> colsum, uF;
  ctx::weighted_column_sums(p.rows, sparse_ctx ? bw.u.data() : nullptr, colsum, uF);
  double ss = 0.0;
  for (double v : colsum) ss += v * v;
  const double g_reg = g * reg_weight * 2.0 * (ss / B2 - reg_target) / B2;

  auto fopts = p.x32.options();
  const bool accumulate = with_neg || with_ctx;
  at::Tensor dx = new_output({B, d}, fopts);
  if (accumulate) std::fill_n(dx.data_ptr<float>(), B * d, 0.f);  // serial: at::zeros would open a parallel region
  if (with_neg) hard_negative_pass(p, dx, 2.f * g_hn, float(neg_margin));
  p.F = at::Tensor();
  float* D = dx.data_ptr<float>();
  if (with_ctx && dense) {
    ctx::dense_ctx_grad(ctx::dense_context(nb), nb, p.cls.row_class.data(), p.rows, beta, s_ctx, dx);
  } else if (with_ctx) {
    bw.kn_apart = B >= kKnApartRows;
    if (bw.kn_apart) {
      bw.apply_factored(p.rows, D, s_ctx);
      bw.apply_sparse_stored(p.rows, D, s_ctx);
    } else {
      bw.apply_sparse_dense(p.rows, dx, s_ctx);
    }
  }
  const int32_t* cl = p.cls.row_class.data();
  const int64_t T = ctx::stage_tasks(B, nc, ctx::kSerialSparseRows);
  std::vector<std::vector<double>> accs(T, std::vector<double>(d));
  ctx::for_each_class_task(p.cls, T, [&](int64_t t, int64_t c) {
    double* acc = accs[t].data();
    const int64_t* mem = p.cls.cols_by_class.data() + p.cls.class_start[c];
    const int64_t n = p.cls.class_start[c + 1] - p.cls.class_start[c];
    for (int64_t a = 0; a < n; ++a) {
      const int64_t i = mem[a];
      float* out = D + i * d;
      const double cc = 2.0 * g_reg + (sparse_ctx ? s_ctx * bw.u[i] : 0.0), cu = sparse_ctx ? s_ctx : 0.0;
      for (int64_t q = 0; q < d; ++q) acc[q] = (accumulate ? double(out[q]) : 0.0) + cc * colsum[q] + cu * uF[q];
      if (sparse_ctx) {
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

// Test support: the path (dense or sparse) the forward and backward take for these neighbour lists.
bool contextual_dense_path_cpu(const at::Tensor& ptr_in, const at::Tensor& col_in, const at::Tensor& flag_in) {
  const at::Tensor ptr = ptr_in.to(at::kLong).contiguous(), col = col_in.to(at::kInt).contiguous(),
                   flag = flag_in.to(at::kByte).contiguous();
  TORCH_CHECK(ptr.numel() >= 1 && col.numel() == ptr.data_ptr<int64_t>()[ptr.numel() - 1] && flag.numel() == col.numel(),
              "_contextual_dense_path: pass the forward's neighbour lists");
  return ctx::use_dense(ptr.numel() - 1, ptr.data_ptr<int64_t>(), flag.data_ptr<uint8_t>(), col.data_ptr<int32_t>());
}

}  // namespace
}  // namespace cpu
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CPU, m) {
  m.impl("contextual_fwd", &flashdml::cpu::contextual_fwd_cpu);
  m.impl("contextual_bwd", &flashdml::cpu::contextual_bwd_cpu);
  m.impl("_contextual_dense_path", &flashdml::cpu::contextual_dense_path_cpu);
}
