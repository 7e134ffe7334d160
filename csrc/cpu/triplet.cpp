// Triplet margin loss over every triplet of the batch on the CPU (docs/spec.md §6.4): pytorch-metric-learning's
// TripletMarginLoss with LpDistance on normalised rows and AvgNonZeroReducer,
//   L = sum over (a, p, n) of [d_ap - d_an + margin]_+  /  #{(a, p, n) : d_ap - d_an + margin > 0}.
//
// The anchor-positive distances are few (|P_a| per anchor): they are computed first, from the row differences
// (exact 0 for equal rows), into a CSR list next to the label index. The forward then streams the S tiles once:
// each tile row becomes the anchor's distances to the tile's columns, d = sqrt(max(|x_a|^2 + |y_n|^2 - 2 S, 0)),
// and every negative column meets the anchor's |P_a| positives (a short loop per column, vectorised over the
// columns) — O(B M d) GEMM work plus O(M sum_a |P_a|) hinge tests, never the triplet list.
//
// Backward (one recompute pass, weighted_gradient_pass): dL/dd_an = -#{p : active}/count, so the tile becomes
// G_an = #{p : active} s / d_an (s = grad / count; 0 where d_an = 0, torch's cdist subgradient) and
//   dx_a += G y - (sum_n G_an) x_a,    dy_n += G^T x - (sum_a G_an) y_n.
// dL/dd_ap = #{n : active}/count is counted per positive pair during the same pass and applied afterwards from
// the differences x_a - y_p. Forward and backward compute the same tiles with the same gemm_tile calls, so the
// fp32 hinge tests see bitwise the same values and the backward counts exactly the forward's triplets.
//
// Memory: O((B + M) d) for the rows and gradients, one kTileRows x kTileCols tile per task, and O(sum_a |P_a|)
// for the positive lists (3 per anchor with 4 per class).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_tiles.h"
#include "flashdml/op_checks.h"
#include "flashdml/poison.h"
#include "label_index.h"

namespace flashdml {
namespace cpu {
namespace {

struct TripletSetup {
  at::Tensor x, y;                // normalised fp32 rows, contiguous; y is x itself in self mode
  at::Tensor x_inv, y_inv;        // 1 / max(|row|, 1e-12)
  std::vector<float> x_sq, y_sq;  // |x^_i|^2, |y^_j|^2 (fp32 of a double sum)
  LabelIndex classes;
  std::vector<int64_t> pos_ptr;   // [B + 1]: anchor a's positives are pos_col[pos_ptr[a] .. pos_ptr[a + 1])
  std::vector<int64_t> pos_col;
  std::vector<float> pos_dist;    // d_ap = |x^_a - y^_p|
  float margin;
};

std::vector<float> squared_norms(const at::Tensor& rows) {
  const int64_t n = rows.size(0), d = rows.size(1);
  std::vector<float> out(n);
  const float* p = rows.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double ss = 0.0;
      const float* a = p + r * d;
#pragma omp simd reduction(+ : ss)
      for (int64_t k = 0; k < d; ++k) ss += double(a[k]) * double(a[k]);
      out[r] = float(ss);
    }
  });
  return out;
}

// Call check::triplet_fwd_inputs (or _bwd_inputs) first.
TripletSetup make_setup(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& labels,
                        const at::Tensor& ref_labels, double margin, bool self_mode) {
  TripletSetup s;
  s.x = normalized_rows(x_in, true, &s.x_inv);
  if (x_in.is_same(y_in)) {
    s.y = s.x;
    s.y_inv = s.x_inv;
  } else {
    s.y = normalized_rows(y_in, true, &s.y_inv);
  }
  s.x_sq = squared_norms(s.x);
  s.y_sq = x_in.is_same(y_in) ? s.x_sq : squared_norms(s.y);
  s.classes = build_label_index(labels, ref_labels);
  s.margin = static_cast<float>(margin);

  const int64_t B = s.x.size(0), d = s.x.size(1);
  s.pos_ptr.assign(B + 1, 0);
  for (int64_t a = 0; a < B; ++a) {
    const int32_t c = s.classes.row_class[a];
    int64_t n = c < 0 ? 0 : s.classes.class_start[c + 1] - s.classes.class_start[c];
    if (self_mode && c >= 0) --n;  // (a, a) is not a positive in self mode
    s.pos_ptr[a + 1] = s.pos_ptr[a] + n;
  }
  s.pos_col.resize(s.pos_ptr[B]);
  s.pos_dist.resize(s.pos_ptr[B]);
  const float* xp = s.x.data_ptr<float>();
  const float* yp = s.y.data_ptr<float>();
  at::parallel_for(0, B, 64, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      const int32_t c = s.classes.row_class[a];
      if (c < 0) continue;
      int64_t q = s.pos_ptr[a];
      for (int64_t k = s.classes.class_start[c]; k < s.classes.class_start[c + 1]; ++k) {
        const int64_t p = s.classes.cols_by_class[k];
        if (self_mode && p == a) continue;
        const float* u = xp + a * d;
        const float* v = yp + p * d;
        double ss = 0.0;
#pragma omp simd reduction(+ : ss)
        for (int64_t t = 0; t < d; ++t) {
          const double diff = double(u[t]) - double(v[t]);
          ss += diff * diff;
        }
        s.pos_col[q] = p;
        s.pos_dist[q] = float(std::sqrt(ss));
        ++q;
      }
    }
  });
  return s;
}

// Tile row -> the anchor's distances to the tile's columns, in place: sqrt(max(|x_a|^2 + |y_j|^2 - 2 s, 0)).
inline void distances_in_place(float* s, int64_t cn, float xa_sq, const float* y_sq) {
#pragma omp simd
  for (int64_t c = 0; c < cn; ++c) s[c] = std::sqrt(std::max(xa_sq + y_sq[c] - 2.f * s[c], 0.f));
}

// The hinge of one triplet in fp32, written once so that forward and backward evaluate the same expression.
inline float hinge(float d_ap, float d_an, float margin) { return (d_ap - d_an) + margin; }

struct TripletStats {
  double sum = 0.0;
  int64_t count = 0;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_fwd_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                               const at::Tensor& labels, const at::Tensor& ref_labels,
                                                               double margin, bool self_mode) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check::triplet_fwd_inputs("triplet_fwd", x_in, y_in, labels, ref_labels, self_mode);  // op_checks.h
  const TripletSetup p = make_setup(x_in, y_in, labels, ref_labels, margin, self_mode);
  const int64_t B = p.x.size(0), M = p.y.size(0);
  auto fopts = p.x.options().dtype(at::kFloat);

  const TaskPlan plan = plan_row_tasks(B);
  std::vector<TripletStats> parts(plan.num_tasks);
  if (p.pos_ptr[B] > 0) {  // no positive pair: no triplet, nothing to stream
    for_each_row_block(plan, B, [&](int64_t task, int64_t r0, int64_t r1) {
      at::Tensor scratch = at::empty({kTileRows, kTileCols}, fopts);
      float* S = scratch.data_ptr<float>();
      for (int64_t c0 = 0; c0 < M; c0 += kTileCols) {
        const int64_t cn = std::min(kTileCols, M - c0);
        gemm_tile(scratch, p.x, r0, r1 - r0, p.y, c0, cn);
        const int32_t* col = p.classes.col_class.data() + c0;
        for (int64_t a = r0; a < r1; ++a) {
          const int64_t q0 = p.pos_ptr[a], q1 = p.pos_ptr[a + 1];
          if (q0 == q1) continue;
          float* dn = S + (a - r0) * kTileCols;
          distances_in_place(dn, cn, p.x_sq[a], p.y_sq.data() + c0);
          const int32_t ca = p.classes.row_class[a];
          double sum = 0.0, cnt = 0.0;  // cnt exact in a double (<= kTileCols * |P_a| per row and tile)
          for (int64_t q = q0; q < q1; ++q) {
            const float dap = p.pos_dist[q];
#pragma omp simd reduction(+ : sum, cnt)
            for (int64_t c = 0; c < cn; ++c) {
              const float h = hinge(dap, dn[c], p.margin);
              const bool active = (col[c] != ca) & (h > 0.f);
              sum += active ? double(h) : 0.0;
              cnt += active ? 1.0 : 0.0;
            }
          }
          parts[task].sum += sum;
          parts[task].count += static_cast<int64_t>(cnt);
        }
      }
    });
  }
  TripletStats total;  // in task order: deterministic for a given thread count
  for (const TripletStats& st : parts) {
    total.sum += st.sum;
    total.count += st.count;
  }
  at::Tensor loss = new_output({}, fopts);
  at::Tensor sums = new_output({1}, fopts);
  at::Tensor counts = new_output({1}, fopts.dtype(at::kLong));
  loss.fill_(total.count > 0 ? total.sum / double(total.count) : 0.0);
  sums.fill_(total.sum);
  counts.fill_(total.count);
  return {loss, sums, counts};
}

std::tuple<at::Tensor, at::Tensor> triplet_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& x_in,
                                                   const at::Tensor& y_in, const at::Tensor& labels,
                                                   const at::Tensor& ref_labels, double margin, bool self_mode,
                                                   const at::Tensor& counts_in) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check::triplet_bwd_inputs("triplet_bwd", grad_loss, x_in, y_in, labels, ref_labels, self_mode, counts_in);
  const int64_t count = counts_in.to(at::kLong).contiguous().data_ptr<int64_t>()[0];
  const double gl = grad_loss.item<double>();
  auto fopts = x_in.options().dtype(at::kFloat);
  at::Tensor dx = at::zeros(x_in.sizes(), fopts), dy = at::zeros(y_in.sizes(), fopts);
  if (!std::isfinite(gl)) {  // (the glue's non-finite rule sends NaN upstream): NaN everywhere, not a partial 0
    dx.fill_(std::numeric_limits<float>::quiet_NaN());
    dy.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  if (count == 0 || gl == 0.0 || !std::isfinite(gl)) {
    return {grad_output_like(dx, x_in), grad_output_like(dy, y_in)};
  }

  const TripletSetup p = make_setup(x_in, y_in, labels, ref_labels, margin, self_mode);
  const int64_t B = p.x.size(0), M = p.y.size(0), d = p.x.size(1);
  const float s = static_cast<float>(gl / double(count));
  const int64_t num_tasks = plan_row_tasks(B).num_tasks;  // the plan weighted_gradient_pass makes
  std::vector<double> row_sum(B, 0.0);                    // sum_n G_an (rows are owned by one task)
  std::vector<std::vector<double>> col_sum(num_tasks, std::vector<double>(M, 0.0));  // sum_a G_an per task
  std::vector<std::vector<float>> n_active(num_tasks, std::vector<float>(kTileCols));  // #{p : active} per column
  std::vector<double> pos_active(p.pos_ptr[B], 0.0);      // #{n : active} per positive pair (exact in a double)

  weighted_gradient_pass(p.x, p.y, dx, dy, [&](int64_t task, int64_t r0, int64_t rn, int64_t c0, int64_t cn,
                                               float* S, int64_t ld) {
    const int32_t* col = p.classes.col_class.data() + c0;
    float* na = n_active[task].data();
    double* cs = col_sum[task].data() + c0;
    for (int64_t a = r0; a < r0 + rn; ++a) {
      float* g = S + (a - r0) * ld;
      const int64_t q0 = p.pos_ptr[a], q1 = p.pos_ptr[a + 1];
      if (q0 == q1) {
        std::fill(g, g + cn, 0.f);
        continue;
      }
      distances_in_place(g, cn, p.x_sq[a], p.y_sq.data() + c0);
      const int32_t ca = p.classes.row_class[a];
      std::fill(na, na + cn, 0.f);
      for (int64_t q = q0; q < q1; ++q) {
        const float dap = p.pos_dist[q];
        double cnt = 0.0;
#pragma omp simd reduction(+ : cnt)
        for (int64_t c = 0; c < cn; ++c) {
          const bool active = (col[c] != ca) & (hinge(dap, g[c], p.margin) > 0.f);
          na[c] += active ? 1.f : 0.f;
          cnt += active ? 1.0 : 0.0;
        }
        pos_active[q] += cnt;
      }
      double rs = 0.0;
      for (int64_t c = 0; c < cn; ++c) {
        const float w = (na[c] > 0.f && g[c] > 0.f) ? na[c] * s / g[c] : 0.f;  // d_an = 0: subgradient 0
        g[c] = w;
        rs += w;
        cs[c] += w;
      }
      row_sum[a] += rs;
    }
  });

  // dx_a -= (sum_n G_an) x_a, dy_n -= (sum_a G_an) y_n; then the anchor-positive terms
  // dL/dd_ap / d_ap * (x_a - y_p) into dx_a and its negative into dy_p.
  float* dxp = dx.data_ptr<float>();
  float* dyp = dy.data_ptr<float>();
  const float* xp = p.x.data_ptr<float>();
  const float* yp = p.y.data_ptr<float>();
  at::parallel_for(0, B, 64, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      float* g = dxp + a * d;
      const float* u = xp + a * d;
      const float r = static_cast<float>(row_sum[a]);
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) g[k] -= r * u[k];
      for (int64_t q = p.pos_ptr[a]; q < p.pos_ptr[a + 1]; ++q) {
        if (pos_active[q] == 0.0 || p.pos_dist[q] == 0.f) continue;
        const float w = static_cast<float>(pos_active[q] * double(s) / double(p.pos_dist[q]));
        const float* v = yp + p.pos_col[q] * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) g[k] += w * (u[k] - v[k]);
      }
    }
  });
  at::parallel_for(0, M, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      double c = 0.0;
      for (int64_t t = 0; t < num_tasks; ++t) c += col_sum[t][j];
      float* g = dyp + j * d;
      const float* v = yp + j * d;
      const float cf = static_cast<float>(c);
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) g[k] -= cf * v[k];
    }
  });
  for (int64_t a = 0; a < B; ++a) {  // serial: positives of different anchors share columns
    const float* u = xp + a * d;
    for (int64_t q = p.pos_ptr[a]; q < p.pos_ptr[a + 1]; ++q) {
      if (pos_active[q] == 0.0 || p.pos_dist[q] == 0.f) continue;
      const float w = static_cast<float>(pos_active[q] * double(s) / double(p.pos_dist[q]));
      float* g = dyp + p.pos_col[q] * d;
      const float* v = yp + p.pos_col[q] * d;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) g[k] += w * (v[k] - u[k]);
    }
  }
  normalize_backward_inplace(dx, p.x, p.x_inv);
  normalize_backward_inplace(dy, p.y, p.y_inv);
  return {grad_output_like(dx, x_in), grad_output_like(dy, y_in)};
}

}  // namespace
}  // namespace cpu
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CPU, m) {
  m.impl("triplet_fwd", &flashdml::cpu::triplet_fwd_cpu);
  m.impl("triplet_bwd", &flashdml::cpu::triplet_bwd_cpu);
}
