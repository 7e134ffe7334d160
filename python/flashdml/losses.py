"""Loss modules: thin ``torch.nn.Module`` wrappers over the functional API, with one call convention.

Every loss module is called as pytorch-metric-learning's losses are::

    loss = module(embeddings, labels=None, ref_emb=None, ref_labels=None)

* ``embeddings`` ``[B, d]`` are the queries; ``labels`` int ``[B]`` their classes.
* ``ref_emb`` ``[M, d]`` with ``ref_labels`` int ``[M]`` is cross mode (docs/spec.md §0): queries against a
  separate reference set (a memory bank, the other modality); without it, self mode.
* Pair-mode losses (image–text batches, row i of ``embeddings`` matches row i of ``ref_emb``): ``BatchSoftmaxLoss``
  always, ``CrossExampleSoftmaxLoss`` and ``NTXentLoss`` when ``ref_emb`` is given with ``labels=ref_labels=None``.

So a pml user's ``loss(embeddings, labels)`` works for every module. The constructor arguments are the functions'
(``temperature``, margins, ...), plus ``learnable_temperature=True`` on the softmax-type losses.

Calls in the earlier per-module orders — ``BatchSoftmaxLoss()(x, y, labels)``, ``CrossExampleSoftmaxLoss()(x, y,
labels)``, or the keyword ``y=`` — still work for now and emit a ``FutureWarning``: a 2-D floating tensor where
``labels`` belongs is taken as the reference set.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .ops import contextual as _contextual  # noqa: F401
from .ops import hinge_pair as _hinge_pair, unfused as _unfused, xent as _xent  # noqa: F401

__all__ = ["BatchSoftmaxLoss", "NTXentLoss", "CrossExampleSoftmaxLoss", "ThresholdConsistentMarginLoss",
           "ContrastiveMarginLoss", "ContextualLoss", "SupConLoss", "MultiSimilarityLoss", "CircleLoss",
           "TripletMarginLoss"]


def _temperature_parameter(temperature, learnable: bool):
    if learnable:
        return nn.Parameter(torch.tensor(float(temperature), dtype=torch.float32))
    return temperature


def _is_embedding_matrix(t) -> bool:
    return isinstance(t, Tensor) and t.dim() == 2 and t.is_floating_point()


def _convention(module: nn.Module, labels, ref_emb, ref_labels, legacy: dict):
    """``(labels, ref_emb, ref_labels)`` under the module convention, mapping the earlier call orders (with a
    ``FutureWarning``): ``(x, y, labels[, ref_labels])`` positionally, or ``y=`` as a keyword."""
    name = type(module).__name__
    if legacy:
        unknown = set(legacy) - {"y"}
        if unknown:
            raise TypeError(f"{name}.forward() got unexpected keyword argument(s) {sorted(unknown)}; the call is "
                            "forward(embeddings, labels=None, ref_emb=None, ref_labels=None)")
        if ref_emb is not None:
            raise TypeError(f"{name}.forward(): y and ref_emb name the same tensor; pass ref_emb only")
        warnings.warn(f"{name}: the keyword y= is renamed ref_emb= (forward(embeddings, labels=None, ref_emb=None, "
                      "ref_labels=None))", FutureWarning, stacklevel=3)
        return labels, legacy["y"], ref_labels
    if _is_embedding_matrix(labels):
        warnings.warn(f"{name}: called as (x, y, labels); the convention is forward(embeddings, labels=None, "
                      "ref_emb=None, ref_labels=None) — pass the reference set as ref_emb=", FutureWarning,
                      stacklevel=3)
        return ref_emb, labels, ref_labels
    return labels, ref_emb, ref_labels


def _no_cross_mode(module: nn.Module, ref_emb, ref_labels):
    if ref_emb is not None or ref_labels is not None:
        raise ValueError(f"{type(module).__name__} has no cross mode: ref_emb / ref_labels are not supported")


class BatchSoftmaxLoss(nn.Module):
    """``fd.batch_softmax`` (docs/spec.md §2.1, CLIP-style InfoNCE) as a module: pair mode, row i of ``embeddings``
    against row i of ``ref_emb``.

    Args:
        temperature: ``> 0``; a float, or the initial value when ``learnable_temperature``.
        symmetric: also the column-wise (``ref_emb`` → ``embeddings``) softmax, averaged with the row-wise one.
        normalize: cosine similarity (default) or raw dot products.
        learnable_temperature: make the temperature an ``nn.Parameter``.
        process_group: a ``torch.distributed`` group: each rank passes its shard and gets the loss of the global
            batch (docs/spec.md §5). Default ``None``: one process.

    ``forward(embeddings, labels=None, ref_emb=None, ref_labels=None)``: ``ref_emb`` ``[B, d]`` is required;
    ``labels`` (optional, int ``[B]``, shared by row i of both sets) removes same-class columns from each row's
    denominator; ``ref_labels``, if given, must equal ``labels``.

    Returns:
        A 0-dim fp32 loss (float64 for float64 inputs).

    Raises:
        ValueError: ``ref_emb`` missing, ``ref_labels`` different from ``labels``, or the op's input errors.

    Example:
        >>> import torch, flashdml as fd
        >>> img_emb, txt_emb = torch.randn(8, 16), torch.randn(8, 16)   # row i of each is one image–text pair
        >>> crit = fd.losses.BatchSoftmaxLoss(temperature=0.07, symmetric=True)
        >>> loss = crit(img_emb, ref_emb=txt_emb)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
        >>> torch.allclose(loss, fd.batch_softmax(img_emb, txt_emb, temperature=0.07, symmetric=True))
        True
    """

    def __init__(self, temperature: float = 0.05, symmetric: bool = False, normalize: bool = True,
                 learnable_temperature: bool = False, process_group=None):
        super().__init__()
        self.temperature = _temperature_parameter(temperature, learnable_temperature)
        self.process_group = process_group
        self.symmetric = symmetric
        self.normalize = normalize

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, **legacy) -> Tensor:
        from .ops.batch_softmax import batch_softmax

        labels, ref_emb, ref_labels = _convention(self, labels, ref_emb, ref_labels, legacy)
        if ref_emb is None:
            raise ValueError("BatchSoftmaxLoss compares two paired sets: pass ref_emb (row i of embeddings matches "
                             "row i of ref_emb)")
        if ref_labels is not None and not (labels is not None and torch.equal(torch.as_tensor(ref_labels),
                                                                             torch.as_tensor(labels))):
            raise ValueError("BatchSoftmaxLoss: one label per row pair; ref_labels, if given, must equal labels")
        return batch_softmax(embeddings, ref_emb, labels, temperature=self.temperature, symmetric=self.symmetric,
                             normalize=self.normalize, process_group=self.process_group)


class NTXentLoss(nn.Module):
    """``fd.ntxent`` (docs/spec.md §2.1b, pytorch-metric-learning's ``NTXentLoss``) as a module.

    Args:
        temperature: ``> 0``; a float, or the initial value when ``learnable_temperature``.
        normalize: cosine similarity (default) or raw dot products.
        learnable_temperature: make the temperature an ``nn.Parameter``.
        process_group: a ``torch.distributed`` group: each rank passes its shard and gets the loss of the global
            batch (docs/spec.md §5). Default ``None``: one process.

    ``forward(embeddings, labels=None, ref_emb=None, ref_labels=None)``: self mode with ``labels``; cross mode
    with ``ref_emb`` and ``ref_labels``; ``ref_emb`` with ``labels=ref_labels=None`` is pair mode.

    Returns:
        A 0-dim fp32 loss (float64 for float64 inputs); 0 when there is no positive pair.

    Raises:
        ValueError / TypeError: the op's input errors (shapes, dtypes, ``ref_labels`` without ``ref_emb``).

    Example:
        >>> import torch, flashdml as fd
        >>> emb = torch.randn(16, 8, requires_grad=True)
        >>> labels = torch.arange(16) // 4                       # 4 samples per class
        >>> loss = fd.losses.NTXentLoss(temperature=0.07)(emb, labels)
        >>> torch.allclose(loss, fd.ntxent(emb, labels, temperature=0.07))
        True
        >>> crit = fd.losses.NTXentLoss(learnable_temperature=True)
        >>> crit(emb, labels).backward()                         # the temperature gets a gradient too
        >>> crit.temperature.grad.shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.07, normalize: bool = True, learnable_temperature: bool = False,
                 process_group=None):
        super().__init__()
        self.temperature = _temperature_parameter(temperature, learnable_temperature)
        self.process_group = process_group
        self.normalize = normalize

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, **legacy) -> Tensor:
        labels, ref_emb, ref_labels = _convention(self, labels, ref_emb, ref_labels, legacy)
        return ops.xent.ntxent(embeddings, labels, ref_emb, ref_labels, temperature=self.temperature,
                               normalize=self.normalize, process_group=self.process_group)


class CrossExampleSoftmaxLoss(nn.Module):
    """``fd.cross_example_softmax`` (docs/spec.md §2.2, Veit & Wilber) as a module: every positive pair against
    one batch-wide pool of negatives; ``top_k`` enables Cross-Example Negative Mining.

    Args:
        temperature: ``> 0``; a float, or the initial value when ``learnable_temperature``.
        top_k: keep only the k hardest negatives of the whole batch (``None``: all).
        normalize: cosine similarity (default) or raw dot products.
        learnable_temperature: make the temperature an ``nn.Parameter``.
        process_group: a ``torch.distributed`` group: each rank passes its shard and gets the loss of the global
            batch (docs/spec.md §5). Default ``None``: one process.

    ``forward(embeddings, labels=None, ref_emb=None, ref_labels=None)``: self mode with ``labels``; cross mode
    with ``ref_emb`` and ``ref_labels``; ``ref_emb`` with ``labels=ref_labels=None`` is pair mode (image–text).

    Returns:
        A 0-dim fp32 loss (float64 for float64 inputs); 0 when there is no positive or no negative pair.

    Raises:
        ValueError / TypeError: the op's input errors; ``top_k`` not a positive int.

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> crit = fd.losses.CrossExampleSoftmaxLoss(temperature=0.05, learnable_temperature=True)
        >>> loss = crit(emb, labels)                             # self mode
        >>> torch.allclose(loss, fd.cross_example_softmax(emb, labels=labels, temperature=0.05))
        True
        >>> img_emb, txt_emb = torch.randn(8, 8), torch.randn(8, 8)
        >>> pair = crit(img_emb, ref_emb=txt_emb)                # pair mode
        >>> torch.allclose(pair, fd.cross_example_softmax(img_emb, txt_emb, temperature=0.05))
        True
    """

    def __init__(self, temperature: float = 0.05, top_k: Optional[int] = None, normalize: bool = True,
                 learnable_temperature: bool = False, process_group=None):
        super().__init__()
        self.temperature = _temperature_parameter(temperature, learnable_temperature)
        self.process_group = process_group
        self.top_k = top_k
        self.normalize = normalize

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, **legacy) -> Tensor:
        labels, ref_emb, ref_labels = _convention(self, labels, ref_emb, ref_labels, legacy)
        return ops.xent.cross_example_softmax(embeddings, ref_emb, labels, ref_labels, temperature=self.temperature,
                                              top_k=self.top_k, normalize=self.normalize,
                                              process_group=self.process_group)


class ThresholdConsistentMarginLoss(nn.Module):
    """``fd.threshold_consistent_margin`` (docs/spec.md §2.3, Zhang et al.) as a module.

    Args:
        pos_margin: the hard-positive threshold on cosine similarity.
        neg_margin: the hard-negative threshold on cosine similarity.
        pos_weight: the weight of the positive term.
        neg_weight: the weight of the negative term.
        process_group: a ``torch.distributed`` group: each rank passes its shard and gets the loss of the global
            batch (docs/spec.md §5). Default ``None``: one process.

    ``forward(embeddings, labels, ref_emb=None, ref_labels=None)``: ``labels`` required; cross mode with
    ``ref_emb`` and ``ref_labels``.

    Returns:
        A 0-dim fp32 loss (float64 for float64 inputs).

    Raises:
        ValueError / TypeError: ``labels`` missing, or the op's input errors.

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> loss = fd.losses.ThresholdConsistentMarginLoss()(emb, labels)
        >>> torch.allclose(loss, fd.threshold_consistent_margin(emb, labels, pos_margin=0.9, neg_margin=0.5))
        True
        >>> bank, bank_labels = torch.randn(32, 8), torch.arange(32) // 8
        >>> cross = fd.losses.ThresholdConsistentMarginLoss()(emb, labels, bank, bank_labels)   # cross mode
    """

    def __init__(self, pos_margin: float = 0.9, neg_margin: float = 0.5, pos_weight: float = 1.0,
                 neg_weight: float = 1.0, process_group=None):
        super().__init__()
        self.kwargs = dict(pos_margin=pos_margin, neg_margin=neg_margin, pos_weight=pos_weight, neg_weight=neg_weight)
        self.process_group = process_group

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, **legacy) -> Tensor:
        labels, ref_emb, ref_labels = _convention(self, labels, ref_emb, ref_labels, legacy)
        return ops.hinge_pair.threshold_consistent_margin(embeddings, labels, ref_emb, ref_labels, **self.kwargs,
                                                          process_group=self.process_group)


class ContrastiveMarginLoss(nn.Module):
    """``fd.contrastive_margin`` (docs/spec.md §2.4, the contextual paper's margin contrastive term) as a module.

    Args:
        pos_margin: ``m+`` of the positive hinge ``[m+ − s]_+``.
        neg_margin: ``m−`` of the negative hinge ``[s − m−]_+``.
        process_group: a ``torch.distributed`` group: each rank passes its shard and gets the loss of the global
            batch (docs/spec.md §5). Default ``None``: one process.

    ``forward(embeddings, labels, ref_emb=None, ref_labels=None)``: ``labels`` required; cross mode with
    ``ref_emb`` and ``ref_labels``.

    Returns:
        A 0-dim fp32 loss (float64 for float64 inputs).

    Raises:
        ValueError / TypeError: ``labels`` missing, or the op's input errors.

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> loss = fd.losses.ContrastiveMarginLoss(pos_margin=0.75, neg_margin=0.6)(emb, labels)
        >>> torch.allclose(loss, fd.contrastive_margin(emb, labels, pos_margin=0.75, neg_margin=0.6))
        True
        >>> same = torch.nn.functional.normalize(torch.ones(4, 8), dim=1)   # one point, one class: s = 1
        >>> fd.losses.ContrastiveMarginLoss()(same, torch.zeros(4, dtype=torch.long)).item()   # no hinge > 0
        0.0
    """

    def __init__(self, pos_margin: float = 0.75, neg_margin: float = 0.6, process_group=None):
        super().__init__()
        self.kwargs = dict(pos_margin=pos_margin, neg_margin=neg_margin)
        self.process_group = process_group

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, **legacy) -> Tensor:
        labels, ref_emb, ref_labels = _convention(self, labels, ref_emb, ref_labels, legacy)
        return ops.hinge_pair.contrastive_margin(embeddings, labels, ref_emb, ref_labels, **self.kwargs,
                                                 process_group=self.process_group)


class ContextualLoss(nn.Module):
    """``fd.contextual_loss`` (docs/spec.md §2.5, Liao et al.) as a module; see the function for the paper's
    two settings.

    The constructor arguments are ``fd.contextual_loss``'s, with the same defaults.

    Args:
        k: neighbourhood size, ``2 <= k <= B``.
        eps: the ε band added to ``−D`` before the neighbourhood tests.
        context_weight: weight of the contextual term.
        contrastive_weight: weight of the margin contrastive term.
        reg_weight: weight of the mean-similarity regulariser.
        reg_target: the regulariser's target mean similarity.
        pos_margin: ``m+`` of the contrastive term.
        neg_margin: ``m−`` of the contrastive term.
        ste_slope: the straight-through estimator's slope.
        normalize: cosine similarity (default) or raw dot products.
        process_group: a ``torch.distributed`` group: each rank passes its shard and gets the loss of the global
            batch (docs/spec.md §5). Default ``None``: one process.

    ``forward(embeddings, labels, ref_emb=None, ref_labels=None)``: self mode only (the loss is defined on the
    batch's own neighbourhoods).

    Returns:
        A 0-dim fp32 loss (float64 for float64 inputs).

    Raises:
        ValueError: ``ref_emb`` / ``ref_labels`` given, or the op's input errors.

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> loss = fd.losses.ContextualLoss(k=4, eps=0.05)(emb, labels)
        >>> torch.allclose(loss, fd.contextual_loss(emb, labels, k=4, eps=0.05))
        True
    """

    def __init__(self, k: int = 4, eps: float = 0.05, context_weight: float = 0.4, contrastive_weight: float = 0.5,
                 reg_weight: float = 0.1, reg_target: float = 0.25, pos_margin: float = 0.75, neg_margin: float = 0.6,
                 ste_slope: float = 10.0, normalize: bool = True, process_group=None):
        super().__init__()
        self.process_group = process_group
        self.kwargs = dict(k=k, eps=eps, context_weight=context_weight, contrastive_weight=contrastive_weight,
                           reg_weight=reg_weight, reg_target=reg_target, pos_margin=pos_margin,
                           neg_margin=neg_margin, ste_slope=ste_slope, normalize=normalize)

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None) -> Tensor:
        _no_cross_mode(self, ref_emb, ref_labels)
        return ops.contextual.contextual_loss(embeddings, labels, **self.kwargs, process_group=self.process_group)


# --------------------------------------------------------------------------- pytorch-metric-learning's pair losses
# Self mode with ``labels``; cross mode with ``ref_emb`` and ``ref_labels`` (both required there).
class _AnchorLoss(nn.Module):
    """Shared forward of the four pml pair-loss modules: ``fd.<_fn>(embeddings, labels, ref_emb, ref_labels,
    **self._kwargs())``."""

    _fn = ""
    process_group = None

    def _kwargs(self) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None) -> Tensor:
        import flashdml

        return getattr(flashdml, self._fn)(embeddings, labels, ref_emb, ref_labels, **self._kwargs(),
                                           process_group=self.process_group)


class SupConLoss(_AnchorLoss):
    """``fd.supcon`` (pytorch-metric-learning's ``SupConLoss``) as a module: per anchor, the mean over its
    positives of ``−log softmax`` over all its other columns, averaged over the anchors whose loss is ``> 0``.

    Args:
        temperature: ``> 0``; a float, or the initial value when ``learnable_temperature``.
        learnable_temperature: make the temperature an ``nn.Parameter``.
        process_group: a ``torch.distributed`` group: each rank passes its shard and gets the loss of the global
            batch (docs/spec.md §5). Default ``None``: one process.

    ``forward(embeddings, labels=None, ref_emb=None, ref_labels=None)``: self mode with ``labels``; cross mode
    with ``ref_emb`` and ``ref_labels`` (as the function's ``y``, ``ref_labels``).

    Returns:
        A 0-dim fp32 loss (float64 for float64 inputs); 0 when the batch has no positive or no negative pair.

    Raises:
        ValueError / TypeError: the op's input errors (shapes, dtypes, ``ref_labels`` without ``ref_emb``).

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> crit = fd.losses.SupConLoss(temperature=0.1, learnable_temperature=True)
        >>> torch.allclose(crit(emb, labels), fd.supcon(emb, labels, temperature=0.1))
        True
    """

    _fn = "supcon"

    def __init__(self, temperature: float = 0.1, learnable_temperature: bool = False, process_group=None):
        super().__init__()
        self.process_group = process_group
        self.temperature = _temperature_parameter(temperature, learnable_temperature)

    def _kwargs(self):
        return dict(temperature=self.temperature)


class MultiSimilarityLoss(_AnchorLoss):
    """``fd.multi_similarity`` (pytorch-metric-learning's ``MultiSimilarityLoss``) as a module: per anchor
    ``(1/α) log(1 + Σ_p e^{−α(s_ap − base)}) + (1/β) log(1 + Σ_n e^{β(s_an − base)})``, averaged over anchors.

    Args:
        alpha: the positives' scale ``α > 0``.
        beta: the negatives' scale ``β > 0``.
        base: the similarity both terms are centred on.
        process_group: a ``torch.distributed`` group: each rank passes its shard and gets the loss of the global
            batch (docs/spec.md §5). Default ``None``: one process.

    ``forward(embeddings, labels=None, ref_emb=None, ref_labels=None)``: self mode with ``labels``; cross mode
    with ``ref_emb`` and ``ref_labels`` (as the function's ``y``, ``ref_labels``).

    Returns:
        A 0-dim fp32 loss (float64 for float64 inputs).

    Raises:
        ValueError / TypeError: the op's input errors (shapes, dtypes, ``ref_labels`` without ``ref_emb``).

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> loss = fd.losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)(emb, labels)
        >>> torch.allclose(loss, fd.multi_similarity(emb, labels, alpha=2.0, beta=50.0, base=0.5))
        True
    """

    _fn = "multi_similarity"

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, process_group=None):
        super().__init__()
        self.process_group = process_group
        self.alpha, self.beta, self.base = alpha, beta, base

    def _kwargs(self):
        return dict(alpha=self.alpha, beta=self.beta, base=self.base)


class CircleLoss(_AnchorLoss):
    """``fd.circle`` (pytorch-metric-learning's ``CircleLoss``, Sun et al.) as a module: per anchor
    ``softplus(LSE_p γ α_p (Δ_p − s_ap) + LSE_n γ α_n (s_an − Δ_n))`` with the detached weights
    ``α_p = [1 + m − s_ap]_+``, ``α_n = [s_an + m]_+``, ``Δ_p = 1 − m``, ``Δ_n = m``, averaged over the anchors
    whose loss is ``> 0`` (anchors without positives or without negatives count as 0).

    Args:
        m: the relaxation margin.
        gamma: the scale ``γ``.
        process_group: a ``torch.distributed`` group: each rank passes its shard and gets the loss of the global
            batch (docs/spec.md §5). Default ``None``: one process.

    ``forward(embeddings, labels=None, ref_emb=None, ref_labels=None)``: self mode with ``labels``; cross mode
    with ``ref_emb`` and ``ref_labels`` (as the function's ``y``, ``ref_labels``).

    Returns:
        A 0-dim fp32 loss (float64 for float64 inputs).

    Raises:
        ValueError / TypeError: the op's input errors (shapes, dtypes, ``ref_labels`` without ``ref_emb``).

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> torch.allclose(fd.losses.CircleLoss(m=0.25, gamma=128.0)(emb, labels),
        ...                fd.circle(emb, labels, m=0.25, gamma=128.0))
        True
    """

    _fn = "circle"

    def __init__(self, m: float = 0.4, gamma: float = 80.0, process_group=None):
        super().__init__()
        self.process_group = process_group
        self.m, self.gamma = m, gamma

    def _kwargs(self):
        return dict(m=self.m, gamma=self.gamma)


class TripletMarginLoss(_AnchorLoss):
    """``fd.triplet_margin`` (pytorch-metric-learning's ``TripletMarginLoss``) as a module: every triplet
    ``(a, p, n)`` of the batch, ``[d_ap − d_an + margin]_+`` with ``d`` the L2 distance of the normalised
    embeddings, averaged over the triplets whose term is ``> 0``; the triplets are streamed, never listed.

    Args:
        margin: the margin between the positive and the negative distance.
        process_group: a ``torch.distributed`` group: each rank passes its shard and gets the loss of the global
            batch (docs/spec.md §5). Default ``None``: one process.

    ``forward(embeddings, labels=None, ref_emb=None, ref_labels=None)``: self mode with ``labels``; cross mode
    with ``ref_emb`` and ``ref_labels`` (as the function's ``y``, ``ref_labels``).

    Returns:
        A 0-dim fp32 loss (float64 for float64 inputs); 0 when no triplet violates the margin.

    Raises:
        ValueError / TypeError: the op's input errors (shapes, dtypes, ``ref_labels`` without ``ref_emb``).

    Example:
        >>> import torch, flashdml as fd
        >>> emb, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> bank, bank_labels = torch.randn(32, 8), torch.arange(32) // 8
        >>> crit = fd.losses.TripletMarginLoss(margin=0.1)
        >>> torch.allclose(crit(emb, labels, bank, bank_labels),             # cross mode
        ...                fd.triplet_margin(emb, labels, bank, bank_labels, margin=0.1))
        True
    """

    _fn = "triplet_margin"

    def __init__(self, margin: float = 0.05, process_group=None):
        super().__init__()
        self.process_group = process_group
        self.margin = margin

    def _kwargs(self):
        return dict(margin=self.margin)
