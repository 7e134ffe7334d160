// Hinge-pair losses on the CPU: Threshold-Consistent Margin (docs/spec.md §2.3) and margin contrastive (docs/spec.md §2.4).
// Both are one streaming pass forward that reduces each tile of S = x y^T to four numbers (hinge sums in double,
// exact int64 counts of the hard positive / negative pairs; flashdml/hinge_pair.h has the per-element rules) and
// one recompute pass backward (weighted_gradient_pass: G = dL/dS is -w+/#hp, +w-/#hn or 0 per entry).
// Nothing B x M is stored; each task holds one kTileRows x kTileCols tile of S in L2.
//
// Forward and backward compute every S tile with the same gemm_tile call on the same row blocks and column
// tiles, so the fp32 values the membership tests see are bitwise the same in both passes and the backward
// selects exactly the pairs the forward counted.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cpu_tiles.h"
#include "flashdml/op_checks.h"
#include "flashdml/hinge_pair.h"
#include "flashdml/poison.h"
#include "label_index.h"

namespace flashdml {
namespace cpu {
namespace {

struct HingeStats {
  double pos_sum = 0.0, neg_sum = 0.0;
  int64_t pos_count = 0, neg_count = 0;
};

// What the forward and the backward pass share: the (normalised) fp32 rows, dense label classes, margins.
struct HingeSetup {
  at::Tensor x, y;           // fp32, contiguous; y is x itself when the op got the same tensor twice
  at::Tensor x_inv, y_inv;   // 1 / max(|row|, 1e-12) (normalize only)
  LabelIndex classes;        // row_class [B] (-1: label absent from ref_labels), col_class [M]
  float pos_margin, neg_margin;
  bool drop_diagonal;
};

// Call check::hinge_pair_fwd_inputs (or _bwd_inputs) first.
HingeSetup make_setup(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& labels,
                      const at::Tensor& ref_labels, double pos_margin, double neg_margin, bool drop_diagonal,
                      bool normalize) {
  HingeSetup s;
  s.x = normalized_rows(x_in, normalize, &s.x_inv);
  if (x_in.is_same(y_in)) {  // self mode: normalise once
    s.y = s.x;
    s.y_inv = s.x_inv;
  } else {
    s.y = normalized_rows(y_in, normalize, &s.y_inv);
  }
  s.classes = build_label_index(labels, ref_labels);
  s.pos_margin = static_cast<float>(pos_margin);
  s.neg_margin = static_cast<float>(neg_margin);
  s.drop_diagonal = drop_diagonal;
  return s;
}

// Column of the diagonal pair (i, i) inside the tile [c0, c0 + cn), or -1 (none, or the diagonal is kept).
inline int32_t diagonal_in_tile(const HingeSetup& p, int64_t i, int64_t c0, int64_t cn) {
  return (p.drop_diagonal && i >= c0 && i < c0 + cn) ? static_cast<int32_t>(i - c0) : -1;
}

// Adds the hinge sums and counts of tile S[0:rn, 0:cn] (rows r0.., columns c0..) to st.
template <bool kStrict>
void tile_stats(const float* S, int64_t ld, int64_t r0, int64_t rn, int64_t c0, int64_t cn, const HingeSetup& p,
                HingeStats& st) {
  const int32_t* col = p.classes.col_class.data() + c0;
  const float mp = p.pos_margin, mn = p.neg_margin;
  const double mpd = mp, mnd = mn;
  const int32_t n = static_cast<int32_t>(cn);
  for (int64_t r = 0; r < rn; ++r) {
    const int64_t i = r0 + r;
    const float* s = S + r * ld;
    const int32_t ci = p.classes.row_class[i];
    const int32_t skip = diagonal_in_tile(p, i, c0, cn);
    // Counts are kept as doubles inside the loop (exact: at most kTileCols per row and tile) because GCC does not
    // vectorise an omp simd reduction that mixes double and integer accumulators.
    double ps = 0.0, ns = 0.0, pc = 0.0, nc = 0.0;
#pragma omp simd reduction(+ : ps, ns, pc, nc)
    for (int32_t c = 0; c < n; ++c) {
      const float v = s[c];
      const bool same = col[c] == ci;
      const bool hp = same & (c != skip) & hinge_hard_positive(v, mp, kStrict);
      const bool hn = !same & hinge_hard_negative(v, mn, kStrict);
      const double vd = v;
      ps += hp ? mpd - vd : 0.0;
      ns += hn ? vd - mnd : 0.0;
      pc += hp ? 1.0 : 0.0;
      nc += hn ? 1.0 : 0.0;
    }
    st.pos_sum += ps;
    st.neg_sum += ns;
    st.pos_count += static_cast<int64_t>(pc);
    st.neg_count += static_cast<int64_t>(nc);
  }
}

// Overwrites tile S[0:rn, 0:cn] with G = dL/dS: -gp on hard positives, +gn on hard negatives, 0 elsewhere.
template <bool kStrict>
void tile_grad(float* S, int64_t ld, int64_t r0, int64_t rn, int64_t c0, int64_t cn, const HingeSetup& p, float gp,
               float gn) {
  const int32_t* col = p.classes.col_class.data() + c0;
  const float mp = p.pos_margin, mn = p.neg_margin;
  const int32_t n = static_cast<int32_t>(cn);
  for (int64_t r = 0; r < rn; ++r) {
    const int64_t i = r0 + r;
    float* s = S + r * ld;
    const int32_t ci = p.classes.row_class[i];
    const int32_t skip = diagonal_in_tile(p, i, c0, cn);
#pragma omp simd
    for (int32_t c = 0; c < n; ++c) {
      const float v = s[c];
      const bool same = col[c] == ci;
      const bool hp = same & (c != skip) & hinge_hard_positive(v, mp, kStrict);
      const bool hn = !same & hinge_hard_negative(v, mn, kStrict);
      s[c] = (hp ? -gp : 0.f) + (hn ? gn : 0.f);  // hp, hn exclusive; a sum of selects vectorises, nested ?: not
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hinge_pair_fwd_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                                  const at::Tensor& labels,
                                                                  const at::Tensor& ref_labels, double pos_margin,
                                                                  double neg_margin, double pos_weight,
                                                                  double neg_weight, bool drop_diagonal, bool strict,
                                                                  bool normalize) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check::hinge_pair_fwd_inputs("hinge_pair_fwd", x_in, y_in, labels, ref_labels, drop_diagonal);  // op_checks.h
  const HingeSetup p = make_setup(x_in, y_in, labels, ref_labels, pos_margin, neg_margin, drop_diagonal, normalize);
  const int64_t B = p.x.size(0), M = p.y.size(0);
  auto fopts = p.x.options().dtype(at::kFloat);

  const TaskPlan plan = plan_row_tasks(B);
  std::vector<HingeStats> parts(plan.num_tasks);
  for_each_row_block(plan, B, [&](int64_t task, int64_t r0, int64_t r1) {
    at::Tensor scratch = at::empty({kTileRows, kTileCols}, fopts);
    const float* S = scratch.data_ptr<float>();
    for (int64_t c0 = 0; c0 < M; c0 += kTileCols) {
      const int64_t cn = std::min(kTileCols, M - c0);
      gemm_tile(scratch, p.x, r0, r1 - r0, p.y, c0, cn);
      if (strict) {
        tile_stats<true>(S, kTileCols, r0, r1 - r0, c0, cn, p, parts[task]);
      } else {
        tile_stats<false>(S, kTileCols, r0, r1 - r0, c0, cn, p, parts[task]);
      }
    }
  });

  HingeStats total;  // combined in task order: deterministic for a given thread count
  for (const HingeStats& st : parts) {
    total.pos_sum += st.pos_sum;
    total.neg_sum += st.neg_sum;
    total.pos_count += st.pos_count;
    total.neg_count += st.neg_count;
  }
  at::Tensor loss = new_output({}, fopts);
  at::Tensor sums = new_output({2}, fopts);
  at::Tensor counts = new_output({2}, fopts.dtype(at::kLong));
  loss.fill_(hinge_pair_loss(total.pos_sum, total.pos_count, total.neg_sum, total.neg_count, pos_weight, neg_weight));
  float* sp = sums.data_ptr<float>();
  sp[0] = static_cast<float>(total.pos_sum);
  sp[1] = static_cast<float>(total.neg_sum);
  int64_t* cp = counts.data_ptr<int64_t>();
  cp[0] = total.pos_count;
  cp[1] = total.neg_count;
  return {loss, sums, counts};
}

std::tuple<at::Tensor, at::Tensor> hinge_pair_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& x_in,
                                                      const at::Tensor& y_in, const at::Tensor& labels,
                                                      const at::Tensor& ref_labels, double pos_margin,
                                                      double neg_margin, double pos_weight, double neg_weight,
                                                      bool drop_diagonal, bool strict, bool normalize,
                                                      const at::Tensor& counts_in) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check::hinge_pair_bwd_inputs("hinge_pair_bwd", grad_loss, x_in, y_in, labels, ref_labels, drop_diagonal,
                               counts_in);
  const HingeSetup p = make_setup(x_in, y_in, labels, ref_labels, pos_margin, neg_margin, drop_diagonal, normalize);
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  const int64_t* cp = counts.data_ptr<int64_t>();
  const double gl = grad_loss.item<double>();
  const float gp = static_cast<float>(gl * hinge_term_scale(pos_weight, cp[0]));
  const float gn = static_cast<float>(gl * hinge_term_scale(neg_weight, cp[1]));
  auto fopts = p.x.options().dtype(at::kFloat);

  at::Tensor dx = at::zeros(p.x.sizes(), fopts), dy = at::zeros(p.y.sizes(), fopts);
  if (gp != 0.f || gn != 0.f) {  // both zero (empty sets, zero upstream gradient): the gradient is exactly zero
    weighted_gradient_pass(p.x, p.y, dx, dy, [&](int64_t, int64_t r0, int64_t rn, int64_t c0, int64_t cn, float* S,
                                                 int64_t ld) {
      if (strict) {
        tile_grad<true>(S, ld, r0, rn, c0, cn, p, gp, gn);
      } else {
        tile_grad<false>(S, ld, r0, rn, c0, cn, p, gp, gn);
      }
    });
    if (normalize) {
      normalize_backward_inplace(dx, p.x, p.x_inv);
      normalize_backward_inplace(dy, p.y, p.y_inv);
    }
  }
  return {grad_output_like(dx, x_in), grad_output_like(dy, y_in)};
}

}  // namespace
}  // namespace cpu
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CPU, m) {
  m.impl("hinge_pair_fwd", &flashdml::cpu::hinge_pair_fwd_cpu);
  m.impl("hinge_pair_bwd", &flashdml::cpu::hinge_pair_bwd_cpu);
}
