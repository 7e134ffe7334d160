"""Cross-example softmax (docs/spec.md §2.2) and NT-Xent (docs/spec.md §2.1b), fused: the same kernel family with one global
negative partition (XE) or one per row (NT-Xent)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .. import reference as _reference
from .._docs import shared_doc
from .._math import all_finite, nan_if_nonfinite, nan_loss
from .._validation import TemperatureLike, check_bool, check_positive_int, check_temperature, prepare_batch
from . import registry

FAMILY = registry.register(registry.Family(
    name="xent",
    reference={"cross_example_softmax": _reference.cross_example_softmax, "ntxent": _reference.ntxent},
    compiled={"xent_fwd": registry.LossAutograd("xent_bwd", grad_inputs=("x", "y", "temperature"),
                                                saved_outputs=(1, 2))},
))


def _dist():
    """The process-group drivers (imported on first use: ``torch.distributed`` stays out of plain calls)."""
    from ..distributed import losses_xent

    return losses_xent


def _validated(x, y, labels, ref_labels, temperature, normalize):
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=True)
    check_bool(normalize, "normalize")
    return batch, check_temperature(temperature, batch.x.device)


def _run_fused(op: str, x, y, labels, ref_labels, temperature, normalize, global_partition: bool):
    """The fused loss, or None when the reference must run."""
    batch, t = _validated(x, y, labels, ref_labels, temperature, normalize)
    ops = _dispatch.select(op, batch.x)
    if ops is None:
        return None
    xc = batch.x.contiguous()
    yc = xc if batch.self_mode else batch.y.contiguous()
    loss = ops.xent_fwd(xc, yc, batch.labels, batch.ref_labels, t, global_partition, batch.self_mode, normalize)[0]
    return nan_if_nonfinite(loss, batch.x, batch.y)


def _run_fused_top_k(x, y, labels, ref_labels, temperature, normalize, top_k: int):
    """Cross-Example Negative Mining, fused (None: the reference must run).

    Forward: the hardest-negatives kernel selects the k hardest negatives of the batch (one streaming pass over
    S, memory O((B + M)·d + k)); then ``Λ = LSE`` of their logits and the positives' ``softplus(Λ − z_p)``
    need only the O(k + |P|) selected / positive pairs, recomputed as gathered dot products. Backward: plain
    autograd over those pairs — gradient into the k selected negatives, the positives and the temperature only,
    O((k + |P|)·d), no second pass over S. ``top_k >= |N|`` (and a batch without positives or negatives) runs
    plain XE, which it then equals."""
    from .selection import count_negatives, pair_similarity, positive_pairs, selected_negatives

    batch, t = _validated(x, y, labels, ref_labels, temperature, normalize)
    if torch.compiler.is_compiling():  # the same loss without host syncs or branches on data (ops/traced.py)
        name = _dispatch.resolve("cross_example_softmax_top_k", batch.x.device, batch.x.dtype)
        if name == "reference":
            return None
        from .traced import cross_example_softmax_top_k

        return cross_example_softmax_top_k(batch, t, top_k, normalize, name)
    ops = _dispatch.select("cross_example_softmax_top_k", batch.x)  # the selection family's ops
    if ops is None:
        return None
    if not all_finite(batch.x, batch.y):  # the non-finite rule: NaN, not a selection error
        return nan_loss(batch.x, batch.y)
    rows_p, cols_p = positive_pairs(batch.labels, batch.ref_labels, batch.self_mode)
    if top_k >= count_negatives(batch.labels, batch.ref_labels) or rows_p.numel() == 0:
        return _run_fused("cross_example_softmax", x, y, labels, ref_labels, temperature, normalize, True)
    with torch.no_grad():  # the kernel selects; the logits are recomputed below, with the positives, in one gather
        _, rows_n, cols_n = selected_negatives(ops, batch, top_k, normalize)
    yp = batch.x if batch.self_mode else batch.y
    z = pair_similarity(batch.x, yp, torch.cat([rows_n, rows_p]), torch.cat([cols_n, cols_p]), normalize) / t
    lam = torch.logsumexp(z[:top_k], 0)
    z_pos = z[top_k:]
    return torch.nn.functional.softplus(lam - z_pos).mean()


@shared_doc
def cross_example_softmax(
    x: Tensor,
    y: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    temperature: TemperatureLike = 0.05,
    top_k: Optional[int] = None,
    normalize: bool = True,
    process_group=None,
) -> Tensor:
    """Cross-Example Softmax loss (Veit & Wilber; docs/spec.md §2.2): one partition function for the whole batch.

    Every positive pair competes against the same batch-wide pool of negatives:
    ``L = mean_{p∈P} softplus(Λ − z_p)``, ``Λ = LSE_{n∈N} z_n``, ``z = S / temperature``, ``S = x̂ ŷᵀ``. Because a
    positive must beat the negatives of every row, the scores become comparable across queries (globally
    calibrated). ``top_k=k`` is Cross-Example Negative Mining: N is replaced by the k hardest negatives of the
    whole batch (fused: one selection pass over S, then O((k + |P|)·d) work; only the selected negatives and the
    positives get a gradient). The fused kernels stream S in tiles: memory O((B + M)·d + |P|).

    Args:
        x (Tensor): queries ``[B, d]``, fp32, fp16 or bf16 (float64 runs on the reference, in float64).
        y (Tensor, optional): references ``[M, d]``, same dtype and device as ``x``. Default ``None``: self mode
            (``y = x``; the pairs ``(i, i)`` are dropped).
        labels (Tensor, optional): integer ``[B]``. Default ``None``: pair mode (``labels = ref_labels =
            arange``, row ``i`` matches column ``i`` only; in self mode that leaves no positive, so the loss is 0).
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels, not allowed in self
            mode (there ``ref_labels = labels``).
        temperature (float or Tensor): ``τ > 0`` (at least 1e-12, finite); a Python number or a 0-dim floating
            tensor, learnable when it has ``requires_grad=True``. Default 0.05.
        top_k (int, optional): ``>= 1``, the number of hardest negatives of the batch kept in ``Λ``;
            ``top_k >= |N|`` is plain XE. Default ``None``: every negative.
        normalize (bool): cosine similarity (default ``True``) or plain dot products (``False``).
        {{process_group_loss_arg}}

    Returns:
        Tensor: the 0-dim fp32 loss (float64 for float64 input); 0 with a zero gradient when the batch has no
        positive or no negative pair; NaN when ``x`` or ``y`` holds a NaN or an infinity.

    Raises:
        TypeError: ``x``, ``y``, ``labels`` or ``ref_labels`` that is not a tensor; embeddings that are not fp16,
            bf16, fp32 or fp64; ``x`` and ``y`` of different dtypes; non-integer labels; a temperature that is
            neither a number nor a floating tensor; a non-integer ``top_k``; ``normalize`` not a bool.
        ValueError: embeddings that are not 2-D, are empty or differ in ``d``; labels that are not 1-D or do not
            match their rows; ``ref_labels`` without ``y`` or without ``labels``; ``y`` and ``labels`` without
            ``ref_labels``; tensors on different devices; a temperature that is not 0-dim, not finite, ``<= 0``
            or below 1e-12; ``top_k < 1``.
        RuntimeError: an explicitly selected backend that cannot run the call; ``create_graph=True`` through a
            fused backward.

    Example:
        >>> import torch, flashdml as fd
        >>> emb = torch.randn(16, 8, requires_grad=True)
        >>> labels = torch.arange(16) // 4                       # 4 samples per class
        >>> loss = fd.cross_example_softmax(emb, labels=labels, temperature=0.05)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
        >>> torch.allclose(loss, fd.reference.cross_example_softmax(emb, labels=labels, temperature=0.05))
        True
        >>> mined = fd.cross_example_softmax(emb, labels=labels, top_k=16)    # the 16 hardest negatives
        >>> img, txt = torch.randn(8, 8), torch.randn(8, 8)
        >>> pairs = fd.cross_example_softmax(img, txt)           # pair mode: row i of img matches row i of txt
        >>> loss.backward()
    """
    if process_group is not None:  # docs/spec.md §5
        return _dist().cross_example_softmax(x, y, labels, ref_labels, temperature=temperature, top_k=top_k,
                                             normalize=normalize, process_group=process_group)
    if top_k is not None:
        top_k = check_positive_int(top_k, "top_k")
        loss = _run_fused_top_k(x, y, labels, ref_labels, temperature, normalize, top_k)
    else:
        loss = _run_fused("cross_example_softmax", x, y, labels, ref_labels, temperature, normalize, True)
    if loss is not None:
        return loss
    return _reference.cross_example_softmax(x, y, labels, ref_labels, temperature=temperature, top_k=top_k,
                                            normalize=normalize)


@shared_doc
def ntxent(
    x: Tensor,
    labels: Optional[Tensor],
    y: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    temperature: TemperatureLike = 0.07,
    normalize: bool = True,
    process_group=None,
) -> Tensor:
    """NT-Xent loss with labels (docs/spec.md §2.1b), pytorch-metric-learning's ``NTXentLoss``, fused.

    Every positive pair ``(a, p)`` competes against the negatives of its own anchor's row:
    ``L = mean_{(a,p)∈P} softplus(LSE_{n∈N(a)} z_an − z_ap)``, ``z = S / temperature``, ``S = x̂ ŷᵀ``. A
    positive whose row has no negative contributes 0. Equals ``NTXentLoss(temperature)`` on self-mode batches,
    without its |P|×|N| buffer: memory O((B + M)·d + |P|).

    Args:
        x (Tensor): queries ``[B, d]``, fp32, fp16 or bf16 (float64 runs on the reference, in float64).
        labels (Tensor or None): integer ``[B]`` (positional, no default). ``None`` is pair mode (``labels =
            ref_labels = arange``; in self mode that leaves no positive pair, so the loss is 0).
        y (Tensor, optional): references ``[M, d]``, same dtype and device as ``x``. Default ``None``: self mode
            (``y = x``; the pairs ``(i, i)`` are dropped).
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels, not allowed in self
            mode.
        temperature (float or Tensor): ``τ > 0`` (at least 1e-12, finite); a Python number or a 0-dim floating
            tensor, learnable when it has ``requires_grad=True``. Default 0.07.
        normalize (bool): cosine similarity (default ``True``) or plain dot products (``False``).
        {{process_group_loss_arg}}

    Returns:
        Tensor: the 0-dim fp32 loss (float64 for float64 input); 0 with a zero gradient without positive pairs;
        NaN when ``x`` or ``y`` holds a NaN or an infinity.

    Raises:
        TypeError: ``x``, ``y``, ``labels`` or ``ref_labels`` that is not a tensor; embeddings that are not fp16,
            bf16, fp32 or fp64; ``x`` and ``y`` of different dtypes; non-integer labels; a temperature that is
            neither a number nor a floating tensor; ``normalize`` not a bool.
        ValueError: embeddings that are not 2-D, are empty or differ in ``d``; labels that are not 1-D or do not
            match their rows; ``ref_labels`` without ``y`` or without ``labels``; ``y`` and ``labels`` without
            ``ref_labels``; tensors on different devices; a temperature that is not 0-dim, not finite, ``<= 0``
            or below 1e-12.
        RuntimeError: an explicitly selected backend that cannot run the call; ``create_graph=True`` through a
            fused backward.

    Example:
        >>> import torch, flashdml as fd
        >>> emb = torch.randn(16, 8, requires_grad=True)
        >>> labels = torch.arange(16) // 4
        >>> loss = fd.ntxent(emb, labels, temperature=0.07)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
        >>> torch.allclose(loss, fd.reference.ntxent(emb, labels, temperature=0.07))
        True
        >>> loss.backward()
    """
    if process_group is not None:  # docs/spec.md §5
        return _dist().ntxent(x, labels, y, ref_labels, temperature=temperature, normalize=normalize,
                              process_group=process_group)
    loss = _run_fused("ntxent", x, y, labels, ref_labels, temperature, normalize, False)
    if loss is not None:
        return loss
    return _reference.ntxent(x, labels, y, ref_labels, temperature=temperature, normalize=normalize)
