"""Triton kernels for the hinge-pair losses: Threshold-Consistent Margin (docs/spec.md §2.3) and margin contrastive (docs/spec.md §2.4).

Raw ops, the schema of the C++ ``flashdml::hinge_pair_fwd / _bwd`` (``flashdml._schemas.SCHEMAS``; inputs
contiguous, same dtype; x [B, d], y [M, d]; labels / ref_labels int64, ``arange`` in pair mode):

* ``torch.ops.flashdml_triton.hinge_pair_fwd(x, y, labels, ref_labels, pos_margin, neg_margin, pos_weight,
  neg_weight, drop_diagonal, strict, normalize) -> (loss [] fp32, sums [2] fp32, counts [2] int64)``
* ``torch.ops.flashdml_triton.hinge_pair_bwd(grad_loss, x, y, labels, ref_labels, pos_margin, neg_margin,
  pos_weight, neg_weight, drop_diagonal, strict, normalize, counts) -> (dx, dy)``

``normalize=True``: the op L2-normalises the rows itself (``_tiles.normalized_inputs``; y is x normalised once)
and the backward returns the gradients with respect to the raw rows (``_tiles.raw_row_grads``), as the C++ ops do.
``normalize=False``: the rows are used as given (the similarities below are those of the rows the kernels see).

Pair (i, j), s = S_ij in fp32, margins rounded to fp32: positive if labels are equal (with ``drop_diagonal`` the
pairs (i, i) are neither positive nor negative), else negative. Hard positive: s <= m+ (``strict``: s < m+), hard
negative: s >= m− (strict: s > m−). sums / counts are [positive, negative]: Σ (m+ − s) over hard positives,
Σ (s − m−) over hard negatives, and their exact counts. loss = w+·sums[0]/counts[0] + w−·sums[1]/counts[1]
(a term is 0 when its count is 0), formed in fp64. TCM: drop_diagonal = self mode, strict = False; contrastive:
drop_diagonal = False, strict = True, weights 1. NaN similarities fail every test (neither counted nor given a
gradient).

Forward: ``_hinge_stats_kernel`` streams S tiles (column splits for occupancy) and keeps, per row, fp64 hinge sums
(each tile's row sums are formed in fp32 from fp32 hinges, then added in fp64) and int32 counts (<= M per row); each
program writes its four partials (fp64 sums, int64 counts), and ``_tiles.hinge_finalize_kernel`` (one program)
reduces them in a fixed order. Backward: ``_hinge_grad_kernel`` recomputes S tiles with the forward's orientation
(x_blk · y_blkᵀ) and BLOCK_K (the same products summed in the same K order: on the GPU the same fp32 similarity per
pair, so it selects the pairs the forward counted; this cannot be checked without a GPU, the interpreter's numpy dot
may round differently per tile shape, which is why the margin-tie tests use exactly representable similarities).
W = dL/ds is −w+/#hp, +w−/#hn or 0, prescaled by a power of two for the tensor-core product W·y (dx) or Wᵀ·x (dy)
(``_tiles.weights_dot``: for fp16 / bf16 rows W is split into a 16-bit head and tail, so the constants are not
rounded to 16 bits). A program computes each of its S tiles once and walks all of d for it (``_tiles.accumulate_chunks``
when d does not fit one BLOCK_D chunk).
The batch-softmax ``_grad_finalize_kernel`` sums the split partials in a fixed order and rescales.
Deterministic, no atomics, nothing B×M stored; d is zero-padded to a multiple of 16.
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
from ._tiles import (HINGE_FINAL_BLOCK, accumulate_chunks, chunk_dot, hard_pairs, hinge_finalize_kernel, row_chunk,
                     s_tile, wrap_triton)
from .batch_softmax import finalize_grad
from .xent import BWD_CONFIGS as _XENT_BWD_CONFIGS, LSE_CONFIGS

# Tile configurations: the forward uses the XE LSE-pass tiles, the backward the XE gradient tiles (same BLOCK_K per
# dtype, so forward and backward compute each similarity identically). See xent.py for the register budget.
# TF32 (_tiles.precision_config): the fp32 stats pass at 4 warps (8 warps: 8 B of stack on sm_90); the dy pass
# inherits XE's TF32 override (64 other rows). BLOCK_K is unchanged.
FWD_CONFIGS = {**LSE_CONFIGS, torch.float32: dict(LSE_CONFIGS[torch.float32], TF32=dict(num_warps=4))}
# The gradient configurations of XE, except the 16-bit dy pass: its head + tail weight products
# (``_tiles.weights_dot``) need a second [BLOCK_N, BLOCK_M] 16-bit tile, which spills on sm_80 with BLOCK_D = 128.
_DY_16 = dict(_XENT_BWD_CONFIGS[torch.float16][1], BLOCK_D=64)
BWD_CONFIGS = {t: (dx, _DY_16 if t != torch.float32 else dy) for t, (dx, dy) in _XENT_BWD_CONFIGS.items()}
assert all(_tiles.precision_config(FWD_CONFIGS[t], t, p)["BLOCK_K"] == _tiles.precision_config(c, t, p)["BLOCK_K"]
           for t in FWD_CONFIGS for c in BWD_CONFIGS[t] for p in ("ieee", "tf32")), \
    "forward and backward must compute S with the same BLOCK_K"


@triton.jit
def _hinge_stats_kernel(
    x_ptr, y_ptr, lab_ptr, ref_ptr, psum_ptr, pcnt_ptr, pos_margin, neg_margin,
    B, M, D, cols_per_split, drop_diagonal, strict,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (row block, split): psum[0/1, prog] = Σ hinges of its hard positives / negatives (fp64),
    pcnt[0/1, prog] = their counts (int64); prog = split · row_blocks + row block."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    mp = tl.full([], pos_margin, tl.float32)
    mn = tl.full([], neg_margin, tl.float32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    lab_r = tl.load(lab_ptr + rows, mask=row_ok, other=0)
    ps = tl.zeros([BLOCK_M], tl.float64)
    ns = tl.zeros([BLOCK_M], tl.float64)
    pc = tl.zeros([BLOCK_M], tl.int32)
    nc = tl.zeros([BLOCK_M], tl.int32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        s = s_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        lab_c = tl.load(ref_ptr + cols, mask=col_ok, other=0)
        hp, hn = hard_pairs(s, lab_r, lab_c, rows, cols, row_ok, col_ok, mp, mn, drop_diagonal, strict)
        ps += tl.sum(tl.where(hp, mp - s, 0.0), 1).to(tl.float64)
        ns += tl.sum(tl.where(hn, s - mn, 0.0), 1).to(tl.float64)
        pc += tl.sum(hp.to(tl.int32), 1)
        nc += tl.sum(hn.to(tl.int32), 1)
    n_prog = tl.num_programs(0) * tl.num_programs(1)
    prog = pid_s * tl.num_programs(0) + pid_m
    tl.store(psum_ptr + prog, tl.sum(ps, 0))
    tl.store(psum_ptr + n_prog + prog, tl.sum(ns, 0))
    tl.store(pcnt_ptr + prog, tl.sum(pc.to(tl.int64), 0))
    tl.store(pcnt_ptr + n_prog + prog, tl.sum(nc.to(tl.int64), 0))


@triton.jit
def _hinge_grad_kernel(
    x_ptr, y_ptr, lab_ptr, ref_ptr, w_ptr, part_ptr, pos_margin, neg_margin,
    B, M, D, cols_per_split, drop_diagonal, strict,
    DY: tl.constexpr, ONE_CHUNK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx (DY=False): part[split, i, :] = Σ_{j in split} W_ij y[j, :] over a block of x rows i; dy (DY=True):
    part[split, j, :] = Σ_{i in split} W_ij x[i, :] over a block of y rows j. W = w[0] on hard positives, w[1] on
    hard negatives (prescaled dL/ds), 0 elsewhere; the S tile is x_blk · y_blkᵀ in both variants. Each S tile is
    computed once: ONE_CHUNK (D <= BLOCK_D) keeps the product in registers, otherwise it is added to the partial
    rows chunk by chunk (``_tiles.accumulate_chunks``)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    mp = tl.full([], pos_margin, tl.float32)
    mn = tl.full([], neg_margin, tl.float32)
    wp = tl.load(w_ptr)
    wn = tl.load(w_ptr + 1)
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
    if DY:
        lab_j = tl.load(ref_ptr + own, mask=own_ok, other=0)
    else:
        lab_i = tl.load(lab_ptr + own, mask=own_ok, other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, n_other)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        oth = start_n + tl.arange(0, BLOCK_N)
        oth_ok = oth < n_hi
        if DY:
            xi, xi_ok, yj, yj_ok = oth, oth_ok, own, own_ok
            s = s_tile(x_ptr, y_ptr, xi, yj, xi_ok, yj_ok, D, PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
            lab_i = tl.load(lab_ptr + xi, mask=xi_ok, other=0)
        else:
            xi, xi_ok, yj, yj_ok = own, own_ok, oth, oth_ok
            s = s_tile(x_ptr, y_ptr, xi, yj, xi_ok, yj_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            lab_j = tl.load(ref_ptr + yj, mask=yj_ok, other=0)
        hp, hn = hard_pairs(s, lab_i, lab_j, xi, yj, xi_ok, yj_ok, mp, mn, drop_diagonal, strict)
        w = tl.where(hp, wp, tl.where(hn, wn, 0.0))
        if DY:
            w = tl.trans(w)
        if ONE_CHUNK:
            b_at, b_mask = row_chunk(b_ptr, oth.to(tl.int64), oth_ok, 0, D, BLOCK_D)
            acc = chunk_dot(w, tl.load(b_at, mask=b_mask, other=0.0), acc, 1, PRECISION)
        else:
            accumulate_chunks(w, b_ptr, oth.to(tl.int64), oth_ok, part_ptr, out_rows, own_ok, D, start_n > n_lo,
                              1, PRECISION, BLOCK_D)
    if ONE_CHUNK:
        at, mask = row_chunk(part_ptr, out_rows, own_ok, 0, D, BLOCK_D)
        tl.store(at, acc, mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
def _check(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, drop_diagonal: bool) -> None:
    _tiles.check_pair_inputs(x, y, labels, ref_labels, FWD_CONFIGS)
    torch._check(not drop_diagonal or x.shape[0] == y.shape[0], lambda: "drop_diagonal needs B == M (self mode)")


def fwd_impl(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, pos_margin: float, neg_margin: float,
             pos_weight: float, neg_weight: float, drop_diagonal: bool, strict: bool,
             num_splits: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The forward; ``num_splits`` overrides the column-split heuristic (tests use it)."""
    _check(x, y, labels, ref_labels, drop_diagonal)
    B, M = x.shape[0], y.shape[0]
    dev = x.device
    loss = _debug.new_output((), dtype=torch.float32, device=dev)
    sums = _debug.new_output((2,), dtype=torch.float32, device=dev)
    counts = _debug.new_output((2,), dtype=torch.int64, device=dev)
    key_x, key_y, _, _ = _tiles.label_index(labels, ref_labels, False, sorted_rows=False)
    xp, yp = _tiles.pad16_pair(x, y)
    cfg, prec = _tiles.launch_config(FWD_CONFIGS[x.dtype], x.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    rp = triton.cdiv(B, bm)
    ns, per = _tiles.num_splits(dev, rp, triton.cdiv(M, bn), num_splits)
    psum = _debug.new_output((2, ns * rp), dtype=torch.float64, device=dev)
    pcnt = _debug.new_output((2, ns * rp), dtype=torch.int64, device=dev)
    wrap_triton(_hinge_stats_kernel)[(rp, ns)](
        xp, yp, key_x, key_y, psum, pcnt, float(pos_margin), float(neg_margin), B, M, xp.shape[1], per * bn,
        int(drop_diagonal), int(strict),
        PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], **_tiles.launch(cfg))
    wrap_triton(hinge_finalize_kernel)[(1,)](
        psum, pcnt, loss, sums, counts, ns * rp, float(pos_weight), float(neg_weight),
        BLOCK=HINGE_FINAL_BLOCK, num_warps=4, num_stages=1)
    return loss, sums, counts


def _grad(xp: Tensor, yp: Tensor, key_x: Tensor, key_y: Tensor, wts: Tensor, grad_eff: Tensor, one: Tensor,
          out: Tensor, pos_margin: float, neg_margin: float, drop_diagonal: bool, strict: bool, dy: bool,
          num_splits: Optional[int]) -> None:
    B, M, D = xp.shape[0], yp.shape[0], xp.shape[1]
    n_own, n_other = (M, B) if dy else (B, M)
    base, prec = _tiles.launch_config(BWD_CONFIGS[xp.dtype][dy], xp.dtype)
    cfg, one_chunk = _tiles.grad_config(base, D)
    bm, bn, bd = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    rp = triton.cdiv(n_own, bm)
    ns, per = _tiles.num_splits(xp.device, rp, triton.cdiv(n_other, bn), num_splits)
    part = _debug.new_output((ns, n_own, D), dtype=torch.float32, device=xp.device)
    wrap_triton(_hinge_grad_kernel)[(rp, ns)](
        xp, yp, key_x, key_y, wts, part, float(pos_margin), float(neg_margin), B, M, D, per * bn,
        int(drop_diagonal), int(strict), DY=dy, ONE_CHUNK=one_chunk, PRECISION=prec,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], BLOCK_D=bd, **_tiles.launch(cfg))
    finalize_grad(part, out, grad_eff, one, part, None)


def bwd_impl(grad_loss: Tensor, x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, pos_margin: float,
             neg_margin: float, pos_weight: float, neg_weight: float, drop_diagonal: bool, strict: bool,
             counts: Tensor, num_splits: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The backward; ``num_splits`` overrides the column-split heuristic (tests use it)."""
    _check(x, y, labels, ref_labels, drop_diagonal)
    torch._check(counts.shape == (2,) and counts.dtype == torch.int64, lambda: "counts: int64 [2]")
    dev = x.device
    dx = _debug.new_output(x.shape, dtype=x.dtype, device=dev)
    dy = _debug.new_output(y.shape, dtype=y.dtype, device=dev)
    key_x, key_y, _, _ = _tiles.label_index(labels, ref_labels, False, sorted_rows=False)
    # dL/ds per hard pair: -w+/#hp, +w-/#hn (0 for an empty set), scaled by a power of two p so that the larger
    # is ~2^14 before the cast to the input dtype; grad / p undoes it in the finalize (one = τ placeholder).
    inv = torch.where(counts > 0, 1.0 / counts.clamp_min(1).to(torch.float64), 0.0)
    per_pair = torch.stack([inv[0] * -float(pos_weight), inv[1] * float(neg_weight)])
    scale = _tiles.pow2_prescale(per_pair.abs().max())
    wts = (per_pair * scale).to(torch.float32)
    grad_eff = grad_loss.to(torch.float32).reshape(()) / scale
    one = torch.ones((), dtype=torch.float32, device=dev)
    xp, yp = _tiles.pad16_pair(x, y)
    for out, is_dy in ((dx, False), (dy, True)):
        _grad(xp, yp, key_x, key_y, wts, grad_eff, one, out, pos_margin, neg_margin, drop_diagonal, strict, is_dy,
              num_splits)
    return dx, dy


@triton_op("hinge_pair_fwd")
def hinge_pair_fwd(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, pos_margin: float, neg_margin: float,
                   pos_weight: float, neg_weight: float, drop_diagonal: bool, strict: bool,
                   normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    if normalize:
        x, y = _tiles.normalized_inputs(x, y)
    return fwd_impl(x, y, labels, ref_labels, pos_margin, neg_margin, pos_weight, neg_weight, drop_diagonal, strict)


@triton_op("hinge_pair_bwd")
def hinge_pair_bwd(grad_loss: Tensor, x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, pos_margin: float,
                   neg_margin: float, pos_weight: float, neg_weight: float, drop_diagonal: bool, strict: bool,
                   normalize: bool, counts: Tensor) -> tuple[Tensor, Tensor]:
    xh, yh = _tiles.normalized_inputs(x, y) if normalize else (x, y)
    dx, dy = bwd_impl(grad_loss, xh, yh, labels, ref_labels, pos_margin, neg_margin, pos_weight, neg_weight,
                      drop_diagonal, strict, counts)
    return _tiles.raw_row_grads(dx, dy, x, y) if normalize else (dx, dy)


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (aligned and ragged batch; d is padded, split widths are multiples of BLOCK_N, the
# flags get no hint). The gradient finalize is batch_softmax._grad_finalize_kernel, compiled by that module.
# ---------------------------------------------------------------------------------------------------------------
def _specs(tf32: bool = False) -> list[AOTSpec]:
    """The specs of the default launches; ``tf32=True``: the fp32 ones under the TF32 opt-in (AOT_SPECS_TF32)."""
    specs = []
    for dtype, t, prec in spec_precisions(tf32):
        c = _tiles.precision_config(FWD_CONFIGS[dtype], dtype, prec)
        sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "lab_ptr": "*i32", "ref_ptr": "*i32", "psum_ptr": "*fp64",
               "pcnt_ptr": "*i64", "pos_margin": "fp32", "neg_margin": "fp32", "B": "i32", "M": "i32", "D": "i32",
               "cols_per_split": "i32", "drop_diagonal": "i32", "strict": "i32"}
        specs += gemm_specs(f"hinge_stats_{t}", _hinge_stats_kernel, sig, c, t,
                            dict(PRECISION=prec))
        sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "lab_ptr": "*i32", "ref_ptr": "*i32", "w_ptr": "*fp32",
               "part_ptr": "*fp32", "pos_margin": "fp32", "neg_margin": "fp32", "B": "i32", "M": "i32", "D": "i32",
               "cols_per_split": "i32", "drop_diagonal": "i32", "strict": "i32"}
        for dy in (False, True):
            c = _tiles.precision_config(BWD_CONFIGS[dtype][dy], dtype, prec)
            for suffix, one, gc in _tiles.grad_variants(c):  # chunked, one chunk, narrowed one chunk
                specs += gemm_specs(f"hinge_grad_{t}_{'dy' if dy else 'dx'}{suffix}", _hinge_grad_kernel, sig, gc,
                                    t, dict(DY=dy, ONE_CHUNK=one, PRECISION=prec))
    sig = {"psum_ptr": "*fp64", "pcnt_ptr": "*i64", "loss_ptr": "*fp32", "sums_ptr": "*fp32", "counts_ptr": "*i64",
           "n_prog": "i32", "pos_weight": "fp32", "neg_weight": "fp32"}
    specs += with_alignments(AOTSpec("hinge_finalize", hinge_finalize_kernel, sig, dict(BLOCK=HINGE_FINAL_BLOCK),
                                     4, 1), (), ("n_prog",))
    return specs


AOT_SPECS = _specs()
AOT_SPECS_TF32 = _specs(tf32=True)
