// Batch softmax / InfoNCE (docs/spec.md §2.1) on the CPU: one streaming pass forward (per-row and, when symmetric,
// per-column log-sum-exp), one recompute pass backward (dx = G y, dy = G^T x). Nothing B x M is stored:
// each task holds one kTileRows x kTileCols tile of S in L2.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cpu_tiles.h"
#include "flashdml/batch_softmax.h"
#include "flashdml/op_checks.h"
#include "flashdml/fast_exp.h"
#include "flashdml/online_lse.h"
#include "flashdml/poison.h"
#include "label_index.h"

namespace flashdml {
namespace cpu {
namespace {

// Dense int32 class ids of the labels (one label set: rows and columns share it). Without labels every index
// is its own class, so all pairs are allowed and the loops need no branch: allowed = i == j or ids differ.
std::vector<int32_t> class_ids(const c10::optional<at::Tensor>& labels, int64_t n) {
  if (labels.has_value()) return build_label_index(*labels, *labels).col_class;
  std::vector<int32_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = int32_t(i);
  return ids;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_softmax_fwd_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                                     const c10::optional<at::Tensor>& labels_in,
                                                                     const at::Tensor& temperature, bool symmetric,
                                                                     bool normalize) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check::batch_softmax_fwd_inputs("batch_softmax_fwd", x_in, y_in, labels_in, temperature);  // flashdml/op_checks.h
  at::Tensor x_inv, y_inv;
  const at::Tensor x = normalized_rows(x_in, normalize, &x_inv), y = normalized_rows(y_in, normalize, &y_inv);
  const int64_t B = x.size(0);
  const std::vector<int32_t> ids = class_ids(labels_in, B);
  const int32_t* labels = ids.data();
  const float inv_t = 1.f / temperature.item<float>();
  auto fopts = x.options().dtype(at::kFloat);

  at::Tensor row_lse = new_output({B}, fopts);
  at::Tensor col_lse = new_output({symmetric ? B : 0}, fopts);
  at::Tensor loss = new_output({}, fopts);
  std::vector<float> diag(B);  // z_ii

  const TaskPlan plan = plan_row_tasks(B);
  // Per-task column states (symmetric only): running max of z and sum of exp(z - max).
  std::vector<float> col_max(symmetric ? plan.num_tasks * B : 0, kNegInf);
  std::vector<float> col_sum(symmetric ? plan.num_tasks * B : 0, 0.f);
  float* row_lse_p = row_lse.data_ptr<float>();

  for_each_row_block(plan, B, [&](int64_t task, int64_t r0, int64_t r1) {
    at::Tensor scratch = at::empty({kTileRows, kTileCols}, fopts);
    std::vector<float> tmax(kTileCols), tsum(kTileCols);
    const int64_t rn = r1 - r0;
    std::vector<OnlineLse> rows(rn);
    for (int64_t c0 = 0; c0 < B; c0 += kTileCols) {
      const int64_t cn = std::min(kTileCols, B - c0);
      gemm_tile(scratch, x, r0, rn, y, c0, cn);
      const float* S = scratch.data_ptr<float>();
      for (int64_t r = 0; r < rn; ++r) {
        const int64_t i = r0 + r;
        const float* s = S + r * kTileCols;
        const int32_t li = labels[i];
        float m = kNegInf;
#pragma omp simd reduction(max : m)
        for (int64_t c = 0; c < cn; ++c) {
          const bool ok = batch_softmax_allowed(c0 + c == i, true, li, labels[c0 + c]);
          m = std::max(m, ok ? s[c] : kNegInf);
        }
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < cn; ++c) {
          const bool ok = batch_softmax_allowed(c0 + c == i, true, li, labels[c0 + c]);
          const float e = exp_poly((s[c] - m) * inv_t);
          sum += ok ? e : 0.f;
        }
        rows[r].merge(m * inv_t, sum);  // m = -inf (no allowed column in this tile) merges as a no-op
        if (i >= c0 && i < c0 + cn) diag[i] = s[i - c0] * inv_t;
      }
      if (symmetric) {
        std::fill(tmax.begin(), tmax.begin() + cn, kNegInf);
        std::fill(tsum.begin(), tsum.begin() + cn, 0.f);
        for (int64_t r = 0; r < rn; ++r) {
          const int64_t i = r0 + r;
          const float* s = S + r * kTileCols;
          const int32_t li = labels[i];
#pragma omp simd
          for (int64_t c = 0; c < cn; ++c) {
            const bool ok = batch_softmax_allowed(c0 + c == i, true, li, labels[c0 + c]);
            tmax[c] = std::max(tmax[c], ok ? s[c] : kNegInf);
          }
        }
        for (int64_t r = 0; r < rn; ++r) {
          const int64_t i = r0 + r;
          const float* s = S + r * kTileCols;
          const int32_t li = labels[i];
#pragma omp simd
          for (int64_t c = 0; c < cn; ++c) {
            const bool ok = batch_softmax_allowed(c0 + c == i, true, li, labels[c0 + c]);
            const float e = exp_poly((s[c] - tmax[c]) * inv_t);
            tsum[c] += ok ? e : 0.f;
          }
        }
        float* cm = col_max.data() + task * B + c0;
        float* cs = col_sum.data() + task * B + c0;
        for (int64_t c = 0; c < cn; ++c) {
          OnlineLse st{cm[c], cs[c]};
          st.merge(tmax[c] * inv_t, tsum[c]);  // z units; tile max of -inf (no allowed row here) merges as a no-op
          cm[c] = st.max;
          cs[c] = st.sum;
        }
      }
    }
    for (int64_t r = 0; r < rn; ++r) row_lse_p[r0 + r] = rows[r].value();
  });

  // Loss: fixed-order double sums, so the result does not depend on the thread schedule.
  double row_term = 0.0;
  for (int64_t i = 0; i < B; ++i) row_term += double(row_lse_p[i]) - double(diag[i]);
  double total = row_term / double(B);
  if (symmetric) {
    float* col_lse_p = col_lse.data_ptr<float>();
    double col_term = 0.0;
    for (int64_t j = 0; j < B; ++j) {
      OnlineLse st;
      for (int64_t t = 0; t < plan.num_tasks; ++t) st.merge(col_max[t * B + j], col_sum[t * B + j]);
      col_lse_p[j] = st.value();
      col_term += double(col_lse_p[j]) - double(diag[j]);
    }
    total = 0.5 * (total + col_term / double(B));
  }
  loss.fill_(total);
  return {loss, row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_softmax_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x_in, const at::Tensor& y_in,
    const c10::optional<at::Tensor>& labels_in, const at::Tensor& temperature, bool symmetric, bool normalize,
    const at::Tensor& row_lse_in, const at::Tensor& col_lse_in) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check::batch_softmax_bwd_inputs("batch_softmax_bwd", grad_loss, x_in, y_in, labels_in, temperature, symmetric,
                                  row_lse_in, col_lse_in);
  at::Tensor x_inv, y_inv;
  const at::Tensor x = normalized_rows(x_in, normalize, &x_inv), y = normalized_rows(y_in, normalize, &y_inv);
  const int64_t B = x.size(0), d = x.size(1);
  const std::vector<int32_t> ids = class_ids(labels_in, B);
  const int32_t* labels = ids.data();
  const float tau = temperature.item<float>();
  const float inv_t = 1.f / tau;
  const float gl = grad_loss.item<float>();
  const at::Tensor row_lse = row_lse_in.to(at::kFloat).contiguous();
  const at::Tensor col_lse = symmetric ? col_lse_in.to(at::kFloat).contiguous() : at::Tensor();
  const float* rl = row_lse.data_ptr<float>();
  const float* cl = symmetric ? col_lse.data_ptr<float>() : nullptr;
  auto fopts = x.options().dtype(at::kFloat);

  // dL/dz_ij = a/B (p_ij [allowed] - delta_ij) (+ the column term when symmetric), a = 1 or 1/2.
  const float a_over_b = batch_softmax_scale(B, symmetric);
  const float diag_term = symmetric ? 2.f * a_over_b : a_over_b;
  const float g_scale = gl * inv_t;  // G = grad_loss * dL/dz / t

  at::Tensor dx = at::zeros({B, d}, fopts), dy = at::zeros({B, d}, fopts);
  std::vector<double> gz_parts(at::get_num_threads(), 0.0);
  weighted_gradient_pass(x, y, dx, dy, [&](int64_t task, int64_t r0, int64_t rn, int64_t c0, int64_t cn, float* S,
                                           int64_t ld) {
    double gz = 0.0;
    for (int64_t r = 0; r < rn; ++r) {
      const int64_t i = r0 + r;
      float* s = S + r * ld;
      const int32_t li = labels[i];
      const float rli = rl[i];
      float gz_row = 0.f;
#pragma omp simd reduction(+ : gz_row)
      for (int64_t c = 0; c < cn; ++c) {
        const int64_t j = c0 + c;
        const bool ok = batch_softmax_allowed(j == i, true, li, labels[j]);
        const float z = s[c] * inv_t;
        float g = exp_poly(z - rli);
        if (cl != nullptr) g += exp_poly(z - cl[j]);
        g = ok ? g * a_over_b : 0.f;
        g -= j == i ? diag_term : 0.f;
        gz_row += g * z;
        s[c] = g * g_scale;
      }
      gz += gz_row;
    }
    gz_parts[task] += gz;
  });

  double gz_total = 0.0;
  for (double v : gz_parts) gz_total += v;
  at::Tensor dtemp = new_output({}, fopts);
  dtemp.fill_(-double(gl) * gz_total / double(tau));
  if (normalize) {
    normalize_backward_inplace(dx, x, x_inv);
    normalize_backward_inplace(dy, y, y_inv);
  }
  return {grad_output_like(dx, x_in), grad_output_like(dy, y_in), dtemp};
}

}  // namespace
}  // namespace cpu
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CPU, m) {
  m.impl("batch_softmax_fwd", &flashdml::cpu::batch_softmax_fwd_cpu);
  m.impl("batch_softmax_bwd", &flashdml::cpu::batch_softmax_bwd_cpu);
}
