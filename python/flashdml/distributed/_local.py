"""Argument checks of a rank's shard, and the autograd glue shared by the selection and metric drivers.

A shard may have 0 rows, which the one-process validators reject ("x is empty"). ``prepare_shard`` runs the
same validators on a one-row stand-in of an empty shard (same dtype, d, device and label dtype), so every other
error is the one-process error, raised before any collective.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._validation import prepare_batch
from ._shard import _stand_in  # a one-row zero stand-in for an empty shard


def _stand_in_labels(lab, emb):
    if isinstance(lab, Tensor) and lab.dim() == 1 and lab.shape[0] == 0 and isinstance(emb, Tensor) \
            and emb.dim() == 2 and emb.shape[0] == 0:
        return lab.new_zeros(1)
    return lab


def prepare_shard(x, y=None, labels=None, ref_labels=None, **kw):
    """``prepare_batch`` for a shard: ``(batch, x, y, labels, ref_labels)`` where the batch was validated on
    stand-ins for empty shards and the returned tensors are the caller's own (labels as int64, ``None`` when
    not given)."""
    batch = prepare_batch(_stand_in(x), _stand_in(y), _stand_in_labels(labels, x),
                          _stand_in_labels(ref_labels, y if y is not None else x), **kw)
    lab = None if labels is None else labels.long()
    ref = None if ref_labels is None else ref_labels.long()
    return batch, x, y, lab, ref


class OwnedSlice(torch.autograd.Function):
    """Returns ``values`` (the same global tensor on every rank); backward sends ``W · grad[mine]`` to
    ``own`` (this rank's differentiable share of those entries) and a zero gradient to ``anchor`` (the
    gathered rows), so that every rank runs the gather's backward collective even when it owns nothing."""

    @staticmethod
    def forward(ctx, own: Tensor, anchor: Tensor, values: Tensor, mine: Tensor, world: int):
        ctx.save_for_backward(mine)
        ctx.world = world
        ctx.anchor_shape = anchor.shape
        ctx.anchor_meta = (anchor.dtype, anchor.device)
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mine,) = ctx.saved_tensors
        dtype, device = ctx.anchor_meta
        return (grad[mine] * ctx.world, torch.zeros(ctx.anchor_shape, dtype=dtype, device=device),
                None, None, None)
