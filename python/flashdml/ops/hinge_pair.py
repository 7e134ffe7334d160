"""Hinge-pair losses, fused: Threshold-Consistent Margin (docs/spec.md §2.3) and margin contrastive (docs/spec.md §2.4).

Both run the same compiled pass (``flashdml::hinge_pair_fwd``): one streaming sweep over tiles of
``S = x̂ ŷᵀ`` that keeps only the hinge sums and the exact int64 counts of the hard positive and negative
pairs, and one recompute sweep backward (``hinge_pair_bwd``) whose gradient per pair is a constant
(``−λ+/#hp``, ``+λ−/#hn`` or 0). Memory is O((B + M)·d); nothing B×M is stored.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import _dispatch
from .. import reference as _reference
from .._math import nan_if_nonfinite
from .._validation import check_real, prepare_batch
from . import registry

TCM_OP = "threshold_consistent_margin"
CONTRASTIVE_OP = "contrastive_margin"

FAMILY = registry.register(registry.Family(
    name="hinge_pair",
    reference={TCM_OP: _reference.threshold_consistent_margin, CONTRASTIVE_OP: _reference.contrastive_margin},
    compiled={"hinge_pair_fwd": registry.LossAutograd("hinge_pair_bwd", grad_inputs=("x", "y"),
                                                      saved_outputs=(2,))},
))


def _fused(ops, batch, pos_margin: float, neg_margin: float, pos_weight: float, neg_weight: float,
           drop_diagonal: bool, strict: bool) -> Tensor:
    # cosine always; self mode passes the same tensor twice (autograd adds the two gradients)
    x = batch.x.contiguous()
    y = x if batch.self_mode else batch.y.contiguous()
    loss = ops.hinge_pair_fwd(x, y, batch.labels, batch.ref_labels, pos_margin, neg_margin, pos_weight, neg_weight,
                              drop_diagonal, strict, True)[0]
    return nan_if_nonfinite(loss, x, y)


def threshold_consistent_margin(
    x: Tensor,
    labels: Optional[Tensor],
    y: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    pos_margin: float = 0.9,
    neg_margin: float = 0.5,
    pos_weight: float = 1.0,
    neg_weight: float = 1.0,
) -> Tensor:
    """Threshold-Consistent Margin loss (Zhang et al., ICLR 2024; docs/spec.md §2.3), cosine similarity always.

    Over ordered pairs of ``S = x̂ ŷᵀ`` (rows L2-normalised; self mode ``y=None`` drops the pairs ``(i, i)``):
    hard positives are positive pairs with ``s <= pos_margin``, hard negatives are negative pairs with
    ``s >= neg_margin`` (both inclusive), and
    ``L = pos_weight · Σ_hardpos (m+ − s) / #hardpos + neg_weight · Σ_hardneg (s − m−) / #hardneg``,
    each term 0 (with a zero gradient) when its set is empty. The counts are exact int64; the margins are
    compared with the fp32 similarities in fp32, as ``S <= pos_margin`` on an fp32 tensor does.

    Args:
        x: queries ``[B, d]`` (fp32, fp16 or bf16; float64 runs on the reference).
        labels: int ``[B]``; ``None`` is pair mode (``labels = ref_labels = arange``: in self mode that leaves no
            positive pair, so only the negative term remains).
        y: references ``[M, d]``, or ``None`` for self mode (``y = x``, ``ref_labels = labels``).
        ref_labels: int ``[M]``, required in cross mode with labels.
        pos_margin, neg_margin: ``m+`` and ``m−``.
        pos_weight, neg_weight: ``λ+`` and ``λ−``.

    Returns a 0-dim fp32 loss; gradients come back in the input dtype. Equals pytorch-metric-learning's
    ``ThresholdConsistentMarginLoss(lambda_plus, lambda_minus, margin_plus, margin_minus)`` in self mode; in
    cross mode it compares ``x`` with ``y`` (pml indexes the query embeddings with the reference indices).

    Example::

        # usually added to a main loss, as in the paper
        loss = main_loss + flashdml.threshold_consistent_margin(emb, labels, pos_margin=0.9, neg_margin=0.5)
        loss.backward()
        # queries against a separate reference set
        loss = flashdml.threshold_consistent_margin(q, q_labels, gallery, gallery_labels)
    """
    pos_margin = check_real(pos_margin, "pos_margin")
    neg_margin = check_real(neg_margin, "neg_margin")
    pos_weight = check_real(pos_weight, "pos_weight")
    neg_weight = check_real(neg_weight, "neg_weight")
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=True)
    ops = _dispatch.select(TCM_OP, batch.x)
    if ops is None:
        return _reference.threshold_consistent_margin(x, labels, y, ref_labels, pos_margin=pos_margin,
                                                      neg_margin=neg_margin, pos_weight=pos_weight,
                                                      neg_weight=neg_weight)
    return _fused(ops, batch, pos_margin, neg_margin, pos_weight, neg_weight, drop_diagonal=batch.self_mode,
                  strict=False)


def contrastive_margin(
    x: Tensor,
    labels: Optional[Tensor],
    y: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    pos_margin: float = 0.75,
    neg_margin: float = 0.6,
) -> Tensor:
    """Margin contrastive loss (docs/spec.md §2.4), the contrastive term of the contextual loss; cosine similarity only.

    ``L = Σ_P [m+ − s]_+ / #{p ∈ P : m+ − s_p > 0} + Σ_N [s − m−]_+ / #{n ∈ N : s_n − m− > 0}``: only pairs with
    a non-zero hinge are counted (strict), each term is 0 (zero gradient) when its count is 0. **Self mode keeps
    the diagonal as a positive pair** (as the contextual paper's code does): for ``pos_margin < 1`` its hinge is
    0 and it changes nothing, which makes this equal to pytorch-metric-learning's
    ``ContrastiveLoss(pos_margin, neg_margin, distance=CosineSimilarity())``; for ``pos_margin >= 1`` the diagonal
    is counted here and not in pml.

    Args:
        x: queries ``[B, d]`` (fp32, fp16 or bf16; float64 runs on the reference).
        labels: int ``[B]``; ``None`` is pair mode (``arange``; row ``i`` of ``x`` matches row ``i`` of ``y``).
        y: references ``[M, d]``, or ``None`` for self mode.
        ref_labels: int ``[M]``, required in cross mode with labels.
        pos_margin, neg_margin: ``m+`` and ``m−`` (compared with the fp32 similarities in fp32).

    Returns a 0-dim fp32 loss; gradients come back in the input dtype. Memory O((B + M)·d).

    Example::

        loss = flashdml.contrastive_margin(emb, labels, pos_margin=0.75, neg_margin=0.6)
        # image-text pairs: row i of img matches row i of txt
        loss = flashdml.contrastive_margin(img, None, txt)
    """
    pos_margin = check_real(pos_margin, "pos_margin")
    neg_margin = check_real(neg_margin, "neg_margin")
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=True)
    ops = _dispatch.select(CONTRASTIVE_OP, batch.x)
    if ops is None:
        return _reference.contrastive_margin(x, labels, y, ref_labels, pos_margin=pos_margin, neg_margin=neg_margin)
    return _fused(ops, batch, pos_margin, neg_margin, 1.0, 1.0, drop_diagonal=False, strict=True)
