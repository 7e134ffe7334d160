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
// Self mode (y is x) takes a symmetric path instead (self_forward / self_backward): S is symmetric, so each
// pair of 256-row blocks is multiplied once and serves both blocks' anchors, half the GEMM work.
//
// Memory: O((B + M) d) for the rows and gradients (self mode: one [B, d] partial per task), one tile per task,
// and O(sum_a |P_a|) for the positive lists (3 per anchor with 4 per class).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_tiles.h"
#include "flashdml/op_checks.h"
#include "flashdml/poison.h"
#include "label_index.h"
#include "triplet_rows.h"

namespace flashdml {
namespace cpu {
namespace {

using namespace triplet;  // triplet_rows.h

// ---- self mode (y is x): S is symmetric, so each pair of row blocks {I, J}, I <= J, is multiplied once and
// serves the anchors of I (the tile's rows) and those of J (its transpose): half the GEMM work of the general
// path, forward and backward. The pairs are split into contiguous ranges, one per task, partials combined in
// task order (deterministic for a given thread count).
constexpr int64_t kSymBlock = 256;

struct SymPlan {
  std::vector<std::pair<int64_t, int64_t>> pairs;  // (I, J), I <= J
  int64_t num_tasks = 1;
  int64_t first(int64_t t) const { return t * int64_t(pairs.size()) / num_tasks; }
};

SymPlan plan_symmetric(int64_t B) {
  SymPlan sp;
  const int64_t nb = (B + kSymBlock - 1) / kSymBlock;
  for (int64_t I = 0; I < nb; ++I)
    for (int64_t J = I; J < nb; ++J) sp.pairs.emplace_back(I, J);
  sp.num_tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), int64_t(sp.pairs.size())));
  return sp;
}

// Runs fn(task, i0, rn, j0, cn, S, St) for every block pair with S = x_I x_J^T [rn, cn] and, off the diagonal
// (I != J), St = S^T [cn, rn], both with leading dimension kSymBlock.
template <typename Fn>
void for_each_block_pair(const SymPlan& sp, const at::Tensor& x, const Fn& fn) {
  const int64_t B = x.size(0);
  at::parallel_for(0, sp.num_tasks, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor S = at::empty({kSymBlock, kSymBlock}, x.options());
    at::Tensor St = at::empty({kSymBlock, kSymBlock}, x.options());
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t k = sp.first(t); k < sp.first(t + 1); ++k) {
        const int64_t i0 = sp.pairs[k].first * kSymBlock, j0 = sp.pairs[k].second * kSymBlock;
        const int64_t rn = std::min(kSymBlock, B - i0), cn = std::min(kSymBlock, B - j0);
        gemm_tile(S, x, i0, rn, x, j0, cn);
        float* s = S.data_ptr<float>();
        float* st = St.data_ptr<float>();
        if (i0 != j0) {
          for (int64_t i = 0; i < rn; ++i)
            for (int64_t j = 0; j < cn; ++j) st[j * kSymBlock + i] = s[i * kSymBlock + j];
        }
        fn(t, i0, rn, j0, cn, s, i0 != j0 ? st : nullptr);
      }
    }
  });
}

TripletStats self_forward(const TripletSetup& p) {
  const SymPlan sp = plan_symmetric(p.x.size(0));
  std::vector<TripletStats> parts(sp.num_tasks);
  const int32_t* cls = p.classes.col_class.data();
  auto rows = [&](TripletStats& st, float* tile, int64_t a0, int64_t an, int64_t c0, int64_t cn) {
    for (int64_t a = a0; a < a0 + an; ++a) {
      if (p.pos_ptr[a] == p.pos_ptr[a + 1]) continue;
      float* dn = tile + (a - a0) * kSymBlock;
      distances_in_place(dn, cn, p.x_sq[a], p.x_sq.data() + c0);
      row_stats(p, a, dn, cls + c0, cn, st);
    }
  };
  for_each_block_pair(sp, p.x, [&](int64_t t, int64_t i0, int64_t rn, int64_t j0, int64_t cn, float* S, float* St) {
    rows(parts[t], S, i0, rn, j0, cn);
    if (St != nullptr) rows(parts[t], St, j0, cn, i0, rn);
  });
  TripletStats total;
  for (const TripletStats& st : parts) {
    total.sum += st.sum;
    total.count += st.count;
  }
  return total;
}

// dL/dx^ [B, d] (fp32, before the normalisation's backward) in self mode. Per block pair the two orientations'
// gradient tiles combine into H = G_IJ + G_JI^T, so that d_I += H x_J - rowsum(H) x_I and d_J += H^T x_I -
// colsum(H) x_J (on the diagonal H = G_II + G_II^T and only the first); then the anchor-positive terms.
at::Tensor self_backward(const TripletSetup& p, float s) {
  const int64_t B = p.x.size(0), d = p.x.size(1);
  const SymPlan sp = plan_symmetric(B);
  const int64_t T = sp.num_tasks;
  std::vector<at::Tensor> part(T);
  for (int64_t t = 0; t < T; ++t) part[t] = at::zeros({B, d}, p.x.options());
  std::vector<std::vector<double>> coef(T, std::vector<double>(B, 0.0));
  std::vector<std::vector<double>> pos_act(T, std::vector<double>(p.pos_ptr[B], 0.0));
  std::vector<std::vector<float>> na(T, std::vector<float>(kSymBlock));
  const int32_t* cls = p.classes.col_class.data();
  auto rows = [&](int64_t t, float* tile, int64_t a0, int64_t an, int64_t c0, int64_t cn) {
    for (int64_t a = a0; a < a0 + an; ++a) {
      float* g = tile + (a - a0) * kSymBlock;
      if (p.pos_ptr[a] == p.pos_ptr[a + 1]) {
        std::fill(g, g + cn, 0.f);
        continue;
      }
      distances_in_place(g, cn, p.x_sq[a], p.x_sq.data() + c0);
      row_grad(p, a, g, cls + c0, cn, s, na[t].data(), pos_act[t].data());
    }
  };
  for_each_block_pair(sp, p.x, [&](int64_t t, int64_t i0, int64_t rn, int64_t j0, int64_t cn, float* S, float* St) {
    rows(t, S, i0, rn, j0, cn);
    constexpr int64_t K = kSymBlock;
    if (St != nullptr) {
      rows(t, St, j0, cn, i0, rn);
      for (int64_t i = 0; i < rn; ++i)
        for (int64_t j = 0; j < cn; ++j) S[i * K + j] += St[j * K + i];
    } else {
      for (int64_t i = 0; i < rn; ++i) {
        S[i * K + i] *= 2.f;
        for (int64_t j = i + 1; j < cn; ++j) S[i * K + j] = S[j * K + i] = S[i * K + j] + S[j * K + i];
      }
    }
    double* cf = coef[t].data();
    for (int64_t i = 0; i < rn; ++i) {
      double r = 0.0;
#pragma omp simd reduction(+ : r)
      for (int64_t j = 0; j < cn; ++j) r += S[i * K + j];
      cf[i0 + i] += r;
    }
    if (St != nullptr) {
      for (int64_t i = 0; i < rn; ++i)
        for (int64_t j = 0; j < cn; ++j) cf[j0 + j] += S[i * K + j];
    }
    at::Tensor scratch = at::from_blob(S, {rn, cn}, {K, 1}, p.x.options());
    at::Tensor dI = part[t].narrow(0, i0, rn);
    at::addmm_out(dI, dI, scratch, p.x.narrow(0, j0, cn));
    if (St != nullptr) {
      at::Tensor dJ = part[t].narrow(0, j0, cn);
      at::addmm_out(dJ, dJ, scratch.t(), p.x.narrow(0, i0, rn));
    }
  });

  at::Tensor grad = part[0];
  for (int64_t t = 1; t < T; ++t) grad.add_(part[t]);
  float* gp = grad.data_ptr<float>();
  const float* xp = p.x.data_ptr<float>();
  at::parallel_for(0, B, row_grain(d), [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      double c = 0.0;
      for (int64_t t = 0; t < T; ++t) c += coef[t][a];
      const float cf = static_cast<float>(c);
      float* g = gp + a * d;
      const float* u = xp + a * d;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) g[k] -= cf * u[k];
    }
  });
  for (int64_t a = 0; a < B; ++a) {  // serial: a positive pair writes both of its rows
    const float* u = xp + a * d;
    for (int64_t q = p.pos_ptr[a]; q < p.pos_ptr[a + 1]; ++q) {
      double n_act = 0.0;
      for (int64_t t = 0; t < T; ++t) n_act += pos_act[t][q];
      if (n_act == 0.0 || p.pos_dist[q] == 0.f) continue;
      const float w = static_cast<float>(n_act * double(s) / double(p.pos_dist[q]));
      const float* v = xp + p.pos_col[q] * d;
      float* ga = gp + a * d;
      float* gb = gp + p.pos_col[q] * d;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) {
        const float diff = w * (u[k] - v[k]);
        ga[k] += diff;
        gb[k] -= diff;
      }
    }
  }
  return grad;
}

// The symmetric path needs y = x (the glue passes the same tensor; an equal copy, e.g. a strided view of the
// same values, takes it too, so the outputs do not depend on the layout). Self mode with other rows of the same
// shape runs the general path.
bool symmetric_self_mode(const at::Tensor& x, const at::Tensor& y, bool self_mode) {
  return self_mode && (x.is_same(y) || at::equal(x, y));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_fwd_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                               const at::Tensor& labels, const at::Tensor& ref_labels,
                                                               double margin, bool self_mode) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check::triplet_fwd_inputs("triplet_fwd", x_in, y_in, labels, ref_labels, self_mode);  // op_checks.h
  const TripletSetup p = make_setup(x_in, y_in, labels, ref_labels, margin, self_mode);
  const int64_t B = p.x.size(0), M = p.y.size(0);
  auto fopts = p.x.options().dtype(at::kFloat);

  const bool symmetric = symmetric_self_mode(x_in, y_in, self_mode);
  const TaskPlan plan = plan_row_tasks(B);
  std::vector<TripletStats> parts(plan.num_tasks);
  if (symmetric && p.pos_ptr[B] > 0) {
    parts.assign(1, self_forward(p));
  } else if (p.pos_ptr[B] > 0) {  // no positive pair: no triplet, nothing to stream
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
          row_stats(p, a, dn, col, cn, parts[task]);
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
  if (symmetric_self_mode(x_in, y_in, self_mode)) {
    at::Tensor g = self_backward(p, s);
    normalize_backward_inplace(g, p.x, p.x_inv);
    return {grad_output_like(g, x_in), grad_output_like(dy, y_in)};
  }
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
      row_grad(p, a, g, col, cn, s, na, pos_active.data());
      double rs = 0.0;
#pragma omp simd reduction(+ : rs)
      for (int64_t c = 0; c < cn; ++c) {
        rs += g[c];
        cs[c] += g[c];
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
  at::parallel_for(0, B, row_grain(d), [&](int64_t a0, int64_t a1) {
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
  at::parallel_for(0, M, row_grain(d), [&](int64_t j0, int64_t j1) {
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
