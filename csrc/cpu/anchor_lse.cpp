// The anchor-LSE losses on the CPU (docs/spec.md §6.1-6.3): SupCon (kind 0), Multi-Similarity (1), Circle (2).
// Forward: one streaming pass over S tiles (the shared row-block tasks of cpu_tiles.h) keeps, per anchor row, an
// online LSE of the negative logits f_n(s) (dense, vectorised over the tile row, negatives picked by one int32
// class compare) and of the positive logits f_p(s) (sparse, through the label index), plus SupCon's sum of
// positive logits. The per-row losses, the reducer's exact count and each row's weights are then formed in
// double, in row order (bit-identical run to run), into row_stats (flashdml/anchor_lse.h). Backward: one
// recompute pass (weighted_gradient_pass) overwrites each tile with dL/dS from the row statistics; for SupCon it
// also sums dL/dS * S for the temperature's gradient. The kind is a template argument: one kernel per loss, the
// per-pair formula inlined in the hot loops.
//
// The exp loops vectorise because setup.py compiles the CPU sources with -fno-trapping-math (see there).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_tiles.h"
#include "flashdml/anchor_lse.h"
#include "flashdml/fast_exp.h"
#include "flashdml/online_lse.h"
#include "flashdml/op_checks.h"
#include "flashdml/poison.h"
#include "label_index.h"

namespace flashdml {
namespace cpu {
namespace {

using namespace anchor_lse;

inline double softplus(double v) { return v > 0 ? v + std::log1p(std::exp(-v)) : std::log1p(std::exp(v)); }
inline double sigmoid(double v) { return v >= 0 ? 1.0 / (1.0 + std::exp(-v)) : std::exp(v) / (1.0 + std::exp(v)); }

struct RowAcc {
  OnlineLse pos, neg;
  double pos_logit_sum = 0.0;  // SupCon: sum of z over the row's positives
};

Params params_of(int64_t kind, const at::Tensor& temperature, double p0, double p1, double p2) {
  if (kind == kSupCon) return {1.f / temperature.item<float>(), 0.f, 0.f};
  return {float(p0), float(p1), float(p2)};
}

template <int K>
void forward_pass(const at::Tensor& x, const at::Tensor& y, const LabelIndex& lab, const Params& prm, bool self_mode,
                  std::vector<RowAcc>& acc) {
  const int64_t B = x.size(0), M = y.size(0);
  const int32_t* col_class = lab.col_class.data();
  auto fopts = x.options().dtype(at::kFloat);
  const TaskPlan plan = plan_row_tasks(B);
  for_each_row_block(plan, B, [&](int64_t, int64_t r0, int64_t r1) {
    at::Tensor scratch = at::empty({kTileRows, kTileCols}, fopts);
    const int64_t rn = r1 - r0;
    for (int64_t c0 = 0; c0 < M; c0 += kTileCols) {
      const int64_t cn = std::min(kTileCols, M - c0);
      gemm_tile(scratch, x, r0, rn, y, c0, cn);
      const float* S = scratch.data_ptr<float>();
      for (int64_t r = 0; r < rn; ++r) {
        const int64_t i = r0 + r;
        const float* s = S + r * kTileCols;
        const int32_t rc = lab.row_class[i];
        const int32_t* cc = col_class + c0;
        float m = kNegInf;
#pragma omp simd reduction(max : m)
        for (int64_t c = 0; c < cn; ++c) m = std::max(m, cc[c] != rc ? neg_logit<K>(s[c], prm) : kNegInf);
        if (m != kNegInf) {
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t c = 0; c < cn; ++c) {
            const float e = exp_poly(neg_logit<K>(s[c], prm) - m);
            sum += cc[c] != rc ? e : 0.f;
          }
          acc[i].neg.merge(m, sum);
        }
        auto [pb, pe] = lab.positives_in(i, c0, c0 + cn);
        for (const int64_t* p = pb; p != pe; ++p) {
          if (self_mode && *p == i) continue;
          const float v = pos_logit<K>(s[*p - c0], prm);
          acc[i].pos.add(v);
          if constexpr (K == kSupCon) acc[i].pos_logit_sum += double(v);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> anchor_lse_fwd_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                      const at::Tensor& labels, const at::Tensor& ref_labels,
                                                      const at::Tensor& temperature, int64_t kind, double p0,
                                                      double p1, double p2, bool self_mode) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check::anchor_lse_fwd_inputs("anchor_lse_fwd", x_in, y_in, labels, ref_labels, temperature, kind, p0, p1, p2,
                               self_mode);  // flashdml/op_checks.h
  at::Tensor x_inv, y_inv;
  const at::Tensor x = normalized_rows(x_in, true, &x_inv);
  const at::Tensor y = self_mode ? x : normalized_rows(y_in, true, &y_inv);
  const int64_t B = x.size(0), M = y.size(0);
  const Params prm = params_of(kind, temperature, p0, p1, p2);
  const LabelIndex lab = build_label_index(labels, ref_labels);
  std::vector<RowAcc> acc(B);
  if (kind == kSupCon) forward_pass<kSupCon>(x, y, lab, prm, self_mode, acc);
  else if (kind == kMultiSimilarity) forward_pass<kMultiSimilarity>(x, y, lab, prm, self_mode, acc);
  else forward_pass<kCircle>(x, y, lab, prm, self_mode, acc);

  // pml's zero cases: at most one positive and one negative pair; SupCon also without any positive or negative.
  const int64_t n_pos = lab.num_positive_pairs(self_mode);
  const int64_t n_neg = B * M - n_pos - (self_mode ? B : 0);
  const bool zero = (n_pos <= 1 && n_neg <= 1) || (kind == kSupCon && (n_pos == 0 || n_neg == 0));

  std::vector<double> ell(B, 0.0);
  std::vector<float> lse_pos(B), lse_neg(B);
  std::vector<int64_t> row_pos(B);
  for (int64_t i = 0; i < B; ++i) {
    const int32_t rc = lab.row_class[i];
    const int64_t class_cols = rc < 0 ? 0 : lab.class_start[rc + 1] - lab.class_start[rc];
    const int64_t np = class_cols - (self_mode ? 1 : 0), nn = M - class_cols;
    row_pos[i] = np;
    if (kind == kSupCon) {
      OnlineLse all = acc[i].pos;
      all.merge(acc[i].neg);
      lse_pos[i] = lse_neg[i] = all.value();
      if (np > 0) ell[i] = double(lse_pos[i]) - acc[i].pos_logit_sum / double(np);
    } else if (kind == kMultiSimilarity) {
      OnlineLse lp = acc[i].pos, ln = acc[i].neg;
      lp.merge(0.f, 1.f);  // the "1 +" inside each log
      ln.merge(0.f, 1.f);
      lse_pos[i] = lp.value();
      lse_neg[i] = ln.value();
      ell[i] = double(lse_pos[i]) / p0 + double(lse_neg[i]) / p1;
    } else {
      lse_pos[i] = acc[i].pos.value();
      lse_neg[i] = acc[i].neg.value();
      if (np > 0 && nn > 0) ell[i] = softplus(double(lse_pos[i]) + double(lse_neg[i]));
    }
  }
  // The reducer: MS averages over all anchors, SupCon and Circle over the anchors with a loss > 0 (exact count).
  int64_t count = 0;
  if (kind == kMultiSimilarity) {
    count = B;
  } else {
    for (int64_t i = 0; i < B; ++i) count += ell[i] > 0.0 ? 1 : 0;
  }
  const double inv_count = (zero || count == 0) ? 0.0 : 1.0 / double(count);

  auto fopts = x.options().dtype(at::kFloat);
  at::Tensor stats = new_output({B, kStats}, fopts);
  at::Tensor loss = new_output({}, fopts);
  float* st = stats.data_ptr<float>();
  double total = 0.0;
  for (int64_t i = 0; i < B; ++i) {
    const double c = (kind == kMultiSimilarity || ell[i] > 0.0) ? inv_count : 0.0;
    total += c * ell[i];
    float* row = st + i * kStats;
    row[kLsePos] = lse_pos[i];
    row[kLseNeg] = lse_neg[i];
    double w = c;
    if (kind == kCircle && c != 0.0) w = c * sigmoid(double(lse_pos[i]) + double(lse_neg[i]));
    row[kWeight] = float(w);
    row[kLinear] = (kind == kSupCon && row_pos[i] > 0) ? float(c / double(row_pos[i])) : 0.f;
  }
  loss.fill_(total);
  return {loss, stats};
}

template <int K>
double backward_pass(const at::Tensor& x, const at::Tensor& y, at::Tensor& dx, at::Tensor& dy, const LabelIndex& lab,
                     const Params& prm, bool self_mode, const float* st, float gl) {
  const int32_t* col_class = lab.col_class.data();
  std::vector<double> gs_parts(at::get_num_threads() + 1, 0.0);
  std::vector<std::vector<std::pair<int64_t, float>>> pos_grads(at::get_num_threads() + 1);
  weighted_gradient_pass(x, y, dx, dy, [&](int64_t task, int64_t r0, int64_t rn, int64_t c0, int64_t cn, float* S,
                                           int64_t ld) {
    double gs = 0.0;
    auto& pos_grad = pos_grads[task];  // (column in tile, dL/dS) of this row's positives
    for (int64_t r = 0; r < rn; ++r) {
      const int64_t i = r0 + r;
      float* s = S + r * ld;
      const float* row = st + i * kStats;
      const float w = row[kWeight], u = row[kLinear];
      if (w == 0.f && u == 0.f) {  // an anchor outside the reduction: no gradient
        std::fill(s, s + cn, 0.f);
        continue;
      }
      const float lp = row[kLsePos], ln = row[kLseNeg];
      const int32_t rc = lab.row_class[i];
      const int32_t* cc = col_class + c0;
      // Positives first (sparse), while the tile still holds their S values.
      pos_grad.clear();
      auto [pb, pe] = lab.positives_in(i, c0, c0 + cn);
      for (const int64_t* p = pb; p != pe; ++p) {
        if (self_mode && *p == i) continue;
        const float sv = s[*p - c0];
        float g = w * exp_poly(pos_logit<K>(sv, prm) - lp) * pos_slope<K>(sv, prm);
        if constexpr (K == kSupCon) {
          g -= u * prm.p0;
          gs += double(g) * double(sv);
        }
        pos_grad.emplace_back(*p - c0, g * gl);
      }
      // Negatives (dense, vectorised); positives and the self pair get 0 here.
      float gs_row = 0.f;
#pragma omp simd reduction(+ : gs_row)
      for (int64_t c = 0; c < cn; ++c) {
        const float sv = s[c];
        const float g = cc[c] != rc ? w * exp_poly(neg_logit<K>(sv, prm) - ln) * neg_slope<K>(sv, prm) : 0.f;
        gs_row += g * sv;
        s[c] = g * gl;
      }
      if constexpr (K == kSupCon) gs += gs_row;
      for (const auto& [c, g] : pos_grad) s[c] = g;
    }
    gs_parts[task] += gs;
  });
  double total = 0.0;
  for (double v : gs_parts) total += v;
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> anchor_lse_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& labels,
    const at::Tensor& ref_labels, const at::Tensor& temperature, int64_t kind, double p0, double p1, double p2,
    bool self_mode, const at::Tensor& row_stats) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check::anchor_lse_bwd_inputs("anchor_lse_bwd", grad_loss, x_in, y_in, labels, ref_labels, temperature, kind, p0, p1,
                               p2, self_mode, row_stats);
  at::Tensor x_inv, y_inv;
  const at::Tensor x = normalized_rows(x_in, true, &x_inv);
  const at::Tensor y = self_mode ? x : normalized_rows(y_in, true, &y_inv);
  const int64_t B = x.size(0), M = y.size(0), d = x.size(1);
  const Params prm = params_of(kind, temperature, p0, p1, p2);
  const float gl = grad_loss.to(at::kFloat).item<float>();
  const LabelIndex lab = build_label_index(labels, ref_labels);
  const at::Tensor stats = row_stats.contiguous();
  const float* st = stats.data_ptr<float>();
  auto fopts = x.options().dtype(at::kFloat);
  at::Tensor dx = at::zeros({B, d}, fopts), dy = at::zeros({M, d}, fopts);
  double gs = 0.0;
  if (kind == kSupCon) gs = backward_pass<kSupCon>(x, y, dx, dy, lab, prm, self_mode, st, gl);
  else if (kind == kMultiSimilarity) backward_pass<kMultiSimilarity>(x, y, dx, dy, lab, prm, self_mode, st, gl);
  else backward_pass<kCircle>(x, y, dx, dy, lab, prm, self_mode, st, gl);
  at::Tensor dtemp = new_output({}, fopts);
  // SupCon: z = S / tau, so dL/dtau = -(1/tau) sum dL/dS * S; the other kinds do not read the temperature.
  dtemp.fill_(kind == kSupCon ? -double(gl) * gs * double(prm.p0) : 0.0);
  normalize_backward_inplace(dx, x, x_inv);
  normalize_backward_inplace(dy, y, self_mode ? x_inv : y_inv);
  return {grad_output_like(dx, x_in), grad_output_like(dy, y_in), dtemp};
}

}  // namespace
}  // namespace cpu
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CPU, m) {
  m.impl("anchor_lse_fwd", &flashdml::cpu::anchor_lse_fwd_cpu);
  m.impl("anchor_lse_bwd", &flashdml::cpu::anchor_lse_bwd_cpu);
}
