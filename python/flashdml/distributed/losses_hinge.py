"""Threshold-consistent margin and margin contrastive over a process group (docs/spec.md §2.3, §2.4, §5).

Both losses are ``λ+ · Σ_HP (m+ − s) / |HP| + λ− · Σ_HN (s − m−) / |HN|`` over hard pair sets. A first pass
over this rank's rows × the gathered columns (row chunks, no graph) counts the hard pairs and sums their
hinges; the four numbers are summed over ranks (rank order, float64 sums, exact counts), which gives the
value. The counts are piecewise constant, so the share differentiated is the local hinge sums divided by the
global counts (recomputed per chunk in backward).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import check_real
from . import _fused
from ._comm import sum_over_ranks
from ._shard import Global, finish, normalized, prepare_shard, row_chunk, self_pair_mask, setup, streamed_sum


def _hard(g: Global, r0: int, s: Tensor, pos_margin: float, neg_margin: float, drop_diagonal: bool, strict: bool):
    same = g.row_labels[r0:r0 + s.shape[0], None] == g.col_labels[None, :]
    pos = same
    if drop_diagonal:
        diag = self_pair_mask(g, r0, s.shape[0])
        if diag is not None:
            pos = same & ~diag
    if strict:
        return pos & (pos_margin - s > 0), ~same & (s - neg_margin > 0)
    return pos & (s <= pos_margin), ~same & (s >= neg_margin)


def _hinge(op: str, x, labels, y, ref_labels, pos_margin, neg_margin, pos_weight, neg_weight, drop_diagonal,
           strict, group) -> Tensor:
    batch = prepare_shard(x, y, labels, ref_labels, pair_mode_default=True)
    ops = _fused.fused_ops(op, batch.x)
    g = setup(op, batch, group, pos_margin=pos_margin, neg_margin=neg_margin, pos_weight=pos_weight,
              neg_weight=neg_weight, fused=ops is not None)
    if ops is not None:
        return _fused.hinge(g, ops, (pos_margin, neg_margin, pos_weight, neg_weight), drop_diagonal, strict)
    xh, Yh = normalized(g.x, True), normalized(g.Y, True)
    stats = torch.zeros(4, dtype=torch.float64, device=x.device)  # hinge sums (pos, neg), counts (pos, neg)
    with torch.no_grad():
        step = row_chunk(Yh.shape[0])
        for r0 in range(0, xh.shape[0], step):
            s = xh[r0:r0 + step] @ Yh.T
            hp, hn = _hard(g, r0, s, pos_margin, neg_margin, drop_diagonal, strict)
            stats += torch.stack([(pos_margin - s[hp]).double().sum(), (s[hn] - neg_margin).double().sum(),
                                  hp.sum().double(), hn.sum().double()])
    sp, sn, cp, cn = (float(v) for v in sum_over_ranks(stats, g.rows))
    value = (pos_weight * sp / cp if cp > 0 else 0.0) + (neg_weight * sn / cn if cn > 0 else 0.0)
    wp = pos_weight / cp if cp > 0 else 0.0
    wn = neg_weight / cn if cn > 0 else 0.0

    def chunk(r0, xc, Yh):
        s = xc @ Yh.T
        hp, hn = _hard(g, r0, s.detach(), pos_margin, neg_margin, drop_diagonal, strict)
        return wp * (pos_margin - s[hp]).sum() + wn * (s[hn] - neg_margin).sum()

    share = streamed_sum(chunk, xh, Yh) if xh.shape[0] and (wp or wn) else None
    return finish(torch.tensor(value, dtype=xh.dtype, device=x.device), share, g)


def threshold_consistent_margin(x: Tensor, labels: Optional[Tensor], y: Optional[Tensor] = None,
                                ref_labels: Optional[Tensor] = None, *, pos_margin: float, neg_margin: float,
                                pos_weight: float, neg_weight: float, process_group) -> Tensor:
    args = [check_real(v, n) for v, n in ((pos_margin, "pos_margin"), (neg_margin, "neg_margin"),
                                           (pos_weight, "pos_weight"), (neg_weight, "neg_weight"))]
    return _hinge("threshold_consistent_margin", x, labels, y, ref_labels, *args, True, False, process_group)


def contrastive_margin(x: Tensor, labels: Optional[Tensor], y: Optional[Tensor] = None,
                       ref_labels: Optional[Tensor] = None, *, pos_margin: float, neg_margin: float,
                       process_group) -> Tensor:
    pos_margin, neg_margin = check_real(pos_margin, "pos_margin"), check_real(neg_margin, "neg_margin")
    return _hinge("contrastive_margin", x, labels, y, ref_labels, pos_margin, neg_margin, 1.0, 1.0, False, True,
                  process_group)
