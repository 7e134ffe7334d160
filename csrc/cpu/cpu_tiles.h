// Tiling pieces shared by the CPU kernels: how row blocks are split into tasks, per-task scratch, and the
// GEMM of one S tile. Each task owns a contiguous range of row blocks and runs its GEMMs single-threaded
// (at::mm inside at::parallel_for does not spawn threads), so the reduction of a tile happens while it is still
// in that core's L2, and partial results are combined afterwards in task order (deterministic for a given
// thread count).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <functional>
#include <vector>

#include "flashdml/poison.h"

namespace flashdml {
namespace cpu {

// Rows per S tile and columns per S tile. 128 x 512 fp32 = 256 KiB: the tile, its x rows and the y columns
// of d <= 256 fit in a 1 MiB L2 together, and a 128 x 512 x d GEMM still runs MKL near its peak.
constexpr int64_t kTileRows = 128;
constexpr int64_t kTileCols = 512;

struct TaskPlan {
  int64_t num_tasks;
  int64_t num_blocks;
  int64_t rows_per_block;
  // Row block range [first_block(t), first_block(t + 1)) of task t.
  int64_t first_block(int64_t t) const { return t * num_blocks / num_tasks; }
};

inline TaskPlan plan_row_tasks(int64_t rows, int64_t rows_per_block = kTileRows) {
  TaskPlan p;
  p.rows_per_block = rows_per_block;
  p.num_blocks = (rows + rows_per_block - 1) / rows_per_block;
  p.num_tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.num_blocks));
  return p;
}

// Runs fn(task, row_begin, row_end) for every row block, tasks in parallel, blocks of a task in order.
template <typename Fn>
void for_each_row_block(const TaskPlan& plan, int64_t rows, const Fn& fn) {
  at::parallel_for(0, plan.num_tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t b = plan.first_block(t); b < plan.first_block(t + 1); ++b) {
        int64_t r0 = b * plan.rows_per_block;
        fn(t, r0, std::min(rows, r0 + plan.rows_per_block));
      }
    }
  });
}

// S[0:rn, 0:cn] = x[r0:r0+rn] @ y[c0:c0+cn]^T into a row-major scratch buffer with leading dim kTileCols.
inline at::Tensor gemm_tile(at::Tensor& scratch, const at::Tensor& x, int64_t r0, int64_t rn, const at::Tensor& y,
                            int64_t c0, int64_t cn) {
  at::Tensor out = scratch.narrow(0, 0, rn).narrow(1, 0, cn);
  at::mm_out(out, x.narrow(0, r0, rn), y.narrow(0, c0, cn).t());
  return out;
}

// fp32, contiguous, detached from autograd (no copy when already fp32 and contiguous). Kernels run below the
// autograd key, and the out= GEMMs refuse inputs that require grad.
inline at::Tensor as_float_contiguous(const at::Tensor& t) { return t.detach().to(at::kFloat).contiguous(); }

}  // namespace cpu
}  // namespace flashdml

namespace flashdml {
namespace cpu {

// 1 / max(||a||, 1e-12) of one fp32 row, the squares summed in double (vectorised: the order is fixed by the build).
inline float inv_row_norm(const float* a, int64_t d) {
  double ss = 0.0;
#pragma omp simd reduction(+ : ss)
  for (int64_t k = 0; k < d; ++k) ss += double(a[k]) * double(a[k]);
  return 1.f / std::max(float(std::sqrt(ss)), 1e-12f);
}

// Rows scaled to unit L2 norm, x / max(||x||, 1e-12) (docs/spec.md §0), into a new fp32 tensor; inv_norm gets
// 1 / max(||x||, 1e-12) per row (the backward pass needs it). Without normalisation returns the fp32 rows.
inline at::Tensor normalized_rows(const at::Tensor& x_in, bool normalize, at::Tensor* inv_norm) {
  at::Tensor x = as_float_contiguous(x_in);
  if (!normalize) return x;
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor out = at::empty_like(x);
  *inv_norm = at::empty({n}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  float* inv = inv_norm->data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = src + r * d;
      const float s = inv_row_norm(a, d);
      inv[r] = s;
      float* o = dst + r * d;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) o[k] = a[k] * s;
    }
  });
  return out;
}

// Gradient through the normalisation, in place: g <- (g - xhat (xhat . g)) / max(||x||, 1e-12), row-wise.
inline void normalize_backward_inplace(at::Tensor& g, const at::Tensor& xhat, const at::Tensor& inv_norm) {
  const int64_t n = g.size(0), d = g.size(1);
  float* gp = g.data_ptr<float>();
  const float* xp = xhat.data_ptr<float>();
  const float* inv = inv_norm.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* gr = gp + r * d;
      const float* xr = xp + r * d;
      double dot = 0.0;
      for (int64_t k = 0; k < d; ++k) dot += double(xr[k]) * double(gr[k]);
      const float dt = float(dot), s = inv[r];
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) gr[k] = (gr[k] - xr[k] * dt) * s;
    }
  });
}

// The gradient as an output of the input's dtype: the fp32 buffer itself when the input is fp32.
inline at::Tensor grad_output_like(const at::Tensor& g32, const at::Tensor& input) {
  if (input.scalar_type() == at::kFloat) return g32;
  at::Tensor out = new_output(input.sizes(), input.options());
  out.copy_(g32);
  return out;
}

}  // namespace cpu
}  // namespace flashdml

namespace flashdml {
namespace cpu {

// The backward "weighted-gradient pass" every loss shares (docs/design.md, the streaming primitives): recompute each tile of
// S = x y^T, let `to_grad(task, r0, rn, c0, cn, tile, ld)` overwrite the tile with G = dL/dS in place, then
//   dx[r0:r0+rn] += G y[c0:c0+cn]      (rows are owned by one task: no race)
//   dy[c0:c0+cn] += G^T x[r0:r0+rn]    (per-task [kTileCols, d] partials, summed in task order per column block)
// Column blocks are the outer, serial loop so the dy partials stay one tile wide: memory is O((B + M) d) and
// the result does not depend on scheduling. dx and dy must be zero-initialised fp32 [B, d] and [M, d].
template <typename ToGrad>
void weighted_gradient_pass(const at::Tensor& x, const at::Tensor& y, at::Tensor& dx, at::Tensor& dy,
                            const ToGrad& to_grad) {
  const int64_t B = x.size(0), M = y.size(0), d = x.size(1);
  // Same tiles as the forward passes (so S tiles are recomputed bitwise identically).
  constexpr int64_t kGradTileRows = kTileRows, kGradTileCols = kTileCols;
  const TaskPlan plan = plan_row_tasks(B, kGradTileRows);
  auto fopts = x.options().dtype(at::kFloat);
  std::vector<at::Tensor> scratch(plan.num_tasks), dy_part(plan.num_tasks);
  for (int64_t t = 0; t < plan.num_tasks; ++t) {
    scratch[t] = at::empty({kGradTileRows, kGradTileCols}, fopts);
    dy_part[t] = at::empty({kGradTileCols, d}, fopts);
  }
  for (int64_t c0 = 0; c0 < M; c0 += kGradTileCols) {
    const int64_t cn = std::min(kGradTileCols, M - c0);
    const at::Tensor y_cols = y.narrow(0, c0, cn);
    at::parallel_for(0, plan.num_tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        at::Tensor part = dy_part[t].narrow(0, 0, cn);
        part.zero_();
        for (int64_t b = plan.first_block(t); b < plan.first_block(t + 1); ++b) {
          const int64_t r0 = b * plan.rows_per_block, rn = std::min(B, r0 + plan.rows_per_block) - r0;
          at::Tensor G = gemm_tile(scratch[t], x, r0, rn, y, c0, cn);
          to_grad(t, r0, rn, c0, cn, scratch[t].data_ptr<float>(), kGradTileCols);
          at::Tensor dx_rows = dx.narrow(0, r0, rn);
          at::addmm_out(dx_rows, dx_rows, G, y_cols);
          at::addmm_out(part, part, G.t(), x.narrow(0, r0, rn));
        }
      }
    });
    at::Tensor dy_cols = dy.narrow(0, c0, cn);
    for (int64_t t = 0; t < plan.num_tasks; ++t) dy_cols.add_(dy_part[t].narrow(0, 0, cn));
  }
}

}  // namespace cpu
}  // namespace flashdml
