"""pytorch-metric-learning drop-ins backed by flashdml.

pytorch-metric-learning ("pml") stays an optional dependency: this module is the only place that imports it,
and ``import flashdml`` never does. Swap the import and keep the rest of the training script::

    # from pytorch_metric_learning.losses import NTXentLoss, ContrastiveLoss, ThresholdConsistentMarginLoss
    from flashdml.integrations.pml import NTXentLoss, ContrastiveLoss, ThresholdConsistentMarginLoss
    from flashdml.integrations.pml import CrossExampleSoftmaxLoss   # new: Cross-Example Softmax (docs/spec.md §2.2)

    loss_fn = NTXentLoss(temperature=0.07)            # same constructor arguments and defaults as pml
    loss = loss_fn(embeddings, labels)                # same value and gradients, O(B·d) memory
    isinstance(loss_fn, pytorch_metric_learning.losses.NTXentLoss)   # True

Each drop-in subclasses the pml original and runs flashdml's functional op (``flashdml.ntxent``,
``flashdml.contrastive_margin``, ``flashdml.threshold_consistent_margin``: fused kernels where the backend has
them) when the call is one flashdml covers exactly, and ``super().forward(...)`` (pml itself) otherwise:

* a miner's ``indices_tuple``; ``labels=None``; non-integer labels;
* a reducer other than the default (NT-Xent and TCM: ``MeanReducer``; Contrastive: ``AvgNonZeroReducer`` on
  each of ``pos_loss`` / ``neg_loss``), an ``embedding_regularizer``, or ``collect_stats`` on the loss, its
  reducer or its distance (the fused path records no stats);
* a distance other than the one covered: NT-Xent ``CosineSimilarity()`` (the default) or
  ``DotProductSimilarity()`` (→ ``normalize=False``), with ``power=1``; Contrastive only
  ``CosineSimilarity()`` with ``power=1`` (pml's default ``LpDistance`` always runs pml); TCM ignores its
  distance (pml's TCM calls ``F.cosine_similarity`` itself), so none is checked;
* Contrastive only: ``pos_margin`` within ``1e-3`` (fp16/bf16: ``1e-2``) of 1 or above, or, with
  ``pos_margin > 0``, a (near-)zero embedding row — see "Contrastive" below;
* ``ref_emb`` given with ``ref_labels=None`` or ``ref_labels is labels`` (pml then reuses ``labels`` and drops
  the diagonal of the query×reference matrix; ``ref_emb is embeddings`` is plain self mode).

Semantics (checked against pml 2.9's source, and by tests/test_integrations_pml.py):

* **NT-Xent** (docs/spec.md §2.1b): pml's per-positive ``−log(e^{z_ap} / (e^{z_ap} + Σ_{n∈N(a)} e^{z_an}) + tiny)``
  averaged over all positive pairs (``MeanReducer``, ``reduction_type="pos_pair"``) is
  ``mean_P softplus(LSE_{N(a)} z − z_ap)``. pml's ``+ finfo.tiny`` caps one term at ≈ 87.3 (fp32); flashdml
  does not (reachable only with tiny temperatures or ``DotProductSimilarity``).
* **Contrastive** with ``distance=CosineSimilarity()`` (``is_inverted=True``): ``distance.margin(a, b) = b − a``,
  so pml's hinges are ``relu(pos_margin − s)`` and ``relu(s − neg_margin)`` — exactly docs/spec.md §2.4's ``m+ = pos_margin``,
  ``m− = neg_margin``. ``AvgNonZeroReducer`` (``ThresholdReducer(low=0)``) reduces ``pos_loss`` and ``neg_loss``
  separately, each the mean over its hinges that are ``> 0`` (0 when none), and ``MultipleReducers`` sums the
  two: docs/spec.md §2.4's strict counts. One difference: pml drops the diagonal in self mode, docs/spec.md §2.4 keeps it as a
  positive; its hinge ``[m+ − s_ii]_+`` is 0 when ``s_ii = 1 > m+``, which is why the fused path requires
  ``pos_margin < 1 − tol`` (``s_ii`` is 1 only up to rounding) and no row of norm ``< 1e-11`` (such a row has
  ``s_ii < 1``; a zero row has ``s_ii = 0``).
* **TCM** (docs/spec.md §2.3): ``lambda_plus, lambda_minus, margin_plus, margin_minus`` → ``pos_weight, neg_weight,
  pos_margin, neg_margin``; inclusive hard-pair tests, each term 0 when its set is empty.
* **Cross mode** (``ref_emb``, ``ref_labels``) runs flashdml with ``y=ref_emb``: every (query, reference) pair,
  the diagonal included. For NT-Xent and Contrastive that is pml's own cross mode (pml returns 0 when there are
  at most one positive and one negative pair in all; flashdml does not). **TCM differs from pml on purpose**:
  pml's ``ThresholdConsistentMarginLoss`` indexes the query ``embeddings`` with the reference indices (it never
  reads ``ref_emb``), so its cross-mode value is wrong; this drop-in compares queries with references.
* Return value: a 0-dim tensor of the embeddings' dtype (pml's), with an exactly zero gradient where pml
  returns its zero loss (no positive pair, no hard pair, …).
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

try:
    from pytorch_metric_learning import losses as _pml_losses
    from pytorch_metric_learning.miners import BaseMiner as _BaseMiner
    from pytorch_metric_learning.utils.inference import return_results as _pml_return_results
    from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
    from pytorch_metric_learning.reducers import AvgNonZeroReducer, MeanReducer, MultipleReducers
    from pytorch_metric_learning.utils import common_functions as _c_f
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "flashdml.integrations.pml needs pytorch-metric-learning, an optional dependency of flashdml: "
        "pip install pytorch-metric-learning"
    ) from _exc

import flashdml as _fd

__all__ = ["ThresholdConsistentMarginLoss", "NTXentLoss", "ContrastiveLoss", "CrossExampleSoftmaxLoss", "FlashdmlKNN",
           "HardestNegativesMiner"]

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


class FlashdmlKNN:
    """A ``knn_func`` for pml's ``AccuracyCalculator``, computed by ``flashdml.knn`` (docs/spec.md §1.2): exact kNN that
    never materialises the query × reference matrix (memory O((N + M)·d + N·k); pml's ``CustomKNN`` builds it,
    ``FaissKNN`` needs faiss)::

        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        calc = AccuracyCalculator(knn_func=FlashdmlKNN())
        calc.get_accuracy(query, query_labels)                         # self mode, pml drops the query itself

    ``__call__(query, k, reference, ref_includes_query=False) -> (similarities [N, k], indices [N, k])`` — pml's
    interface. Like ``CustomKNN(CosineSimilarity())`` it returns similarities, largest first (ties → lower
    reference index); ``normalize=False`` uses dot products (``DotProductSimilarity``). With
    ``ref_includes_query`` (the first N references are the queries) it searches k + 1 neighbours and removes
    each query's own index with pml's ``return_results``, exactly as pml's own knn functions do.
    """

    def __init__(self, normalize: bool = True):
        self.normalize = bool(normalize)

    def __call__(self, query, k, reference=None, ref_includes_query=False):
        query = _c_f.numpy_to_torch(query)
        reference = query if reference is None else _c_f.numpy_to_torch(reference)
        if ref_includes_query:
            k = k + 1
        k = min(int(k), reference.shape[0])
        values, indices = _fd.knn(query, reference, k, normalize=self.normalize)
        return _pml_return_results(values, indices, ref_includes_query)


class HardestNegativesMiner(_BaseMiner):
    """pml miner: all positive pairs plus the k hardest negative pairs of the **whole batch** (flashdml's
    ``hardest_negatives``, docs/spec.md §1.3 — Cross-Example Negative Mining's selection, without a B×B matrix).

    ``HardestNegativesMiner(k=None, normalize=True, **kwargs)``: ``k=None`` means k = batch size; a k above the
    batch's number of negative pairs keeps all of them. ``normalize`` chooses cosine (default) or dot-product
    similarity. Returns pml's pair tuple ``(a1, p, a2, n)`` (int64): ``(a1, p)`` every positive pair (self mode:
    without ``(i, i)``, as pml's ``get_all_pairs_indices``), ``(a2, n)`` the hardest negatives, most similar
    first (ties → lower flat index)::

        miner = HardestNegativesMiner(k=1024)
        loss = pml_losses.ContrastiveLoss()(emb, labels, miner(emb, labels))
    """

    def __init__(self, k=None, normalize: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.k = k
        self.normalize = bool(normalize)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        from flashdml._validation import prepare_batch
        from flashdml.ops.selection import count_negatives, positive_pairs

        self_mode = ref_emb is embeddings and ref_labels is labels
        y, ref = (None, None) if self_mode else (ref_emb, _c_f.to_device(ref_labels, ref_emb))
        batch = prepare_batch(embeddings, y, labels, ref, pair_mode_default=False)
        a1, p = positive_pairs(batch.labels, batch.ref_labels, batch.self_mode)
        n_neg = count_negatives(batch.labels, batch.ref_labels)
        k = min(batch.B if self.k is None else int(self.k), n_neg)
        if k == 0:
            empty = torch.empty(0, dtype=torch.long, device=embeddings.device)
            return a1, p, empty, empty.clone()
        _, a2, n = _fd.hardest_negatives(embeddings, y, labels, ref, k, normalize=self.normalize)
        return a1, p, a2, n
