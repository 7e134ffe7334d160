"""Triton kernels for fused similarity + top-k selection: kNN (docs/spec.md §1.2) and batch-wide hardest negatives (1.3).

Raw ops, the schemas of the C++ ``flashdml::knn_fwd / hardest_negatives_fwd`` (``flashdml._schemas.SCHEMAS``;
inputs contiguous, same dtype fp32 / fp16 / bf16; x [B, d], y [M, d]):

* ``torch.ops.flashdml_triton.knn_fwd(x, y, k, exclude_diagonal, normalize)
  -> (values fp32 [B, k], indices int64 [B, k])``
  per row the k largest S = x yᵀ entries, sorted descending, ties -> lower column; ``exclude_diagonal`` (self mode,
  y is x) drops column i of row i. Needs k <= M (- 1 with exclude_diagonal).
* ``torch.ops.flashdml_triton.hardest_negatives_fwd(x, y, labels, ref_labels, k, self_mode, normalize)
  -> (values fp32 [k], rows int64 [k], cols int64 [k])`` the k largest S entries over the negative pairs
  (labels[i] != ref_labels[j]; self_mode also drops (i, i)), sorted descending, ties -> lower flat index i*M + j.

``normalize=True``: S is computed on the rows L2-normalised by the op (``_tiles.normalized_inputs``, fp32 norms,
cast back to the input dtype; y is x normalised once), as the C++ ops do; ``normalize=False``: on the rows as given.

Example (on a GPU; the tests run the same calls on CPU tensors under TRITON_INTERPRET=1)::

    import torch, flashdml.triton_kernels.selection  # registers the ops
    x = torch.randn(4096, 128, device="cuda", dtype=torch.float16)
    vals, idx = torch.ops.flashdml_triton.knn_fwd(x, x, 10, True, True)
    lab = torch.randint(0, 100, (4096,), device="cuda")
    v, r, c = torch.ops.flashdml_triton.hardest_negatives_fwd(x, x, lab, lab, 4096, True, True)

kNN (nothing B×M is stored). Each S entry becomes one int64 key (_topk.pack_key: value bits high, inverted column
low), so a single integer sort orders by value and breaks ties toward the lower column. ``_knn_partial_kernel``: a
program owns BLOCK_M query rows and one column split, computes S tiles on tensor cores (``_tiles.s_tile``) and keeps
a running sorted top-K per row in registers (K = 64): a tile is folded in with a bitonic top-K of the tile and a
bitonic merge, and skipped when no key in it beats its row's current K-th key. ``_topk.knn_merge_kernel`` merges the
splits' lists in a fixed order and writes values / indices. k > 64 runs ceil(k / 64) rounds of the two kernels,
round r restricted to keys below the last key of round r - 1 (keys are unique, so the rounds are exact and
disjoint): memory O((B + M)·d + B·k), no list longer than 64 in registers.

Hardest negatives (radix select over the order-preserving uint32 keys of the negative S values, _topk.ordered_u32):
three histogram passes of ``_hneg_pass_kernel`` (bits 31..21, 20..10, 9..0; 2048 bins; per-program ``tl.histogram``
flushed with integer atomics, so deterministic) each restricted to the keys matching the prefix chosen so far, find
the exact key T of the k-th largest negative and the number r of entries equal to T that belong to the top k. A
count pass records, per (row, column split), how many negatives are > T and == T; their exclusive prefix sums in
flat order give every selected entry a fixed output slot, and the collect pass writes the entries > T and the r
entries == T with the lowest flat indices there. A final torch sort of the k results (value descending, flat index
ascending) finishes. Five passes over S, memory O((B + M)·d + k + B·splits) plus the 2048-bin histogram; no atomics
on floating point anywhere, so the result is bitwise reproducible.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .. import _debug
from .._schemas import triton_op  # the op's schema and fake kernel from the one table
from . import _tiles
from ._aot import AOTSpec, gemm_specs, spec_precisions, with_alignments
from ._tiles import s_tile, wrap_triton
from ._topk import MERGE_ROWS, NO_KEY, knn_merge_kernel, merge_sorted, ordered_u32, pack_key, row_topk

# Tile configurations (AOT_SPECS below is generated from them; tests/test_triton_aot.py compiles every one for
# sm_80 / sm_90 and rejects spills). BLOCK_N >= the largest K, so ``tl.topk`` of a tile always yields K keys.
# "TF32": the fp32 entries' overrides under the TF32 opt-in (_tiles.precision_config): 64-row tiles, as a wgmma
# tile on sm_90 has 64 rows (32 rows fall back to mma.sync), and 8 warps for the hardest-negatives passes (4
# spill with 64 rows). BLOCK_K stays 16, so the kNN rounds, the hardest-negatives passes and the contextual
# loss's passes (which use the kNN BLOCK_K) keep computing bitwise the same S as each other.
_KNN_16 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=2)
_KNN_32 = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2, TF32=dict(BLOCK_M=64))
KNN_CONFIGS = {torch.float16: _KNN_16, torch.bfloat16: _KNN_16, torch.float32: _KNN_32}
KNN_KS = (64,)  # register list length; k > 64 runs rounds of K = 64. (K = 16 / 32 spill on sm_90: ptxas -v)
_HN_16 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)  # 4 warps: collect spills
_HN_32 = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2, TF32=dict(BLOCK_M=64, num_warps=8))
HNEG_CONFIGS = {torch.float16: _HN_16, torch.bfloat16: _HN_16, torch.float32: _HN_32}
NBINS = 2048
MAX_SPLIT_COLS = 2**24  # columns per program of the hardest-negatives passes (int32 counts: BLOCK_M * 2^24 < 2^31)
HIST, COUNT, COLLECT = 0, 1, 2
# (bin_shift, match_shift) of the three histogram passes: bins = key bits [match_shift, bin_shift)
RADIX_PASSES = ((21, 32), (10, 21), (0, 10))


@triton.jit
def _knn_partial_kernel(
    x_ptr, y_ptr, bound_ptr, part_ptr, B, M, D, cols_per_split, exclude_diag,
    USE_BOUND: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, K: tl.constexpr,
):
    """part[split, i, :] = the K largest keys of row i over the columns of the split (NO_KEY where fewer),
    with USE_BOUND only keys < bound[i]."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    run = tl.full([BLOCK_M, K], NO_KEY, tl.int64)
    if USE_BOUND:
        bound = tl.load(bound_ptr + rows, mask=row_ok, other=NO_KEY)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        s = s_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        key = pack_key(s, cols[None, :])
        ok = col_ok[None, :] & ((rows[:, None] != cols[None, :]) | (exclude_diag == 0))
        if USE_BOUND:
            ok = ok & (key < bound[:, None])
        key = tl.where(ok, key, NO_KEY)
        kth = tl.min(run, 1)
        if tl.max(tl.max((key > kth[:, None]).to(tl.int32), 1), 0) > 0:
            run = merge_sorted(run, row_topk(key, K, 0))
    out = (pid_s.to(tl.int64) * B + rows)[:, None] * K + tl.arange(0, K)[None, :]
    tl.store(part_ptr + out, run, mask=row_ok[:, None])


@triton.jit
def _hneg_pass_kernel(
    x_ptr, y_ptr, kx_ptr, ky_ptr, state_ptr, hist_ptr, cnt_ptr, base_ptr, val_ptr, flat_ptr,
    B, M, D, cols_per_split, n_splits, self_mode, bin_shift, match_shift,
    PASS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NBINS: tl.constexpr,
):
    """One pass over the negatives of a block of rows and one column split (key = ordered_u32(S)).

    HIST: hist[(key >> bin_shift) % 2^(match_shift - bin_shift)] += 1 for keys with key >> match_shift == state[0].
    COUNT: cnt[0 / 1, i, split] = number of negatives of row i in the split with key > / == T = state[0].
    COLLECT: writes S and the flat index of each key > T at slot base[0, i, split] + (rank in the row's split) and
    of each key == T with rank base[1, i, split] + (rank) < r = state[2] at slot c_gt + rank (c_gt = state[1]);
    slots of keys > T at or past c_gt are not written (k = c_gt + r: nothing lands at or past k).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    lab_r = tl.load(kx_ptr + rows, mask=row_ok, other=0)
    thr = tl.load(state_ptr)
    if PASS == 0:
        bin_mask = (1 << (match_shift - bin_shift)) - 1
        hist = tl.zeros([NBINS], tl.int32)
    if PASS == 1:
        n_gt = tl.zeros([BLOCK_M], tl.int32)
        n_eq = tl.zeros([BLOCK_M], tl.int32)
    if PASS == 2:
        c_gt = tl.load(state_ptr + 1)
        r_eq = tl.load(state_ptr + 2)
        cell = rows.to(tl.int64) * n_splits + pid_s
        at_gt = tl.load(base_ptr + cell, mask=row_ok, other=0)
        at_eq = tl.load(base_ptr + tl.cast(B, tl.int64) * n_splits + cell, mask=row_ok, other=0)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        s = s_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        lab_c = tl.load(ky_ptr + cols, mask=col_ok, other=0)
        neg = row_ok[:, None] & col_ok[None, :] & (lab_r[:, None] != lab_c[None, :])
        neg = neg & ((rows[:, None] != cols[None, :]) | (self_mode == 0))
        key = ordered_u32(s)
        if PASS == 0:
            match = neg & ((key >> match_shift) == thr)
            bins = ((key >> bin_shift) & bin_mask).to(tl.int32)
            hist += tl.histogram(tl.reshape(bins, [BLOCK_M * BLOCK_N]), NBINS,
                                 mask=tl.reshape(match, [BLOCK_M * BLOCK_N]))
        if PASS == 1:
            n_gt += tl.sum((neg & (key > thr)).to(tl.int32), 1)
            n_eq += tl.sum((neg & (key == thr)).to(tl.int32), 1)
        if PASS == 2:
            gt = neg & (key > thr)
            eq = neg & (key == thr)
            # one scan for both ranks: > T counted in the low 16 bits, == T in the high bits (<= BLOCK_N each)
            both = gt.to(tl.int32) + (eq.to(tl.int32) << 16)
            before = tl.cumsum(both, 1) - both
            rank_eq = at_eq[:, None] + (before >> 16)
            slot_gt = at_gt[:, None] + (before & 65535)
            # keys > T own slots [0, c_gt), keys == T [c_gt, c_gt + r_eq) = [c_gt, k): each store is bounded by
            # its region, so if this pass's S disagreed with the COUNT / HIST passes' (separately compiled), an
            # entry would be dropped, never written past k or over the other region
            take = (gt & (slot_gt < c_gt)) | (eq & (rank_eq < r_eq))
            slot = tl.where(gt, slot_gt, c_gt + rank_eq)
            flat = rows.to(tl.int64)[:, None] * M + cols[None, :]
            tl.store(val_ptr + slot, tl.where(s == 0.0, 0.0, s), mask=take)
            tl.store(flat_ptr + slot, flat, mask=take)
            tot = tl.sum(both, 1)
            at_gt += tot & 65535
            at_eq += tot >> 16
    if PASS == 0:
        tl.atomic_add(hist_ptr + tl.arange(0, NBINS), hist.to(tl.int64), mask=hist > 0)
    if PASS == 1:
        cell = rows.to(tl.int64) * n_splits + pid_s
        tl.store(cnt_ptr + cell, n_gt, mask=row_ok)
        tl.store(cnt_ptr + tl.cast(B, tl.int64) * n_splits + cell, n_eq, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
def _check_xy(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError("x and y must be tensors")
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be 2-D [B, d] / [M, d], got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y need the same d, got {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.shape[0] < 1 or y.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"empty input: x {tuple(x.shape)}, y {tuple(y.shape)}")
    if x.dtype != y.dtype or x.dtype not in KNN_CONFIGS:
        raise TypeError(f"x and y must have the same dtype, fp32 / fp16 / bf16; got {x.dtype} and {y.dtype}")
    if not (x.is_contiguous() and y.is_contiguous()):
        raise ValueError("x and y must be contiguous")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    if y.shape[0] >= 2**32 - 1:
        raise ValueError(f"y has {y.shape[0]} rows; at most 2^32 - 2 are supported")


def knn_list_len(k: int) -> int:
    """Register list length K for k (k > K: rounds of K)."""
    return next((c for c in KNN_KS if c >= k), KNN_KS[-1])


def knn_impl(x: Tensor, y: Tensor, k: int, exclude_diagonal: bool,
             num_splits: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The kNN forward; ``num_splits`` overrides the column-split heuristic (tests use it)."""
    _check_xy(x, y)
    B, M = x.shape[0], y.shape[0]
    if exclude_diagonal and B != M:
        raise ValueError(f"exclude_diagonal needs y to be x (B == M), got B = {B}, M = {M}")
    n_cand = M - (1 if exclude_diagonal else 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > n_cand:
        raise ValueError(f"k must be an int in [1, {n_cand}] (the candidates per row), got {k!r}")
    dev = x.device
    values = _debug.new_output((B, k), dtype=torch.float32, device=dev)
    indices = _debug.new_output((B, k), dtype=torch.int64, device=dev)
    xp, yp = _tiles.pad16_pair(x, y)
    cfg, prec = _tiles.launch_config(KNN_CONFIGS[x.dtype], x.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    K = knn_list_len(k)
    rp = triton.cdiv(B, bm)
    ns, per = _tiles.num_splits(dev, rp, triton.cdiv(M, bn), num_splits)
    part = _debug.new_output((ns, B, K), dtype=torch.int64, device=dev)
    n_rounds = triton.cdiv(k, K)
    bound = _debug.new_output((B,), dtype=torch.int64, device=dev) if n_rounds > 1 else part
    for r in range(n_rounds):
        wrap_triton(_knn_partial_kernel)[(rp, ns)](
            xp, yp, bound, part, B, M, xp.shape[1], per * bn, int(exclude_diagonal),
            USE_BOUND=r > 0, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_K=cfg["BLOCK_K"], K=K, **_tiles.launch(cfg))
        wrap_triton(knn_merge_kernel)[(triton.cdiv(B, MERGE_ROWS),)](
            part, values, indices, bound, B, ns, k, r * K, min(K, k - r * K),
            WRITE_BOUND=r + 1 < n_rounds, K=K, BLOCK_R=MERGE_ROWS, num_warps=4, num_stages=1)
    return values, indices


def _check_labels(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, self_mode: bool) -> None:
    for name, t, n in (("labels", labels, x.shape[0]), ("ref_labels", ref_labels, y.shape[0])):
        if not isinstance(t, Tensor) or t.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 tensor")
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on {x.device}, got {t.device}")
    if self_mode and x.shape[0] != y.shape[0]:
        raise ValueError(f"self_mode needs y to be x (B == M), got B = {x.shape[0]}, M = {y.shape[0]}")


def _select_bin(hist: Tensor, need: Tensor) -> tuple[Tensor, Tensor]:
    """The bin b holding the need-th largest counted key (counting from the top bin) and how many keys of bin b
    are still needed. On the device, no synchronisation."""
    at_least = hist.flip(0).cumsum(0).flip(0)  # keys in bins >= b
    b = (at_least >= need).sum() - 1
    above = torch.where(b + 1 < hist.numel(), at_least[(b + 1).clamp(max=hist.numel() - 1)], 0)
    return b, need - above


def hardest_negatives_impl(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, k: int, self_mode: bool,
                           num_splits: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The hardest-negatives forward; ``num_splits`` overrides the column-split heuristic (tests use it)."""
    _check_xy(x, y)
    _check_labels(x, y, labels, ref_labels, self_mode)
    B, M = x.shape[0], y.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > B * M:
        raise ValueError(f"k must be an int in [1, {B * M}], got {k!r}")
    dev = x.device
    key_x, key_y, npos, _ = _tiles.label_index(labels, ref_labels, self_mode, sorted_rows=False)
    if not torch.compiler.is_compiling() and not is_fake(npos):  # a host sync (eager only); the glue checks too
        n_neg = B * M - int(npos) - (B if self_mode else 0)
        if k > n_neg:
            raise ValueError(f"k = {k} is larger than the number of negative pairs ({n_neg})")
    xp, yp = _tiles.pad16_pair(x, y)
    cfg, prec = _tiles.launch_config(HNEG_CONFIGS[x.dtype], x.dtype)  # one precision and config for all passes
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    rp = triton.cdiv(B, bm)
    if num_splits is None and M > MAX_SPLIT_COLS:  # per-program int32 histogram counts stay below 2^31
        num_splits = triton.cdiv(M, MAX_SPLIT_COLS)
    ns, per = _tiles.num_splits(dev, rp, triton.cdiv(M, bn), num_splits)
    hist = torch.zeros((NBINS,), dtype=torch.int64, device=dev)
    state = torch.zeros((3,), dtype=torch.int64, device=dev)
    cnt = _debug.new_output((2, B, ns), dtype=torch.int32, device=dev)
    base = torch.zeros((2, B, ns), dtype=torch.int64, device=dev)
    values = _debug.new_output((k,), dtype=torch.float32, device=dev)
    flat = _debug.new_output((k,), dtype=torch.int64, device=dev)

    def run(pass_id, bin_shift=0, match_shift=0):
        wrap_triton(_hneg_pass_kernel)[(rp, ns)](
            xp, yp, key_x, key_y, state, hist, cnt, base, values, flat, B, M, xp.shape[1], per * bn, ns,
            int(self_mode), bin_shift, match_shift, PASS=pass_id, PRECISION=prec,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], NBINS=NBINS, **_tiles.launch(cfg))

    # 1. radix select: prefix of the k-th largest key, 11 + 11 + 10 bits.
    need = torch.full((), k, dtype=torch.int64, device=dev)
    prefix = torch.zeros((), dtype=torch.int64, device=dev)
    for bin_shift, match_shift in RADIX_PASSES:
        hist.zero_()
        state[0] = prefix
        run(HIST, bin_shift, match_shift)
        b, need = _select_bin(hist, need)
        prefix = prefix * (1 << (match_shift - bin_shift)) + b
    # 2. counts per (row, split) of keys > T and == T; exclusive prefix sums in flat order give the slots.
    state[0] = prefix
    state[1] = k - need
    state[2] = need
    run(COUNT)
    c64 = cnt.to(torch.int64)
    base.copy_(c64.reshape(2, -1).cumsum(1).reshape(2, B, ns) - c64)
    run(COLLECT)
    # 3. order: value descending, then flat index ascending.
    order = torch.argsort(flat)
    flat = flat[order]
    values, order = torch.sort(values[order], descending=True, stable=True)
    flat = flat[order]
    rows = torch.div(flat, M, rounding_mode="floor")
    return values, rows, flat - rows * M


@triton_op("knn_fwd")
def knn_fwd(x: Tensor, y: Tensor, k: int, exclude_diagonal: bool, normalize: bool) -> tuple[Tensor, Tensor]:
    if normalize:
        x, y = _tiles.normalized_inputs(x, y)
    return knn_impl(x, y, k, exclude_diagonal)


@triton_op("hardest_negatives_fwd")
def hardest_negatives_fwd(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, k: int, self_mode: bool,
                          normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    if normalize:
        x, y = _tiles.normalized_inputs(x, y)
    return hardest_negatives_impl(x, y, labels, ref_labels, k, self_mode)


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: every constexpr / dtype combination the launchers produce, with the 16-divisibility
# hints of an aligned batch (B, M multiples of 16) and of a ragged one (d is always padded to a multiple of 16).
# ---------------------------------------------------------------------------------------------------------------
def _specs(tf32: bool = False) -> list[AOTSpec]:
    """The specs of the default launches; ``tf32=True``: the fp32 ones under the TF32 opt-in (AOT_SPECS_TF32)."""
    specs = []
    for dtype, t, prec in spec_precisions(tf32):
        c = _tiles.precision_config(KNN_CONFIGS[dtype], dtype, prec)
        sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "bound_ptr": "*i64", "part_ptr": "*i64", "B": "i32",
               "M": "i32", "D": "i32", "cols_per_split": "i32", "exclude_diag": "i32"}
        for K in KNN_KS:
            for use_bound in ((False, True) if K == KNN_KS[-1] else (False,)):
                name = f"selection_knn_partial_{t}_k{K}{'_bound' if use_bound else ''}"
                specs += gemm_specs(name, _knn_partial_kernel, sig, c, t,
                                    dict(USE_BOUND=use_bound, PRECISION=prec, K=K))
        c = _tiles.precision_config(HNEG_CONFIGS[dtype], dtype, prec)
        sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "kx_ptr": "*i32", "ky_ptr": "*i32", "state_ptr": "*i64",
               "hist_ptr": "*i64", "cnt_ptr": "*i32", "base_ptr": "*i64", "val_ptr": "*fp32", "flat_ptr": "*i64",
               "B": "i32", "M": "i32", "D": "i32", "cols_per_split": "i32", "n_splits": "i32", "self_mode": "i32",
               "bin_shift": "i32", "match_shift": "i32"}
        for pass_id, tag in ((HIST, "hist"), (COUNT, "count"), (COLLECT, "collect")):
            specs += gemm_specs(f"selection_hneg_{tag}_{t}", _hneg_pass_kernel, sig, c, t,
                                dict(PASS=pass_id, PRECISION=prec, NBINS=NBINS))
    sig = {"part_ptr": "*i64", "val_ptr": "*fp32", "idx_ptr": "*i64", "bound_ptr": "*i64", "B": "i32",
           "n_splits": "i32", "k_total": "i32", "col_off": "i32", "n_take": "i32"}
    for K in KNN_KS:
        for wb in ((False, True) if K == KNN_KS[-1] else (False,)):
            specs += with_alignments(AOTSpec(
                f"selection_knn_merge_k{K}{'_bound' if wb else ''}", knn_merge_kernel, sig,
                dict(WRITE_BOUND=wb, K=K, BLOCK_R=MERGE_ROWS), 4, 1), (), ("B",))
    return specs


AOT_SPECS = _specs()
AOT_SPECS_TF32 = _specs(tf32=True)
