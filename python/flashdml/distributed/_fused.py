"""The compiled kernels on a rank's rows × the gathered columns (fp32 / bf16 / fp16 on the "cpu", "cuda" and
"triton" backends), for Cross-Example Softmax, NT-Xent and the hinge-pair losses.

The kernels drop the pairs ``(i, i)`` only when ``x`` is ``y``, so the columns are split into blocks: in self mode
this rank's own rows (self mode, the kernel drops the diagonal) and the other ranks' rows (cross mode); in cross
mode one block, every column. Each block's forward statistics (negative LSEs; hinge sums and counts) are combined
like two ranks' and then over ranks. The backward kernels take the statistics as inputs, so they are given the
global ones:

* ``xent_bwd`` scales a block's positives by ``1/|P_block|`` (counted from its labels) and its negatives by
  ``coef · exp(z − lse)``; with ``grad = g · |P_block| / |P|`` and ``coef = c · |P| / |P_block|`` both come out
  as the global gradient. A block without a positive pair gets no gradient from the kernel: a cross block is
  given one zero column that is a positive of row 0 (its pairs contribute exactly nothing), and this rank's own
  block (self mode, nothing can be appended to it) runs its negatives' share ``c · exp(z − lse)`` as a streamed
  PyTorch surrogate (row chunks, autograd) instead.
* ``hinge_pair_bwd`` takes the counts: the global ones give the global gradient directly.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._math import l2_normalize
from ..ops.selection import _add_rows, _normalized, _pair_dots, count_negatives
from ._comm import logsumexp_over_ranks, sum_over_ranks
from ._shard import Global, KernelShare, finish, row_chunk

_NEG_INF = float("-inf")


@dataclasses.dataclass
class _Block:
    y: Tensor  # the block's columns (contiguous, detached)
    ref_labels: Tensor
    self_mode: bool  # this rank's own rows (y is x)
    first: int  # global column of the block's first column (the other-ranks block: see _scatter)
    n_pos: int  # positive pairs of the block (as the kernel counts them)


def _blocks(g: Global, x: Tensor, Y: Tensor) -> List[_Block]:
    lab = g.row_labels

    def count_pos(ref, self_mode):
        return x.shape[0] * ref.shape[0] - count_negatives(lab, ref) - (x.shape[0] if self_mode else 0)

    if not g.self_mode:
        return [_Block(Y, g.col_labels, False, 0, count_pos(g.col_labels, False))] if Y.shape[0] else []
    lo, hi = g.rows.offset, g.rows.offset + g.rows.local
    own = _Block(x, lab, True, lo, count_pos(lab, True))
    if lo == 0 and hi == Y.shape[0]:
        return [own]
    other_y = torch.cat([Y[:lo], Y[hi:]]).contiguous()
    other_lab = torch.cat([g.col_labels[:lo], g.col_labels[hi:]])
    return [own, _Block(other_y, other_lab, False, -1, count_pos(other_lab, False))]


def _scatter(g: Global, blk: _Block, dx: Tensor, dY: Tensor, dx_b: Tensor, dy_b: Tensor) -> None:
    """Add a block's column gradient to the gathered columns' (own block: to this rank's rows directly)."""
    dx += dx_b
    if blk.self_mode:
        dx += dy_b
    elif blk.first == 0:
        dY += dy_b
    else:
        lo, hi = g.rows.offset, g.rows.offset + g.rows.local
        dY[:lo] += dy_b[:lo]
        dY[hi:] += dy_b[lo:]


def _negatives_surrogate(blk: _Block, x: Tensor, lab: Tensor, t: Tensor, normalize: bool, lse: Tensor,
                         coef: Tensor, grad: Tensor):
    """``(dx, dy, dt)`` of ``grad · Σ_negatives coef_row · exp(z − lse_row)`` over one block, by autograd in row
    chunks (for blocks without positive pairs, which the backward kernel leaves out)."""
    xr = x.detach().float().requires_grad_()
    yr = xr if blk.self_mode else blk.y.detach().float().requires_grad_()
    tr = t.detach().requires_grad_()
    leaves = (xr, tr) if blk.self_mode else (xr, tr, yr)  # self mode: the column part lands in dx as well
    acc = [torch.zeros_like(v) for v in leaves]
    step = row_chunk(yr.shape[0])
    for r0 in range(0, xr.shape[0], step):
        with torch.enable_grad():
            xc = xr[r0:r0 + step]
            xh = l2_normalize(xc) if normalize else xc
            yh = l2_normalize(yr) if normalize else yr
            z = (xh @ yh.T) / tr
            neg = lab[r0:r0 + step, None] != blk.ref_labels[None, :]
            l_row = lse.expand(xr.shape[0])[r0:r0 + step, None]
            l_row = torch.where(torch.isfinite(l_row), l_row, torch.zeros_like(l_row))  # such rows: no negative
            c_row = coef.expand(xr.shape[0])[r0:r0 + step, None]
            s = (torch.exp(z - l_row) * c_row)[neg].sum() * grad
            for a, part in zip(acc, torch.autograd.grad(s, leaves)):
                a += part
    dy = torch.zeros_like(xr) if blk.self_mode else acc[2]
    return acc[0], dy, acc[1]


class _XentShare(KernelShare):
    """Value 0; backward: this rank's share of the global XE / NT-Xent gradient, by the backward kernel."""

    @staticmethod
    def backward(ctx, grad):
        st = ctx.state
        x, Y, t = ctx.saved_tensors
        xd, Yd = x.detach().contiguous(), Y.detach().contiguous()
        dx = torch.zeros(xd.shape, dtype=torch.float32, device=xd.device)
        dY = torch.zeros(Yd.shape, dtype=torch.float32, device=xd.device)
        dt = torch.zeros((), dtype=torch.float32, device=xd.device)
        g = st["g"]
        for blk in _blocks(g, xd, Yd):
            if blk.n_pos > 0:
                gb = (grad.float() * (blk.n_pos / st["n_pos"])).reshape(())
                coef = (st["coef"] * (st["n_pos"] / blk.n_pos)).float()
                dx_b, dy_b, dt_b = st["ops"].xent_bwd(gb, xd, blk.y, g.row_labels, blk.ref_labels, t.detach(),
                                                      st["global"], blk.self_mode, st["normalize"], st["lse"], coef)
            elif not blk.self_mode and st["lse_floor"] > -80.0:
                # No positive pair: the kernel would skip the block. One zero column labelled like row 0 gives it
                # positives whose gradient is exactly 0 (ŷ = 0 and z = 0: nothing reaches dx, dy or dτ), and
                # the negatives get grad · coef · exp(z − lse) as wanted; the zero column's dy is dropped. (Its
                # exp(0 − lse) as a negative of the other rows is multiplied by ŷ = 0: finite while lse > −80.)
                y_ext = torch.cat([blk.y, blk.y.new_zeros(1, blk.y.shape[1])])
                ref_ext = torch.cat([blk.ref_labels, g.row_labels[:1]])
                dx_b, dy_b, dt_b = st["ops"].xent_bwd(grad.float().reshape(()), xd, y_ext, g.row_labels, ref_ext,
                                                      t.detach(), st["global"], False, st["normalize"], st["lse"],
                                                      st["coef"].float())
                dy_b = dy_b[:-1]
            else:
                dx_b, dy_b, dt_b = _negatives_surrogate(blk, xd, g.row_labels, t, st["normalize"], st["lse"],
                                                        st["coef"], grad.float())
            _scatter(g, blk, dx, dY, dx_b.float(), dy_b.float())
            dt += dt_b.float().reshape(())
        return dx.to(x.dtype), dY.to(Y.dtype), (dt if ctx.needs_input_grad[2] else None), None


def xent(g: Global, ops, t: Tensor, normalize: bool, global_partition: bool, n_pos: float,
         pos_rows: Tensor, pos_cols: Tensor) -> Tensor:
    """Cross-Example Softmax (``global_partition``) or NT-Xent on this rank's rows, by the compiled ops ``ops``."""
    xd, Yd = g.x.detach().contiguous(), g.Y.detach().contiguous()
    n, dev = xd.shape[0], xd.device
    lse_row = torch.full((n,), _NEG_INF, dtype=torch.float32, device=dev)
    with torch.no_grad():
        for blk in _blocks(g, xd, Yd) if n else []:
            _, lse_b, _ = ops.xent_fwd(xd, blk.y, g.row_labels, blk.ref_labels, t.detach(), global_partition,
                                       blk.self_mode, normalize)
            lse_row = torch.logaddexp(lse_row, lse_b.float().expand(n))
        xh, _ = _normalized(xd, normalize)
        Yh, _ = _normalized(Yd, normalize)
        z_pos = _pair_dots(xh, Yh, pos_rows, pos_cols) / t.detach()
    if global_partition:
        lam_local = lse_row[:1] if n else torch.full((1,), _NEG_INF, device=dev)
        lse = logsumexp_over_ranks(lam_local, g.rows)
        if n_pos == 0 or not bool(torch.isfinite(lse).all()):
            return finish(torch.zeros((), device=dev), None, g)
        u = (lse - z_pos).double()
        part = torch.stack([F.softplus(u).sum(), torch.sigmoid(u).sum()])
        total = sum_over_ranks(part, g.rows)
        value, coef = total[0] / n_pos, (total[1] / n_pos).reshape(1)
    else:
        if n_pos == 0:
            return finish(torch.zeros((), device=dev), None, g)
        lse = lse_row
        l_p = lse[pos_rows]
        valid = torch.isfinite(l_p)
        u = (l_p - z_pos).double()
        sp = torch.where(valid, F.softplus(u), torch.zeros_like(u))
        sg = torch.where(valid, torch.sigmoid(u), torch.zeros_like(u))
        value = sum_over_ranks(sp.sum().reshape(1), g.rows)[0] / n_pos
        coef = torch.zeros(n, dtype=torch.float64, device=dev)
        _add_rows(coef, pos_rows, sg)  # a fixed summation order on CUDA too (no atomics)
        coef = coef / n_pos
    if n == 0:
        return finish(value.float(), None, g)
    finite = lse[torch.isfinite(lse)]
    state = dict(g=g, ops=ops, normalize=normalize, n_pos=n_pos, lse=lse.float().contiguous(),
                 lse_floor=float(finite.min()) if finite.numel() else 0.0,
                 coef=coef.float().contiguous(), **{"global": global_partition})
    share = _XentShare.apply(g.x, g.Y, t, state)
    return finish(value.float(), share, g)


class _HingeShare(KernelShare):
    @staticmethod
    def backward(ctx, grad):
        st = ctx.state
        g = st["g"]
        x, Y = ctx.saved_tensors
        xd, Yd = x.detach().contiguous(), Y.detach().contiguous()
        dx = torch.zeros(xd.shape, dtype=torch.float32, device=xd.device)
        dY = torch.zeros(Yd.shape, dtype=torch.float32, device=xd.device)
        for blk in _blocks(g, xd, Yd):
            dx_b, dy_b = st["ops"].hinge_pair_bwd(grad.float().reshape(()), xd, blk.y, g.row_labels, blk.ref_labels,
                                                  *st["margins"], st["drop"] and blk.self_mode, st["strict"], True,
                                                  st["counts"])
            _scatter(g, blk, dx, dY, dx_b.float(), dy_b.float())
        return dx.to(x.dtype), dY.to(Y.dtype), None


def hinge(g: Global, ops, margins, drop_diagonal: bool, strict: bool) -> Tensor:
    """TCM (``drop_diagonal``, inclusive) or margin contrastive (strict) on this rank's rows."""
    xd, Yd = g.x.detach().contiguous(), g.Y.detach().contiguous()
    stats = torch.zeros(4, dtype=torch.float64, device=xd.device)
    with torch.no_grad():
        for blk in _blocks(g, xd, Yd) if xd.shape[0] else []:
            _, sums, counts = ops.hinge_pair_fwd(xd, blk.y, g.row_labels, blk.ref_labels, *margins,
                                                 drop_diagonal and blk.self_mode, strict, True)
            stats += torch.cat([sums.double(), counts.double()])
    sp, sn, cp, cn = (float(v) for v in sum_over_ranks(stats, g.rows))
    pos_margin, neg_margin, pos_weight, neg_weight = margins
    value = (pos_weight * sp / cp if cp > 0 else 0.0) + (neg_weight * sn / cn if cn > 0 else 0.0)
    value = torch.tensor(value, dtype=torch.float32, device=xd.device)
    if xd.shape[0] == 0 or (cp == 0 and cn == 0):
        return finish(value, None, g)
    counts = torch.tensor([int(cp), int(cn)], dtype=torch.int64, device=xd.device)
    share = _HingeShare.apply(g.x, g.Y, dict(g=g, ops=ops, margins=margins, drop=drop_diagonal, strict=strict,
                                             counts=counts))
    return finish(value, share, g)


def fused_ops(op: str, x: Tensor) -> Optional[object]:
    """The compiled ops for ``op`` on ``x`` (``None``: float64 or no compiled backend — the streamed PyTorch path)."""
    from .. import _dispatch

    return _dispatch.select(op, x)
