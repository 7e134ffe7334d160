"""Pure-PyTorch reference for the retrieval and calibration metrics (docs/spec.md §3).

This is the oracle the fused metric kernels are tested against: it materialises the full similarity matrix,
computes in float64 (float32 on devices without float64), and favours clarity over speed.

Conventions shared by every function here:

* Cosine similarity: rows of ``x`` (and ``y``) are normalised with :func:`flashdml._math.l2_normalize`
  (``x / max(||x||, 1e-12)``, so an all-zero row has similarity 0 with everything), then ``S = x̂ ŷᵀ``.
* ``y=None`` is self mode: the references are ``x`` itself and every query's own entry ``(i, i)`` is removed
  from its retrieval list and from the pairs (``ref_labels = labels``). ``y`` given is cross mode and
  ``ref_labels`` is required.
* Ranking: references are sorted by similarity, descending; ties go to the **lower reference index** first.
* ``R_i`` = number of references with query ``i``'s label (self excluded). Queries with ``R_i = 0`` are left
  out of recall@k and MAP@R, exactly like pytorch-metric-learning's ``AccuracyCalculator`` leaves out "lone"
  queries (label absent from the reference set; in self mode, label occurring only once).
* A metric with nothing to average (no query with ``R_i > 0``, no positive pair, no class with >= 2 samples,
  no negative pair) is ``nan``, as in pytorch-metric-learning; never an exception.
* Results are Python floats.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Union

import torch
from torch import Tensor

from .._docs import shared_doc
from .._math import l2_normalize
from .._validation import check_ks, check_opis_options, check_real, prepare_batch

__all__ = ["recall_at_k", "map_at_r", "pr_auc", "opis", "eps_opis", "evaluate"]

METRIC_NAMES = ("recall_at_k", "map_at_r", "pr_auc", "opis", "eps_opis")
_OPIS_OPTIONS = ("far_range", "n_thresholds", "beta")
NAN = float("nan")


# ----------------------------------------------------------------------------------------------- helpers
def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _similarity(x: Tensor, y: Tensor) -> Tensor:
    """Cosine similarities ``[B, M]`` in float64, with exact ties kept exact: one GEMM over the distinct rows of x
    and y, made exactly symmetric, then gathered. So S_ij depends only on the two rows' values (equal rows give
    bitwise equal scores, and s(a, b) == s(b, a)), whereas a BLAS may round one dot product differently at
    different positions of the output (MKL's float64 GEMM does), which would turn exact ties into ranking noise."""
    dt = _work_dtype(x.device)
    xn, yn = l2_normalize(x.detach().to(dt)), l2_normalize(y.detach().to(dt))
    rows, index = torch.unique(torch.cat([xn, yn]), dim=0, return_inverse=True)
    G = rows @ rows.T
    G = torch.triu(G) + torch.triu(G, 1).T
    return G[index[:xn.shape[0]]][:, index[xn.shape[0]:]]


def _ceil_count(fraction: float, n: int) -> int:
    """``ceil(fraction * n)`` with the product rounded to 9 decimals first (so 0.07 * 100 gives 7, not 8)."""
    return math.ceil(round(fraction * n, 9))


def _ranked(x, labels, y, ref_labels):
    """Relevance of each query's retrieval list, best first: ``rel [B, C]`` bool and ``R [B]`` int64.

    ``C`` = number of candidates (``M``, or ``N - 1`` in self mode). Ties in similarity -> lower reference
    index first (a stable ascending sort of ``-S``).
    """
    batch = prepare_batch(x, y, labels, ref_labels, labels_required=True)
    S = _similarity(batch.x, batch.y)
    same = batch.labels[:, None] == batch.ref_labels[None, :]
    if batch.self_mode:
        eye = torch.eye(batch.B, dtype=torch.bool, device=S.device)
        S = S.masked_fill(eye, -math.inf)  # the query itself sorts last and is cut off below
        same = same & ~eye
    order = torch.sort(-S, dim=1, stable=True).indices
    rel = torch.gather(same, 1, order)
    if batch.self_mode:
        rel = rel[:, :-1]
    return rel, same.sum(dim=1), batch


def _pair_scores(x, labels, y, ref_labels):
    """Similarities and same-label flags of every (query, reference) pair; self mode drops ``(i, i)``."""
    batch = prepare_batch(x, y, labels, ref_labels, labels_required=True)
    S = _similarity(batch.x, batch.y)
    same = batch.labels[:, None] == batch.ref_labels[None, :]
    if batch.self_mode:
        keep = ~torch.eye(batch.B, dtype=torch.bool, device=S.device)
        return S[keep], same[keep]
    return S.reshape(-1), same.reshape(-1)


# ----------------------------------------------------------------------------------------------- retrieval
@shared_doc
def recall_at_k(x: Tensor, labels: Tensor, ks: Union[int, Sequence[int]] = (1, 2, 4, 8), y=None, ref_labels=None
                ) -> Dict[int, float]:
    """Recall@k: the fraction of queries with at least one same-label reference among their k nearest.

    Cosine similarity, ties -> lower reference index first, self mode excludes the query itself. Queries with
    no relevant reference (``R_i = 0``: in self mode the only sample of their label, in cross mode a label
    absent from ``ref_labels``) are excluded from the mean, as pytorch-metric-learning's ``AccuracyCalculator``
    excludes "lone" queries; so recall@1 equals its ``precision_at_1``. ``nan`` if no query has ``R_i > 0``.

    Args:
        x (Tensor): embeddings ``[N, d]`` (the queries), any floating dtype; cosine similarity, in float64.
        labels (Tensor): integer ``[N]``, required.
        ks (int or sequence of int): the k of each recall@k, each ``1 <= k <=`` the candidates per query (``M``,
            or ``N − 1`` in self mode); duplicates are dropped, the order is kept. Default ``(1, 2, 4, 8)``.
        {{gallery_args}}

    Returns:
        dict[int, float]: ``{k: recall}`` in the order of ``ks``.

    Raises:
        TypeError: ``x`` or a label tensor that is not a tensor; embeddings that are not floating; non-integer
            labels; ``x`` and ``y`` of different dtypes.
            Also a ``ks`` entry that is not an integer.
        ValueError: ``labels`` missing, not 1-D or not matching its rows; embeddings that are
            not 2-D, empty or of different ``d``; ``ref_labels`` without ``y`` or ``y`` without ``ref_labels``;
            tensors on different devices; an empty ``ks``, a k < 1 or above the candidates per query.

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> fd.reference.recall_at_k(x, labels, ks=(1, 2))
        {1: 0.75, 2: 0.75}
    """
    rel, R, batch = _ranked(x, labels, y, ref_labels)
    ks = check_ks(ks, rel.shape[1])
    valid = R > 0
    out = {}
    for k in ks:
        hit = rel[:, :k].any(dim=1)
        out[k] = float(hit[valid].double().mean()) if bool(valid.any()) else NAN
    return out


@shared_doc
def map_at_r(x: Tensor, labels: Tensor, y=None, ref_labels=None) -> float:
    """MAP@R (Musgrave et al., "A Metric Learning Reality Check").

    For query i, ``R_i`` = number of references with its label (self excluded in self mode);
    ``AP@R_i = (1/R_i) Σ_{r=1}^{R_i} P@r · rel(r)`` over its ranked list (cosine, ties -> lower reference
    index first); the result is the mean over the queries with ``R_i > 0`` (``nan`` if there are none).
    Equals pytorch-metric-learning's ``AccuracyCalculator`` ``mean_average_precision_at_r`` (self mode =
    its ``ref_includes_query=True``).

    Args:
        x (Tensor): embeddings ``[N, d]`` (the queries), any floating dtype; cosine similarity, in float64.
        labels (Tensor): integer ``[N]``, required.
        {{gallery_args}}

    Returns:
        float: MAP@R in ``[0, 1]``, or ``nan``.

    Raises:
        {{input_errors}}

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> fd.reference.map_at_r(x, labels)
        0.75
    """
    rel, R, _ = _ranked(x, labels, y, ref_labels)
    valid = R > 0
    if not bool(valid.any()):
        return NAN
    rel, R = rel[valid], R[valid]
    C = rel.shape[1]
    ranks = torch.arange(1, C + 1, device=rel.device)
    in_top_r = ranks[None, :] <= R[:, None]
    hits = (rel & in_top_r).to(torch.float64)
    precision_at_r = hits.cumsum(dim=1) / ranks.to(torch.float64)
    ap = (precision_at_r * hits).sum(dim=1) / R.to(torch.float64)
    return float(ap.mean())


# ----------------------------------------------------------------------------------------------- global calibration
@shared_doc
def pr_auc(x: Tensor, labels: Tensor, y=None, ref_labels=None) -> float:
    """Global PR-AUC (the XE paper's calibration measure): average precision of one threshold swept over all pairs.

    Every (query, reference) pair is scored by its cosine similarity (self mode: all ordered pairs ``i != j``;
    since ``(i, j)`` and ``(j, i)`` tie, this equals using unordered pairs); positive = same label. With the
    distinct scores ``s_1 > s_2 > ...`` as thresholds and ``TP(s)``, ``FP(s)`` the pairs with score ``>= s``:
    ``AP = Σ_t (TP(s_t) - TP(s_{t-1})) / P · TP(s_t) / (TP(s_t) + FP(s_t))`` (tied scores form one step, as
    in scikit-learn's ``average_precision_score``). Exact. ``nan`` when there is no positive pair.

    Args:
        x (Tensor): embeddings ``[N, d]`` (the queries), any floating dtype; cosine similarity, in float64.
        labels (Tensor): integer ``[N]``, required.
        {{gallery_args}}

    Returns:
        float: PR-AUC in ``[0, 1]``, or ``nan``.

    Raises:
        {{input_errors}}

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> fd.reference.pr_auc(x, labels)
        0.5
    """
    scores, positive = _pair_scores(x, labels, y, ref_labels)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return NAN
    order = torch.sort(-scores, stable=True).indices
    s, pos = scores[order], positive[order].to(torch.float64)
    tp = pos.cumsum(0)
    fp = (1.0 - pos).cumsum(0)
    last_of_group = torch.ones_like(s, dtype=torch.bool)
    last_of_group[:-1] = s[1:] != s[:-1]
    tp, fp = tp[last_of_group], fp[last_of_group]
    d_tp = torch.diff(tp, prepend=tp.new_zeros(1))
    return float((d_tp / n_pos * tp / (tp + fp)).sum())


# ----------------------------------------------------------------------------------------------- threshold consistency
def _class_utilities(x, labels, far_range, n_thresholds, beta):
    """``U [T, n_thresholds]`` (float64) for the T classes with >= 2 samples, rows in ascending label order.

    ``None`` when there is no such class or no negative pair.
    """
    far_range, n_thresholds, beta = check_opis_options(far_range, n_thresholds, beta)
    batch = prepare_batch(x, None, labels, None, labels_required=True)
    labels = batch.labels
    S = _similarity(batch.x, batch.x)
    N = batch.B
    iu = torch.triu_indices(N, N, offset=1, device=S.device)  # unordered pairs i < j
    pair_s = S[iu[0], iu[1]]
    classes, cls, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    ci, cj = cls[iu[0]], cls[iu[1]]
    is_neg = ci != cj
    n_neg = int(is_neg.sum())
    eligible = counts >= 2
    if n_neg == 0 or not bool(eligible.any()):
        return None

    # Calibration range. FAR(s) = share of all negative pairs with similarity >= s (non-increasing in s).
    # s(f) = the largest threshold with FAR(s) >= f = the ceil(f * n_neg)-th largest negative similarity.
    neg_desc = torch.sort(pair_s[is_neg], descending=True).values

    def threshold_at(f):
        return float(neg_desc[min(max(_ceil_count(f, n_neg), 1), n_neg) - 1])

    thresholds = torch.linspace(threshold_at(far_range[1]), threshold_at(far_range[0]), n_thresholds,
                                dtype=S.dtype, device=S.device)
    thresholds = torch.sort(thresholds).values  # guards against 1-ulp disorder; the mean over s ignores order

    # Per-class histograms of pair similarities over the threshold grid: bin b = #thresholds <= s, so a pair
    # passes threshold t (s >= thresholds[t]) exactly when t < b. A positive pair counts for its class, a
    # negative pair for both of its classes.
    nb = n_thresholds + 1
    C = classes.numel()
    b = torch.searchsorted(thresholds, pair_s, right=True)
    hist_pos = torch.bincount((ci * nb + b)[~is_neg], minlength=C * nb).view(C, nb)
    hist_neg = torch.bincount(torch.cat([ci * nb + b, cj * nb + b])[torch.cat([is_neg, is_neg])],
                              minlength=C * nb).view(C, nb)
    pos_at_or_above = hist_pos.flip(1).cumsum(1).flip(1)[:, 1:]  # [C, T]: #pos with s >= thresholds[t]
    neg_below = hist_neg.cumsum(1)[:, :-1]  # [C, T]: #neg with s < thresholds[t]
    tpr = pos_at_or_above.to(S.dtype) / (counts * (counts - 1) // 2).clamp_min(1).to(S.dtype)[:, None]
    tnr = neg_below.to(S.dtype) / (counts * (N - counts)).clamp_min(1).to(S.dtype)[:, None]
    b2 = beta * beta
    den = b2 * tpr + tnr
    U = torch.where(den > 0, (1 + b2) * tpr * tnr / den.clamp_min(1e-300), torch.zeros_like(den))
    return U[eligible]


def opis(x: Tensor, labels: Tensor, *, far_range=(1e-2, 1e-1), n_thresholds: int = 101, beta: float = 1.0) -> float:
    """OPIS (operating-point inconsistency): ``(1/T) Σ_c mean_s (U_c(s) − Ū(s))²``, ``Ū(s)`` = mean of ``U_c(s)``.

    The TCM paper's definition (Zhang et al., "Threshold-Consistent Margin Loss for Open-World Deep Metric
    Learning", ICLR 2024): self mode only, cosine similarity, unordered pairs ``i < j``.

    * Classes: every label with >= 2 samples (T of them); classes with one sample are skipped, but their
      samples still form negative pairs (for the other classes and for the overall FAR).
    * Class c at threshold s: positive pairs = both samples in c, negative pairs = exactly one sample in c;
      ``TPR_c(s)`` = share of positives with similarity ``>= s``, ``TNR_c(s)`` = share of negatives ``< s``;
      utility ``U_c(s) = (1+β²)·TPR·TNR / (β²·TPR + TNR)``, 0 when TPR = TNR = 0.
    * Calibration range: ``FAR(s)`` = share of **all** negative pairs of the set with similarity ``>= s``.
      ``s(f)`` = the largest threshold with ``FAR(s) >= f``, i.e. the ``ceil(f·n_neg)``-th largest negative
      similarity (``f·n_neg`` rounded to 9 decimals before the ceil; rank clamped to ``[1, n_neg]``).
      ``s_lo = s(far_range[1])``, ``s_hi = s(far_range[0])``, and the thresholds are
      ``torch.linspace(s_lo, s_hi, n_thresholds)`` in float64 (both ends exact; one threshold = ``s_lo``).
    * ``nan`` when no class has >= 2 samples or there is no negative pair.

    The parameters exist because the paper's exact calibration range could not be confirmed.

    Args:
        x (Tensor): embeddings ``[N, d]`` (the queries), any floating dtype; cosine similarity, in float64.
        labels (Tensor): integer ``[N]``, required.
        far_range (tuple[float, float]): ``(far_min, far_max)`` with ``0 < far_min <= far_max <= 1``: the
            calibration range of overall false-accept rates. Default ``(1e-2, 1e-1)``.
        n_thresholds (int): ``>= 1``, thresholds on the calibration range. Default 101.
        beta (float): ``> 0``, the β of the F-score-like utility. Default 1.0.

    Returns:
        float: OPIS (>= 0; lower is more consistent), or ``nan``.

    Raises:
        TypeError: ``x`` or a label tensor that is not a tensor; embeddings that are not floating; non-integer
            labels. Also ``far_range`` that is not a pair, a non-integer ``n_thresholds``.
        ValueError: ``labels`` missing, not 1-D or not matching its rows; ``x`` not 2-D or
            empty; tensors on different devices; ``far_range`` outside ``0 < far_min <= far_max <= 1``;
            ``n_thresholds < 1``; ``beta <= 0`` or non-finite.

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> round(fd.reference.opis(x, labels), 4)
        0.1837
    """
    U = _class_utilities(x, labels, far_range, n_thresholds, beta)
    if U is None:
        return NAN
    return float(((U - U.mean(dim=0, keepdim=True)) ** 2).mean(dim=1).mean())




def eps_opis(x: Tensor, labels: Tensor, *, eps: float = 0.05, far_range=(1e-2, 1e-1), n_thresholds: int = 101,
             beta: float = 1.0) -> float:
    """ε-OPIS: ``mean_s (U_high(s) − U_low(s))²`` between the best and the worst classes.

    ``U_high`` / ``U_low`` are the mean utilities of the best / worst ``m = ceil(ε·T)`` classes (ε·T rounded to
    9 decimals first, m clamped to [1, T]) ranked by their mean utility over the thresholds; ties in that
    ranking -> lower label first for both. Classes, utilities ``U_c(s)``, the calibration range and the ``nan``
    cases are those of :func:`opis`.

    Args:
        x (Tensor): embeddings ``[N, d]`` (the queries), any floating dtype; cosine similarity, in float64.
        labels (Tensor): integer ``[N]``, required.
        eps (float): ε in ``(0, 1]``, the share of classes in each of the best and worst groups. Default 0.05.
        far_range (tuple[float, float]): ``(far_min, far_max)`` with ``0 < far_min <= far_max <= 1``: the
            calibration range of overall false-accept rates. Default ``(1e-2, 1e-1)``.
        n_thresholds (int): ``>= 1``, thresholds on the calibration range. Default 101.
        beta (float): ``> 0``, the β of the F-score-like utility. Default 1.0.

    Returns:
        float: ε-OPIS (>= 0), or ``nan``.

    Raises:
        TypeError: ``x`` or a label tensor that is not a tensor; embeddings that are not floating; non-integer
            labels. Also ``far_range`` that is not a pair, a non-integer ``n_thresholds``, a non-real ``eps``.
        ValueError: ``labels`` missing, not 1-D or not matching its rows; ``x`` not 2-D or
            empty; tensors on different devices; ``eps`` outside ``(0, 1]``; ``far_range`` outside
            ``0 < far_min <= far_max <= 1``; ``n_thresholds < 1``; ``beta <= 0`` or non-finite.

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> round(fd.reference.eps_opis(x, labels, eps=0.05), 4)
        0.7347
    """
    eps = check_real(eps, "eps")
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must be in (0, 1], got {eps}")
    U = _class_utilities(x, labels, far_range, n_thresholds, beta)
    if U is None:
        return NAN
    T = U.shape[0]
    m = min(max(_ceil_count(eps, T), 1), T)
    mean_u = U.mean(dim=1)
    # ranks by mean utility; ties -> lower label first (U's rows are in ascending label order, sorts are stable)
    best = torch.sort(-mean_u, stable=True).indices[:m]
    worst = torch.sort(mean_u, stable=True).indices[:m]
    return float(((U[best].mean(dim=0) - U[worst].mean(dim=0)) ** 2).mean())




# ----------------------------------------------------------------------------------------------- all at once
@shared_doc
def evaluate(x: Tensor, labels: Tensor, metrics: Sequence[str] = ("recall_at_k", "map_at_r", "pr_auc", "opis"),
             ks: Union[int, Sequence[int]] = (1, 2, 4, 8), y=None, ref_labels=None, **metric_options) -> Dict[str, float]:
    """Several metrics at once, as one flat dict; each value equals the single-metric function's.

    OPIS is defined in self mode only: asking for it with ``y`` given is a ``ValueError`` (leave ``"opis"`` out
    of ``metrics`` for a separate gallery).

    Args:
        x (Tensor): embeddings ``[N, d]`` (the queries), any floating dtype; cosine similarity, in float64.
        labels (Tensor): integer ``[N]``, required.
        metrics (str or sequence of str): names among ``"recall_at_k"`` (keys ``"recall@K"`` for each K in
            ``ks``), ``"map_at_r"`` (``"map@r"``), ``"pr_auc"`` (``"pr_auc"``), ``"opis"`` (``"opis"`` and
            ``"eps_opis"``) and ``"eps_opis"`` (``"eps_opis"``). Default ``("recall_at_k", "map_at_r", "pr_auc",
            "opis")``.
        ks (int or sequence of int): the K of recall@K, as in :func:`recall_at_k` (checked only when recall is
            asked for). Default ``(1, 2, 4, 8)``.
        {{gallery_args}}
        **metric_options: ``far_range``, ``n_thresholds``, ``beta`` (OPIS and ε-OPIS) and ``eps`` (ε-OPIS), as
            in :func:`opis` and :func:`eps_opis`.

    Returns:
        dict[str, float]: the values by key, in the order of ``metrics``.

    Raises:
        TypeError: an unknown name in ``metric_options``; the type errors of the single-metric functions.
        ValueError: an unknown metric name; ``"opis"`` / ``"eps_opis"`` with ``y`` given (self mode only); any
            error of the single-metric functions (shapes, devices, ``ks``, OPIS options).

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> fd.reference.evaluate(x, labels, metrics=("recall_at_k", "map_at_r", "pr_auc"), ks=(1, 2))
        {'recall@1': 0.75, 'recall@2': 0.75, 'map@r': 0.75, 'pr_auc': 0.5}
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRIC_NAMES}")
    bad_opts = [k for k in metric_options if k not in _OPIS_OPTIONS + ("eps",)]
    if bad_opts:
        raise TypeError(f"unknown metric option(s) {bad_opts}; valid: {_OPIS_OPTIONS + ('eps',)}")
    wants_opis = any(m in ("opis", "eps_opis") for m in metrics)
    if wants_opis and y is not None:
        raise ValueError("opis / eps_opis are defined in self mode only (y=None); drop them from metrics "
                         "to evaluate against a separate gallery")
    # validate once up front, so a bad call fails the same way whatever the metric list
    prepare_batch(x, y, labels, ref_labels, labels_required=True)

    out: Dict[str, float] = {}
    for name in metrics:
        if name == "recall_at_k":
            for k, v in recall_at_k(x, labels, ks=ks, y=y, ref_labels=ref_labels).items():
                out[f"recall@{k}"] = v
        elif name == "map_at_r":
            out["map@r"] = map_at_r(x, labels, y=y, ref_labels=ref_labels)
        elif name == "pr_auc":
            out["pr_auc"] = pr_auc(x, labels, y=y, ref_labels=ref_labels)
        else:
            common = {k: v for k, v in metric_options.items() if k in _OPIS_OPTIONS}
            if name == "opis":
                out["opis"] = opis(x, labels, **common)
            out["eps_opis"] = eps_opis(x, labels, **common, **({"eps": metric_options["eps"]}
                                                               if "eps" in metric_options else {}))
    return out
