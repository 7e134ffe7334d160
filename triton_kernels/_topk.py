"""Sortable keys and register top-k merging for the selection kernels (selection.py, metrics.py, contextual.py).

It holds the ``@triton.jit`` helpers those kernels inline and one kernel that several modules launch,
``knn_merge_kernel`` (the fixed-order merge of the column splits' top-K lists, ``MERGE_ROWS`` rows per program).
Modules whose name starts with "_" are skipped by the AOT coverage scan: the merge kernel is compiled through
selection.py's AOT_SPECS (tests/test_triton_aot.py checks that every ``*_kernel`` here is covered by some spec).

Keys (every comparison below is a plain integer comparison, so one ``tl.sort`` / ``tl.topk`` orders by value and
breaks ties by index at the same time):

* ``ordered_u32(s)``: an fp32 value as an int64 in [0, 2^32), monotone in the value (-0.0 and +0.0 map to the same
  key, as they compare equal). ``from_ordered_u32`` inverts it.
* ``pack_key(s, col)``: int64 ``(ordered_u32(s) - 2^31) << 32 | (2^32 - 1 - col)`` — larger key = larger value, and
  for equal values the lower column. ``NO_KEY`` (INT64_MIN) is below every key of a real (non-NaN) value, so masked
  out candidates are never selected while enough real ones exist. ``key_value`` / ``key_col`` unpack.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.standard import _indicator, _log2  # triton 3.8 (pinned)

NO_KEY = tl.constexpr(-(2**63))
MERGE_ROWS = 16  # rows per program of knn_merge_kernel


@triton.jit
def ordered_u32(s):
    """fp32 -> int64 in [0, 2^32), strictly monotone in the value; -0.0 and +0.0 give the same key."""
    s = tl.where(s == 0.0, 0.0, s)
    b = s.to(tl.int32, bitcast=True).to(tl.int64)  # sign-extended
    return tl.where(b < 0, -1 - b, b + 2147483648)


@triton.jit
def from_ordered_u32(key):
    """Inverse of ``ordered_u32`` (int64 in [0, 2^32) -> fp32)."""
    b = tl.where(key >= 2147483648, key - 2147483648, -1 - key)
    return b.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def pack_key(s, col):
    """int64 key of value ``s`` at column ``col`` (0 <= col < 2^32 - 1): value descending, then column ascending."""
    hi = ordered_u32(s) - 2147483648
    return (hi << 32) | (4294967295 - col.to(tl.int64))


@triton.jit
def key_value(key):
    return from_ordered_u32((key >> 32) + 2147483648)


@triton.jit
def key_col(key):
    return 4294967295 - (key & 4294967295)


# Bitonic networks on a [R, N] tensor viewed as a hypercube [2] * log2(R·N) (N, R powers of two; the last log2(N)
# axes are the row's positions). triton's tl.sort / tl.topk / tl.bitonic_merge do the same with an xor-sum
# reduction per compare-and-swap, which the interpreter evaluates element by element in Python (minutes for one
# small kNN call); a min and a max over the size-2 axis are builtin reductions there, and compile to the same
# in-thread selects / warp shuffles on the GPU.
@triton.jit
def _cas(h, flip, i: tl.constexpr, n_dims: tl.constexpr):
    """Compare-and-swap along the i-th innermost axis: the lower position gets the min (max where flip)."""
    mn = tl.min(h, n_dims - 1 - i, keep_dims=True)
    mx = tl.max(h, n_dims - 1 - i, keep_dims=True)
    return tl.where((flip ^ _indicator(n_dims, i)) != 0, mx, mn)


@triton.jit
def _merge_stages(h, stage: tl.constexpr, order: tl.constexpr, n_dims: tl.constexpr):
    """Bitonic merge of runs of 2^stage; order 0 ascending, 1 descending, 2 alternating between runs."""
    if order == 2:
        flip = _indicator(n_dims, stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _cas(h, flip, stage - 1 - i, n_dims)
    return h


@triton.jit
def row_topk(x, K: tl.constexpr, descending: tl.constexpr):
    """The K largest entries of each row of a [R, N] tensor, sorted descending (descending=1) or ascending (0)."""
    R: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    log_n: tl.constexpr = _log2(N)
    log_k: tl.constexpr = _log2(K)
    h = tl.reshape(x, [2] * _log2(R * N))
    for i in tl.static_range(1, log_k + 1):
        h = _merge_stages(h, i, 2 if i < log_n else descending, _log2(R * N))
    for i in tl.static_range(log_k + 1, log_n + 1):  # keep the larger half of each pair of sorted runs
        h = tl.max(h, _log2(h.numel) - 1 - log_k)
        h = _merge_stages(h, log_k, 2 if i < log_n else descending, _log2(h.numel))
    return tl.reshape(h, [R, K])


@triton.jit
def merge_sorted(run, other_asc):
    """Top K of two [R, K] lists, ``run`` sorted descending and ``other_asc`` ascending (K a power of two), sorted
    descending: ``max(run[j], other_asc[j])`` keeps the K largest of the union as a bitonic sequence, one bitonic
    merge sorts it."""
    R: tl.constexpr = run.shape[0]
    K: tl.constexpr = run.shape[1]
    h = tl.reshape(tl.maximum(run, other_asc), [2] * _log2(R * K))
    h = _merge_stages(h, _log2(K), 1, _log2(R * K))
    return tl.reshape(h, [R, K])


@triton.jit
def knn_merge_kernel(part_ptr, val_ptr, idx_ptr, bound_ptr, B, n_splits, k_total, col_off, n_take,
                      WRITE_BOUND: tl.constexpr, K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Merge the splits' lists of each row (fixed order); write the first n_take entries at columns col_off.. of
    values / indices [B, k_total]; WRITE_BOUND: bound[i] = the K-th key (the next round's exclusive upper bound)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    j = tl.arange(0, K)
    run = tl.full([BLOCK_R, K], NO_KEY, tl.int64)
    at = part_ptr + rows.to(tl.int64)[:, None] * K + (K - 1 - j)[None, :]  # each list read ascending
    for s in range(0, n_splits):
        run = merge_sorted(run, tl.load(at, mask=row_ok[:, None], other=NO_KEY))
        at += tl.cast(B, tl.int64) * K  # tl.cast, not .to: B = 1 arrives as a constant
    out = rows.to(tl.int64)[:, None] * k_total + col_off + j[None, :]
    ok = row_ok[:, None] & (j[None, :] < n_take)
    tl.store(val_ptr + out, key_value(run), mask=ok)
    tl.store(idx_ptr + out, key_col(run), mask=ok)
    if WRITE_BOUND:
        tl.store(bound_ptr + rows, tl.min(run, 1), mask=row_ok)
