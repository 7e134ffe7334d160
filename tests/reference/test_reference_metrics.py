"""Tests pinning down the reference metrics (docs/spec.md §3): hand cases, pytorch-metric-learning, scikit-learn."""
import math
import os
import sys

import numpy as np
import pytest
import torch

try:
    import flashdml.reference.metrics as M
except ImportError:  # package not installed (yet): import from the source tree
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "python"))
    import flashdml.reference.metrics as M
from flashdml._math import l2_normalize

DEG = math.pi / 180


def at_angles(degrees):
    a = torch.tensor(degrees, dtype=torch.float64) * DEG
    return torch.stack([torch.cos(a), torch.sin(a)], dim=1)


def clustered(n_classes, seed, d=32, max_per_class=30, spread=1.2):
    """Random clustered embeddings; class sizes 1..max_per_class (so some singletons)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_per_class + 1, (n_classes,), generator=g)
    centers = torch.randn(n_classes, d, generator=g, dtype=torch.float64)
    labels = torch.repeat_interleave(torch.arange(n_classes), sizes)
    x = centers[labels] + spread * torch.randn(len(labels), d, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm], labels[perm]


def cosine(x, y=None):
    """The reference's float64 cosines (tie-exact: equal rows score exactly equal, S symmetric): the tests below
    check what the metrics compute from S; test_similarity_keeps_exact_ties checks S itself."""
    return M._similarity(x, x if y is None else y)


def test_similarity_keeps_exact_ties():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(30, 8, generator=g, dtype=torch.float64)
    pick = torch.randint(0, 30, (400,), generator=g)  # 400 x 8: MKL's plain GEMM breaks both properties here
    x = base[pick] * (1 + (torch.rand(400, 1, generator=g) < 0.3).double())  # duplicates, some scaled x2
    S = cosine(x)
    assert torch.equal(S, S.T)
    same_row = pick[:, None] == pick[None, :]
    for j in range(1, 400):  # every column equals the column of its row's first occurrence, bit for bit
        first = int(torch.nonzero(same_row[j])[0])
        assert torch.equal(S[:, j], S[:, first])
    naive = l2_normalize(x) @ l2_normalize(x).T
    assert torch.allclose(S, naive, rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------ hand cases
def test_map_at_r_and_recall_hand_case_cross_mode():
    # query 0 = angle 0°, label 0; query 1 = 90°, label 1; query 2 = 45°, label 2 (no reference has label 2)
    q = at_angles([0.0, 90.0, 45.0])
    q_lab = torch.tensor([0, 1, 2])
    # references: angle / label  r0 10°/1, r1 0°/0, r2 20°/0, r3 30°/1, r4 90°/0
    r = at_angles([10.0, 0.0, 20.0, 30.0, 90.0])
    r_lab = torch.tensor([1, 0, 0, 1, 0])
    # query 0: ranking r1 r0 r2 r3 r4 -> relevance 1 0 1 0 1, R = 3
    #          AP@R = (1/3)(P@1·1 + P@2·0 + P@3·1) = (1/3)(1 + 2/3) = 5/9
    # query 1: ranking r4 r3 r2 r0 r1 -> relevance 0 1 0 1 0, R = 2
    #          AP@R = (1/2)(0 + P@2·1) = (1/2)(1/2) = 1/4
    # query 2: R = 0 -> excluded.  MAP@R = (5/9 + 1/4) / 2 = 29/72
    assert M.map_at_r(q, q_lab, y=r, ref_labels=r_lab) == pytest.approx(29 / 72, abs=1e-12)
    # recall@1: q0 hit, q1 miss -> 1/2; recall@2: both hit -> 1; q2 excluded from the mean
    assert M.recall_at_k(q, q_lab, ks=(1, 2, 5), y=r, ref_labels=r_lab) == {1: 0.5, 2: 1.0, 5: 1.0}


def _tie_case():
    # p0 = (1,0) lab 0, p1 = (0,1) lab 1, p2 = (0,-1) lab 0, p3 = (-1,0) lab 0; all similarities exact (0 or ±1)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]])
    return x, torch.tensor([0, 1, 0, 0])


def test_recall_at_k_hand_case_with_ties_self_mode():
    x, labels = _tie_case()
    # p1 is the only sample of label 1 -> R = 0 -> excluded.
    # p0: candidates p1 (0), p2 (0), p3 (-1); tie p1/p2 -> lower index p1 first -> miss@1, hit@2
    # p2: p0 (0, lab 0), p3 (0, lab 0), p1 (-1) -> hit@1
    # p3: p1 (0, lab 1), p2 (0, lab 0), p0 (-1); tie -> p1 first -> miss@1, hit@2
    # recall@1 = 1/3 (ties toward the higher index would give 3/3); recall@2 = 1
    rec = M.recall_at_k(x, labels, ks=(1, 2, 3))
    assert rec[1] == pytest.approx(1 / 3, abs=1e-12)
    assert rec[2] == 1.0 and rec[3] == 1.0
    # MAP@R (R = 2 for p0, p2, p3): p0 rel 0 1 -> 1/4; p2 rel 1 1 -> 1; p3 rel 0 1 -> 1/4; mean = 1/2
    assert M.map_at_r(x, labels) == pytest.approx(0.5, abs=1e-12)


def test_pr_auc_hand_cases():
    q = at_angles([0.0])
    q_lab = torch.tensor([0])
    # scores cos 0°, 10°, 20°, 30°, 40°, 50° with labels + - + - - +
    r = at_angles([0.0, 10.0, 20.0, 30.0, 40.0, 50.0])
    r_lab = torch.tensor([0, 1, 0, 1, 1, 0])
    # AP = (1/3)(1/1 + 2/3 + 3/6) = 13/18
    assert M.pr_auc(q, q_lab, y=r, ref_labels=r_lab) == pytest.approx(13 / 18, abs=1e-12)
    # add a negative at 20°: it ties with the positive at 20°, the tie is one threshold step:
    # steps (TP, FP): (1,0) (1,1) (2,2) (2,3) (2,4) (3,4) -> AP = (1/3)(1 + 2/4 + 3/7) = 9/14
    r2 = torch.cat([r, at_angles([20.0])])
    r2_lab = torch.cat([r_lab, torch.tensor([1])])
    assert M.pr_auc(q, q_lab, y=r2, ref_labels=r2_lab) == pytest.approx(9 / 14, abs=1e-12)
    # self mode of the tie case: unordered positives 0, 0, -1 and negatives 0, -1, 0 (ordered pairs double both)
    # threshold 0: TP 2, FP 2 -> P = 1/2, recall 2/3; threshold -1: TP 3, FP 3 -> P = 1/2 -> AP = 1/2
    x, labels = _tie_case()
    assert M.pr_auc(x, labels) == pytest.approx(0.5, abs=1e-12)
    assert math.isnan(M.pr_auc(x, torch.arange(4)))  # no positive pair


# ------------------------------------------------------------------------------------------ pytorch-metric-learning
class Float64KNN:
    """kNN for pml's AccuracyCalculator in float64 with ties -> lower index, so rankings cannot differ from
    ours by float32 rounding (pml casts embeddings to float32; faiss' L2 in float32 reorders near-ties)."""

    def __call__(self, query, k, reference, ref_includes_query=False):
        S = cosine(query, reference)
        if ref_includes_query:
            idx = torch.arange(len(query))
            S[idx, idx] = -math.inf
        order = torch.sort(-S, dim=1, stable=True).indices[:, :k]
        return torch.gather(S, 1, order), order


def pml_accuracy(x, labels, y=None, ref_labels=None, knn_func=None):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                              device=torch.device("cpu"), knn_func=knn_func or Float64KNN())
    if y is None:
        return calc.get_accuracy(x, labels)  # reference=None -> ref_includes_query=True
    return calc.get_accuracy(x, labels, y, ref_labels, ref_includes_query=False)


def test_recall_and_map_match_pml_self_mode():
    x, labels = clustered(55, seed=1)
    assert 500 < len(x) < 2000 and (torch.bincount(labels) == 1).any()
    x = x.float()  # pml works in float32; give both the same input
    acc = pml_accuracy(x, labels)
    assert 0.2 < acc["precision_at_1"] < 0.98  # a non-trivial case
    assert M.recall_at_k(x, labels, ks=(1,))[1] == pytest.approx(acc["precision_at_1"], abs=1e-6)
    assert M.map_at_r(x, labels) == pytest.approx(acc["mean_average_precision_at_r"], abs=1e-6)
    # pml's own default (faiss, float32 L2) agrees up to near-tie reorderings
    from pytorch_metric_learning.utils.inference import FaissKNN

    acc_faiss = pml_accuracy(l2_normalize(x), labels, knn_func=FaissKNN())
    assert M.map_at_r(x, labels) == pytest.approx(acc_faiss["mean_average_precision_at_r"], abs=1e-3)


def test_recall_and_map_match_pml_cross_mode():
    x, labels = clustered(60, seed=2)
    n_q = len(x) // 3
    q, q_lab, g, g_lab = x[:n_q].float(), labels[:n_q], x[n_q:].float(), labels[n_q:]
    # some query labels must be absent from the gallery (pml excludes those queries)
    g_lab = torch.where(g_lab < 5, g_lab + 1000, g_lab)
    assert (q_lab < 5).any()
    acc = pml_accuracy(q, q_lab, g, g_lab)
    assert M.recall_at_k(q, q_lab, ks=1, y=g, ref_labels=g_lab)[1] == pytest.approx(acc["precision_at_1"], abs=1e-6)
    assert M.map_at_r(q, q_lab, y=g, ref_labels=g_lab) == pytest.approx(acc["mean_average_precision_at_r"], abs=1e-6)


def test_recall_at_k_against_rank_counting():
    """Independent recall@k: rank of reference j = #{S > S_j} + #{j' < j with S == S_j}; no sorting."""
    x, labels = clustered(40, seed=3, d=8, spread=2.0)
    x = torch.round(x * 2) / 2  # coarse grid -> many exactly tied similarities
    S = cosine(x).numpy()
    lab = labels.numpy()
    n = len(lab)
    ks = (1, 2, 4, 8, 16)
    hits, valid = np.zeros(len(ks)), 0
    for i in range(n):
        cand = np.array([j for j in range(n) if j != i])
        s = S[i, cand]
        rank = (s[None, :] > s[:, None]).sum(1) + ((s[None, :] == s[:, None]) & (cand[None, :] < cand[:, None])).sum(1)
        rel = lab[cand] == lab[i]
        if rel.any():
            valid += 1
            hits += np.array([rank[rel].min() < k for k in ks])
    got = M.recall_at_k(x, labels, ks=ks)
    assert list(got) == list(ks)
    for k, h in zip(ks, hits):
        assert got[k] == pytest.approx(h / valid, abs=1e-12)


# ------------------------------------------------------------------------------------------ pr_auc vs sklearn
@pytest.mark.parametrize("ties", [False, True])
def test_pr_auc_matches_sklearn(ties):
    sk = pytest.importorskip("sklearn.metrics")
    x, labels = clustered(25, seed=4, d=6, max_per_class=20)
    if ties:
        x = torch.round(x)  # integer embeddings -> many tied similarities
    S = cosine(x)
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(len(x), dtype=torch.bool)
    expected = sk.average_precision_score(same[off].numpy(), S[off].numpy())
    assert M.pr_auc(x, labels) == pytest.approx(expected, abs=1e-12)
    # cross mode: all B x M pairs
    q, g = x[:50], x[50:]
    Sq = cosine(q, g)
    expected = sk.average_precision_score((labels[:50, None] == labels[None, 50:]).reshape(-1).numpy(),
                                          Sq.reshape(-1).numpy())
    assert M.pr_auc(q, labels[:50], y=g, ref_labels=labels[50:]) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------------ OPIS
def from_gram(G):
    """Embeddings whose cosine-similarity matrix is the (unit-diagonal, PSD) matrix G."""
    w, V = torch.linalg.eigh(torch.tensor(G, dtype=torch.float64))
    return V * w.clamp_min(0).sqrt()


# a1, a2 (class 0), b1, b2 (class 1), c1 (class 2, a singleton)
GRAM = [[1.0, 0.8, 0.5, 0.3, -0.2],
        [0.8, 1.0, 0.2, 0.0, -0.2],
        [0.5, 0.2, 1.0, 0.1, -0.2],
        [0.3, 0.0, 0.1, 1.0, -0.2],
        [-0.2, -0.2, -0.2, -0.2, 1.0]]


def test_opis_hand_case_with_a_gap():
    x = from_gram([row[:4] for row in GRAM[:4]])
    labels = torch.tensor([0, 0, 1, 1])
    # negatives (all cross pairs, n = 4): 0.5, 0.3, 0.2, 0.0.  far_range (0.25, 0.5):
    #   s_hi = s(0.25) = ceil(1)-th largest = 0.5, s_lo = s(0.5) = ceil(2)-th largest = 0.3 -> thresholds .3 .4 .5
    # class 0: positive 0.8 -> TPR = 1;  TNR = #neg < s / 4 = 2/4, 3/4, 3/4
    #          U = 2·TPR·TNR / (TPR + TNR) = (1/2)/(3/4) = 2/3, (3/2)/(7/4) = 6/7, 6/7
    # class 1: positive 0.1 < s -> TPR = 0 -> U = 0 (TNR > 0)
    # Ū = U_0 / 2 -> OPIS = (1/2)·2·mean_s (U_0/2)² = mean_s U_0² / 4 = (4/9 + 2·36/49) / 12
    sumsq = 4 / 9 + 2 * 36 / 49
    assert M.opis(x, labels, far_range=(0.25, 0.5), n_thresholds=3) == pytest.approx(sumsq / 12, abs=1e-12)
    # ε-OPIS, ceil(0.05·2) = 1 class each side: best = class 0, worst = class 1 -> mean_s U_0² = sumsq / 3
    assert M.eps_opis(x, labels, far_range=(0.25, 0.5), n_thresholds=3) == pytest.approx(sumsq / 3, abs=1e-12)
    # a single threshold is s_lo = 0.3: OPIS = (2/3)² / 4
    assert M.opis(x, labels, far_range=(0.25, 0.5), n_thresholds=1) == pytest.approx(1 / 9, abs=1e-12)


def test_opis_singleton_class_is_skipped_but_its_negatives_count():
    x = from_gram(GRAM)
    labels = torch.tensor([0, 0, 1, 1, 2])
    # negatives: the 4 above + 4 pairs with c1 at -0.2 (n = 8). far_range (1/8, 2/8) -> same s_hi = .5, s_lo = .3
    # T = 2 (class 2 skipped). class 0's negatives: 4 cross pairs + (a1,c1), (a2,c1):
    #   TNR = 4/6, 5/6, 5/6 -> U = (4/3)/(5/3) = 4/5, (5/3)/(11/6) = 10/11, 10/11; class 1: U = 0
    sumsq = (4 / 5) ** 2 + 2 * (10 / 11) ** 2
    assert M.opis(x, labels, far_range=(0.125, 0.25), n_thresholds=3) == pytest.approx(sumsq / 12, abs=1e-12)
    assert M.eps_opis(x, labels, eps=1.0, far_range=(0.125, 0.25), n_thresholds=3) == 0.0  # best = worst = all
    # nothing to evaluate -> nan
    assert math.isnan(M.opis(x, torch.arange(5)))  # every class is a singleton
    assert math.isnan(M.opis(x, torch.zeros(5, dtype=torch.long)))  # one class: no negative pair
    assert math.isnan(M.eps_opis(x, torch.arange(5)))


def test_opis_zero_for_two_mirror_image_classes():
    g = torch.Generator().manual_seed(5)
    ang = torch.rand(20, generator=g, dtype=torch.float64) * 2.5 + 0.1
    a = torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    x = torch.cat([a, a * torch.tensor([1.0, -1.0], dtype=torch.float64)])  # class 1 = class 0 mirrored (exact)
    labels = torch.repeat_interleave(torch.tensor([0, 1]), 20)
    assert M.opis(x, labels) == 0.0
    assert M.eps_opis(x, labels) == 0.0
    # while moving one class apart makes it positive
    x2 = x.clone()
    x2[20:] = at_angles((-(torch.rand(20, generator=g, dtype=torch.float64) * 0.3 + 0.1) / DEG).tolist())
    assert M.opis(x2, labels) > 1e-3


def test_opis_zero_utility_when_tpr_and_tnr_are_zero():
    # far_range (1, 1): the only threshold is the smallest negative similarity -> TNR = 0 for every class;
    # class 0's positive pair (-1) lies below it -> TPR = TNR = 0 -> U = 0, not nan
    x = at_angles([0.0, 180.0, 60.0, 80.0])
    labels = torch.tensor([0, 0, 1, 1])
    assert M.opis(x, labels, far_range=(1.0, 1.0)) == 0.0


def brute_force_opis(x, labels, far_range, n_thresholds, beta, eps):
    """OPIS / ε-OPIS from explicit pair lists and loops (an independent re-implementation of the docstring)."""
    S = cosine(x).numpy()
    lab = labels.numpy().tolist()
    n = len(lab)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    neg = sorted((S[i, j] for i, j in pairs if lab[i] != lab[j]), reverse=True)
    rank = lambda f: min(max(math.ceil(round(f * len(neg), 9)), 1), len(neg))  # noqa: E731
    ths = np.linspace(neg[rank(far_range[1]) - 1], neg[rank(far_range[0]) - 1], n_thresholds)
    classes = sorted(c for c in set(lab) if lab.count(c) >= 2)
    U = np.zeros((len(classes), n_thresholds))
    for ci, c in enumerate(classes):
        pos_s = [S[i, j] for i, j in pairs if lab[i] == c and lab[j] == c]
        neg_s = [S[i, j] for i, j in pairs if (lab[i] == c) != (lab[j] == c)]
        for t, s in enumerate(ths):
            tpr = sum(v >= s for v in pos_s) / len(pos_s)
            tnr = sum(v < s for v in neg_s) / len(neg_s)
            den = beta ** 2 * tpr + tnr
            U[ci, t] = (1 + beta ** 2) * tpr * tnr / den if den > 0 else 0.0
    T = len(classes)
    value = np.mean([np.mean((U[c] - U.mean(0)) ** 2) for c in range(T)])
    m = math.ceil(round(eps * T, 9))
    order = np.argsort(-U.mean(1), kind="stable")
    eps_value = np.mean((U[order[:m]].mean(0) - U[order[::-1][:m]].mean(0)) ** 2)
    return value, eps_value


@pytest.mark.parametrize("far_range,n_thresholds,beta,eps,ties", [((1e-2, 1e-1), 101, 1.0, 0.05, False),
                                                                  ((0.05, 0.3), 17, 0.5, 0.2, False),
                                                                  ((0.05, 0.3), 3, 1.0, 0.1, True)])
def test_opis_matches_brute_force(far_range, n_thresholds, beta, eps, ties):
    x, labels = clustered(30, seed=6, d=8, max_per_class=8, spread=1.5)
    if ties:  # 6 distinct directions shared by all classes: thresholds coincide with positive similarities
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)[labels % 6]
    assert (torch.bincount(labels) == 1).any()
    want, want_eps = brute_force_opis(x, labels, far_range, n_thresholds, beta, eps)
    kw = dict(far_range=far_range, n_thresholds=n_thresholds, beta=beta)
    got = M.opis(x, labels, **kw)
    assert got == pytest.approx(want, abs=1e-12) and got > 1e-4
    assert M.eps_opis(x, labels, eps=eps, **kw) == pytest.approx(want_eps, abs=1e-12)


# ------------------------------------------------------------------------------------------ evaluate & checks
def test_evaluate_equals_individual_functions():
    x, labels = clustered(25, seed=7, d=16)
    opts = dict(far_range=(0.02, 0.2), n_thresholds=21, beta=2.0)
    out = M.evaluate(x, labels, ks=(1, 4), eps=0.1, **opts)
    rec = M.recall_at_k(x, labels, ks=(1, 4))
    assert out == {"recall@1": rec[1], "recall@4": rec[4], "map@r": M.map_at_r(x, labels),
                   "pr_auc": M.pr_auc(x, labels), "opis": M.opis(x, labels, **opts),
                   "eps_opis": M.eps_opis(x, labels, eps=0.1, **opts)}
    assert all(isinstance(v, float) for v in out.values())
    # defaults
    out = M.evaluate(x, labels)
    assert set(out) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "pr_auc", "opis", "eps_opis"}
    assert out["opis"] == M.opis(x, labels) and out["eps_opis"] == M.eps_opis(x, labels)
    # cross mode (OPIS is self-mode only)
    q, g, ql, gl = x[:80], x[80:], labels[:80], labels[80:]
    out = M.evaluate(q, ql, metrics=("recall_at_k", "map_at_r", "pr_auc"), ks=2, y=g, ref_labels=gl)
    assert out == {"recall@2": M.recall_at_k(q, ql, ks=2, y=g, ref_labels=gl)[2],
                   "map@r": M.map_at_r(q, ql, y=g, ref_labels=gl), "pr_auc": M.pr_auc(q, ql, y=g, ref_labels=gl)}
    with pytest.raises(ValueError, match="self mode"):
        M.evaluate(q, ql, y=g, ref_labels=gl)
    with pytest.raises(ValueError, match="unknown metric"):
        M.evaluate(x, labels, metrics=("nmi",))
    with pytest.raises(TypeError, match="unknown metric option"):
        M.evaluate(x, labels, temperature=0.1)


def test_input_checks():
    x, labels = _tie_case()
    assert set(M.recall_at_k(x, labels, ks=(3,))) == {3}  # self mode: N - 1 = 3 candidates
    with pytest.raises(ValueError, match="ks"):
        M.recall_at_k(x, labels, ks=(4,))
    with pytest.raises(ValueError, match="ks"):
        M.recall_at_k(x, labels, ks=(1, 2), y=x[:1], ref_labels=labels[:1])  # 1 reference
    with pytest.raises(ValueError, match="ks"):
        M.recall_at_k(x, labels, ks=(0,))
    with pytest.raises(TypeError, match="ks"):
        M.recall_at_k(x, labels, ks=(1.5,))
    with pytest.raises(ValueError, match="labels"):
        M.map_at_r(x, None)
    with pytest.raises(ValueError, match="ref_labels"):
        M.pr_auc(x, labels, y=x)
    with pytest.raises(ValueError, match="labels"):
        M.recall_at_k(x, labels[:3])
    with pytest.raises(ValueError, match="far_range"):
        M.opis(x, labels, far_range=(0.2, 0.1))
    with pytest.raises(ValueError, match="beta"):
        M.opis(x, labels, beta=0.0)
    with pytest.raises(ValueError, match="eps"):
        M.eps_opis(x, labels, eps=0.0)
    # low-precision input is accepted and gives the same answer on exact data; the query itself never counts
    assert M.recall_at_k(x.half(), labels, ks=(1, 2)) == M.recall_at_k(x, labels, ks=(1, 2))
    assert math.isnan(M.map_at_r(x, torch.arange(4)))  # no query has a relevant reference
    assert math.isnan(M.recall_at_k(x, torch.arange(4), ks=1)[1])
