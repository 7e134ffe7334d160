"""Triton kernels for the triplet margin loss over every triplet of the batch (docs/spec.md §6.4).

Raw ops, the schema of the C++ ``flashdml::triplet_fwd / _bwd`` (``flashdml._schemas.SCHEMAS``; x [B, d] and
y [M, d] raw rows of one dtype, contiguous; labels / ref_labels int64; in self mode the glue passes y = x):

* ``torch.ops.flashdml_triton.triplet_fwd(x, y, labels, ref_labels, margin, self_mode)
  -> (loss [] fp32, sums [1] fp32, counts [1] int64)``
* ``torch.ops.flashdml_triton.triplet_bwd(grad_loss, x, y, labels, ref_labels, margin, self_mode, counts)
  -> (dx, dy)``

The ops normalise the rows themselves (``_tiles.normalized_inputs``, rounded back to the input dtype) and the
backward returns the gradients with respect to the raw rows (``_tiles.raw_row_grads``; in self mode the two slots
are mapped separately and autograd adds them). Distances as in the CPU kernel (csrc/cpu/triplet_rows.h):
anchor–positive ``d_ap`` from the row differences (float64 sum, rounded to fp32: exact 0 for equal rows), every
other distance from the S tile, ``d_an = sqrt(max(|x̂_a|² + |ŷ_n|² − 2 s, 0))`` with the squared norms summed in
float64 and rounded to fp32. A triplet (a, p, n) is active when ``labels[a] != ref_labels[n]`` and
``h = (d_ap − d_an) + margin > 0`` in fp32 (margin rounded to fp32); sums = Σ h, counts = #active (exact int64),
loss = sums / counts (0 without an active triplet).

Launcher glue (O(B·P_max·d), P_max = the largest number of same-label references of an anchor, read on the host —
a device-to-host synchronisation, so unlike the other Triton ops these two cannot be traced on fake tensors):
every anchor's positive columns as a padded [B, P_max] table (``pcol``, −1 for padding and, in self mode, for
the anchor itself) and their distances ``dap`` (−inf where padded, so no padded entry is ever active).

Forward: ``_triplet_stats_kernel`` streams S tiles (row block × column split); per tile row and positive k the
fp32 sum of the active hinges is added to an fp64 row sum, the counts in int64; each program writes one partial,
reduced in a fixed order by torch. Backward, with H the tile of dL/dd / d (times 1 / s, s = grad / count):
on negatives ``H_an = #{p : active} / d_an`` (0 where d_an = 0, torch's cdist subgradient), on positive pairs
``H_ap = −#{n : active} / d_ap``; then ``dx̂ = s (H ŷ − rowsum(H) x̂)`` and ``dŷ = s (Hᵀ x̂ − colsum(H) ŷ)``.
``_triplet_grad_kernel`` (DY=False) owns x rows: it accumulates the negative part of H·ŷ and of the row sums and
writes the per-positive counts #{n : active} (per column split); the glue adds the positive pairs' terms to dx̂
(one gather per k). The DY=True variant owns y rows and, with those counts complete, uses the full H (negatives
and positive pairs), so no scatter is needed; it adds 1/d_an once per active positive instead of forming
#{p : active}/d_an (fewer live tiles, within a few fp32 roundings of it). Weights stay fp32: 1/d has no bound that a 16-bit cast could use,
so 16-bit rows are upcast and multiplied by ``_tiles.split_tf32_dot`` (exact for them, weights kept to ~2^-21).
A program (row block × column split) computes each of its S tiles once and walks all of d for it (in BLOCK_D
chunks, ``_tiles.accumulate_chunks``, when d does not fit one).
Forward and backward compute S with the same BLOCK_K and orientation (x_blk · y_blkᵀ), so on the GPU the backward
sees the forward's fp32 distances and counts exactly its triplets. Deterministic: no atomics, fixed-order sums.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _debug
from .._schemas import triton_op
from . import _tiles
from ._aot import gemm_specs, spec_precisions
from ._tiles import accumulate_chunks, chunk_dot, distance_tile, row_chunk, s_tile, wrap_triton
from .batch_softmax import finalize_grad
from .xent import LSE_CONFIGS

# Tile configurations. The forward uses the XE LSE-pass tiles, with 64 columns instead of 128 for 16-bit rows (the
# hinge loop's distance and mask tiles next to S spill on sm_80 at 128 x 128); the backward keeps the same BLOCK_K
# per dtype (so both compute each similarity identically) with smaller tiles than XE, as its weights and the rows
# they multiply are fp32 tiles (the 16-bit rows are upcast for the split-TF32 product).
_FWD_16 = dict(LSE_CONFIGS[torch.float16], BLOCK_N=64)
# TF32 (_tiles.precision_config): the fp32 stats pass at 4 warps (8: 8 B of stack on sm_90) and a dy pass with 64
# other rows (its S tile is [other, own]; 16 rows fall back to mma.sync on sm_90). BLOCK_K is unchanged.
FWD_CONFIGS = {torch.float16: _FWD_16, torch.bfloat16: _FWD_16,
               torch.float32: dict(LSE_CONFIGS[torch.float32], TF32=dict(num_warps=4))}
# BWD_CONFIGS[dtype][dy]. The 16-bit dy pass needs 64 other rows (its S tile is [other, own] and a wgmma tile has
# >= 64 rows), so it takes a narrower BLOCK_D to stay clear of spills on sm_80.
# CHUNK_D: the chunk width when d spans several chunks (_tiles.chunk_config; dx at 32 spilled 40-48 B on sm_80).
_DX_16 = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, BLOCK_D=64, CHUNK_D=16, num_warps=8, num_stages=2)
_DY_16 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_D=32, num_warps=8, num_stages=2)
_DX_32 = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, BLOCK_D=64, CHUNK_D=16, num_warps=8, num_stages=2)
_DY_32 = dict(_DX_32, BLOCK_D=32, CHUNK_D=16, TF32=dict(BLOCK_N=64))  # (BLOCK_D = 64 spills 8 bytes on sm_80)
BWD_CONFIGS = {torch.float16: (_DX_16, _DY_16), torch.bfloat16: (_DX_16, _DY_16), torch.float32: (_DX_32, _DY_32)}
assert all(_tiles.precision_config(FWD_CONFIGS[t], t, p)["BLOCK_K"] == _tiles.precision_config(c, t, p)["BLOCK_K"]
           for t in FWD_CONFIGS for c in BWD_CONFIGS[t] for p in ("ieee", "tf32")), \
    "forward and backward must compute S with the same BLOCK_K"


@triton.jit
def _triplet_stats_kernel(
    x_ptr, y_ptr, key_ptr, rkey_ptr, xsq_ptr, ysq_ptr, dap_ptr, psum_ptr, pcnt_ptr, margin,
    B, M, D, P, cols_per_split,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (row block, split): psum[prog] = Σ active hinges (fp64), pcnt[prog] = their count (int64);
    prog = split · row_blocks + row block."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    mg = tl.full([], margin, tl.float32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    key_r = tl.load(key_ptr + rows, mask=row_ok, other=-1)
    sq_r = tl.load(xsq_ptr + rows, mask=row_ok, other=0.0)
    dap_rows = dap_ptr + rows.to(tl.int64) * P
    acc = tl.zeros([BLOCK_M], tl.float64)
    cnt = tl.zeros([BLOCK_M], tl.int64)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        s = s_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        key_c = tl.load(rkey_ptr + cols, mask=col_ok, other=-2)
        sq_c = tl.load(ysq_ptr + cols, mask=col_ok, other=0.0)
        dist = distance_tile(s, sq_r, sq_c)
        neg = (key_r[:, None] != key_c[None, :]) & row_ok[:, None] & col_ok[None, :]
        for k in range(0, P):
            dap = tl.load(dap_rows + k, mask=row_ok, other=float("-inf"))
            h = (dap[:, None] - dist) + mg
            act = neg & (h > 0.0)
            acc += tl.sum(tl.where(act, h, 0.0), 1).to(tl.float64)
            cnt += tl.sum(act.to(tl.int32), 1).to(tl.int64)
    prog = pid_s * tl.num_programs(0) + pid_m
    tl.store(psum_ptr + prog, tl.sum(acc, 0))
    tl.store(pcnt_ptr + prog, tl.sum(cnt, 0))


@triton.jit
def _triplet_grad_kernel(
    x_ptr, y_ptr, key_ptr, rkey_ptr, xsq_ptr, ysq_ptr, dap_ptr, pcol_ptr, pact_ptr, part_ptr, margin,
    B, M, D, P, cols_per_split,
    DY: tl.constexpr, ONE_CHUNK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx (DY=False, programs own x rows i): part[split, i, c] = Σ_n H_in (y[n, c] − x[i, c]) over the negatives
    n of the split, and pact[split, i, k] = #{n in split : (i, k, n) active}. dy (DY=True, programs own y rows j):
    part[split, j, c] = Σ_a H_aj (x[a, c] − y[j, c]) over the x rows a of the split, H with the positive pairs'
    −pact/d_ap (pact: the complete counts [B, P]). The S tile is x_blk · y_blkᵀ in both variants, computed once:
    ONE_CHUNK (D <= BLOCK_D) keeps H·rows in registers, otherwise every tile's product is added to the partial rows
    chunk by chunk (``_tiles.accumulate_chunks``) and the −rowsum(H)·own-row term applied in a last pass."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    mg = tl.full([], margin, tl.float32)
    if DY:
        n_own = M
        n_other = B
        b_ptr = x_ptr
        own_ptr = y_ptr
    else:
        n_own = B
        n_other = M
        b_ptr = y_ptr
        own_ptr = x_ptr
    own = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    own_ok = own < n_own
    out_rows = pid_s.to(tl.int64) * n_own + own
    if DY:
        key_j = tl.load(rkey_ptr + own, mask=own_ok, other=-2)
        sq_j = tl.load(ysq_ptr + own, mask=own_ok, other=0.0)
    else:
        key_i = tl.load(key_ptr + own, mask=own_ok, other=-1)
        sq_i = tl.load(xsq_ptr + own, mask=own_ok, other=0.0)
        dap_own = dap_ptr + own.to(tl.int64) * P
        pact_own = pact_ptr + (pid_s.to(tl.int64) * n_own + own) * P
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hsum = tl.zeros([BLOCK_M], tl.float32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, n_other)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        oth = start_n + tl.arange(0, BLOCK_N)
        oth_ok = oth < n_hi
        if DY:
            # tile [other x rows a, own y rows j]
            s = s_tile(x_ptr, y_ptr, oth, own, oth_ok, own_ok, D, PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
            key_a = tl.load(key_ptr + oth, mask=oth_ok, other=-1)
            sq_a = tl.load(xsq_ptr + oth, mask=oth_ok, other=0.0)
            dist = distance_tile(s, sq_a, sq_j)
            # +inf off the negatives: no hinge is active there (fewer live tiles in the k loop than a mask)
            dist = tl.where((key_a[:, None] != key_j[None, :]) & oth_ok[:, None] & own_ok[None, :], dist,
                            float("inf"))
            h = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            base = oth.to(tl.int64) * P
            for k in range(0, P):
                dap = tl.load(dap_ptr + base + k, mask=oth_ok, other=float("-inf"))
                act = (((dap[:, None] - dist) + mg) > 0.0) & (dist > 0.0)
                h += tl.where(act, 1.0 / tl.where(act, dist, 1.0), 0.0)
                pc = tl.load(pcol_ptr + base + k, mask=oth_ok, other=-1)
                pa = tl.load(pact_ptr + base + k, mask=oth_ok, other=0.0)
                wk = tl.where((pa > 0.0) & (dap > 0.0), pa / tl.where(dap > 0.0, dap, 1.0), 0.0)
                h -= tl.where(pc[:, None] == own[None, :], wk[:, None], 0.0)
            hsum += tl.sum(h, 0)
            h = tl.trans(h)
        else:
            s = s_tile(x_ptr, y_ptr, own, oth, own_ok, oth_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            key_n = tl.load(rkey_ptr + oth, mask=oth_ok, other=-2)
            sq_n = tl.load(ysq_ptr + oth, mask=oth_ok, other=0.0)
            dist = distance_tile(s, sq_i, sq_n)
            neg = (key_i[:, None] != key_n[None, :]) & own_ok[:, None] & oth_ok[None, :]
            nact = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k in range(0, P):
                dap = tl.load(dap_own + k, mask=own_ok, other=float("-inf"))
                act = neg & (((dap[:, None] - dist) + mg) > 0.0)
                nact += act.to(tl.float32)
                pmask = own_ok
                # the count of this (row, k) may have been stored by another thread of the program (a row
                # vector is replicated across threads): a block barrier makes that store visible first
                tl.debug_barrier()
                prev = tl.load(pact_own + k, mask=pmask, other=0.0)
                tl.store(pact_own + k, prev + tl.sum(act.to(tl.float32), 1), mask=pmask)
            h = tl.where((nact > 0.0) & (dist > 0.0), nact / tl.where(dist > 0.0, dist, 1.0), 0.0)
            hsum += tl.sum(h, 1)
        if ONE_CHUNK:
            b_at, b_mask = row_chunk(b_ptr, oth.to(tl.int64), oth_ok, 0, D, BLOCK_D)
            acc = chunk_dot(h, tl.load(b_at, mask=b_mask, other=0.0), acc, 2, PRECISION)
        else:
            accumulate_chunks(h, b_ptr, oth.to(tl.int64), oth_ok, part_ptr, out_rows, own_ok, D, start_n > n_lo,
                              2, PRECISION, BLOCK_D)
    if ONE_CHUNK:
        mine_at, mine_mask = row_chunk(own_ptr, own.to(tl.int64), own_ok, 0, D, BLOCK_D)
        acc -= hsum[:, None] * tl.load(mine_at, mask=mine_mask, other=0.0).to(tl.float32)
        at, mask = row_chunk(part_ptr, out_rows, own_ok, 0, D, BLOCK_D)
        tl.store(at, acc, mask=mask)
    else:  # every program has at least one tile, so its partial rows are written (and ordered by the barrier)
        for c0 in range(0, D, BLOCK_D):
            mine_at, mine_mask = row_chunk(own_ptr, own.to(tl.int64), own_ok, c0, D, BLOCK_D)
            at, mask = row_chunk(part_ptr, out_rows, own_ok, c0, D, BLOCK_D)
            rows = tl.load(at, mask=mask, other=0.0)
            tl.store(at, rows - hsum[:, None] * tl.load(mine_at, mask=mine_mask, other=0.0).to(tl.float32),
                     mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
class _Setup:
    """What both passes need: normalised padded rows, fp32 squared norms, int32 label keys and the [B, P] tables
    of every anchor's positive columns (``pcol``, −1 where padded) and distances (``dap``, −inf where padded)."""

    def __init__(self, x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, self_mode: bool):
        xh, yh = _tiles.normalized_inputs(x, y)
        self.xsq = xh.double().square().sum(1).float()
        self.ysq = self.xsq if yh is xh else yh.double().square().sum(1).float()
        self.key_x, self.key_y, _, _ = _tiles.label_index(labels, ref_labels, False, sorted_rows=False)
        py = torch.argsort(ref_labels, stable=True)
        sorted_ref = ref_labels[py]
        lo = torch.searchsorted(sorted_ref, labels, side="left")
        hi = torch.searchsorted(sorted_ref, labels, side="right")
        # P: the widest row of the table (one host read; at least 1 so that every launch has the same shape)
        self.P = max(int((hi - lo).max()), 1)
        B, M = xh.shape[0], yh.shape[0]
        k = torch.arange(self.P, device=x.device)
        j = lo[:, None] + k[None, :]
        col = py[j.clamp_max(M - 1)]
        valid = j < hi[:, None]
        if self_mode:
            valid &= col != torch.arange(B, device=x.device)[:, None]
        self.pcol = torch.where(valid, col, -1).to(torch.int32).contiguous()
        # d_ap from the differences in float64 (one [B, d] gather per positive rank), rounded to fp32
        dap = torch.empty((B, self.P), dtype=torch.float32, device=x.device)
        xd = xh.double()
        for r in range(self.P):
            diff = xd - yh[col[:, r]].double()
            dap[:, r] = diff.square().sum(1).sqrt().float()
        self.dap = torch.where(valid, dap, float("-inf")).contiguous()
        self.xh, self.yh = xh, yh
        self.xp, self.yp = _tiles.pad16_pair(xh, yh)


def _check(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, self_mode: bool) -> None:
    _tiles.check_pair_inputs(x, y, labels, ref_labels, FWD_CONFIGS)
    torch._check(not self_mode or x.shape[0] == y.shape[0], lambda: "self_mode needs B == M (y is x)")


def fwd_impl(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, margin: float, self_mode: bool,
             num_splits: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The forward on raw rows; ``num_splits`` overrides the column-split heuristic (tests use it)."""
    _check(x, y, labels, ref_labels, self_mode)
    st = _Setup(x, y, labels, ref_labels, self_mode)
    B, M = x.shape[0], y.shape[0]
    dev = x.device
    cfg, prec = _tiles.launch_config(FWD_CONFIGS[x.dtype], x.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    rp = triton.cdiv(B, bm)
    ns, per = _tiles.num_splits(dev, rp, triton.cdiv(M, bn), num_splits)
    psum = _debug.new_output((ns * rp,), dtype=torch.float64, device=dev)
    pcnt = _debug.new_output((ns * rp,), dtype=torch.int64, device=dev)
    wrap_triton(_triplet_stats_kernel)[(rp, ns)](
        st.xp, st.yp, st.key_x, st.key_y, st.xsq, st.ysq, st.dap, psum, pcnt, float(margin),
        B, M, st.xp.shape[1], st.P, per * bn,
        PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], **_tiles.launch(cfg))
    total, count = psum.sum(), pcnt.sum()  # fixed-order reductions of the per-program partials
    loss = torch.where(count > 0, total / count.clamp_min(1).to(torch.float64), 0.0).to(torch.float32)
    return loss, total.to(torch.float32).reshape(1), count.reshape(1)


def _grad_pass(st: _Setup, pact: Tensor, part: Tensor, margin: float, dy: bool, ns: int, per: int) -> None:
    B, M, D = st.xp.shape[0], st.yp.shape[0], st.xp.shape[1]
    base, prec = _tiles.launch_config(BWD_CONFIGS[st.xp.dtype][dy], st.xp.dtype)
    cfg, one = _tiles.grad_config(base, D)
    bm, bn, bd = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    rp = triton.cdiv(M if dy else B, bm)
    wrap_triton(_triplet_grad_kernel)[(rp, ns)](
        st.xp, st.yp, st.key_x, st.key_y, st.xsq, st.ysq, st.dap, st.pcol, pact, part, float(margin),
        B, M, D, st.P, per * bn, DY=dy, ONE_CHUNK=one, PRECISION=prec,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], BLOCK_D=bd, **_tiles.launch(cfg))


def _splits(st: _Setup, dy: bool, num_splits: Optional[int]) -> tuple[int, int]:
    """(column splits, column blocks per split) of a gradient pass."""
    B, M = st.xp.shape[0], st.yp.shape[0]
    n_own, n_other = (M, B) if dy else (B, M)
    cfg = _tiles.launch_config(BWD_CONFIGS[st.xp.dtype][dy], st.xp.dtype)[0]  # the tiles _grad_pass launches
    rp = triton.cdiv(n_own, cfg["BLOCK_M"])
    return _tiles.num_splits(st.xp.device, rp, triton.cdiv(n_other, cfg["BLOCK_N"]), num_splits)


def bwd_impl(grad_loss: Tensor, x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, margin: float,
             self_mode: bool, counts: Tensor, num_splits: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The backward with respect to the normalised rows x̂, ŷ (in the input dtype); ``num_splits`` overrides the
    column-split heuristic (tests use it)."""
    _check(x, y, labels, ref_labels, self_mode)
    torch._check(counts.shape == (1,) and counts.dtype == torch.int64, lambda: "counts: int64 [1]")
    st = _Setup(x, y, labels, ref_labels, self_mode)
    dev = x.device
    B, M, D = st.xp.shape[0], st.yp.shape[0], st.xp.shape[1]
    dx = _debug.new_output(x.shape, dtype=x.dtype, device=dev)
    dy = _debug.new_output(y.shape, dtype=y.dtype, device=dev)
    # s = grad / count (0 without a triplet; a non-finite grad stays non-finite, so every entry becomes NaN)
    s = grad_loss.to(torch.float32).reshape(()) * torch.where(
        counts[0] > 0, 1.0 / counts[0].clamp_min(1).to(torch.float64), 0.0).to(torch.float32)
    one = torch.ones((), dtype=torch.float32, device=dev)
    # dx pass: H's negative part per split, plus one slice for the positive pairs' terms (filled below)
    ns, per = _splits(st, False, num_splits)
    part = _debug.new_output((ns + 1, B, D), dtype=torch.float32, device=dev)
    pact_parts = torch.zeros((ns, B, st.P), dtype=torch.float32, device=dev)
    _grad_pass(st, pact_parts, part, margin, False, ns, per)
    pact = pact_parts.sum(0).contiguous()  # #{n : active} per (anchor, positive), exact in fp32 below 2^24
    w = torch.where((pact > 0) & (st.dap > 0), pact / torch.where(st.dap > 0, st.dap, 1.0), 0.0)
    pos = w.sum(1, keepdim=True) * st.xp.float()
    for r in range(st.P):
        pos -= w[:, r:r + 1] * st.yp[st.pcol[:, r].long().clamp_min(0)].float()
    part[ns].copy_(pos)
    finalize_grad(part, dx, s, one, part, None)
    nsy, per = _splits(st, True, num_splits)
    part_y = _debug.new_output((nsy, M, D), dtype=torch.float32, device=dev)
    _grad_pass(st, pact, part_y, margin, True, nsy, per)
    finalize_grad(part_y, dy, s, one, part_y, None)
    return dx, dy


@triton_op("triplet_fwd")
def triplet_fwd(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, margin: float,
                self_mode: bool) -> tuple[Tensor, Tensor, Tensor]:
    return fwd_impl(x, y, labels, ref_labels, margin, self_mode)


@triton_op("triplet_bwd")
def triplet_bwd(grad_loss: Tensor, x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, margin: float,
                self_mode: bool, counts: Tensor) -> tuple[Tensor, Tensor]:
    dx, dy = bwd_impl(grad_loss, x, y, labels, ref_labels, margin, self_mode, counts)
    return _tiles.raw_row_grads(dx, dy, x, y)


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (aligned and ragged batch; d is padded, split widths are multiples of BLOCK_N). The
# gradient finalize is batch_softmax._grad_finalize_kernel, compiled by that module.
# ---------------------------------------------------------------------------------------------------------------
def _specs(tf32: bool = False) -> list:
    """The specs of the default launches; ``tf32=True``: the fp32 ones under the TF32 opt-in (AOT_SPECS_TF32)."""
    specs = []
    for dtype, t, prec in spec_precisions(tf32):
        common = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "key_ptr": "*i32", "rkey_ptr": "*i32", "xsq_ptr": "*fp32",
                  "ysq_ptr": "*fp32", "dap_ptr": "*fp32"}
        tail = {"margin": "fp32", "B": "i32", "M": "i32", "D": "i32", "P": "i32", "cols_per_split": "i32"}
        sig = dict(common, psum_ptr="*fp64", pcnt_ptr="*i64", **tail)
        specs += gemm_specs(f"triplet_stats_{t}", _triplet_stats_kernel, sig,
                            _tiles.precision_config(FWD_CONFIGS[dtype], dtype, prec), t,
                            dict(PRECISION=prec), batch=("B", "M", "P"))
        sig = dict(common, pcol_ptr="*i32", pact_ptr="*fp32", part_ptr="*fp32", **tail)
        for dy in (False, True):
            c = _tiles.precision_config(BWD_CONFIGS[dtype][dy], dtype, prec)
            for suffix, one, gc in _tiles.grad_variants(c):  # chunked / one / narrowed
                specs += gemm_specs(f"triplet_grad_{t}_{'dy' if dy else 'dx'}{suffix}", _triplet_grad_kernel, sig,
                                    gc, t, dict(DY=dy, ONE_CHUNK=one, PRECISION=prec), batch=("B", "M", "P"))
    return specs


AOT_SPECS = _specs()
AOT_SPECS_TF32 = _specs(tf32=True)
