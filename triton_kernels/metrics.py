"""Triton kernel of the metrics pass (docs/spec.md §3): the GPU twin of the C++ ``flashdml::metrics_pass``.

Raw op (same schema, ``flashdml._schemas.SCHEMAS["metrics_pass"]``, outputs and conventions as the CPU op,
csrc/cpu/metrics.cpp and csrc/ops.cpp)::

    torch.ops.flashdml_triton.metrics_pass(x, y, labels, ref_labels, rows, keep, self_mode, pair_hist, opis_bins)
    -> (offsets [R + 1], indices [sum keep] int64, values [sum keep] fp32,
        pair_hist [2, 2^16] int64, class_pos [T_rows, opis_bins] int64, class_neg [T_rows, opis_bins] int64)

x [B, d], y [M, d]: rows used as given (normalise them first); fp32 runs the exact IEEE fp32 dot (what
``flashdml.metrics`` passes: its exactness argument needs |fp32 S - S| <= (d + 16) 2^-24), fp16 / bf16 inputs run
on tensor cores with fp32 accumulation; other dtypes are cast to fp32 like the CPU op does. ``rows``: the query
rows (indices into x) in output order; ``keep[r]``: how many best references row r keeps (value descending, ties
-> lower index, (i, i) excluded in self mode). Histograms on flashdml/histogram.h's grids: fine bin
``floor(fl(s + 1) 2^15)`` clamped to [0, 2^16), coarse bin = fine bin >> shift (opis_bins = 2^16 >> shift).

One pass over S = x[rows] yᵀ in tiles (``_tiles.s_tile``), nothing R x M stored. ``_metrics_pass_kernel``: a program
owns BLOCK_M query rows and one column split; per tile it

* keeps a running sorted top-64 of packed keys per row in registers (``_topk.pack_key`` / ``row_topk`` /
  ``merge_sorted``, the kNN kernel's scheme; a tile is skipped when no key beats its row's current 64-th key);
* adds each pair to the fine histograms (self mode: only j > i; positive = same label) and, with OPIS, to its
  row's class histograms (positives j > i of the same class, negatives any j of another class) with integer
  ``tl.atomic_add`` (order-free: the counts are deterministic); class histograms live in one [T, 2, bins] buffer
  so a pair costs one atomic per grid.

Every dtype does both in the same kernel, so S is computed once for the lists and the histograms. fp16 / bf16 use
64-row tensor-core tiles (the wgmma minimum) with BLOCK_K = 32, which fits the top-64 lists, the S tile and the
histogram indices in registers without spills (at BLOCK_K = 64 the fused kernel spilled, and the histograms used to
get a pass of their own). Histogram-only calls (every keep 0) launch the same kernel with the top-k part off.

Rows keeping more than 64 run extra rounds over only those rows (histograms off), each restricted to keys below the
previous round's last key (keys are unique, so the rounds are exact and disjoint). The splits' lists are merged by
``_topk.knn_merge_kernel`` into [rows, 64] and copied into the ragged outputs. Memory
O((B + M) d + sum(keep) + R 64 splits + T_rows opis_bins).
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
from ._aot import TRITON_TYPE_NAMES, AOTSpec, with_alignments
from ._tiles import s_tile, wrap_triton
from ._topk import MERGE_ROWS, NO_KEY, knn_merge_kernel, merge_sorted, pack_key, row_topk

PAIR_BINS = 1 << 16  # fine grid (csrc/include/flashdml/histogram.h)
_PAIR_BINS = tl.constexpr(PAIR_BINS)
K = 64               # register list length (selection.KNN_KS); keep > 64 runs rounds
# Tile configurations (AOT_SPECS below is generated from them; tests/test_triton_aot.py compiles every one for
# sm_80 / sm_86 / sm_90 and rejects spills on sm_80 / sm_90): per dtype (kernels with histograms, top-k only
# kernels). Every kernel of a dtype has the same BLOCK_K and precision, so all of them see bitwise the same S
# (_tiles.s_tile). Every dtype runs top-k and histograms in one kernel (one S pass). fp32 top-k only runs 64-row
# tiles: with the kNN kernel's 32 rows ptxas (13.x) settles some variants at 80 registers with a few spilled bytes
# on sm_90. fp16 / bf16: 64-row tiles (the wgmma minimum on sm_90); with BLOCK_K = 64 the fused kernel spilled
# 16-52 bytes on sm_80 / sm_90 (the K step's operand tiles next to the top-64 lists), BLOCK_K = 32 does not.
_T16 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2)
CONFIGS = {
    torch.float16: (_T16, _T16),
    torch.bfloat16: (_T16, _T16),
    torch.float32: (dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2),
                    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2)),
}


@triton.jit
def _metrics_pass_kernel(
    x_ptr, y_ptr, rows_ptr, keep_ptr, kx_ptr, ky_ptr, rcls_ptr, bound_ptr, part_ptr, hist_ptr, cls_ptr,
    R, M, D, cols_per_split, self_mode, opis, opis_shift, opis_bins,
    TOPK: tl.constexpr, FINE: tl.constexpr, USE_BOUND: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K: tl.constexpr,
):
    """Query rows r (x row rows[r]) of this program against the columns of split pid(1).

    TOPK: part[split, r, :] = the K largest keys of row r in the split (NO_KEY where fewer; rows with keep 0 get
    none), with USE_BOUND only keys < bound[r]. FINE: hist[0 / 1, bin] += positive / negative pairs (self mode
    j > i). opis: cls[rcls[r], 0 / 1, bin >> opis_shift] += positives j > i / negatives of the row."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < R
    gi = tl.load(rows_ptr + r, mask=r_ok, other=0)
    if TOPK:
        run = tl.full([BLOCK_M, K], NO_KEY, tl.int64)
        want = tl.load(keep_ptr + r, mask=r_ok, other=0) > 0
        if USE_BOUND:
            bound = tl.load(bound_ptr + r, mask=r_ok, other=NO_KEY)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        c_ok = cols < n_hi
        s = s_tile(x_ptr, y_ptr, gi, cols, r_ok, c_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        valid = r_ok[:, None] & c_ok[None, :]
        above = cols[None, :] > gi[:, None]  # j > i
        if FINE:
            lab_i = tl.load(kx_ptr + gi, mask=r_ok, other=-1)
            lab_j = tl.load(ky_ptr + cols, mask=c_ok, other=-2)
            same = lab_i[:, None] == lab_j[None, :]
            # fine bin (flashdml::similarity_bin): floor(fl(s + 1) 2^15) clamped to [0, 2^16 - 1], NaN -> 0
            v = (s + 1.0) * 32768.0  # times a power of two: exact
            b = tl.where(v > 0.0, tl.minimum(v, 65535.0), 0.0).to(tl.int32)  # truncation = floor for v >= 0
            hit = valid & (above | (self_mode == 0))
            tl.atomic_add(hist_ptr + (tl.where(same, 0, _PAIR_BINS) + b), 1, mask=hit, sem="relaxed")
            if opis != 0:  # class histograms [T, pos | neg, bins]: positives j > i, negatives any j
                rc = tl.load(rcls_ptr + r, mask=r_ok, other=0)
                row_hist = cls_ptr + rc.to(tl.int64) * (2 * opis_bins)
                at = tl.where(same, 0, opis_bins) + (b >> opis_shift)
                tl.atomic_add(row_hist[:, None] + at, 1, mask=valid & (above | ~same), sem="relaxed")
        if TOPK:
            key = pack_key(s, cols[None, :])
            ok = valid & want[:, None] & (s == s) & ((cols[None, :] != gi[:, None]) | (self_mode == 0))
            if USE_BOUND:
                ok = ok & (key < bound[:, None])
            key = tl.where(ok, key, NO_KEY)
            kth = tl.min(run, 1)
            if tl.max(tl.max((key > kth[:, None]).to(tl.int32), 1), 0) > 0:
                run = merge_sorted(run, row_topk(key, K, 0))
    if TOPK:
        out = (pid_s.to(tl.int64) * R + r)[:, None] * K + tl.arange(0, K)[None, :]
        tl.store(part_ptr + out, run, mask=r_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------
def _check(x, y, labels, ref_labels, rows, keep, self_mode, opis_bins):
    for name, t in (("x", x), ("y", y), ("labels", labels), ("ref_labels", ref_labels), ("rows", rows),
                    ("keep", keep)):
        if not isinstance(t, Tensor):
            raise TypeError(f"metrics_pass: {name} must be a tensor")
        if t.device != x.device:
            raise ValueError(f"metrics_pass: {name} is on {t.device}, x on {x.device}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"metrics_pass: x [B, d] and y [M, d] expected, got {tuple(x.shape)}, {tuple(y.shape)}")
    if x.shape[1] < 1:
        raise ValueError("metrics_pass: d must be >= 1")
    if labels.shape != (x.shape[0],) or ref_labels.shape != (y.shape[0],):
        raise ValueError("metrics_pass: labels must be [B] and ref_labels [M]")
    if self_mode and x.shape[0] != y.shape[0]:
        raise ValueError("metrics_pass: self mode needs y = x")
    if rows.dim() != 1 or keep.shape != rows.shape:
        raise ValueError("metrics_pass: rows and keep must be 1-D with one entry per row")
    if y.shape[0] >= 2**32 - 1:
        raise ValueError(f"metrics_pass: y has {y.shape[0]} rows; at most 2^32 - 2 are supported")
    shift = 0
    if opis_bins > 0:
        if not self_mode:
            raise ValueError("metrics_pass: per-class histograms need self mode")
        while (PAIR_BINS >> shift) > opis_bins:
            shift += 1
        if (PAIR_BINS >> shift) != opis_bins:
            raise ValueError("metrics_pass: opis_bins must be a power of two <= 2^16")
    return shift


def _as_kernel_dtype(t: Tensor) -> Tensor:
    return (t if t.dtype in CONFIGS else t.float()).contiguous()


def metrics_pass_impl(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, rows: Tensor, keep: Tensor,
                      self_mode: bool, pair_hist: bool, opis_bins: int, num_splits: Optional[int] = None):
    """The metrics pass; ``num_splits`` overrides the column-split heuristic (tests use it)."""
    shift = _check(x, y, labels, ref_labels, rows, keep, self_mode, opis_bins)
    x = _as_kernel_dtype(x)
    y = x if self_mode else _as_kernel_dtype(y)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    dev = x.device
    B, M, R = x.shape[0], y.shape[0], rows.shape[0]
    rows, keep = rows.to(torch.int64).contiguous(), keep.to(torch.int64).contiguous()
    labels, ref_labels = labels.to(torch.int64).contiguous(), ref_labels.to(torch.int64).contiguous()
    C = M - 1 if self_mode else M
    opis = opis_bins > 0
    fine = bool(pair_hist) or opis
    key_x, key_y, _, _ = _tiles.label_index(labels, ref_labels, self_mode, sorted_rows=False)
    n_cls, rcls = 0, key_x  # rcls: a placeholder pointer unless opis
    lopts = dict(dtype=torch.int64, device=dev)
    offsets = torch.zeros(R + 1, **lopts)
    offsets[1:] = torch.cumsum(keep, 0)
    # every size and check the host needs, read in one synchronisation
    if R:
        safe = rows.clamp(0, B - 1) if B else rows  # (out-of-range rows are reported below)
        cls = torch.searchsorted(torch.unique(ref_labels), labels[safe]) if opis and B else rows
        facts = torch.stack([offsets[-1], keep.max(), ((rows < 0) | (rows >= B)).any().long(),
                             ((keep < 0) | (keep > C)).any().long(), (cls[1:] < cls[:-1]).any().long(),
                             cls[0], cls[-1]]).tolist()
    else:
        facts = [0] * 7
    total, max_keep, bad_row, bad_keep, unsorted, first, last = facts
    if bad_row:
        raise ValueError("metrics_pass: row index out of range")
    if bad_keep:
        raise ValueError("metrics_pass: keep must be in [0, number of candidates]")
    if opis and R:  # dense class ids in label order (the CPU op's LabelIndex)
        if unsorted:
            raise ValueError("metrics_pass: rows must be sorted by class")
        n_cls = last - first + 1
        rcls = (cls - first).to(torch.int32).contiguous()
    indices = _debug.new_output((total + 1,), dtype=torch.int64, device=dev)  # + a trash slot for the copies
    values = _debug.new_output((total + 1,), dtype=torch.float32, device=dev)
    hist = torch.zeros((2, PAIR_BINS) if fine else (0, 0), **lopts)
    cls_hist = torch.zeros((n_cls, 2, opis_bins) if opis else (0, 2, 0), **lopts)
    cpos, cneg = cls_hist[:, 0], cls_hist[:, 1]
    rounds = triton.cdiv(max_keep, K)
    if R == 0 or M == 0 or (rounds == 0 and not fine):
        return offsets, indices[:total], values[:total], hist, cpos.clone(), cneg.clone()

    xp = _tiles.pad16(x)
    yp = xp if self_mode else _tiles.pad16(y)
    dummy = offsets
    sub, sub_keep, bound = rows, keep, dummy
    j = torch.arange(K, device=dev)
    for rd in range(max(rounds, 1)):
        if rd > 0:  # only the rows that keep more than rd * K
            live = torch.nonzero(keep > rd * K).squeeze(1)
            bound = bound[torch.searchsorted(prev, live)]
            prev, sub, sub_keep = live, rows[live], keep[live]
        else:
            prev = torch.arange(R, device=dev)
        rn = sub.shape[0]
        topk = rounds > 0
        hist_now = fine and rd == 0
        # one launch: the histograms (first round only) ride along the top-k pass, S is computed once
        cfg = CONFIGS[x.dtype][0 if hist_now else 1]
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        rp = triton.cdiv(rn, bm)
        ns, per = _tiles.num_splits(dev, rp, triton.cdiv(M, bn), num_splits)
        if topk:
            part = _debug.new_output((ns, rn, K), dtype=torch.int64, device=dev)
        wrap_triton(_metrics_pass_kernel)[(rp, ns)](
            xp, yp, sub, sub_keep, key_x, key_y, rcls, bound, part if topk else dummy, hist if hist_now else dummy,
            cls_hist if opis and hist_now else dummy, rn, M, xp.shape[1], per * bn, int(self_mode), int(opis), shift,
            opis_bins, TOPK=topk, FINE=hist_now, USE_BOUND=rd > 0, BLOCK_M=bm, BLOCK_N=bn,
            # exact fp32 S even with TF32 allowed: the re-ranking's err = (d + 16)·2^-24 assumes fp32 products
            PRECISION=_tiles.precision(x.dtype, exact=True), BLOCK_K=cfg["BLOCK_K"], K=K, **_tiles.launch(cfg))
        if not topk:
            break
        vals = _debug.new_output((rn, K), dtype=torch.float32, device=dev)
        idx = _debug.new_output((rn, K), dtype=torch.int64, device=dev)
        more = rd + 1 < rounds
        new_bound = _debug.new_output((rn,), dtype=torch.int64, device=dev) if more else dummy
        wrap_triton(knn_merge_kernel)[(triton.cdiv(rn, MERGE_ROWS),)](
            part, vals, idx, new_bound, rn, ns, K, 0, K, WRITE_BOUND=more, K=K, BLOCK_R=MERGE_ROWS,
            num_warps=4, num_stages=1)
        bound = new_bound
        # ragged copy: entry j of the round goes to offsets[r] + rd K + j while rd K + j < keep[r]
        slot = torch.where(j[None, :] + rd * K < sub_keep[:, None], offsets[prev][:, None] + rd * K + j[None, :],
                           total)
        indices[slot] = idx
        values[slot] = vals
    indices, values = indices[:total], values[:total]
    if total and bool((indices >= M).any()):  # a NO_KEY slot was taken: a row ran out of (finite) candidates
        raise RuntimeError("metrics_pass: fewer candidates than keep (non-finite similarities?)")
    return offsets, indices, values, hist, cpos.clone(), cneg.clone()


@triton_op("metrics_pass", decompose=False)  # data-dependent sizes: traced through its fake
def metrics_pass(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, rows: Tensor, keep: Tensor,
                 self_mode: bool, pair_hist: bool, opis_bins: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return metrics_pass_impl(x, y, labels, ref_labels, rows, keep, self_mode, pair_hist, opis_bins)


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/test_triton_aot.py): per dtype the histogram-only pass (every keep 0), the
# top-k only first pass (no histograms asked), the bounded later rounds and the fused top-k + histogram pass,
# aligned and ragged. The merge kernel is
# _topk.knn_merge_kernel, compiled through selection.py's specs (which cover the launch made here).
# ---------------------------------------------------------------------------------------------------------------
def _specs() -> list[AOTSpec]:
    specs = []
    for dtype, (c_fine, c_topk) in CONFIGS.items():
        t = TRITON_TYPE_NAMES[str(dtype).split(".")[1]]
        sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "rows_ptr": "*i64", "keep_ptr": "*i64", "kx_ptr": "*i32",
               "ky_ptr": "*i32", "rcls_ptr": "*i32", "bound_ptr": "*i64", "part_ptr": "*i64", "hist_ptr": "*i64",
               "cls_ptr": "*i64", "R": "i32", "M": "i32", "D": "i32", "cols_per_split": "i32",
               "self_mode": "i32", "opis": "i32", "opis_shift": "i32", "opis_bins": "i32"}
        variants = [(False, True, False, "hist"), (True, False, False, "topk"), (True, False, True, "topk_bound"),
                    (True, True, False, "topk_hist")]
        for topk, fine, use_bound, tag in variants:
            c = c_fine if fine else c_topk
            specs += with_alignments(AOTSpec(
                f"metrics_pass_{tag}_{t}", _metrics_pass_kernel, sig,
                dict(TOPK=topk, FINE=fine, USE_BOUND=use_bound, PRECISION=_tiles.precision(dtype),
                     BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], K=K),
                c["num_warps"], c["num_stages"], dtype=t, gemm=True), ("D", "cols_per_split"), ("R", "M"))
    return specs


AOT_SPECS = _specs()
