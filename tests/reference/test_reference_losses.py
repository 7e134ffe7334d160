"""The reference losses of docs/spec.md §2.1-2.4: hand-computed values, pytorch-metric-learning parity, gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from flashdml.reference import (
    batch_softmax,
    contrastive_margin,
    cross_example_softmax,
    hardest_negatives,
    ntxent,
    similarity,
    threshold_consistent_margin,
)

f64 = torch.float64


def sp(v):  # softplus of a Python number
    return math.log1p(math.exp(v))


def _batch(B, d, n_classes, seed, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, generator=g, dtype=dtype), torch.randint(0, n_classes, (B,), generator=g)


def _on_S(loss_fn, S, *args, **kwargs):
    """Run a cross-mode loss on a given S ([B, M]) via x = I, y = Sᵀ, normalize=False; return (loss, dL/dS)."""
    x = torch.eye(S.shape[0], dtype=S.dtype)
    y = S.detach().T.clone().requires_grad_(True)
    loss = loss_fn(x, y, *args, normalize=False, **kwargs)
    loss.backward()
    return loss, y.grad.T


# ---------------------------------------------------------------------------------------------------------- 2.1
def test_batch_softmax_hand_computed():
    # x̂ = I, ŷ = [(1, 0), (.6, .8)]: S = [[1, .6], [0, .8]], τ = 1
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=f64)
    y = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=f64)
    row0 = math.log(math.e + math.exp(0.6)) - 1.0
    row1 = math.log(1.0 + math.exp(0.8)) - 0.8
    assert batch_softmax(x, y, temperature=1.0).item() == pytest.approx((row0 + row1) / 2, abs=1e-14)
    # columns (Sᵀ rows): [1, 0] and [.6, .8]
    col0 = math.log(math.e + 1.0) - 1.0
    col1 = math.log(math.exp(0.6) + math.exp(0.8)) - 0.8
    sym = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    assert batch_softmax(x, y, temperature=1.0, symmetric=True).item() == pytest.approx(sym, abs=1e-14)
    # τ = 0.5 doubles the logits
    r0 = math.log(math.exp(2.0) + math.exp(1.2)) - 2.0
    r1 = math.log(1.0 + math.exp(1.6)) - 1.6
    assert batch_softmax(x, y, temperature=0.5).item() == pytest.approx((r0 + r1) / 2, abs=1e-14)
    # equal labels: the off-diagonal column is a false negative and leaves the denominator -> 0
    assert batch_softmax(x, y, torch.tensor([3, 3]), temperature=1.0).item() == 0.0
    assert batch_softmax(x, y, torch.tensor([0, 1]), temperature=1.0).item() == pytest.approx((row0 + row1) / 2)


def test_batch_softmax_symmetric_is_average_of_directions():
    x, labels = _batch(9, 5, 4, 0)
    y, _ = _batch(9, 5, 4, 1)
    for lab in (None, labels):
        fwd = batch_softmax(x, y, lab, temperature=0.1)
        bwd = batch_softmax(y, x, lab, temperature=0.1)  # the loss on Sᵀ
        both = batch_softmax(x, y, lab, temperature=0.1, symmetric=True)
        torch.testing.assert_close(both, (fwd + bwd) / 2, rtol=0, atol=1e-14)
        assert fwd != bwd


def test_batch_softmax_false_negatives_removed():
    # brute force: row i's denominator = {i} ∪ {j : labels[j] != labels[i]}
    x, labels = _batch(8, 4, 3, 2)
    y, _ = _batch(8, 4, 3, 3)
    z = similarity(x, y) / 0.2
    expected = sum(
        torch.logsumexp(torch.stack([z[i, j] for j in range(8) if j == i or labels[j] != labels[i]]), 0) - z[i, i]
        for i in range(8)
    ) / 8
    torch.testing.assert_close(batch_softmax(x, y, labels, temperature=0.2), expected, rtol=0, atol=1e-13)


def test_batch_softmax_argument_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="y is required"):
        batch_softmax(x, None)
    with pytest.raises(ValueError, match="B == M"):
        batch_softmax(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="labels has 3 entries"):
        batch_softmax(x, torch.randn(4, 3), torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------------------------------------- 2.1b
def test_ntxent_hand_computed():
    # x = [(1,0), (.6,.8), (0,1)], labels [0, 0, 1]: S01 = .6, S02 = 0, S12 = .8
    # P = {(0,1), (1,0)}; N(0) = {(0,2)} (z = 0), N(1) = {(1,2)} (z = .8/τ); row 2 has no positive
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=f64)
    labels = torch.tensor([0, 0, 1])
    assert ntxent(x, labels, temperature=1.0).item() == pytest.approx((sp(-0.6) + sp(0.2)) / 2, abs=1e-14)
    assert ntxent(x, labels, temperature=0.5).item() == pytest.approx((sp(-1.2) + sp(0.4)) / 2, abs=1e-14)


def test_ntxent_cross_mode_and_rows_without_negatives():
    # x = I, y = [(1,0), (.6,.8)]: S = [[1, .6], [0, .8]]
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=f64, requires_grad=True)
    y = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=f64)
    # ref_labels [0, 1]: row 0: P {S00 = 1}, N {S01 = .6}; row 1: P {S11 = .8}, N {S10 = 0}
    val = ntxent(x, torch.tensor([0, 1]), y, torch.tensor([0, 1]), temperature=1.0)
    assert val.item() == pytest.approx((sp(0.6 - 1.0) + sp(0.0 - 0.8)) / 2, abs=1e-14)
    # ref_labels [0, 0]: row 0 has two positives and no negative (softplus(-inf) = 0); row 1 no positive
    val = ntxent(x, torch.tensor([0, 1]), y, torch.tensor([0, 0]), temperature=1.0)
    val.backward()
    assert val.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    # one row without negatives still counts in the mean over P: labels [0, 1], ref [0, 0] + a third column
    y3 = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=f64)
    # row 0 (label 0): P {1, .6}, N {0} ; row 1 (label 1): P {S12 = 1}, N {0, .8}
    val = ntxent(x.detach(), torch.tensor([0, 1]), y3, torch.tensor([0, 0, 1]), temperature=1.0)
    lse1 = math.log(1.0 + math.exp(0.8))
    assert val.item() == pytest.approx((sp(0 - 1.0) + sp(0 - 0.6) + sp(lse1 - 1.0)) / 3, abs=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ntxent_equals_pml(seed):
    from pytorch_metric_learning.losses import NTXentLoss

    x, labels = _batch(24, 8, 5, seed, dtype=torch.float32)
    for t in (0.07, 0.5):
        torch.testing.assert_close(ntxent(x, labels, temperature=t), NTXentLoss(temperature=t)(x, labels),
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------- 2.2
def test_xe_hand_computed():
    # same batch as NT-Xent: P = {(0,1), (1,0)} with z = .6; N = {(0,2), (2,0)} z = 0, {(1,2), (2,1)} z = .8
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=f64)
    labels = torch.tensor([0, 0, 1])
    lam = math.log(2 + 2 * math.exp(0.8))
    assert cross_example_softmax(x, labels=labels, temperature=1.0).item() == pytest.approx(sp(lam - 0.6), abs=1e-14)
    # mining, top 2: {(1,2), (2,1)} -> Λ = .8 + log 2; top 1: (1,2) (flat 5 beats (2,1), flat 7) -> Λ = .8
    assert cross_example_softmax(x, labels=labels, temperature=1.0, top_k=2).item() == pytest.approx(
        sp(0.2 + math.log(2)), abs=1e-14)
    assert cross_example_softmax(x, labels=labels, temperature=1.0, top_k=1).item() == pytest.approx(sp(0.2), abs=1e-14)
    # XE shares one Λ: it differs from NT-Xent on the same batch
    assert cross_example_softmax(x, labels=labels, temperature=1.0).item() != pytest.approx(
        ntxent(x, labels, temperature=1.0).item())


def _xe_independent(x, y, labels, ref_labels, tau, self_mode):
    """−log(e^{z_p} / (e^{z_p} + Σ_N e^{z_n})) averaged over P, with explicit loops."""
    S = similarity(x, None if self_mode else y)
    B, M = S.shape
    rl = labels if self_mode else ref_labels
    pos = [(i, j) for i in range(B) for j in range(M) if labels[i] == rl[j] and not (self_mode and i == j)]
    neg = [(i, j) for i in range(B) for j in range(M) if labels[i] != rl[j]]
    sum_neg = sum(math.exp(S[i, j].item() / tau) for i, j in neg)
    return sum(-math.log(math.exp(S[i, j].item() / tau) / (math.exp(S[i, j].item() / tau) + sum_neg))
               for i, j in pos) / len(pos)


@pytest.mark.parametrize("seed", [0, 1])
def test_xe_equals_independent_softplus_form(seed):
    x, labels = _batch(10, 4, 3, seed)
    y, ref_labels = _batch(7, 4, 3, seed + 50)
    for tau in (0.1, 1.0):
        got = cross_example_softmax(x, labels=labels, temperature=tau).item()
        assert got == pytest.approx(_xe_independent(x, None, labels, None, tau, True), rel=1e-12)
        got = cross_example_softmax(x, y, labels, ref_labels, temperature=tau).item()
        assert got == pytest.approx(_xe_independent(x, y, labels, ref_labels, tau, False), rel=1e-12)


def test_xe_transpose_invariance_and_top_k_limits():
    x, labels = _batch(9, 5, 3, 4)
    y, ref_labels = _batch(11, 5, 3, 5)
    a = cross_example_softmax(x, y, labels, ref_labels, temperature=0.1)
    b = cross_example_softmax(y, x, ref_labels, labels, temperature=0.1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    a = cross_example_softmax(x, y, labels, ref_labels, temperature=0.1, top_k=7)
    b = cross_example_softmax(y, x, ref_labels, labels, temperature=0.1, top_k=7)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    n_neg = int((labels[:, None] != ref_labels[None, :]).sum())
    plain = cross_example_softmax(x, y, labels, ref_labels, temperature=0.1)
    for k in (n_neg, n_neg + 1, 10**6):
        assert torch.equal(cross_example_softmax(x, y, labels, ref_labels, temperature=0.1, top_k=k), plain)
    assert cross_example_softmax(x, y, labels, ref_labels, temperature=0.1, top_k=n_neg - 1) != plain


def test_xe_mining_equals_formula_on_hardest_negatives_including_gradient():
    x, labels = _batch(10, 4, 3, 6)
    x.requires_grad_(True)
    k, tau = 6, 0.2
    got = cross_example_softmax(x, labels=labels, temperature=tau, top_k=k)
    (gx,) = torch.autograd.grad(got, x)
    vals, _, _ = hardest_negatives(x, labels=labels, k=k)  # carries gradient to the selected entries only
    S = similarity(x)
    pos = (labels[:, None] == labels[None, :]) & ~torch.eye(10, dtype=torch.bool)
    expected = F.softplus(torch.logsumexp(vals / tau, 0) - S[pos] / tau).mean()
    (ex,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(gx, ex, rtol=0, atol=1e-13)


def test_xe_mining_gradient_only_to_selected_negatives_with_ties():
    # S with exact ties straddling the cut: negatives of row 0 and row 1 share value .5
    S = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.5, 0.8, 0.5, 0.2]], dtype=f64)
    labels, ref_labels = torch.tensor([0, 1]), torch.tensor([0, 1, 2, 3])
    # negatives: (0,1) .5 f1, (0,2) .5 f2, (0,3) .1 f3, (1,0) .5 f4, (1,2) .5 f6, (1,3) .2 f7; top 3 = f1, f2, f4
    _, G = _on_S(cross_example_softmax, S, labels, ref_labels, temperature=0.5, top_k=3)
    nonzero = (G != 0)
    expected = torch.zeros_like(nonzero)
    expected[0, 0] = expected[1, 1] = True  # positives
    expected[0, 1] = expected[0, 2] = expected[1, 0] = True  # the selected negatives
    assert torch.equal(nonzero, expected)


def test_xe_closed_form_gradient_and_temperature_gradient():
    g = torch.Generator().manual_seed(7)
    S = torch.rand(6, 8, generator=g, dtype=f64) * 2 - 1
    labels, ref_labels = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (8,), generator=g)
    tau = torch.tensor(0.3, dtype=f64, requires_grad=True)
    loss, G = _on_S(cross_example_softmax, S, labels, ref_labels, temperature=tau)
    pos = labels[:, None] == ref_labels[None, :]
    z = S / 0.3
    lam = torch.logsumexp(z[~pos], 0)
    sigma = torch.sigmoid(lam - z)
    c = sigma[pos].mean()
    dz = torch.where(pos, -sigma / pos.sum(), c * torch.exp(z - lam))
    torch.testing.assert_close(G, dz / 0.3, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tau.grad, -(G * S).sum() / 0.3, rtol=1e-12, atol=1e-14)


def test_xe_empty_sets_give_zero_and_zero_gradient():
    x = torch.randn(5, 3, dtype=f64, requires_grad=True)
    tau = torch.tensor(0.1, dtype=f64, requires_grad=True)
    for lab, top_k in ((torch.zeros(5, dtype=torch.long), None), (torch.zeros(5, dtype=torch.long), 3), (None, None)):
        x.grad, tau.grad = None, None
        loss = cross_example_softmax(x, labels=lab, temperature=tau, top_k=top_k)  # no negatives / no positives
        loss.backward()
        assert loss.item() == 0.0 and loss.dim() == 0
        assert torch.equal(x.grad, torch.zeros_like(x)) and tau.grad.item() == 0.0


# ---------------------------------------------------------------------------------------------------------- 2.3
def _pml_tcm_batch(dtype=f64):
    # the batch of pytorch-metric-learning's ThresholdConsistentMarginLoss unit test
    x = torch.tensor([[0.00, 1.00], [0.43, 0.90], [1.00, 0.00], [0.50, 0.50]], dtype=dtype)
    return x, torch.tensor([0, 0, 1, 1])


def test_tcm_known_value_from_pml_unit_test():
    x, labels = _pml_tcm_batch()
    # cosines: s01 = .9/√.9949 = .9023 (positive, > .9: not hard); s23 = 1/√2 (positive, hard)
    #          negatives s02 = 0, s03 = 1/√2, s12 = .43/√.9949 = .4311, s13 = .665/(√.9949·√.5) = .9429
    r = 1 / math.sqrt(2)
    s13 = 0.665 / (math.sqrt(0.9949) * math.sqrt(0.5))
    pos = 0.9 - r  # (2,3) and (3,2): 0.1929
    neg = ((r - 0.5) + (s13 - 0.5)) / 2  # hard negatives (0,3), (1,3) and mirrors: 0.325
    val = threshold_consistent_margin(x, labels, pos_margin=0.9, neg_margin=0.5)
    assert val.item() == pytest.approx(pos + neg, abs=1e-12)
    assert val.item() == pytest.approx(0.518, abs=5e-4)
    assert threshold_consistent_margin(x.float(), labels).item() == pytest.approx(pos + neg, abs=1e-6)
    # the test's contrastive part (pos .9, neg .4) = 0.4866, and the sum it asserts, 1.0045
    s12 = 0.43 / math.sqrt(0.9949)
    con = (0.9 - r) + ((r - 0.4) + (s12 - 0.4) + (s13 - 0.4)) / 3
    c_val = contrastive_margin(x, labels, pos_margin=0.9, neg_margin=0.4)
    assert c_val.item() == pytest.approx(con, abs=1e-12) and c_val.item() == pytest.approx(0.4866, abs=1e-4)
    assert (val + c_val).item() == pytest.approx(1.0045, abs=1e-4)


def test_tcm_and_contrastive_boundaries():
    # unit vectors: x0 = (1,0), x1 = (0,1), x2 = (1,0), x3 = (-.6,.8); labels [0, 0, 1, 1]
    # positives: s01 = 0 (exact), s23 = -.6; negatives: s02 = 1 (exact), s03 = -.6, s12 = 0 (exact), s13 = .8
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-0.6, 0.8]], dtype=f64)
    labels = torch.tensor([0, 0, 1, 1])
    # TCM, m+ = m- = 0, inclusive: hard pos {s01 = 0 (hinge 0), s23 (hinge .6)} -> .3;
    #                               hard neg {s02 (1), s12 = 0 (hinge 0), s13 (.8)} -> .6
    val = threshold_consistent_margin(x, labels, pos_margin=0.0, neg_margin=0.0)
    assert val.item() == pytest.approx(0.9, abs=1e-12)
    # weights scale the two terms
    val = threshold_consistent_margin(x, labels, pos_margin=0.0, neg_margin=0.0, pos_weight=2.0, neg_weight=0.5)
    assert val.item() == pytest.approx(2 * 0.3 + 0.5 * 0.6, abs=1e-12)
    # contrastive, strict: zero hinges are not counted -> pos .6, neg (1 + .8)/2 = .9
    val = contrastive_margin(x, labels, pos_margin=0.0, neg_margin=0.0)
    assert val.item() == pytest.approx(1.5, abs=1e-12)


def test_tcm_cross_mode_brute_force():
    x, labels = _batch(7, 3, 3, 8)
    y, ref_labels = _batch(9, 3, 3, 9)
    S = similarity(x, y)
    same = labels[:, None] == ref_labels[None, :]
    hp = [0.6 - s for s in S[same].tolist() if s <= 0.6]
    hn = [s - 0.1 for s in S[~same].tolist() if s >= 0.1]
    assert hp and hn
    val = threshold_consistent_margin(x, labels, y, ref_labels, pos_margin=0.6, neg_margin=0.1)
    assert val.item() == pytest.approx(sum(hp) / len(hp) + sum(hn) / len(hn), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tcm_equals_pml_self_mode(seed):
    from pytorch_metric_learning.losses import ThresholdConsistentMarginLoss

    x, labels = _batch(20, 6, 4, seed, dtype=torch.float32)
    for mp, mn, lp, ln in ((0.9, 0.5, 1.0, 1.0), (0.3, 0.1, 0.7, 1.3), (0.5, -0.2, 1.0, 2.0)):
        ours = threshold_consistent_margin(x, labels, pos_margin=mp, neg_margin=mn, pos_weight=lp, neg_weight=ln)
        pml = ThresholdConsistentMarginLoss(lambda_plus=lp, lambda_minus=ln, margin_plus=mp, margin_minus=mn)(x, labels)
        assert abs(ours.item() - pml.item()) <= 1e-6


# ---------------------------------------------------------------------------------------------------------- 2.4
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_equals_pml_below_one_and_differs_by_the_diagonal_above(seed):
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import ContrastiveLoss

    x, labels = _batch(20, 6, 4, seed, dtype=torch.float32)
    for mp, mn in ((0.75, 0.6), (0.3, 0.1), (0.9, -0.1)):
        ours = contrastive_margin(x, labels, pos_margin=mp, neg_margin=mn)
        pml = ContrastiveLoss(pos_margin=mp, neg_margin=mn, distance=CosineSimilarity())(x, labels)
        assert abs(ours.item() - pml.item()) <= 1e-6
    # pos_margin >= 1: docs/spec.md keeps the diagonal as a positive pair (hinge 1.2 - s_ii ≈ .2, counted); pml drops it
    ours = contrastive_margin(x.double(), labels, pos_margin=1.2, neg_margin=0.6).item()
    pml = ContrastiveLoss(pos_margin=1.2, neg_margin=0.6, distance=CosineSimilarity())(x.double(), labels).item()
    S = similarity(x.double())
    same = labels[:, None] == labels[None, :]
    ph = (1.2 - S[same]).clamp_min(0)
    nh = (S[~same] - 0.6).clamp_min(0)
    expected = (ph.sum() / (ph > 0).sum() + nh.sum() / (nh > 0).sum()).item()
    assert ours == pytest.approx(expected, abs=1e-12)
    assert abs(ours - pml) > 1e-3


def test_tcm_and_contrastive_empty_sets():
    x = torch.randn(6, 3, dtype=f64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    for fn in (threshold_consistent_margin, contrastive_margin):
        x.grad = None
        loss = fn(x, labels, pos_margin=-2.0, neg_margin=2.0)  # nothing is hard
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    x.grad = None
    loss = ntxent(x, torch.zeros(6, dtype=torch.long))  # no negatives anywhere
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


# ------------------------------------------------------------------------------------------------- gradients
def test_gradcheck_all_losses_with_learnable_temperature():
    x, labels = _batch(7, 3, 3, 11)
    y, ref_labels = _batch(7, 3, 3, 12)
    x.requires_grad_(True)
    y.requires_grad_(True)
    tau = torch.tensor(0.4, dtype=f64, requires_grad=True)
    gc = torch.autograd.gradcheck
    assert gc(lambda a, b, t: batch_softmax(a, b, labels, temperature=t), (x, y, tau))
    assert gc(lambda a, b, t: batch_softmax(a, b, temperature=t, symmetric=True), (x, y, tau))
    assert gc(lambda a, t: ntxent(a, labels, temperature=t), (x, tau))
    assert gc(lambda a, b, t: ntxent(a, labels, b, ref_labels, temperature=t), (x, y, tau))
    assert gc(lambda a, t: cross_example_softmax(a, labels=labels, temperature=t), (x, tau))
    assert gc(lambda a, b, t: cross_example_softmax(a, b, labels, ref_labels, temperature=t, top_k=5), (x, y, tau))
    assert gc(lambda a, b, t: cross_example_softmax(a, b, temperature=t), (x, y, tau))  # pair mode
    assert gc(lambda a: threshold_consistent_margin(a, labels, pos_margin=0.6, neg_margin=0.0), (x,))
    assert gc(lambda a, b: threshold_consistent_margin(a, labels, b, ref_labels, pos_margin=0.6, neg_margin=0.0), (x, y))
    assert gc(lambda a: contrastive_margin(a, labels, pos_margin=0.6, neg_margin=0.0), (x,))
    assert gc(lambda a, b: contrastive_margin(a, labels, b, ref_labels, pos_margin=0.6, neg_margin=0.0), (x, y))


def test_temperature_dtypes():
    x, labels = _batch(6, 3, 2, 13)
    # float64 temperature with float64 input: exact float64 gradient -(1/τ) Σ G S
    tau = torch.tensor(0.3, dtype=f64, requires_grad=True)
    loss = cross_example_softmax(x, labels=labels, temperature=tau)
    loss.backward()
    assert tau.grad.dtype == f64
    h = 1e-6
    fd = (cross_example_softmax(x, labels=labels, temperature=0.3 + h)
          - cross_example_softmax(x, labels=labels, temperature=0.3 - h)) / (2 * h)
    assert tau.grad.item() == pytest.approx(fd.item(), rel=1e-8)
    # a Python float is used at full precision in float64 runs (0.3 is not an fp32 number)
    assert cross_example_softmax(x, labels=labels, temperature=0.3).item() == loss.item()
    # float32 input with a float64 temperature: fp32 loss, gradient back in float64
    tau2 = torch.tensor(0.3, dtype=f64, requires_grad=True)
    loss32 = cross_example_softmax(x.float(), labels=labels, temperature=tau2)
    loss32.backward()
    assert loss32.dtype == torch.float32 and tau2.grad.dtype == f64
    assert tau2.grad.item() == pytest.approx(tau.grad.item(), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_gives_fp32_loss_and_input_dtype_gradient(dtype):
    x, labels = _batch(8, 4, 2, 14, dtype=torch.float32)
    xl = x.to(dtype).requires_grad_(True)
    ref = cross_example_softmax(xl.detach().float(), labels=labels, temperature=0.1)
    loss = cross_example_softmax(xl, labels=labels, temperature=0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and xl.grad.dtype == dtype
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for fn in (lambda a: ntxent(a, labels), lambda a: threshold_consistent_margin(a, labels),
               lambda a: contrastive_margin(a, labels), lambda a: batch_softmax(a, a.flip(0))):
        assert fn(xl).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- errors
def test_temperature_and_argument_errors():
    x, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    for bad in (0.0, -1.0, torch.tensor(0.0), torch.tensor(-0.5)):
        for fn in (lambda t: batch_softmax(x, x, temperature=t), lambda t: ntxent(x, labels, temperature=t),
                   lambda t: cross_example_softmax(x, labels=labels, temperature=t)):
            with pytest.raises(ValueError, match="temperature must be > 0"):
                fn(bad)
    with pytest.raises(ValueError, match="temperature"):
        ntxent(x, labels, temperature=torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="temperature"):
        ntxent(x, labels, temperature=torch.tensor(1))
    with pytest.raises(TypeError, match="temperature"):
        ntxent(x, labels, temperature="0.1")
    with pytest.raises(TypeError, match="temperature"):
        ntxent(x, labels, temperature=True)
    with pytest.raises(ValueError, match="top_k"):
        cross_example_softmax(x, labels=labels, top_k=0)
    with pytest.raises(TypeError, match="top_k"):
        cross_example_softmax(x, labels=labels, top_k=2.5)
    for fn in (ntxent, threshold_consistent_margin, contrastive_margin):
        with pytest.raises(ValueError, match="x must be a 2-D"):
            fn(torch.randn(4), labels)
        with pytest.raises(ValueError, match="x is empty"):
            fn(torch.randn(0, 3), labels[:0])
        with pytest.raises(ValueError, match="labels has 3 entries"):
            fn(x, labels[:3])
        with pytest.raises(TypeError, match="labels must be an integer tensor"):
            fn(x, labels.float())
        with pytest.raises(ValueError, match="embedding dimension"):
            fn(x, labels, torch.randn(4, 2), labels)
        with pytest.raises(ValueError, match="ref_labels has 2 entries"):
            fn(x, labels, torch.randn(4, 3), labels[:2])
    with pytest.raises(TypeError, match="pos_margin"):
        threshold_consistent_margin(x, labels, pos_margin="0.9")
    with pytest.raises(TypeError, match="neg_margin"):
        contrastive_margin(x, labels, neg_margin=None)
