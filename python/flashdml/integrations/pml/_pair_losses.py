"""pml drop-ins for SupCon, Multi-Similarity, Circle and Triplet-Margin (re-exported by
``flashdml.integrations.pml.losses``): subclasses of pml's classes that run ``flashdml.supcon``,
``.multi_similarity``, ``.circle`` and ``.triplet_margin`` when the call is one they compute exactly, and pml
itself otherwise.

Fused only with pml's default distance and reducer (exact types, no subclass), fp32 embeddings and the all-pairs
(all-triplets) case. Each of these runs pml instead:

* any ``indices_tuple`` (a miner's), ``labels=None``, non-integer labels, ``ref_emb`` without its own
  ``ref_labels``, an ``embedding_regularizer``, ``collect_stats`` (see the package docstring);
* float64 embeddings (pml is exact there already), and fp16 / bf16 ones: pml computes in that precision, flashdml
  accumulates in fp32 and rounds once, so the two differ by an ulp or more of the half type (pml's own
  ``test_circle_loss`` in fp16 tells them apart); ``flashdml.<op>`` itself takes half-precision input;
* another distance, or the default one with other settings (``power``, ``p``, ``normalize_embeddings``);
  another reducer, or ``AvgNonZeroReducer`` with other thresholds;
* batches where pml's ``GenericPairLoss`` takes its zero-loss shortcut (at most one positive and at most one
  negative pair in all; SupCon, Multi-Similarity, Circle);
* SupCon: a ``temperature`` that is neither a real number nor a 0-dim tensor;
* Circle: ``op``, ``on``, ``delta_p``, ``delta_n`` no longer derived from ``m`` (pml computes them once in its
  constructor and reads them, not ``m``, in the loss);
* Triplet: ``swap=True``, ``smooth_loss=True``, ``triplets_per_anchor`` other than ``"all"``.
"""
from __future__ import annotations

import numbers

import torch
from pytorch_metric_learning import losses as _pml_losses
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.reducers import AvgNonZeroReducer, MeanReducer

import flashdml as _fd
from flashdml._docs import shared_doc

from .losses import _FlashdmlForward, _group_kw, _is_real, _plain_distance

__all__ = ["SupConLoss", "MultiSimilarityLoss", "CircleLoss", "TripletMarginLoss"]

_FUSED_DTYPES = (torch.float32,)


def _avg_non_zero(reducer) -> bool:
    return type(reducer) is AvgNonZeroReducer and reducer.low == 0 and reducer.high is None


def _cosine(distance) -> bool:
    return _plain_distance(distance, (CosineSimilarity,)) and bool(distance.normalize_embeddings)


def _pair_counts(labels, ref_labels) -> tuple[int, int]:
    """(|P|, |N|) of the batch: self mode (``ref_labels is None``) leaves out the diagonal."""
    classes, counts = torch.unique(labels, return_counts=True)
    if ref_labels is None:
        n_pos = int((counts * counts).sum()) - labels.shape[0]
        return n_pos, labels.shape[0] * (labels.shape[0] - 1) - n_pos
    ref_classes, ref_counts = torch.unique(ref_labels, return_counts=True)
    at = torch.searchsorted(classes, ref_classes).clamp(max=classes.shape[0] - 1)
    hit = classes[at] == ref_classes
    n_pos = int((counts[at] * ref_counts * hit).sum())
    return n_pos, labels.shape[0] * ref_labels.shape[0] - n_pos


class _PairFused(_FlashdmlForward):
    """The shared conditions of the four drop-ins (above ``_FlashdmlForward``'s)."""

    _pair_shortcut = True  # pml's GenericPairLoss: zero loss when |P| <= 1 and |N| <= 1

    def _fused_args(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        args = super()._fused_args(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if args is None or args[0].dtype not in _FUSED_DTYPES:
            return None
        # (with process_group the shortcut is the global batch's, which the functional op decides)
        if self._pair_shortcut and self.process_group is None and max(_pair_counts(args[1], args[3])) <= 1:
            return None
        return args


@shared_doc
class SupConLoss(_PairFused, _pml_losses.SupConLoss):
    """pml's ``SupConLoss(temperature=0.1, **kwargs)`` computed by ``flashdml.supcon``.

    Fused with the defaults ``distance=CosineSimilarity()`` and ``reducer=AvgNonZeroReducer()``; ``temperature``
    may be a 0-dim tensor (learnable). The other cases run pml (the module docstring lists them).

    Args:
        temperature: ``> 0``, float or 0-dim tensor. **kwargs: pml's (``distance``, ``reducer``, ...).
        {{pml_dropin_process_group_arg}}

    {{pml_dropin_returns_raises}}

    Example:
        >>> import torch
        >>> from pytorch_metric_learning import losses as pml_losses
        >>> from flashdml.integrations.pml import SupConLoss
        >>> embeddings, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> torch.allclose(SupConLoss(temperature=0.1)(embeddings, labels),
        ...                pml_losses.SupConLoss(temperature=0.1)(embeddings, labels))
        True
    """

    def _options_supported(self, embeddings):
        t = self.temperature
        return (_avg_non_zero(self.reducer) and _cosine(self.distance)
                and (_is_real(t) or (isinstance(t, torch.Tensor) and t.dim() == 0 and t.is_floating_point())))

    def _flashdml_loss(self, x, labels, y, ref_labels):
        return _fd.supcon(x, labels, y, ref_labels, temperature=self.temperature, **_group_kw(self))


@shared_doc
class MultiSimilarityLoss(_PairFused, _pml_losses.MultiSimilarityLoss):
    """pml's ``MultiSimilarityLoss(alpha=2, beta=50, base=0.5, **kwargs)`` computed by ``flashdml.multi_similarity``.

    Fused with the defaults ``distance=CosineSimilarity()`` and ``reducer=MeanReducer()`` (pml averages over
    every anchor); the other cases run pml (the module docstring lists them).

    Args:
        alpha, beta, base, **kwargs: pml's constructor arguments.
        {{pml_dropin_process_group_arg}}

    {{pml_dropin_returns_raises}}

    Example:
        >>> import torch
        >>> from pytorch_metric_learning import losses as pml_losses
        >>> from flashdml.integrations.pml import MultiSimilarityLoss
        >>> embeddings, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> torch.allclose(MultiSimilarityLoss()(embeddings, labels), pml_losses.MultiSimilarityLoss()(embeddings, labels))
        True
    """

    def _options_supported(self, embeddings):
        return (type(self.reducer) is MeanReducer and _cosine(self.distance)
                and _is_real(self.alpha, self.beta, self.base))

    def _flashdml_loss(self, x, labels, y, ref_labels):
        return _fd.multi_similarity(x, labels, y, ref_labels, alpha=self.alpha, beta=self.beta, base=self.base,
                                    **_group_kw(self))


@shared_doc
class CircleLoss(_PairFused, _pml_losses.CircleLoss):
    """pml's ``CircleLoss(m=0.4, gamma=80, **kwargs)`` computed by ``flashdml.circle``.

    Fused with the defaults ``distance=CosineSimilarity()`` and ``reducer=AvgNonZeroReducer()``; the other cases
    run pml (the module docstring lists them).

    Args:
        m, gamma, **kwargs: pml's constructor arguments.
        {{pml_dropin_process_group_arg}}

    {{pml_dropin_returns_raises}}

    Example:
        >>> import torch
        >>> from pytorch_metric_learning import losses as pml_losses
        >>> from flashdml.integrations.pml import CircleLoss
        >>> embeddings, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> torch.allclose(CircleLoss(m=0.25, gamma=64)(embeddings, labels),
        ...                pml_losses.CircleLoss(m=0.25, gamma=64)(embeddings, labels))
        True
    """

    def _options_supported(self, embeddings):
        m = self.m
        return (_avg_non_zero(self.reducer) and _cosine(self.distance) and _is_real(m, self.gamma)
                and (self.op, self.on, self.delta_p, self.delta_n) == (1 + m, -m, 1 - m, m))

    def _flashdml_loss(self, x, labels, y, ref_labels):
        return _fd.circle(x, labels, y, ref_labels, m=self.m, gamma=self.gamma, **_group_kw(self))


@shared_doc
class TripletMarginLoss(_PairFused, _pml_losses.TripletMarginLoss):
    """pml's ``TripletMarginLoss(margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all", **kwargs)``
    computed by ``flashdml.triplet_margin``, which streams the triplets instead of listing them.

    Fused with the defaults: ``distance=LpDistance()`` (L2 of normalised embeddings, power 1),
    ``reducer=AvgNonZeroReducer()``, ``swap=False``, ``smooth_loss=False``, ``triplets_per_anchor="all"``; the
    other cases run pml (the module docstring lists them).

    Args:
        margin, swap, smooth_loss, triplets_per_anchor, **kwargs: pml's constructor arguments.
        {{pml_dropin_process_group_arg}}

    {{pml_dropin_returns_raises}}

    Example:
        >>> import torch
        >>> from pytorch_metric_learning import losses as pml_losses
        >>> from flashdml.integrations.pml import TripletMarginLoss
        >>> embeddings, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> torch.allclose(TripletMarginLoss(margin=0.2)(embeddings, labels),
        ...                pml_losses.TripletMarginLoss(margin=0.2)(embeddings, labels))
        True
    """

    _pair_shortcut = False  # no pair shortcut: pml's zero loss without triplets is fd.triplet_margin's too

    def _options_supported(self, embeddings):
        d = self.distance
        return (_avg_non_zero(self.reducer) and type(d) is LpDistance and d.normalize_embeddings and d.p == 2
                and d.power == 1 and not self.swap and not self.smooth_loss and self.triplets_per_anchor == "all"
                and _is_real(self.margin))

    def _flashdml_loss(self, x, labels, y, ref_labels):
        return _fd.triplet_margin(x, labels, y, ref_labels, margin=self.margin, **_group_kw(self))
