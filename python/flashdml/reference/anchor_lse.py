"""Reference anchor-LSE losses of docs/spec.md §6: SupCon, Multi-Similarity and Circle.

Each is a per-anchor reduction of its row of ``S = x̂ ŷᵀ`` (cosine similarity always, as pytorch-metric-learning's
default ``CosineSimilarity``) into one or two masked log-sum-exps, then a reduction over the anchors:

* ``supcon``: ``ℓ_a = LSE_{j ∈ P(a) ∪ N(a)} z_aj − mean_{p ∈ P(a)} z_ap`` (``z = S / τ``), the mean over the
  anchors with ``ℓ_a > 0`` (pml's ``AvgNonZeroReducer``);
* ``multi_similarity``: ``ℓ_a = (1/α) log(1 + Σ_P e^{−α(s − base)}) + (1/β) log(1 + Σ_N e^{β(s − base)})``, the
  mean over all B anchors (pml's default ``MeanReducer``);
* ``circle``: ``ℓ_a = softplus(LSE_P a_p + LSE_N a_n)`` with the detached self-paced weights, 0 for an anchor
  without positives or without negatives, the mean over the anchors with ``ℓ_a > 0``.

Computed on the materialised S (float64 for float64 input, fp32 otherwise); autograd supplies the gradients.
Empty sets give 0 with a zero gradient. Like pml, a batch with at most one positive and at most one negative
pair gives 0.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._math import nonfinite_gives_nan
from .._validation import check_real, prepare_batch
from .losses import _divide_by_count, _masked_logsumexp, _softplus, _temperature
from .similarity import _pair_masks, _similarity_matrix

__all__ = ["supcon", "multi_similarity", "circle"]


def _setup(x, labels, y, ref_labels):
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=True)
    S = _similarity_matrix(batch, True)
    pos, neg = _pair_masks(batch)
    # pml (GenericPairLoss) returns 0 when the batch has at most one positive and at most one negative pair
    degenerate = (pos.sum() <= 1) & (neg.sum() <= 1)
    return S, pos, neg, degenerate


def _mean_of_nonzero(ell: Tensor) -> Tensor:
    """pml's ``AvgNonZeroReducer``: the mean of the per-anchor losses that are > 0 (0 when none is)."""
    return _divide_by_count(torch.where(ell > 0, ell, 0.0).sum(), (ell > 0).sum())


def _zero_unless(ok: Tensor, loss: Tensor) -> Tensor:
    return torch.where(ok, loss, torch.zeros_like(loss))


@nonfinite_gives_nan
def supcon(
    x: Tensor,
    labels: Optional[Tensor],
    y: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    temperature=0.1,
) -> Tensor:
    """Reference supervised contrastive loss (docs/spec.md §6.1), pytorch-metric-learning's ``SupConLoss``.

    Per anchor ``ℓ_a = LSE_{j ∈ P(a) ∪ N(a)} z_aj − (1/|P(a)|) Σ_{p ∈ P(a)} z_ap`` (``z = S / τ``; 0 without
    positives); the loss is the mean of the ``ℓ_a > 0``. A batch without any positive or any negative pair gives
    0.

    Args:
        x (Tensor): queries ``[B, d]``, any floating dtype (computed in float64 for float64, fp32 otherwise).
        labels (Tensor or None): integer ``[B]``; ``None`` is pair mode.
        y (Tensor, optional): references ``[M, d]``; ``None`` (default) is self mode, which drops ``(i, i)``.
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        temperature (float or Tensor): ``τ > 0``, a number or a 0-dim (learnable) tensor. Default 0.1.

    Returns:
        Tensor: the 0-dim loss in the compute dtype (fp32, or float64 for float64 input); NaN when ``x`` or ``y``
        holds a NaN or an infinity.

    Raises:
        TypeError: wrong type or dtype, as :func:`flashdml.supcon` (same checks, same messages).
        ValueError: a wrong shape, size, value or device, as :func:`flashdml.supcon`.

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8, dtype=torch.float64, requires_grad=True), torch.arange(16) // 4
        >>> fd.reference.supcon(emb, labels, temperature=0.1).backward()
        >>> emb.grad.dtype
        torch.float64
    """
    S, pos, neg, degenerate = _setup(x, labels, y, ref_labels)
    z = S / _temperature(temperature, S)
    lse, _ = _masked_logsumexp(z, pos | neg, dim=1)  # placeholder (zero gradient) where the row is empty
    n_pos = pos.sum(1)
    mean_pos = torch.where(pos, z, 0.0).sum(1) / n_pos.clamp_min(1).to(z.dtype)
    ell = torch.where(n_pos > 0, lse - mean_pos, 0.0)
    return _zero_unless(pos.any() & neg.any() & ~degenerate, _mean_of_nonzero(ell))


@nonfinite_gives_nan
def multi_similarity(
    x: Tensor,
    labels: Optional[Tensor],
    y: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
) -> Tensor:
    """Reference Multi-Similarity loss (docs/spec.md §6.2), pytorch-metric-learning's ``MultiSimilarityLoss``.

    ``L = mean_a [(1/α) log(1 + Σ_{p ∈ P(a)} e^{−α(s_ap − base)}) + (1/β) log(1 + Σ_{n ∈ N(a)} e^{β(s_an − base)})]``
    over all B anchors (an empty set contributes ``log 1 = 0``).

    Args:
        x (Tensor): queries ``[B, d]``, any floating dtype (computed in float64 for float64, fp32 otherwise).
        labels (Tensor or None): integer ``[B]``; ``None`` is pair mode.
        y (Tensor, optional): references ``[M, d]``; ``None`` (default) is self mode, which drops ``(i, i)``.
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        alpha (float): the positive scale ``α``, finite and non-zero. Default 2.
        beta (float): the negative scale ``β``, finite and non-zero. Default 50.
        base (float): the similarity offset, finite. Default 0.5.

    Returns:
        Tensor: the 0-dim loss in the compute dtype; NaN when ``x`` or ``y`` holds a NaN or an infinity.

    Raises:
        TypeError: wrong type or dtype, as :func:`flashdml.multi_similarity`.
        ValueError: a wrong shape, size, value or device, as :func:`flashdml.multi_similarity`.

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8, dtype=torch.float64, requires_grad=True), torch.arange(16) // 4
        >>> fd.reference.multi_similarity(emb, labels).backward()
        >>> emb.grad.shape
        torch.Size([16, 8])
    """
    alpha, beta, base = _check_ms_params(alpha, beta, base)
    S, pos, neg, degenerate = _setup(x, labels, y, ref_labels)
    zero = torch.zeros_like(S[:, :1])
    lp = torch.logsumexp(torch.cat([torch.where(pos, -alpha * (S - base), float("-inf")), zero], 1), 1)
    ln = torch.logsumexp(torch.cat([torch.where(neg, beta * (S - base), float("-inf")), zero], 1), 1)
    ell = lp / alpha + ln / beta
    return _zero_unless(~degenerate, ell.mean())


def _check_ms_params(alpha, beta, base):
    alpha, beta, base = check_real(alpha, "alpha"), check_real(beta, "beta"), check_real(base, "base")
    for name, v in (("alpha", alpha), ("beta", beta)):
        if v == 0:
            raise ValueError(f"{name} must be non-zero (the loss divides by it), got {v}")
    return float(alpha), float(beta), float(base)


@nonfinite_gives_nan
def circle(
    x: Tensor,
    labels: Optional[Tensor],
    y: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
) -> Tensor:
    """Reference Circle loss (docs/spec.md §6.3), pytorch-metric-learning's ``CircleLoss``.

    Per anchor ``ℓ_a = softplus(LSE_{p ∈ P(a)} a_p + LSE_{n ∈ N(a)} a_n)`` with ``a_p = −γ [1 + m − s_p]_+ (s_p −
    (1 − m))`` and ``a_n = γ [s_n + m]_+ (s_n − m)``, the brackets detached (no gradient through the weights);
    ``ℓ_a = 0`` for an anchor without positives or without negatives. The loss is the mean of the ``ℓ_a > 0``.

    Args:
        x (Tensor): queries ``[B, d]``, any floating dtype (computed in float64 for float64, fp32 otherwise).
        labels (Tensor or None): integer ``[B]``; ``None`` is pair mode.
        y (Tensor, optional): references ``[M, d]``; ``None`` (default) is self mode, which drops ``(i, i)``.
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        m (float): the relaxation margin, finite. Default 0.4.
        gamma (float): the scale ``γ``, finite. Default 80.

    Returns:
        Tensor: the 0-dim loss in the compute dtype; NaN when ``x`` or ``y`` holds a NaN or an infinity.

    Raises:
        TypeError: wrong type or dtype, as :func:`flashdml.circle`.
        ValueError: a wrong shape, size, value or device, as :func:`flashdml.circle`.

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8, dtype=torch.float64, requires_grad=True), torch.arange(16) // 4
        >>> fd.reference.circle(emb, labels).backward()
        >>> emb.grad.shape
        torch.Size([16, 8])
    """
    m, gamma = float(check_real(m, "m")), float(check_real(gamma, "gamma"))
    S, pos, neg, degenerate = _setup(x, labels, y, ref_labels)
    Sd = S.detach()
    ap = -gamma * torch.relu(1 + m - Sd) * (S - (1 - m))
    an = gamma * torch.relu(Sd + m) * (S - m)
    lp, has_p = _masked_logsumexp(ap, pos, dim=1)
    ln, has_n = _masked_logsumexp(an, neg, dim=1)
    ell = torch.where(has_p & has_n, _softplus(lp + ln), 0.0)
    return _zero_unless(~degenerate, _mean_of_nonzero(ell))
