"""Triton kernels of the anchor-LSE losses: SupCon (kind 0), Multi-Similarity (1), Circle (2) (docs/spec.md §6.1-6.3).

Raw ops with the schemas of the C++ ``flashdml::anchor_lse_fwd / _bwd`` (``flashdml._schemas.SCHEMAS``; x [B, d],
y [M, d] contiguous, one dtype; labels / ref_labels int64; the rows are L2-normalised inside the op and the
backward returns the gradients of the raw rows, as the CPU kernel does):

* ``torch.ops.flashdml_triton.anchor_lse_fwd(x, y, labels, ref_labels, temperature, kind, p0, p1, p2, self_mode)
  -> (loss [], row_stats [B, 4])``
* ``torch.ops.flashdml_triton.anchor_lse_bwd(grad_loss, x, y, labels, ref_labels, temperature, kind, p0, p1, p2,
  self_mode, row_stats) -> (dx, dy, dtemperature)``

row_stats holds, per anchor, the columns of csrc/include/flashdml/anchor_lse.h (LSE of the positive logits, LSE of
the negative logits, the row weight w_a, SupCon's linear weight u_a). The per-pair logits f(s) and slopes are
``_tiles.anchor_logit``, the Triton mirror of that header; the kind is a constexpr, one compiled kernel per loss.

Forward (nothing B×M is stored):
1. ``_fwd_partial_kernel``: per row block and column split, one S tile at a time, an online (max, Σexp) of f_p
   over the row's positives and of f_n over its negatives (one exp per pair, ``_tiles.online_lse_pair``), plus
   the sum of f_p (SupCon's mean over positives).
2. ``_row_merge_kernel``: merges the splits of each row in split order into the two LSEs (SupCon: both columns
   hold the LSE over all other samples; MS: ``log(1 + Σ)``) and the row's loss ℓ_a.
3. ``_finalize_kernel`` (one program): pml's zero cases, the reducer's count (all rows for MS, the rows with
   ℓ_a > 0 otherwise), the loss and each row's weights, in a fixed row order (fp64 sum).

Backward: ``_grad_kernel`` recomputes each S tile (same orientation and K order as the forward) and forms the
per-pair weight W = w_a·exp(f − LSE)·f' (− u_a on SupCon's positives), in units of dL/dz for SupCon (z = s/τ, so
the finalize's 1/τ and dτ = −τ⁻¹ Σ W z apply as for NT-Xent) and of dL/ds otherwise; scaled by a power of two
(``_tiles.pow2_prescale``) and multiplied on tensor cores with ``_tiles.weights_dot`` into W·ŷ (dx) or Wᵀ·x̂ (dy)
per column split; a program computes each of its S tiles once and walks all of d for it (in BLOCK_D chunks,
``_tiles.accumulate_chunks``, when d does not fit one). ``batch_softmax.finalize_grad`` sums the splits in a fixed order. No atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _debug
from .._schemas import triton_op  # the op's schema and fake kernel from the one table
from . import _tiles
from ._aot import AOTSpec, gemm_specs, spec_precisions, with_alignments
from ._tiles import (accumulate_chunks, anchor_logit, chunk_dot, online_lse_pair, row_chunk, s_tile, sp_sig,
                     wrap_triton)
from .batch_softmax import finalize_grad

# ---------------------------------------------------------------------------------------------------------------
# Tile configurations (AOT_SPECS below is generated from these tables; tests/test_triton_aot.py compiles them).
# One BLOCK_K per dtype for every S tile, so the backward recomputes the forward's fp32 value of each pair.
#   forward: two online LSE states per row and more element-wise temporaries than xent.py's LSE pass: 128x64
#     tiles for 16-bit rows (no spill on sm_80 / sm_90), 64x64x16 FMA tiles for fp32 (IEEE products).
#   backward: 128 owned rows x 128 output columns for 16-bit rows as in xent.py, but with the two tensor-core
#     products of _tiles.weights_dot (a 16-bit head and tail of W) the [128 x 32] dx tile and BLOCK_D = 128 dy
#     tiles spill on sm_80: dx recomputes [128 x 16] S tiles, dy keeps [64 x 128] S tiles with BLOCK_D = 64.
#     fp32 dy: 32 owned rows at 4 warps (64 rows at 8 warps spill 4 bytes on sm_90).
# ---------------------------------------------------------------------------------------------------------------
_FWD_16 = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)
_FWD_32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2)
_DX_16 = dict(BLOCK_M=128, BLOCK_N=16, BLOCK_K=64, BLOCK_D=128, num_warps=8, num_stages=2)
_DY_16 = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, BLOCK_D=64, num_warps=8, num_stages=2)
# CHUNK_D / CHUNK_WARPS: the chunked path's width and warps (_tiles.chunk_config; fp32 dx spilled 4-16 B at
# 8 warps with 32 columns (sm_90) or 16 (sm_80), and at 4 warps with 32 (sm_80); 16 columns at 4 warps do not).
# TF32 (_tiles.precision_config): dx at 4 warps (8 spill 8-16 B on sm_80 with one 64-column chunk); dy with a
# 64 x 64 S tile ([other, own]: 16 or 32 rows of it are no wgmma tile on sm_90) at 8 warps. BLOCK_K stays 16.
_DX_32 = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, BLOCK_D=64, CHUNK_D=16, CHUNK_WARPS=4, num_warps=8, num_stages=2,
              TF32=dict(num_warps=4))
_DY_32 = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, BLOCK_D=64, num_warps=4, num_stages=2,
              TF32=dict(BLOCK_M=64, BLOCK_N=64, num_warps=8))
FWD_CONFIGS = {torch.float16: _FWD_16, torch.bfloat16: _FWD_16, torch.float32: _FWD_32}
BWD_CONFIGS = {torch.float16: (_DX_16, _DY_16), torch.bfloat16: (_DX_16, _DY_16), torch.float32: (_DX_32, _DY_32)}
ROW_BLOCK = 1024
KINDS = (0, 1, 2)
N_PARTS = 5  # forward partials per row and split: max / sum of the positives, of the negatives, Σ f_p
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _fwd_partial_kernel(
    x_ptr, y_ptr, lab_ptr, ref_ptr, tau_ptr, part_ptr,
    B, M, D, cols_per_split, self_mode, p0, p1, p2,
    KIND: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """part[q, split, i] for the rows i of a block over the columns of one split: q = 0 / 1 the running max and
    Σ exp(f_p − max) over the positives, 2 / 3 the same of f_n over the negatives, 4 Σ f_p."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    if KIND == 0:
        q0 = 1.0 / tl.load(tau_ptr)
    else:
        q0 = p0
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    lab_r = tl.load(lab_ptr + rows, mask=row_ok, other=0)
    mp = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lp = tl.zeros([BLOCK_M], tl.float32)
    mn = tl.full([BLOCK_M], float("-inf"), tl.float32)
    ln = tl.zeros([BLOCK_M], tl.float32)
    fsum = tl.zeros([BLOCK_M], tl.float32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        s = s_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        lab_c = tl.load(ref_ptr + cols, mask=col_ok, other=0)
        ok = col_ok[None, :] & ((rows[:, None] != cols[None, :]) | (self_mode == 0))
        same = lab_r[:, None] == lab_c[None, :]
        f, _ = anchor_logit(s, same, q0, p1, p2, KIND)
        mp, lp, mn, ln = online_lse_pair(mp, lp, mn, ln, f, ok & same, ok & ~same)
        if KIND == 0:
            fsum += tl.sum(tl.where(ok & same, f, 0.0), 1)
    plane = tl.num_programs(1).to(tl.int64) * B
    out = part_ptr + pid_s.to(tl.int64) * B + rows
    tl.store(out, mp, mask=row_ok)
    tl.store(out + plane, lp, mask=row_ok)
    tl.store(out + 2 * plane, mn, mask=row_ok)
    tl.store(out + 3 * plane, ln, mask=row_ok)
    tl.store(out + 4 * plane, fsum, mask=row_ok)


@triton.jit
def _row_merge_kernel(part_ptr, cc_ptr, stats_ptr, ell_ptr, B, M, n_splits, self_mode, p0, p1,
                      KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: the splits merged in order into row_stats[:, 0:2] (the LSEs) and ell[row] (its loss ℓ_a)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < B
    plane = tl.cast(n_splits, tl.int64) * B
    mxp = tl.full([BLOCK], float("-inf"), tl.float32)
    mxn = tl.full([BLOCK], float("-inf"), tl.float32)
    at = part_ptr + r
    for s in range(0, n_splits):
        mxp = tl.maximum(mxp, tl.load(at, mask=ok, other=float("-inf")))
        mxn = tl.maximum(mxn, tl.load(at + 2 * plane, mask=ok, other=float("-inf")))
        at += B
    refp = tl.where(mxp == float("-inf"), 0.0, mxp)
    refn = tl.where(mxn == float("-inf"), 0.0, mxn)
    sp = tl.zeros([BLOCK], tl.float32)
    sn = tl.zeros([BLOCK], tl.float32)
    fsum = tl.zeros([BLOCK], tl.float32)
    at = part_ptr + r
    for s in range(0, n_splits):
        m = tl.load(at, mask=ok, other=float("-inf"))
        sp += tl.load(at + plane, mask=ok, other=0.0) * tl.math.exp2((m - refp) * LOG2E)
        m = tl.load(at + 2 * plane, mask=ok, other=float("-inf"))
        sn += tl.load(at + 3 * plane, mask=ok, other=0.0) * tl.math.exp2((m - refn) * LOG2E)
        fsum += tl.load(at + 4 * plane, mask=ok, other=0.0)
        at += B
    # each non-empty sum is >= 1 (its max term is exp(0)); an empty one gives -inf without evaluating log(0)
    lse_p = tl.where(sp > 0, refp + tl.log(tl.maximum(sp, 1.0)), float("-inf"))
    lse_n = tl.where(sn > 0, refn + tl.log(tl.maximum(sn, 1.0)), float("-inf"))
    cc = tl.load(cc_ptr + r, mask=ok, other=0)  # columns with the row's label
    n_pos = cc - self_mode
    n_neg = M - cc
    if KIND == 0:  # LSE over positives and negatives together
        top = tl.maximum(lse_p, lse_n)
        ref = tl.where(top == float("-inf"), 0.0, top)
        tot = tl.math.exp2((lse_p - ref) * LOG2E) + tl.math.exp2((lse_n - ref) * LOG2E)
        lse_p = tl.where(tot > 0, ref + tl.log(tl.maximum(tot, 1.0)), float("-inf"))
        lse_n = lse_p
        ell = tl.where(n_pos > 0, lse_p - fsum / tl.maximum(n_pos, 1).to(tl.float32), 0.0)
    elif KIND == 1:  # log(1 + Σ e^f): the empty sum gives 0
        lse_p = tl.maximum(lse_p, 0.0) + tl.log(1.0 + tl.math.exp2(-tl.abs(lse_p) * LOG2E))
        lse_n = tl.maximum(lse_n, 0.0) + tl.log(1.0 + tl.math.exp2(-tl.abs(lse_n) * LOG2E))
        ell = lse_p / p0 + lse_n / p1
    else:
        soft, _ = sp_sig(lse_p + lse_n)
        ell = tl.where((n_pos > 0) & (n_neg > 0), soft, 0.0)
    row = stats_ptr + r.to(tl.int64) * 4
    tl.store(row, lse_p, mask=ok)
    tl.store(row + 1, lse_n, mask=ok)
    tl.store(ell_ptr + r, ell, mask=ok)


@triton.jit
def _finalize_kernel(ell_ptr, cc_ptr, stats_ptr, loss_ptr, B, M, self_mode, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the reducer (pml's zero cases, the exact count), the loss, row_stats[:, 2:4] (w_a, u_a)."""
    pos_acc = tl.zeros([BLOCK], tl.int64)
    cnt_acc = tl.zeros([BLOCK], tl.int64)
    for start in range(0, B, BLOCK):
        r = start + tl.arange(0, BLOCK)
        ok = r < B
        pos_acc += tl.where(ok, tl.load(cc_ptr + r, mask=ok, other=0) - self_mode, 0)
        cnt_acc += (tl.load(ell_ptr + r, mask=ok, other=0.0) > 0).to(tl.int64)
    n_pos = tl.sum(pos_acc, 0)
    n_neg = tl.cast(B, tl.int64) * M - n_pos - tl.cast(self_mode, tl.int64) * B
    zero = (n_pos <= 1) & (n_neg <= 1)
    if KIND == 0:
        zero = zero | (n_pos == 0) | (n_neg == 0)
    if KIND == 1:
        count = tl.cast(B, tl.int64)
    else:
        count = tl.sum(cnt_acc, 0)
    inv = tl.where(zero | (count == 0), 0.0, 1.0 / tl.maximum(count, 1).to(tl.float64))
    total = tl.zeros([BLOCK], tl.float64)
    for start in range(0, B, BLOCK):
        r = start + tl.arange(0, BLOCK)
        ok = r < B
        ell = tl.load(ell_ptr + r, mask=ok, other=0.0)
        if KIND == 1:
            c = tl.where(ok, inv, 0.0)
        else:
            c = tl.where(ok & (ell > 0), inv, 0.0)
        total += c * ell.to(tl.float64)
        row = stats_ptr + r.to(tl.int64) * 4
        w = c.to(tl.float32)
        if KIND == 2:
            lse_sum = tl.load(row, mask=ok, other=0.0) + tl.load(row + 1, mask=ok, other=0.0)
            _, sig = sp_sig(lse_sum)
            w = tl.where(c != 0, (c * sig.to(tl.float64)).to(tl.float32), 0.0)
        u = tl.zeros([BLOCK], tl.float32)
        if KIND == 0:
            n_row = tl.load(cc_ptr + r, mask=ok, other=0) - self_mode
            u = tl.where(n_row > 0, (c / tl.maximum(n_row, 1).to(tl.float64)).to(tl.float32), 0.0)
        tl.store(row + 2, w, mask=ok)
        tl.store(row + 3, u, mask=ok)
    tl.store(loss_ptr, tl.sum(total, 0).to(tl.float32))


@triton.jit
def _grad_kernel(
    x_ptr, y_ptr, lab_ptr, ref_ptr, tau_ptr, stats_ptr, scale_ptr, part_ptr, dt_ptr,
    B, M, D, cols_per_split, self_mode, p0, p1, p2,
    DY: tl.constexpr, KIND: tl.constexpr, ONE_CHUNK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx (DY=False): part[split, i, :] = Σ_{j in split} p·W_ij ŷ[j, :] over a block of x rows i, and
    dt[split, block] = Σ p·W_ij z_ij (SupCon). dy (DY=True): part[split, j, :] = Σ_{i in split} p·W_ij x̂[i, :]
    over a block of y rows j. W: the module docstring; the S tile is x_blk · y_blkᵀ in both variants. Each S tile
    is computed once: ONE_CHUNK (D <= BLOCK_D) keeps the product in registers, otherwise it is added to the
    partial rows chunk by chunk (``_tiles.accumulate_chunks``)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    if KIND == 0:
        q0 = 1.0 / tl.load(tau_ptr)
    else:
        q0 = p0
    scale = tl.load(scale_ptr)
    if DY:
        n_own = M
        n_other = B
        b_ptr = x_ptr
    else:
        n_own = B
        n_other = M
        b_ptr = y_ptr
    own = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    own_ok = own < n_own
    out_rows = pid_s.to(tl.int64) * n_own + own
    if DY:  # own rows are y rows: their labels are loop-invariant
        lab_j = tl.load(ref_ptr + own, mask=own_ok, other=0)
    else:  # own rows are x rows: labels and row statistics are loop-invariant
        lab_i = tl.load(lab_ptr + own, mask=own_ok, other=0)
        st = stats_ptr + own.to(tl.int64) * 4
        lse_p = tl.load(st, mask=own_ok, other=0.0)
        lse_n = tl.load(st + 1, mask=own_ok, other=0.0)
        w_i = tl.load(st + 2, mask=own_ok, other=0.0)
        u_i = tl.load(st + 3, mask=own_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dt = tl.zeros([BLOCK_M], tl.float32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, n_other)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        oth = start_n + tl.arange(0, BLOCK_N)
        oth_ok = oth < n_hi
        if DY:
            xi, xi_ok, yj, yj_ok = oth, oth_ok, own, own_ok
            s = s_tile(x_ptr, y_ptr, xi, yj, xi_ok, yj_ok, D, PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
            lab_i = tl.load(lab_ptr + xi, mask=xi_ok, other=0)
            st = stats_ptr + xi.to(tl.int64) * 4
            lse_p = tl.load(st, mask=xi_ok, other=0.0)
            lse_n = tl.load(st + 1, mask=xi_ok, other=0.0)
            w_i = tl.load(st + 2, mask=xi_ok, other=0.0)
            u_i = tl.load(st + 3, mask=xi_ok, other=0.0)
        else:
            xi, xi_ok, yj, yj_ok = own, own_ok, oth, oth_ok
            s = s_tile(x_ptr, y_ptr, xi, yj, xi_ok, yj_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            lab_j = tl.load(ref_ptr + yj, mask=yj_ok, other=0)
        ok = xi_ok[:, None] & yj_ok[None, :] & ((xi[:, None] != yj[None, :]) | (self_mode == 0))
        same = lab_i[:, None] == lab_j[None, :]
        f, g = anchor_logit(s, same, q0, p1, p2, KIND)
        # exponents clamped at 0: f <= LSE up to rounding; a row outside the reduction (w = 0, LSE maybe -inf)
        # then gets exactly 0
        lse = tl.where(same, lse_p[:, None], lse_n[:, None])
        w = w_i[:, None] * tl.math.exp2(tl.minimum(f - lse, 0.0) * LOG2E) * g - tl.where(same, u_i[:, None], 0.0)
        w = tl.where(ok, w, 0.0) * scale
        if DY:
            w = tl.trans(w)
        elif KIND == 0:
            dt += tl.sum(w * (s * q0), 1)
        if ONE_CHUNK:
            b_at, b_mask = row_chunk(b_ptr, oth.to(tl.int64), oth_ok, 0, D, BLOCK_D)
            acc = chunk_dot(w, tl.load(b_at, mask=b_mask, other=0.0), acc, 1, PRECISION)
        else:
            accumulate_chunks(w, b_ptr, oth.to(tl.int64), oth_ok, part_ptr, out_rows, own_ok, D, start_n > n_lo,
                              1, PRECISION, BLOCK_D)
    if ONE_CHUNK:
        at, mask = row_chunk(part_ptr, out_rows, own_ok, 0, D, BLOCK_D)
        tl.store(at, acc, mask=mask)
    if not DY:
        tl.store(dt_ptr + pid_s * tl.num_programs(0) + pid_m, tl.sum(dt, 0))


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
def _check(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, temperature: Tensor, kind: int, p0: float,
           p1: float, self_mode: bool) -> None:
    _tiles.check_pair_inputs(x, y, labels, ref_labels, FWD_CONFIGS)
    torch._check(temperature.dim() == 0 and temperature.dtype == torch.float32, lambda: "temperature: 0-dim fp32")
    torch._check(kind in KINDS, lambda: f"kind must be 0, 1 or 2, got {kind}")
    torch._check(kind != 1 or (p0 != 0 and p1 != 0), lambda: "multi-similarity: alpha and beta must be non-zero")
    torch._check(not self_mode or x.shape[0] == y.shape[0], lambda: "self_mode needs B == M")


def _class_cols(labels: Tensor, ref_labels: Tensor) -> Tensor:
    """int64 [B]: how many rows of y carry each query's label (on the device, no host synchronisation)."""
    ref = torch.sort(ref_labels).values
    return torch.searchsorted(ref, labels, side="right") - torch.searchsorted(ref, labels, side="left")


def fwd_impl(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, temperature: Tensor, kind: int, p0: float,
             p1: float, p2: float, self_mode: bool, num_splits: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The forward on normalised rows; ``num_splits`` overrides the column-split heuristic (tests use it)."""
    _check(x, y, labels, ref_labels, temperature, kind, p0, p1, self_mode)
    B, M = x.shape[0], y.shape[0]
    dev = x.device
    loss = _debug.new_output((), dtype=torch.float32, device=dev)
    stats = _debug.new_output((B, 4), dtype=torch.float32, device=dev)
    ell = _debug.new_output((B,), dtype=torch.float32, device=dev)
    xp, yp = _tiles.pad16_pair(x, y)
    D = xp.shape[1]
    key_x, key_y, _, _ = _tiles.label_index(labels, ref_labels, self_mode, sorted_rows=False)
    cc = _class_cols(labels, ref_labels)
    cfg, prec = _tiles.launch_config(FWD_CONFIGS[x.dtype], x.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    rp = triton.cdiv(B, bm)
    ns, per = _tiles.num_splits(dev, rp, triton.cdiv(M, bn), num_splits)
    part = _debug.new_output((N_PARTS, ns, B), dtype=torch.float32, device=dev)
    wrap_triton(_fwd_partial_kernel)[(rp, ns)](
        xp, yp, key_x, key_y, temperature, part, B, M, D, per * bn, int(self_mode), float(p0), float(p1),
        float(p2), KIND=kind, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"],
        **_tiles.launch(cfg))
    wrap_triton(_row_merge_kernel)[(triton.cdiv(B, ROW_BLOCK),)](
        part, cc, stats, ell, B, M, ns, int(self_mode), float(p0), float(p1), KIND=kind, BLOCK=ROW_BLOCK,
        num_warps=4, num_stages=1)
    wrap_triton(_finalize_kernel)[(1,)](
        ell, cc, stats, loss, B, M, int(self_mode), KIND=kind, BLOCK=ROW_BLOCK, num_warps=4, num_stages=1)
    return loss, stats


def _grad(xp: Tensor, yp: Tensor, key_x: Tensor, key_y: Tensor, tau: Tensor, tau_div: Tensor, stats: Tensor,
          scale: Tensor, grad_eff: Tensor, out: Tensor, dtemp: Optional[Tensor], dy: bool, kind: int,
          params: tuple, self_mode: bool, num_splits: Optional[int]) -> None:
    B, M, D = xp.shape[0], yp.shape[0], xp.shape[1]
    n_own, n_other = (M, B) if dy else (B, M)
    base, prec = _tiles.launch_config(BWD_CONFIGS[xp.dtype][dy], xp.dtype)
    cfg, one = _tiles.grad_config(base, D)
    bm, bn, bd = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    rp = triton.cdiv(n_own, bm)
    ns, per = _tiles.num_splits(xp.device, rp, triton.cdiv(n_other, bn), num_splits)
    part = _debug.new_output((ns, n_own, D), dtype=torch.float32, device=xp.device)
    dt = _debug.new_output((ns * rp if dtemp is not None else 1,), dtype=torch.float32, device=xp.device)
    wrap_triton(_grad_kernel)[(rp, ns)](
        xp, yp, key_x, key_y, tau, stats, scale, part, dt, B, M, D, per * bn, int(self_mode), *params,
        DY=dy, KIND=kind, ONE_CHUNK=one, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"],
        BLOCK_D=bd, **_tiles.launch(cfg))
    finalize_grad(part, out, grad_eff, tau_div, dt, dtemp)


def bwd_impl(grad_loss: Tensor, x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, temperature: Tensor,
             kind: int, p0: float, p1: float, p2: float, self_mode: bool, row_stats: Tensor,
             num_splits: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The backward on normalised rows (gradients of x̂, ŷ); ``num_splits`` as in :func:`fwd_impl`."""
    _check(x, y, labels, ref_labels, temperature, kind, p0, p1, self_mode)
    torch._check(row_stats.shape == (x.shape[0], 4) and row_stats.dtype == torch.float32,
                 lambda: "row_stats: fp32 [B, 4]")
    dev = x.device
    stats = row_stats.contiguous()
    dx = _debug.new_output(x.shape, dtype=x.dtype, device=dev)
    dy = _debug.new_output(y.shape, dtype=y.dtype, device=dev)
    key_x, key_y, _, _ = _tiles.label_index(labels, ref_labels, self_mode, sorted_rows=False)
    # |W| <= max w_a · max |f'| + max u_a; Circle's slopes are at most |γ|·(2 + |m|) for |s| <= 1 (+ slack).
    slope = abs(p1) * (2.0 + abs(p0)) * 1.01 if kind == 2 else 1.0
    bound = stats[:, 2].abs().max().double() * slope + stats[:, 3].abs().max().double()
    scale = _tiles.pow2_prescale(bound)
    grad_eff = grad_loss.to(torch.float32).reshape(()) / scale
    # SupCon's W is dL/dz: the finalize divides by τ; the other kinds' W is dL/ds already.
    tau_div = temperature if kind == 0 else torch.ones((), dtype=torch.float32, device=dev)
    xp, yp = _tiles.pad16_pair(x, y)
    params = (float(p0), float(p1), float(p2))
    if kind == 0:
        dtemp = _debug.new_output((), dtype=torch.float32, device=dev)
    else:  # the temperature is not read
        dtemp = torch.zeros((), dtype=torch.float32, device=dev)
    _grad(xp, yp, key_x, key_y, temperature, tau_div, stats, scale, grad_eff, dx,
          dtemp if kind == 0 else None, False, kind, params, self_mode, num_splits)
    _grad(xp, yp, key_x, key_y, temperature, tau_div, stats, scale, grad_eff, dy, None, True, kind, params,
          self_mode, num_splits)
    return dx, dy, dtemp


@triton_op("anchor_lse_fwd")
def anchor_lse_fwd(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, temperature: Tensor, kind: int,
                   p0: float, p1: float, p2: float, self_mode: bool) -> tuple[Tensor, Tensor]:
    xh, yh = _tiles.normalized_inputs(x, y)
    return fwd_impl(xh, yh, labels, ref_labels, temperature, kind, p0, p1, p2, self_mode)


@triton_op("anchor_lse_bwd")
def anchor_lse_bwd(grad_loss: Tensor, x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor,
                   temperature: Tensor, kind: int, p0: float, p1: float, p2: float, self_mode: bool,
                   row_stats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    xh, yh = _tiles.normalized_inputs(x, y)
    dx, dy, dtemp = bwd_impl(grad_loss, xh, yh, labels, ref_labels, temperature, kind, p0, p1, p2, self_mode,
                             row_stats)
    return *_tiles.raw_row_grads(dx, dy, x, y), dtemp


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: every (dtype, kind, variant) the launchers above produce, with the 16-divisibility
# hints of an aligned and of a ragged batch (d is padded to a multiple of 16; split widths are multiples of
# BLOCK_N). The gradient finalize is batch_softmax._grad_finalize_kernel, compiled by that module's specs.
# ---------------------------------------------------------------------------------------------------------------
def _specs(tf32: bool = False) -> list[AOTSpec]:
    """The specs of the default launches; ``tf32=True``: the fp32 ones under the TF32 opt-in (AOT_SPECS_TF32)."""
    specs = []
    par = {"self_mode": "i32", "p0": "fp32", "p1": "fp32", "p2": "fp32"}
    for dtype, t, prec in spec_precisions(tf32):
        for kind in KINDS:
            sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "lab_ptr": "*i32", "ref_ptr": "*i32", "tau_ptr": "*fp32",
                   "part_ptr": "*fp32", "B": "i32", "M": "i32", "D": "i32", "cols_per_split": "i32", **par}
            specs += gemm_specs(f"anchor_lse_fwd_{t}_k{kind}", _fwd_partial_kernel, sig,
                                _tiles.precision_config(FWD_CONFIGS[dtype], dtype, prec), t,
                                dict(KIND=kind, PRECISION=prec))
            sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "lab_ptr": "*i32", "ref_ptr": "*i32", "tau_ptr": "*fp32",
                   "stats_ptr": "*fp32", "scale_ptr": "*fp32", "part_ptr": "*fp32", "dt_ptr": "*fp32", "B": "i32",
                   "M": "i32", "D": "i32", "cols_per_split": "i32", **par}
            for dy in (False, True):
                c = _tiles.precision_config(BWD_CONFIGS[dtype][dy], dtype, prec)
                for suffix, one, gc in _tiles.grad_variants(c):  # chunked / one / narrowed
                    name = f"anchor_lse_grad_{t}_k{kind}_{'dy' if dy else 'dx'}{suffix}"
                    specs += gemm_specs(name, _grad_kernel, sig, gc, t,
                                        dict(DY=dy, KIND=kind, ONE_CHUNK=one, PRECISION=prec))
    for kind in KINDS:
        sig = {"part_ptr": "*fp32", "cc_ptr": "*i64", "stats_ptr": "*fp32", "ell_ptr": "*fp32", "B": "i32",
               "M": "i32", "n_splits": "i32", "self_mode": "i32", "p0": "fp32", "p1": "fp32"}
        specs += with_alignments(AOTSpec(f"anchor_lse_merge_k{kind}", _row_merge_kernel, sig,
                                         dict(KIND=kind, BLOCK=ROW_BLOCK), 4, 1), (), ("B", "M"))
        sig = {"ell_ptr": "*fp32", "cc_ptr": "*i64", "stats_ptr": "*fp32", "loss_ptr": "*fp32", "B": "i32",
               "M": "i32", "self_mode": "i32"}
        specs += with_alignments(AOTSpec(f"anchor_lse_finalize_k{kind}", _finalize_kernel, sig,
                                         dict(KIND=kind, BLOCK=ROW_BLOCK), 4, 1), (), ("B", "M"))
    return specs


AOT_SPECS = _specs()
AOT_SPECS_TF32 = _specs(tf32=True)
