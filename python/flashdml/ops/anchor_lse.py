"""The anchor-LSE losses, fused: SupCon (docs/spec.md §6.1), Multi-Similarity (§6.2) and Circle (§6.3).

All three reduce each anchor's row of ``S = x̂ ŷᵀ`` to one or two log-sum-exps, so they share one compiled pair:
``flashdml::anchor_lse_fwd`` streams the tiles of S once and keeps per anchor a few fp32 statistics
(``row_stats`` [B, 4]: the LSEs and the row's weights), ``anchor_lse_bwd`` recomputes every tile once and gives
each pair its closed-form weight. The int ``kind`` (0 SupCon, 1 Multi-Similarity, 2 Circle) picks the per-pair
formula, compiled into the kernel. Memory O((B + M)·d); nothing B×M is stored. Backends: the C++ CPU kernel, the CUDA
kernels (``csrc/cuda/anchor_lse.cu``) and the Triton kernels (``flashdml/triton_kernels/anchor_lse.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .. import reference as _reference
from .._docs import shared_doc
from .._math import nan_if_nonfinite
from .._validation import TemperatureLike, check_real, check_temperature, prepare_batch
from ..reference.anchor_lse import _check_ms_params
from . import registry

SUPCON, MULTI_SIMILARITY, CIRCLE = 0, 1, 2  # the kernel's `kind`

FAMILY = registry.register(registry.Family(
    name="anchor_lse",
    reference={"supcon": _reference.supcon, "multi_similarity": _reference.multi_similarity,
               "circle": _reference.circle},
    compiled={"anchor_lse_fwd": registry.LossAutograd("anchor_lse_bwd", grad_inputs=("x", "y", "temperature"),
                                                      saved_outputs=(1,))},
    backends=("cpu", "cuda", "triton"),
))


def _dist():
    """The process-group drivers (imported on first use: ``torch.distributed`` stays out of plain calls)."""
    from ..distributed import losses_anchor_lse

    return losses_anchor_lse


def _fused(op: str, kind: int, x, labels, y, ref_labels, temperature: Optional[TemperatureLike],
           p0: float = 0.0, p1: float = 0.0, p2: float = 0.0) -> Optional[Tensor]:
    """The fused loss, or None when the reference must run (float64, or no compiled backend for the device)."""
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=True)
    if temperature is not None:
        t = check_temperature(temperature, batch.x.device)
    else:  # not read by the kernel: a constant, so autograd sends it no gradient
        t = torch.ones((), dtype=torch.float32, device=batch.x.device)
    ops = _dispatch.select(op, batch.x)
    if ops is None:
        return None
    xc = batch.x.contiguous()
    yc = xc if batch.self_mode else batch.y.contiguous()  # self mode: x twice, autograd adds both gradients
    loss = ops.anchor_lse_fwd(xc, yc, batch.labels, batch.ref_labels, t, kind, p0, p1, p2, batch.self_mode)[0]
    return nan_if_nonfinite(loss, batch.x, batch.y)


@shared_doc
def supcon(
    x: Tensor,
    labels: Optional[Tensor],
    y: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    temperature: TemperatureLike = 0.1,
    process_group=None,
) -> Tensor:
    """Supervised contrastive loss (docs/spec.md §6.1), pytorch-metric-learning's ``SupConLoss``, fused.

    Per anchor, the log-softmax of ``z = S / temperature`` over all its other samples, averaged over its
    positives: ``ℓ_a = LSE_{j ∈ P(a) ∪ N(a)} z_aj − mean_{p ∈ P(a)} z_ap``; the loss is the mean of the
    ``ℓ_a > 0`` (pml's ``AvgNonZeroReducer``: anchors without positives do not count). Cosine similarity always.
    Memory O((B + M)·d): S is streamed in tiles, never stored.

    Args:
        x (Tensor): queries ``[B, d]``, fp32, fp16 or bf16 (float64 runs on the reference, in float64).
        labels (Tensor or None): integer ``[B]`` (positional, no default). ``None`` is pair mode (``labels =
            ref_labels = arange``; in self mode that leaves no positive pair, so the loss is 0).
        y (Tensor, optional): references ``[M, d]``, same dtype and device as ``x`` (pml's ``ref_emb``). Default
            ``None``: self mode (``y = x``; the pairs ``(i, i)`` are dropped).
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels, not allowed in self
            mode.
        temperature (float or Tensor): ``τ > 0`` (at least 1e-12, finite); a Python number or a 0-dim floating
            tensor, learnable when it has ``requires_grad=True``. Default 0.1.
        {{process_group_loss_arg}}

    Returns:
        Tensor: the 0-dim fp32 loss (float64 for float64 input); 0 with a zero gradient when the batch has no
        positive or no negative pair; NaN when ``x`` or ``y`` holds a NaN or an infinity.

    Raises:
        TypeError: ``x``, ``y``, ``labels`` or ``ref_labels`` that is not a tensor; embeddings that are not fp16,
            bf16, fp32 or fp64; ``x`` and ``y`` of different dtypes; non-integer labels; a temperature that is
            neither a number nor a floating tensor.
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
        >>> loss = fd.supcon(emb, labels, temperature=0.1)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
        >>> torch.allclose(loss, fd.reference.supcon(emb, labels, temperature=0.1))
        True
        >>> loss.backward()
    """
    if process_group is not None:  # docs/spec.md §5
        return _dist().supcon(x, labels, y, ref_labels, temperature=temperature, process_group=process_group)
    loss = _fused("supcon", SUPCON, x, labels, y, ref_labels, temperature)
    if loss is not None:
        return loss
    return _reference.supcon(x, labels, y, ref_labels, temperature=temperature)


@shared_doc
def multi_similarity(
    x: Tensor,
    labels: Optional[Tensor],
    y: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    process_group=None,
) -> Tensor:
    """Multi-Similarity loss (docs/spec.md §6.2), pytorch-metric-learning's ``MultiSimilarityLoss``, fused.

    ``L = mean_a [(1/α) log(1 + Σ_{p ∈ P(a)} e^{−α(s_ap − base)}) + (1/β) log(1 + Σ_{n ∈ N(a)} e^{β(s_an − base)})]``
    over all B anchors (pml's default ``MeanReducer``), ``s`` the cosine similarity. Memory O((B + M)·d).

    Args:
        x (Tensor): queries ``[B, d]``, fp32, fp16 or bf16 (float64 runs on the reference, in float64).
        labels (Tensor or None): integer ``[B]`` (positional, no default). ``None`` is pair mode.
        y (Tensor, optional): references ``[M, d]``, same dtype and device as ``x``. Default ``None``: self mode.
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        alpha (float): the positive scale ``α``, finite, non-zero. Default 2.
        beta (float): the negative scale ``β``, finite, non-zero. Default 50.
        base (float): the similarity offset, finite. Default 0.5.
        {{process_group_loss_arg}}

    Returns:
        Tensor: the 0-dim fp32 loss (float64 for float64 input); gradients come back in the input dtype. NaN when
        ``x`` or ``y`` holds a NaN or an infinity.

    Raises:
        TypeError: ``x``, ``y``, ``labels`` or ``ref_labels`` that is not a tensor; embeddings that are not fp16,
            bf16, fp32 or fp64; ``x`` and ``y`` of different dtypes; non-integer labels; ``alpha``, ``beta`` or
            ``base`` not a real number.
        ValueError: embeddings that are not 2-D, are empty or differ in ``d``; labels that are not 1-D or do not
            match their rows; ``ref_labels`` without ``y`` or without ``labels``; ``y`` and ``labels`` without
            ``ref_labels``; tensors on different devices; a NaN or infinite parameter; ``alpha`` or ``beta`` 0.
        RuntimeError: an explicitly selected backend that cannot run the call; ``create_graph=True`` through a
            fused backward.

    Example:
        >>> import torch, flashdml as fd
        >>> emb = torch.randn(16, 8, requires_grad=True)
        >>> labels = torch.arange(16) // 4
        >>> loss = fd.multi_similarity(emb, labels, alpha=2.0, beta=50.0, base=0.5)
        >>> torch.allclose(loss, fd.reference.multi_similarity(emb, labels), rtol=1e-5)
        True
        >>> loss.backward()
    """
    if process_group is not None:  # docs/spec.md §5
        return _dist().multi_similarity(x, labels, y, ref_labels, alpha=alpha, beta=beta, base=base,
                                        process_group=process_group)
    alpha, beta, base = _check_ms_params(alpha, beta, base)
    loss = _fused("multi_similarity", MULTI_SIMILARITY, x, labels, y, ref_labels, None, alpha, beta, base)
    if loss is not None:
        return loss
    return _reference.multi_similarity(x, labels, y, ref_labels, alpha=alpha, beta=beta, base=base)


@shared_doc
def circle(
    x: Tensor,
    labels: Optional[Tensor],
    y: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    process_group=None,
) -> Tensor:
    """Circle loss (docs/spec.md §6.3), pytorch-metric-learning's ``CircleLoss``, fused.

    Per anchor ``ℓ_a = softplus(LSE_{p ∈ P(a)} a_p + LSE_{n ∈ N(a)} a_n)`` with ``a_p = −γ [1 + m − s_p]_+ (s_p −
    (1 − m))`` and ``a_n = γ [s_n + m]_+ (s_n − m)``, the self-paced weights ``[·]_+`` detached; ``ℓ_a = 0`` for an
    anchor without positives or without negatives, and the loss is the mean of the ``ℓ_a > 0``. Memory
    O((B + M)·d).

    Args:
        x (Tensor): queries ``[B, d]``, fp32, fp16 or bf16 (float64 runs on the reference, in float64).
        labels (Tensor or None): integer ``[B]`` (positional, no default). ``None`` is pair mode.
        y (Tensor, optional): references ``[M, d]``, same dtype and device as ``x``. Default ``None``: self mode.
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        m (float): the relaxation margin, finite. Default 0.4.
        gamma (float): the scale ``γ``, finite. Default 80.
        {{process_group_loss_arg}}

    Returns:
        Tensor: the 0-dim fp32 loss (float64 for float64 input); gradients come back in the input dtype. NaN when
        ``x`` or ``y`` holds a NaN or an infinity.

    Raises:
        TypeError: ``x``, ``y``, ``labels`` or ``ref_labels`` that is not a tensor; embeddings that are not fp16,
            bf16, fp32 or fp64; ``x`` and ``y`` of different dtypes; non-integer labels; ``m`` or ``gamma`` not a
            real number.
        ValueError: embeddings that are not 2-D, are empty or differ in ``d``; labels that are not 1-D or do not
            match their rows; ``ref_labels`` without ``y`` or without ``labels``; ``y`` and ``labels`` without
            ``ref_labels``; tensors on different devices; a NaN or infinite ``m`` or ``gamma``.
        RuntimeError: an explicitly selected backend that cannot run the call; ``create_graph=True`` through a
            fused backward.

    Example:
        >>> import torch, flashdml as fd
        >>> emb = torch.randn(16, 8, requires_grad=True)
        >>> labels = torch.arange(16) // 4
        >>> loss = fd.circle(emb, labels, m=0.4, gamma=80.0)
        >>> torch.allclose(loss, fd.reference.circle(emb, labels), rtol=1e-4)
        True
        >>> loss.backward()
    """
    if process_group is not None:  # docs/spec.md §5
        return _dist().circle(x, labels, y, ref_labels, m=m, gamma=gamma, process_group=process_group)
    m, gamma = check_real(m, "m"), check_real(gamma, "gamma")
    loss = _fused("circle", CIRCLE, x, labels, y, ref_labels, None, m, gamma)
    if loss is not None:
        return loss
    return _reference.circle(x, labels, y, ref_labels, m=m, gamma=gamma)
