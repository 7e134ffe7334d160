"""The sparse stage of the contextual loss (SPEC 2.5 steps 4-8 and the closed-form backward) as vectorised torch ops
on the device tensors of the neighbour lists: a mirror of csrc/cpu/contextual_sparse.h and the CPU ``Backward``
(csrc/cpu/contextual_backward.h), used by the Triton backend (triton_kernels/contextual.py).

Everything is O(B·k²) time and memory (k² meaning products of neighbourhood sizes): entries are addressed by int64
keys ``row·B + col``; the N(i) lists come row-major with ascending columns, so their keys are sorted and a lookup
of (i, j) is one ``searchsorted``. Sparse products (|N(i) ∩ N(j)|, Z = R W / r, the sparse part of dL_ctx/dS) are
formed by expanding each row's list over the lists it touches (``_expand``) and summing equal keys in float64
(``_coalesce``). Nothing B×B is formed. Counts and the per-element formulas (ctx_h, the coefficients of the CPU
backward) are the same float64 expressions as the C++; only the order of float64 sums may differ (last bits).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

_CHUNK = 1 << 16  # entries per gather chunk of apply_sparse: O(_CHUNK·d) temporary memory


def _expand(counts: Tensor) -> tuple[Tensor, Tensor]:
    """For counts [n]: (owner, within) of length Σ counts — element t belongs to owner[t], position within[t]."""
    counts = counts.to(torch.int64)
    total = int(counts.sum()) if counts.numel() else 0
    dev = counts.device
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts, output_size=total)
    start = torch.cumsum(counts, 0) - counts
    return owner, torch.arange(total, device=dev) - start[owner]


def _find(keys: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """(position, hit) of the queries q in the sorted keys."""
    if keys.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(q, dtype=torch.bool)
    pos = torch.searchsorted(keys, q).clamp_(max=keys.numel() - 1)
    return pos, keys[pos] == q


def _lookup(keys: Tensor, vals: Tensor, q: Tensor) -> Tensor:
    pos, hit = _find(keys, q)
    return torch.where(hit, vals[pos] if vals.numel() else torch.zeros_like(q, dtype=vals.dtype), 0.0)


def _coalesce(keys: Tensor, vals: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique keys and the float64 sums of their values."""
    uk, inv = torch.unique(keys, sorted=True, return_inverse=True)
    return uk, torch.zeros(uk.numel(), dtype=torch.float64, device=keys.device).index_add_(0, inv, vals.double())


def _row_ptr(rows: Tensor, B: int) -> Tensor:
    ptr = torch.zeros(B + 1, dtype=torch.int64, device=rows.device)
    ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=B), 0)
    return ptr


@dataclasses.dataclass
class Context:
    B: int
    ptr: Tensor  # N as CSR: int64 [B + 1]
    row: Tensor  # int64 [nnz]
    col: Tensor  # int64 [nnz]
    in_p: Tensor  # bool [nnz]
    clamped: Tensor  # bool [nnz]
    key: Tensor  # row·B + col, sorted
    a: Tensor  # |N(i)|, float64 [B]
    c: Tensor  # B − a
    r: Tensor  # |R(i)|
    r_row: Tensor  # R entries (sorted keys), int64
    r_col: Tensor
    r_ptr: Tensor
    w: Tensor  # W on the entries of N, float64 [nnz]
    z_key: Tensor  # Z = R W / r (sorted keys, float64 values)
    z_val: Tensor
    js_key: Tensor  # js = ½(Z + Zᵀ)
    js_val: Tensor


def ctx_h(n: Tensor, a_i: Tensor, a_j: Tensor, B: float) -> Tensor:
    """H_ij = ½(n/a_i + (B − a_i − a_j + n)/(B − a_i)) (flashdml/contextual.h ctx_h)."""
    return 0.5 * (n / a_i + (B - a_i - a_j + n) / (B - a_i))


def build_context(ptr: Tensor, col: Tensor, flag: Tensor, B: int) -> Context:
    """Steps 4-7 of SPEC 2.5 from N(i) (CSR: ptr, ascending int32 columns, flags 1 = in P, 2 = clamped).
    Raises ValueError for a collapsed batch (|N(i)| = B) or an empty R(i), with the CPU op's messages."""
    dev = col.device
    ptr = ptr.to(torch.int64)
    cnt = ptr[1:] - ptr[:-1]
    full = torch.nonzero(cnt >= B).reshape(-1)
    if full.numel():
        i = int(full[0])
        raise ValueError(
            f"contextual_loss: collapsed batch — every sample is in the k-neighbourhood of row {i} (|N(i)| = B = {B}), "
            "so the complement intersection J is 0/0. The embeddings are (nearly) identical within eps; use a "
            "smaller eps or k, or a batch with more spread.")
    row = torch.repeat_interleave(torch.arange(B, device=dev), cnt, output_size=col.numel())
    col = col.to(torch.int64)
    flag = flag.to(torch.int64)
    in_p, clamped = (flag & 1) != 0, (flag & 2) != 0
    key = row * B + col
    a = cnt.double()
    c = float(B) - a
    # R(i) = {j ∈ P(i) : i ∈ P(j)}
    pos, hit = _find(key, col * B + row)
    in_r = in_p & hit & in_p[pos]
    r_row, r_col = row[in_r], col[in_r]
    r = torch.bincount(r_row, minlength=B).double()
    empty = torch.nonzero(r <= 0).reshape(-1)
    if empty.numel():
        raise ValueError(f"contextual_loss: row {int(empty[0])} has an empty reciprocal half-neighbourhood R(i) "
                         "(|R(i)| = 0)")
    r_ptr = _row_ptr(r_row, B)
    # W_ij = H_ij on N: |N(i) ∩ N(j)| = #{l ∈ N(i) : l ∈ N(j)}
    owner, within = _expand(cnt[row])
    l = col[ptr[row[owner]] + within]
    n = torch.zeros(col.numel(), dtype=torch.float64, device=dev).index_add_(
        0, owner, _find(key, col[owner] * B + l)[1].double())
    w = ctx_h(n, a[row], a[col], float(B))
    # Z_ij = (1/r_i) Σ_{l ∈ R(i)} W_lj, then js = ½(Z + Zᵀ)
    owner, within = _expand(cnt[r_col])
    e2 = ptr[r_col[owner]] + within
    z_key, z_sum = _coalesce(r_row[owner] * B + col[e2], w[e2])
    zi = torch.div(z_key, B, rounding_mode="floor")
    z_val = z_sum * (1.0 / r[zi])
    zt_key = (z_key - zi * B) * B + zi
    js_key, js_sum = _coalesce(torch.cat([z_key, zt_key]), torch.cat([z_val, z_val]))
    return Context(B, ptr, row, col, in_p, clamped, key, a, c, r, r_row, r_col, r_ptr, w, z_key, z_val, js_key,
                   0.5 * js_sum)


def l_ctx(cx: Context, cls: Tensor) -> Tensor:
    """L_ctx = (1/B²)[Σ_{i≠j} y_ij + Σ_{(i,j) ∈ supp js, i≠j} (js² − 2 y js)] (float64 0-dim)."""
    B = cx.B
    i = torch.div(cx.js_key, B, rounding_mode="floor")
    j = cx.js_key - i * B
    v = cx.js_val
    part = torch.where(i != j, v * v - torch.where(cls[i] == cls[j], 2.0 * v, 0.0), 0.0).sum()
    sizes = torch.unique(cls, return_counts=True)[1].double()
    return ((sizes * sizes).sum() - float(B) + part) / (float(B) * float(B))


def _G(cx: Context, cls: Tensor, i: Tensor, j: Tensor, beta: float) -> Tensor:
    """G_ij = β (js_ij − y_ij) [i ≠ j]."""
    js = _lookup(cx.js_key, cx.js_val, i * cx.B + j)
    return torch.where(i == j, 0.0, beta * (js - (cls[i] == cls[j]).double()))


@dataclasses.dataclass
class BackwardParts:
    sp_row: Tensor  # the sparse part SP of GN + GP (clamped entries removed), float64 values
    sp_col: Tensor
    sp_val: Tensor
    u: Tensor  # row constants, float64 [B]
    slot_cls: Tensor  # label block: per row the classes κ of R(i) (int32 [B, n_slots], −2 unused)
    slot_val: Tensor  # and −(β/2) ρ_i(κ) / c_i (fp32 [B, n_slots]); LB_ij = slot_val · (c_i − a_j)


def backward_parts(cx: Context, cls: Tensor) -> BackwardParts:
    """dL_ctx/dZ-driven parts of the closed-form gradient (unscaled: dL_ctx/dS = 2·ste_slope·C ⊙ (SP + u 1ᵀ + LB)),
    the CPU ``Backward::prepare`` / ``sparse_part`` vectorised."""
    B, dev = cx.B, cx.col.device
    Bd = float(B)
    beta = 2.0 / (Bd * Bd)
    row, col, ptr, a, c, r = cx.row, cx.col, cx.ptr, cx.a, cx.c, cx.r
    cnt = ptr[1:] - ptr[:-1]
    # gr_i = −Σ_j G_ij Z_ij / r_i
    zi = torch.div(cx.z_key, B, rounding_mode="floor")
    zj = cx.z_key - zi * B
    gr = -torch.zeros(B, dtype=torch.float64, device=dev).index_add_(0, zi, _G(cx, cls, zi, zj, beta) * cx.z_val) / r
    # gwn_e = GW_il = Σ_{m ∈ R(i)} G_ml / r_m on the entries e = (i, l) of N
    r_cnt = cx.r_ptr[1:] - cx.r_ptr[:-1]
    owner, within = _expand(r_cnt[row])
    m = cx.r_col[cx.r_ptr[row[owner]] + within]
    gwn = torch.zeros(col.numel(), dtype=torch.float64, device=dev).index_add_(
        0, owner, _G(cx, cls, m, col[owner], beta) / r[m])
    # u_a = −(Σ_{l ∈ N(a)} ½ gwn_al / c_a + Σ_{l : a ∈ N(l)} ½ gwn_la / c_l)
    s = torch.zeros(B, dtype=torch.float64, device=dev)
    s.index_add_(0, row, 0.5 * gwn / c[row])
    s.index_add_(0, col, 0.5 * gwn / c[row])
    u = -s

    def GR(aa: Tensor, bb: Tensor) -> Tensor:  # GR_ab = (1/r_a) Σ_{j ∈ N(b), j ≠ a} G_aj W_bj + gr_a
        own, wi = _expand(cnt[bb])
        e = ptr[bb[own]] + wi
        ai, j = aa[own], col[e]
        term = torch.where(j == ai, 0.0, _G(cx, cls, ai, j, beta) * cx.w[e])
        acc = torch.zeros(aa.numel(), dtype=torch.float64, device=dev).index_add_(0, own, term)
        return acc / r[aa] + gr[aa]

    pe = torch.nonzero(cx.in_p).reshape(-1)
    gp = GR(row[pe], col[pe]) + GR(col[pe], row[pe])  # GP_il = P_li (GR_il + GR_li), at e = (l, i)
    keys, vals = [], []
    # an: n_ij = |N(i) ∩ N(j)| over the pairs sharing a neighbour (via NT(l) = {j : l ∈ N(j)})
    t_order = torch.argsort(col * B + row)
    t_row = row[t_order]
    t_ptr = _row_ptr(col, B)
    t_cnt = t_ptr[1:] - t_ptr[:-1]
    owner, within = _expand(t_cnt[col])
    an_key, an_val = _coalesce(row[owner] * B + t_row[t_ptr[col[owner]] + within],
                               torch.ones(owner.numel(), dtype=torch.float64, device=dev))
    # ag: the js-driven part of GW (Σ_{m ∈ R(i)} (β/r_m) js_mj, j ≠ m, plus the label part's own m = j), and ρ_i(κ)
    js_i = torch.div(cx.js_key, B, rounding_mode="floor")
    js_ptr = _row_ptr(js_i, B)
    js_cnt = js_ptr[1:] - js_ptr[:-1]
    owner, within = _expand(js_cnt[cx.r_col])
    q = js_ptr[cx.r_col[owner]] + within
    jj = cx.js_key[q] - js_i[q] * B
    mo = cx.r_col[owner]
    wm = beta / r[mo]
    ag_key, ag_val = _coalesce(torch.cat([(cx.r_row[owner] * B + jj)[jj != mo], cx.r_row * B + cx.r_col]),
                               torch.cat([(wm * cx.js_val[q])[jj != mo], beta / r[cx.r_col]]))
    n_cls = int(cls.max()) + 2 if cls.numel() else 1
    rho_key, rho_val = _coalesce(cx.r_row * n_cls + cls[cx.r_col], 1.0 / r[cx.r_col])
    # GW' ⊙ H on the support of ag
    gi = torch.div(ag_key, B, rounding_mode="floor")
    gj = ag_key - gi * B
    keys.append(ag_key)
    vals.append(ag_val * ctx_h(_lookup(an_key, an_val, ag_key), a[gi], a[gj], Bd))
    # the label part of GW times the n part of H: −β ρ_i(κ_j) ½ n_ij (1/a_i + 1/c_i)
    ni = torch.div(an_key, B, rounding_mode="floor")
    nj = an_key - ni * B
    rho = _lookup(rho_key, rho_val, ni * n_cls + cls[nj])
    s_ac = 1.0 / a + 1.0 / c
    keys.append(an_key)
    vals.append(torch.where(rho != 0.0, -beta * rho * 0.5 * an_val * s_ac[ni], 0.0))
    # GI N − (GJ M − row sums): for e = (i, l) ∈ N, ½ gwn_e (1/a_i + 1/c_i) at (i, j), j ∈ N(l);
    # GIᵀ N − (GJᵀ M − column sums): for e = (l, i) ∈ N, ½ gwn_e (1/a_l + 1/c_l) at (i, j), j ∈ N(l)
    coef = 0.5 * gwn * s_ac[row]
    for lrow, okey in ((col, row), (row, col)):
        owner, within = _expand(cnt[lrow])
        keys.append(okey[owner] * B + col[ptr[lrow[owner]] + within])
        vals.append(coef[owner])
    keys.append(col[pe] * B + row[pe])
    vals.append(gp)
    sp_key, sp_val = _coalesce(torch.cat(keys), torch.cat(vals))
    pos, hit = _find(cx.key, sp_key)  # C_ij = 0 only on flagged entries of N (−D = 0 passes every test)
    sp_val = torch.where(hit & cx.clamped[pos], 0.0, sp_val)
    sp_row = torch.div(sp_key, B, rounding_mode="floor")
    # label block slots: per row i the classes of R(i) and −(β/2) ρ_i(κ) / c_i
    ri = torch.div(rho_key, n_cls, rounding_mode="floor")
    rk = rho_key - ri * n_cls
    s_ptr = _row_ptr(ri, B)
    s_cnt = s_ptr[1:] - s_ptr[:-1]
    n_slots = max(1, int(s_cnt.max()))
    slot = torch.arange(ri.numel(), device=dev) - s_ptr[ri]
    slot_cls = torch.full((B, n_slots), -2, dtype=torch.int32, device=dev)
    slot_val = torch.zeros((B, n_slots), dtype=torch.float32, device=dev)
    slot_cls[ri, slot] = rk.to(torch.int32)
    slot_val[ri, slot] = (-0.5 * beta * rho_val / c[ri]).float()
    return BackwardParts(sp_row, sp_key - sp_row * B, sp_val, u, slot_cls, slot_val)


def apply_sparse(out: Tensor, F: Tensor, rows: Tensor, cols: Tensor, vals: Tensor) -> None:
    """out += G F + Gᵀ F for the sparse G (rows, cols, vals); O(_CHUNK·d) temporary memory."""
    for c0 in range(0, rows.numel(), _CHUNK):
        r, c, v = rows[c0:c0 + _CHUNK], cols[c0:c0 + _CHUNK], vals[c0:c0 + _CHUNK, None]
        out.index_add_(0, r, v * F[c])
        out.index_add_(0, c, v * F[r])
