"""Triton kernels for the contextual loss (docs/spec.md §2.5); the sparse stage runs as the C++ ATen ops
``torch.ops.flashdml.contextual_stage_loss / contextual_stage_grad_parts`` (csrc/aten/contextual_stage.cpp, the same
stage the CUDA C++ op calls; they need flashdml._C) on the device tensors of the neighbour lists.

The ops have the schemas of the C++ ``flashdml::contextual_fwd / _bwd`` (``flashdml._schemas.SCHEMAS``): x contiguous
fp32 / fp16 / bf16 [B, d], labels int64 [B]; with ``normalize`` the op L2-normalises the rows itself
(``flashdml._math.normalized_rows``) and returns the gradient with respect to the raw rows.

* ``torch.ops.flashdml_triton.contextual_fwd(x, labels, k, eps, context_weight, contrastive_weight, reg_weight,
  reg_target, pos_margin, neg_margin, ste_slope, normalize) -> (loss [] fp32, terms [3] fp32 (L_ctx, L_reg, L_con),
  ptr int64 [B + 1], col int32 [nnz], flag uint8 [nnz], counts int64 [2])`` — N(i) as CSR (columns ascending,
  flags FLAG_IN_P = in P(i), FLAG_CLAMPED = clamped C_ij = 0) and the hard positive / negative counts of L_con.
* ``torch.ops.flashdml_triton.contextual_bwd(grad_loss, x, labels, <the same scalars>, normalize, ptr, col, flag,
  counts) -> dx`` (in x's dtype).

``fwd_impl`` / ``bwd_impl`` below take rows that are already normalised (tests call them directly).

Forward, nothing B×B stored:
 1. ``_ctx_stats_kernel`` streams S tiles (row block x column split, tensor-core ``tl.dot`` via ``_tiles.s_tile``):
    per row the running top-K of ``−D = −max(2 − 2S, 0)`` (values only, the query included; the bitonic
    ``_topk.row_topk`` / ``merge_sorted`` of the kNN kernel, a tile skipped when nothing in it beats the K-th), and
    the margin-contrastive hinge sums / counts (``_tiles.hard_pairs``, strict, diagonal kept).
    ``_tiles.hinge_finalize_kernel`` reduces the hinge partials; t_i / h_i = the k-th / (k//2)-th of the
    merged split lists (torch.topk over splits·K values per row). k > 64 takes the thresholds from the kNN op
    (``selection.knn_impl``, same BLOCK_K, so the same fp32 S); this kernel then only supplies the hinge terms.
 2. ``_ctx_list_kernel`` recomputes S (same BLOCK_K: on the GPU the same fp32 values; row block x column split,
    ``_tiles.num_splits``) and writes, per row and split, the split's columns with ``fl(−D + ε) >= t_i`` in
    ascending order into a fixed-capacity list (and the count); the row's split lists are concatenated in split
    order; rows with a split count over the capacity are rerun, gathered, with a capacity of their largest count:
    exact always, and the same lists for any number of splits.
 3. The sparse stage (|N(i) ∩ N(j)|, W, R, Z, js, L_ctx: ``contextual_stage_loss``) on the device in O(B·k²),
    L_reg in O(B·d).
Backward (docs/spec.md's closed form, the CPU split of dL_ctx/dS into sparse + row-constant + label-block parts, from
``contextual_stage_grad_parts``): that op applies the sparse part (O(k²) entries per row, masked by the forward's
clamp flags) with O(nnz·d) gathers; the row-constant part u_i, the label block LB_ij = ρ'_i(κ_j)(c_i − a_j), the
L_reg constant and the hinge gradients are formed tile by tile in one recompute pass (``_ctx_grad_kernel``, dx and
dyᵀ variants, fp32 weights, split-tf32 / ieee dot: ``_grad_precision``) and reduced over splits in a fixed order. Deterministic (the sparse
stage's sums too: sorted, fixed-order segment sums, no atomics). Each gradient program (row block × column split)
computes each of its S tiles once and walks all of d for it, BLOCK_D columns at a time (``_tiles.accumulate_chunks``;
dx: 128 columns, so d <= 128 stays in registers, dy: 16 / 32), whatever d is.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _debug, _math
from .._schemas import triton_op  # the op's schema and fake kernel from the one table
from . import _tiles
from ._aot import AOTSpec, spec_precisions, with_alignments
from ._tiles import (HINGE_FINAL_BLOCK, accumulate_chunks, chunk_dot, hard_pairs, hinge_finalize_kernel, row_chunk,
                     s_tile, wrap_triton)
from ._topk import merge_sorted, row_topk
from .selection import KNN_CONFIGS, knn_impl

# Tile configurations. Every S tile of the forward, the list pass and the backward uses the kNN kernel's BLOCK_K
# per dtype (64 fp16/bf16, 16 fp32), so all passes (and the kNN fallback for k > 64) see the same fp32 S entry.
# fp16 / bf16 at 4 warps, 1 stage (8 warps: 8 B of stack on sm_90; 2 stages: K = 64 spills on sm_90 for a ragged
# B); fp32 at the kNN's 8 warps, 2 stages (4 warps: spills on sm_90). ptxas -v via tests/test_triton_aot.py.
# fp32 with TF32 (_tiles.precision_config): the kNN's 64-row wgmma tiles, at 4 warps and 1 stage (8 warps: 8 B of
# stack on sm_90 with 1 or 2 stages; 4 warps with 2 stages: K = 64 spills 8 B on sm_90 for a ragged B).
STATS_CONFIGS = {t: (dict(c, num_warps=4, num_stages=1) if t != torch.float32
                     else dict(c, TF32=dict(c["TF32"], num_warps=4, num_stages=1)))
                 for t, c in KNN_CONFIGS.items()}
_LIST_16 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=2)
_LIST_32 = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2,  # 8 warps spill (sm_90, ragged B)
                TF32=dict(BLOCK_M=64, num_warps=8))  # TF32: 64-row wgmma tiles; 4 warps spill with 64 rows
LIST_CONFIGS = {torch.float16: _LIST_16, torch.bfloat16: _LIST_16, torch.float32: _LIST_32}
# dx covers d <= 128 in one chunk (a larger d is walked chunk by chunk, each S tile computed once); dy only 32 (64
# spills: its S tile is [other, own] and the transposed weights go through shared memory).
_G16 = (dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, BLOCK_D=128, num_warps=8, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_D=16, num_warps=8, num_stages=1))
# CHUNK_D: the chunk width when d spans several chunks (_tiles.chunk_config; fp32 dx at 32 / 64 spilled on sm_90).
# TF32 dy: its S tile is [other, own] = [BLOCK_N, BLOCK_M], so BLOCK_N = 64 for a wgmma tile on sm_90; the
# gradient product stays exact (GPREC "ieee", FMA), so 32 own rows are fine, and 64 own rows spill.
_G32 = (dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, BLOCK_D=128, CHUNK_D=16, num_warps=8, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, BLOCK_D=32, num_warps=4, num_stages=2,
             TF32=dict(BLOCK_M=32, BLOCK_N=64, num_warps=8)))
GRAD_CONFIGS = {torch.float16: _G16, torch.bfloat16: _G16, torch.float32: _G32}  # [dtype][dy]
# With TF32 as by default, every pass (and the kNN fallback) must compute S with the same BLOCK_K.
assert all(len({_tiles.precision_config(c, t, p)["BLOCK_K"]
                for c in (LIST_CONFIGS[t], STATS_CONFIGS[t], KNN_CONFIGS[t], *GRAD_CONFIGS[t])}) == 1
           for t in LIST_CONFIGS for p in ("ieee", "tf32")), "every pass must compute S with the same BLOCK_K"
TOPK_KS = (16, 64)  # register list lengths of the stats kernel (<= BLOCK_N); k > 64: its K = 64 list is unused
# (the hinge terms still come from it) and the thresholds come from the kNN op
DEFAULT_CAP = 64  # neighbour list capacity per row: max(DEFAULT_CAP, 4k) rounded up to 16
# The flag bits of the neighbour lists: kCtxInP / kCtxClamped of csrc/include/flashdml/contextual.h, the list format
# the C++ sparse stage reads.
FLAG_IN_P = tl.constexpr(1)
FLAG_CLAMPED = tl.constexpr(2)


@triton.jit
def _ctx_stats_kernel(
    x_ptr, key_ptr, part_ptr, psum_ptr, pcnt_ptr, pos_margin, neg_margin, B, D, cols_per_split,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K: tl.constexpr,
):
    """Program (row block, split): part[split, i, :] = the K largest −D_ij over the split's columns, descending
    (-inf where fewer); psum / pcnt[0 / 1, split, i] = row i's hinge sums (fp64) / counts of the hard
    positives / negatives of L_con over the split (strict, diagonal kept). Per-row partials: no cross-warp fp64
    reduction (which put 8 bytes of stack on sm_90)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    mp = tl.full([], pos_margin, tl.float32)
    mn = tl.full([], neg_margin, tl.float32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    lab_r = tl.load(key_ptr + rows, mask=row_ok, other=0)
    ps = tl.zeros([BLOCK_M], tl.float64)
    ns = tl.zeros([BLOCK_M], tl.float64)
    pc = tl.zeros([BLOCK_M], tl.int32)
    nc = tl.zeros([BLOCK_M], tl.int32)
    run = tl.full([BLOCK_M, K], float("-inf"), tl.float32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, B)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        s = s_tile(x_ptr, x_ptr, rows, cols, row_ok, col_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        lab_c = tl.load(key_ptr + cols, mask=col_ok, other=0)
        hp, hn = hard_pairs(s, lab_r, lab_c, rows, cols, row_ok, col_ok, mp, mn, 0, 1)
        ps += tl.sum(tl.where(hp, mp - s, 0.0), 1).to(tl.float64)
        ns += tl.sum(tl.where(hn, s - mn, 0.0), 1).to(tl.float64)
        pc += tl.sum(hp.to(tl.int32), 1)
        nc += tl.sum(hn.to(tl.int32), 1)
        dr = 2.0 - 2.0 * s  # −D = −max(2 − 2s, 0): 2s is exact, so one rounding whether fused or not
        nd = tl.where(col_ok[None, :], tl.where(dr > 0.0, -dr, 0.0), float("-inf"))
        kth = tl.min(run, 1)
        if tl.max(tl.max((nd > kth[:, None]).to(tl.int32), 1), 0) > 0:
            run = merge_sorted(run, row_topk(nd, K, 0))
    out = (pid_s.to(tl.int64) * B + rows)[:, None] * K + tl.arange(0, K)[None, :]
    tl.store(part_ptr + out, run, mask=row_ok[:, None])
    n_part = tl.num_programs(1).to(tl.int64) * B
    at = pid_s.to(tl.int64) * B + rows
    tl.store(psum_ptr + at, ps, mask=row_ok)
    tl.store(psum_ptr + n_part + at, ns, mask=row_ok)
    tl.store(pcnt_ptr + at, pc.to(tl.int64), mask=row_ok)
    tl.store(pcnt_ptr + n_part + at, nc.to(tl.int64), mask=row_ok)


@triton.jit
def _ctx_list_kernel(
    x_ptr, rows_ptr, thr_ptr, col_ptr, flag_ptr, cnt_ptr, eps, n_rows, B, D, cap, cols_per_split,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (row block, split), ns = the number of splits: for the rows rows[r] (r < n_rows),
    cnt[r, split] = |N(i) ∩ the split's columns| and the first min(cnt, cap) of those columns, ascending, in
    col[r, split, :], with flags FLAG_IN_P: u >= h_i (in P(i)), FLAG_CLAMPED: −D == 0; u = fl(−D + ε), N: u >= t_i
    (thr[i] = (t_i, h_i)), docs/spec.md §2.5 step 3's inclusive fp32 tests. The splits cover ascending column
    ranges, so the row's lists read in split order are N(i) in ascending column order."""
    pid_s = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < n_rows
    rows = tl.load(rows_ptr + r, mask=r_ok, other=0)
    t = tl.load(thr_ptr + rows.to(tl.int64) * 2, mask=r_ok, other=0.0)
    h = tl.load(thr_ptr + rows.to(tl.int64) * 2 + 1, mask=r_ok, other=0.0)
    e = tl.full([], eps, tl.float32)
    cnt = tl.zeros([BLOCK_M], tl.int32)
    at = r.to(tl.int64) * tl.num_programs(1) + pid_s  # (r, split) of the [n_rows, ns] counts / lists
    base = at[:, None] * cap
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, B)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        s = s_tile(x_ptr, x_ptr, rows, cols, r_ok, col_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        dr = 2.0 - 2.0 * s  # −D, as in the stats kernel; clamped entries give 0
        nd = tl.where(dr > 0.0, -dr, 0.0)
        u = nd + e
        in_n = r_ok[:, None] & col_ok[None, :] & (u >= t[:, None])
        flag = tl.where(u >= h[:, None], FLAG_IN_P, 0) + tl.where(nd == 0.0, FLAG_CLAMPED, 0)
        n32 = in_n.to(tl.int32)
        slot = cnt[:, None] + tl.cumsum(n32, 1) - n32
        ok = in_n & (slot < cap)
        tl.store(col_ptr + base + slot, tl.broadcast_to(cols[None, :], [BLOCK_M, BLOCK_N]), mask=ok)
        tl.store(flag_ptr + base + slot, flag.to(tl.uint8), mask=ok)
        cnt += tl.sum(n32, 1)
    tl.store(cnt_ptr + at, cnt, mask=r_ok)


@triton.jit
def _ctx_grad_kernel(
    x_ptr, key_ptr, rowv_ptr, a_ptr, scls_ptr, sval_ptr, w_ptr, part_ptr, pos_margin, neg_margin,
    B, D, cols_per_split, n_slots,
    DY: tl.constexpr, ONE_CHUNK: tl.constexpr, PRECISION: tl.constexpr, GPREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The dense part of dL/dS, applied: G_ij = g_reg + [hp] g_hp + [hn] g_hn + C_ij s_ctx (u_i + LB_ij),
    LB_ij = Σ_q [key_j == scls[i, q]] sval[i, q] · (c_i − a_j) (w = (g_reg, g_hp, g_hn, s_ctx), rowv[i] = (u_i, c_i)).
    DY=False: part[split, i, :] = Σ_j G_ij x_j over a block of rows i; DY=True: part[split, j, :] = Σ_i G_ij x_i over
    a block of columns j. The S tile is x_i · x_jᵀ in both (the forward's orientation), computed once: ONE_CHUNK
    (D <= BLOCK_D) keeps G·x in registers, otherwise every tile's product is added to the partial rows chunk by
    chunk (``_tiles.accumulate_chunks``)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    mp = tl.full([], pos_margin, tl.float32)
    mn = tl.full([], neg_margin, tl.float32)
    g_reg = tl.load(w_ptr)
    g_hp = tl.load(w_ptr + 1)
    g_hn = tl.load(w_ptr + 2)
    s_ctx = tl.load(w_ptr + 3)
    own = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    own_ok = own < B
    out_rows = pid_s.to(tl.int64) * B + own
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, B)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        oth = start_n + tl.arange(0, BLOCK_N)
        oth_ok = oth < n_hi
        if DY:
            ii, i_ok, jj, j_ok = oth, oth_ok, own, own_ok
            s = s_tile(x_ptr, x_ptr, ii, jj, i_ok, j_ok, D, PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
        else:
            ii, i_ok, jj, j_ok = own, own_ok, oth, oth_ok
            s = s_tile(x_ptr, x_ptr, ii, jj, i_ok, j_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        lab_i = tl.load(key_ptr + ii, mask=i_ok, other=0)
        lab_j = tl.load(key_ptr + jj, mask=j_ok, other=0)
        u_i = tl.load(rowv_ptr + ii.to(tl.int64) * 2, mask=i_ok, other=0.0)
        c_i = tl.load(rowv_ptr + ii.to(tl.int64) * 2 + 1, mask=i_ok, other=0.0)
        a_j = tl.load(a_ptr + jj, mask=j_ok, other=0.0)
        hp, hn = hard_pairs(s, lab_i, lab_j, ii, jj, i_ok, j_ok, mp, mn, 0, 1)
        rho = tl.zeros(s.shape, tl.float32)
        for q in range(0, n_slots):
            sc = tl.load(scls_ptr + ii.to(tl.int64) * n_slots + q, mask=i_ok, other=-2)
            sv = tl.load(sval_ptr + ii.to(tl.int64) * n_slots + q, mask=i_ok, other=0.0)
            rho += tl.where(lab_j[None, :] == sc[:, None], sv[:, None], 0.0)
        valid = i_ok[:, None] & j_ok[None, :]
        keep = valid & ((2.0 - 2.0 * s) > 0.0)
        g = tl.where(valid, g_reg, 0.0) + tl.where(hp, g_hp, 0.0) + tl.where(hn, g_hn, 0.0)
        g += tl.where(keep, s_ctx * (u_i[:, None] + rho * (c_i[:, None] - a_j[None, :])), 0.0)
        if DY:
            g = tl.trans(g)
        if ONE_CHUNK:
            b_at, b_mask = row_chunk(x_ptr, oth.to(tl.int64), oth_ok, 0, D, BLOCK_D)
            acc = chunk_dot(g, tl.load(b_at, mask=b_mask, other=0.0), acc, 2, GPREC)
        else:
            accumulate_chunks(g, x_ptr, oth.to(tl.int64), oth_ok, part_ptr, out_rows, own_ok, D, start_n > n_lo,
                              2, GPREC, BLOCK_D)
    if ONE_CHUNK:
        at, mask = row_chunk(part_ptr, out_rows, own_ok, 0, D, BLOCK_D)
        tl.store(at, acc, mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
def _grad_precision(dtype: torch.dtype) -> str:
    """The dot of ``_ctx_grad_kernel``: fp32 weights G times the rows upcast to fp32. fp32 input: exact ("ieee").
    fp16 / bf16 input: "tf32" through ``split_tf32_dot`` — the rows are exact in TF32 and G is split into a TF32
    head and tail (two products, G kept to ~2^-21; one "tf32" product would round G, the regulariser and hinge
    constants included, to 2^-11), on tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _stage_ops():
    """The flashdml:: namespace holding the contextual_stage_* ops (registered by flashdml._C)."""
    ops = torch.ops.flashdml
    if not hasattr(ops, "contextual_stage_loss"):
        raise RuntimeError("flashdml: the Triton contextual loss runs its sparse stage as the C++ ops "
                           "flashdml::contextual_stage_*, and flashdml._C is not loaded; build it with "
                           "`pip install -e . --no-build-isolation`")
    return ops


def _check(x: Tensor, labels: Tensor) -> None:
    _tiles.check_pair_inputs(x, x, labels, labels, LIST_CONFIGS)  # self mode: x is both sides
    torch._check(x.shape[0] < 2**31, lambda: "B must be < 2^31")


def topk_list_len(k: int) -> Optional[int]:
    """Register list length of the stats kernel for k, None for k > 64 (thresholds from the kNN op)."""
    return next((c for c in TOPK_KS if c >= k), None)


def list_capacity(k: int) -> int:
    return triton.cdiv(max(DEFAULT_CAP, 4 * k), 16) * 16


def _stats(xp: Tensor, key: Tensor, k: int, pos_margin: float, neg_margin: float,
           num_splits: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(t [B], h [B], L_con fp32 [], hinge counts int64 [2])."""
    B, dev = xp.shape[0], xp.device
    cfg, prec = _tiles.launch_config(STATS_CONFIGS[xp.dtype], xp.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    K = topk_list_len(k)
    rp = triton.cdiv(B, bm)
    ns, per = _tiles.num_splits(dev, rp, triton.cdiv(B, bn), num_splits)
    part = _debug.new_output((ns, B, K or TOPK_KS[-1]), dtype=torch.float32, device=dev)
    psum = _debug.new_output((2, ns * B), dtype=torch.float64, device=dev)
    pcnt = _debug.new_output((2, ns * B), dtype=torch.int64, device=dev)
    wrap_triton(_ctx_stats_kernel)[(rp, ns)](
        xp, key, part, psum, pcnt, float(pos_margin), float(neg_margin), B, xp.shape[1], per * bn,
        PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"],
        K=K or TOPK_KS[-1], **_tiles.launch(cfg))
    lcon = _debug.new_output((), dtype=torch.float32, device=dev)
    sums = _debug.new_output((2,), dtype=torch.float32, device=dev)
    counts = _debug.new_output((2,), dtype=torch.int64, device=dev)
    wrap_triton(hinge_finalize_kernel)[(1,)](
        psum, pcnt, lcon, sums, counts, ns * B, 1.0, 1.0, BLOCK=HINGE_FINAL_BLOCK, num_warps=4, num_stages=1)
    if K is None:  # values of S, descending; −D is monotone in S, so its k-th largest is −D of the k-th S
        vals = knn_impl(xp, xp, k, False)[0]
        top = torch.where(2.0 - 2.0 * vals > 0, -(2.0 - 2.0 * vals), 0.0)
    elif ns == 1:
        top = part[0]
    else:
        top = torch.topk(part.permute(1, 0, 2).reshape(B, ns * K), k, dim=1).values
    return top[:, k - 1].contiguous(), top[:, k // 2 - 1].contiguous(), lcon, counts


def _lists(xp: Tensor, rows: Tensor, thr: Tensor, eps: float, cap: int, num_splits: Optional[int]):
    """One list pass over the rows ``rows``: (col [n, ns, cap], flag [n, ns, cap], cnt [n, ns]) per (row, split)."""
    n = rows.shape[0]
    cfg, prec = _tiles.launch_config(LIST_CONFIGS[xp.dtype], xp.dtype)
    rp = triton.cdiv(n, cfg["BLOCK_M"])
    ns, per = _tiles.num_splits(xp.device, rp, triton.cdiv(xp.shape[0], cfg["BLOCK_N"]), num_splits)
    col = _debug.new_output((n, ns, cap), dtype=torch.int32, device=xp.device)
    flag = torch.empty((n, ns, cap), dtype=torch.uint8, device=xp.device)
    if _debug.poison_enabled():  # uint8 cannot hold the integer sentinel: the unused high bits instead (as the C++)
        flag.fill_(0xFC)
    cnt = _debug.new_output((n, ns), dtype=torch.int32, device=xp.device)
    wrap_triton(_ctx_list_kernel)[(rp, ns)](
        xp, rows, thr, col, flag, cnt, float(eps), n, xp.shape[0], xp.shape[1], cap, per * cfg["BLOCK_N"],
        PRECISION=prec, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], **_tiles.launch(cfg))
    return col, flag, cnt.to(torch.int64)


def neighbour_lists(xp: Tensor, t: Tensor, h: Tensor, eps: float, cap: int,
                    num_splits: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """N(i) as CSR (ptr int64 [B + 1], col int32, flag uint8), exact. The list pass splits the columns (enough
    programs for a small B); each (row, split) keeps up to ``cap`` columns and its exact count, and the row's
    split lists are concatenated in split order (= ascending columns). Rows with a split over capacity are rerun,
    gathered, with the capacity of their largest split count (one host synchronisation); the result does not
    depend on the number of splits."""
    B, dev = xp.shape[0], xp.device
    thr = torch.stack([t, h], 1).contiguous()
    rows = torch.arange(B, dtype=torch.int32, device=dev)
    col, flag, cnt = _lists(xp, rows, thr, eps, cap, num_splits)
    ns = cnt.shape[1]
    keep = torch.arange(cap, device=dev)[None, None, :] < cnt[:, :, None]
    over = torch.nonzero((cnt > cap).any(1)).reshape(-1)
    if over.numel():  # the exact overflow path: only these rows, with room for all of their neighbours
        big = triton.cdiv(int(cnt[over].max()), 16) * 16
        col2, flag2, cnt2 = _lists(xp, over.to(torch.int32), thr, eps, big, num_splits)
        torch._check(bool((cnt2.sum(1) == cnt[over].sum(1)).all()), lambda: "contextual: list recount differs")
        keep[over] = False
        keep2 = torch.arange(big, device=dev)[None, None, :] < cnt2[:, :, None]
        r1 = torch.arange(B, device=dev)[:, None, None].expand(B, ns, cap)[keep]
        r2 = over[:, None, None].expand(-1, cnt2.shape[1], big)[keep2]
        allr = torch.cat([r1, r2])
        order = torch.argsort(allr * B + torch.cat([col[keep], col2[keep2]]).to(torch.int64))
        c_out = torch.cat([col[keep], col2[keep2]])[order]
        f_out = torch.cat([flag[keep], flag2[keep2]])[order]
    else:
        c_out, f_out = col[keep], flag[keep]
    ptr = torch.zeros(B + 1, dtype=torch.int64, device=dev)
    ptr[1:] = torch.cumsum(cnt.sum(1), 0)
    return ptr, c_out.contiguous(), f_out.contiguous()


def fwd_impl(x: Tensor, labels: Tensor, k: int, eps: float, context_weight: float, contrastive_weight: float,
             reg_weight: float, reg_target: float, pos_margin: float, neg_margin: float, ste_slope: float,
             cap: Optional[int] = None, num_splits: Optional[int] = None):
    """The forward; ``cap`` (list capacity) and ``num_splits`` override the defaults (tests use them)."""
    _check(x, labels)
    B = x.shape[0]
    if not (2 <= k <= B):
        raise ValueError(f"contextual_loss: k = {k} must satisfy 2 <= k <= B = {B}")
    if not eps >= 0:
        raise ValueError(f"contextual_loss: eps must be >= 0, got {eps}")
    dev = x.device
    key = _tiles.label_index(labels, labels, False, sorted_rows=False)[0]
    xp = _tiles.pad16(x)
    t, h, lcon, counts = _stats(xp, key, k, pos_margin, neg_margin, num_splits)
    ptr, col, flag = neighbour_lists(xp, t, h, eps, cap or list_capacity(k), num_splits)
    lc = _stage_ops().contextual_stage_loss(ptr, col, flag, labels)
    colsum = x.double().sum(0)
    lr = (colsum.square().sum() / (float(B) * float(B)) - reg_target) ** 2
    total = context_weight * lc + reg_weight * lr + contrastive_weight * lcon.double()
    loss = _debug.new_output((), dtype=torch.float32, device=dev)
    terms = _debug.new_output((3,), dtype=torch.float32, device=dev)
    loss.copy_(total)
    terms.copy_(torch.stack([lc, lr, lcon.double()]))
    return loss, terms, ptr, col, flag, counts


def bwd_impl(grad_loss: Tensor, x: Tensor, labels: Tensor, k: int, eps: float, context_weight: float,
             contrastive_weight: float, reg_weight: float, reg_target: float, pos_margin: float, neg_margin: float,
             ste_slope: float, ptr: Tensor, col: Tensor, flag: Tensor, counts: Tensor,
             num_splits: Optional[int] = None) -> Tensor:
    _check(x, labels)
    B, d, dev = x.shape[0], x.shape[1], x.device
    torch._check(ptr.shape == (B + 1,) and col.shape == flag.shape and counts.shape == (2,),
                 lambda: "contextual_bwd: neighbour lists / counts do not match the batch")
    key = _tiles.label_index(labels, labels, False, sorted_rows=False)[0]
    g = grad_loss.reshape(()).to(torch.float64)
    B2 = float(B) * float(B)
    colsum = x.double().sum(0)
    g_reg = g * reg_weight * 2.0 * (colsum.square().sum() / B2 - reg_target) / B2
    inv = torch.where(counts > 0, 1.0 / counts.clamp_min(1).to(torch.float64), 0.0)
    g_hp, g_hn = -g * contrastive_weight * inv[0], g * contrastive_weight * inv[1]
    s_ctx = g * context_weight * 2.0 * ste_slope
    F = x.float()
    out = torch.zeros(B, d, dtype=torch.float32, device=dev)
    if context_weight * ste_slope != 0.0:
        # the class keys as labels, so that the slots' labels are the keys the gradient kernel compares
        sparse, u, a, slot_label, slot_coef = _stage_ops().contextual_stage_grad_parts(
            ptr, col, flag, key.to(torch.int64), F)
        out.add_(sparse * s_ctx)
        rowv = torch.stack([u, float(B) - a], 1).float().contiguous()
        a_col = a.float().contiguous()
        scls, sval = slot_label.to(torch.int32).contiguous(), slot_coef.float().contiguous()
    else:
        rowv = torch.zeros(B, 2, dtype=torch.float32, device=dev)
        rowv[:, 1] = 1.0
        a_col = torch.zeros(B, dtype=torch.float32, device=dev)
        scls = torch.full((B, 1), -2, dtype=torch.int32, device=dev)
        sval = torch.zeros(B, 1, dtype=torch.float32, device=dev)
    w = torch.stack([g_reg, g_hp, g_hn, s_ctx]).float()
    xp = _tiles.pad16(x)
    for dy in (False, True):
        base, prec = _tiles.launch_config(GRAD_CONFIGS[x.dtype][dy], x.dtype)
        cfg, one = _tiles.grad_config(base, xp.shape[1])
        bm, bn, bd = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
        rp = triton.cdiv(B, bm)
        ns, per = _tiles.num_splits(dev, rp, triton.cdiv(B, bn), num_splits)
        part = _debug.new_output((ns, B, xp.shape[1]), dtype=torch.float32, device=dev)
        wrap_triton(_ctx_grad_kernel)[(rp, ns)](
            xp, key, rowv, a_col, scls, sval, w, part, float(pos_margin), float(neg_margin), B, xp.shape[1],
            per * bn, scls.shape[1], DY=dy, ONE_CHUNK=one, PRECISION=prec,
            GPREC=_grad_precision(x.dtype), BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_K=cfg["BLOCK_K"], BLOCK_D=bd, **_tiles.launch(cfg))
        out += part.sum(0)[:, :d]
    dx = _debug.new_output((B, d), dtype=x.dtype, device=dev)
    dx.copy_(out)
    return dx


@triton_op("contextual_fwd")
def contextual_fwd(x: Tensor, labels: Tensor, k: int, eps: float, context_weight: float, contrastive_weight: float,
                   reg_weight: float, reg_target: float, pos_margin: float, neg_margin: float, ste_slope: float,
                   normalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    xk = _math.normalized_rows(x)[0] if normalize else x
    return fwd_impl(xk, labels, k, eps, context_weight, contrastive_weight, reg_weight, reg_target, pos_margin,
                    neg_margin, ste_slope)


@triton_op("contextual_bwd")
def contextual_bwd(grad_loss: Tensor, x: Tensor, labels: Tensor, k: int, eps: float, context_weight: float,
                   contrastive_weight: float, reg_weight: float, reg_target: float, pos_margin: float,
                   neg_margin: float, ste_slope: float, normalize: bool, nbr_ptr: Tensor, nbr: Tensor,
                   nbr_flags: Tensor, con_counts: Tensor) -> Tensor:
    xk = _math.normalized_rows(x)[0] if normalize else x
    dx = bwd_impl(grad_loss, xk, labels, k, eps, context_weight, contrastive_weight, reg_weight, reg_target,
                  pos_margin, neg_margin, ste_slope, nbr_ptr, nbr, nbr_flags, con_counts)
    return _math.normalized_rows_backward(dx, x) if normalize else dx


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (aligned and ragged batch; d is padded to 16, split widths are multiples of BLOCK_N).
# ---------------------------------------------------------------------------------------------------------------
def _specs(tf32: bool = False) -> list[AOTSpec]:
    """The specs of the default launches; ``tf32=True``: the fp32 ones under the TF32 opt-in (AOT_SPECS_TF32)."""
    specs = []
    for dtype, t, prec in spec_precisions(tf32):
        c = _tiles.precision_config(STATS_CONFIGS[dtype], dtype, prec)
        sig = {"x_ptr": f"*{t}", "key_ptr": "*i32", "part_ptr": "*fp32", "psum_ptr": "*fp64", "pcnt_ptr": "*i64",
               "pos_margin": "fp32", "neg_margin": "fp32", "B": "i32", "D": "i32", "cols_per_split": "i32"}
        for K in TOPK_KS:
            specs += with_alignments(AOTSpec(
                f"contextual_stats_{t}_k{K}", _ctx_stats_kernel, sig,
                dict(PRECISION=prec, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], K=K),
                c["num_warps"], c["num_stages"], dtype=t, gemm=True), ("D", "cols_per_split"), ("B",))
        c = _tiles.precision_config(LIST_CONFIGS[dtype], dtype, prec)
        sig = {"x_ptr": f"*{t}", "rows_ptr": "*i32", "thr_ptr": "*fp32", "col_ptr": "*i32", "flag_ptr": "*u8",
               "cnt_ptr": "*i32", "eps": "fp32", "n_rows": "i32", "B": "i32", "D": "i32", "cap": "i32",
               "cols_per_split": "i32"}
        specs += with_alignments(AOTSpec(
            f"contextual_list_{t}", _ctx_list_kernel, sig,
            dict(PRECISION=prec, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"]),
            c["num_warps"], c["num_stages"], dtype=t, gemm=True), ("D", "cap", "cols_per_split"), ("B", "n_rows"))
        sig = {"x_ptr": f"*{t}", "key_ptr": "*i32", "rowv_ptr": "*fp32", "a_ptr": "*fp32", "scls_ptr": "*i32",
               "sval_ptr": "*fp32", "w_ptr": "*fp32", "part_ptr": "*fp32", "pos_margin": "fp32",
               "neg_margin": "fp32", "B": "i32", "D": "i32", "cols_per_split": "i32", "n_slots": "i32"}
        for dy, (suffix, one, c) in [(dy, v) for dy in (False, True) for v in
                                     _tiles.grad_variants(_tiles.precision_config(GRAD_CONFIGS[dtype][dy], dtype, prec))]:
            specs += with_alignments(AOTSpec(
                f"contextual_grad_{t}_{'dy' if dy else 'dx'}{suffix}", _ctx_grad_kernel, sig,
                dict(DY=dy, ONE_CHUNK=one, PRECISION=prec, GPREC=_grad_precision(dtype),
                     BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], BLOCK_D=c["BLOCK_D"]),
                c["num_warps"], c["num_stages"], dtype=t, gemm=True), ("D", "cols_per_split"), ("B", "n_slots"))
    return specs


AOT_SPECS = _specs()
AOT_SPECS_TF32 = _specs(tf32=True)
