"""Triplet margin loss over a process group (docs/spec.md §6.4, §5).

The loss is ``Σ_T [d_ap − d_an + margin]_+ / #{active T}`` over every triplet ``(a, p, n)`` of the global batch.
A triplet belongs to its anchor, so a rank takes the triplets of its own rows, with ``p`` and ``n`` among the
gathered columns; the hinge sums and the exact active counts are summed over ranks (float64 sums, int64 counts,
rank order) and the differentiated share is this rank's hinge sum divided by the *global* count (piecewise
constant: exact).

* Cross mode (and pair mode) in fp32 / bf16 / fp16 with a compiled backend: the fused ``triplet_fwd`` /
  ``triplet_bwd`` on this rank's rows × all gathered columns; the backward is given the global count.
* Self mode, float64, or no compiled backend: a streamed PyTorch driver (row chunks × the gathered columns,
  one positive rank at a time as the reference does, recomputed in backward; memory O(chunk · B_global)). The
  fused kernel cannot run self mode here: a triplet's positive and negative may lie in different column blocks
  (this rank's own rows, where the kernel drops the diagonal, and the other ranks' rows), and the kernel only
  forms triplets within one call's columns.

A NaN or an infinity in any rank's shard makes the value and the gradients NaN on every rank, as in one process.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._math import l2_normalize
from .._validation import check_real
from . import _fused
from ._comm import sum_over_ranks
from .losses_anchor_lse import nonfinite_rows
from ._shard import Global, KernelShare, finish, prepare_shard, row_chunk, self_pair_mask, setup, streamed_sum

OP = "triplet_margin"


def _chunk_hinges(g: Global, r0: int, xc: Tensor, Yh: Tensor, margin: float, with_graph: bool):
    """``(Σ active hinges, #active)`` of the triplets of a chunk of anchors (the reference's loop over the
    k-th positive of every anchor)."""
    D = torch.cdist(xc, Yh, compute_mode="donot_use_mm_for_euclid_dist")
    same = g.row_labels[r0:r0 + xc.shape[0], None] == g.col_labels[None, :]
    diag = self_pair_mask(g, r0, xc.shape[0])
    pos = same if diag is None else same & ~diag
    neg = ~same
    n_pos = pos.sum(1)
    k_max = int(n_pos.max()) if n_pos.numel() else 0
    pos_cols = torch.sort(pos.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :k_max]
    total = D.sum() * 0
    count = torch.zeros((), dtype=torch.int64, device=D.device)
    Dd = D.detach()
    for k in range(k_max):
        active = neg & (n_pos > k)[:, None] & (Dd.gather(1, pos_cols[:, k:k + 1]) - Dd + margin > 0)
        if with_graph:
            hinge = D.gather(1, pos_cols[:, k:k + 1]) - D + margin
            total = total + torch.where(active, hinge, torch.zeros_like(hinge)).sum()
        else:
            hinge = Dd.gather(1, pos_cols[:, k:k + 1]) - Dd + margin
            total = total + torch.where(active, hinge, torch.zeros_like(hinge)).double().sum()
        count = count + active.sum()
    return total, count


class _TripletShare(KernelShare):
    """Value 0; backward: ``triplet_bwd`` on this rank's rows × the gathered columns with the global count."""

    @staticmethod
    def backward(ctx, grad):
        st = ctx.state
        g = st["g"]
        x, Y = ctx.saved_tensors
        dx, dy = st["ops"].triplet_bwd(grad.float().reshape(()), x.detach().contiguous(), Y.detach().contiguous(),
                                       g.row_labels, g.col_labels, st["margin"], False, st["count"])
        return dx.to(x.dtype), dy.to(Y.dtype), None


def triplet_margin(x: Tensor, labels: Optional[Tensor], y: Optional[Tensor] = None,
                   ref_labels: Optional[Tensor] = None, *, margin: float, process_group) -> Tensor:
    margin = float(check_real(margin, "margin"))
    batch = prepare_shard(x, y, labels, ref_labels, pair_mode_default=True)
    ops = None if batch.self_mode else _fused.fused_ops(OP, batch.x)
    g = setup(OP, batch, process_group, margin=margin, fused=ops is not None)
    dev = batch.x.device
    n = g.x.shape[0]
    out_dtype = torch.float64 if batch.x.dtype == torch.float64 else torch.float32
    xd, Yd = g.x.detach().contiguous(), g.Y.detach().contiguous()
    local = torch.zeros(3, dtype=torch.float64, device=dev)  # hinge sum, active count, non-finite entries
    local[2] = float(nonfinite_rows(batch))
    if n and Yd.shape[0] and not local[2]:
        with torch.no_grad():
            if ops is not None:
                _, sums, counts = ops.triplet_fwd(xd, Yd, g.row_labels, g.col_labels, margin, False)
                local[:2] = torch.stack([sums.double().reshape(()), counts.double().reshape(())])
            else:
                xh = l2_normalize(xd.to(out_dtype))
                Yh = l2_normalize(Yd.to(out_dtype))
                step = row_chunk(Yh.shape[0])
                for r0 in range(0, n, step):
                    s, c = _chunk_hinges(g, r0, xh[r0:r0 + step], Yh, margin, False)
                    local[:2] += torch.stack([s, c.double()])
    total, count, bad = (float(v) for v in sum_over_ranks(local, g.rows))
    if bad:  # a NaN or an infinity anywhere in the global batch: NaN on every rank (the library's rule)
        return finish(torch.full((), float("nan"), dtype=out_dtype, device=dev), None, g) * float("nan")
    if count == 0:
        return finish(torch.zeros((), dtype=out_dtype, device=dev), None, g)
    value = torch.tensor(total / count, dtype=out_dtype, device=dev)
    if n == 0 or local[1] == 0:
        return finish(value, None, g)
    if ops is not None:
        state = dict(g=g, ops=ops, margin=margin,
                     count=torch.tensor([int(count)], dtype=torch.int64, device=dev))
        return finish(value, _TripletShare.apply(g.x, g.Y, state), g)
    inv = 1.0 / count

    def chunk(r0, xc, Yh):
        return _chunk_hinges(g, r0, xc, Yh, margin, True)[0] * inv

    xh = l2_normalize(g.x.to(out_dtype))
    Yh = l2_normalize(g.Y.to(out_dtype))
    return finish(value, streamed_sum(chunk, xh, Yh), g)
