"""Reference triplet margin loss over every triplet of the batch (docs/spec.md §6.4).

The oracle for ``flashdml.triplet_margin``: pytorch-metric-learning 2.9's ``TripletMarginLoss(margin)`` with its
defaults (``LpDistance`` of L2-normalised rows, ``triplets_per_anchor="all"``, ``AvgNonZeroReducer``). It holds
the B×M distance matrix but never the B·|P|·|N| list of triplets: the triplets are visited one "positive rank"
at a time (the k-th positive of every anchor against all of that anchor's negatives), so memory is O(B·M) and
the work O(B·M·max|P_a|).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._math import compute_dtype, l2_normalize, nonfinite_gives_nan
from .._validation import check_real, prepare_batch
from .similarity import _pair_masks

__all__ = ["triplet_margin"]


def _distance_matrix(batch) -> Tensor:
    """``D_ij = ‖x̂_i − ŷ_j‖`` in the compute dtype, from the differences (not ``|x̂|² + |ŷ|² − 2 x̂·ŷ``): exact 0
    for equal rows, with the zero subgradient there that torch's ``cdist`` (and so pml) uses."""
    dtype = compute_dtype(batch.x.dtype)
    xh = l2_normalize(batch.x.to(dtype))
    yh = xh if batch.self_mode else l2_normalize(batch.y.to(dtype))
    return torch.cdist(xh, yh, compute_mode="donot_use_mm_for_euclid_dist")


@nonfinite_gives_nan
def triplet_margin(
    x: Tensor,
    labels: Optional[Tensor],
    y: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    margin: float = 0.05,
) -> Tensor:
    """Reference triplet margin loss (docs/spec.md §6.4): the mean of the non-zero hinges over every triplet.

    ``L = Σ_T [d_ap − d_an + margin]_+ / #{T : d_ap − d_an + margin > 0}`` over the triplets ``T = (a, p, n)``
    with ``p`` a positive and ``n`` a negative of anchor ``a``, ``d = ‖x̂_a − ŷ_j‖``; 0 (zero gradient) when no
    hinge is positive. Equals pytorch-metric-learning's ``TripletMarginLoss(margin)``; never builds the triplet
    list (one positive rank at a time).

    Args:
        x (Tensor): anchors ``[B, d]``, any floating dtype (computed in float64 for float64, fp32 otherwise).
        labels (Tensor or None): integer ``[B]``; ``None`` is pair mode.
        y (Tensor, optional): references ``[M, d]``; ``None`` (default) is self mode, which drops ``(i, i)``.
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        margin (float): added to ``d_ap − d_an``, finite. Default 0.05.

    Returns:
        Tensor: the 0-dim loss in the compute dtype (fp32, or float64 for float64 input); NaN when ``x`` or ``y``
        holds a NaN or an infinity.

    Raises:
        TypeError: wrong type or dtype, as :func:`flashdml.triplet_margin` (same checks, same messages).
        ValueError: a wrong shape, size, value or device, as :func:`flashdml.triplet_margin`.

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8, dtype=torch.float64, requires_grad=True), torch.arange(16) // 4
        >>> fd.reference.triplet_margin(emb, labels, margin=0.05).dtype
        torch.float64
    """
    margin = check_real(margin, "margin")
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=True)
    D = _distance_matrix(batch)
    pos, neg = _pair_masks(batch)
    n_pos = pos.sum(dim=1)
    # Column of every anchor's k-th positive (stable: positives in column order), k < max |P_a|.
    k_max = int(n_pos.max()) if n_pos.numel() else 0
    pos_cols = torch.sort(pos.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :k_max]
    total = D.sum() * 0  # 0 connected to the inputs: a batch without triplets still has a (zero) gradient
    count = torch.zeros((), dtype=torch.int64, device=D.device)
    for k in range(k_max):
        d_ap = D.gather(1, pos_cols[:, k:k + 1])  # [B, 1]
        hinge = d_ap - D + margin  # [B, M]: row a, column n
        active = neg & (n_pos > k)[:, None] & (hinge > 0)
        total = total + torch.where(active, hinge, torch.zeros_like(hinge)).sum()
        count = count + active.sum()
    return total / count.clamp_min(1).to(total.dtype)
