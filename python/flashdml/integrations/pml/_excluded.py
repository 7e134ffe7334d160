"""NT-Xent / Cross-Example Softmax over "all pairs except at most one positive per query row", fused.

pml's ``CrossBatchMemory`` and ``DistributedLossWrapper(efficient=True)`` call the loss with every pair between
the batch and a reference set (the memory bank, the gathered batch) except each query's comparison with its own
copy among the references: the tuple ``lmu.remove_self_comparisons(lmu.get_all_pairs_indices(labels, ref_labels),
...)``. That is cross mode (docs/spec.md §0) minus one positive pair ``(i, excl[i])`` per row. The fused kernel
runs plain cross mode; this module removes the excluded pairs exactly:

* value: ``L = (|P_full|·L_full − Σ_i softplus(lse_i − z_{i,excl[i]})) / (|P_full| − #excluded)``, the excluded
  logits recomputed as B gathered dot products (``lse_i``: the row's negative LSE, or the batch's for XE, which
  the excluded pair never enters: it is a positive);
* gradient: the kernel's backward with the loss gradient rescaled by ``|P_full| / |P|`` and the negative
  coefficient lowered by the excluded pairs' ``sigmoid(lse − z) / |P_full|``; the kernel then still gives each
  excluded pair its positive gradient, which an O(B·d) autograd term cancels.

So memory stays O((B + M)·d) and the work is one fused forward and one fused backward pass plus O(B·d).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flashdml import _dispatch
from flashdml._math import all_finite
from flashdml._validation import check_temperature, prepare_batch

__all__ = ["AllPairsExcept", "excluded_self_pairs", "xent_excluding"]


class AllPairsExcept:
    """Stands for pml's all-pairs tuple between ``labels`` and ``ref_labels`` minus the positive pairs
    ``(i, excl[i])`` (``excl[i] = -1``: none) without building it: what flashdml's ``CrossBatchMemory`` hands a
    flashdml loss instead of B×M index tensors. ``materialize()`` builds pml's tensors (for pml's slow path).

    Args:
        labels: int ``[B]``; ref_labels: int ``[M]``; excl: int64 ``[B]``, the excluded reference column per row.

    Returns (``materialize()``):
        pml's ``(a1, p, a2, n)``, equal to ``lmu.remove_self_comparisons(lmu.get_all_pairs_indices(...))``.

    Raises:
        Nothing itself; ``materialize`` needs pytorch-metric-learning.

    Example::

        AllPairsExcept(labels, mem_labels, curr_batch_idx).materialize()
    """

    def __init__(self, labels: Tensor, ref_labels: Tensor, excl: Tensor):
        self.labels, self.ref_labels, self.excl = labels, ref_labels, excl

    def materialize(self):
        from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

        a1, p, a2, n = lmu.get_all_pairs_indices(self.labels, self.ref_labels)
        keep = p != self.excl.to(p.device)[a1]
        return a1[keep], p[keep], a2, n


def _class_ids(labels: Tensor, ref_labels: Tensor):
    _, inv = torch.unique(torch.cat([labels.reshape(-1), ref_labels.reshape(-1)]), return_inverse=True)
    return inv[: labels.numel()], inv[labels.numel():], int(inv.max()) + 1 if inv.numel() else 0


def _strictly_increasing(keys: Tensor) -> bool:
    return keys.numel() < 2 or bool((keys[1:] > keys[:-1]).all())


def excluded_self_pairs(labels: Tensor, ref_labels: Tensor, indices_tuple: Sequence[Tensor]) -> Optional[Tensor]:
    """``excl`` (int64 ``[B]``, ``-1`` where nothing is excluded) when ``indices_tuple`` is exactly pml's all-pairs
    tuple between ``labels`` and ``ref_labels`` minus at most one positive pair ``(i, excl[i])`` per row — what
    ``CrossBatchMemory`` and ``DistributedLossWrapper(efficient=True)`` pass — else ``None``.

    The check reads the given tuple once (O(|P| + |N|), vectorised) and otherwise works on label histograms,
    O(B + M): both index lists must be row-major, duplicate-free and label-consistent, the negatives must all be
    there, and each row may miss at most one positive; the missing column is the difference between the sum of the
    row's expected positive columns and the sum of the given ones.
    """
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) != 4:
        return None
    a1, p, a2, n = indices_tuple
    if not all(isinstance(t, Tensor) and t.dim() == 1 and not t.is_floating_point() and t.device == labels.device
               for t in (a1, p, a2, n)):
        return None
    if a1.numel() != p.numel() or a2.numel() != n.numel():
        return None
    B, M = labels.numel(), ref_labels.numel()
    li, ri, C = _class_ids(labels, ref_labels)
    ref_count = torch.bincount(ri, minlength=C)
    pos_per_row = ref_count[li]
    n_pos = int(pos_per_row.sum())
    if a2.numel() != B * M - n_pos or a1.numel() > n_pos:
        return None
    a1, p, a2, n = a1.long(), p.long(), a2.long(), n.long()
    for rows, cols in ((a1, p), (a2, n)):
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= B or int(cols.min()) < 0
                             or int(cols.max()) >= M):
            return None
        if not _strictly_increasing(rows * M + cols):
            return None
    if a2.numel() and bool((li[a2] == ri[n]).any()):
        return None
    if a1.numel() and bool((li[a1] != ri[p]).any()):
        return None
    missing = pos_per_row - torch.bincount(a1, minlength=B)
    if bool(((missing != 0) & (missing != 1)).any()):
        return None
    col_sum = torch.zeros(C, dtype=torch.long, device=labels.device).index_add_(
        0, ri, torch.arange(M, device=labels.device))
    given_sum = torch.zeros(B, dtype=torch.long, device=labels.device).index_add_(0, a1, p)
    return torch.where(missing == 1, col_sum[li] - given_sum, torch.full_like(missing, -1))


class _ExcludedXent(torch.autograd.Function):
    """Forward: the corrected value (module docstring). Backward: the kernel's gradient with the rescaled loss
    gradient and lowered coefficients; the excluded pairs' positive gradient is cancelled outside
    (``xent_excluding``)."""

    @staticmethod
    def forward(ctx, x, y, t, labels, ref_labels, rows, cols, ops, global_partition, normalize):
        xc, yc = x.contiguous(), y.contiguous()
        loss_full, lse, coef = ops.xent_fwd(xc, yc, labels, ref_labels, t, global_partition, False, normalize)
        li, ri, C = _class_ids(labels, ref_labels)
        n_full = int(torch.bincount(ri, minlength=C)[li].sum())
        n = n_full - rows.numel()
        xs = F.normalize(x[rows].float(), dim=1, eps=1e-12) if normalize else x[rows].float()
        ys = F.normalize(y[cols].float(), dim=1, eps=1e-12) if normalize else y[cols].float()
        z = (xs * ys).sum(1) / t
        row_lse = lse.expand(x.shape[0])[rows] if global_partition else lse[rows]
        live = row_lse != float("-inf")
        u = torch.where(live, row_lse - z, torch.zeros_like(z))
        s = torch.where(live, F.softplus(u), torch.zeros_like(z))
        g = torch.where(live, torch.sigmoid(u), torch.zeros_like(z))
        if n <= 0:
            loss = torch.zeros((), dtype=torch.float32, device=x.device)
        else:
            loss = (loss_full.double() * n_full - s.double().sum()) / n
            loss = loss.float()
        coef_low = coef.clone()
        if global_partition:
            coef_low -= g.sum() / max(n_full, 1)
        else:
            coef_low.index_add_(0, rows, -g / max(n_full, 1))
        ctx.save_for_backward(xc, yc, t, labels, ref_labels, lse, coef_low)
        ctx.scale = n_full / n if n > 0 else 0.0
        ctx.ops, ctx.flags = ops, (global_partition, normalize)
        ctx.w = g / n if n > 0 else torch.zeros_like(g)  # read by xent_excluding's cancelling term
        return loss

    @staticmethod
    def backward(ctx, grad):
        xc, yc, t, labels, ref_labels, lse, coef_low = ctx.saved_tensors
        if ctx.scale == 0.0:
            return (None,) * 10
        gp, normalize = ctx.flags
        dx, dy, dt = ctx.ops.xent_bwd((grad * ctx.scale).float().contiguous(), xc, yc, labels, ref_labels, t, gp,
                                      False, normalize, lse, coef_low)
        return dx, dy, dt, None, None, None, None, None, None, None


def xent_excluding(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, excl: Tensor, *, temperature,
                   normalize: bool, global_partition: bool) -> Optional[Tensor]:
    """NT-Xent (``global_partition=False``) or Cross-Example Softmax (``True``) in cross mode over ``x`` and ``y``
    without the positive pairs ``(i, excl[i])`` (``excl[i] = -1``: none), fused; ``None`` when no compiled kernel
    serves the inputs (reference backend, float64) or a row is not finite — the caller then runs its slow path.
    Returns a 0-dim fp32 loss; 0 with a zero gradient when no positive pair is left."""
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=False)
    op = "cross_example_softmax" if global_partition else "ntxent"
    ops = _dispatch.select(op, batch.x)
    if ops is None or not all_finite(batch.x, batch.y):
        return None
    t = check_temperature(temperature, batch.x.device)
    excl = excl.to(batch.x.device)
    rows = torch.nonzero(excl >= 0).reshape(-1)
    cols = excl[rows]
    loss = _ExcludedXent.apply(batch.x, batch.y, t, batch.labels, batch.ref_labels, rows, cols, ops,
                               global_partition, bool(normalize))
    if rows.numel() and loss.requires_grad:
        # The kernel's backward still gives each excluded pair its positive gradient −g/|P|·∇z; this zero-valued
        # term adds the opposite, through x, y and the temperature.
        xs, ys = batch.x[rows].float(), batch.y[cols].float()
        if normalize:
            xs, ys = F.normalize(xs, dim=1, eps=1e-12), F.normalize(ys, dim=1, eps=1e-12)
        z = (xs * ys).sum(1) / t
        corr = (loss.grad_fn.w * z).sum()
        loss = loss + (corr - corr.detach())
    return loss



def dense_xent_excluding(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, excl: Tensor, *, temperature,
                         normalize: bool, global_partition: bool) -> Tensor:
    """``xent_excluding``'s definition written out on the B×M similarity matrix: the slow path for inputs no
    compiled kernel serves (float64, the reference backend, non-finite rows), and the tests' oracle."""
    t = check_temperature(temperature, x.device)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs, ys = x.to(dt), y.to(dt)
    if normalize:
        xs, ys = F.normalize(xs, dim=1, eps=1e-12), F.normalize(ys, dim=1, eps=1e-12)
    z = xs @ ys.T / t.to(dt)
    same = labels.reshape(-1, 1) == ref_labels.reshape(1, -1)
    pos = same.clone()
    rows = torch.nonzero(excl >= 0).reshape(-1)
    pos[rows, excl[rows]] = False
    if not bool(pos.any()):
        return (z * 0).sum()
    neg_z = z.masked_fill(same, float("-inf"))
    lse = torch.logsumexp(neg_z.reshape(-1), 0).expand(z.shape[0]) if global_partition else torch.logsumexp(neg_z, 1)
    lse_p = lse.unsqueeze(1).expand_as(z)[pos]
    z_p = z[pos]
    live = lse_p != float("-inf")
    terms = torch.where(live, F.softplus(torch.where(live, lse_p - z_p, torch.zeros_like(z_p))), torch.zeros_like(z_p))
    return terms.sum() / pos.sum()
