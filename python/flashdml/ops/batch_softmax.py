"""Batch softmax / InfoNCE (docs/spec.md §2.1), fused: per-row (and per-column) LSE forward, recompute backward."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import _dispatch
from .. import reference as _reference
from .._docs import shared_doc
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


def _dist():
    """The process-group drivers (imported on first use: ``torch.distributed`` stays out of plain calls)."""
    from ..distributed import losses_batch_softmax

    return losses_batch_softmax


@shared_doc
def batch_softmax(
    x: Tensor,
    y: Tensor,
    labels: Optional[Tensor] = None,
    *,
    temperature: TemperatureLike = 0.05,
    symmetric: bool = False,
    normalize: bool = True,
    process_group=None,
) -> Tensor:
    """Batch softmax / InfoNCE loss (docs/spec.md §2.1), the baseline Cross-Example Softmax improves on.

    Row ``i`` of ``S = x̂ ŷᵀ`` is a softmax classification whose positive is column ``i``:
    ``L = mean_i (LSE_{j ∈ {i} ∪ neg(i)} z_ij − z_ii)`` with ``z = S / temperature``, where ``neg(i)`` is every
    column ``j != i`` whose label differs from ``labels[i]`` (same-label columns are false negatives and leave
    row ``i``'s denominator). ``symmetric=True`` averages it with the same loss on ``Sᵀ`` (CLIP's loss). Memory is
    O(B·d): the fused kernels keep one LSE per row (and per column) and recompute tiles of S in the backward.

    Args:
        x (Tensor): queries ``[B, d]``, fp32, fp16 or bf16 (float64 runs on the reference, in float64).
        y (Tensor): references ``[B, d]``, required, same dtype and device as ``x``; row ``i`` of ``y`` is the
            positive of row ``i`` of ``x``.
        labels (Tensor, optional): integer ``[B]``, the label of pair ``i`` (shared by ``x[i]`` and ``y[i]``).
            Default ``None``: every off-diagonal pair is a negative.
        temperature (float or Tensor): ``τ > 0`` (at least 1e-12, finite); a Python number or a 0-dim floating
            tensor, learnable when it has ``requires_grad=True``. Default 0.05.
        symmetric (bool): also classify the columns (image→text and text→image). Default ``False``.
        normalize (bool): L2-normalise the rows first (cosine similarity); ``False`` uses the plain dot
            products. Default ``True``.
        {{process_group_loss_arg}}

    Returns:
        Tensor: the 0-dim fp32 loss (float64 for float64 input); gradients come back in the inputs' dtype. A NaN
        or infinity in ``x`` or ``y`` makes it NaN.

    Raises:
        TypeError: ``x``, ``y`` or ``labels`` that is not a tensor; embeddings that are not fp16, bf16, fp32 or
            fp64; ``x`` and ``y`` of different dtypes; non-integer ``labels``; a temperature that is neither a
            number nor a floating tensor; ``symmetric`` or ``normalize`` that is not a bool.
        ValueError: ``y`` missing; embeddings that are not 2-D or are empty; different ``d`` or row counts
            (``B != M``); ``labels`` that is not 1-D or not of length B; tensors on different devices; a
            temperature that is not 0-dim, not finite, ``<= 0`` or below 1e-12.
        RuntimeError: an explicitly selected backend that cannot run the call; ``create_graph=True`` through a
            fused backward.

    Example:
        >>> import torch, flashdml as fd
        >>> img = torch.randn(8, 16, requires_grad=True)
        >>> txt = torch.randn(8, 16)
        >>> loss = fd.batch_softmax(img, txt, temperature=0.07, symmetric=True)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
        >>> torch.allclose(loss, fd.reference.batch_softmax(img, txt, temperature=0.07, symmetric=True))
        True
        >>> loss.backward()
        >>> img.grad.shape
        torch.Size([8, 16])
    """
    if process_group is not None:  # docs/spec.md §5
        return _dist().batch_softmax(x, y, labels, temperature=temperature, symmetric=symmetric,
                                     normalize=normalize, process_group=process_group)
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
