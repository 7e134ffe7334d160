"""The loss modules' one call convention, forward(embeddings, labels=None, ref_emb=None, ref_labels=None)
(docs/spec.md §4): a pml-style loss(embeddings, labels) works on every module and equals the functional op; cross
and pair mode go through ref_emb / ref_labels; the earlier call orders still work with a FutureWarning."""
import inspect

import pytest
import torch

import flashdml as fd
from helpers import clustered

MODULES = {
    "NTXentLoss": (dict(temperature=0.1), lambda x, l, y=None, rl=None: fd.ntxent(x, l, y, rl, temperature=0.1)),
    "CrossExampleSoftmaxLoss": (dict(temperature=0.1),
                                lambda x, l, y=None, rl=None: fd.cross_example_softmax(x, y, l, rl, temperature=0.1)),
    "ThresholdConsistentMarginLoss": (dict(),
                                      lambda x, l, y=None, rl=None: fd.threshold_consistent_margin(x, l, y, rl)),
    "ContrastiveMarginLoss": (dict(), lambda x, l, y=None, rl=None: fd.contrastive_margin(x, l, y, rl)),
    "ContextualLoss": (dict(k=3), lambda x, l, y=None, rl=None: fd.contextual_loss(x, l, k=3)),
    # pytorch-metric-learning's pair losses, with non-default arguments (a module that drops one fails)
    "SupConLoss": (dict(temperature=0.2), lambda x, l, y=None, rl=None: fd.supcon(x, l, y, rl, temperature=0.2)),
    "MultiSimilarityLoss": (dict(alpha=3.0, beta=40.0, base=0.4),
                            lambda x, l, y=None, rl=None: fd.multi_similarity(x, l, y, rl, alpha=3.0, beta=40.0,
                                                                              base=0.4)),
    "CircleLoss": (dict(m=0.25, gamma=64.0), lambda x, l, y=None, rl=None: fd.circle(x, l, y, rl, m=0.25, gamma=64.0)),
    "TripletMarginLoss": (dict(margin=0.3),
                          lambda x, l, y=None, rl=None: fd.triplet_margin(x, l, y, rl, margin=0.3)),
}
CROSS = ("NTXentLoss", "CrossExampleSoftmaxLoss", "ThresholdConsistentMarginLoss", "ContrastiveMarginLoss",
         "SupConLoss", "MultiSimilarityLoss", "CircleLoss", "TripletMarginLoss")
PML_PAIR = ("SupConLoss", "MultiSimilarityLoss", "CircleLoss", "TripletMarginLoss")


def test_every_module_has_the_convention():
    for name in fd.losses.__all__:
        params = list(inspect.signature(getattr(fd.losses, name).forward).parameters)
        assert params[:5] == ["self", "embeddings", "labels", "ref_emb", "ref_labels"], (name, params)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_pml_style_call_equals_functional(name):
    """module(emb, labels): the call pml users write, including CrossExampleSoftmaxLoss (issue 18)."""
    kwargs, fn = MODULES[name]
    x, labels = clustered(40, 12, 6, seed=1)
    got = getattr(fd.losses, name)(**kwargs)(x, labels)
    assert torch.equal(got, fn(x, labels))
    assert got.item() > 0  # a real loss, not the empty-batch 0


@pytest.mark.parametrize("name", CROSS)
def test_cross_mode_by_keyword(name):
    kwargs, fn = MODULES[name]
    x, labels = clustered(30, 12, 5, seed=2)
    y, ref_labels = clustered(50, 12, 5, seed=3)
    got = getattr(fd.losses, name)(**kwargs)(x, labels, ref_emb=y, ref_labels=ref_labels)
    want = fn(x, labels, y, ref_labels)
    assert torch.equal(got, want)
    assert not torch.equal(got, fn(x, labels))  # cross mode really differs from self mode here


def test_pair_mode_and_batch_softmax():
    img, _ = clustered(32, 12, 32, seed=4)
    txt = img + 0.2 * torch.randn(img.shape, generator=torch.Generator().manual_seed(5))
    xe = fd.losses.CrossExampleSoftmaxLoss(temperature=0.1)(img, ref_emb=txt)
    assert torch.equal(xe, fd.cross_example_softmax(img, txt, temperature=0.1))
    labels = torch.arange(32) // 2
    bs = fd.losses.BatchSoftmaxLoss(temperature=0.1, symmetric=True)
    want = fd.batch_softmax(img, txt, labels, temperature=0.1, symmetric=True)
    assert torch.equal(bs(img, labels, ref_emb=txt), want)
    assert torch.equal(bs(img, ref_emb=txt), fd.batch_softmax(img, txt, temperature=0.1, symmetric=True))
    with pytest.raises(ValueError, match="ref_emb"):
        bs(img, labels)
    with pytest.raises(ValueError, match="must equal labels"):
        bs(img, labels, ref_emb=txt, ref_labels=labels.flip(0))


def test_earlier_call_orders_warn_and_still_work():
    x, labels = clustered(24, 8, 4, seed=6)
    y, ref_labels = clustered(24, 8, 4, seed=7)
    xe = fd.losses.CrossExampleSoftmaxLoss(temperature=0.1)
    want = fd.cross_example_softmax(x, y, labels, ref_labels, temperature=0.1)
    with pytest.warns(FutureWarning, match="ref_emb"):
        assert torch.equal(xe(x, y, labels, ref_labels), want)           # the old (x, y, labels, ref_labels)
    with pytest.warns(FutureWarning, match="ref_emb"):
        assert torch.equal(xe(x, y=y, labels=labels, ref_labels=ref_labels), want)
    bs = fd.losses.BatchSoftmaxLoss(temperature=0.1)
    with pytest.warns(FutureWarning):
        assert torch.equal(bs(x, y, labels), fd.batch_softmax(x, y, labels, temperature=0.1))
    with pytest.raises(TypeError, match="unexpected keyword"):
        xe(x, labels, z=y)
    with pytest.raises(TypeError, match="same tensor"):
        xe(x, labels, ref_emb=y, y=y)


def test_contextual_has_no_cross_mode():
    x, labels = clustered(20, 8, 4, seed=8)
    with pytest.raises(ValueError, match="no cross mode"):
        fd.losses.ContextualLoss()(x, labels, ref_emb=x)


def test_learnable_temperature_gets_a_gradient():
    x, labels = clustered(30, 8, 5, seed=9)
    for cls in (fd.losses.NTXentLoss, fd.losses.CrossExampleSoftmaxLoss, fd.losses.SupConLoss):
        mod = cls(temperature=0.1, learnable_temperature=True)
        mod(x, labels).backward()
        assert mod.temperature.grad is not None and mod.temperature.grad.abs().item() > 0


def test_pml_wrappers_call_modules_by_keyword():
    """pml's SelfSupervisedLoss calls loss(embeddings=..., labels=..., ref_emb=..., ref_labels=...): our module
    (named NTXentLoss, so pml accepts it) takes exactly those names."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, _ = clustered(16, 8, 16, seed=10)
    v = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    idx = torch.arange(16)
    got = pml_losses.SelfSupervisedLoss(fd.losses.NTXentLoss(temperature=0.1), symmetric=False)(x, v)
    assert torch.equal(got, fd.ntxent(x, idx, v, idx, temperature=0.1))


@pytest.mark.parametrize("name", PML_PAIR)
def test_pml_pair_modules_default_arguments(name):
    """The constructors' defaults are pml's (and the functions'): SupCon τ = 0.1, MS α, β, base = 2, 50, 0.5,
    Circle m, γ = 0.4, 80, Triplet margin 0.05."""
    fns = {"SupConLoss": fd.supcon, "MultiSimilarityLoss": fd.multi_similarity, "CircleLoss": fd.circle,
           "TripletMarginLoss": fd.triplet_margin}
    defaults = {"SupConLoss": dict(temperature=0.1), "MultiSimilarityLoss": dict(alpha=2.0, beta=50.0, base=0.5),
                "CircleLoss": dict(m=0.4, gamma=80.0), "TripletMarginLoss": dict(margin=0.05)}
    x, labels = clustered(36, 10, 6, seed=12)
    got = getattr(fd.losses, name)()(x, labels)
    assert torch.equal(got, fns[name](x, labels, **defaults[name]))
    assert not torch.equal(got, MODULES[name][1](x, labels))  # the non-default arguments above do change it
    sig = inspect.signature(fns[name]).parameters
    for k, v in defaults[name].items():
        assert sig[k].default == v, (name, k)

