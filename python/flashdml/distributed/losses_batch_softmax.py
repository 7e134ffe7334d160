"""Batch softmax / InfoNCE (CLIP's loss with ``symmetric=True``) over a process group (docs/spec.md §2.1, §5).

Each rank passes its own pairs (``x`` and ``y`` with the same number of rows); its row ``i`` is global row
``offset + i`` and its positive is global column ``offset + i``. Only ``y`` is gathered. Row terms are local
(one row's LSE over the global columns); the column LSEs of the symmetric half are partial LSEs over this rank's
rows, combined over ranks into ``C_j``. The share differentiated is the local row terms plus, for the column
half, ``Σ_{i local, j} exp(z_ij − C_j) / B − Σ_{i local} z_ii / B`` (``C`` constant), whose gradient is exactly
that of ``mean_j (C_j − z_jj)``. A streamed PyTorch driver (row chunks × gathered columns, recomputed in
backward): the fused kernel takes square batches with the positive on its own diagonal only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import check_bool, check_labels, check_temperature
from ._comm import logsumexp_over_ranks, sum_over_ranks
from ._shard import Global, finish, normalized, prepare_shard, row_chunk, self_pair_mask, setup, streamed_sum

_NEG_INF = float("-inf")


def _in_row_set(g: Global, r0: int, rn: int, diag: Tensor) -> Tensor:
    """Row i's softmax set ``{i} ∪ {j : labels[j] != labels[i]}`` (every column without labels)."""
    if g.row_labels is None:
        return torch.ones_like(diag)
    return (g.row_labels[r0:r0 + rn, None] != g.col_labels[None, :]) | diag


def batch_softmax(x: Tensor, y: Tensor, labels: Optional[Tensor] = None, *, temperature, symmetric: bool,
                  normalize: bool, process_group) -> Tensor:
    batch = prepare_shard(x, y, None, None, require_y=True, require_square=True, pair_mode_default=False)
    if labels is not None:
        if labels.dim() == 1 and labels.shape[0] == 0 and batch.x.shape[0] == 0:
            labels = check_labels(labels.new_zeros(1), "labels", 1, "x", batch.x.device)[:0].long()
        else:
            labels = check_labels(labels, "labels", batch.x.shape[0], "x", batch.x.device).long()
    check_bool(symmetric, "symmetric")
    check_bool(normalize, "normalize")
    t = check_temperature(temperature, batch.x.device)
    # paired rows: set up in cross mode (y gathered), positives on the global diagonal
    g = setup("batch_softmax", batch, process_group, temperature=float(t.detach()), symmetric=symmetric,
              normalize=normalize, labels=labels is not None)
    g.anchors = (t,)
    if labels is not None:
        from ._comm import all_gather_rows
        g.row_labels, g.col_labels = labels, all_gather_rows(labels, g.cols)
    else:
        g.row_labels = g.col_labels = None
    g.self_mode = True  # for self_pair_mask: row i's positive is column offset + i
    xh, Yh = normalized(g.x, normalize), normalized(g.Y, normalize)
    B, M = g.rows.total, Yh.shape[0]

    # pass 1, no graph: row terms, diagonal logits, partial column LSEs
    stats = torch.zeros(2, dtype=torch.float64, device=x.device)  # Σ_i (LSE_i − z_ii), Σ_i z_ii
    col_lse = xh.new_full((M,), _NEG_INF)
    with torch.no_grad():
        step = row_chunk(M)
        for r0 in range(0, xh.shape[0], step):
            z = (xh[r0:r0 + step] @ Yh.T) / t
            diag = self_pair_mask(g, r0, z.shape[0])
            keep = _in_row_set(g, r0, z.shape[0], diag)
            zm = torch.where(keep, z, _NEG_INF)
            zd = z[diag]
            stats += torch.stack([(torch.logsumexp(zm, 1) - zd).double().sum(), zd.double().sum()])
            if symmetric:
                col_lse = torch.logaddexp(col_lse, torch.logsumexp(zm, 0))
    rows_sum, diag_sum = (float(v) for v in sum_over_ranks(stats, g.rows))
    value = rows_sum / B
    if symmetric:
        C = logsumexp_over_ranks(col_lse, g.rows)
        value = 0.5 * value + 0.5 * (float(C.double().sum()) - diag_sum) / B
    else:
        C = None
    half = 0.5 if symmetric else 1.0

    def chunk(r0, xc, Yh, t):
        z = (xc @ Yh.T) / t
        diag = self_pair_mask(g, r0, z.shape[0])
        keep = _in_row_set(g, r0, z.shape[0], diag)
        zd = z[diag]
        share = (torch.logsumexp(torch.where(keep, z, _NEG_INF), 1) - zd).sum() * (half / B)
        if symmetric:
            share = share + (torch.exp(z - C)[keep].sum() - zd.sum()) * (half / B)
        return share

    share = streamed_sum(chunk, xh, Yh, t) if xh.shape[0] else None
    return finish(torch.tensor(value, dtype=xh.dtype, device=x.device), share, g)
