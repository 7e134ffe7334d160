// Small batches of the CPU contextual loss (SPEC 2.5): for B <= kOneTileRows, S = F Fᵀ has at most
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
//  * dense_ctx_grad: dF += s_ctx (A + Aᵀ) F with A = C ⊙ (GN + GP) of SPEC's closed form, every term (the
//    row-constant, the label block and the clamp mask included), applied with one GEMM.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
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

// Steps 4-7 of SPEC 2.5 from the neighbour lists (ValueError for a collapsed batch or an empty R(i)).
inline DenseContext dense_context(const Nbr& nb) {
  const int64_t B = nb.B;
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

inline double dense_l_ctx(const DenseContext& dc, const int32_t* cl) {
  const int64_t B = dc.B;
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

// dF += s_ctx (A + Aᵀ) F, A = dL_ctx/dS / s_ctx = C ⊙ (GN + GP) (SPEC 2.5, closed form), with
//   G = β (js − y) ⊙ (1 − I), gr_i = −Σ_j G_ij Z_ij / r_i, GW = Rᵀ (G / r), GR_ab = (1/r_a) Σ_{j∈N(b)} G_aj W_bj + gr_a,
//   GP_il = GR_il + GR_li for i ∈ P(l),
//   GN_ij = GW_ij H_ij + u_i + Σ_{l∈N(i)} kr_il N_lj + Σ_{l: i∈N(l)} kr_li N_lj   (GI N + GIᵀ N − GJ M − GJᵀ M, M = 1 − N),
//   kr_il = ½ GW_il (1/a_i + 1/c_i),  u_i = −Σ_{l∈N(i)} ½ GW_il / c_i − Σ_{l: i∈N(l)} ½ GW_li / c_l.
// dx holds dL/dF (before the normalisation backward); F = diag(s) x, so the GEMM is dx += ((A + Aᵀ) diag(s)) x.
inline void dense_ctx_grad(const DenseContext& dc, const Nbr& nb, const int32_t* cl, const Rows& rows, double beta,
                           double s_ctx, at::Tensor& dx) {
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
