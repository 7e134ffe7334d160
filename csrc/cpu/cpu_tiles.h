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
#include <functional>

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
