"""Retrieval and threshold-consistency metrics at gallery scale (docs/spec.md §3), in one streaming pass.

Usage::

    import flashdml as fd
    fd.metrics.recall_at_k(x, labels, ks=(1, 10, 100))     # {1: 0.81, 10: 0.93, 100: 0.98}
    fd.metrics.map_at_r(x, labels)                          # 0.42
    fd.metrics.evaluate(x, labels, ks=(1, 10), metrics=("recall_at_k", "map_at_r", "pr_auc", "opis"))
    # {"recall@1": ..., "recall@10": ..., "map@r": ..., "pr_auc": ..., "opis": ..., "eps_opis": ...}
    fd.metrics.evaluate(q, q_labels, y=gallery, ref_labels=g_labels, metrics=("recall_at_k", "map_at_r"))

Same signatures, conventions and ``nan`` rules as :mod:`flashdml.reference.metrics` (the oracle). Every metric
comes from one pass ``metrics_pass`` (C++ on CPU tensors, csrc/cuda/metrics.cu or triton_kernels/metrics.py on CUDA
tensors; the same outputs): S = x̂ ŷᵀ in fp32 tiles (never N×M in memory; memory O(N·d + N·k + T·bins)), feeding
per-row top-k lists and similarity histograms; the bookkeeping around it runs on the host. ``evaluate`` makes ONE
pass for all requested metrics; every single-metric function is ``evaluate`` with one metric, so the values are
equal by construction. The "reference" backend runs the reference.

Accuracy:

* **recall@k, MAP@R: exact** (= the reference) up to float64 near-ties. The pass keeps each query's
  ``max(k, R_i) + 8`` best references in fp32; where fp32 rounding could change the relevance pattern of the
  first ``max(k, R_i)`` ranks (chains of values closer than ``2·err``, ``err = (d + 16)·2⁻²⁴`` bounds
  |fp32 S − S|, holding both relevant and irrelevant items, or reaching the end of the list), the row is
  re-ranked in float64 like the reference (ties → lower reference index), and if the kept list cannot prove its
  boundary, from its full float64 row. Guarantee: a query's ranking equals the reference's unless two of its
  references that are not identical rows have cosines within float64 rounding of each other (``≲ (d + 8)·2⁻⁵²``;
  e.g. distinct integer vectors with equal cosines — both float64 computations break such ties by their own
  rounding). Identical rows tie exactly in both (→ lower index). Each query whose relevance boundary holds such a
  near-tie can change recall@k or its AP by at most 1/N (tests/test_metrics.py checks the bound on tie-heavy
  integer embeddings).
* **PR-AUC**: all pairs (self mode: the unordered pairs, which gives the same value as the reference's ordered
  pairs ``i != j``) binned on 2¹⁶ bins over [−1, 1] (width h = 2⁻¹⁵); thresholds at bin edges, the pairs of
  a bin tie (one step, sklearn's convention). The exact value lies in ``[lower, upper]`` computed from the same
  counts (:func:`pr_auc_bounds`; per bin, positives ranked after / before its negatives), up to the pairs whose
  fp32 similarity falls in a neighbouring bin (within ``err`` of an edge).
* **OPIS, ε-OPIS**: the FAR range's end points are found on the fine grid (``s(f)`` = the largest bin edge with
  FAR ≥ f: ≤ h below the reference's, which is the largest negative similarity with FAR ≥ f); the
  ``n_thresholds`` thresholds ``linspace(s_lo, s_hi)`` are then rounded to the nearest edge of the per-class
  grid of ``opis_bins`` bins (2¹⁶, halved while ``T · bins · 16 B`` > :data:`OPIS_HIST_BYTES` or
  ``T · bins`` > max(N²/4, 2²⁰); at least 256; h_c = 2 / opis_bins). The result is the **exact OPIS at thresholds moved by at most h_c/2 + h**
  (:func:`opis_thresholds` returns them), with similarities in fp32. E.g. T = 12 000 classes: 1024 bins,
  thresholds within 0.001 of the reference's.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _dispatch
from . import reference as _reference
from . import _metrics_state as _state
from ._docs import shared_doc
from ._math import l2_normalize
from ._validation import check_ks, check_opis_options, check_real, prepare_batch
from .ops import registry
from .reference import metrics as _ref

__all__ = ["recall_at_k", "map_at_r", "pr_auc", "opis", "eps_opis", "evaluate", "pr_auc_bounds", "opis_thresholds"]

METRIC_NAMES = _ref.METRIC_NAMES
PAIR_BINS = _state.PAIR_BINS
OPIS_HIST_BYTES = 256 << 20   # memory for the per-class OPIS histograms (2 x T x bins int64)
MIN_OPIS_BINS = 256
TOPK_MARGIN = 8               # extra references kept per query beyond max(k, R_i)
ROWS_PER_CALL = 8192          # query rows per C++ call (progress granularity)
NAN = float("nan")

ProgressArg = Union[None, bool, Callable[[int, int], None]]


# ----------------------------------------------------------------------------------------------- progress
class _StderrProgress:
    def __init__(self, total: int):
        self.total, self.t0 = total, time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        dt = time.monotonic() - self.t0
        eta = dt / done * (total - done) if done else float("nan")
        sys.stderr.write(f"\rflashdml.metrics: {done}/{total} query rows ({100.0 * done / total:5.1f}%) "
                         f"{dt:6.1f} s, eta {eta:6.1f} s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _progress_fn(progress: ProgressArg, B: int, M: int):
    if callable(progress):
        return progress
    if progress is None:
        progress = B * M >= (1 << 30) and sys.stderr.isatty()
    return _StderrProgress(B) if progress else None


# ----------------------------------------------------------------------------------------------- the pass
def _opis_bins(n_classes: int, n_pairs: int = 1 << 62) -> int:
    """Bins of the per-class grid: 2^16, halved while the histograms pass OPIS_HIST_BYTES or T * bins passes
    max(n_pairs / 4, 2^20) (small inputs: the histograms must not cost more than the pass), at least 256."""
    bins = PAIR_BINS
    limit = max(n_pairs // 4, 1 << 20)
    while bins > MIN_OPIS_BINS and (16 * n_classes * bins > OPIS_HIST_BYTES or n_classes * bins > limit):
        bins //= 2
    return bins


FAMILY = registry.register(registry.Family(
    name="metrics",
    reference={name: getattr(_reference, name) for name in ("recall_at_k", "map_at_r", "pr_auc", "opis", "eps_opis",
                                                            "evaluate")},
    compiled={"metrics_pass": None},  # rows are normalised here in fp32, whatever their dtype
    dtypes=registry.FUSED_DTYPES + (torch.float64,),
))


def _pass_op(backend: str):
    """``metrics_pass`` of a fused backend (one schema on every backend)."""
    return registry.compiled_ops(backend, FAMILY).metrics_pass


def _on_host(batch):
    """The batch on the CPU (a no-op there): the bookkeeping around the pass runs on the host."""
    x = batch.x.cpu()
    return dataclasses.replace(batch, x=x, y=x if batch.self_mode else batch.y.cpu(), labels=batch.labels.cpu(),
                               ref_labels=batch.ref_labels.cpu())


def _stream(batch, keep: Tensor, pair_hist: bool, opis_bins: int, progress, backend: str, xd, yd,
            own: Optional[Tensor] = None) -> dict:
    """Runs ``metrics_pass`` over the query rows ``own`` (default all) in chunks (class-aligned when OPIS is
    wanted) on the rows ``xd`` / ``yd`` (on their device); ``batch`` (host) holds the labels, the results come
    back to the host."""
    op, dev = _pass_op(backend), xd.device
    xn = l2_normalize(xd.detach().float()).contiguous()
    yn = xn if batch.self_mode else l2_normalize(yd.detach().float()).contiguous()
    labels, ref_labels = batch.labels.contiguous(), batch.ref_labels.contiguous()
    labels_d = labels.to(dev)
    ref_d = labels_d if batch.self_mode else ref_labels.to(dev)
    own = torch.arange(batch.B) if own is None else own
    B = own.numel()
    if opis_bins:
        order = own[torch.argsort(labels[own], stable=True)]
        sorted_labels = labels[order]
        classes = torch.unique(labels)
        hist_pos = torch.zeros(classes.numel(), opis_bins, dtype=torch.int64)
        hist_neg = torch.zeros(classes.numel(), opis_bins, dtype=torch.int64)
    else:
        order = own
    pairs = torch.zeros(2, PAIR_BINS, dtype=torch.int64) if (pair_hist or opis_bins) else None
    keep_sorted = keep[order]
    idx_parts, val_parts = [], []
    start = 0
    while start < B:
        stop = min(B, start + ROWS_PER_CALL)
        if opis_bins and stop < B:  # do not split a class between calls
            stop = int(torch.searchsorted(sorted_labels, sorted_labels[stop - 1], right=True))
        rows = order[start:stop]
        _, idx, val, ph, cp, cn = (t.cpu() for t in op(
            xn, yn, labels_d, ref_d, rows.to(dev), keep_sorted[start:stop].to(dev), batch.self_mode, pair_hist,
            opis_bins))
        idx_parts.append(idx)
        val_parts.append(val)
        if pairs is not None:
            pairs += ph
        if opis_bins:
            first = int(torch.searchsorted(classes, sorted_labels[start]))
            hist_pos[first:first + cp.shape[0]] = cp
            hist_neg[first:first + cn.shape[0]] = cn
        start = stop
        if progress is not None:
            progress(start, B)
    if not idx_parts:  # no query rows here (a rank's empty shard)
        idx_parts, val_parts = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.float32)]
    out = {"rows": order, "keep": keep_sorted, "idx": torch.cat(idx_parts), "val": torch.cat(val_parts),
           "pairs": pairs}
    if opis_bins:
        # self mode: pairs counts the unordered pairs j > i, so its negatives are the FAR counts
        out.update(hist_pos=hist_pos, hist_neg=hist_neg, neg_upper=pairs[1], classes=classes)
    return out


# ----------------------------------------------------------------------------------------------- driver
def _check_inputs(x, labels, y, ref_labels):
    batch = prepare_batch(x, y, labels, ref_labels, labels_required=True)
    for name, t in (("x", batch.x), ("y", batch.y)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    return batch


def _fused_evaluate(x, labels, metrics, ks, y, ref_labels, progress, opts, details=None, backend: str = "cpu",
                    ranks=None) -> Dict[str, float]:
    """``ranks`` (flashdml.distributed.metrics): the pass runs on this rank's query rows ``ranks.own`` only and
    ``ranks.combine`` merges the ranks' states into the one-process state."""
    batch = _check_inputs(x, labels, y, ref_labels)
    xd, yd = batch.x, batch.y  # the pass runs where the rows are (backend "cpu", "cuda" or "triton")
    batch = _on_host(batch)
    C = batch.M - 1 if batch.self_mode else batch.M
    want_recall, want_map = "recall_at_k" in metrics, "map_at_r" in metrics
    want_pr = "pr_auc" in metrics
    want_opis = "opis" in metrics or "eps_opis" in metrics
    ks = check_ks(ks, C) if want_recall else ()
    if want_opis:
        far_range, n_thresholds, beta = check_opis_options(
            opts.get("far_range", (1e-2, 1e-1)), opts.get("n_thresholds", 101), opts.get("beta", 1.0))
        eps = check_real(opts.get("eps", 0.05), "eps")
        if not 0.0 < eps <= 1.0:
            raise ValueError(f"eps must be in (0, 1], got {eps}")
    # R_i: references with query i's label (self excluded)
    uniq, ref_counts = torch.unique(batch.ref_labels, return_counts=True)
    at = torch.searchsorted(uniq, batch.labels).clamp_max(uniq.numel() - 1)
    R = torch.where(uniq[at] == batch.labels, ref_counts[at], torch.zeros_like(at))
    if batch.self_mode:
        R = R - 1
    need = torch.zeros_like(R)
    if want_recall or want_map:
        need = torch.maximum(torch.full_like(R, max(ks) if ks else 0), R if want_map else torch.zeros_like(R))
        need = torch.where(R > 0, need, torch.zeros_like(need))
    keep = torch.where(need > 0, (need + TOPK_MARGIN).clamp_max(C), need)
    opis_bins = _opis_bins(uniq.numel(), batch.B * batch.M) if want_opis else 0
    st = _stream(batch, keep, want_pr, opis_bins, _progress_fn(progress, batch.B, batch.M), backend, xd, yd,
                 None if ranks is None else ranks.own)
    if ranks is not None:
        st = ranks.combine(st, batch.labels if opis_bins else None)

    out: Dict[str, float] = {}
    recall, mapr = _state.retrieval(batch, st, R, need, ks) if (want_recall or want_map) else ({}, NAN)
    opis_vals = None
    if want_opis:
        state = _state.opis_state(batch, st, far_range, n_thresholds)
        if state is None:
            opis_vals = (NAN, NAN)
        else:
            if details is not None:
                details["thresholds"] = state[0]
            opis_vals = _state.opis_values(_state.utilities(state[1], state[2], beta), eps)
    if want_pr and details is not None:
        details["pr_auc_bounds"] = _state.pr_auc_bounds(st["pairs"])
    for name in metrics:
        if name == "recall_at_k":
            out.update({f"recall@{k}": v for k, v in recall.items()})
        elif name == "map_at_r":
            out["map@r"] = mapr
        elif name == "pr_auc":
            out["pr_auc"] = _state.pr_auc_value(st["pairs"])
        elif name == "opis":
            out["opis"], out["eps_opis"] = opis_vals
        else:
            out["eps_opis"] = opis_vals[1]
    return out


def _device(x) -> torch.device:
    return x.device if isinstance(x, Tensor) else torch.device("cpu")


@shared_doc
def evaluate(x: Tensor, labels: Tensor, metrics: Sequence[str] = ("recall_at_k", "map_at_r", "pr_auc", "opis"),
             ks: Union[int, Sequence[int]] = (1, 2, 4, 8), y: Optional[Tensor] = None,
             ref_labels: Optional[Tensor] = None, *, progress: ProgressArg = None, process_group=None,
             **metric_options) -> Dict[str, float]:
    """Several metrics from ONE streaming pass over S, as one flat dict (the keys of the reference's ``evaluate``).

    Every single-metric function is this function with one metric, so the values are equal by construction.
    recall@K and MAP@R are exact; PR-AUC, OPIS and ε-OPIS come from histograms, with the accuracy stated in the
    module docstring. The "reference" backend runs :func:`flashdml.reference.evaluate`.

    Args:
        x (Tensor): embeddings ``[N, d]`` (the queries), fp16, bf16, fp32 or fp64; cosine similarity from rows
            normalised in fp32, on the device of ``x``.
        labels (Tensor): integer ``[N]``, required.
        metrics (str or sequence of str): names among ``"recall_at_k"`` (keys ``"recall@K"`` for each K in
            ``ks``), ``"map_at_r"`` (``"map@r"``), ``"pr_auc"`` (``"pr_auc"``), ``"opis"`` (``"opis"`` and
            ``"eps_opis"``) and ``"eps_opis"`` (``"eps_opis"``). Default ``("recall_at_k", "map_at_r", "pr_auc",
            "opis")``.
        ks (int or sequence of int): the K of recall@K, as in :func:`recall_at_k` (checked only when recall is
            asked for). Default ``(1, 2, 4, 8)``.
        {{gallery_args}}
        progress (bool, callable or None): ``True`` prints a progress line on stderr, ``False`` none, a callable
            is called with ``(rows_done, rows_total)``; ``None`` (default) prints only for ``N·M >= 2^30`` when
            stderr is a terminal.
        {{process_group_shard_arg}}
            The metrics are those of the concatenated set (queries and gallery), identical on every rank.
        **metric_options: ``far_range``, ``n_thresholds``, ``beta`` (OPIS and ε-OPIS) and ``eps`` (ε-OPIS), as
            in :func:`opis` and :func:`eps_opis`.

    Returns:
        dict[str, float]: the values by key, in the order of ``metrics``; ``nan`` for a metric with nothing to
        average.

    Raises:
        TypeError: an unknown name in ``metric_options``; the type errors of the single-metric functions.
        ValueError: an unknown metric name; ``"opis"`` / ``"eps_opis"`` with ``y`` given (self mode only); any
            error of the single-metric functions (shapes, devices, ``ks``, OPIS options).
            Also a NaN or infinite embedding.
        RuntimeError: an explicitly selected backend that cannot run the call.

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> res = fd.metrics.evaluate(x, labels, ks=(1, 2), metrics=("recall_at_k", "map_at_r", "pr_auc", "opis"))
        >>> sorted(res)
        ['eps_opis', 'map@r', 'opis', 'pr_auc', 'recall@1', 'recall@2']
        >>> res["recall@1"], res["map@r"]
        (0.75, 0.75)
        >>> gallery, gallery_labels = torch.randn(10, 4), torch.arange(10) % 2
        >>> sorted(fd.metrics.evaluate(x, labels, ks=1, y=gallery, ref_labels=gallery_labels,
        ...                            metrics=("recall_at_k", "map_at_r")))
        ['map@r', 'recall@1']
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRIC_NAMES}")
    valid_opts = _ref._OPIS_OPTIONS + ("eps",)
    bad = [k for k in metric_options if k not in valid_opts]
    if bad:
        raise TypeError(f"unknown metric option(s) {bad}; valid: {valid_opts}")
    if any(m in ("opis", "eps_opis") for m in metrics) and y is not None:
        raise ValueError("opis / eps_opis are defined in self mode only (y=None); drop them from metrics "
                         "to evaluate against a separate gallery")
    if process_group is not None:
        from .distributed import metrics as _dm  # imported on use: it imports this module
        return _dm.evaluate(x, labels, metrics, ks, y, ref_labels, progress, process_group, metric_options)
    name = _dispatch.resolve("evaluate", _device(x))
    if name == "reference":
        return _reference.evaluate(x, labels, metrics=metrics, ks=ks, y=y, ref_labels=ref_labels, **metric_options)
    return _fused_evaluate(x, labels, metrics, ks, y, ref_labels, progress, metric_options, backend=name)


def _single(op: str, x, run_fused, run_reference):
    name = _dispatch.resolve(op, _device(x))
    return run_reference() if name == "reference" else run_fused(name)


def _fused_backend(x) -> str:
    """Backend of the introspection helpers (they need the histograms: never the reference)."""
    name = _dispatch.resolve("evaluate", _device(x))
    return "cpu" if name == "reference" else name


@shared_doc
def recall_at_k(x: Tensor, labels: Tensor, ks: Union[int, Sequence[int]] = (1, 2, 4, 8), y=None, ref_labels=None
                ) -> Dict[int, float]:
    """Recall@k, exact, from one streaming pass (definition: :func:`flashdml.reference.recall_at_k`).

    The fraction of queries (with ``R_i > 0`` relevant references) that have a same-label reference among their
    k nearest (cosine, ties -> lower reference index, self mode excludes the query itself); recall@1 equals
    pytorch-metric-learning's ``precision_at_1``. ``nan`` when no query has ``R_i > 0``.

    Args:
        x (Tensor): embeddings ``[N, d]`` (the queries), fp16, bf16, fp32 or fp64; cosine similarity from rows
            normalised in fp32, on the device of ``x``.
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
            tensors on different devices; an empty ``ks``, a k < 1 or above the candidates per query; a NaN or
            infinite embedding (fused backends).
        RuntimeError: an explicitly selected backend that cannot run the call.

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> fd.metrics.recall_at_k(x, labels, ks=(1, 2))
        {1: 0.75, 2: 0.75}
    """
    def fused(name):
        out = _fused_evaluate(x, labels, ("recall_at_k",), ks, y, ref_labels, False, {}, backend=name)
        return {int(k.split("@")[1]): v for k, v in out.items()}
    return _single("recall_at_k", x, fused, lambda: _reference.recall_at_k(x, labels, ks=ks, y=y, ref_labels=ref_labels))


@shared_doc
def map_at_r(x: Tensor, labels: Tensor, y=None, ref_labels=None) -> float:
    """MAP@R, exact, from one streaming pass (definition: :func:`flashdml.reference.map_at_r`).

    ``AP@R_i = (1/R_i) Σ_{r=1}^{R_i} P@r · rel(r)`` over query i's ranked list, averaged over the queries with
    ``R_i > 0`` (``nan`` if none); equals pytorch-metric-learning's ``mean_average_precision_at_r``.

    Args:
        x (Tensor): embeddings ``[N, d]`` (the queries), fp16, bf16, fp32 or fp64; cosine similarity from rows
            normalised in fp32, on the device of ``x``.
        labels (Tensor): integer ``[N]``, required.
        {{gallery_args}}

    Returns:
        float: MAP@R in ``[0, 1]``, or ``nan``.

    Raises:
        {{input_errors_fused}}

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> fd.metrics.map_at_r(x, labels)
        0.75
    """
    return _single("map_at_r", x,
                   lambda b: _fused_evaluate(x, labels, ("map_at_r",), 1, y, ref_labels, False, {},
                                             backend=b)["map@r"],
                   lambda: _reference.map_at_r(x, labels, y=y, ref_labels=ref_labels))


@shared_doc
def pr_auc(x: Tensor, labels: Tensor, y=None, ref_labels=None) -> float:
    """Global PR-AUC over all pairs from a 2^16-bin pair histogram (definition: :func:`flashdml.reference.pr_auc`).

    Average precision of one similarity threshold swept over every (query, reference) pair, positive = same
    label. Pairs whose similarities share a bin tie; :func:`pr_auc_bounds` gives the range the exact value lies
    in. ``nan`` when there is no positive pair.

    Args:
        x (Tensor): embeddings ``[N, d]`` (the queries), fp16, bf16, fp32 or fp64; cosine similarity from rows
            normalised in fp32, on the device of ``x``.
        labels (Tensor): integer ``[N]``, required.
        {{gallery_args}}

    Returns:
        float: PR-AUC in ``[0, 1]``, or ``nan``.

    Raises:
        {{input_errors_fused}}

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> fd.metrics.pr_auc(x, labels)
        0.5
    """
    return _single("pr_auc", x,
                   lambda b: _fused_evaluate(x, labels, ("pr_auc",), 1, y, ref_labels, False, {},
                                             backend=b)["pr_auc"],
                   lambda: _reference.pr_auc(x, labels, y=y, ref_labels=ref_labels))


def opis(x: Tensor, labels: Tensor, *, far_range=(1e-2, 1e-1), n_thresholds: int = 101, beta: float = 1.0) -> float:
    """OPIS ``(1/T) Σ_c mean_s (U_c(s) − Ū(s))²`` from per-class histograms (see :func:`flashdml.reference.opis`).

    The TCM paper's threshold-consistency measure, self mode only: the variance across classes of each class's
    utility ``U_c(s)`` over thresholds s spanning a false-accept-rate range. The result is the exact OPIS at
    thresholds within ``h_c/2 + 2^-15`` of the reference's (:func:`opis_thresholds` returns them).

    Args:
        x (Tensor): embeddings ``[N, d]`` (the queries), fp16, bf16, fp32 or fp64; cosine similarity from rows
            normalised in fp32, on the device of ``x``.
        labels (Tensor): integer ``[N]``, required.
        far_range (tuple[float, float]): ``(far_min, far_max)`` with ``0 < far_min <= far_max <= 1``: the
            calibration range of overall false-accept rates. Default ``(1e-2, 1e-1)``.
        n_thresholds (int): ``>= 1``, thresholds on the calibration range. Default 101.
        beta (float): ``> 0``, the β of the F-score-like utility. Default 1.0.

    Returns:
        float: OPIS (>= 0), or ``nan`` when no class has two samples or there is no negative pair.

    Raises:
        TypeError: ``x`` or a label tensor that is not a tensor; embeddings that are not floating; non-integer
            labels. Also ``far_range`` that is not a pair, a non-integer ``n_thresholds``.
        ValueError: ``labels`` missing, not 1-D or not matching its rows; ``x`` not 2-D or
            empty; tensors on different devices; ``far_range`` outside ``0 < far_min <= far_max <= 1``;
            ``n_thresholds < 1``; ``beta <= 0`` or non-finite; a NaN or infinite embedding (fused backends).
        RuntimeError: an explicitly selected backend that cannot run the call.

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> round(fd.metrics.opis(x, labels), 4)
        0.1837
    """
    kw = dict(far_range=far_range, n_thresholds=n_thresholds, beta=beta)
    return _single("opis", x,
                   lambda b: _fused_evaluate(x, labels, ("opis",), 1, None, None, False, kw, backend=b)["opis"],
                   lambda: _reference.opis(x, labels, **kw))


def eps_opis(x: Tensor, labels: Tensor, *, eps: float = 0.05, far_range=(1e-2, 1e-1), n_thresholds: int = 101,
             beta: float = 1.0) -> float:
    """ε-OPIS ``mean_s (U_high(s) − U_low(s))²`` (:func:`flashdml.reference.eps_opis`); accuracy as :func:`opis`.

    ``U_high`` / ``U_low``: the mean utilities of the best / worst ``ceil(ε·T)`` classes, ranked by their mean
    utility over the thresholds. Self mode only.

    Args:
        x (Tensor): embeddings ``[N, d]`` (the queries), fp16, bf16, fp32 or fp64; cosine similarity from rows
            normalised in fp32, on the device of ``x``.
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
            ``0 < far_min <= far_max <= 1``; ``n_thresholds < 1``; ``beta <= 0`` or non-finite; a NaN or
            infinite embedding (fused backends).
        RuntimeError: an explicitly selected backend that cannot run the call.

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> round(fd.metrics.eps_opis(x, labels, eps=0.05), 4)
        0.7347
    """
    kw = dict(far_range=far_range, n_thresholds=n_thresholds, beta=beta)
    return _single("eps_opis", x,
                   lambda b: _fused_evaluate(x, labels, ("eps_opis",), 1, None, None, False, dict(kw, eps=eps),
                                             backend=b)["eps_opis"],
                   lambda: _reference.eps_opis(x, labels, eps=eps, **kw))


# ----------------------------------------------------------------------------------------------- introspection
@shared_doc
def pr_auc_bounds(x: Tensor, labels: Tensor, y=None, ref_labels=None) -> tuple:
    """The range ``(lower, upper)`` the exact PR-AUC lies in, from the 2^16-bin counts :func:`pr_auc` uses.

    Per bin, ``lower`` ranks its positive pairs after its negatives and ``upper`` before them (up to pairs whose
    fp32 similarity falls in a neighbouring bin). Always runs a fused pass, also under the "reference" backend.

    Args:
        x (Tensor): embeddings ``[N, d]`` (the queries), fp16, bf16, fp32 or fp64; cosine similarity from rows
            normalised in fp32, on the device of ``x``.
        labels (Tensor): integer ``[N]``, required.
        {{gallery_args}}

    Returns:
        tuple[float, float]: ``(lower, upper)``, ``lower <= pr_auc(...) <= upper``.

    Raises:
        {{input_errors_fused}}

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> lower, upper = fd.metrics.pr_auc_bounds(x, labels)
        >>> lower <= fd.reference.pr_auc(x, labels) <= upper
        True
    """
    details: dict = {}
    _fused_evaluate(x, labels, ("pr_auc",), 1, y, ref_labels, False, {}, details, _fused_backend(x))
    return details["pr_auc_bounds"]


def opis_thresholds(x: Tensor, labels: Tensor, *, far_range=(1e-2, 1e-1), n_thresholds: int = 101) -> Tensor:
    """The thresholds at which :func:`opis` evaluates the per-class utilities exactly (edges of its histogram bins).

    Each is within ``h_c/2 + 2^-15`` of the reference's threshold (``h_c = 2 / opis_bins``, see the module
    docstring). Always runs a fused pass, also under the "reference" backend. Self mode only.

    Args:
        x (Tensor): embeddings ``[N, d]`` (the queries), fp16, bf16, fp32 or fp64; cosine similarity from rows
            normalised in fp32, on the device of ``x``.
        labels (Tensor): integer ``[N]``, required.
        far_range (tuple[float, float]): ``(far_min, far_max)``, ``0 < far_min <= far_max <= 1``. Default
            ``(1e-2, 1e-1)``.
        n_thresholds (int): ``>= 1``. Default 101.

    Returns:
        Tensor or None: float64 ``[n_thresholds]``, ascending; ``None`` when OPIS is ``nan`` (no class with two
        samples, or no negative pair).

    Raises:
        TypeError: ``x`` or a label tensor that is not a tensor; embeddings that are not floating; non-integer
            labels. Also ``far_range`` that is not a pair, a non-integer ``n_thresholds``.
        ValueError: ``labels`` missing, not 1-D or not matching its rows; ``x`` not 2-D or
            empty; tensors on different devices; ``far_range`` outside ``0 < far_min <= far_max <= 1``;
            ``n_thresholds < 1``; a NaN or infinite embedding (fused backends).
        RuntimeError: an explicitly selected backend that cannot run the call.

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> t = fd.metrics.opis_thresholds(x, labels, n_thresholds=5)
        >>> t.shape, t.dtype
        (torch.Size([5]), torch.float64)
    """
    details: dict = {}
    _fused_evaluate(x, labels, ("opis",), 1, None, None, False,
                    dict(far_range=far_range, n_thresholds=n_thresholds), details, _fused_backend(x))
    return details.get("thresholds")
