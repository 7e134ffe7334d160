"""Triton kernels for Cross-Example Softmax (docs/spec.md §2.2, ``global_partition=True``) and NT-Xent (docs/spec.md §2.1b, False).

Raw ops, the schema of the C++ ``flashdml::xent_fwd / _bwd`` (``flashdml._schemas.SCHEMAS``; inputs contiguous,
same dtype; x [B, d], y [M, d]; labels / ref_labels int64):

* ``torch.ops.flashdml_triton.xent_fwd(x, y, labels, ref_labels, temperature, global_partition, self_mode, normalize)
  -> (loss [], lse [1] or [B], coef [1] or [B])``
* ``torch.ops.flashdml_triton.xent_bwd(grad_loss, x, y, labels, ref_labels, temperature, global_partition,
  self_mode, normalize, lse, coef) -> (dx, dy, dtemperature)``

``normalize=True``: the op L2-normalises the rows itself (``_tiles.normalized_inputs``; in self mode y is x and is
normalised once) and the backward returns the gradients with respect to the raw rows (``_tiles.raw_row_grads``), as
the C++ ops do; lse / coef are those of the normalised rows. ``normalize=False``: the rows are used as given.

z = x yᵀ / τ; negatives: labels[i] != ref_labels[j]; positives: equal labels; self mode drops every (i, i).

Forward (nothing B×M is stored):
1. ``_neg_lse_kernel``: online (max, sum-exp) of z over the negatives of each row, per column split (like the
   batch-softmax LSE kernel with a label mask); ``_lse_merge_kernel`` merges the splits in a fixed order into
   the per-row LSE (NT-Xent, -inf for a row without negatives) or, in one program, into the single batch-wide
   Λ (XE; a per-lane online merge over all rows, then one fixed-order tree).
2. ``_pos_stats_kernel`` visits only the positive pairs, still on tensor cores: the launcher sorts the rows of x
   and of y by label (stable argsort, index arrays only: rows are gathered in the kernel, nothing is copied) and
   finds for every sorted row the range [lo, hi) of sorted y rows with its label (searchsorted). Positives then
   form diagonal blocks, and a block of sorted x rows only needs the columns [lo(first row), hi(last row)):
   about |P| + B·BLOCK_N entries instead of B·M, so the forward costs one GEMM pass plus the positives (the
   whole matrix again only when one class fills the batch). Per row it sums softplus(lse − z_p) and
   sigmoid(lse − z_p) (column splits as above, partials merged in a fixed order).
3. ``_xent_finalize_kernel`` (one program): loss = Σ softplus / |P| and coef = Σ sigmoid / |P| (per row for
   NT-Xent, one number for XE). |P| is an exact int64 count from the same searchsorted ranges.

Backward: ``_xent_grad_kernel`` recomputes S tiles (always as x_blk · y_blkᵀ, the forward's orientation and K
order) and forms W = dL/dz: −sigmoid(lse_i − z)/|P| on positives, coef_i·exp(z − lse_i) on negatives (|W| <= 1),
times a power-of-two prescale p (see ``_tiles.pow2_prescale``) before the tensor-core product W·y (dx, programs
own x rows) or Wᵀ·x (dy, programs own y rows). A program (row block × column split) computes each of its S
tiles once and walks all of d for it (``_tiles.accumulate_chunks``). The batch-softmax ``_grad_finalize_kernel`` sums the column-split
partials in a fixed order and applies grad/(p·τ); it also reduces the Σ p·W·z partials into dτ. No atomics,
nothing B×M stored; d is zero-padded to a multiple of 16 (O((B + M)·d) copy) so every GEMM load is vectorised.
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
from ._tiles import accumulate_chunks, chunk_dot, row_chunk, s_tile, sp_sig, wrap_triton
from .batch_softmax import finalize_grad

# ---------------------------------------------------------------------------------------------------------------
# Tile configurations (AOT_SPECS below is generated from these tables; tests/test_triton_aot.py compiles them for
# sm_80 / sm_90 and rejects spills). Every kernel that computes S for a dtype uses the same BLOCK_K and the same
# orientation, so the forward and the backward recompute sum the same products in the same K order (bitwise the
# same fp32 value per pair on one GPU, which matters for hinge_pair.py's margin tests; XE only needs it loosely).
#   LSE pass: the batch-softmax forward tiles (128x128x64, 8 warps, 3 stages for fp16/bf16; 64x64x16 for fp32).
#   positive pass: 64x64 tiles (the positive blocks are narrow: less waste at class boundaries, more programs).
#   backward: 128 owned rows x 128 output columns (64 fp32 accumulator registers per thread at 8 warps) per
#     program. dx recomputes [128 own x 32 other] S tiles (64 other rows spill 16 bytes on sm_80); dy needs 64
#     other rows, because its S tile is [other, own] (the forward's orientation) and a wgmma tile has >= 64 rows.
#     BLOCK_D = 128 covers d <= 128 in one chunk (ONE_CHUNK: the product stays in registers; d <= 64 launches a
#     64-column tile, _tiles.grad_config); a larger d is walked chunk by chunk inside the program, each S tile
#     computed once (_tiles.accumulate_chunks).
# ---------------------------------------------------------------------------------------------------------------
_LSE_16 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
_LSE_32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2)
_POS_16 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
_POS_32 = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2)
_DX_16 = dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, BLOCK_D=128, num_warps=8, num_stages=2)
_DY_16 = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, BLOCK_D=128, num_warps=8, num_stages=2)
_BWD_32 = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, BLOCK_D=64, num_warps=8, num_stages=2)
# TF32 dy (_tiles.precision_config): 64 other rows, for the reason of the 16-bit dy pass above (16 fall back to
# mma.sync on sm_90, and spilled 8 B on sm_80 with one chunk). Same BLOCK_K, so still the forward's S.
_DY_32 = dict(_BWD_32, TF32=dict(BLOCK_N=64))
LSE_CONFIGS = {torch.float16: _LSE_16, torch.bfloat16: _LSE_16, torch.float32: _LSE_32}
POS_CONFIGS = {torch.float16: _POS_16, torch.bfloat16: _POS_16, torch.float32: _POS_32}
# BWD_CONFIGS[dtype][dy]
BWD_CONFIGS = {torch.float16: (_DX_16, _DY_16), torch.bfloat16: (_DX_16, _DY_16), torch.float32: (_BWD_32, _DY_32)}
MERGE_BLOCK = 1024


@triton.jit
def _neg_lse_kernel(
    x_ptr, y_ptr, lab_ptr, ref_ptr, tau_ptr, m_ptr, l_ptr,
    B, M, D, cols_per_split, self_mode,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per row i and column split: running max m and Σ exp(z - m) of z_ij over the negatives j of the split."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    inv_tau = 1.0 / tl.load(tau_ptr)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    lab_r = tl.load(lab_ptr + rows, mask=row_ok, other=0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        s = s_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        z = s * inv_tau
        lab_c = tl.load(ref_ptr + cols, mask=col_ok, other=0)
        neg = col_ok[None, :] & (lab_r[:, None] != lab_c[None, :])
        neg = neg & ((rows[:, None] != cols[None, :]) | (self_mode == 0))
        zm = tl.where(neg, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(zm, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new) * 1.4426950408889634
        p = tl.math.exp2(zm * 1.4426950408889634 - m_ref[:, None])
        l_i = l_i * tl.math.exp2(m_i * 1.4426950408889634 - m_ref) + tl.sum(p, 1)
        m_i = m_new
    out = pid_s.to(tl.int64) * B + rows
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(l_ptr + out, l_i, mask=row_ok)


@triton.jit
def _lse_merge_kernel(m_ptr, l_ptr, lse_ptr, B, n_splits, GLOBAL: tl.constexpr, BLOCK: tl.constexpr):
    """GLOBAL: one program, lse[0] = LSE of all partials. Else: lse[r] = LSE over the splits of row r."""
    if GLOBAL:
        gm = tl.full([BLOCK], float("-inf"), tl.float32)
        gl = tl.zeros([BLOCK], tl.float32)
        for start in range(0, B, BLOCK):
            r = start + tl.arange(0, BLOCK)
            ok = r < B
            m_at = m_ptr + r  # pointers step by B per split: 64-bit offsets however large n_splits · B gets
            l_at = l_ptr + r
            for s in range(0, n_splits):
                mp = tl.load(m_at, mask=ok, other=float("-inf"))
                lp = tl.load(l_at, mask=ok, other=0.0)
                m_at += B
                l_at += B
                m_new = tl.maximum(gm, mp)
                ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                gl = gl * tl.math.exp2((gm - ref) * 1.4426950408889634) + \
                    lp * tl.math.exp2((mp - ref) * 1.4426950408889634)
                gm = m_new
        mx = tl.max(gm, 0)
        ref = tl.where(mx == float("-inf"), 0.0, mx)
        tot = tl.sum(gl * tl.math.exp2((gm - ref) * 1.4426950408889634), 0)
        # tot >= 1 when any negative exists (its max term is exp(0)); 0 -> -inf without evaluating log(0)
        tl.store(lse_ptr, tl.where(tot > 0, ref + tl.log(tl.maximum(tot, 1.0)), float("-inf")))
    else:
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = r < B
        mx = tl.full([BLOCK], float("-inf"), tl.float32)
        m_at = m_ptr + r
        for s in range(0, n_splits):
            mx = tl.maximum(mx, tl.load(m_at, mask=ok, other=float("-inf")))
            m_at += B
        ref = tl.where(mx == float("-inf"), 0.0, mx)
        sm = tl.zeros([BLOCK], tl.float32)
        m_at = m_ptr + r
        l_at = l_ptr + r
        for s in range(0, n_splits):
            mp = tl.load(m_at, mask=ok, other=float("-inf"))
            sm += tl.load(l_at, mask=ok, other=0.0) * tl.math.exp2((mp - ref) * 1.4426950408889634)
            m_at += B
            l_at += B
        tl.store(lse_ptr + r, tl.where(sm > 0, ref + tl.log(tl.maximum(sm, 1.0)), float("-inf")), mask=ok)


@triton.jit
def _pos_stats_kernel(
    x_ptr, y_ptr, px_ptr, py_ptr, lo_ptr, hi_ptr, tau_ptr, lse_ptr, sp_ptr, sg_ptr,
    B, D, n_splits, self_mode, lse_stride,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Block of label-sorted x rows r (original row px[r]), one split of the columns [lo, hi) of their labels in
    label-sorted y: sp / sg[split, px[r]] = Σ over the positives of softplus / sigmoid(lse_row − z)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    inv_tau = 1.0 / tl.load(tau_ptr)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < B
    rid = tl.load(px_ptr + r, mask=r_ok, other=0)
    lo = tl.load(lo_ptr + r, mask=r_ok, other=0).to(tl.int32)
    hi = tl.load(hi_ptr + r, mask=r_ok, other=0).to(tl.int32)
    lse = tl.load(lse_ptr + rid * lse_stride, mask=r_ok, other=float("-inf"))
    c_lo = tl.min(tl.where(r_ok, lo, 2147483647), 0)
    c_hi = tl.max(hi, 0)
    chunk = tl.cdiv(tl.cdiv(tl.maximum(c_hi - c_lo, 0), n_splits), BLOCK_N) * BLOCK_N
    n_lo = c_lo + pid_s * chunk
    n_hi = tl.minimum(n_lo + chunk, c_hi)
    sp_i = tl.zeros([BLOCK_M], tl.float32)
    sg_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        c = start_n + tl.arange(0, BLOCK_N)
        c_ok = c < n_hi
        cid = tl.load(py_ptr + c, mask=c_ok, other=0)
        s = s_tile(x_ptr, y_ptr, rid, cid, r_ok, c_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        pos = c_ok[None, :] & (c[None, :] >= lo[:, None]) & (c[None, :] < hi[:, None])
        pos = pos & ((rid[:, None] != cid[None, :]) | (self_mode == 0))
        sp, sg = sp_sig(lse[:, None] - s * inv_tau)
        sp_i += tl.sum(tl.where(pos, sp, 0.0), 1)
        sg_i += tl.sum(tl.where(pos, sg, 0.0), 1)
    out = pid_s.to(tl.int64) * B + rid
    tl.store(sp_ptr + out, sp_i, mask=r_ok)
    tl.store(sg_ptr + out, sg_i, mask=r_ok)


@triton.jit
def _xent_finalize_kernel(sp_ptr, sg_ptr, npos_ptr, loss_ptr, coef_ptr, B, n_splits,
                          GLOBAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program: loss = Σ sp / |P|; coef = Σ sg / |P| (GLOBAL) or coef[i] = sg_i / |P| (0 when |P| = 0)."""
    npos = tl.load(npos_ptr)
    inv_p = tl.where(npos > 0, 1.0 / tl.maximum(npos, 1).to(tl.float32), 0.0)
    tot_sp = tl.zeros([BLOCK], tl.float32)
    tot_sg = tl.zeros([BLOCK], tl.float32)
    for start in range(0, B, BLOCK):
        r = start + tl.arange(0, BLOCK)
        ok = r < B
        a = tl.zeros([BLOCK], tl.float32)
        g = tl.zeros([BLOCK], tl.float32)
        sp_at = sp_ptr + r
        sg_at = sg_ptr + r
        for s in range(0, n_splits):
            a += tl.load(sp_at, mask=ok, other=0.0)
            g += tl.load(sg_at, mask=ok, other=0.0)
            sp_at += B
            sg_at += B
        tot_sp += a
        if GLOBAL:
            tot_sg += g
        else:
            tl.store(coef_ptr + r, g * inv_p, mask=ok)
    tl.store(loss_ptr, tl.sum(tot_sp, 0) * inv_p)
    if GLOBAL:
        tl.store(coef_ptr, tl.sum(tot_sg, 0) * inv_p)


@triton.jit
def _xent_grad_kernel(
    x_ptr, y_ptr, lab_ptr, ref_ptr, tau_ptr, lse_ptr, coef_ptr, npos_ptr, scale_ptr, part_ptr, dt_ptr,
    B, M, D, cols_per_split, self_mode, lse_stride,
    DY: tl.constexpr, ONE_CHUNK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx (DY=False): part[split, i, :] = Σ_{j in split} p·W_ij y[j, :] over a block of x rows i, and
    dt[split, block] = Σ p·W_ij z_ij. dy (DY=True): part[split, j, :] = Σ_{i in split} p·W_ij x[i, :] over a block
    of y rows j. W = dL/dz (module docstring); the S tile is x_blk · y_blkᵀ in both variants. Each S tile is
    computed once: ONE_CHUNK (D <= BLOCK_D) keeps the product in registers, otherwise every tile's product is
    added to the partial rows chunk by chunk (``_tiles.accumulate_chunks``)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    inv_tau = 1.0 / tl.load(tau_ptr)
    scale = tl.load(scale_ptr)
    npos = tl.load(npos_ptr)
    inv_p = tl.where(npos > 0, 1.0 / tl.maximum(npos, 1).to(tl.float32), 0.0)
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
    if DY:  # own rows are y rows (columns of S): their keys are loop-invariant
        lab_j = tl.load(ref_ptr + own, mask=own_ok, other=0)
    else:  # own rows are x rows: keys, lse and coef are loop-invariant
        lab_i = tl.load(lab_ptr + own, mask=own_ok, other=0)
        lse_i = tl.load(lse_ptr + own * lse_stride, mask=own_ok, other=0.0)
        coef_i = tl.load(coef_ptr + own * lse_stride, mask=own_ok, other=0.0)
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
            lse_i = tl.load(lse_ptr + xi * lse_stride, mask=xi_ok, other=0.0)
            coef_i = tl.load(coef_ptr + xi * lse_stride, mask=xi_ok, other=0.0)
        else:
            xi, xi_ok, yj, yj_ok = own, own_ok, oth, oth_ok
            s = s_tile(x_ptr, y_ptr, xi, yj, xi_ok, yj_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            lab_j = tl.load(ref_ptr + yj, mask=yj_ok, other=0)
        z = s * inv_tau
        ok = xi_ok[:, None] & yj_ok[None, :] & ((xi[:, None] != yj[None, :]) | (self_mode == 0))
        same = lab_i[:, None] == lab_j[None, :]
        _, sig = sp_sig(lse_i[:, None] - z)
        w_neg = coef_i[:, None] * tl.math.exp2(tl.minimum(z - lse_i[:, None], 0.0) * 1.4426950408889634)
        w = tl.where(ok & same, -sig * inv_p, tl.where(ok & ~same, w_neg, 0.0)) * scale
        if DY:
            w = tl.trans(w)
        else:
            dt += tl.sum(w * z, 1)
        if ONE_CHUNK:
            b_at, b_mask = row_chunk(b_ptr, oth.to(tl.int64), oth_ok, 0, D, BLOCK_D)
            acc = chunk_dot(w, tl.load(b_at, mask=b_mask, other=0.0), acc, 0, PRECISION)
        else:
            accumulate_chunks(w, b_ptr, oth.to(tl.int64), oth_ok, part_ptr, out_rows, own_ok, D, start_n > n_lo,
                              0, PRECISION, BLOCK_D)
    if ONE_CHUNK:
        at, mask = row_chunk(part_ptr, out_rows, own_ok, 0, D, BLOCK_D)
        tl.store(at, acc, mask=mask)
    if not DY:
        tl.store(dt_ptr + pid_s * tl.num_programs(0) + pid_m, tl.sum(dt, 0))


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
def _check(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, temperature: Tensor, self_mode: bool) -> None:
    _tiles.check_pair_inputs(x, y, labels, ref_labels, LSE_CONFIGS)
    torch._check(temperature.dim() == 0 and temperature.dtype == torch.float32, lambda: "temperature: 0-dim fp32")
    torch._check(not self_mode or x.shape[0] == y.shape[0], lambda: "self_mode needs B == M")


def fwd_impl(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, temperature: Tensor, global_partition: bool,
             self_mode: bool, num_splits: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The forward; ``num_splits`` overrides the column-split heuristic (tests use it)."""
    _check(x, y, labels, ref_labels, temperature, self_mode)
    B, M = x.shape[0], y.shape[0]
    dev = x.device
    n_out = 1 if global_partition else B
    loss = _debug.new_output((), dtype=torch.float32, device=dev)
    lse = _debug.new_output((n_out,), dtype=torch.float32, device=dev)
    coef = _debug.new_output((n_out,), dtype=torch.float32, device=dev)
    xp, yp = _tiles.pad16_pair(x, y)
    D = xp.shape[1]
    prec = _tiles.precision(x.dtype)
    key_x, key_y, npos, (px, py, lo, hi) = _tiles.label_index(labels, ref_labels, self_mode, sorted_rows=True)
    # 1. negative LSE per row and split, merged per row or globally.
    cfg = _tiles.precision_config(LSE_CONFIGS[x.dtype], x.dtype, prec)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    rp = triton.cdiv(B, bm)
    ns, per = _tiles.num_splits(dev, rp, triton.cdiv(M, bn), num_splits)
    m_part = _debug.new_output((ns, B), dtype=torch.float32, device=dev)
    l_part = _debug.new_output((ns, B), dtype=torch.float32, device=dev)
    wrap_triton(_neg_lse_kernel)[(rp, ns)](
        xp, yp, key_x, key_y, temperature, m_part, l_part, B, M, D, per * bn, int(self_mode),
        PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], **_tiles.launch(cfg))
    wrap_triton(_lse_merge_kernel)[(1 if global_partition else triton.cdiv(B, MERGE_BLOCK),)](
        m_part, l_part, lse, B, ns, GLOBAL=global_partition, BLOCK=MERGE_BLOCK, num_warps=4, num_stages=1)
    # 2. softplus / sigmoid sums over the positive pairs (label-sorted blocks).
    cfg = _tiles.precision_config(POS_CONFIGS[x.dtype], x.dtype, prec)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    rp = triton.cdiv(B, bm)
    ns, _ = _tiles.num_splits(dev, rp, triton.cdiv(M, bn), num_splits)
    sp = _debug.new_output((ns, B), dtype=torch.float32, device=dev)
    sg = _debug.new_output((ns, B), dtype=torch.float32, device=dev)
    wrap_triton(_pos_stats_kernel)[(rp, ns)](
        xp, yp, px, py, lo, hi, temperature, lse, sp, sg, B, D, ns, int(self_mode), 0 if global_partition else 1,
        PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], **_tiles.launch(cfg))
    # 3. loss and coef.
    wrap_triton(_xent_finalize_kernel)[(1,)](
        sp, sg, npos, loss, coef, B, ns, GLOBAL=global_partition, BLOCK=MERGE_BLOCK, num_warps=4, num_stages=1)
    return loss, lse, coef


def _grad(xp: Tensor, yp: Tensor, key_x: Tensor, key_y: Tensor, tau: Tensor, lse: Tensor, coef: Tensor,
          npos: Tensor, scale: Tensor, grad_eff: Tensor, out: Tensor, dtemp: Optional[Tensor], dy: bool,
          self_mode: bool, lse_stride: int, num_splits: Optional[int]) -> None:
    B, M, D = xp.shape[0], yp.shape[0], xp.shape[1]
    n_own, n_other = (M, B) if dy else (B, M)
    base, prec = _tiles.launch_config(BWD_CONFIGS[xp.dtype][dy], xp.dtype)
    cfg, one = _tiles.grad_config(base, D)
    bm, bn, bd = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    rp = triton.cdiv(n_own, bm)
    ns, per = _tiles.num_splits(xp.device, rp, triton.cdiv(n_other, bn), num_splits)
    part = _debug.new_output((ns, n_own, D), dtype=torch.float32, device=xp.device)
    dt = _debug.new_output((ns * rp if not dy else 1,), dtype=torch.float32, device=xp.device)
    wrap_triton(_xent_grad_kernel)[(rp, ns)](
        xp, yp, key_x, key_y, tau, lse, coef, npos, scale, part, dt, B, M, D, per * bn, int(self_mode),
        lse_stride, DY=dy, ONE_CHUNK=one, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=cfg["BLOCK_K"], BLOCK_D=bd, **_tiles.launch(cfg))
    finalize_grad(part, out, grad_eff, tau, dt, dtemp)


def bwd_impl(grad_loss: Tensor, x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, temperature: Tensor,
             global_partition: bool, self_mode: bool, lse: Tensor, coef: Tensor,
             num_splits: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The backward; ``num_splits`` overrides the column-split heuristic (tests use it)."""
    _check(x, y, labels, ref_labels, temperature, self_mode)
    n = 1 if global_partition else x.shape[0]
    torch._check(lse.shape == (n,) and coef.shape == (n,), lambda: "bad lse / coef shapes")
    dev = x.device
    dx = _debug.new_output(x.shape, dtype=x.dtype, device=dev)
    dy = _debug.new_output(y.shape, dtype=y.dtype, device=dev)
    dtemp = _debug.new_output((), dtype=torch.float32, device=dev)
    key_x, key_y, npos, _ = _tiles.label_index(labels, ref_labels, self_mode, sorted_rows=False)
    # |W| <= max(1/|P|, max coef): scale it to ~2^14 (exact power of two, removed again through grad / p).
    bound = torch.maximum(torch.where(npos > 0, 1.0 / npos.clamp_min(1).double(), 0.0).reshape(()),
                          coef.double().max())
    scale = _tiles.pow2_prescale(bound)
    grad_eff = grad_loss.to(torch.float32).reshape(()) / scale
    xp, yp = _tiles.pad16_pair(x, y)
    stride = 0 if global_partition else 1
    _grad(xp, yp, key_x, key_y, temperature, lse, coef, npos, scale, grad_eff, dx, dtemp, False, self_mode,
          stride, num_splits)
    _grad(xp, yp, key_x, key_y, temperature, lse, coef, npos, scale, grad_eff, dy, None, True, self_mode,
          stride, num_splits)
    return dx, dy, dtemp


@triton_op("xent_fwd")
def xent_fwd(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, temperature: Tensor, global_partition: bool,
             self_mode: bool, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    if normalize:
        x, y = _tiles.normalized_inputs(x, y)
    return fwd_impl(x, y, labels, ref_labels, temperature, global_partition, self_mode)


@triton_op("xent_bwd")
def xent_bwd(grad_loss: Tensor, x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, temperature: Tensor,
             global_partition: bool, self_mode: bool, normalize: bool, lse: Tensor,
             coef: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not normalize:
        return bwd_impl(grad_loss, x, y, labels, ref_labels, temperature, global_partition, self_mode, lse, coef)
    xh, yh = _tiles.normalized_inputs(x, y)
    dx, dy, dtemp = bwd_impl(grad_loss, xh, yh, labels, ref_labels, temperature, global_partition, self_mode, lse,
                             coef)
    return *_tiles.raw_row_grads(dx, dy, x, y), dtemp


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: every constexpr / dtype combination the launchers above can produce, with the
# 16-divisibility hints of an aligned batch (B, M multiples of 16) and of a ragged one. d is always padded to a
# multiple of 16 and the split widths are multiples of BLOCK_N; flags (self_mode, lse_stride) get no hint.
# (The gradient finalize is batch_softmax._grad_finalize_kernel, compiled by that module's specs.)
# ---------------------------------------------------------------------------------------------------------------
def _specs(tf32: bool = False) -> list[AOTSpec]:
    """The specs of the default launches; ``tf32=True``: the fp32 ones under the TF32 opt-in (AOT_SPECS_TF32)."""
    specs = []
    for dtype, t, prec in spec_precisions(tf32):
        c = _tiles.precision_config(LSE_CONFIGS[dtype], dtype, prec)
        sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "lab_ptr": "*i32", "ref_ptr": "*i32", "tau_ptr": "*fp32",
               "m_ptr": "*fp32", "l_ptr": "*fp32", "B": "i32", "M": "i32", "D": "i32", "cols_per_split": "i32",
               "self_mode": "i32"}
        specs += gemm_specs(f"xent_neg_lse_{t}", _neg_lse_kernel, sig, c, t,
                            dict(PRECISION=prec))
        c = _tiles.precision_config(POS_CONFIGS[dtype], dtype, prec)
        sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "px_ptr": "*i64", "py_ptr": "*i64", "lo_ptr": "*i64",
               "hi_ptr": "*i64", "tau_ptr": "*fp32", "lse_ptr": "*fp32", "sp_ptr": "*fp32", "sg_ptr": "*fp32",
               "B": "i32", "D": "i32", "n_splits": "i32", "self_mode": "i32", "lse_stride": "i32"}
        specs += gemm_specs(f"xent_pos_stats_{t}", _pos_stats_kernel, sig, c, t,
                            dict(PRECISION=prec), ("D",), ("B",))
        sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "lab_ptr": "*i32", "ref_ptr": "*i32", "tau_ptr": "*fp32",
               "lse_ptr": "*fp32", "coef_ptr": "*fp32", "npos_ptr": "*i64", "scale_ptr": "*fp32",
               "part_ptr": "*fp32", "dt_ptr": "*fp32", "B": "i32", "M": "i32", "D": "i32", "cols_per_split": "i32",
               "self_mode": "i32", "lse_stride": "i32"}
        for dy in (False, True):
            c = _tiles.precision_config(BWD_CONFIGS[dtype][dy], dtype, prec)
            for suffix, one, gc in _tiles.grad_variants(c):  # chunked, one chunk, narrowed one chunk
                specs += gemm_specs(f"xent_grad_{t}_{'dy' if dy else 'dx'}{suffix}", _xent_grad_kernel, sig, gc,
                                    t, dict(DY=dy, ONE_CHUNK=one, PRECISION=prec))
    for glob in (False, True):
        tag = "global" if glob else "rows"
        sig = {"m_ptr": "*fp32", "l_ptr": "*fp32", "lse_ptr": "*fp32", "B": "i32", "n_splits": "i32"}
        specs += with_alignments(AOTSpec(f"xent_lse_merge_{tag}", _lse_merge_kernel, sig,
                                          dict(GLOBAL=glob, BLOCK=MERGE_BLOCK), 4, 1), (), ("B",))
        sig = {"sp_ptr": "*fp32", "sg_ptr": "*fp32", "npos_ptr": "*i64", "loss_ptr": "*fp32", "coef_ptr": "*fp32",
               "B": "i32", "n_splits": "i32"}
        specs += with_alignments(AOTSpec(f"xent_finalize_{tag}", _xent_finalize_kernel, sig,
                                          dict(GLOBAL=glob, BLOCK=MERGE_BLOCK), 4, 1), (), ("B",))
    return specs


AOT_SPECS = _specs()
AOT_SPECS_TF32 = _specs(tf32=True)
