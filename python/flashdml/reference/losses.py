"""Reference losses of docs/spec.md sections 2.1-2.4 (the contextual loss, 2.5, lives in ``contextual.py``).

Plain PyTorch on the materialised ``S``; autograd supplies every gradient. Computation is float64 for float64
input, float32 otherwise; each loss returns a 0-dim tensor of that dtype. Empty sets (no positives, no
negatives, no hard pairs) contribute exactly 0 with a zero gradient: no ``-inf - -inf``, no ``0/0``, and no
non-finite value in an unselected ``where`` branch.

Temperatures: a Python number becomes a constant of the compute dtype; a tensor (e.g. a learnable 0-dim
``nn.Parameter``, as in CLIP) is validated by ``check_temperature`` and then used *itself*, cast to the
compute dtype, so its gradient is exact (float64 in float64 runs) and comes back in its own dtype.

``labels=None`` is pair mode (``labels = ref_labels = arange``, docs/spec.md §0) for every loss here: in cross
mode that is the image-text setting with one match per row; in self mode it leaves no positive pair (except the
diagonal that 2.4 keeps), so the positive terms are 0.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _validation
from .._math import nonfinite_gives_nan
from .._validation import check_positive_int, check_real, check_temperature, prepare_batch
from .similarity import _global_topk_flat, _pair_masks, _similarity_matrix

__all__ = [
    "batch_softmax",
    "ntxent",
    "cross_example_softmax",
    "threshold_consistent_margin",
    "contrastive_margin",
]


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def _temperature(temperature, like: Tensor) -> Tensor:
    """Validated temperature as a 0-dim tensor of ``like``'s dtype/device (keeps a learnable tensor's graph)."""
    check_temperature(temperature, like.device)  # raises TypeError/ValueError naming "temperature"
    if isinstance(temperature, Tensor):
        t = temperature.to(device=like.device, dtype=like.dtype)
        # a GPU tensor is not read on the host: an invalid value becomes NaN here too (no wrong finite loss)
        return t if _validation.host_readable(temperature) else _validation.nan_unless_valid(t)
    return torch.full((), float(temperature), dtype=like.dtype, device=like.device)  # a fill, no host copy


def _masked_logsumexp(z: Tensor, mask: Tensor, dim: Optional[int] = None):
    """``log Σ_{mask} exp(z)`` along ``dim`` (all entries when ``dim is None``), plus "the set is non-empty".

    Where the set is empty the returned value is a finite placeholder (the log of the number of entries) with
    zero gradient; the caller must discard it with the returned flag. Masked-out entries get exactly zero
    gradient. No branch on the mask's values, so it traces under ``torch.compile(fullgraph=True)``.
    """
    if dim is None:
        z, mask, dim = z.reshape(-1), mask.reshape(-1), 0
    filled = z.masked_fill(~mask, float("-inf"))
    nonempty = mask.any(dim=dim)
    filled = filled.masked_fill(~nonempty.unsqueeze(dim), 0.0)
    return torch.logsumexp(filled, dim=dim), nonempty


def _softplus(v: Tensor) -> Tensor:
    """Exact ``log(1 + e^v)`` (``torch.nn.functional.softplus`` returns ``v`` itself above its threshold 20, an
    error of up to ~2e-9 per term that an oracle cannot afford)."""
    return torch.logaddexp(v, torch.zeros_like(v))


def _mean_over(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values[mask]``; 0 (zero gradient) when the mask is empty. The count is an exact int64."""
    return _divide_by_count(values[mask].sum(), mask.sum())


def _divide_by_count(total: Tensor, count: Tensor) -> Tensor:
    """``total / count`` for an exact int64 count (0 when the count is 0): the quotient is formed in float64
    and rounded once, so counts above 2^24 are not rounded to fp32 first."""
    quotient = total.to(torch.float64) / count.clamp_min(1).to(torch.float64)
    return quotient.to(total.dtype)


# --------------------------------------------------------------------------------------------------------------
# 2.1 batch softmax / InfoNCE
# --------------------------------------------------------------------------------------------------------------
def _batch_softmax_one_direction(z: Tensor, keep: Tensor) -> Tensor:
    lse, _ = _masked_logsumexp(z, keep, dim=1)  # every row keeps its diagonal: never empty
    return (lse - torch.diagonal(z)).mean()


@nonfinite_gives_nan
def batch_softmax(
    x: Tensor,
    y: Tensor,
    labels: Optional[Tensor] = None,
    *,
    temperature=0.05,
    symmetric: bool = False,
    normalize: bool = True,
) -> Tensor:
    """Reference batch softmax / InfoNCE (docs/spec.md §2.1): ``mean_i (LSE_{j ∈ {i} ∪ neg(i)} z_ij − z_ii)``.

    ``z = S / τ``. Requires ``y`` and B == M; row i's positive is column i. ``labels`` label both x's and y's
    rows (pair i shares ``labels[i]``); columns ``j ≠ i`` with ``labels[j] == labels[i]`` are false negatives
    and leave row i's denominator. ``symmetric=True`` averages with the same loss on ``Sᵀ`` (CLIP's loss).

    Args:
        x (Tensor): queries ``[B, d]``, any floating dtype (computed in float64 for float64, fp32 otherwise).
        y (Tensor): references ``[B, d]``, required.
        labels (Tensor, optional): integer ``[B]``; ``None`` (default): every off-diagonal pair is a negative.
        temperature (float or Tensor): ``τ > 0``, a number or a 0-dim (learnable) tensor. Default 0.05.
        symmetric (bool): also classify the columns. Default ``False``.
        normalize (bool): cosine (default) or plain dot products.

    Returns:
        Tensor: the 0-dim loss in the compute dtype (fp32, or float64 for float64 input); NaN when ``x`` or ``y``
        holds a NaN or an infinity.

    Raises:
        TypeError: wrong type or dtype, as :func:`flashdml.batch_softmax` (same checks, same messages).
        ValueError: a wrong shape, size, value or device, as :func:`flashdml.batch_softmax`.

    Example:
        >>> import torch, flashdml as fd
        >>> img, txt = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
        >>> fd.reference.batch_softmax(img, txt, temperature=0.07, symmetric=True).dtype
        torch.float64
    """
    batch = prepare_batch(x, y, labels, labels, require_y=True, require_square=True, pair_mode_default=True)
    S = _similarity_matrix(batch, normalize)
    tau = _temperature(temperature, S)
    z = S / tau
    eye = torch.eye(batch.B, dtype=torch.bool, device=S.device)
    keep = (batch.labels[:, None] != batch.ref_labels[None, :]) | eye  # symmetric
    loss = _batch_softmax_one_direction(z, keep)
    if symmetric:
        loss = 0.5 * (loss + _batch_softmax_one_direction(z.T, keep.T))
    return loss


# --------------------------------------------------------------------------------------------------------------
# 2.1b NT-Xent with labels
# --------------------------------------------------------------------------------------------------------------
@nonfinite_gives_nan
def ntxent(
    x: Tensor,
    labels: Optional[Tensor],
    y: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    temperature=0.07,
    normalize: bool = True,
) -> Tensor:
    """Reference NT-Xent with labels (docs/spec.md §2.1b): ``mean_{(a,p)∈P} softplus(LSE_{n∈N(a)} z_an − z_ap)``.

    N(a) = the negatives of row a. A positive whose row has no negative contributes ``softplus(−∞) = 0`` (and
    no gradient); no positive pair at all gives 0. Equals pytorch-metric-learning's ``NTXentLoss(temperature)``
    on self-mode batches.

    Args:
        x (Tensor): queries ``[B, d]``, any floating dtype (computed in float64 for float64, fp32 otherwise).
        labels (Tensor or None): integer ``[B]``; ``None`` is pair mode.
        y (Tensor, optional): references ``[M, d]``; ``None`` (default) is self mode, which drops ``(i, i)``.
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        temperature (float or Tensor): ``τ > 0``, a number or a 0-dim (learnable) tensor. Default 0.07.
        normalize (bool): cosine (default) or plain dot products.

    Returns:
        Tensor: the 0-dim loss in the compute dtype (fp32, or float64 for float64 input); NaN when ``x`` or ``y``
        holds a NaN or an infinity.

    Raises:
        TypeError: wrong type or dtype, as :func:`flashdml.ntxent` (same checks, same messages).
        ValueError: a wrong shape, size, value or device, as :func:`flashdml.ntxent`.

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8, dtype=torch.float64, requires_grad=True), torch.arange(16) // 4
        >>> fd.reference.ntxent(emb, labels, temperature=0.07).backward()
        >>> emb.grad.dtype
        torch.float64
    """
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=True)
    S = _similarity_matrix(batch, normalize)
    tau = _temperature(temperature, S)
    z = S / tau
    pos, neg = _pair_masks(batch)
    row_lse, row_has_neg = _masked_logsumexp(z, neg, dim=1)  # [B]; a placeholder where the row has none
    per_pair = _softplus(row_lse[:, None] - z)  # finite everywhere
    counted = pos & row_has_neg[:, None]  # the others are softplus(-inf) = 0
    return _divide_by_count(per_pair[counted].sum(), pos.sum())


# --------------------------------------------------------------------------------------------------------------
# 2.2 Cross-Example Softmax (+ Cross-Example Negative Mining)
# --------------------------------------------------------------------------------------------------------------
@nonfinite_gives_nan
def cross_example_softmax(
    x: Tensor,
    y: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    temperature=0.05,
    top_k: Optional[int] = None,
    normalize: bool = True,
) -> Tensor:
    """Reference Cross-Example Softmax (docs/spec.md §2.2): ``mean_{p∈P} softplus(Λ − z_p)``, ``Λ = LSE_{n∈N} z_n``.

    One batch-wide ``Λ``. ``top_k=k`` (Cross-Example Negative Mining) replaces N by its k hardest pairs of the
    whole batch, selected exactly as ``hardest_negatives`` does: on the values of ``S`` in the compute dtype (not
    on ``z = S/τ``, whose rounding could merge distinct values), value desc, ties → lower flat index. Only the
    selected negatives get a gradient. ``top_k >= |N|`` is plain XE. No positive or no negative pair gives 0.

    Args:
        x (Tensor): queries ``[B, d]``, any floating dtype (computed in float64 for float64, fp32 otherwise).
        y (Tensor, optional): references ``[M, d]``; ``None`` (default) is self mode, which drops ``(i, i)``.
        labels (Tensor, optional): integer ``[B]``; ``None`` (default) is pair mode.
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        temperature (float or Tensor): ``τ > 0``, a number or a 0-dim (learnable) tensor. Default 0.05.
        top_k (int, optional): ``>= 1``, keep only the k hardest negatives; ``None`` (default) keeps all.
        normalize (bool): cosine (default) or plain dot products.

    Returns:
        Tensor: the 0-dim loss in the compute dtype (fp32, or float64 for float64 input); NaN when ``x`` or ``y``
        holds a NaN or an infinity.

    Raises:
        TypeError: wrong type or dtype, as :func:`flashdml.cross_example_softmax` (same checks, same messages).
        ValueError: a wrong shape, size, value or device, as :func:`flashdml.cross_example_softmax`.

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8, dtype=torch.float64, requires_grad=True), torch.arange(16) // 4
        >>> full = fd.reference.cross_example_softmax(emb, labels=labels)
        >>> bool(full == fd.reference.cross_example_softmax(emb, labels=labels, top_k=16 * 12))   # top_k = |N|
        True
    """
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=True)
    if top_k is not None:
        top_k = check_positive_int(top_k, "top_k")
    S = _similarity_matrix(batch, normalize)
    tau = _temperature(temperature, S)
    z = S / tau
    pos, neg = _pair_masks(batch)
    if top_k is not None:  # keep the top_k hardest negatives; top_k >= |N| keeps them all (plain XE)
        flat = _global_topk_flat(S, neg, top_k)
        hardest = torch.zeros_like(neg).reshape(-1).index_fill(0, flat, True).reshape(neg.shape)
        neg = neg & hardest
    lam, has_neg = _masked_logsumexp(z, neg)
    mean = _divide_by_count(_softplus(lam - z[pos]).sum(), pos.sum())  # 0 when there is no positive pair
    return torch.where(has_neg, mean, 0.0)  # no negative pair: 0 (the mean used Λ's placeholder), zero gradient


# --------------------------------------------------------------------------------------------------------------
# 2.3 Threshold-Consistent Margin
# --------------------------------------------------------------------------------------------------------------
@nonfinite_gives_nan
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
    """Reference TCM (docs/spec.md §2.3): ``λ+·mean_{hard pos}(m+ − s) + λ−·mean_{hard neg}(s − m−)``, cosine always.

    Hard positives: positive pairs with ``s <= m+``; hard negatives: negative pairs with ``s >= m−`` (both
    inclusive). Ordered pairs; self mode drops the diagonal. Each term is 0 when its set is empty; the counts
    are exact int64. Unlike pytorch-metric-learning's ``ThresholdConsistentMarginLoss``, cross mode compares
    x with y (pml indexes the query embeddings with the reference indices).

    Args:
        x (Tensor): queries ``[B, d]``, any floating dtype (computed in float64 for float64, fp32 otherwise).
        labels (Tensor or None): integer ``[B]``; ``None`` is pair mode.
        y (Tensor, optional): references ``[M, d]``; ``None`` (default) is self mode, which drops ``(i, i)``.
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        pos_margin (float): ``m+``, finite. Default 0.9.
        neg_margin (float): ``m−``, finite. Default 0.5.
        pos_weight (float): ``λ+``, finite. Default 1.0.
        neg_weight (float): ``λ−``, finite. Default 1.0.

    Returns:
        Tensor: the 0-dim loss in the compute dtype (fp32, or float64 for float64 input); NaN when ``x`` or ``y``
        holds a NaN or an infinity.

    Raises:
        TypeError: wrong type or dtype, as :func:`flashdml.threshold_consistent_margin` (same checks, same messages).
        ValueError: a wrong shape, size, value or device, as :func:`flashdml.threshold_consistent_margin`.

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8, dtype=torch.float64, requires_grad=True), torch.arange(16) // 4
        >>> fd.reference.threshold_consistent_margin(emb, labels, pos_margin=0.9, neg_margin=0.5).shape
        torch.Size([])
    """
    pos_margin = check_real(pos_margin, "pos_margin")
    neg_margin = check_real(neg_margin, "neg_margin")
    pos_weight = check_real(pos_weight, "pos_weight")
    neg_weight = check_real(neg_weight, "neg_weight")
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=True)
    S = _similarity_matrix(batch, normalize=True)
    pos, neg = _pair_masks(batch)
    hard_pos = pos & (S.detach() <= pos_margin)
    hard_neg = neg & (S.detach() >= neg_margin)
    pos_term = _mean_over(pos_margin - S, hard_pos)
    neg_term = _mean_over(S - neg_margin, hard_neg)
    return pos_weight * pos_term + neg_weight * neg_term


# --------------------------------------------------------------------------------------------------------------
# 2.4 Margin contrastive
# --------------------------------------------------------------------------------------------------------------
def _contrastive_margin_from_S(S: Tensor, pos: Tensor, neg: Tensor, pos_margin: float, neg_margin: float) -> Tensor:
    """``Σ_P [m+ − s]_+ / #{P: hinge > 0} + Σ_N [s − m−]_+ / #{N: hinge > 0}`` (shared with the contextual loss)."""
    pos_hinge = torch.clamp_min(pos_margin - S, 0.0)
    neg_hinge = torch.clamp_min(S - neg_margin, 0.0)
    pos_term = _mean_over(pos_hinge, pos & (pos_hinge.detach() > 0))
    neg_term = _mean_over(neg_hinge, neg & (neg_hinge.detach() > 0))
    return pos_term + neg_term


@nonfinite_gives_nan
def contrastive_margin(
    x: Tensor,
    labels: Optional[Tensor],
    y: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    pos_margin: float = 0.75,
    neg_margin: float = 0.6,
) -> Tensor:
    """Reference margin contrastive loss (docs/spec.md §2.4): hinge means over the pairs with a non-zero hinge.

    ``Σ_P [m+ − s]_+ / #{P : hinge > 0} + Σ_N [s − m−]_+ / #{N : hinge > 0}``, cosine only; each term is 0 when
    its count is 0. Self mode keeps the diagonal as a positive pair (as the contextual paper's code does): with
    ``pos_margin < 1`` its hinge ``[m+ − 1]_+`` is 0, so this equals pytorch-metric-learning's
    ``ContrastiveLoss(pos_margin, neg_margin, distance=CosineSimilarity())`` (which drops the diagonal); for
    ``pos_margin >= 1`` the diagonal's hinge adds to the positive sum and count here and not in pml.

    Args:
        x (Tensor): queries ``[B, d]``, any floating dtype (computed in float64 for float64, fp32 otherwise).
        labels (Tensor or None): integer ``[B]``; ``None`` is pair mode.
        y (Tensor, optional): references ``[M, d]``; ``None`` (default) is self mode, which keeps ``(i, i)``.
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        pos_margin (float): ``m+``, finite. Default 0.75.
        neg_margin (float): ``m−``, finite. Default 0.6.

    Returns:
        Tensor: the 0-dim loss in the compute dtype (fp32, or float64 for float64 input); NaN when ``x`` or ``y``
        holds a NaN or an infinity.

    Raises:
        TypeError: wrong type or dtype, as :func:`flashdml.contrastive_margin` (same checks, same messages).
        ValueError: a wrong shape, size, value or device, as :func:`flashdml.contrastive_margin`.

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8, dtype=torch.float64, requires_grad=True), torch.arange(16) // 4
        >>> fd.reference.contrastive_margin(emb, labels, pos_margin=0.75, neg_margin=0.6).dtype
        torch.float64
    """
    pos_margin = check_real(pos_margin, "pos_margin")
    neg_margin = check_real(neg_margin, "neg_margin")
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=True)
    S = _similarity_matrix(batch, normalize=True)
    pos, neg = _pair_masks(batch, keep_diagonal_positive=True)
    return _contrastive_margin_from_S(S, pos, neg, pos_margin, neg_margin)
