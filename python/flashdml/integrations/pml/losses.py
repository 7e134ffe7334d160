"""pml loss drop-ins (``flashdml.integrations.pml.losses``): subclasses of pml's losses that run flashdml's fused
ops when the call is one flashdml covers exactly, and pml itself otherwise (see the package docstring)."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor
from pytorch_metric_learning import losses as _pml_losses
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
from pytorch_metric_learning.reducers import AvgNonZeroReducer, MeanReducer, MultipleReducers
from pytorch_metric_learning.utils import common_functions as _c_f

import flashdml as _fd

__all__ = ["ThresholdConsistentMarginLoss", "NTXentLoss", "ContrastiveLoss", "CrossExampleSoftmaxLoss"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _is_real(*values) -> bool:
    return all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)


def _plain_distance(distance, types) -> bool:
    """``distance`` is exactly one of ``types`` (no subclass that could override ``compute_mat``), power 1,
    and, when it normalises, with the L2 norm."""
    return (type(distance) in types and distance.power == 1
            and (not distance.normalize_embeddings or distance.p == 2))


class _FlashdmlForward:
    """Mixin placed before the pml class: ``forward`` runs flashdml when ``_fused_args`` says it may."""

    def _options_supported(self, embeddings: Tensor) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def _flashdml_loss(self, x: Tensor, labels: Tensor, y, ref_labels) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _fused_args(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """``(x, labels, y, ref_labels)`` for flashdml (``y = ref_labels = None`` in self mode), or None: run pml."""
        if indices_tuple is not None or labels is None:
            return None
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.dtype not in _FLOAT_DTYPES:
            return None
        if embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
            return None
        if getattr(self, "embedding_regularizer", None) is not None:
            return None
        if any(getattr(m, "collect_stats", False) for m in self.modules()):
            return None
        _c_f.check_shapes(embeddings, labels)  # pml's own errors for mismatched labels
        labels = _c_f.to_device(labels, embeddings)
        if labels.dtype not in _INT_DTYPES:
            return None
        # Self mode exactly when pml's get_matches_and_diffs would drop the diagonal (``ref_labels is labels``).
        if ref_emb is None:
            ref_emb, ref_labels = None, None
        else:
            if ref_labels is not None:
                ref_labels = _c_f.to_device(ref_labels, ref_emb)
            if ref_labels is None or ref_labels is labels:
                if ref_emb is not embeddings:
                    return None  # pml-only semantics: labels reused for the references, diagonal dropped
                ref_emb, ref_labels = None, None
            elif (not isinstance(ref_emb, Tensor) or ref_emb.dtype != embeddings.dtype
                  or ref_labels.dtype not in _INT_DTYPES or ref_emb.dim() != 2 or ref_emb.shape[0] == 0):
                return None
        if not self._options_supported(embeddings):
            return None
        return embeddings, labels, ref_emb, ref_labels

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        args = self._fused_args(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if args is None:
            return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self.reset_stats()
        return self._flashdml_loss(*args).to(embeddings.dtype)


class ThresholdConsistentMarginLoss(_FlashdmlForward, _pml_losses.ThresholdConsistentMarginLoss):
    """pml's ``ThresholdConsistentMarginLoss`` (same arguments) computed by ``flashdml.threshold_consistent_margin``.

    ``ThresholdConsistentMarginLoss(lambda_plus=1.0, lambda_minus=1.0, margin_plus=0.9, margin_minus=0.5, **kwargs)``;
    docs/spec.md §2.3 with ``pos_weight=lambda_plus``, ``neg_weight=lambda_minus``, ``pos_margin=margin_plus``,
    ``neg_margin=margin_minus``. Equal to pml in self mode. **Cross mode differs from pml on purpose**: pml indexes
    the query embeddings with the reference indices (``ref_emb`` is never read), this compares queries with
    ``ref_emb``. A miner's ``indices_tuple``, a non-default reducer or an embedding regularizer run pml.
    """

    def _options_supported(self, embeddings):
        return (type(self.reducer) is MeanReducer
                and _is_real(self.lambda_plus, self.lambda_minus, self.margin_plus, self.margin_minus))

    def _flashdml_loss(self, x, labels, y, ref_labels):
        return _fd.threshold_consistent_margin(
            x, labels, y, ref_labels, pos_margin=self.margin_plus, neg_margin=self.margin_minus,
            pos_weight=self.lambda_plus, neg_weight=self.lambda_minus)


class NTXentLoss(_FlashdmlForward, _pml_losses.NTXentLoss):
    """pml's ``NTXentLoss(temperature=0.07, **kwargs)`` computed by ``flashdml.ntxent`` (docs/spec.md §2.1b).

    Fused for ``CosineSimilarity()`` (the default) and ``DotProductSimilarity()`` (``normalize=False``), power 1,
    with the default ``MeanReducer``; pml's |P|×|N| buffer is never built. ``temperature`` may be a 0-dim tensor
    (learnable). A miner's ``indices_tuple``, other distances or reducers, or an embedding regularizer run pml.
    """

    def _options_supported(self, embeddings):
        return (type(self.reducer) is MeanReducer
                and _plain_distance(self.distance, (CosineSimilarity, DotProductSimilarity)))

    def _flashdml_loss(self, x, labels, y, ref_labels):
        return _fd.ntxent(x, labels, y, ref_labels, temperature=self.temperature,
                          normalize=bool(self.distance.normalize_embeddings))


def _default_avg_non_zero(reducer) -> bool:
    """pml's default Contrastive reducer: ``AvgNonZeroReducer`` on each of ``pos_loss`` and ``neg_loss``, summed."""
    if type(reducer) is not MultipleReducers or set(reducer.reducers.keys()) != {"pos_loss", "neg_loss"}:
        return False
    return all(type(r) is AvgNonZeroReducer and r.low == 0 and r.high is None for r in reducer.reducers.values())


class ContrastiveLoss(_FlashdmlForward, _pml_losses.ContrastiveLoss):
    """pml's ``ContrastiveLoss(pos_margin=0, neg_margin=1, **kwargs)``, computed by ``flashdml.contrastive_margin``
    when ``distance=CosineSimilarity()``.

    With cosine similarity pml's loss is docs/spec.md §2.4's ``Σ_P [m+ − s]_+ / #{hinge > 0} + Σ_N [s − m−]_+ / #{hinge > 0}``
    with ``m+ = pos_margin``, ``m− = neg_margin`` (``AvgNonZeroReducer`` on each term, summed). The defaults
    ``pos_margin=0, neg_margin=1`` are pml's, meant for its default ``LpDistance`` — which always runs pml; with
    cosine similarity pass margins such as ``pos_margin=0.75, neg_margin=0.6`` (the contextual paper's).
    docs/spec.md §2.4 keeps the self-pair (i, i) as a positive and pml drops it; they agree while its hinge is 0, so the
    fused path also requires ``pos_margin < 1 − tol`` and, for ``pos_margin > 0``, no (near-)zero row.
    """

    def _options_supported(self, embeddings):
        if not (_default_avg_non_zero(self.reducer) and _plain_distance(self.distance, (CosineSimilarity,))
                and _is_real(self.pos_margin, self.neg_margin)):
            return False
        tol = 1e-2 if embeddings.dtype in (torch.float16, torch.bfloat16) else 1e-3
        if self.pos_margin >= 1.0 - tol:
            return False  # the kept diagonal (s_ii ≈ 1) could count as a positive hinge
        if self.pos_margin > 0:
            norms = torch.linalg.vector_norm(embeddings.detach().float(), dim=1)
            if bool((norms < 1e-11).any()):
                return False  # x / max(‖x‖, 1e-12) has s_ii < 1 (0 for a zero row): the diagonal would count
        return True

    def _flashdml_loss(self, x, labels, y, ref_labels):
        return _fd.contrastive_margin(x, labels, y, ref_labels, pos_margin=self.pos_margin,
                                      neg_margin=self.neg_margin)


class CrossExampleSoftmaxLoss(_pml_losses.BaseMetricLossFunction):
    """Cross-Example Softmax (Veit & Wilber; docs/spec.md §2.2) in pml's loss interface, computed by
    ``flashdml.cross_example_softmax``.

    ``CrossExampleSoftmaxLoss(temperature=0.05, top_k=None, **kwargs)``: every positive pair competes against one
    batch-wide pool of negatives, ``L = mean_P softplus(LSE_N z − z_p)``; ``top_k=k`` keeps the k hardest
    negatives of the whole batch (Cross-Example Negative Mining). ``kwargs`` are pml's (``distance``, ``reducer``,
    ``embedding_regularizer``, …): the distance must be ``CosineSimilarity()`` (default) or
    ``DotProductSimilarity()`` (raw dot products), power 1; the loss is returned "already reduced", so the default
    reducer passes it through and a regularizer is added on top. ``temperature`` may be a learnable 0-dim tensor.

    ``forward(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)``:

    * self mode (``ref_emb=None``): pairs ``(i, i)`` are dropped; ``labels=None`` then leaves no positive pair and
      the loss is 0;
    * cross mode: ``ref_emb`` with ``ref_labels`` (required when ``labels`` is given); ``labels=ref_labels=None``
      is pair mode, row i of ``embeddings`` matching row i of ``ref_emb`` (image–text batches);
    * ``indices_tuple`` (a miner's output) is not supported and raises ``ValueError``: the loss needs the whole
      batch's negatives; use ``top_k`` for mining.

    Returns a 0-dim fp32 loss (float64 for float64 embeddings).
    """

    def __init__(self, temperature=0.05, top_k=None, **kwargs):
        super().__init__(**kwargs)
        _c_f.assert_distance_type(self, DotProductSimilarity)  # CosineSimilarity is a DotProductSimilarity
        self.temperature = temperature
        self.top_k = top_k
        self.add_to_recordable_attributes(list_of_names=["temperature"], is_stat=False)

    def get_default_distance(self):
        return CosineSimilarity()

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if indices_tuple is not None:
            raise ValueError(
                "CrossExampleSoftmaxLoss does not take an indices_tuple (miner output): every positive competes "
                "against the whole batch's negatives; use top_k=k for Cross-Example Negative Mining instead")
        return super().forward(embeddings, labels, None, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if not _plain_distance(self.distance, (CosineSimilarity, DotProductSimilarity)):
            raise ValueError("CrossExampleSoftmaxLoss supports distance=CosineSimilarity() or DotProductSimilarity() "
                             f"with power=1 (and p=2 when normalising), got {self.distance!r}")
        # BaseMetricLossFunction.forward filled ref_emb/ref_labels with embeddings/labels in self mode.
        if ref_emb is embeddings and ref_labels is labels:
            ref_emb, ref_labels = None, None
        loss = _fd.cross_example_softmax(embeddings, ref_emb, labels, ref_labels, temperature=self.temperature,
                                         top_k=self.top_k, normalize=bool(self.distance.normalize_embeddings))
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}
