"""What every distributed loss driver does around its own math: validate the local shard (0 rows allowed), lay out
the global batch, gather the columns with gradient and the labels, run a function over local row chunks without
keeping their graphs, and return the global value with the gradient of ``W · (this rank's share)``.

The drivers of this package follow one pattern (docs/spec.md §5). With ``L = Σ_r ℓ_r`` split by rows (rank r owns
the terms of its rows), a rank computes ``ℓ_r`` from its rows ``x_r`` against the gathered columns ``Y``; global
statistics (a partition function, counts, hinge sums) are first combined over ranks in rank order and enter
``ℓ_r`` as constants whose own dependence on the inputs is added back exactly by a surrogate term with value 0
or a known value. The returned tensor has the value ``L`` (the same bits on every rank) and the gradient of
``W · ℓ_r``; the column gradients travel back to their owners through :func:`gather_rows`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .._math import compute_dtype, l2_normalize
from .._validation import Batch, prepare_batch
from ._comm import Shards, all_gather_rows, check_process_group, check_same_call, gather_rows, shard_layout

ROW_CHUNK_ELEMS = 1 << 22  # rows per chunk × global columns: the chunk's temporary S block (16 MiB in fp32)


def _stand_in(t):
    """A one-row zero stand-in for an empty 2-D / 1-D tensor, so that today's validation (which refuses empty
    embeddings) checks everything else of an empty shard: types, dtypes, d, devices."""
    if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == 0:
        return t.new_zeros((1,) + tuple(t.shape[1:]))
    return t


def prepare_shard(x, y, labels, ref_labels, **kwargs) -> Batch:
    """:func:`prepare_batch` on a shard that may have 0 rows (same errors otherwise); the returned batch holds the
    caller's own tensors (labels as int64, ``None`` in pair mode — the driver numbers pairs globally)."""
    empty = any(isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == 0 for t in (x, y, labels, ref_labels))
    if not empty:
        batch = prepare_batch(x, y, labels, ref_labels, **kwargs)
    else:
        stand = prepare_batch(_stand_in(x), _stand_in(y), _stand_in(labels), _stand_in(ref_labels), **kwargs)
        if isinstance(labels, Tensor) and labels.shape[0] != x.shape[0]:  # a mismatch the stand-in hid
            prepare_batch(x, y, labels, ref_labels, **kwargs)
        batch = Batch(x, x if stand.self_mode else y, None if stand.pair_mode else labels,
                      None if stand.pair_mode else ref_labels, stand.self_mode, stand.pair_mode)
    if batch.pair_mode:
        batch = dataclasses.replace(batch, labels=None, ref_labels=None)
    elif batch.labels is not None:
        batch = dataclasses.replace(batch, labels=batch.labels.long(),
                                    ref_labels=batch.labels.long() if batch.self_mode else batch.ref_labels.long())
    return batch


@dataclasses.dataclass
class Global:
    """The global view of one call on one rank."""

    rows: Shards  # the layout of x
    cols: Shards  # the layout of the columns (x itself in self mode, y otherwise)
    x: Tensor  # this rank's rows, as given (autograd flows from here)
    Y: Tensor  # every rank's columns, gathered with gradient
    row_labels: Optional[Tensor]  # int64 [n_local]: global class ids (global row numbers in pair mode)
    col_labels: Optional[Tensor]  # int64 [M_global]
    self_mode: bool
    anchors: tuple = ()  # further differentiable inputs (a learnable temperature): zero gradient when unused

    @property
    def world(self) -> int:
        return self.rows.world


def setup(op: str, batch: Batch, group, **params) -> Global:
    """Exchange the layout, check that every rank made the same call, gather the columns and the labels."""
    check_process_group(group)
    x = batch.x
    # the fingerprint first: a rank that is not in this call makes the others raise here, not hang below
    check_same_call(group, op, d=x.shape[1], dtype=x.dtype, self_mode=batch.self_mode, pair_mode=batch.pair_mode,
                    **params)
    rows = shard_layout(x.shape[0], x.device, group)
    cols = rows if batch.self_mode else shard_layout(batch.y.shape[0], x.device, group)
    Y = gather_rows(x if batch.self_mode else batch.y, cols)
    dev = x.device
    if batch.pair_mode:
        row_labels = torch.arange(rows.offset, rows.offset + rows.local, device=dev)
        col_labels = torch.arange(cols.total, device=dev)
    elif batch.labels is None:  # an op without labels (batch softmax): the driver fills them in
        row_labels = col_labels = None
    else:
        row_labels = batch.labels
        col_labels = all_gather_rows(batch.ref_labels, cols)
    return Global(rows, cols, x, Y, row_labels, col_labels, batch.self_mode)


def normalized(t: Tensor, normalize: bool) -> Tensor:
    """``t`` in its compute dtype (fp32, or float64 for float64), row-normalised when ``normalize``; differentiable."""
    t = t.to(compute_dtype(t.dtype))
    return l2_normalize(t) if normalize else t


def row_chunk(n_cols: int) -> int:
    return max(1, ROW_CHUNK_ELEMS // max(1, n_cols))


def streamed_sum(fn: Callable[..., Tensor], xh: Tensor, *others: Tensor) -> Tensor:
    """``Σ_chunks fn(r0, xh[r0:r1], *others)`` over row chunks of ``xh``, each chunk recomputed in backward
    (activation checkpointing), so at most one chunk's ``[chunk, M]`` block is alive at a time."""
    n = xh.shape[0]
    step = row_chunk(max((o.shape[0] for o in others if o.dim() == 2), default=1))
    total: Optional[Tensor] = None
    for r0 in range(0, n, step):
        part = checkpoint(fn, r0, xh[r0:r0 + step], *others, use_reentrant=False)
        total = part if total is None else total + part
    return total


def self_pair_mask(g: Global, r0: int, rn: int) -> Optional[Tensor]:
    """``[rn, M]`` True at ``(i, offset + i)`` for the chunk's rows in self mode; ``None`` in cross mode."""
    if not g.self_mode:
        return None
    rows = torch.arange(g.rows.offset + r0, g.rows.offset + r0 + rn, device=g.x.device)
    return rows[:, None] == torch.arange(g.cols.total, device=g.x.device)[None, :]


class KernelShare(torch.autograd.Function):
    """Base of the fused drivers' gradient carriers. The value is 0 (the driver computes the loss value apart, from
    the statistics reduced over ranks); ``apply(*tensors, state)`` saves the tensors and keeps ``state`` (the
    global statistics the backward kernel takes) on ``ctx``. A subclass defines only ``backward``: the backward
    kernel on this rank's rows × the gathered columns, one gradient per ``apply`` argument (None for ``state``)."""

    @staticmethod
    def forward(ctx, *args):
        *tensors, state = args
        ctx.state = state
        ctx.save_for_backward(*tensors)
        return tensors[0].new_zeros((), dtype=torch.float32)


def finish(value: Tensor, share: Optional[Tensor], g: Global) -> Tensor:
    """The global ``value`` (identical on every rank) carrying the gradient of ``W · share``. ``share`` may be
    ``None`` (an empty shard, or nothing to differentiate): the result still hangs on the inputs with a zero
    gradient, so that every rank's backward runs the same collectives."""
    anchor = (g.Y.sum() * 0).to(value.dtype) + (g.x.sum() * 0).to(value.dtype)
    for t in g.anchors:
        anchor = anchor + (t * 0).to(value.dtype)
    if share is None:
        return value + (anchor - anchor.detach())
    scaled = share * g.world + anchor
    return value + (scaled - scaled.detach())
