"""Batch softmax / InfoNCE (docs/spec.md §2.1), fused: per-row (and per-column) LSE forward, recompute backward."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import _dispatch
from .. import reference as _reference
from .._math import nan_if_nonfinite
from .._validation import TemperatureLike, check_bool, check_labels, check_temperature, prepare_batch
from . import registry

OP = "batch_softmax"
FAMILY = registry.register(registry.Family(
    name="batch_softmax",
    reference={OP: _reference.batch_softmax},
    compiled={"batch_softmax_fwd": registry.LossAutograd(
        "batch_softmax_bwd", grad_inputs=("x", "y", "temperature"), saved_outputs=(1, 2))},
))


def batch_softmax(
    x: Tensor,
    y: Tensor,
    labels: Optional[Tensor] = None,
    *,
    temperature: TemperatureLike = 0.05,
    symmetric: bool = False,
    normalize: bool = True,
) -> Tensor:
    """Batch softmax / InfoNCE loss (docs/spec.md §2.1), the baseline Cross-Example Softmax improves on.

    Row ``i`` of ``S = x̂ ŷᵀ`` is a softmax classification whose positive is column ``i``; columns ``j != i``
    with ``labels[j] == labels[i]`` are false negatives and are removed from row ``i``'s denominator.
    ``L = mean_i (LSE_{j ∈ {i} ∪ neg(i)} z_ij − z_ii)``, ``z = S / temperature``. ``symmetric=True`` averages
    it with the same loss on ``Sᵀ`` (CLIP's loss).

    Args:
        x: queries ``[B, d]`` (fp32, fp16 or bf16; float64 runs on the reference).
        y: references ``[B, d]`` (required; row ``i`` of ``y`` is the positive of row ``i`` of ``x``).
        labels: optional int ``[B]``; ``None`` means every off-diagonal pair is a negative.
        temperature: ``> 0``; a Python float or a 0-dim tensor (``requires_grad=True`` makes it learnable).
        symmetric: also classify columns (image→text and text→image).
        normalize: L2-normalise rows first (cosine similarity); ``False`` uses dot products.

    Returns a 0-dim fp32 loss. Memory is O(B·d): the fused kernels store one LSE per row (and per column) and
    recompute tiles of S in the backward pass. Non-finite inputs give a NaN loss, as in the reference.

    Example::

        loss = flashdml.batch_softmax(image_emb, text_emb, temperature=0.07, symmetric=True)
        loss.backward()
    """
    batch = prepare_batch(x, y, None, None, require_y=True, require_square=True, pair_mode_default=False)
    if labels is not None:
        labels = check_labels(labels, "labels", batch.B, "x", batch.x.device).long()
    check_bool(symmetric, "symmetric")
    check_bool(normalize, "normalize")
    t = check_temperature(temperature, batch.x.device)
    ops = _dispatch.select(OP, batch.x)
    if ops is None:
        return _reference.batch_softmax(x, y, labels, temperature=temperature, symmetric=symmetric, normalize=normalize)
    loss = ops.batch_softmax_fwd(batch.x.contiguous(), batch.y.contiguous(), labels, t, symmetric, normalize)[0]
    return nan_if_nonfinite(loss, batch.x, batch.y)
