"""Cross-Example Softmax (with and without ``top_k``) and NT-Xent over a process group (docs/spec.md §2.1b, §2.2, §5).

Each rank streams its rows × the gathered columns in row chunks (recomputed in backward), so its work is
O(B_local · B_global · d) and its memory O(B_global · d + chunk · B_global).

* NT-Xent: every partition is one row's, so it is local; only ``|P|`` (from the labels) and the loss sum are
  combined over ranks.
* XE: one partition ``Λ`` for the whole global batch. A first pass (no graph) gives this rank's negative LSE
  and positive logits; ``Λ``, ``|P|`` and ``Σ sigmoid(Λ − z_p)`` are combined over ranks; the differentiated
  share is ``Σ_p softplus(Λ − z_p) / |P| + c · Σ_n exp(z_n − Λ)`` with ``Λ`` and ``c = Σ_p σ_p / |P|`` constants,
  whose gradient is exactly the global one (the second term carries ``∂L/∂Λ · ∂Λ/∂z_n``).
* XE with ``top_k``: each rank keeps its k hardest negatives (value of S, then the lower global flat index),
  the candidates (k per rank) are all-gathered and merged in the same order, and the loss runs on the merged k
  and the positives as above.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import check_bool, check_positive_int, check_temperature
from ..ops.selection import count_negatives
from . import _fused
from ._comm import logsumexp_over_ranks, sum_over_ranks, topk_over_ranks
from ._shard import Global, finish, normalized, prepare_shard, row_chunk, self_pair_mask, setup, streamed_sum

_NEG_INF = float("-inf")


def _masks(g: Global, r0: int, rn: int):
    """``(positive, negative)`` ``[rn, M]`` masks of a row chunk (self mode: ``(i, i)`` is neither)."""
    same = g.row_labels[r0:r0 + rn, None] == g.col_labels[None, :]
    diag = self_pair_mask(g, r0, rn)
    return (same if diag is None else same & ~diag), ~same


def _positive_count(g: Global) -> int:
    n, m = g.row_labels.shape[0], g.col_labels.shape[0]
    if n == 0:
        return 0
    return n * m - count_negatives(g.row_labels, g.col_labels) - (n if g.self_mode else 0)


def _prepare(op, x, y, labels, ref_labels, temperature, normalize, group, fused_op=None, **params):
    """Validate, set up, and pick the path: the compiled ops (every rank the same: the backend is in the call's
    fingerprint) or ``None`` for the streamed PyTorch path (float64, or no compiled backend)."""
    batch = prepare_shard(x, y, labels, ref_labels, pair_mode_default=True)
    check_bool(normalize, "normalize")
    t = check_temperature(temperature, batch.x.device)
    ops = _fused.fused_ops(fused_op, batch.x) if fused_op else None
    g = setup(op, batch, group, temperature=float(t.detach()), normalize=normalize, fused=ops is not None,
              **params)
    g.anchors = (t,)
    if ops is not None:
        return g, t, ops, None, None
    return g, t, None, normalized(g.x, normalize), normalized(g.Y, normalize)


def ntxent(x: Tensor, labels: Optional[Tensor], y: Optional[Tensor], ref_labels: Optional[Tensor], *,
           temperature, normalize: bool, process_group) -> Tensor:
    g, t, ops, xh, Yh = _prepare("ntxent", x, y, labels, ref_labels, temperature, normalize, process_group,
                                 fused_op="ntxent")
    n_pos = float(sum_over_ranks(torch.tensor([_positive_count(g)], dtype=torch.float64, device=x.device),
                                 g.rows).item())
    if ops is not None:
        return _fused.xent(g, ops, t, normalize, False, n_pos, *_positive_pairs(g))
    if xh.shape[0] == 0 or n_pos == 0:
        share = None
    else:
        def chunk(r0, xc, Yh, t):
            z = (xc @ Yh.T) / t
            pos, neg = _masks(g, r0, xc.shape[0])
            has_neg = neg.any(1)
            # rows without a negative contribute softplus(-inf) = 0: keep their LSE finite, then mask them out
            lse = torch.logsumexp(torch.where(neg | ~has_neg[:, None], z, _NEG_INF), 1)
            terms = F.softplus(lse[:, None] - z)[pos & has_neg[:, None]]
            return terms.sum() / n_pos
        share = streamed_sum(chunk, xh, Yh, t)
    local = share.detach().reshape(1) if share is not None else xh.new_zeros(1)
    value = sum_over_ranks(local, g.rows)[0]
    return finish(value, share, g)


def _local_statistics(g: Global, xh: Tensor, Yh: Tensor, t: Tensor):
    """No graph: this rank's negative LSE (``-inf`` without negatives) and its positive logits."""
    lse = xh.new_full((), _NEG_INF)
    z_pos = []
    with torch.no_grad():
        step = row_chunk(Yh.shape[0])
        for r0 in range(0, xh.shape[0], step):
            z = (xh[r0:r0 + step] @ Yh.T) / t
            pos, neg = _masks(g, r0, z.shape[0])
            lse = torch.logaddexp(lse, torch.logsumexp(torch.where(neg, z, _NEG_INF).reshape(-1), 0))
            z_pos.append(z[pos])
    return lse, (torch.cat(z_pos) if z_pos else xh.new_zeros(0))


def _xe_loss(g: Global, lam: Tensor, z_pos_local: Tensor, n_pos: float):
    """``(L, c)``: the global loss and ``c = Σ_p sigmoid(Λ − z_p) / |P|`` (float64 sums in rank order)."""
    u = (lam - z_pos_local).double()
    part = torch.stack([F.softplus(u).sum(), torch.sigmoid(u).sum()]) if u.numel() else u.new_zeros(2)
    total = sum_over_ranks(part, g.rows)
    return total[0] / n_pos, total[1] / n_pos


def cross_example_softmax(x: Tensor, y: Optional[Tensor], labels: Optional[Tensor], ref_labels: Optional[Tensor],
                          *, temperature, top_k: Optional[int], normalize: bool, process_group) -> Tensor:
    if top_k is not None:
        top_k = check_positive_int(top_k, "top_k")
    g, t, ops, xh, Yh = _prepare("cross_example_softmax", x, y, labels, ref_labels, temperature, normalize,
                                 process_group, fused_op="cross_example_softmax" if top_k is None else None,
                                 top_k=-1 if top_k is None else top_k)
    dev = x.device
    counts = torch.tensor([_positive_count(g), count_negatives(g.row_labels, g.col_labels)
                           if g.row_labels.numel() else 0], dtype=torch.float64, device=dev)
    n_pos, n_neg = (float(v) for v in sum_over_ranks(counts, g.rows))
    if ops is not None:
        return _fused.xent(g, ops, t, normalize, True, n_pos, *_positive_pairs(g))
    out_dtype = xh.dtype
    if top_k is not None and top_k < n_neg and n_pos > 0:
        return _top_k(g, t, xh, Yh, top_k, n_pos)
    lam_local, z_pos = _local_statistics(g, xh, Yh, t)
    lam = logsumexp_over_ranks(lam_local.reshape(1), g.rows)[0]
    if n_pos == 0 or not bool(torch.isfinite(lam)):
        return finish(xh.new_zeros((), dtype=out_dtype), None, g)
    loss, c = _xe_loss(g, lam, z_pos, n_pos)
    lam_c, c_c = lam.detach().to(out_dtype), c.to(out_dtype)

    def chunk(r0, xc, Yh, t):
        z = (xc @ Yh.T) / t
        pos, neg = _masks(g, r0, xc.shape[0])
        return F.softplus(lam_c - z[pos]).sum() / n_pos + c_c * torch.exp(z[neg] - lam_c).sum()

    share = streamed_sum(chunk, xh, Yh, t) if xh.shape[0] else None
    return finish(loss.to(out_dtype), share, g)


# ------------------------------------------------------------------------------------------------- top_k
def _order(values: Tensor, flat: Tensor) -> Tensor:
    """Indices sorting by value decreasing, ties by lower flat index (two stable sorts)."""
    by_flat = torch.sort(flat, stable=True).indices
    by_value = torch.sort(values[by_flat], descending=True, stable=True).indices
    return by_flat[by_value]


def _local_candidates(g: Global, xh: Tensor, Yh: Tensor, k: int):
    """This rank's k hardest negatives (values of S, global flat indices), merged chunk by chunk."""
    M = Yh.shape[0]
    vals, flat = xh.new_zeros(0), torch.zeros(0, dtype=torch.int64, device=xh.device)
    with torch.no_grad():
        step = row_chunk(M)
        for r0 in range(0, xh.shape[0], step):
            s = xh[r0:r0 + step] @ Yh.T
            _, neg = _masks(g, r0, s.shape[0])
            idx = neg.reshape(-1).nonzero().squeeze(1)
            v = s.reshape(-1)[idx]
            f = (idx // M + g.rows.offset + r0) * M + idx % M
            keep = _order(v, f)[:k]  # within the chunk flat order is idx order, so this is exact
            vals, flat = torch.cat([vals, v[keep]]), torch.cat([flat, f[keep]])
            keep = _order(vals, flat)[:k]
            vals, flat = vals[keep], flat[keep]
    return vals, flat


def _top_k(g: Global, t: Tensor, xh: Tensor, Yh: Tensor, k: int, n_pos: float) -> Tensor:
    M = Yh.shape[0]
    vals, flat = _local_candidates(g, xh, Yh, k)
    _, chosen = topk_over_ranks(vals, flat, k, g.rows)  # the one-process tie order, identical on every rank
    lo, hi = g.rows.offset * M, (g.rows.offset + g.rows.local) * M
    mine = chosen[(chosen >= lo) & (chosen < hi)]
    neg_rows, neg_cols = mine // M - g.rows.offset, mine % M
    # the logits of this rank's selected negatives and positives, with gradient (O((k + |P|)·d) per rank)
    z_neg = (xh[neg_rows] * Yh[neg_cols]).sum(-1) / t
    pos_rows, pos_cols = _positive_pairs(g)
    z_pos = (xh[pos_rows] * Yh[pos_cols]).sum(-1) / t
    lam_local = torch.logsumexp(z_neg.detach(), 0) if z_neg.numel() else xh.new_full((), _NEG_INF)
    lam = logsumexp_over_ranks(lam_local.reshape(1), g.rows)[0]
    loss, c = _xe_loss(g, lam, z_pos.detach(), n_pos)
    out_dtype = xh.dtype
    lam_c, c_c = lam.to(out_dtype), c.to(out_dtype)
    share = F.softplus(lam_c - z_pos).sum() / n_pos + c_c * torch.exp(z_neg - lam_c).sum()
    return finish(loss.to(out_dtype), share if xh.shape[0] else None, g)


def _positive_pairs(g: Global):
    """(local row, global column) of this rank's positive pairs, in row-major order, without an [n, M] mask."""
    from ..ops.selection import positive_pairs

    rows, cols = positive_pairs(g.row_labels, g.col_labels, False)
    if g.self_mode:
        keep = cols != rows + g.rows.offset
        rows, cols = rows[keep], cols[keep]
    return rows, cols
