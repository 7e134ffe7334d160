"""``knn`` and ``hardest_negatives`` with ``process_group=`` (docs/spec.md §5).

Both gather the reference rows once (``gather_rows``: O(M_global · d) memory, gradient back to the owners) and
run the one-process kernel on this rank's rows × the whole gathered set, in cross mode:

* ``hardest_negatives``: each rank selects its own top-``k`` negatives (rows local, columns global; the
  diagonal of self mode is a same-label or, in pair mode, a same-index pair, so it is never a negative whatever
  mode the kernel runs in), keys them by the global flat index ``row · M + col`` and ``topk_over_ranks`` merges
  them with the one-process tie order. The result is identical on every rank; each rank's gradient share is the
  selected pairs whose row it owns, times W (the contract of §5).
* ``knn``: the queries stay local, so nothing is merged: the kernel runs on local queries × the gathered
  gallery. Self mode with ``exclude_self`` asks for ``k + 1`` and drops the query's own global column, which
  leaves exactly the one-process top-``k`` (same tie order). The values are this rank's rows of the one-process
  output, so their gradient is the ordinary one (no W factor): the local queries get this rank's gradient, the
  gallery shard the sum of every rank's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from .. import reference as _reference
from .._math import l2_normalize
from .._validation import check_bool, check_finite_rows, check_positive_int
from ..ops.selection import count_negatives, pair_similarity
from . import _comm
from ._local import OwnedSlice, prepare_shard


def _fused_ops(op: str, x: Tensor):
    return _dispatch.select(op, x) if x.shape[0] else None


def knn(x, y=None, k=10, *, normalize=True, exclude_self=True, process_group=None):
    batch, x, y, _, _ = prepare_shard(x, y, pair_mode_default=False)
    check_finite_rows(batch, "knn")
    k = check_positive_int(k, "k")
    check_bool(normalize, "normalize")
    drop_self = batch.self_mode and check_bool(exclude_self, "exclude_self")
    gallery = x if batch.self_mode else y
    xs = _comm.shard_layout(x.shape[0], x.device, process_group)
    ys = xs if batch.self_mode else _comm.shard_layout(gallery.shape[0], x.device, process_group)
    _comm.check_same_call(xs, "knn", k=k, d=x.shape[1], dtype=x.dtype, normalize=normalize,
                          self_mode=batch.self_mode, exclude_self=drop_self)
    n_candidates = ys.total - (1 if drop_self else 0)
    if k > n_candidates:
        raise ValueError(
            f"k = {k} is larger than the number of candidates per row ({n_candidates}"
            f"{' after excluding the query itself' if drop_self else ''})")
    Y = _comm.gather_rows(gallery, ys)
    if x.shape[0] == 0:  # nothing to select; stay on the graph so the gather's backward runs on this rank
        anchor = (Y[:0].sum() + x[:0].sum()) * 0
        return (anchor.float() if x.dtype != torch.float64 else anchor).expand(0, k), \
            torch.empty((0, k), dtype=torch.int64, device=x.device)
    kk = k + 1 if drop_self else k
    ops = _fused_ops("knn", x)
    if ops is None:
        values, idx = _reference.knn(x, Y, kk, normalize=normalize)
    else:
        values, idx = ops.knn_fwd(x.contiguous(), Y.contiguous(), kk, False, normalize)
    if drop_self:  # at most one entry per row is the query itself: keep the first k of the others, in order
        own = torch.arange(xs.offset, xs.offset + x.shape[0], device=x.device)[:, None]
        order = torch.sort((idx == own).to(torch.int8), dim=1, stable=True).indices[:, :k]
        values, idx = values.gather(1, order), idx.gather(1, order)
    return values, idx


def _own_pair_values(x: Tensor, Y: Tensor, rows: Tensor, cols: Tensor, normalize: bool) -> Tensor:
    """Differentiable ``x̂[rows] · Ŷ[cols]`` (fp32 for the fused dtypes, float64 for float64)."""
    if x.dtype != torch.float64:
        return pair_similarity(x, Y, rows, cols, normalize)
    xh, yh = (l2_normalize(x), l2_normalize(Y)) if normalize else (x, Y)
    return (xh[rows] * yh[cols]).sum(-1)


def hardest_negatives(x, y=None, labels=None, ref_labels=None, k=None, *, normalize=True, process_group=None):
    batch, x, y, labels, ref_labels = prepare_shard(x, y, labels, ref_labels, pair_mode_default=True)
    check_finite_rows(batch, "hardest_negatives")
    if k is not None:
        k = check_positive_int(k, "k")
    check_bool(normalize, "normalize")
    refs = x if batch.self_mode else y
    xs = _comm.shard_layout(x.shape[0], x.device, process_group)
    ys = xs if batch.self_mode else _comm.shard_layout(refs.shape[0], x.device, process_group)
    _comm.check_same_call(xs, "hardest_negatives", k=-1 if k is None else k, d=x.shape[1], dtype=x.dtype,
                          normalize=normalize, self_mode=batch.self_mode, pair_mode=batch.pair_mode)
    k = xs.total if k is None else k
    M = ys.total
    if batch.pair_mode:  # the negatives are the pairs (i, j), i != j, of global indices
        lab = torch.arange(xs.offset, xs.offset + x.shape[0], device=x.device)
        ref_lab = torch.arange(M, device=x.device)
    else:
        lab = labels
        ref_lab = _comm.all_gather_rows(labels if batch.self_mode else ref_labels, ys)
    local_neg = count_negatives(lab, ref_lab)
    n_neg = int(_comm.sum_over_ranks(torch.tensor([local_neg], dtype=torch.int64, device=x.device), xs))
    if k > n_neg:
        raise ValueError(f"k = {k} is larger than the number of negative pairs in the batch ({n_neg})")
    Y = _comm.gather_rows(refs, ys)
    k_local = min(k, local_neg)
    if k_local > 0:
        ops = _fused_ops("hardest_negatives", x)
        with torch.no_grad():
            if ops is None:
                v, r, c = _reference.hardest_negatives(x, Y, lab, ref_lab, k_local, normalize=normalize)
            else:
                v, r, c = ops.hardest_negatives_fwd(x.contiguous(), Y.contiguous(), lab, ref_lab, k_local,
                                                    False, normalize)
        keys = (r + xs.offset) * M + c
    else:
        v = torch.empty(0, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
        keys = torch.empty(0, dtype=torch.int64, device=x.device)
    values, keys = _comm.topk_over_ranks(v.detach(), keys, k, xs)
    rows, cols = keys // M, keys % M
    mine = (rows >= xs.offset) & (rows < xs.offset + x.shape[0])
    own = _own_pair_values(x, Y, rows[mine] - xs.offset, cols[mine], normalize)
    return OwnedSlice.apply(own, Y, values, mine, xs.world), rows, cols
