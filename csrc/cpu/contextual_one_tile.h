// Small batches of the CPU contextual loss (docs/spec.md §2.5): for B <= kOneTileRows, S = F Fᵀ has at most
// kTileRows · kTileCols entries — the size of the one tile scratch the streaming pass allocates anyway — so the
// query expansion Z and the B x B pieces of the closed-form gradient are held densely instead of going through the
// sparse structures of contextual_sparse.h / contextual_backward.h, whose bookkeeping (sorted merges, sparse
// accumulators, transposes, parallel row tasks) costs more than the arithmetic at this size. Neighbourhoods are
// rows of bits, so |N(i) ∩ N(j)| is a popcount over B/64 words. Memory: three B x B doubles and one B x B float at
// most (1.75 MiB at B = 256), a constant bound, not a B² growth.
//
//  * DenseContext: a = |N|, c = B − a, R, r = |R|, W on the entries of N and Z = (1/r) R W, dense (steps 4-7; Z is
//    summed in the order build_context uses, so both paths give the same Z);
//  * dense_l_ctx: L_ctx = (1/B²) Σ_{i≠j} (y_ij − ½(Z_ij + Z_ji))² (step 8);
//  * dense_ctx_grad: dF += s_ctx (A + Aᵀ) F with A = C ⊙ (GN + GP) of docs/spec.md's closed form, every term (the
//    row-constant, the label block and the clamp mask included), applied with one GEMM.
//
// Large dense path (kOneTileRows < B <= kDenseMaxRows, chosen by use_dense): when the ε-bands are wide (e.g. many
// duplicate rows) the sparse stage costs O(Σ_i Σ_{j∈N(i)} |N(j)|), up to B·|band|², while the same structures held
// densely cost O(B³) in GEMMs. The same three functions then run their B³ products as double GEMMs (Z = D_r R W;
// GW = R D_r G; GR = G Wᵀ; (K + Kᵀ) N only when many entries are clamped, otherwise applied to the rows in
// O(B²·d)) and their B² passes in parallel 64 x 64 tiles; the arithmetic of the B <= kOneTileRows path is
// untouched. Memory: at most three B x B doubles live at once (plus bit rows and one
// B x B float): 28·B² bytes, 1.75 GiB at B = 8192 and 7 GiB at B = 16384, the cap (a third of the ~84·B² bytes the
// dense reference needs, which does not fit a 24 GiB machine above it); above the cap the sparse stage always runs.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>
#include <vector>

#include "contextual_grad.h"
#include "contextual_sparse.h"
#include "cpu_tiles.h"
#include "flashdml/contextual.h"

namespace flashdml {
namespace cpu {
namespace ctx {

constexpr int64_t kOneTileRows = 256;
static_assert(kOneTileRows * kOneTileRows <= kTileRows * kTileCols, "the one-tile batch must fit the tile scratch");
inline bool one_tile(int64_t B) { return B <= kOneTileRows; }

// The large dense path's cap: three B x B doubles (6 GiB) and one B x B float (1 GiB) at B = 16384.
constexpr int64_t kDenseMaxRows = 16384;
constexpr int64_t kDenseTile = 64;

}  // namespace ctx
}  // namespace cpu
// Test hook (ops.cpp: _set_contextual_dense): 0 = automatic, 1 = always the sparse stage for B > kOneTileRows,
// 2 = always the dense path when B <= kDenseMaxRows. Defined in contextual.cpp.
std::atomic<int64_t>& contextual_dense_mode();
namespace cpu {
namespace ctx {

// Whether the context and its gradient go through the dense structures: always for B <= kOneTileRows; for larger
// batches (up to kDenseMaxRows) when the sparse stage's work — the intersection counts Σ_i Σ_{j∈N(i)} a_j plus
// the two halves of Z, bounded by 2 Σ_i Σ_{j∈N(i)} p_j (p = |P|) — exceeds B³/128 (the dense path's double
// GEMMs: Z forward; Z, GR, GW backward; ~B³ flops each, far faster per operation than the sparse accumulators
// and the backward's sparse products, which grow with the same sums). Measured at B = 1030 (2 threads, loaded
// machine, before the factored (K + Kᵀ) N; sparse / dense s fwd+bwd):
// work = 0.11·B³/64 (band 28) 1.8 / 1.6, 1.0·B³/64 (band 80) 2.8 / 1.9, 6·B³/64 (band 191) 9.4 / 1.9.
// A pure function of the neighbour lists (and the test hook), so the backward recomputes the forward's
// decision. O(nnz): nothing measurable on the normal path, which stays on the sparse stage.
inline bool use_dense(int64_t B, const int64_t* ptr, const uint8_t* flag, const int32_t* col) {
  if (one_tile(B)) return true;
  const int64_t mode = contextual_dense_mode().load();
  if (mode == 1 || B > kDenseMaxRows) return false;
  if (mode == 2) return true;
  std::vector<int64_t> cost(B);
  for (int64_t j = 0; j < B; ++j) {
    int64_t p = 0;
    for (int64_t e = ptr[j]; e < ptr[j + 1]; ++e) p += (flag[e] & kCtxInP) != 0;
    cost[j] = (ptr[j + 1] - ptr[j]) + 2 * p;
  }
  double work = 0.0;
  for (int64_t e = 0; e < ptr[B]; ++e) work += double(cost[col[e]]);
  const double Bd = double(B);
  return work > Bd * Bd * Bd / 128.0;
}

// fn(block, i0, i1) over row blocks of kDenseTile rows, in parallel.
template <typename Fn>
void for_row_blocks(int64_t B, const Fn& fn) {
  const int64_t nb = (B + kDenseTile - 1) / kDenseTile;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b, b * kDenseTile, std::min(B, (b + 1) * kDenseTile));
  });
}

inline at::Tensor dense_zeros(int64_t B) { return at::zeros({B, B}, at::TensorOptions().dtype(at::kDouble)); }

// One bit per (i, j).
struct BitRows {
  int64_t words;
  std::vector<uint64_t> bits;
  explicit BitRows(int64_t B) : words((B + 63) / 64), bits(size_t(B * words), 0) {}
  void set(int64_t i, int64_t j) { bits[i * words + (j >> 6)] |= uint64_t(1) << (j & 63); }
  bool test(int64_t i, int64_t j) const { return (bits[i * words + (j >> 6)] >> (j & 63)) & 1; }
  int64_t common(int64_t i, int64_t j) const {  // |row i ∩ row j|
    const uint64_t *a = bits.data() + i * words, *b = bits.data() + j * words;
    int64_t n = 0;
    for (int64_t q = 0; q < words; ++q) n += __builtin_popcountll(a[q] & b[q]);
    return n;
  }
};

struct DenseContext {
  int64_t B;
  std::vector<double> a, c, r;
  BitRows N;
  std::vector<int64_t> rptr;  // R(i) = rcol[rptr[i] .. rptr[i+1]), ascending
  std::vector<int32_t> rcol;
  std::vector<double> w;      // W_ij on the entries of N (aligned with Nbr::col)
  std::vector<double> Z;      // [B, B]
};

// dense_context for B > kOneTileRows: rows in parallel, Z = D_r R W as one double GEMM.
inline DenseContext dense_context_big(const Nbr& nb) {
  const int64_t B = nb.B;
  const double Bd = double(B);
  DenseContext dc{B, std::vector<double>(B), std::vector<double>(B), std::vector<double>(B), BitRows(B), {}, {}, {}, {}};
  BitRows P(B);
  for (int64_t i = 0; i < B; ++i) {
    check_not_collapsed(i, nb.size(i), B);
    dc.a[i] = double(nb.size(i));
    dc.c[i] = Bd - dc.a[i];
  }
  for_row_blocks(B, [&](int64_t, int64_t i0, int64_t i1) {  // each task sets the bits of its own rows
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
        dc.N.set(i, nb.col[e]);
        if (nb.flag[e] & kCtxInP) P.set(i, nb.col[e]);
      }
  });
  dc.rptr.assign(B + 1, 0);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e)
      if ((nb.flag[e] & kCtxInP) && P.test(nb.col[e], i)) dc.rcol.push_back(nb.col[e]);
    dc.rptr[i + 1] = int64_t(dc.rcol.size());
    dc.r[i] = double(dc.rptr[i + 1] - dc.rptr[i]);
    check_reciprocal_set(i, dc.r[i]);
  }
  dc.w.resize(nb.ptr[B]);
  for_row_blocks(B, [&](int64_t, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
        const int32_t j = nb.col[e];
        dc.w[e] = ctx_h(double(dc.N.common(i, j)), dc.a[i], dc.a[j], Bd);
      }
  });
  at::Tensor Rm = dense_zeros(B), Wm = dense_zeros(B);
  double *rm = Rm.data_ptr<double>(), *wm = Wm.data_ptr<double>();
  for_row_blocks(B, [&](int64_t, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const double inv_r = 1.0 / dc.r[i];
      for (int64_t q = dc.rptr[i]; q < dc.rptr[i + 1]; ++q) rm[i * B + dc.rcol[q]] = inv_r;
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) wm[i * B + nb.col[e]] = dc.w[e];
    }
  });
  dc.Z.resize(size_t(B * B));
  at::Tensor Zt = at::from_blob(dc.Z.data(), {B, B}, at::TensorOptions().dtype(at::kDouble));
  at::mm_out(Zt, Rm, Wm);
  return dc;
}

// Steps 4-7 of docs/spec.md §2.5 from the neighbour lists (ValueError for a collapsed batch or an empty R(i)).
inline DenseContext dense_context(const Nbr& nb) {
  const int64_t B = nb.B;
  if (!one_tile(B)) return dense_context_big(nb);
  const double Bd = double(B);
  DenseContext dc{B, std::vector<double>(B), std::vector<double>(B), std::vector<double>(B), BitRows(B), {}, {}, {}, {}};
  BitRows P(B);
  for (int64_t i = 0; i < B; ++i) {
    check_not_collapsed(i, nb.size(i), B);
    dc.a[i] = double(nb.size(i));
    dc.c[i] = Bd - dc.a[i];
    for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
      dc.N.set(i, nb.col[e]);
      if (nb.flag[e] & kCtxInP) P.set(i, nb.col[e]);
    }
  }
  dc.rptr.assign(B + 1, 0);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e)
      if ((nb.flag[e] & kCtxInP) && P.test(nb.col[e], i)) dc.rcol.push_back(nb.col[e]);
    dc.rptr[i + 1] = int64_t(dc.rcol.size());
    dc.r[i] = double(dc.rptr[i + 1] - dc.rptr[i]);
    check_reciprocal_set(i, dc.r[i]);
  }
  dc.w.resize(nb.ptr[B]);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
      const int32_t j = nb.col[e];
      dc.w[e] = ctx_h(double(dc.N.common(i, j)), dc.a[i], dc.a[j], Bd);
    }
  dc.Z.assign(size_t(B * B), 0.0);
  for (int64_t i = 0; i < B; ++i) {
    double* z = dc.Z.data() + i * B;
    for (int64_t q = dc.rptr[i]; q < dc.rptr[i + 1]; ++q) {
      const int32_t l = dc.rcol[q];
      for (int64_t e = nb.ptr[l]; e < nb.ptr[l + 1]; ++e) z[nb.col[e]] += dc.w[e];
    }
    const double inv_r = 1.0 / dc.r[i];
    for (int64_t j = 0; j < B; ++j) z[j] *= inv_r;
  }
  return dc;
}

// dense_l_ctx for B > kOneTileRows: 64 x 64 tiles (Z read along rows and columns), partial sums per row block.
inline double dense_l_ctx_big(const DenseContext& dc, const int32_t* cl) {
  const int64_t B = dc.B;
  const double* Z = dc.Z.data();
  std::vector<double> part((B + kDenseTile - 1) / kDenseTile, 0.0);
  for_row_blocks(B, [&](int64_t b, int64_t i0, int64_t i1) {
    double s = 0.0;
    for (int64_t j0 = 0; j0 < B; j0 += kDenseTile) {
      const int64_t j1 = std::min(B, j0 + kDenseTile);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) {
          if (j == i) continue;
          const double e = (cl[i] == cl[j] ? 1.0 : 0.0) - 0.5 * (Z[i * B + j] + Z[j * B + i]);
          s += e * e;
        }
    }
    part[b] = s;
  });
  double total = 0.0;
  for (double v : part) total += v;
  return total / (double(B) * double(B));
}

inline double dense_l_ctx(const DenseContext& dc, const int32_t* cl) {
  const int64_t B = dc.B;
  if (!one_tile(B)) return dense_l_ctx_big(dc, cl);
  const double* Z = dc.Z.data();
  double total = 0.0;
  for (int64_t i = 0; i < B; ++i) {
    double s = 0.0;
    for (int64_t j = 0; j < B; ++j) {
      if (j == i) continue;
      const double e = (cl[i] == cl[j] ? 1.0 : 0.0) - 0.5 * (Z[i * B + j] + Z[j * B + i]);
      s += e * e;
    }
    total += s;
  }
  return total / (double(B) * double(B));
}

// dense_ctx_grad for B > kOneTileRows: the same terms, the B³ products as double GEMMs, the B² passes in parallel
// tiles; Z is released once G is formed so that at most three B x B doubles are live.
inline void dense_ctx_grad_big(DenseContext dc, const Nbr& nb, const int32_t* cl, const Rows& rows, double beta,
                               double s_ctx, at::Tensor& dx) {
  const int64_t B = dc.B, nnz = nb.ptr[B];
  at::Tensor Gt = at::empty({B, B}, at::TensorOptions().dtype(at::kDouble));
  double* G = Gt.data_ptr<double>();
  std::vector<double> gr(B), u(B, 0.0), kr(nnz), gp(nnz, 0.0);
  {
    const double* Z = dc.Z.data();
    for_row_blocks(B, [&](int64_t, int64_t i0, int64_t i1) {
      for (int64_t j0 = 0; j0 < B; j0 += kDenseTile) {
        const int64_t j1 = std::min(B, j0 + kDenseTile);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = j0; j < j1; ++j)
            G[i * B + j] = i == j ? 0.0 : beta * (0.5 * (Z[i * B + j] + Z[j * B + i]) - (cl[i] == cl[j] ? 1.0 : 0.0));
      }
      for (int64_t i = i0; i < i1; ++i) {
        double s = 0.0;
        for (int64_t j = 0; j < B; ++j) s += G[i * B + j] * Z[i * B + j];
        gr[i] = -s / dc.r[i];
      }
    });
    std::vector<double>().swap(dc.Z);
  }
  {  // GP_il = GR_il + GR_li on the entries (l, i) in P, GR = D_r G Wᵀ + gr 1ᵀ
    at::Tensor Wm = dense_zeros(B);
    double* wm = Wm.data_ptr<double>();
    for_row_blocks(B, [&](int64_t, int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) wm[i * B + nb.col[e]] = dc.w[e];
    });
    const at::Tensor GRm = at::mm(Gt, Wm.t());
    Wm = at::Tensor();
    const double* grm = GRm.data_ptr<double>();
    auto GR = [&](int64_t a, int64_t b) { return grm[a * B + b] / dc.r[a] + gr[a]; };
    for_row_blocks(B, [&](int64_t, int64_t l0, int64_t l1) {
      for (int64_t l = l0; l < l1; ++l)
        for (int64_t e = nb.ptr[l]; e < nb.ptr[l + 1]; ++e)
          if (nb.flag[e] & kCtxInP) gp[e] = GR(nb.col[e], l) + GR(l, nb.col[e]);
    });
  }
  at::Tensor GNt;
  {  // GW = R D_r G
    at::Tensor Rr = dense_zeros(B);
    double* rr = Rr.data_ptr<double>();
    for_row_blocks(B, [&](int64_t, int64_t l0, int64_t l1) {
      for (int64_t l = l0; l < l1; ++l)
        for (int64_t q = dc.rptr[l]; q < dc.rptr[l + 1]; ++q) rr[l * B + dc.rcol[q]] = 1.0 / dc.r[dc.rcol[q]];
    });
    GNt = at::mm(Rr, Gt);
  }
  Gt = at::Tensor();
  double* GN = GNt.data_ptr<double>();
  for (int64_t i = 0; i < B; ++i)
    for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
      const double gw = GN[i * B + nb.col[e]];
      kr[e] = 0.5 * gw * (1.0 / dc.a[i] + 1.0 / dc.c[i]);
      u[i] -= 0.5 * gw / dc.c[i];
      u[nb.col[e]] -= 0.5 * gw / dc.c[i];
    }
  for_row_blocks(B, [&](int64_t, int64_t i0, int64_t i1) {  // GW ⊙ H + u 1ᵀ, in place
    for (int64_t i = i0; i < i1; ++i) {
      double* g = GN + i * B;
      const double inv_a = 1.0 / dc.a[i], inv_c = 1.0 / dc.c[i], ci = dc.c[i];
      for (int64_t j = 0; j < B; ++j) {
        const double n = double(dc.N.common(i, j));
        g[j] = g[j] * (0.5 * (n * inv_a + (ci - dc.a[j] + n) * inv_c)) + u[i];
      }
    }
  });
  // + (K + Kᵀ) N, K_li = kr on the entries (l, i) of N. With few clamped entries this term is never formed: its
  // part of dF is s_ctx (KS N + Nᵀ KS) X' with KS = K + Kᵀ, X' = diag(s) x (O(B²·d)), and C ⊙ becomes
  // GN_ij = −(KS N)_ij on the clamped entries (O(B) each); otherwise GN += KS N as one GEMM.
  int64_t n_clamped = 0;
  for (int64_t e = 0; e < nnz; ++e) n_clamped += (nb.flag[e] & kCtxClamped) != 0;
  const bool factored = n_clamped <= B * B / 16;
  at::Tensor K = dense_zeros(B), Nm = dense_zeros(B);
  {
    double *k = K.data_ptr<double>(), *nm = Nm.data_ptr<double>();
    for_row_blocks(B, [&](int64_t, int64_t l0, int64_t l1) {
      for (int64_t l = l0; l < l1; ++l)
        for (int64_t e = nb.ptr[l]; e < nb.ptr[l + 1]; ++e) {
          k[l * B + nb.col[e]] = kr[e];
          nm[l * B + nb.col[e]] = 1.0;
        }
    });
    // K + Kᵀ in place: block (ib, jb >= ib) and its mirror belong to task ib only
    for_row_blocks(B, [&](int64_t, int64_t i0, int64_t i1) {
      for (int64_t j0 = i0; j0 < B; j0 += kDenseTile) {
        const int64_t j1 = std::min(B, j0 + kDenseTile);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = std::max(j0, i); j < j1; ++j) {
            const double v = k[i * B + j] + k[j * B + i];
            k[i * B + j] = v;
            k[j * B + i] = v;
          }
      }
    });
  }
  if (!factored) {
    GNt.addmm_(K, Nm);
    K = at::Tensor();
    Nm = at::Tensor();
  }
  for (int64_t l = 0; l < B; ++l)
    for (int64_t e = nb.ptr[l]; e < nb.ptr[l + 1]; ++e) GN[int64_t(nb.col[e]) * B + l] += gp[e];
  if (factored) {
    const double *k = K.data_ptr<double>(), *nm = Nm.data_ptr<double>();
    for (int64_t i = 0; i < B; ++i)  // C ⊙ on the whole A: the KS N part cancelled on the clamped entries
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e)
        if (nb.flag[e] & kCtxClamped) {
          const int64_t j = nb.col[e];
          double v = 0.0;
          for (int64_t l = 0; l < B; ++l) v += k[i * B + l] * nm[l * B + j];
          GN[i * B + j] = -v;
        }
  } else {
    for (int64_t i = 0; i < B; ++i)  // C ⊙
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e)
        if (nb.flag[e] & kCtxClamped) GN[i * B + nb.col[e]] = 0.0;
  }
  at::Tensor m = at::empty({B, B}, dx.options());
  float* mp = m.data_ptr<float>();
  for_row_blocks(B, [&](int64_t, int64_t i0, int64_t i1) {
    for (int64_t j0 = 0; j0 < B; j0 += kDenseTile) {
      const int64_t j1 = std::min(B, j0 + kDenseTile);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) mp[i * B + j] = float(s_ctx * (GN[i * B + j] + GN[j * B + i])) * rows.s(j);
    }
  });
  if (factored) {  // s_ctx (KS (N X') + Nᵀ (KS X')), in double
    at::Tensor Xs = at::empty({B, rows.d}, K.options());
    double* xs = Xs.data_ptr<double>();
    for (int64_t i = 0; i < B; ++i)
      for (int64_t q = 0; q < rows.d; ++q) xs[i * rows.d + q] = double(rows.x[i * rows.d + q]) * double(rows.s(i));
    const at::Tensor T = at::mm(K, at::mm(Nm, Xs)).add_(at::mm(Nm.t(), at::mm(K, Xs))).mul_(s_ctx);
    dx.add_(T.to(at::kFloat));
  }
  GNt = at::Tensor();
  const at::Tensor x = at::from_blob(const_cast<float*>(rows.x), {B, rows.d}, dx.options());
  at::addmm_out(dx, dx, m, x);
}

// dF += s_ctx (A + Aᵀ) F, A = dL_ctx/dS / s_ctx = C ⊙ (GN + GP) (docs/spec.md §2.5, closed form), with
//   G = β (js − y) ⊙ (1 − I), gr_i = −Σ_j G_ij Z_ij / r_i, GW = Rᵀ (G / r), GR_ab = (1/r_a) Σ_{j∈N(b)} G_aj W_bj + gr_a,
//   GP_il = GR_il + GR_li for i ∈ P(l),
//   GN_ij = GW_ij H_ij + u_i + Σ_{l∈N(i)} kr_il N_lj + Σ_{l: i∈N(l)} kr_li N_lj   (GI N + GIᵀ N − GJ M − GJᵀ M, M = 1 − N),
//   kr_il = ½ GW_il (1/a_i + 1/c_i),  u_i = −Σ_{l∈N(i)} ½ GW_il / c_i − Σ_{l: i∈N(l)} ½ GW_li / c_l.
// dx holds dL/dF (before the normalisation backward); F = diag(s) x, so the GEMM is dx += ((A + Aᵀ) diag(s)) x.
// (dc by value: the large path releases Z early.)
inline void dense_ctx_grad(DenseContext dc, const Nbr& nb, const int32_t* cl, const Rows& rows, double beta,
                           double s_ctx, at::Tensor& dx) {
  if (!one_tile(dc.B)) return dense_ctx_grad_big(std::move(dc), nb, cl, rows, beta, s_ctx, dx);
  const int64_t B = dc.B, nnz = nb.ptr[B];
  const double* Z = dc.Z.data();
  std::vector<double> G(size_t(B * B)), GN(size_t(B * B), 0.0), gr(B), u(B, 0.0), kr(nnz);
  for (int64_t i = 0; i < B; ++i) {
    double s = 0.0;
    for (int64_t j = 0; j < B; ++j) {
      const double g = i == j ? 0.0 : beta * (0.5 * (Z[i * B + j] + Z[j * B + i]) - (cl[i] == cl[j] ? 1.0 : 0.0));
      G[i * B + j] = g;
      s += g * Z[i * B + j];
    }
    gr[i] = -s / dc.r[i];
  }
  for (int64_t l = 0; l < B; ++l) {  // GW (into GN's storage)
    double* gw = GN.data() + l * B;
    for (int64_t q = dc.rptr[l]; q < dc.rptr[l + 1]; ++q) {
      const int32_t m = dc.rcol[q];
      const double* g = G.data() + m * B;
      const double inv_r = 1.0 / dc.r[m];
#pragma omp simd
      for (int64_t j = 0; j < B; ++j) gw[j] += g[j] * inv_r;
    }
  }
  for (int64_t i = 0; i < B; ++i)
    for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
      const double gw = GN[i * B + nb.col[e]];
      kr[e] = 0.5 * gw * (1.0 / dc.a[i] + 1.0 / dc.c[i]);
      u[i] -= 0.5 * gw / dc.c[i];
      u[nb.col[e]] -= 0.5 * gw / dc.c[i];
    }
  // GR_ab, on the pairs GP needs
  auto GR = [&](int64_t a, int64_t b) {
    double acc = 0.0;
    for (int64_t e = nb.ptr[b]; e < nb.ptr[b + 1]; ++e) acc += G[a * B + nb.col[e]] * dc.w[e];
    return acc / dc.r[a] + gr[a];
  };
  std::vector<double> gp(nnz, 0.0);  // on the entry e = (l, i): GP_il
  for (int64_t l = 0; l < B; ++l)
    for (int64_t e = nb.ptr[l]; e < nb.ptr[l + 1]; ++e)
      if (nb.flag[e] & kCtxInP) gp[e] = GR(nb.col[e], l) + GR(l, nb.col[e]);
  for (int64_t i = 0; i < B; ++i) {  // GW ⊙ H + u 1ᵀ, in place; H_ij = ½(n_ij / a_i + (c_i − a_j + n_ij) / c_i)
    double* g = GN.data() + i * B;
    const double inv_a = 1.0 / dc.a[i], inv_c = 1.0 / dc.c[i], ci = dc.c[i];
    for (int64_t j = 0; j < B; ++j) {
      const double n = double(dc.N.common(i, j));
      g[j] = g[j] * (0.5 * (n * inv_a + (ci - dc.a[j] + n) * inv_c)) + u[i];
    }
  }
  for (int64_t l = 0; l < B; ++l)
    for (int64_t e = nb.ptr[l]; e < nb.ptr[l + 1]; ++e) {
      const int32_t i = nb.col[e];
      double *row_l = GN.data() + l * B, *row_i = GN.data() + int64_t(i) * B;
      const double k_li = kr[e];
      for (int64_t e2 = nb.ptr[i]; e2 < nb.ptr[i + 1]; ++e2) row_l[nb.col[e2]] += k_li;  // (GI N − GJ N) of row l
      for (int64_t e2 = nb.ptr[l]; e2 < nb.ptr[l + 1]; ++e2) row_i[nb.col[e2]] += k_li;  // (GIᵀ N − GJᵀ N) of row i
      row_i[l] += gp[e];
    }
  for (int64_t i = 0; i < B; ++i)  // C ⊙
    for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e)
      if (nb.flag[e] & kCtxClamped) GN[i * B + nb.col[e]] = 0.0;
  at::Tensor m = at::empty({B, B}, dx.options());
  float* mp = m.data_ptr<float>();
  for (int64_t i = 0; i < B; ++i)
    for (int64_t j = 0; j < B; ++j) mp[i * B + j] = float(s_ctx * (GN[i * B + j] + GN[j * B + i])) * rows.s(j);
  const at::Tensor x = at::from_blob(const_cast<float*>(rows.x), {B, rows.d}, dx.options());
  at::addmm_out(dx, dx, m, x);
}

}  // namespace ctx
}  // namespace cpu
}  // namespace flashdml
