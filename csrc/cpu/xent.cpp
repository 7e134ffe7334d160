// Cross-example softmax (docs/spec.md §2.2) and NT-Xent (docs/spec.md §2.1b) on the CPU. Both are
//   L = (1/|P|) sum_{p in P} softplus(lse(p) - z_p),
// where lse(p) is the log-sum-exp of z over the negatives of the whole batch (XE: one global partition) or of
// p's row (NT-Xent). Forward: one streaming pass over S tiles computes every row's negative LSE and keeps the
// positive logits (O(|P|) floats: positives are the sparse part of S); the global LSE merges the row states in
// row order, so the result is bit-identical run to run. Backward: one recompute pass (weighted_gradient_pass)
// with dL/dz = -sigmoid(lse - z_p) / |P| on positives and c * exp(z_n - lse) on negatives, where
// c = sum_p sigmoid(lse(p) - z_p) / |P| (global for XE, per row for NT-Xent) comes from the forward.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "cpu_tiles.h"
#include "flashdml/op_checks.h"
#include "flashdml/fast_exp.h"
#include "flashdml/online_lse.h"
#include "flashdml/poison.h"
#include "label_index.h"

namespace flashdml {
namespace cpu {
namespace {

inline double softplus(double v) { return v > 0 ? v + std::log1p(std::exp(-v)) : std::log1p(std::exp(v)); }
inline double sigmoid(double v) { return v >= 0 ? 1.0 / (1.0 + std::exp(-v)) : std::exp(v) / (1.0 + std::exp(v)); }

struct PositiveLogit {
  int64_t row;
  float z;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> xent_fwd_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                            const at::Tensor& labels, const at::Tensor& ref_labels,
                                                            const at::Tensor& temperature, bool global_partition,
                                                            bool self_mode, bool normalize) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check::xent_fwd_inputs("xent_fwd", x_in, y_in, labels, ref_labels, temperature, self_mode);  // flashdml/op_checks.h
  at::Tensor x_inv, y_inv;
  const at::Tensor x = normalized_rows(x_in, normalize, &x_inv);
  const at::Tensor y = self_mode ? x : normalized_rows(y_in, normalize, &y_inv);
  const int64_t B = x.size(0), M = y.size(0);
  const float inv_t = 1.f / temperature.item<float>();
  const LabelIndex lab = build_label_index(labels, ref_labels);
  const int32_t* col_class = lab.col_class.data();
  auto fopts = x.options().dtype(at::kFloat);

  std::vector<OnlineLse> row_state(B);
  const TaskPlan plan = plan_row_tasks(B);
  std::vector<std::vector<PositiveLogit>> positives(plan.num_tasks);

  for_each_row_block(plan, B, [&](int64_t task, int64_t r0, int64_t r1) {
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
        for (int64_t c = 0; c < cn; ++c) m = std::max(m, cc[c] != rc ? s[c] : kNegInf);
        if (m != kNegInf) {
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t c = 0; c < cn; ++c) {
            const float e = exp_poly((s[c] - m) * inv_t);
            sum += cc[c] != rc ? e : 0.f;
          }
          row_state[i].merge(m * inv_t, sum);
        }
        auto [pb, pe] = lab.positives_in(i, c0, c0 + cn);
        for (const int64_t* p = pb; p != pe; ++p) {
          if (self_mode && *p == i) continue;
          positives[task].push_back({i, s[*p - c0] * inv_t});
        }
      }
    }
  });

  at::Tensor lse = new_output({global_partition ? 1 : B}, fopts);
  at::Tensor coef = new_output({global_partition ? 1 : B}, fopts);
  at::Tensor loss = new_output({}, fopts);
  float* lse_p = lse.data_ptr<float>();
  float* coef_p = coef.data_ptr<float>();
  if (global_partition) {
    OnlineLse all;
    for (int64_t i = 0; i < B; ++i) all.merge(row_state[i]);
    lse_p[0] = all.value();
    coef_p[0] = 0.f;
  } else {
    for (int64_t i = 0; i < B; ++i) {
      lse_p[i] = row_state[i].value();
      coef_p[i] = 0.f;
    }
  }
  int64_t num_pos = 0;
  for (const auto& v : positives) num_pos += int64_t(v.size());
  double total = 0.0, coef_global = 0.0;
  std::vector<double> coef_rows(global_partition ? 0 : B, 0.0);
  for (const auto& v : positives) {  // tasks own increasing row ranges: row order, then column order
    for (const PositiveLogit& p : v) {
      const float l = global_partition ? lse_p[0] : lse_p[p.row];
      if (l == kNegInf) continue;  // no negative: softplus(-inf) = 0, no gradient
      const double u = double(l) - double(p.z);
      total += softplus(u);
      if (global_partition) coef_global += sigmoid(u); else coef_rows[p.row] += sigmoid(u);
    }
  }
  const double inv_p = num_pos > 0 ? 1.0 / double(num_pos) : 0.0;
  if (global_partition) coef_p[0] = float(coef_global * inv_p);
  else for (int64_t i = 0; i < B; ++i) coef_p[i] = float(coef_rows[i] * inv_p);
  loss.fill_(total * inv_p);
  return {loss, lse, coef};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> xent_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& x_in,
                                                            const at::Tensor& y_in, const at::Tensor& labels,
                                                            const at::Tensor& ref_labels, const at::Tensor& temperature,
                                                            bool global_partition, bool self_mode, bool normalize,
                                                            const at::Tensor& lse_in, const at::Tensor& coef_in) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check::xent_bwd_inputs("xent_bwd", grad_loss, x_in, y_in, labels, ref_labels, temperature, global_partition,
                         self_mode, lse_in, coef_in);
  at::Tensor x_inv, y_inv;
  const at::Tensor x = normalized_rows(x_in, normalize, &x_inv);
  const at::Tensor y = self_mode ? x : normalized_rows(y_in, normalize, &y_inv);
  const int64_t B = x.size(0), M = y.size(0), d = x.size(1);
  const float tau = temperature.item<float>(), inv_t = 1.f / tau;
  const float gl = grad_loss.item<float>();
  const LabelIndex lab = build_label_index(labels, ref_labels);
  const int32_t* col_class = lab.col_class.data();
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous(), coef = coef_in.to(at::kFloat).contiguous();
  const float* lse_p = lse.data_ptr<float>();
  const float* coef_p = coef.data_ptr<float>();
  const int64_t num_pos = lab.num_positive_pairs(self_mode);
  const float inv_p = num_pos > 0 ? float(1.0 / double(num_pos)) : 0.f;
  const float g_scale = gl * inv_t;  // G = grad_loss * dL/dz / t
  auto fopts = x.options().dtype(at::kFloat);

  at::Tensor dx = at::zeros({B, d}, fopts), dy = at::zeros({M, d}, fopts);
  std::vector<double> gz_parts(at::get_num_threads(), 0.0);
  weighted_gradient_pass(x, y, dx, dy, [&](int64_t task, int64_t r0, int64_t rn, int64_t c0, int64_t cn, float* S,
                                           int64_t ld) {
    double gz = 0.0;
    std::vector<std::pair<int64_t, float>> pos_grad;  // (column in tile, dL/dz) of this row's positives
    for (int64_t r = 0; r < rn; ++r) {
      const int64_t i = r0 + r;
      float* s = S + r * ld;
      const int32_t rc = lab.row_class[i];
      const int32_t* cc = col_class + c0;
      const float l = global_partition ? lse_p[0] : lse_p[i];
      const float c_row = global_partition ? coef_p[0] : coef_p[i];
      if (l == kNegInf || num_pos == 0) {  // no negative in the partition, or no positive: no gradient
        std::fill(s, s + cn, 0.f);
        continue;
      }
      // Positives first (sparse), while the tile still holds their S values.
      pos_grad.clear();
      auto [pb, pe] = lab.positives_in(i, c0, c0 + cn);
      for (const int64_t* p = pb; p != pe; ++p) {
        if (self_mode && *p == i) continue;
        const float z = s[*p - c0] * inv_t;
        const float g = -float(sigmoid(double(l) - double(z))) * inv_p;
        gz += double(g) * double(z);
        pos_grad.emplace_back(*p - c0, g * g_scale);
      }
      // Negatives (dense, vectorised); positives and the self pair get 0 here.
      float gz_row = 0.f;
#pragma omp simd reduction(+ : gz_row)
      for (int64_t c = 0; c < cn; ++c) {
        const float z = s[c] * inv_t;
        const float g = cc[c] != rc ? c_row * exp_poly(z - l) : 0.f;
        gz_row += g * z;
        s[c] = g * g_scale;
      }
      gz += gz_row;
      for (const auto& [c, g] : pos_grad) s[c] = g;
    }
    gz_parts[task] += gz;
  });

  double gz_total = 0.0;
  for (double v : gz_parts) gz_total += v;
  at::Tensor dtemp = new_output({}, fopts);
  dtemp.fill_(-double(gl) * gz_total / double(tau));
  if (normalize) {
    normalize_backward_inplace(dx, x, x_inv);
    normalize_backward_inplace(dy, y, self_mode ? x_inv : y_inv);
  }
  return {grad_output_like(dx, x_in), grad_output_like(dy, y_in), dtemp};
}

}  // namespace
}  // namespace cpu
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CPU, m) {
  m.impl("xent_fwd", &flashdml::cpu::xent_fwd_cpu);
  m.impl("xent_bwd", &flashdml::cpu::xent_bwd_cpu);
}
