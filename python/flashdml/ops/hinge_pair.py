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
from .._docs import shared_doc
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


def _dist():
    """The process-group drivers (imported on first use: ``torch.distributed`` stays out of plain calls)."""
    from ..distributed import losses_hinge

    return losses_hinge


def _fused(ops, batch, pos_margin: float, neg_margin: float, pos_weight: float, neg_weight: float,
           drop_diagonal: bool, strict: bool) -> Tensor:
    # cosine always; self mode passes the same tensor twice (autograd adds the two gradients)
    x = batch.x.contiguous()
    y = x if batch.self_mode else batch.y.contiguous()
    loss = ops.hinge_pair_fwd(x, y, batch.labels, batch.ref_labels, pos_margin, neg_margin, pos_weight, neg_weight,
                              drop_diagonal, strict, True)[0]
    return nan_if_nonfinite(loss, x, y)


@shared_doc
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
    process_group=None,
) -> Tensor:
    """Threshold-Consistent Margin loss (Zhang et al., ICLR 2024; docs/spec.md §2.3), cosine similarity always.

    Over the ordered pairs of ``S = x̂ ŷᵀ`` (self mode drops ``(i, i)``), hard positives are positive pairs with
    ``s <= pos_margin`` and hard negatives are negative pairs with ``s >= neg_margin`` (both inclusive):
    ``L = pos_weight · Σ_hardpos (m+ − s) / #hardpos + neg_weight · Σ_hardneg (s − m−) / #hardneg``, each term 0
    (zero gradient) when its set is empty. Counts are exact int64; the margins are compared with the fp32
    similarities. The fused kernels stream S: memory O((B + M)·d). Equals pytorch-metric-learning's
    ``ThresholdConsistentMarginLoss(lambda_plus, lambda_minus, margin_plus, margin_minus)`` in self mode; in
    cross mode it compares ``x`` with ``y`` (pml indexes the query embeddings with the reference indices).

    Args:
        x (Tensor): queries ``[B, d]``, fp32, fp16 or bf16 (float64 runs on the reference, in float64).
        labels (Tensor or None): integer ``[B]`` (positional, no default). ``None`` is pair mode (``labels =
            ref_labels = arange``; in self mode that leaves no positive pair, so only the negative term remains).
        y (Tensor, optional): references ``[M, d]``, same dtype and device as ``x``. Default ``None``: self mode
            (``y = x``, ``ref_labels = labels``).
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        pos_margin (float): ``m+``, any finite number (cosines lie in [-1, 1]). Default 0.9.
        neg_margin (float): ``m−``, any finite number. Default 0.5.
        pos_weight (float): ``λ+``, the weight of the positive term, finite. Default 1.0.
        neg_weight (float): ``λ−``, the weight of the negative term, finite. Default 1.0.
        {{process_group_loss_arg}}

    Returns:
        Tensor: the 0-dim fp32 loss (float64 for float64 input); gradients come back in the input dtype. NaN when
        ``x`` or ``y`` holds a NaN or an infinity.

    Raises:
        TypeError: ``x``, ``y``, ``labels`` or ``ref_labels`` that is not a tensor; embeddings that are not fp16,
            bf16, fp32 or fp64; ``x`` and ``y`` of different dtypes; non-integer labels; a margin or weight that
            is not a real number.
        ValueError: embeddings that are not 2-D, are empty or differ in ``d``; labels that are not 1-D or do not
            match their rows; ``ref_labels`` without ``y`` or without ``labels``; ``y`` and ``labels`` without
            ``ref_labels``; tensors on different devices; a NaN or infinite margin or weight.
        RuntimeError: an explicitly selected backend that cannot run the call; ``create_graph=True`` through a
            fused backward.

    Example:
        >>> import torch, flashdml as fd
        >>> emb = torch.randn(16, 8, requires_grad=True)
        >>> labels = torch.arange(16) // 4
        >>> tcm = fd.threshold_consistent_margin(emb, labels, pos_margin=0.9, neg_margin=0.5)
        >>> tcm.shape, tcm.dtype
        (torch.Size([]), torch.float32)
        >>> torch.allclose(tcm, fd.reference.threshold_consistent_margin(emb, labels))
        True
        >>> (fd.ntxent(emb, labels) + tcm).backward()          # usually added to a main loss, as in the paper
        >>> gallery, gallery_labels = torch.randn(32, 8), torch.arange(32) // 8
        >>> cross = fd.threshold_consistent_margin(emb, labels, gallery, gallery_labels)   # queries vs a gallery
    """
    if process_group is not None:  # docs/spec.md §5
        return _dist().threshold_consistent_margin(x, labels, y, ref_labels, pos_margin=pos_margin,
                                                   neg_margin=neg_margin, pos_weight=pos_weight,
                                                   neg_weight=neg_weight, process_group=process_group)
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


@shared_doc
def contrastive_margin(
    x: Tensor,
    labels: Optional[Tensor],
    y: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    pos_margin: float = 0.75,
    neg_margin: float = 0.6,
    process_group=None,
) -> Tensor:
    """Margin contrastive loss (docs/spec.md §2.4), the contrastive term of the contextual loss; cosine similarity only.

    ``L = Σ_P [m+ − s]_+ / #{p ∈ P : m+ − s_p > 0} + Σ_N [s − m−]_+ / #{n ∈ N : s_n − m− > 0}`` over
    ``S = x̂ ŷᵀ``: only pairs with a non-zero hinge are counted (strict), and a term is 0 (zero gradient) when its
    count is 0. Self mode keeps the diagonal as a positive pair (as the contextual paper's code does): for
    ``pos_margin < 1`` its hinge is 0, so the loss equals pytorch-metric-learning's
    ``ContrastiveLoss(pos_margin, neg_margin, distance=CosineSimilarity())``; for ``pos_margin >= 1`` the
    diagonal counts here and not in pml. Memory O((B + M)·d).

    Args:
        x (Tensor): queries ``[B, d]``, fp32, fp16 or bf16 (float64 runs on the reference, in float64).
        labels (Tensor or None): integer ``[B]`` (positional, no default). ``None`` is pair mode (``arange``: row
            ``i`` of ``x`` matches row ``i`` of ``y`` only).
        y (Tensor, optional): references ``[M, d]``, same dtype and device as ``x``. Default ``None``: self mode.
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        pos_margin (float): ``m+``, finite, compared with the fp32 similarities. Default 0.75.
        neg_margin (float): ``m−``, finite, compared with the fp32 similarities. Default 0.6.
        {{process_group_loss_arg}}

    Returns:
        Tensor: the 0-dim fp32 loss (float64 for float64 input); gradients come back in the input dtype. NaN when
        ``x`` or ``y`` holds a NaN or an infinity.

    Raises:
        TypeError: ``x``, ``y``, ``labels`` or ``ref_labels`` that is not a tensor; embeddings that are not fp16,
            bf16, fp32 or fp64; ``x`` and ``y`` of different dtypes; non-integer labels; a margin that is not a
            real number.
        ValueError: embeddings that are not 2-D, are empty or differ in ``d``; labels that are not 1-D or do not
            match their rows; ``ref_labels`` without ``y`` or without ``labels``; ``y`` and ``labels`` without
            ``ref_labels``; tensors on different devices; a NaN or infinite margin.
        RuntimeError: an explicitly selected backend that cannot run the call; ``create_graph=True`` through a
            fused backward.

    Example:
        >>> import torch, flashdml as fd
        >>> emb = torch.randn(16, 8, requires_grad=True)
        >>> labels = torch.arange(16) // 4
        >>> loss = fd.contrastive_margin(emb, labels, pos_margin=0.75, neg_margin=0.6)
        >>> torch.allclose(loss, fd.reference.contrastive_margin(emb, labels))
        True
        >>> loss.backward()
        >>> img, txt = torch.randn(8, 8), torch.randn(8, 8)
        >>> pairs = fd.contrastive_margin(img, None, txt)      # image-text pairs: row i matches row i
        >>> pairs.shape
        torch.Size([])
    """
    if process_group is not None:  # docs/spec.md §5
        return _dist().contrastive_margin(x, labels, y, ref_labels, pos_margin=pos_margin, neg_margin=neg_margin,
                                          process_group=process_group)
    pos_margin = check_real(pos_margin, "pos_margin")
    neg_margin = check_real(neg_margin, "neg_margin")
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=True)
    ops = _dispatch.select(CONTRASTIVE_OP, batch.x)
    if ops is None:
        return _reference.contrastive_margin(x, labels, y, ref_labels, pos_margin=pos_margin, neg_margin=neg_margin)
    return _fused(ops, batch, pos_margin, neg_margin, 1.0, 1.0, drop_diagonal=False, strict=True)
