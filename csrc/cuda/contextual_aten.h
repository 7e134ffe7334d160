// The sparse stage of the contextual loss for the CUDA backend (SPEC 2.5 steps 4-8 and the closed-form backward) as
// ATen ops on the device tensors of the neighbour lists: the algorithm of python/flashdml/ops/contextual_device.py
// (itself a vectorised mirror of csrc/cpu/contextual_sparse.h and the CPU Backward in csrc/cpu/contextual_backward.h), O(B·k²), nothing B x B.
// Entries are int64 keys row·B + col (the lists are row-major with ascending columns, so their keys are sorted and
// a lookup is one searchsorted); sparse products expand each row's list over the lists it touches and sum equal keys
// in float64. Plain ATen (no CUDA API), so it also runs on CPU tensors (tests/test_cuda_contextual_aten.py).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <utility>
#include <vector>

#include "flashdml/contextual.h"

namespace flashdml {
namespace cuda {
namespace ctxa {

using at::Tensor;

// For counts [n]: (owner, within), Σ counts long: element e belongs to owner[e] at position within[e].
inline std::pair<Tensor, Tensor> expand(const Tensor& counts) {
  const int64_t total = counts.numel() ? counts.sum().item<int64_t>() : 0;
  Tensor owner = at::repeat_interleave(counts, std::optional<int64_t>(total));
  Tensor start = at::cumsum(counts, 0) - counts;
  return {owner, at::arange(total, counts.options()) - start.index_select(0, owner)};
}

// (position, hit) of queries q in sorted keys.
inline std::pair<Tensor, Tensor> find(const Tensor& keys, const Tensor& q) {
  if (keys.numel() == 0) return {at::zeros_like(q), at::zeros_like(q, q.options().dtype(at::kBool))};
  Tensor pos = at::searchsorted(keys, q).clamp_max_(keys.numel() - 1);
  return {pos, keys.index_select(0, pos) == q};
}

inline Tensor lookup(const Tensor& keys, const Tensor& vals, const Tensor& q) {
  if (keys.numel() == 0) return at::zeros(q.sizes(), vals.options());
  auto [pos, hit] = find(keys, q);
  return at::where(hit, vals.index_select(0, pos), at::zeros({}, vals.options()));
}

// Sorted unique keys and the float64 sums of their values.
inline std::pair<Tensor, Tensor> coalesce(const Tensor& keys, const Tensor& vals) {
  auto [uk, inv, unused] = at::_unique2(keys, /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/false);
  (void)unused;
  Tensor sums = at::zeros({uk.numel()}, vals.options().dtype(at::kDouble));
  return {uk, sums.index_add_(0, inv.reshape(-1), vals.to(at::kDouble))};
}

inline Tensor row_ptr(const Tensor& rows, int64_t B) {
  Tensor ptr = at::zeros({B + 1}, rows.options());
  ptr.narrow(0, 1, B).copy_(at::cumsum(at::bincount(rows, {}, B), 0));
  return ptr;
}

inline Tensor ctx_h(const Tensor& n, const Tensor& ai, const Tensor& aj, double B) {
  return 0.5 * (n / ai + (B - ai - aj + n) / (B - ai));
}

inline Tensor rows_of(const Tensor& key, int64_t B) { return at::div(key, B, "floor"); }

// Dense class ids 0 .. (classes − 1) in label order.
inline Tensor class_keys(const Tensor& labels) {
  return std::get<1>(at::_unique2(labels, true, true, false)).reshape(-1);
}

struct Context {
  int64_t B;
  Tensor ptr, cnt, row, col, in_p, clamped, key, a, c, r, r_row, r_col, r_ptr, w, z_key, z_val, js_key, js_val;
};

// Steps 4-7 of SPEC 2.5 (contextual_device.build_context); ValueError for a collapsed batch or an empty R(i).
inline Context build_context(const Tensor& ptr_in, const Tensor& col_in, const Tensor& flag_in, int64_t B) {
  Context cx;
  cx.B = B;
  cx.ptr = ptr_in.to(at::kLong);
  cx.cnt = cx.ptr.narrow(0, 1, B) - cx.ptr.narrow(0, 0, B);
  const int64_t amax = cx.cnt.max().item<int64_t>();
  if (amax >= B) {
    const int64_t i = at::nonzero(cx.cnt >= B).select(1, 0)[0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "contextual_loss: collapsed batch — every sample is in the k-neighbourhood of row ", i,
                      " (|N(i)| = B = ", B, "), so the complement intersection J is 0/0. The embeddings are "
                      "(nearly) identical within eps; use a smaller eps or k, or a batch with more spread.");
  }
  const auto lopt = cx.ptr.options();
  cx.row = at::repeat_interleave(cx.cnt, std::optional<int64_t>(col_in.numel()));
  cx.col = col_in.to(at::kLong);
  const Tensor flag = flag_in.to(at::kLong);
  cx.in_p = (flag & kCtxInP) != 0;
  cx.clamped = (flag & kCtxClamped) != 0;
  cx.key = cx.row * B + cx.col;
  cx.a = cx.cnt.to(at::kDouble);
  cx.c = double(B) - cx.a;
  {  // R(i) = {j ∈ P(i) : i ∈ P(j)}
    auto [pos, hit] = find(cx.key, cx.col * B + cx.row);
    const Tensor in_r = cx.in_p & hit & cx.in_p.index_select(0, pos);
    cx.r_row = cx.row.masked_select(in_r);
    cx.r_col = cx.col.masked_select(in_r);
  }
  cx.r = at::bincount(cx.r_row, {}, B).to(at::kDouble);
  if ((cx.r <= 0).any().item<bool>()) {
    const int64_t i = at::nonzero(cx.r <= 0).select(1, 0)[0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "contextual_loss: row ", i, " has an empty reciprocal half-neighbourhood R(i) (|R(i)| = 0)");
  }
  cx.r_ptr = row_ptr(cx.r_row, B);
  {  // W = H on N: |N(i) ∩ N(j)| = #{l ∈ N(i) : l ∈ N(j)}
    auto [owner, within] = expand(cx.cnt.index_select(0, cx.row));
    const Tensor l = cx.col.index_select(0, cx.ptr.index_select(0, cx.row.index_select(0, owner)) + within);
    const Tensor hit = find(cx.key, cx.col.index_select(0, owner) * B + l).second;
    const Tensor n = at::zeros({cx.col.numel()}, lopt.dtype(at::kDouble)).index_add_(0, owner, hit.to(at::kDouble));
    cx.w = ctx_h(n, cx.a.index_select(0, cx.row), cx.a.index_select(0, cx.col), double(B));
  }
  {  // Z_ij = (1/r_i) Σ_{l ∈ R(i)} W_lj; js = ½(Z + Zᵀ)
    auto [owner, within] = expand(cx.cnt.index_select(0, cx.r_col));
    const Tensor e2 = cx.ptr.index_select(0, cx.r_col.index_select(0, owner)) + within;
    auto [zk, zs] = coalesce(cx.r_row.index_select(0, owner) * B + cx.col.index_select(0, e2), cx.w.index_select(0, e2));
    const Tensor zi = rows_of(zk, B);
    cx.z_key = zk;
    cx.z_val = zs * (1.0 / cx.r.index_select(0, zi));
    const Tensor zt = (zk - zi * B) * B + zi;
    auto [jk, js] = coalesce(at::cat({zk, zt}), at::cat({cx.z_val, cx.z_val}));
    cx.js_key = jk;
    cx.js_val = 0.5 * js;
  }
  return cx;
}

// L_ctx = (1/B²)[Σ_{i≠j} y_ij + Σ_{supp js, i≠j} (js² − 2 y js)], float64 0-dim.
inline Tensor l_ctx(const Context& cx, const Tensor& cls) {
  const int64_t B = cx.B;
  const Tensor i = rows_of(cx.js_key, B), j = cx.js_key - i * B;
  const Tensor v = cx.js_val;
  const Tensor same = cls.index_select(0, i) == cls.index_select(0, j);
  const Tensor zero = at::zeros({}, v.options());
  const Tensor part = at::where(i != j, v * v - at::where(same, 2.0 * v, zero), zero).sum();
  const Tensor sizes = std::get<2>(at::_unique2(cls, true, false, true)).to(at::kDouble);
  return ((sizes * sizes).sum() - double(B) + part) / (double(B) * double(B));
}

inline Tensor G(const Context& cx, const Tensor& cls, const Tensor& i, const Tensor& j, double beta) {
  const Tensor js = lookup(cx.js_key, cx.js_val, i * cx.B + j);
  const Tensor y = (cls.index_select(0, i) == cls.index_select(0, j)).to(at::kDouble);
  return at::where(i == j, at::zeros({}, js.options()), beta * (js - y));
}

// The ctx part of dL/dF (without the 2·ste_slope·g factor) for rows F (float64), the CPU Backward vectorised.
inline Tensor ctx_grad(const Context& cx, const Tensor& cls, const Tensor& F) {
  const int64_t B = cx.B;
  const double Bd = double(B), beta = 2.0 / (Bd * Bd);
  const auto dopt = F.options();
  const Tensor &row = cx.row, &col = cx.col, &ptr = cx.ptr, &a = cx.a, &c = cx.c, &r = cx.r, &cnt = cx.cnt;
  const Tensor zi = rows_of(cx.z_key, B), zj = cx.z_key - zi * B;
  const Tensor gr = -at::zeros({B}, dopt).index_add_(0, zi, G(cx, cls, zi, zj, beta) * cx.z_val) / r;
  Tensor gwn;
  {  // GW_il = Σ_{m ∈ R(i)} G_ml / r_m on the entries (i, l) of N
    const Tensor r_cnt = cx.r_ptr.narrow(0, 1, B) - cx.r_ptr.narrow(0, 0, B);
    auto [owner, within] = expand(r_cnt.index_select(0, row));
    const Tensor m = cx.r_col.index_select(0, cx.r_ptr.index_select(0, row.index_select(0, owner)) + within);
    gwn = at::zeros({col.numel()}, dopt).index_add_(0, owner, G(cx, cls, m, col.index_select(0, owner), beta) /
                                                                  r.index_select(0, m));
  }
  const Tensor cr = c.index_select(0, row);
  Tensor u = -(at::zeros({B}, dopt).index_add_(0, row, 0.5 * gwn / cr).index_add_(0, col, 0.5 * gwn / cr));
  auto GR = [&](const Tensor& aa, const Tensor& bb) {  // (1/r_a) Σ_{j ∈ N(b), j ≠ a} G_aj W_bj + gr_a
    auto [own, wi] = expand(cnt.index_select(0, bb));
    const Tensor e = ptr.index_select(0, bb.index_select(0, own)) + wi;
    const Tensor ai = aa.index_select(0, own), j = col.index_select(0, e);
    const Tensor term = at::where(j == ai, at::zeros({}, dopt), G(cx, cls, ai, j, beta) * cx.w.index_select(0, e));
    return at::zeros({aa.numel()}, dopt).index_add_(0, own, term) / r.index_select(0, aa) + gr.index_select(0, aa);
  };
  const Tensor pe = at::nonzero(cx.in_p).reshape(-1);
  const Tensor pr = row.index_select(0, pe), pc = col.index_select(0, pe);
  const Tensor gp = GR(pr, pc) + GR(pc, pr);
  std::vector<Tensor> keys, vals;
  Tensor an_key, an_val;
  {  // n_ij over the pairs sharing a neighbour, via NT(l) = {j : l ∈ N(j)}
    const Tensor t_row = row.index_select(0, at::argsort(col * B + row));
    const Tensor t_ptr = row_ptr(col, B);
    const Tensor t_cnt = t_ptr.narrow(0, 1, B) - t_ptr.narrow(0, 0, B);
    auto [owner, within] = expand(t_cnt.index_select(0, col));
    const Tensor cj = t_row.index_select(0, t_ptr.index_select(0, col.index_select(0, owner)) + within);
    std::tie(an_key, an_val) = coalesce(row.index_select(0, owner) * B + cj, at::ones({owner.numel()}, dopt));
  }
  const int64_t n_cls = cls.max().item<int64_t>() + 2;
  const Tensor rr = r.index_select(0, cx.r_col);
  {  // the js-driven part of GW (plus the label part's own m = j), times H
    const Tensor js_i = rows_of(cx.js_key, B);
    const Tensor js_ptr = row_ptr(js_i, B);
    const Tensor js_cnt = js_ptr.narrow(0, 1, B) - js_ptr.narrow(0, 0, B);
    auto [owner, within] = expand(js_cnt.index_select(0, cx.r_col));
    const Tensor q = js_ptr.index_select(0, cx.r_col.index_select(0, owner)) + within;
    const Tensor jj = cx.js_key.index_select(0, q) - js_i.index_select(0, q) * B;
    const Tensor mo = cx.r_col.index_select(0, owner);
    const Tensor keep = jj != mo;
    const Tensor wm = beta / r.index_select(0, mo);
    auto [ag_key, ag_val] =
        coalesce(at::cat({(cx.r_row.index_select(0, owner) * B + jj).masked_select(keep), cx.r_row * B + cx.r_col}),
                 at::cat({(wm * cx.js_val.index_select(0, q)).masked_select(keep), beta / rr}));
    const Tensor gi = rows_of(ag_key, B), gj = ag_key - gi * B;
    keys.push_back(ag_key);
    vals.push_back(ag_val * ctx_h(lookup(an_key, an_val, ag_key), a.index_select(0, gi), a.index_select(0, gj), Bd));
  }
  auto [rho_key, rho_val] = coalesce(cx.r_row * n_cls + cls.index_select(0, cx.r_col), 1.0 / rr);
  const Tensor s_ac = 1.0 / a + 1.0 / c;
  {  // the label part of GW times the n part of H
    const Tensor ni = rows_of(an_key, B), nj = an_key - ni * B;
    const Tensor rho = lookup(rho_key, rho_val, ni * n_cls + cls.index_select(0, nj));
    keys.push_back(an_key);
    vals.push_back(at::where(rho != 0.0, -beta * rho * 0.5 * an_val * s_ac.index_select(0, ni), at::zeros({}, dopt)));
  }
  const Tensor coef = 0.5 * gwn * s_ac.index_select(0, row);
  for (int side = 0; side < 2; ++side) {  // GI N − GJ M (sparse part) and its transpose counterpart
    const Tensor& lrow = side == 0 ? col : row;
    const Tensor& okey = side == 0 ? row : col;
    auto [owner, within] = expand(cnt.index_select(0, lrow));
    keys.push_back(okey.index_select(0, owner) * B +
                   col.index_select(0, ptr.index_select(0, lrow.index_select(0, owner)) + within));
    vals.push_back(coef.index_select(0, owner));
  }
  keys.push_back(pc * B + pr);  // GP_il = P_li (GR_il + GR_li)
  vals.push_back(gp);
  auto [sp_key, sp_val] = coalesce(at::cat(keys), at::cat(vals));
  {
    auto [pos, hit] = find(cx.key, sp_key);
    sp_val = at::where(hit & cx.clamped.index_select(0, pos), at::zeros({}, dopt), sp_val);
  }
  // label block: sv_i(κ) = −(β/2) ρ_i(κ) / c_i; unmasked G F and Gᵀ F of u 1ᵀ + LB by per-class sums
  const Tensor ri = rows_of(rho_key, n_cls), rk = rho_key - ri * n_cls;
  const Tensor sv = -0.5 * beta * rho_val / c.index_select(0, ri);
  const Tensor SF = at::zeros({n_cls, F.size(1)}, dopt).index_add_(0, cls, F);
  const Tensor SaF = at::zeros({n_cls, F.size(1)}, dopt).index_add_(0, cls, a.unsqueeze(1) * F);
  const Tensor ci = c.index_select(0, ri).unsqueeze(1);
  Tensor out = u.unsqueeze(1) * F.sum(0, true) + (u.unsqueeze(1) * F).sum(0, true);
  out.index_add_(0, ri, sv.unsqueeze(1) * (ci * SF.index_select(0, rk) - SaF.index_select(0, rk)));
  const Tensor Fi = F.index_select(0, ri);
  const Tensor A = at::zeros({n_cls, F.size(1)}, dopt).index_add_(0, rk, (sv.unsqueeze(1) * ci) * Fi);
  const Tensor Bk = at::zeros({n_cls, F.size(1)}, dopt).index_add_(0, rk, sv.unsqueeze(1) * Fi);
  out += A.index_select(0, cls) - a.unsqueeze(1) * Bk.index_select(0, cls);
  // mask C: −(u_i + LB_ij) on the clamped entries of N
  const Tensor ce = at::nonzero(cx.clamped).reshape(-1);
  const Tensor cri = row.index_select(0, ce), crj = col.index_select(0, ce);
  const Tensor lb = -0.5 * beta * lookup(rho_key, rho_val, cri * n_cls + cls.index_select(0, crj)) /
                    c.index_select(0, cri) * (c.index_select(0, cri) - a.index_select(0, crj));
  const Tensor gi = at::cat({rows_of(sp_key, B), cri}), gj = at::cat({sp_key - rows_of(sp_key, B) * B, crj});
  const Tensor gv = at::cat({sp_val, -(u.index_select(0, cri) + lb)}).unsqueeze(1);
  out.index_add_(0, gi, gv * F.index_select(0, gj));
  out.index_add_(0, gj, gv * F.index_select(0, gi));
  return out;
}

}  // namespace ctxa
}  // namespace cuda
}  // namespace flashdml
