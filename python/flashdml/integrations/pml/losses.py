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
from flashdml._docs import shared_doc
from flashdml._math import l2_normalize

from ._excluded import AllPairsExcept, dense_xent_excluding, excluded_self_pairs, xent_excluding

__all__ = ["ThresholdConsistentMarginLoss", "NTXentLoss", "ContrastiveLoss", "CrossExampleSoftmaxLoss",
           "CrossBatchMemory", "SelfSupervisedLoss", "SupConLoss", "MultiSimilarityLoss", "CircleLoss",
           "TripletMarginLoss"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _is_real(*values) -> bool:
    return all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)


def _plain_distance(distance, types) -> bool:
    """``distance`` is exactly one of ``types`` (no subclass that could override ``compute_mat``), power 1,
    and, when it normalises, with the L2 norm."""
    return (type(distance) in types and distance.power == 1
            and (not distance.normalize_embeddings or distance.p == 2))


def _exclusion_is_inert(x: Tensor, y: Tensor, excl: Tensor, pos_margin) -> bool:
    """Whether dropping the positive pairs ``(i, excl[i])`` cannot change a hinge loss whose positive term only
    counts pairs with ``s <= pos_margin``: every excluded pair's cosine is above the margin by more than rounding
    (the usual case: the query's own copy, ``s = 1``). Then the loss over all pairs equals the loss without them."""
    rows = (excl >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return True
    xh = l2_normalize(x.detach().float()[rows])
    yh = l2_normalize(y.detach().float()[excl[rows]])
    tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-3
    return bool(((xh * yh).sum(-1) > pos_margin + tol).all())


def _recognise(indices_tuple, labels, ref_labels):
    """``excl`` for an all-pairs tuple (``AllPairsExcept`` or pml's tensors), checked against these labels."""
    if isinstance(indices_tuple, AllPairsExcept):
        ok = indices_tuple.labels is labels or torch.equal(indices_tuple.labels, labels)
        ok = ok and (indices_tuple.ref_labels is ref_labels or torch.equal(indices_tuple.ref_labels, ref_labels))
        return indices_tuple.excl if ok else None
    if not isinstance(indices_tuple, (tuple, list)) or all(len(t) <= 1 for t in indices_tuple):
        return None  # pml's own zero-loss shortcut
    return excluded_self_pairs(labels, ref_labels, indices_tuple)


def _group_kw(loss) -> dict:
    """``{"process_group": group}`` for the functional op when the loss was built with one, else ``{}``."""
    group = getattr(loss, "process_group", None)
    return {} if group is None else {"process_group": group}


def _needs_fused(name: str):
    return ValueError(
        f"{name}(process_group=...) runs flashdml's fused op on the global batch (docs/spec.md §5), which this "
        "call does not reach (an indices_tuple, labels=None, an unsupported distance, reducer or regularizer, or "
        "inputs the fused op does not take): drop process_group, e.g. to wrap the loss in pml's "
        "DistributedLossWrapper instead")


class _FlashdmlForward:
    """Mixin placed before the pml class: ``forward`` runs flashdml when ``_fused_args`` says it may.

    ``process_group=`` (a keyword of every drop-in's constructor, default ``None``): each rank passes its own
    shard and the loss is the fused op's global-batch loss (docs/spec.md §5: the concatenated batch's value on
    every rank, W × its gradient); a call only pml could run raises ``ValueError`` instead of computing a local
    loss."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

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
        # a rank's shard may be empty (process_group): the functional op takes it
        if (embeddings.shape[0] == 0 and getattr(self, "process_group", None) is None) or embeddings.shape[1] == 0:
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

    def _flashdml_loss_excluding(self, x, labels, y, ref_labels, excl):  # pragma: no cover - NT-Xent overrides
        return None

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """pml's ``forward``: flashdml where it covers the call exactly, pml otherwise (see the module docstring).

        Args:
            embeddings: ``[B, d]`` float queries. labels: int ``[B]`` (``None`` runs pml).
            indices_tuple: ``None``, or (NT-Xent only) the all-pairs tuple ``CrossBatchMemory`` /
                ``DistributedLossWrapper(efficient=True)`` build, which runs fused; any other tuple runs pml.
            ref_emb, ref_labels: cross mode, ``[M, d]`` and int ``[M]``.

        Returns:
            A 0-dim loss of the embeddings' dtype.

        Raises:
            Whatever pml raises for the call (mismatched shapes, ...).
        """
        if getattr(self, "process_group", None) is not None:
            args = None if indices_tuple is not None else \
                self._fused_args(embeddings, labels, None, ref_emb, ref_labels)
            if args is None:
                raise _needs_fused(type(self).__name__)
            self.reset_stats()
            return self._flashdml_loss(*args).to(embeddings.dtype)
        if indices_tuple is not None:
            loss = self._tuple_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
            if loss is not None:
                return loss
            if isinstance(indices_tuple, AllPairsExcept):
                indices_tuple = indices_tuple.materialize()
            return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        args = self._fused_args(embeddings, labels, None, ref_emb, ref_labels)
        if args is None:
            return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self.reset_stats()
        return self._flashdml_loss(*args).to(embeddings.dtype)

    def _tuple_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """The fused loss for a recognised all-pairs tuple, or None (pml runs)."""
        if type(self)._flashdml_loss_excluding is _FlashdmlForward._flashdml_loss_excluding:
            return None  # this loss has no fused all-pairs path: skip the check
        if ref_emb is not None and ref_emb is not embeddings and (ref_labels is None or ref_labels is labels):
            return None
        args = self._fused_args(embeddings, labels, None, ref_emb, ref_labels)
        if args is None:
            return None
        x, labels, y, ref_labels = args
        y, ref_labels = (x, labels) if y is None else (y, ref_labels)
        excl = _recognise(indices_tuple, labels, ref_labels)
        if excl is None:
            return None
        loss = self._flashdml_loss_excluding(x, labels, y, ref_labels, excl)
        if loss is None:
            return None
        self.reset_stats()
        return loss.to(embeddings.dtype)


@shared_doc
class ThresholdConsistentMarginLoss(_FlashdmlForward, _pml_losses.ThresholdConsistentMarginLoss):
    """pml's ``ThresholdConsistentMarginLoss`` (same arguments) computed by ``flashdml.threshold_consistent_margin``.

    ``ThresholdConsistentMarginLoss(lambda_plus=1.0, lambda_minus=1.0, margin_plus=0.9, margin_minus=0.5, **kwargs)``;
    docs/spec.md §2.3 with ``pos_weight=lambda_plus``, ``neg_weight=lambda_minus``, ``pos_margin=margin_plus``,
    ``neg_margin=margin_minus``. Equal to pml in self mode. **Cross mode differs from pml on purpose**: pml indexes
    the query embeddings with the reference indices (``ref_emb`` is never read), this compares queries with
    ``ref_emb``. The all-pairs tuples of ``CrossBatchMemory`` and ``DistributedLossWrapper(efficient=True)`` run
    fused in cross mode when no excluded pair (the query's own copy) can be a hard positive (``s > margin_plus``
    beyond rounding) — pml's TCM fails there. A miner's ``indices_tuple``, a non-default reducer or an embedding
    regularizer run pml.

    Args:
        lambda_plus, lambda_minus, margin_plus, margin_minus, **kwargs: pml's constructor arguments.
        {{pml_dropin_process_group_arg}}

    {{pml_dropin_returns_raises}}

    Example:
        >>> import torch
        >>> from pytorch_metric_learning import losses as pml_losses
        >>> from flashdml.integrations.pml import ThresholdConsistentMarginLoss
        >>> embeddings, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> loss = ThresholdConsistentMarginLoss(margin_plus=0.9, margin_minus=0.5)(embeddings, labels)
        >>> pml_loss = pml_losses.ThresholdConsistentMarginLoss(margin_plus=0.9, margin_minus=0.5)(embeddings, labels)
        >>> torch.allclose(loss, pml_loss)                       # self mode: pml's value
        True
    """

    def _options_supported(self, embeddings):
        return (type(self.reducer) is MeanReducer
                and _is_real(self.lambda_plus, self.lambda_minus, self.margin_plus, self.margin_minus))

    def _flashdml_loss_excluding(self, x, labels, y, ref_labels, excl):
        # the all-pairs tuples of CrossBatchMemory / DistributedLossWrapper(efficient=True): cross mode, exactly,
        # when no excluded pair could be a hard positive (pml's own TCM cannot run them: it indexes the queries
        # with reference indices)
        if not _exclusion_is_inert(x, y, excl, self.margin_plus):
            return None
        return self._flashdml_loss(x, labels, y, ref_labels)

    def _flashdml_loss(self, x, labels, y, ref_labels):
        return _fd.threshold_consistent_margin(
            x, labels, y, ref_labels, pos_margin=self.margin_plus, neg_margin=self.margin_minus,
            pos_weight=self.lambda_plus, neg_weight=self.lambda_minus, **_group_kw(self))


@shared_doc
class NTXentLoss(_FlashdmlForward, _pml_losses.NTXentLoss):
    """pml's ``NTXentLoss(temperature=0.07, **kwargs)`` computed by ``flashdml.ntxent`` (docs/spec.md §2.1b).

    Fused for ``CosineSimilarity()`` (the default) and ``DotProductSimilarity()`` (``normalize=False``), power 1,
    with the default ``MeanReducer``; pml's |P|×|N| buffer is never built. ``temperature`` may be a 0-dim tensor
    (learnable). A miner's ``indices_tuple``, other distances or reducers, or an embedding regularizer run pml.
    The all-pairs tuples of ``CrossBatchMemory`` (flashdml's or pml's) and ``DistributedLossWrapper(efficient=True)``
    are recognised and run fused (cross mode minus each query's own copy).

    Args:
        temperature: ``> 0``, float or 0-dim tensor. **kwargs: pml's (``distance``, ``reducer``, ...).
        {{pml_dropin_process_group_arg}}

    {{pml_dropin_returns_raises}}

    Example:
        >>> import torch
        >>> from pytorch_metric_learning import losses as pml_losses
        >>> from flashdml.integrations.pml import NTXentLoss
        >>> embeddings, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> loss_fn = NTXentLoss(temperature=0.07)
        >>> isinstance(loss_fn, pml_losses.NTXentLoss)
        True
        >>> torch.allclose(loss_fn(embeddings, labels), pml_losses.NTXentLoss(temperature=0.07)(embeddings, labels))
        True
    """

    def _options_supported(self, embeddings):
        return (type(self.reducer) is MeanReducer
                and _plain_distance(self.distance, (CosineSimilarity, DotProductSimilarity)))

    def _flashdml_loss(self, x, labels, y, ref_labels):
        return _fd.ntxent(x, labels, y, ref_labels, temperature=self.temperature,
                          normalize=bool(self.distance.normalize_embeddings), **_group_kw(self))

    def _flashdml_loss_excluding(self, x, labels, y, ref_labels, excl):
        return xent_excluding(x, y, labels, ref_labels, excl, temperature=self.temperature,
                              normalize=bool(self.distance.normalize_embeddings), global_partition=False)


def _default_avg_non_zero(reducer) -> bool:
    """pml's default Contrastive reducer: ``AvgNonZeroReducer`` on each of ``pos_loss`` and ``neg_loss``, summed."""
    if type(reducer) is not MultipleReducers or set(reducer.reducers.keys()) != {"pos_loss", "neg_loss"}:
        return False
    return all(type(r) is AvgNonZeroReducer and r.low == 0 and r.high is None for r in reducer.reducers.values())


@shared_doc
class ContrastiveLoss(_FlashdmlForward, _pml_losses.ContrastiveLoss):
    """pml's ``ContrastiveLoss(pos_margin=0, neg_margin=1, **kwargs)``, computed by ``flashdml.contrastive_margin``
    when ``distance=CosineSimilarity()``.

    With cosine similarity pml's loss is docs/spec.md §2.4's ``Σ_P [m+ − s]_+ / #{hinge > 0} + Σ_N [s − m−]_+ / #{hinge > 0}``
    with ``m+ = pos_margin``, ``m− = neg_margin`` (``AvgNonZeroReducer`` on each term, summed). The defaults
    ``pos_margin=0, neg_margin=1`` are pml's, meant for its default ``LpDistance`` — which always runs pml; with
    cosine similarity pass margins such as ``pos_margin=0.75, neg_margin=0.6`` (the contextual paper's).
    docs/spec.md §2.4 keeps the self-pair (i, i) as a positive and pml drops it; they agree while its hinge is 0, so the
    fused path also requires ``pos_margin < 1 − tol`` and, for ``pos_margin > 0``, no (near-)zero row. The
    all-pairs tuples of ``CrossBatchMemory`` / ``DistributedLossWrapper(efficient=True)`` run fused (cross mode)
    when every excluded pair has ``s > pos_margin`` beyond rounding: its hinge is 0, so it is neither summed nor
    counted.

    Args:
        pos_margin, neg_margin, **kwargs: pml's constructor arguments (pass ``distance=CosineSimilarity()`` for
            the fused path).
        {{pml_dropin_process_group_arg}}

    {{pml_dropin_returns_raises}}

    Example:
        >>> import torch
        >>> from pytorch_metric_learning import losses as pml_losses
        >>> from pytorch_metric_learning.distances import CosineSimilarity
        >>> from flashdml.integrations.pml import ContrastiveLoss
        >>> embeddings, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> loss = ContrastiveLoss(pos_margin=0.75, neg_margin=0.6, distance=CosineSimilarity())(embeddings, labels)
        >>> pml_fn = pml_losses.ContrastiveLoss(pos_margin=0.75, neg_margin=0.6, distance=CosineSimilarity())
        >>> torch.allclose(loss, pml_fn(embeddings, labels))
        True
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

    def _flashdml_loss_excluding(self, x, labels, y, ref_labels, excl):
        # an excluded positive with s > m+ has hinge 0, which AvgNonZeroReducer neither adds nor counts
        if not _exclusion_is_inert(x, y, excl, self.pos_margin):
            return None
        return self._flashdml_loss(x, labels, y, ref_labels)

    def _flashdml_loss(self, x, labels, y, ref_labels):
        return _fd.contrastive_margin(x, labels, y, ref_labels, pos_margin=self.pos_margin,
                                      neg_margin=self.neg_margin, **_group_kw(self))


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
      batch's negatives; use ``top_k`` for mining. The all-pairs tuples of ``CrossBatchMemory`` /
      ``DistributedLossWrapper(efficient=True)`` are accepted (without ``top_k``) and run fused.

    Args:
        temperature: ``> 0``, float or 0-dim tensor.
        top_k: ``None`` or a positive int.
        process_group: ``None`` (default, one process) or a ``torch.distributed`` group: each rank passes its
            shard and gets the loss of the concatenated batch (docs/spec.md §5; W × its gradient); an
            ``indices_tuple`` then raises ``ValueError``.
        **kwargs: pml's.

    Returns:
        A 0-dim fp32 loss (float64 for float64 embeddings).

    Raises:
        ValueError: a distance other than ``CosineSimilarity`` / ``DotProductSimilarity`` (power 1), a miner's
            ``indices_tuple``, or flashdml's input errors.

    Example:
        >>> import torch, flashdml as fd
        >>> from flashdml.integrations.pml import CrossExampleSoftmaxLoss
        >>> embeddings, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> loss = CrossExampleSoftmaxLoss(temperature=0.05)(embeddings, labels)
        >>> torch.allclose(loss, fd.cross_example_softmax(embeddings, labels=labels, temperature=0.05))
        True
        >>> img, txt = torch.randn(8, 8), torch.randn(8, 8)
        >>> pair = CrossExampleSoftmaxLoss(top_k=4)(img, ref_emb=txt)   # pair mode, the 4 hardest negatives
        >>> pair.shape
        torch.Size([])
    """

    def __init__(self, temperature=0.05, top_k=None, process_group=None, **kwargs):
        super().__init__(**kwargs)
        self.process_group = process_group
        _c_f.assert_distance_type(self, DotProductSimilarity)  # CosineSimilarity is a DotProductSimilarity
        self.temperature = temperature
        self.top_k = top_k
        self.add_to_recordable_attributes(list_of_names=["temperature"], is_stat=False)

    def get_default_distance(self):
        return CosineSimilarity()

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """Cross-Example Softmax of the batch (see the class docstring for the modes).

        Args:
            embeddings: ``[B, d]`` float. labels: int ``[B]`` or ``None``.
            indices_tuple: ``None``, or the all-pairs tuple of ``CrossBatchMemory`` /
                ``DistributedLossWrapper(efficient=True)`` (every pair minus each query's own copy).
            ref_emb, ref_labels: cross mode, ``[M, d]`` and int ``[M]``.

        Returns:
            A 0-dim fp32 loss (float64 for float64 embeddings), plus pml's embedding regularizer if set.

        Raises:
            ValueError: any other ``indices_tuple`` (a miner's), or one together with ``top_k``; an unsupported
                distance; bad shapes (flashdml's messages).
        """
        if indices_tuple is None:
            return super().forward(embeddings, labels, None, ref_emb, ref_labels)
        if self.process_group is not None:
            raise _needs_fused("CrossExampleSoftmaxLoss")
        excl = None
        if labels is not None and self.top_k is None and (ref_emb is None or ref_labels is not None):
            lab = _c_f.to_device(labels, embeddings)
            ref_lab = lab if ref_emb is None else _c_f.to_device(ref_labels, embeddings)
            excl = _recognise(indices_tuple, lab, ref_lab)
        if excl is None:
            raise ValueError(
                "CrossExampleSoftmaxLoss takes no miner's indices_tuple: every positive competes against the whole "
                "batch's negatives (use top_k=k for Cross-Example Negative Mining). Only the all-pairs tuples of "
                "CrossBatchMemory / DistributedLossWrapper(efficient=True) are accepted, without top_k")
        self._excl = excl
        try:
            return super().forward(embeddings, labels, None, ref_emb, ref_labels)
        finally:
            self._excl = None

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if not _plain_distance(self.distance, (CosineSimilarity, DotProductSimilarity)):
            raise ValueError("CrossExampleSoftmaxLoss supports distance=CosineSimilarity() or DotProductSimilarity() "
                             f"with power=1 (and p=2 when normalising), got {self.distance!r}")
        excl = getattr(self, "_excl", None)
        if excl is not None:  # a recognised all-pairs tuple: cross mode minus each query's own copy
            kw = dict(temperature=self.temperature, normalize=bool(self.distance.normalize_embeddings),
                      global_partition=True)
            loss = xent_excluding(embeddings, ref_emb, labels, ref_labels, excl, **kw)
            if loss is None:
                loss = dense_xent_excluding(embeddings, ref_emb, labels, ref_labels, excl, **kw)
            return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}
        # BaseMetricLossFunction.forward filled ref_emb/ref_labels with embeddings/labels in self mode.
        if ref_emb is embeddings and ref_labels is labels:
            ref_emb, ref_labels = None, None
        loss = _fd.cross_example_softmax(embeddings, ref_emb, labels, ref_labels, temperature=self.temperature,
                                         top_k=self.top_k, normalize=bool(self.distance.normalize_embeddings),
                                         **_group_kw(self))
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}


_MEMORY_FUSED = (NTXentLoss, CrossExampleSoftmaxLoss)


class CrossBatchMemory(_pml_losses.CrossBatchMemory):
    """pml's ``CrossBatchMemory`` (same arguments, same memory bank), fused for flashdml's losses and accepting
    ``CrossExampleSoftmaxLoss``.

    ``CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None)``: each call enqueues the batch, then
    compares the batch (queries) with the whole memory (references, detached) over every pair except each query's
    own copy in the memory. pml builds that as B×M index tensors and hands them to the loss, whose pair-based
    path then builds a |P|×|N| buffer. Here, when the wrapped loss is flashdml's ``NTXentLoss`` or
    ``CrossExampleSoftmaxLoss``, there is no miner and no ``indices_tuple`` argument, the loss receives a
    compact stand-in (``AllPairsExcept``) and runs the fused cross-mode kernel with the own-copy pairs removed
    exactly (``flashdml.integrations.pml._excluded``): memory O((B + M)·d). Anything else is pml's own code path
    (our drop-ins also recognise pml's tensors when pml's ``CrossBatchMemory`` calls them).

    Args:
        loss: a pml loss from ``supported_losses()`` (pml's list plus ``"CrossExampleSoftmaxLoss"``).
        embedding_size, memory_size, miner: as in pml.

    Returns:
        Calling it (``forward(embeddings, labels, indices_tuple=None, enqueue_mask=None)``) returns the wrapped
        loss's 0-dim value for the batch against the memory.

    Raises:
        Exception: pml's "CrossBatchMemory not supported for ..." for a loss outside ``supported_losses()``.

    Example:
        >>> import torch
        >>> from pytorch_metric_learning import losses as pml_losses
        >>> from flashdml.integrations.pml import CrossBatchMemory, NTXentLoss
        >>> loss_fn = CrossBatchMemory(NTXentLoss(temperature=0.1), embedding_size=8, memory_size=32)
        >>> pml_fn = pml_losses.CrossBatchMemory(pml_losses.NTXentLoss(temperature=0.1), embedding_size=8,
        ...                                      memory_size=32)
        >>> for step in range(3):                                # the memory fills up over the calls
        ...     embeddings, labels = torch.randn(16, 8), torch.randint(0, 4, (16,))
        ...     print(torch.allclose(loss_fn(embeddings, labels), pml_fn(embeddings, labels)))
        True
        True
        True
    """

    @staticmethod
    def supported_losses():
        return _pml_losses.CrossBatchMemory.supported_losses() + ["CrossExampleSoftmaxLoss"]

    def create_indices_tuple(self, embeddings, labels, E_mem, L_mem, input_indices_tuple, do_remove_self_comparisons):
        if self.miner is None and input_indices_tuple is None and isinstance(self.loss, _MEMORY_FUSED):
            if do_remove_self_comparisons:
                excl = self.curr_batch_idx.to(labels.device)
            else:
                excl = torch.full((labels.shape[0],), -1, dtype=torch.long, device=labels.device)
            return AllPairsExcept(labels, L_mem, excl)
        return super().create_indices_tuple(embeddings, labels, E_mem, L_mem, input_indices_tuple,
                                            do_remove_self_comparisons)


class SelfSupervisedLoss(_pml_losses.SelfSupervisedLoss):
    """pml's ``SelfSupervisedLoss`` (same arguments and behaviour) that also accepts ``CrossExampleSoftmaxLoss``.

    ``SelfSupervisedLoss(loss, symmetric=True)``; ``forward(embeddings, ref_emb)`` labels row i of
    ``embeddings`` and row i of ``ref_emb`` (an augmentation) as one class. Symmetric: the loss sees the 2B rows
    in self mode; otherwise cross mode with ``ref_emb``. flashdml's ``NTXentLoss`` runs fused either way.

    Args:
        loss: a pml loss from ``supported_losses()`` (pml's list plus ``"CrossExampleSoftmaxLoss"``).
        symmetric: as in pml.

    Returns:
        The wrapped loss's 0-dim value.

    Raises:
        Exception: pml's "SelfSupervisedLoss not supported for ..." for other losses.

    Example:
        >>> import torch
        >>> from pytorch_metric_learning import losses as pml_losses
        >>> from flashdml.integrations.pml import CrossExampleSoftmaxLoss, NTXentLoss, SelfSupervisedLoss
        >>> view1_emb, view2_emb = torch.randn(8, 16), torch.randn(8, 16)   # two augmentations of 8 samples
        >>> loss = SelfSupervisedLoss(CrossExampleSoftmaxLoss(temperature=0.1))(view1_emb, view2_emb)
        >>> loss.shape
        torch.Size([])
        >>> ntx = SelfSupervisedLoss(NTXentLoss())(view1_emb, view2_emb)
        >>> torch.allclose(ntx, pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss())(view1_emb, view2_emb))
        True
    """

    @staticmethod
    def supported_losses():
        return _pml_losses.SelfSupervisedLoss.supported_losses() + ["CrossExampleSoftmaxLoss"]


# SupCon, Multi-Similarity, Circle, Triplet-Margin: in a module of their own (it imports _FlashdmlForward from here).
from ._pair_losses import CircleLoss, MultiSimilarityLoss, SupConLoss, TripletMarginLoss  # noqa: E402
