// The ATen sparse stage of the contextual loss (interface and conventions: contextual_stage.h), and its registration
// as the flashdml::contextual_stage_* ops for every device (CompositeExplicitAutograd: plain ATen, no autograd).
//
// Entries are int64 keys row·B + col. The N(i) lists are row-major with ascending columns, so their keys are sorted
// and a lookup of (i, j) is one searchsorted. Sparse products (|N(i) ∩ N(j)|, Z = R W / r, the sparse part of
// dL_ctx/dS) expand each row's list over the lists it touches (`expand`) and sum equal keys in float64
// (`coalesce`). Counts and the per-entry formulas are the float64 expressions of the CPU stage
// (csrc/cpu/contextual_sparse.h, contextual_backward.h); only the order of the float64 sums differs (last bits).
//
// Deterministic on every device: no index_add_ (atomics on CUDA, whose order changes from run to run). Every
// scatter-sum goes through `add_at` — a stable sort by target, each run of equal targets summed in order by
// segment_reduce, one addition per target — so a CUDA run gives the same bits every time.
#include "contextual_stage.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "flashdml/contextual.h"

namespace flashdml {
namespace ctx_stage {
namespace {

using at::Tensor;

// Entries per gather chunk of apply_sparse: O(kChunk·d) temporary memory.
constexpr int64_t kChunk = int64_t(1) << 16;

// Σ over runs of equal sorted keys: sums[r] = Σ vals of run r, in the order of vals (segment_reduce: a sequential
// loop per run on CPU, a fixed-order segmented reduction on CUDA). Returns the run keys and their sums.
std::pair<Tensor, Tensor> run_sums(const Tensor& sorted_keys, const Tensor& vals) {
  auto [uk, unused, counts] = at::unique_consecutive(sorted_keys, /*return_inverse=*/false, /*return_counts=*/true);
  (void)unused;
  return {uk, at::segment_reduce(vals, "sum", counts, {}, {}, /*axis=*/0, /*unsafe=*/true)};
}

// out[idx[e]] += src[e] (rows of src for a 2-D out), deterministically: src is ordered by a stable sort of idx, the
// terms of each target are summed in their original order, and each touched element of out gets one addition.
// On CPU tensors and a zero out this gives the same sums as index_add_.
void add_at(Tensor& out, const Tensor& idx, const Tensor& src) {
  if (idx.numel() == 0) return;
  auto [sorted, perm] = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto [targets, sums] = run_sums(sorted, src.index_select(0, perm));
  out.index_put_({targets}, out.index_select(0, targets) + sums);  // distinct targets: no accumulation race
}

Tensor sum_at(int64_t n, const Tensor& idx, const Tensor& src) {  // add_at into zeros [n] (1-D src)
  Tensor out = at::zeros({n}, src.options());
  add_at(out, idx, src);
  return out;
}

// For counts [n]: (owner, within), Σ counts long: element e belongs to owner[e] at position within[e].
std::pair<Tensor, Tensor> expand(const Tensor& counts) {
  const int64_t total = counts.numel() ? counts.sum().item<int64_t>() : 0;
  Tensor owner = at::repeat_interleave(counts, std::optional<int64_t>(total));
  Tensor start = at::cumsum(counts, 0) - counts;
  return {owner, at::arange(total, counts.options()) - start.index_select(0, owner)};
}

// (position, hit) of the queries q in the sorted keys.
std::pair<Tensor, Tensor> find(const Tensor& keys, const Tensor& q) {
  if (keys.numel() == 0) return {at::zeros_like(q), at::zeros_like(q, q.options().dtype(at::kBool))};
  Tensor pos = at::searchsorted(keys, q).clamp_max_(keys.numel() - 1);
  return {pos, keys.index_select(0, pos) == q};
}

Tensor lookup(const Tensor& keys, const Tensor& vals, const Tensor& q) {
  if (keys.numel() == 0) return at::zeros(q.sizes(), vals.options());
  auto [pos, hit] = find(keys, q);
  return at::where(hit, vals.index_select(0, pos), at::zeros({}, vals.options()));
}

// Sorted unique keys and the float64 sums of their values.
std::pair<Tensor, Tensor> coalesce(const Tensor& keys, const Tensor& vals) {
  auto [sorted, perm] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  return run_sums(sorted, vals.to(at::kDouble).index_select(0, perm));
}

Tensor row_ptr(const Tensor& rows, int64_t B) {
  Tensor ptr = at::zeros({B + 1}, rows.options());
  ptr.narrow(0, 1, B).copy_(at::cumsum(at::bincount(rows, {}, B), 0));
  return ptr;
}

Tensor rows_of(const Tensor& key, int64_t B) { return at::div(key, B, "floor"); }

// out += G F + Gᵀ F for the sparse G (rows, cols, vals in out's dtype), in chunks of kChunk entries.
void apply_sparse(Tensor& out, const Tensor& F, const Tensor& rows, const Tensor& cols, const Tensor& vals) {
  const int64_t n = rows.numel();
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t len = std::min(kChunk, n - c0);
    const Tensor r = rows.narrow(0, c0, len), c = cols.narrow(0, c0, len), v = vals.narrow(0, c0, len).unsqueeze(1);
    add_at(out, r, v * F.index_select(0, c));
    add_at(out, c, v * F.index_select(0, r));
  }
}

// Labels: dense class ids 0 .. (classes − 1) in label order, and the label of each class.
struct Classes {
  Tensor id, label;
};

Classes classes_of(const Tensor& labels) {
  auto [uniq, inv, unused] = at::_unique2(labels, /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/false);
  (void)unused;
  return {inv.reshape(-1), uniq};
}

struct Context {
  int64_t B;
  Tensor ptr, cnt, row, col, in_p, clamped, key, a, c, r, r_row, r_col, r_ptr, w, z_key, z_val, js_key, js_val;
};

void check_lists(const char* op, const Tensor& ptr, const Tensor& nbr, const Tensor& flags, const Tensor& labels) {
  TORCH_CHECK(labels.dim() == 1 && labels.scalar_type() == at::kLong && labels.numel() > 0, op,
              ": labels must be int64 [B], B > 0");
  const int64_t B = labels.size(0);
  TORCH_CHECK(ptr.dim() == 1 && ptr.numel() == B + 1 && ptr.scalar_type() == at::kLong, op,
              ": nbr_ptr must be int64 [B + 1]");
  TORCH_CHECK(nbr.dim() == 1 && nbr.scalar_type() == at::kInt, op, ": nbr must be int32 [nnz]");
  TORCH_CHECK(flags.dim() == 1 && flags.numel() == nbr.numel() && flags.scalar_type() == at::kByte, op,
              ": nbr_flags must be uint8 [nnz], one per entry of nbr");
  TORCH_CHECK(ptr.device() == labels.device() && nbr.device() == labels.device() &&
                  flags.device() == labels.device(),
              op, ": nbr_ptr, nbr, nbr_flags and labels must be on one device");
}

void check_rows(const char* op, const Tensor& rows, const Tensor& labels) {
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == labels.size(0) && at::isFloatingType(rows.scalar_type()), op,
              ": rows must be a floating [B, d] tensor");
  TORCH_CHECK(rows.device() == labels.device(), op, ": rows must be on the device of the lists");
}

// Steps 4-7 of docs/spec.md §2.5; ValueError for a collapsed batch or an empty R(i).
Context build_context(const Tensor& ptr_in, const Tensor& col_in, const Tensor& flag_in, int64_t B) {
  Context cx;
  cx.B = B;
  cx.ptr = ptr_in.to(at::kLong).contiguous();
  cx.cnt = cx.ptr.narrow(0, 1, B) - cx.ptr.narrow(0, 0, B);
  if (cx.cnt.max().item<int64_t>() >= B) {
    const int64_t i = at::nonzero(cx.cnt >= B).select(1, 0)[0].item<int64_t>();
    TORCH_CHECK_VALUE(false, ctx_collapsed_batch_message(i, B));
  }
  cx.row = at::repeat_interleave(cx.cnt, std::optional<int64_t>(col_in.numel()));
  cx.col = col_in.to(at::kLong).contiguous();
  const Tensor flag = flag_in.to(at::kLong);
  cx.in_p = at::bitwise_and(flag, int64_t(kCtxInP)) != 0;
  cx.clamped = at::bitwise_and(flag, int64_t(kCtxClamped)) != 0;
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
    TORCH_CHECK_VALUE(false, ctx_empty_reciprocal_message(i));
  }
  cx.r_ptr = row_ptr(cx.r_row, B);
  {  // W = H on N: |N(i) ∩ N(j)| = #{l ∈ N(i) : l ∈ N(j)}
    auto [owner, within] = expand(cx.cnt.index_select(0, cx.row));
    const Tensor l = cx.col.index_select(0, cx.ptr.index_select(0, cx.row.index_select(0, owner)) + within);
    const Tensor hit = find(cx.key, cx.col.index_select(0, owner) * B + l).second;
    const Tensor n = sum_at(cx.col.numel(), owner, hit.to(at::kDouble));
    cx.w = ctx_h(n, cx.a.index_select(0, cx.row), cx.a.index_select(0, cx.col), double(B));
  }
  {  // Z_ij = (1/r_i) Σ_{l ∈ R(i)} W_lj; js = ½(Z + Zᵀ)
    auto [owner, within] = expand(cx.cnt.index_select(0, cx.r_col));
    const Tensor e2 = cx.ptr.index_select(0, cx.r_col.index_select(0, owner)) + within;
    auto [zk, zs] =
        coalesce(cx.r_row.index_select(0, owner) * B + cx.col.index_select(0, e2), cx.w.index_select(0, e2));
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
Tensor l_ctx(const Context& cx, const Tensor& cls) {
  const int64_t B = cx.B;
  const Tensor i = rows_of(cx.js_key, B), j = cx.js_key - i * B;
  const Tensor v = cx.js_val;
  const Tensor same = cls.index_select(0, i) == cls.index_select(0, j);
  const Tensor zero = at::zeros({}, v.options());
  const Tensor part = at::where(i != j, v * v - at::where(same, 2.0 * v, zero), zero).sum();
  const Tensor sizes = std::get<2>(at::_unique2(cls, true, false, true)).to(at::kDouble);
  return ((sizes * sizes).sum() - double(B) + part) / (double(B) * double(B));
}

// G_ij = dL_ctx/dZ_ij = β (js_ij − y_ij) [i ≠ j].
Tensor G(const Context& cx, const Tensor& cls, const Tensor& i, const Tensor& j, double beta) {
  const Tensor js = lookup(cx.js_key, cx.js_val, i * cx.B + j);
  const Tensor y = (cls.index_select(0, i) == cls.index_select(0, j)).to(at::kDouble);
  return at::where(i == j, at::zeros({}, js.options()), beta * (js - y));
}

// The backward's parts before they are applied (dL_ctx/dS = 2·ste_slope·C ⊙ (SP + u 1ᵀ + LB)):
// SP (sorted keys, float64 values, clamped entries 0), u, and ρ_i(κ) = Σ_{m ∈ R(i), class κ} 1/r_m as sorted keys
// i·n_cls + κ (LB_ij = −(β/2) ρ_i(κ_j) (c_i − a_j) / c_i). The CPU Backward::prepare / sparse_part vectorised.
struct Parts {
  Tensor sp_key, sp_val, u, rho_key, rho_val;
  int64_t n_cls;
  double beta;
};

Parts backward_parts(const Context& cx, const Tensor& cls) {
  const int64_t B = cx.B;
  const double Bd = double(B), beta = 2.0 / (Bd * Bd);
  const auto dopt = cx.a.options();
  const Tensor &row = cx.row, &col = cx.col, &ptr = cx.ptr, &a = cx.a, &c = cx.c, &r = cx.r, &cnt = cx.cnt;
  // gr_i = −Σ_j G_ij Z_ij / r_i
  const Tensor zi = rows_of(cx.z_key, B), zj = cx.z_key - zi * B;
  const Tensor gr = -sum_at(B, zi, G(cx, cls, zi, zj, beta) * cx.z_val) / r;
  Tensor gwn;
  {  // GW_il = Σ_{m ∈ R(i)} G_ml / r_m on the entries (i, l) of N
    const Tensor r_cnt = cx.r_ptr.narrow(0, 1, B) - cx.r_ptr.narrow(0, 0, B);
    auto [owner, within] = expand(r_cnt.index_select(0, row));
    const Tensor m = cx.r_col.index_select(0, cx.r_ptr.index_select(0, row.index_select(0, owner)) + within);
    gwn = sum_at(col.numel(), owner, G(cx, cls, m, col.index_select(0, owner), beta) / r.index_select(0, m));
  }
  // u_a = −(Σ_{l ∈ N(a)} ½ gwn_al / c_a + Σ_{l : a ∈ N(l)} ½ gwn_la / c_l)
  const Tensor cr = c.index_select(0, row);
  Tensor u = sum_at(B, row, 0.5 * gwn / cr);
  add_at(u, col, 0.5 * gwn / cr);
  u = -u;
  auto GR = [&](const Tensor& aa, const Tensor& bb) {  // GR_ab = (1/r_a) Σ_{j ∈ N(b), j ≠ a} G_aj W_bj + gr_a
    auto [own, wi] = expand(cnt.index_select(0, bb));
    const Tensor e = ptr.index_select(0, bb.index_select(0, own)) + wi;
    const Tensor ai = aa.index_select(0, own), j = col.index_select(0, e);
    const Tensor term = at::where(j == ai, at::zeros({}, dopt), G(cx, cls, ai, j, beta) * cx.w.index_select(0, e));
    return sum_at(aa.numel(), own, term) / r.index_select(0, aa) + gr.index_select(0, aa);
  };
  const Tensor pe = at::nonzero(cx.in_p).reshape(-1);
  const Tensor pr = row.index_select(0, pe), pc = col.index_select(0, pe);
  const Tensor gp = GR(pr, pc) + GR(pc, pr);  // GP_il = P_li (GR_il + GR_li), at e = (l, i)
  std::vector<Tensor> keys, vals;
  Tensor an_key, an_val;
  {  // n_ij = |N(i) ∩ N(j)| over the pairs sharing a neighbour, via NT(l) = {j : l ∈ N(j)}
    const Tensor t_row = row.index_select(0, at::argsort(col * B + row));
    const Tensor t_ptr = row_ptr(col, B);
    const Tensor t_cnt = t_ptr.narrow(0, 1, B) - t_ptr.narrow(0, 0, B);
    auto [owner, within] = expand(t_cnt.index_select(0, col));
    const Tensor cj = t_row.index_select(0, t_ptr.index_select(0, col.index_select(0, owner)) + within);
    std::tie(an_key, an_val) = coalesce(row.index_select(0, owner) * B + cj, at::ones({owner.numel()}, dopt));
  }
  const int64_t n_cls = cls.max().item<int64_t>() + 2;
  const Tensor rr = r.index_select(0, cx.r_col);
  {  // GW' ⊙ H on the support of ag: the js-driven part of GW (Σ_{m ∈ R(i)} (β/r_m) js_mj, j ≠ m) plus the label
     // part's own m = j
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
  {  // the label part of GW times the n part of H: −β ρ_i(κ_j) ½ n_ij (1/a_i + 1/c_i)
    const Tensor ni = rows_of(an_key, B), nj = an_key - ni * B;
    const Tensor rho = lookup(rho_key, rho_val, ni * n_cls + cls.index_select(0, nj));
    keys.push_back(an_key);
    vals.push_back(at::where(rho != 0.0, -beta * rho * 0.5 * an_val * s_ac.index_select(0, ni), at::zeros({}, dopt)));
  }
  // GI N − (GJ M − row sums): for e = (i, l) ∈ N, ½ gwn_e (1/a_i + 1/c_i) at (i, j), j ∈ N(l);
  // GIᵀ N − (GJᵀ M − column sums): for e = (l, i) ∈ N, ½ gwn_e (1/a_l + 1/c_l) at (i, j), j ∈ N(l)
  const Tensor coef = 0.5 * gwn * s_ac.index_select(0, row);
  for (int side = 0; side < 2; ++side) {
    const Tensor& lrow = side == 0 ? col : row;
    const Tensor& okey = side == 0 ? row : col;
    auto [owner, within] = expand(cnt.index_select(0, lrow));
    keys.push_back(okey.index_select(0, owner) * B +
                   col.index_select(0, ptr.index_select(0, lrow.index_select(0, owner)) + within));
    vals.push_back(coef.index_select(0, owner));
  }
  keys.push_back(pc * B + pr);
  vals.push_back(gp);
  auto [sp_key, sp_val] = coalesce(at::cat(keys), at::cat(vals));
  {  // C_ij = 0 only on flagged entries of N (−D = 0 passes every test)
    auto [pos, hit] = find(cx.key, sp_key);
    sp_val = at::where(hit & cx.clamped.index_select(0, pos), at::zeros({}, dopt), sp_val);
  }
  return {sp_key, sp_val, u, rho_key, rho_val, n_cls, beta};
}

// (G + Gᵀ) F, float64, with u 1ᵀ and LB through per-class sums of F and the mask C as corrections −(u_i + LB_ij)
// on the clamped entries of N.
Tensor apply_grad(const Context& cx, const Tensor& cls, const Parts& p, const Tensor& rows) {
  const int64_t B = cx.B, n_cls = p.n_cls;
  const Tensor F = rows.to(at::kDouble);
  const auto dopt = F.options();
  const Tensor &a = cx.a, &c = cx.c, &u = p.u;
  // label block: sv_i(κ) = −(β/2) ρ_i(κ) / c_i; unmasked G F and Gᵀ F of u 1ᵀ + LB by per-class sums
  const Tensor ri = rows_of(p.rho_key, n_cls), rk = p.rho_key - ri * n_cls;
  const Tensor sv = -0.5 * p.beta * p.rho_val / c.index_select(0, ri);
  Tensor SF = at::zeros({n_cls, F.size(1)}, dopt), SaF = at::zeros({n_cls, F.size(1)}, dopt);
  add_at(SF, cls, F);
  add_at(SaF, cls, a.unsqueeze(1) * F);
  const Tensor ci = c.index_select(0, ri).unsqueeze(1);
  Tensor out = u.unsqueeze(1) * F.sum(0, true) + (u.unsqueeze(1) * F).sum(0, true);
  add_at(out, ri, sv.unsqueeze(1) * (ci * SF.index_select(0, rk) - SaF.index_select(0, rk)));
  const Tensor Fi = F.index_select(0, ri);
  Tensor A = at::zeros({n_cls, F.size(1)}, dopt), Bk = at::zeros({n_cls, F.size(1)}, dopt);
  add_at(A, rk, (sv.unsqueeze(1) * ci) * Fi);
  add_at(Bk, rk, sv.unsqueeze(1) * Fi);
  out += A.index_select(0, cls) - a.unsqueeze(1) * Bk.index_select(0, cls);
  // mask C: −(u_i + LB_ij) on the clamped entries of N, applied with SP
  const Tensor ce = at::nonzero(cx.clamped).reshape(-1);
  const Tensor cri = cx.row.index_select(0, ce), crj = cx.col.index_select(0, ce);
  const Tensor lb = -0.5 * p.beta * lookup(p.rho_key, p.rho_val, cri * n_cls + cls.index_select(0, crj)) /
                    c.index_select(0, cri) * (c.index_select(0, cri) - a.index_select(0, crj));
  const Tensor sp_row = rows_of(p.sp_key, B);
  const Tensor gi = at::cat({sp_row, cri}), gj = at::cat({p.sp_key - sp_row * B, crj});
  apply_sparse(out, F, gi, gj, at::cat({p.sp_val, -(u.index_select(0, cri) + lb)}));
  return out;
}

}  // namespace

Tensor loss(const Tensor& nbr_ptr, const Tensor& nbr, const Tensor& nbr_flags, const Tensor& labels) {
  check_lists("contextual_stage_loss", nbr_ptr, nbr, nbr_flags, labels);
  const Context cx = build_context(nbr_ptr, nbr, nbr_flags, labels.size(0));
  return l_ctx(cx, labels);
}

Tensor grad(const Tensor& nbr_ptr, const Tensor& nbr, const Tensor& nbr_flags, const Tensor& labels,
            const Tensor& rows) {
  check_lists("contextual_stage_grad", nbr_ptr, nbr, nbr_flags, labels);
  check_rows("contextual_stage_grad", rows, labels);
  const Context cx = build_context(nbr_ptr, nbr, nbr_flags, labels.size(0));
  const Tensor cls = classes_of(labels).id;
  return apply_grad(cx, cls, backward_parts(cx, cls), rows);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> grad_parts(const Tensor& nbr_ptr, const Tensor& nbr,
                                                             const Tensor& nbr_flags, const Tensor& labels,
                                                             const Tensor& rows) {
  check_lists("contextual_stage_grad_parts", nbr_ptr, nbr, nbr_flags, labels);
  check_rows("contextual_stage_grad_parts", rows, labels);
  const int64_t B = labels.size(0);
  const Context cx = build_context(nbr_ptr, nbr, nbr_flags, B);
  const Classes cl = classes_of(labels);
  const Parts p = backward_parts(cx, cl.id);
  const Tensor F = rows.contiguous();
  Tensor sparse = at::zeros_like(F);
  const Tensor sp_row = rows_of(p.sp_key, B);
  apply_sparse(sparse, F, sp_row, p.sp_key - sp_row * B, p.sp_val.to(F.scalar_type()));
  // label block slots: per row i the classes κ of R(i) (as labels) and −(β/2) ρ_i(κ) / c_i
  const Tensor ri = rows_of(p.rho_key, p.n_cls), rk = p.rho_key - ri * p.n_cls;
  const Tensor s_ptr = row_ptr(ri, B);
  const Tensor s_cnt = s_ptr.narrow(0, 1, B) - s_ptr.narrow(0, 0, B);
  const int64_t n_slots = std::max<int64_t>(1, s_cnt.max().item<int64_t>());
  const Tensor slot = at::arange(ri.numel(), ri.options()) - s_ptr.index_select(0, ri);
  const Tensor flat = ri * n_slots + slot;
  Tensor slot_label = at::full({B * n_slots}, -2, labels.options());
  Tensor slot_coef = at::zeros({B * n_slots}, cx.a.options());
  slot_label.index_copy_(0, flat, cl.label.index_select(0, rk));
  slot_coef.index_copy_(0, flat, -0.5 * p.beta * p.rho_val / cx.c.index_select(0, ri));
  return {sparse, p.u, cx.a, slot_label.view({B, n_slots}), slot_coef.view({B, n_slots})};
}

}  // namespace ctx_stage
}  // namespace flashdml

TORCH_LIBRARY_IMPL(flashdml, CompositeExplicitAutograd, m) {
  m.impl("contextual_stage_loss", &flashdml::ctx_stage::loss);
  m.impl("contextual_stage_grad", &flashdml::ctx_stage::grad);
  m.impl("contextual_stage_grad_parts", &flashdml::ctx_stage::grad_parts);
}
