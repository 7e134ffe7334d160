"""Streaming metrics (docs/spec.md §3) on the C++ CPU backend vs the reference and pytorch-metric-learning.

recall@k and MAP@R must be identical to the reference; PR-AUC, OPIS and ε-OPIS must lie within the bounds the
module docstring of flashdml.metrics states.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import flashdml as fd
import flashdml.metrics as FM
from flashdml._debug import poison_outputs
from flashdml._math import l2_normalize

pytestmark = pytest.mark.skipif(not fd.available_backends()["cpu"][0], reason="flashdml._C not built")
REF = fd.reference


def clustered(n_classes, seed, d=32, max_per_class=30, spread=1.2, dtype=torch.float32):
    """Clustered embeddings, class sizes 1..max_per_class (so some singletons), rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_per_class + 1, (n_classes,), generator=g)
    centers = torch.randn(n_classes, d, generator=g, dtype=torch.float64)
    labels = torch.repeat_interleave(torch.arange(n_classes), sizes)
    x = centers[labels] + spread * torch.randn(len(labels), d, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm].to(dtype), labels[perm]


def fused(fn, *args, **kwargs):
    with fd.backend("cpu"), poison_outputs():
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------ exact retrieval
@pytest.mark.parametrize("seed,d,dtype", [(0, 32, torch.float32), (1, 3, torch.float64), (2, 129, torch.float16)])
def test_recall_and_map_identical_to_reference_self_mode(seed, d, dtype):
    x, labels = clustered(60, seed, d=d, dtype=dtype)
    assert (torch.bincount(labels) == 1).any()
    ks = (1, 2, 4, 8, 16, 100)
    got = fused(FM.recall_at_k, x, labels, ks=ks)
    want = REF.recall_at_k(x, labels, ks=ks)
    assert list(got) == list(ks)
    for k in ks:
        assert got[k] == pytest.approx(want[k], abs=1e-12)
    assert fused(FM.map_at_r, x, labels) == pytest.approx(REF.map_at_r(x, labels), abs=1e-12)


def test_recall_and_map_identical_to_reference_cross_mode():
    x, labels = clustered(70, seed=3, d=20)
    n_q = len(x) // 3
    q, ql, g, gl = x[:n_q], labels[:n_q], x[n_q:], labels[n_q:]
    gl = torch.where(gl < 5, gl + 1000, gl)  # some query labels absent from the gallery: excluded
    got = fused(FM.evaluate, q, ql, metrics=("recall_at_k", "map_at_r"), ks=(1, 5, 50), y=g, ref_labels=gl)
    rec = REF.recall_at_k(q, ql, ks=(1, 5, 50), y=g, ref_labels=gl)
    assert got["recall@1"] == pytest.approx(rec[1], abs=1e-12)
    assert got["recall@5"] == pytest.approx(rec[5], abs=1e-12)
    assert got["recall@50"] == pytest.approx(rec[50], abs=1e-12)
    assert got["map@r"] == pytest.approx(REF.map_at_r(q, ql, y=g, ref_labels=gl), abs=1e-12)


def test_ties_from_duplicated_rows_follow_the_lower_reference_index():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(40, 8, generator=g, dtype=torch.float64)
    pick = torch.randint(0, 40, (400,), generator=g)
    x = base[pick].float()  # many exact duplicates: whole tie groups of equal similarity, mixed labels
    labels = torch.randint(0, 25, (400,), generator=g)
    ks = (1, 3, 10, 30)
    got, want = fused(FM.recall_at_k, x, labels, ks=ks), REF.recall_at_k(x, labels, ks=ks)
    for k in ks:
        assert got[k] == pytest.approx(want[k], abs=1e-12)
    assert fused(FM.map_at_r, x, labels) == pytest.approx(REF.map_at_r(x, labels), abs=1e-12)
    # the reference's hand tie case (ties toward the higher index would give recall@1 = 1)
    xt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]])
    lt = torch.tensor([0, 1, 0, 0])
    assert fused(FM.recall_at_k, xt, lt, ks=(1, 2, 3)) == pytest.approx({1: 1 / 3, 2: 1.0, 3: 1.0})
    assert fused(FM.map_at_r, xt, lt) == pytest.approx(0.5, abs=1e-12)


def test_integer_embeddings_differ_from_the_reference_only_on_float64_near_ties():
    """Tie-heavy input (small integer vectors: many distinct rows share a cosine). Queries whose ranking holds a
    near-tie between different rows with different relevance can rank differently; every other query ranks
    exactly like the reference, so each metric moves by at most the share of flagged queries (docs/spec.md §3)."""
    g = torch.Generator().manual_seed(5)
    N, d = 1500, 6
    x = torch.randint(-2, 3, (N, d), generator=g).float()
    x[x.abs().sum(1) == 0, 0] = 1.0  # no zero rows
    labels = torch.randint(0, 150, (N,), generator=g)
    ks = (1, 4)
    got = fd.metrics.evaluate(x, labels, metrics=("recall_at_k", "map_at_r"), ks=ks)
    want = fd.reference.evaluate(x.double(), labels, metrics=("recall_at_k", "map_at_r"), ks=ks)
    # flag the queries with a near-tie between different rows of different relevance in their first R + k ranks
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    S = xn @ xn.T
    S.fill_diagonal_(-float("inf"))
    order = torch.argsort(S, dim=1, descending=True, stable=True)
    R = (labels[:, None] == labels[None, :]).sum(1) - 1
    depth = int(R.max()) + max(ks) + 1
    top = order[:, :depth]
    vals = torch.gather(S, 1, top)
    rel = labels[top] == labels[:, None]
    near = (vals[:, :-1] - vals[:, 1:]).abs() <= 1e-12
    different = (x[top[:, :-1]] != x[top[:, 1:]]).any(-1) & (rel[:, :-1] != rel[:, 1:])
    flagged = float((near & different).any(1).double().mean())
    assert 0 < flagged < 0.5  # the input really is tie-heavy, and most queries are not affected
    for key in want:
        assert abs(got[key] - want[key]) <= flagged + 1e-12, (key, got[key], want[key], flagged)


def test_tiles_chunks_and_large_k():
    # > one 128 x 512 tile, several C++ calls (chunks), a class bigger than the candidate buffer's slack
    x, labels = clustered(8, seed=5, d=16, max_per_class=10)
    big = torch.randn(700, 16, generator=torch.Generator().manual_seed(5)) + 2.0
    x = torch.cat([x, big])
    labels = torch.cat([labels, torch.full((700,), 99)])
    old = FM.ROWS_PER_CALL
    try:
        FM.ROWS_PER_CALL = 97
        got = fused(FM.evaluate, x, labels, ks=(1, 600), metrics=("recall_at_k", "map_at_r", "pr_auc", "opis"))
    finally:
        FM.ROWS_PER_CALL = old
    again = fused(FM.evaluate, x, labels, ks=(1, 600), metrics=("recall_at_k", "map_at_r", "pr_auc", "opis"))
    assert got == again  # chunking does not change anything (integer histograms, per-row top-k)
    assert got["map@r"] == pytest.approx(REF.map_at_r(x, labels), abs=1e-12)
    rec = REF.recall_at_k(x, labels, ks=(1, 600))
    assert got["recall@1"] == pytest.approx(rec[1], abs=1e-12)
    assert got["recall@600"] == pytest.approx(rec[600], abs=1e-12)


# ------------------------------------------------------------------------------------------ pytorch-metric-learning
class Float64KNN:
    """kNN for pml's AccuracyCalculator in float64, ties -> lower index (as tests/reference does)."""

    def __call__(self, query, k, reference, ref_includes_query=False):
        S = l2_normalize(query.double()) @ l2_normalize(reference.double()).T
        if ref_includes_query:
            i = torch.arange(len(query))
            S[i, i] = -math.inf
        order = torch.sort(-S, dim=1, stable=True).indices[:, :k]
        return torch.gather(S, 1, order), order


def test_matches_pml_accuracy_calculator_n5000():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, labels = clustered(330, seed=6, d=48, spread=1.6)
    assert 4500 < len(x) < 5600
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                              device=torch.device("cpu"), knn_func=Float64KNN())
    acc = calc.get_accuracy(x, labels)
    assert 0.2 < acc["precision_at_1"] < 0.98
    got = fused(FM.evaluate, x, labels, metrics=("recall_at_k", "map_at_r"), ks=(1,))
    assert got["recall@1"] == pytest.approx(acc["precision_at_1"], abs=1e-6)
    assert got["map@r"] == pytest.approx(acc["mean_average_precision_at_r"], abs=1e-6)


# ------------------------------------------------------------------------------------------ PR-AUC
@pytest.mark.parametrize("cross", [False, True])
def test_pr_auc_within_the_stated_bound(cross):
    x, labels = clustered(40, seed=7, d=16)
    kw = dict(y=x[300:], ref_labels=labels[300:]) if cross else {}
    q, ql = (x[:300], labels[:300]) if cross else (x, labels)
    want = REF.pr_auc(q, ql, **kw)
    got = fused(FM.pr_auc, q, ql, **kw)
    lo, hi = fused(FM.pr_auc_bounds, q, ql, **kw)
    slack = 1e-6  # pairs whose fp32 similarity crosses a bin edge
    assert lo - slack <= want <= hi + slack
    assert lo - slack <= got <= hi + slack
    assert hi - lo < 1e-3 and abs(got - want) < 1e-3


def test_pr_auc_nan_without_positives():
    x, _ = clustered(10, seed=8)
    assert math.isnan(fused(FM.pr_auc, x, torch.arange(len(x))))


# ------------------------------------------------------------------------------------------ OPIS
def opis_at_thresholds(x, labels, thresholds, beta, eps):
    """OPIS / ε-OPIS with the given thresholds, from explicit float64 pairs (the reference's counting)."""
    S = l2_normalize(x.double()) @ l2_normalize(x.double()).T
    N = len(x)
    iu = torch.triu_indices(N, N, offset=1)
    s = S[iu[0], iu[1]]
    classes, counts = torch.unique(labels, return_counts=True)
    U = []
    for c, n in zip(classes.tolist(), counts.tolist()):
        if n < 2:
            continue
        a, b = labels[iu[0]] == c, labels[iu[1]] == c
        pos, neg = s[a & b], s[a ^ b]
        tpr = (pos[None, :] >= thresholds[:, None]).double().mean(1)
        tnr = (neg[None, :] < thresholds[:, None]).double().mean(1)
        den = beta ** 2 * tpr + tnr
        U.append(torch.where(den > 0, (1 + beta ** 2) * tpr * tnr / den.clamp_min(1e-300), torch.zeros_like(den)))
    U = torch.stack(U)
    value = float(((U - U.mean(0)) ** 2).mean(1).mean())
    m = min(max(math.ceil(round(eps * U.shape[0], 9)), 1), U.shape[0])
    mu = U.mean(1)
    best, worst = torch.sort(-mu, stable=True).indices[:m], torch.sort(mu, stable=True).indices[:m]
    return value, float(((U[best].mean(0) - U[worst].mean(0)) ** 2).mean())


def reference_thresholds(x, labels, far_range, n):
    S = l2_normalize(x.double()) @ l2_normalize(x.double()).T
    iu = torch.triu_indices(len(x), len(x), offset=1)
    neg = torch.sort(S[iu[0], iu[1]][labels[iu[0]] != labels[iu[1]]], descending=True).values
    at = lambda f: float(neg[min(max(math.ceil(round(f * len(neg), 9)), 1), len(neg)) - 1])  # noqa: E731
    return torch.linspace(at(far_range[1]), at(far_range[0]), n, dtype=torch.float64)


@pytest.mark.parametrize("hist_bytes", [None, 1])  # default (2^16 bins here) and the coarsest grid (256 bins)
@pytest.mark.parametrize("far_range,n_thresholds,beta,eps", [((1e-2, 1e-1), 101, 1.0, 0.05), ((0.05, 0.3), 17, 0.5, 0.2)])
def test_opis_is_exact_at_thresholds_within_the_bound(hist_bytes, far_range, n_thresholds, beta, eps, monkeypatch):
    if hist_bytes is not None:
        monkeypatch.setattr(FM, "OPIS_HIST_BYTES", hist_bytes)
    x, labels = clustered(30, seed=9, d=8, max_per_class=12, spread=1.5)
    assert (torch.bincount(labels) == 1).any()
    kw = dict(far_range=far_range, n_thresholds=n_thresholds, beta=beta)
    got = fused(FM.opis, x, labels, **kw)
    got_eps = fused(FM.eps_opis, x, labels, eps=eps, **kw)
    th = fused(FM.opis_thresholds, x, labels, far_range=far_range, n_thresholds=n_thresholds)
    bins = FM._opis_bins(int(torch.unique(labels).numel()), len(x) ** 2)
    assert bins == 256 if hist_bytes else bins >= 1 << 15
    bound = 1.0 / bins + 2.0 ** -15 + 1e-6
    assert (th - reference_thresholds(x, labels, far_range, n_thresholds)).abs().max() <= bound
    want, want_eps = opis_at_thresholds(x, labels, th, beta, eps)
    assert got == pytest.approx(want, abs=1e-9) and got > 1e-4
    assert got_eps == pytest.approx(want_eps, abs=1e-9)
    ref = REF.opis(x, labels, **kw)
    assert abs(got - ref) < (0.2 * ref if hist_bytes else 0.02 * ref)


def test_opis_nan_cases_and_hand_case():
    # the reference's hand case with a gap: thresholds .3 .4 .5 land on bin edges up to 2^-15
    G = torch.tensor([[1.0, 0.8, 0.5, 0.3], [0.8, 1.0, 0.2, 0.0], [0.5, 0.2, 1.0, 0.1], [0.3, 0.0, 0.1, 1.0]],
                     dtype=torch.float64)
    w, V = torch.linalg.eigh(G)
    x = V * w.clamp_min(0).sqrt()
    labels = torch.tensor([0, 0, 1, 1])
    sumsq = 4 / 9 + 2 * 36 / 49
    assert fused(FM.opis, x, labels, far_range=(0.25, 0.5), n_thresholds=3) == pytest.approx(sumsq / 12, abs=1e-9)
    assert fused(FM.eps_opis, x, labels, far_range=(0.25, 0.5), n_thresholds=3) == pytest.approx(sumsq / 3, abs=1e-9)
    assert math.isnan(fused(FM.opis, x, torch.arange(4)))  # all singletons
    assert math.isnan(fused(FM.opis, x, torch.zeros(4, dtype=torch.long)))  # no negative pair
    assert math.isnan(fused(FM.eps_opis, x, torch.arange(4)))


# ------------------------------------------------------------------------------------------ evaluate & checks
def test_evaluate_equals_single_metric_functions_and_progress():
    x, labels = clustered(25, seed=10, d=16)
    opts = dict(far_range=(0.02, 0.2), n_thresholds=21, beta=2.0)
    calls = []
    out = fused(FM.evaluate, x, labels, ks=(1, 4), eps=0.1, progress=lambda d, t: calls.append((d, t)), **opts)
    assert calls and calls[-1] == (len(x), len(x))
    rec = fused(FM.recall_at_k, x, labels, ks=(1, 4))
    assert out == {"recall@1": rec[1], "recall@4": rec[4], "map@r": fused(FM.map_at_r, x, labels),
                   "pr_auc": fused(FM.pr_auc, x, labels), "opis": fused(FM.opis, x, labels, **opts),
                   "eps_opis": fused(FM.eps_opis, x, labels, eps=0.1, **opts)}
    assert all(isinstance(v, float) for v in out.values())
    assert set(fused(FM.evaluate, x, labels)) == set(REF.evaluate(x, labels))
    with fd.backend("reference"):  # dispatch: the reference runs the whole call
        assert FM.evaluate(x, labels, metrics=("map_at_r",)) == {"map@r": REF.map_at_r(x, labels)}


def test_singletons_and_lone_queries_give_nan():
    x, _ = clustered(10, seed=11)
    lab = torch.arange(len(x))
    out = fused(FM.evaluate, x, lab, metrics=("recall_at_k", "map_at_r", "pr_auc", "opis"), ks=(1,))
    assert all(math.isnan(v) for v in out.values())


def test_input_errors():
    x, labels = clustered(10, seed=12)
    with pytest.raises(ValueError, match="ks"):
        fused(FM.recall_at_k, x, labels, ks=(len(x),))  # self mode: N - 1 candidates
    with pytest.raises(TypeError, match="ks"):
        fused(FM.recall_at_k, x, labels, ks=(1.5,))
    with pytest.raises(ValueError, match="self mode"):
        fused(FM.evaluate, x, labels, y=x, ref_labels=labels)
    with pytest.raises(ValueError, match="unknown metric"):
        fused(FM.evaluate, x, labels, metrics=("nmi",))
    with pytest.raises(TypeError, match="unknown metric option"):
        fused(FM.evaluate, x, labels, temperature=0.1)
    with pytest.raises(ValueError, match="labels"):
        fused(FM.map_at_r, x, labels[:-1])
    with pytest.raises(ValueError, match="ref_labels"):
        fused(FM.pr_auc, x, labels, y=x)
    with pytest.raises(ValueError, match="far_range"):
        fused(FM.opis, x, labels, far_range=(0.2, 0.1))
    with pytest.raises(ValueError, match="eps"):
        fused(FM.eps_opis, x, labels, eps=0.0)
    bad = x.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fused(FM.map_at_r, bad, labels)


def test_memory_stays_far_below_n_squared():
    """N = 20 000: S would be 1.6 GB in fp32; the pass must stay well below that (separate process: RSS peak)."""
    code = (
        "import resource, torch, flashdml as fd\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(20000, 16); lab = torch.randint(0, 4000, (20000,))\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with fd.backend('cpu'):\n"
        "    fd.metrics.evaluate(x, lab, ks=(1, 10), progress=False)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) < 500  # MiB above the inputs
