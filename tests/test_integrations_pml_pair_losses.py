"""The pml drop-ins SupConLoss, MultiSimilarityLoss, CircleLoss, TripletMarginLoss: equal to pml's originals
(values and gradients, self and cross mode) on the fused path, and each fallback to pml taken where flashdml does
not compute pml's exact loss (checked by replacing the flashdml op with one that fails)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytorch_metric_learning")

from pytorch_metric_learning import distances, losses as pml_losses, miners, reducers, regularizers  # noqa: E402

import flashdml as fd  # noqa: E402
from flashdml.integrations import pml as fdp  # noqa: E402
from helpers import clustered  # noqa: E402

OP = {"SupConLoss": "supcon", "MultiSimilarityLoss": "multi_similarity", "CircleLoss": "circle",
      "TripletMarginLoss": "triplet_margin"}
NAMES = tuple(OP)
# non-default arguments per class (the fused path must pass them on)
CUSTOM = {"SupConLoss": dict(temperature=0.07), "MultiSimilarityLoss": dict(alpha=3, beta=40, base=0.4),
          "CircleLoss": dict(m=0.25, gamma=64), "TripletMarginLoss": dict(margin=0.2)}


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the four public flashdml ops (calling through)."""
    counts = {op: 0 for op in OP.values()}
    for op in OP.values():
        real = getattr(fd, op)

        def spy(*args, _real=real, _op=op, **kwargs):
            counts[_op] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(fd, op, spy)
    return counts


@pytest.fixture
def forbid(monkeypatch):
    """Any call of the four flashdml ops fails the test: the path must be pml's own."""
    for op in OP.values():
        def boom(*args, _op=op, **kwargs):
            raise AssertionError(f"flashdml.{_op} ran on a path that must fall back to pml")

        monkeypatch.setattr(fd, op, boom)


def pair(name, **kwargs):
    return getattr(pml_losses, name)(**kwargs), getattr(fdp, name)(**kwargs)


def run(loss_fn, x, *args, y=None, seed=None, **kwargs):
    """(loss, dx[, dy]) for fresh leaf copies; ``seed`` fixes pml's random triplet sampling."""
    xx = x.detach().clone().requires_grad_(True)
    wrt = [xx]
    if y is not None:
        yy = y.detach().clone().requires_grad_(True)
        wrt.append(yy)
        kwargs["ref_emb"] = yy
    if seed is not None:
        torch.manual_seed(seed)
    loss = loss_fn(xx, *args, **kwargs)
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)  # pml's zero loss never reads ref_emb
    return (loss.detach(), *(torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)))


def assert_same(got, want, rtol=1e-5, atol=1e-7):
    """Loss within ``rtol``; each gradient within ``rtol`` of its largest entry (fp32 rounding of pml's own
    gradient is ~5e-7 of that, the same as flashdml's, measured against float64: an element-wise relative test
    of near-zero entries would only compare two roundings)."""
    assert got[0].dtype == want[0].dtype
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=max(atol, rtol * b.abs().max().item()))


def ragged(seed):
    """Clustered rows, classes of different sizes (a singleton among them: an anchor without positives)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 3, 5, 7, 4]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])[torch.randperm(22, generator=g)]
    centres = torch.randn(len(sizes), 12, generator=g)
    return centres[labels] + 0.7 * torch.randn(22, 12, generator=g), labels


# ------------------------------------------------------------------------------------------- fused == pml
@pytest.mark.parametrize("custom", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_self_mode_equals_pml(name, custom, calls):
    orig, drop = pair(name, **(CUSTOM[name] if custom else {}))
    for seed in range(3):
        x, labels = clustered(40, 16, 8, seed=seed) if seed < 2 else ragged(seed)
        want = run(orig, x, labels)
        got = run(drop, x, labels)
        assert want[0].item() > 0 and want[1].abs().sum() > 0  # a batch that exercises the loss
        assert_same(got, want)
    assert calls[OP[name]] == 3


@pytest.mark.parametrize("name", NAMES)
def test_cross_mode_equals_pml(name, calls):
    orig, drop = pair(name, **CUSTOM[name])
    x, labels = clustered(24, 16, 6, seed=5)
    y, ref_labels = clustered(40, 16, 6, seed=5)  # same centres: positives are close
    y = y + 0.1 * torch.randn(y.shape, generator=torch.Generator().manual_seed(6))
    want = run(orig, x, labels, y=y, ref_labels=ref_labels)
    got = run(drop, x, labels, y=y, ref_labels=ref_labels)
    assert want[0].item() > 0 and want[2].abs().sum() > 0
    assert_same(got, want)
    assert calls[OP[name]] == 1
    self_loss = run(drop, x, labels)[0]
    assert not torch.allclose(self_loss, got[0])  # cross mode really compared with y


def test_supcon_learnable_temperature_equals_pml(calls):
    x, labels = clustered(32, 16, 8, seed=7)
    grads = []
    for cls in (pml_losses.SupConLoss, fdp.SupConLoss):
        t = torch.tensor(0.15, requires_grad=True)
        xx = x.clone().requires_grad_(True)
        loss = cls(temperature=t)(xx, labels)
        grads.append((loss.detach(), *torch.autograd.grad(loss, [xx, t])))
    assert_same(grads[1], grads[0])
    assert grads[0][2].abs().item() > 0 and calls["supcon"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_runs_pml(name, dtype, forbid):
    """fp16 / bf16 run pml, which computes in that precision (flashdml's fp32 accumulation can differ by an ulp
    of the half type: pml's own fp16 Circle test tells them apart)."""
    x, labels = clustered(32, 16, 8, seed=8)
    got = run(getattr(fdp, name)(), x.to(dtype), labels)
    want = run(getattr(pml_losses, name)(), x.to(dtype), labels)
    assert got[0].dtype == dtype
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- fallbacks
class _MyCosine(distances.CosineSimilarity):
    pass


D, R = distances, reducers
FALLBACKS = {  # constructor kwargs (built fresh for each of the two losses) that must run pml
    "SupConLoss": [lambda: dict(distance=D.DotProductSimilarity()), lambda: dict(distance=D.LpDistance()),
                   lambda: dict(distance=D.CosineSimilarity(power=2)), lambda: dict(distance=_MyCosine()),
                   lambda: dict(reducer=R.MeanReducer()), lambda: dict(reducer=R.ThresholdReducer(low=0.1))],
    "MultiSimilarityLoss": [lambda: dict(distance=D.DotProductSimilarity()),
                            lambda: dict(reducer=R.AvgNonZeroReducer()),
                            lambda: dict(distance=D.CosineSimilarity(power=3))],
    "CircleLoss": [lambda: dict(distance=_MyCosine()), lambda: dict(reducer=R.MeanReducer()),
                   lambda: dict(reducer=R.AvgNonZeroReducer(collect_stats=True))],
    "TripletMarginLoss": [lambda: dict(distance=D.CosineSimilarity()), lambda: dict(distance=D.LpDistance(power=2)),
                          lambda: dict(distance=D.LpDistance(normalize_embeddings=False)),
                          lambda: dict(distance=D.LpDistance(p=1)), lambda: dict(reducer=R.MeanReducer()),
                          lambda: dict(swap=True), lambda: dict(smooth_loss=True),
                          lambda: dict(triplets_per_anchor=3)],
}
CASES = [(n, i) for n in NAMES for i in range(len(FALLBACKS[n]))]


@pytest.mark.parametrize("name,i", CASES)
def test_option_fallbacks_run_pml(name, i, forbid):
    orig = getattr(pml_losses, name)(**FALLBACKS[name][i]())
    drop = getattr(fdp, name)(**FALLBACKS[name][i]())
    x, labels = clustered(30, 8, 6, seed=9)
    assert_same(run(drop, x, labels, seed=1), run(orig, x, labels, seed=1))


@pytest.mark.parametrize("name", NAMES)
def test_miner_float64_regularizer_fallbacks(name, forbid):
    orig, drop = pair(name)
    x, labels = clustered(30, 8, 6, seed=10)
    miner = miners.TripletMarginMiner(margin=0.2) if name == "TripletMarginLoss" else miners.MultiSimilarityMiner()
    tup = miner(x, labels)
    assert_same(run(drop, x, labels, indices_tuple=tup), run(orig, x, labels, indices_tuple=tup))
    x64 = x.double()
    assert_same(run(drop, x64, labels), run(orig, x64, labels), rtol=1e-12, atol=1e-14)
    reg = dict(embedding_regularizer=regularizers.LpRegularizer())
    orig_r, drop_r = pair(name, **reg)
    assert_same(run(drop_r, x, labels), run(orig_r, x, labels))
    # ref_emb without ref_labels: pml reuses labels for the references (pml-only semantics)
    y = x.flip(0).clone()
    assert_same(run(drop, x, labels, y=y), run(orig, x, labels, y=y))


def test_circle_stale_margins_run_pml(forbid):
    """pml reads op / on / delta_p / delta_n (set from m in its constructor), not m: changing m afterwards
    must keep pml's value."""
    orig, drop = pair("CircleLoss")
    orig.m = drop.m = 0.1
    x, labels = clustered(30, 8, 6, seed=11)
    assert_same(run(drop, x, labels), run(orig, x, labels))


@pytest.mark.parametrize("name", ("SupConLoss", "MultiSimilarityLoss", "CircleLoss"))
def test_degenerate_batch_is_pmls_zero(name, forbid):
    """One positive and one negative pair in all: pml's GenericPairLoss returns its zero loss."""
    orig, drop = pair(name)
    x = torch.randn(1, 8)
    y, ref_labels = torch.randn(2, 8), torch.tensor([0, 1])
    got = run(drop, x, torch.tensor([0]), y=y, ref_labels=ref_labels)
    want = run(orig, x, torch.tensor([0]), y=y, ref_labels=ref_labels)
    assert got[0].item() == 0.0 and torch.equal(got[1], torch.zeros_like(got[1]))
    assert_same(got, want)


def test_without_triplets_is_zero(calls):
    """A batch of singletons has no triplet: 0 with a zero gradient, as pml (fused: there is no pair shortcut)."""
    orig, drop = pair("TripletMarginLoss")
    x, labels = torch.randn(6, 8), torch.arange(6)
    got, want = run(drop, x, labels), run(orig, x, labels)
    assert got[0].item() == 0.0 and torch.equal(got[1], torch.zeros_like(got[1]))
    assert_same(got, want)
    assert calls["triplet_margin"] == 1


def test_drop_ins_are_pml_classes():
    for name in NAMES:
        assert isinstance(getattr(fdp, name)(), getattr(pml_losses, name))
        assert getattr(fdp.losses, name) is getattr(fdp, name)
