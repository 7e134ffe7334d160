"""pytorch-metric-learning drop-ins backed by flashdml.

pytorch-metric-learning ("pml") stays an optional dependency: this module is the only place that imports it,
and ``import flashdml`` never does. Swap the import and keep the rest of the training script::

    # from pytorch_metric_learning.losses import NTXentLoss, ContrastiveLoss, ThresholdConsistentMarginLoss
    from flashdml.integrations.pml import NTXentLoss, ContrastiveLoss, ThresholdConsistentMarginLoss
    from flashdml.integrations.pml import CrossExampleSoftmaxLoss   # new: Cross-Example Softmax (docs/spec.md §2.2)
    from flashdml.integrations.pml import SupConLoss, MultiSimilarityLoss, CircleLoss, TripletMarginLoss

    loss_fn = NTXentLoss(temperature=0.07)            # same constructor arguments and defaults as pml
    loss = loss_fn(embeddings, labels)                # same value and gradients, O(B·d) memory
    isinstance(loss_fn, pytorch_metric_learning.losses.NTXentLoss)   # True

    # wrappers: pml's, fused for the drop-ins, and accepting CrossExampleSoftmaxLoss
    from flashdml.integrations.pml import CrossBatchMemory, SelfSupervisedLoss
    loss_fn = CrossBatchMemory(NTXentLoss(temperature=0.1), embedding_size=128, memory_size=4096)

Global batches across processes: every loss drop-in takes ``process_group=`` in its constructor (default
``None``). With a group, each rank passes its own shard and gets the fused op's loss of the concatenated batch
(docs/spec.md §5; W × its gradient for DDP's averaging); a call that only pml could run raises ``ValueError``.
Inside pml's own ``DistributedLossWrapper`` (without ``process_group``) the drop-ins give the originals' values
and gradients in both ``efficient`` modes — and TCM and Cross-Example Softmax also run with ``efficient=True``,
where pml's TCM fails.

The layout follows pml's: ``flashdml.integrations.pml.losses``, ``.miners``, ``.inference`` (``FlashdmlKNN``)
and ``knn_func`` (a ready ``FlashdmlKNN()`` for ``AccuracyCalculator(knn_func=...)``).

Each drop-in subclasses the pml original and runs flashdml's functional op (``flashdml.ntxent``,
``flashdml.contrastive_margin``, ``flashdml.threshold_consistent_margin``: fused kernels where the backend has
them) when the call is one flashdml covers exactly, and ``super().forward(...)`` (pml itself) otherwise:

* a miner's ``indices_tuple`` (NT-Xent and Cross-Example Softmax recognise the all-pairs tuples that
  ``CrossBatchMemory`` and ``DistributedLossWrapper(efficient=True)`` pass, and run fused: cross mode minus each
  query's own copy; TCM and Contrastive too, as plain cross mode, when no excluded pair can be a hard
  positive; ``flashdml.integrations.pml.CrossBatchMemory`` hands them a compact stand-in instead of the
  B×M index tensors); ``labels=None``; non-integer labels;
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

SupCon, Multi-Similarity, Circle and Triplet-Margin (``flashdml.supcon``, ``.multi_similarity``, ``.circle``,
``.triplet_margin``) are fused only with pml's default distance and reducer on fp32 embeddings (pml computes fp16 /
bf16 in that precision, so those run pml, as float64 does) and without Triplet's ``swap`` / ``smooth_loss`` /
``triplets_per_anchor``; the full list is in ``flashdml.integrations.pml._pair_losses``.

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

try:
    import pytorch_metric_learning  # noqa: F401
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "flashdml.integrations.pml needs pytorch-metric-learning, an optional dependency of flashdml: "
        "pip install pytorch-metric-learning"
    ) from _exc

from . import inference, losses, miners  # noqa: E402
from .inference import FlashdmlKNN  # noqa: E402
from .losses import (  # noqa: E402
    CircleLoss, ContrastiveLoss, CrossBatchMemory, CrossExampleSoftmaxLoss, MultiSimilarityLoss, NTXentLoss,
    SelfSupervisedLoss, SupConLoss, ThresholdConsistentMarginLoss, TripletMarginLoss,
)
from .miners import HardestNegativesMiner  # noqa: E402

knn_func = FlashdmlKNN()
"""A ready ``knn_func`` (cosine similarity): ``AccuracyCalculator(knn_func=flashdml.integrations.pml.knn_func)``."""

__all__ = ["ThresholdConsistentMarginLoss", "NTXentLoss", "ContrastiveLoss", "CrossExampleSoftmaxLoss",
           "SupConLoss", "MultiSimilarityLoss", "CircleLoss", "TripletMarginLoss", "CrossBatchMemory", "SelfSupervisedLoss", "FlashdmlKNN", "HardestNegativesMiner", "knn_func", "losses",
           "miners", "inference"]
