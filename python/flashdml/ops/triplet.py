"""Triplet margin loss over every triplet of the batch, fused (docs/spec.md §6.4).

pytorch-metric-learning's ``TripletMarginLoss`` with its defaults, computed by one compiled pass
(``flashdml::triplet_fwd``): the anchor–positive distances first (few per anchor), then one streaming sweep over
the tiles of ``S = x̂ ŷᵀ`` that turns each row into the anchor's distances and tests every negative against the
anchor's positives; and one recompute sweep backward (``triplet_bwd``). Memory O((B + M)·d + Σ_a |P_a|): neither
the B×M distance matrix nor the triplet list is stored. Compiled for the CPU (csrc/cpu/triplet.cpp), CUDA
(csrc/cuda/triplet.cu: the same passes on 64 x 64 S tiles) and Triton (triton_kernels/triplet.py).
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

TRIPLET_OP = "triplet_margin"

FAMILY = registry.register(registry.Family(
    name="triplet",
    reference={TRIPLET_OP: _reference.triplet_margin},
    compiled={"triplet_fwd": registry.LossAutograd("triplet_bwd", grad_inputs=("x", "y"), saved_outputs=(2,))},
    backends=("cpu", "cuda", "triton"),
))


def _dist():
    """The process-group driver (imported on first use: ``torch.distributed`` stays out of plain calls)."""
    from ..distributed import losses_triplet

    return losses_triplet


@shared_doc
def triplet_margin(
    x: Tensor,
    labels: Optional[Tensor],
    y: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    margin: float = 0.05,
    process_group=None,
) -> Tensor:
    """Triplet margin loss over every triplet of the batch (docs/spec.md §6.4), as pytorch-metric-learning's
    ``TripletMarginLoss(margin)`` with its defaults.

    With ``d_ij = ‖x̂_i − ŷ_j‖`` (L2 distance of the normalised rows) and the triplets ``(a, p, n)`` where ``p``
    shares anchor ``a``'s label and ``n`` does not (self mode drops ``(a, a)``):
    ``L = Σ [d_ap − d_an + margin]_+ / #{triplets with d_ap − d_an + margin > 0}`` (the mean of the non-zero
    hinges, pml's ``AvgNonZeroReducer``), 0 with a zero gradient when there is none. The count is an exact int64.
    The fused CPU kernel never builds the triplet list nor the distance matrix: memory O((B + M)·d + Σ_a |P_a|),
    work O(B·M·d + M·Σ_a |P_a|).

    Args:
        x (Tensor): anchors ``[B, d]``, fp32, fp16 or bf16 (float64 runs on the reference, in float64).
        labels (Tensor or None): integer ``[B]`` (positional, no default). ``None`` is pair mode (``arange``: in
            self mode no positive, so 0; in cross mode row ``i``'s one positive is row ``i`` of ``y``).
        y (Tensor, optional): references ``[M, d]``, same dtype and device as ``x`` (pml's
            ``ref_emb``). Default ``None``: self mode (``y = x``, ``ref_labels = labels``).
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        margin (float): added to ``d_ap − d_an``, any finite number. Default 0.05.
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
        >>> loss = fd.triplet_margin(emb, labels, margin=0.05)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
        >>> torch.allclose(loss, fd.reference.triplet_margin(emb, labels), atol=1e-6)
        True
        >>> loss.backward()
        >>> gallery, gallery_labels = torch.randn(32, 8), torch.arange(32) // 8
        >>> cross = fd.triplet_margin(emb, labels, gallery, gallery_labels)   # anchors vs a gallery
    """
    if process_group is not None:  # docs/spec.md §5
        return _dist().triplet_margin(x, labels, y, ref_labels, margin=margin, process_group=process_group)
    margin = check_real(margin, "margin")
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=True)
    ops = _dispatch.select(TRIPLET_OP, batch.x)
    if ops is None:
        return _reference.triplet_margin(x, labels, y, ref_labels, margin=margin)
    xc = batch.x.contiguous()
    yc = xc if batch.self_mode else batch.y.contiguous()
    loss = ops.triplet_fwd(xc, yc, batch.labels, batch.ref_labels, margin, batch.self_mode)[0]
    return nan_if_nonfinite(loss, xc) if batch.self_mode else nan_if_nonfinite(loss, xc, yc)  # (one scan of x)
