"""Batch softmax / InfoNCE (SPEC 2.1), fused: per-row (and per-column) LSE forward, recompute backward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, _ext
from .. import reference as _reference
from .._validation import TemperatureLike, check_labels, check_temperature, prepare_batch
from ._registry import register_loss_autograd, rows_for_backend

OP = "batch_softmax"
# C++ ops (CPU, CUDA) take `normalize` and normalise inside the kernel; the Triton ops take normalised rows.
_CPP_INPUTS = ("x", "y", "labels", "temperature", "symmetric", "normalize")
_TRITON_INPUTS = ("x", "y", "labels", "temperature", "symmetric")


def _fake_fwd(x, y, labels, temperature, symmetric, normalize=False):
    B = x.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    return x.new_empty((), **f32), x.new_empty((B,), **f32), x.new_empty((B if symmetric else 0,), **f32)


def _fake_bwd(grad_loss, x, y, labels, temperature, symmetric, *rest):
    return torch.empty_like(x), torch.empty_like(y), temperature.new_empty(())


def _register(fwd_qualname: str, bwd_qualname: str, bwd_op, inputs, *, fakes: bool = True) -> None:
    if fakes:  # the Triton module registers its own fakes next to its triton_op definitions
        torch.library.register_fake(fwd_qualname)(_fake_fwd)
        torch.library.register_fake(bwd_qualname)(_fake_bwd)
    register_loss_autograd(
        fwd_qualname, bwd_op, input_names=inputs, grad_inputs=("x", "y", "temperature"),
        saved_outputs=(1, 2), attrs=inputs[4:],
    )


if _ext.C_LOADED:
    _register("flashdml::batch_softmax_fwd", "flashdml::batch_softmax_bwd", torch.ops.flashdml.batch_softmax_bwd,
              _CPP_INPUTS)


def _triton_ops():
    from ..triton_kernels import batch_softmax as _tk  # noqa: F401  (defines flashdml_triton ops)

    if not getattr(_triton_ops, "registered", False):
        _register("flashdml_triton::batch_softmax_fwd", "flashdml_triton::batch_softmax_bwd",
                  torch.ops.flashdml_triton.batch_softmax_bwd, _TRITON_INPUTS, fakes=False)
        _triton_ops.registered = True
    return torch.ops.flashdml_triton.batch_softmax_fwd


def batch_softmax(
    x: Tensor,
    y: Tensor,
    labels: Optional[Tensor] = None,
    *,
    temperature: TemperatureLike = 0.05,
    symmetric: bool = False,
    normalize: bool = True,
) -> Tensor:
    """Batch softmax / InfoNCE loss (SPEC 2.1), the baseline Cross-Example Softmax improves on.

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
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    t = check_temperature(temperature, batch.x.device)

    name = "reference" if batch.x.dtype == torch.float64 else _dispatch.resolve(OP, batch.x.device)
    if name == "reference":
        return _reference.batch_softmax(x, y, labels, temperature=temperature, symmetric=symmetric, normalize=normalize)

    xk, yk, norm_flag = rows_for_backend(name, batch.x, batch.y, normalize)
    if name == "triton":
        loss, _, _ = _triton_ops()(xk, yk, labels, t, symmetric)
    else:  # "cpu" and "cuda": the C++ ops
        loss, _, _ = torch.ops.flashdml.batch_softmax_fwd(xk, yk, labels, t, symmetric, norm_flag)
    return loss
