"""SupCon, Multi-Similarity and Circle over a process group (docs/spec.md §6.1-6.3, §5).

All three are sums over anchors of a per-anchor term ``ℓ_a`` that depends only on the anchor's row of S (its
LSEs over its positives and negatives), then a reducer: Multi-Similarity divides by the global number of
anchors, SupCon and Circle by the global number of anchors with ``ℓ_a > 0``. So a rank computes ``ℓ_a`` for its
own rows against the gathered columns, the sums and counts are combined over ranks (float64, rank order), and the
differentiated share is ``Σ_{local a} c_a ℓ_a`` with the global weights ``c_a`` held constant (the counts are
piecewise constant: exact).

* fp32 / bf16 / fp16 with a compiled backend: the fused ``anchor_lse_fwd`` runs on this rank's rows × each
  column block (in self mode this rank's own rows in self mode, the other ranks' rows in cross mode, as in
  ``_fused``), and the blocks' per-row LSEs are combined (Multi-Similarity's ``log(1 + Σ)`` exactly, in
  float64); SupCon's sum of positive logits comes from the positive pairs' dot products. ``anchor_lse_bwd``
  reads everything from its ``row_stats`` argument, so each block's backward is given the *global* per-row
  LSEs and weights and returns exactly its part of the global gradient.
* float64, or no compiled backend: a streamed PyTorch driver (row chunks × the gathered columns, recomputed in
  backward; memory O(chunk · B_global)).

A NaN or an infinity in any rank's shard makes the value and the gradients NaN on every rank, as in one process
(the count of such entries rides on the first reduction).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import check_real, check_temperature
from ..ops.anchor_lse import CIRCLE, MULTI_SIMILARITY, SUPCON
from ..ops.selection import _add_rows, _normalized, _pair_dots, count_negatives
from ..reference.anchor_lse import _check_ms_params
from ..reference.losses import _masked_logsumexp, _softplus
from . import _fused
from ._comm import sum_over_ranks
from ._shard import (Global, KernelShare, finish, normalized, prepare_shard, row_chunk, self_pair_mask, setup,
                     streamed_sum)

_NEG_INF = float("-inf")
_NAMES = {SUPCON: "supcon", MULTI_SIMILARITY: "multi_similarity", CIRCLE: "circle"}


def _class_counts(g: Global) -> Tensor:
    """int64 ``[n_local]``: how many gathered columns share each local row's label (self pair included)."""
    classes, counts = torch.unique(g.col_labels, return_counts=True)
    if classes.numel() == 0:
        return torch.zeros_like(g.row_labels)
    at = torch.searchsorted(classes, g.row_labels).clamp(max=classes.numel() - 1)
    return torch.where(classes[at] == g.row_labels, counts[at], torch.zeros_like(at))


def nonfinite_rows(batch) -> int:
    """How many entries of this rank's own tensors (``x``, and ``y`` in cross mode) are NaN or infinite."""
    n = int((~torch.isfinite(batch.x)).sum()) if batch.x.numel() else 0
    if not batch.self_mode and batch.y is not None and batch.y.numel():
        n += int((~torch.isfinite(batch.y)).sum())
    return n


# ------------------------------------------------------------------------------------ streamed PyTorch path
def _row_terms(kind: int, S: Tensor, pos: Tensor, neg: Tensor, prm, t) -> Tensor:
    """``ℓ_a`` of a chunk of rows from its similarities (differentiable; the reference's formulas)."""
    if kind == SUPCON:
        z = S / t
        lse, _ = _masked_logsumexp(z, pos | neg, dim=1)
        n_pos = pos.sum(1)
        mean_pos = torch.where(pos, z, torch.zeros_like(z)).sum(1) / n_pos.clamp_min(1).to(z.dtype)
        return torch.where(n_pos > 0, lse - mean_pos, torch.zeros_like(lse))
    if kind == MULTI_SIMILARITY:
        alpha, beta, base = prm
        zero = torch.zeros_like(S[:, :1])
        lp = torch.logsumexp(torch.cat([torch.where(pos, -alpha * (S - base), _NEG_INF), zero], 1), 1)
        ln = torch.logsumexp(torch.cat([torch.where(neg, beta * (S - base), _NEG_INF), zero], 1), 1)
        return lp / alpha + ln / beta
    m, gamma = prm[0], prm[1]
    Sd = S.detach()
    ap = -gamma * torch.relu(1 + m - Sd) * (S - (1 - m))
    an = gamma * torch.relu(Sd + m) * (S - m)
    lp, has_p = _masked_logsumexp(ap, pos, dim=1)
    ln, has_n = _masked_logsumexp(an, neg, dim=1)
    return torch.where(has_p & has_n, _softplus(lp + ln), torch.zeros_like(lp))


def _chunk_masks(g: Global, r0: int, rn: int):
    same = g.row_labels[r0:r0 + rn, None] == g.col_labels[None, :]
    diag = self_pair_mask(g, r0, rn)
    return (same if diag is None else same & ~diag), ~same


def _streamed_terms(g: Global, kind: int, prm, t, xh: Tensor, Yh: Tensor) -> Tensor:
    """No graph: ``ℓ_a`` of every local row."""
    out = []
    with torch.no_grad():
        step = row_chunk(Yh.shape[0])
        for r0 in range(0, xh.shape[0], step):
            S = xh[r0:r0 + step] @ Yh.T
            pos, neg = _chunk_masks(g, r0, S.shape[0])
            out.append(_row_terms(kind, S, pos, neg, prm, t))
    return torch.cat(out) if out else xh.new_zeros(0)


# ---------------------------------------------------------------------------------------------- fused path
def _combine_one_plus(parts) -> Tensor:
    """``log(1 + Σ_b (e^{l_b} − 1))`` for per-block ``l_b = log(1 + Σ_block)`` (float64, every ``l_b ≥ 0``)."""
    if len(parts) == 1:
        return parts[0]
    stack = torch.stack(parts)
    top = stack.amax(0)
    small = torch.log1p(torch.expm1(stack).sum(0))
    large = top + torch.log(torch.exp(stack - top).sum(0) - (len(parts) - 1) * torch.exp(-top))
    return torch.where(top < 1.0, small, large)


def _fused_stats(g: Global, ops, kind: int, prm, t: Tensor, xd: Tensor, Yd: Tensor):
    """Per local row (float64): the global LSEs ``(lp, ln)`` as the kernel's ``row_stats`` define them."""
    lp_parts, ln_parts = [], []
    for blk in _fused._blocks(g, xd, Yd):
        _, st = ops.anchor_lse_fwd(xd, blk.y, g.row_labels, blk.ref_labels, t, kind, *prm, blk.self_mode)
        lp_parts.append(st[:, 0].double())
        ln_parts.append(st[:, 1].double())
    if kind == MULTI_SIMILARITY:
        return _combine_one_plus(lp_parts), _combine_one_plus(ln_parts)
    lp = lp_parts[0] if len(lp_parts) == 1 else torch.logaddexp(*lp_parts)
    ln = ln_parts[0] if len(ln_parts) == 1 else torch.logaddexp(*ln_parts)
    return lp, ln


def _supcon_positive_sums(g: Global, t: Tensor, xd: Tensor, Yd: Tensor) -> Tensor:
    """float64 ``Σ_{p ∈ P(a)} z_ap`` per local row, from the positive pairs' dot products (fixed order)."""
    from .losses_xent import _positive_pairs

    rows, cols = _positive_pairs(g)
    xh, _ = _normalized(xd, True)
    Yh, _ = _normalized(Yd, True)
    z = (_pair_dots(xh, Yh, rows, cols) / t.detach().float()).double()
    out = torch.zeros(xd.shape[0], dtype=torch.float64, device=xd.device)
    _add_rows(out, rows, z)
    return out


class _AnchorShare(KernelShare):
    """Value 0; backward: this rank's share of the global gradient, by ``anchor_lse_bwd`` on each block."""

    @staticmethod
    def backward(ctx, grad):
        st = ctx.state
        g = st["g"]
        x, Y, t = ctx.saved_tensors
        xd, Yd = x.detach().contiguous(), Y.detach().contiguous()
        dx = torch.zeros(xd.shape, dtype=torch.float32, device=xd.device)
        dY = torch.zeros(Yd.shape, dtype=torch.float32, device=xd.device)
        dt = torch.zeros((), dtype=torch.float32, device=xd.device)
        for blk in _fused._blocks(g, xd, Yd):
            dx_b, dy_b, dt_b = st["ops"].anchor_lse_bwd(grad.float().reshape(()), xd, blk.y, g.row_labels,
                                                        blk.ref_labels, t.detach(), st["kind"], *st["prm"],
                                                        blk.self_mode, st["row_stats"])
            _fused._scatter(g, blk, dx, dY, dx_b.float(), dy_b.float())
            dt += dt_b.float().reshape(())
        return dx.to(x.dtype), dY.to(Y.dtype), (dt if ctx.needs_input_grad[2] else None), None


# ------------------------------------------------------------------------------------------------- driver
def _anchor_lse(kind: int, x, labels, y, ref_labels, prm, temperature, group) -> Tensor:
    op = _NAMES[kind]
    batch = prepare_shard(x, y, labels, ref_labels, pair_mode_default=True)
    dev = batch.x.device
    if kind == SUPCON:
        t = check_temperature(temperature, dev)
        prm = (0.0, 0.0, 0.0)
    else:  # not read: a constant
        t = torch.ones((), dtype=torch.float32, device=dev)
    ops = _fused.fused_ops(op, batch.x)
    g = setup(op, batch, group, p0=prm[0], p1=prm[1], p2=prm[2], temperature=float(t.detach()),
              fused=ops is not None)
    if kind == SUPCON:
        g.anchors = (t,)
    n = g.x.shape[0]
    out_dtype = torch.float64 if batch.x.dtype == torch.float64 else torch.float32
    same = _class_counts(g) if n else torch.zeros(0, dtype=torch.int64, device=dev)
    n_pos_row = same - (1 if g.self_mode else 0)
    n_neg_row = g.col_labels.shape[0] - same
    counts = torch.tensor([float(n_pos_row.sum()), float(count_negatives(g.row_labels, g.col_labels)) if n else 0.0,
                          float(n), float(nonfinite_rows(batch))], dtype=torch.float64, device=dev)
    n_pos, n_neg, n_rows, bad = (float(v) for v in sum_over_ranks(counts, g.rows))
    if bad:  # a NaN or an infinity anywhere in the global batch: NaN on every rank (the library's rule)
        return finish(torch.full((), float("nan"), dtype=out_dtype, device=dev), None, g) * float("nan")
    zero = (n_pos <= 1 and n_neg <= 1) or (kind == SUPCON and (n_pos == 0 or n_neg == 0))

    # ℓ_a of the local rows (float64 on the fused path), and what its backward needs
    if n == 0:
        ell = torch.zeros(0, dtype=torch.float64, device=dev)
    elif ops is not None:
        xd, Yd = g.x.detach().contiguous(), g.Y.detach().contiguous()
        with torch.no_grad():
            lp, ln = _fused_stats(g, ops, kind, prm, t.detach(), xd, Yd)
            if kind == SUPCON:
                pos_sum = _supcon_positive_sums(g, t, xd, Yd)
                ell = torch.where(n_pos_row > 0, lp - pos_sum / n_pos_row.clamp_min(1).double(),
                                  torch.zeros_like(lp))
            elif kind == MULTI_SIMILARITY:
                ell = lp / prm[0] + ln / prm[1]
            else:
                ok = (n_pos_row > 0) & (n_neg_row > 0)
                ell = torch.where(ok, _softplus(torch.where(ok, lp + ln, torch.zeros_like(lp))),
                                  torch.zeros_like(lp))
    else:
        xh, Yh = normalized(g.x, True), normalized(g.Y, True)
        ell = _streamed_terms(g, kind, prm, t, xh, Yh)

    keep = torch.ones_like(ell, dtype=torch.bool) if kind == MULTI_SIMILARITY else ell > 0
    part = torch.stack([torch.where(keep, ell, torch.zeros_like(ell)).double().sum(),
                        keep.sum().double()]) if n else torch.zeros(2, dtype=torch.float64, device=dev)
    total, count = (float(v) for v in sum_over_ranks(part, g.rows))
    if kind == MULTI_SIMILARITY:
        count = n_rows
    if zero or count == 0:
        return finish(torch.zeros((), dtype=out_dtype, device=dev), None, g)
    value = torch.tensor(total / count, dtype=out_dtype, device=dev)
    if n == 0:
        return finish(value, None, g)
    c = keep.double() / count  # the reducer's weight of each local ℓ_a

    if ops is not None:
        weight = c * torch.sigmoid(lp + ln) if kind == CIRCLE else c
        linear = c / n_pos_row.clamp_min(1).double() if kind == SUPCON else torch.zeros_like(c)
        linear = torch.where(n_pos_row > 0, linear, torch.zeros_like(linear))
        row_stats = torch.stack([lp, ln, weight, linear], 1).float().contiguous()
        share = _AnchorShare.apply(g.x, g.Y, t, dict(g=g, ops=ops, kind=kind, prm=prm, row_stats=row_stats))
        return finish(value, share, g)

    c = c.to(xh.dtype)

    def chunk(r0, xc, Yh, t):
        S = xc @ Yh.T
        pos, neg = _chunk_masks(g, r0, xc.shape[0])
        return (c[r0:r0 + xc.shape[0]] * _row_terms(kind, S, pos, neg, prm, t)).sum()

    share = streamed_sum(chunk, xh, Yh, t)
    return finish(value, share, g)


def supcon(x: Tensor, labels: Optional[Tensor], y: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None,
           *, temperature, process_group) -> Tensor:
    return _anchor_lse(SUPCON, x, labels, y, ref_labels, None, temperature, process_group)


def multi_similarity(x: Tensor, labels: Optional[Tensor], y: Optional[Tensor] = None,
                     ref_labels: Optional[Tensor] = None, *, alpha: float, beta: float, base: float,
                     process_group) -> Tensor:
    alpha, beta, base = _check_ms_params(alpha, beta, base)
    return _anchor_lse(MULTI_SIMILARITY, x, labels, y, ref_labels, (alpha, beta, base), None, process_group)


def circle(x: Tensor, labels: Optional[Tensor], y: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None,
           *, m: float, gamma: float, process_group) -> Tensor:
    m, gamma = float(check_real(m, "m")), float(check_real(gamma, "gamma"))
    return _anchor_lse(CIRCLE, x, labels, y, ref_labels, (m, gamma, 0.0), None, process_group)
