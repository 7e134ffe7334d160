"""SupCon, Multi-Similarity and Circle (docs/spec.md §6.1-6.3): the reference against pytorch-metric-learning.

The reference must equal pml 2.9's ``SupConLoss``, ``MultiSimilarityLoss`` and ``CircleLoss`` with their default
distance and reducer — values and gradients, self mode and cross mode (pml's ``ref_emb`` / ``ref_labels``),
including the edge cases (anchors without positives or negatives, batches without either, B = 1, duplicate
rows) — and be differentiable in float64 (gradcheck). The fused kernels are compared with the reference in
``test_anchor_lse_fused.py``.
"""
from __future__ import annotations

import pytest
import torch

import flashdml as fd

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

NAMES = ("supcon", "multi_similarity", "circle")


def _pml(name, **kw):
    return {"supcon": lambda: pml_losses.SupConLoss(**kw), "multi_similarity": lambda: pml_losses.MultiSimilarityLoss(**kw),
            "circle": lambda: pml_losses.CircleLoss(**kw)}[name]()


def _labels(kind: str, B: int, g: torch.Generator) -> torch.Tensor:
    if kind == "by4":  # 4 per class, shuffled
        return (torch.arange(B) // 4)[torch.randperm(B, generator=g)]
    # ragged class sizes: 1 (no positive) up to 7
    sizes, n = [], 0
    while n < B:
        sizes.append(int(torch.randint(1, 8, (1,), generator=g)))
        n += sizes[-1]
    lab = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[:B]
    return lab[torch.randperm(B, generator=g)]


def _clustered(labels: torch.Tensor, d: int, g: torch.Generator, dtype, spread: float = 0.8) -> torch.Tensor:
    centres = torch.randn(int(labels.max()) + 1, d, generator=g, dtype=torch.float64)
    x = centres[labels] + spread * torch.randn(labels.numel(), d, generator=g, dtype=torch.float64)
    return x.to(dtype)


def _tols(dtype):
    # float64: 1e-8, not tighter, because pml's Circle uses torch's softplus, which returns v itself above 20 (an
    # error of e^-20 ~ 2e-9 in the value and in the gradient's sigmoid factor); the reference is exact there.
    return (1e-5, 1e-6) if dtype == torch.float32 else (1e-8, 1e-12)


def _compare(ref, pml, grads_ref, grads_pml, dtype):
    rtol, atol = _tols(dtype)
    scale = max(abs(float(pml)), 1e-3)
    assert abs(float(ref) - float(pml)) <= rtol * scale + atol, (float(ref), float(pml))
    for gr, gp in zip(grads_ref, grads_pml):
        gscale = float(gp.abs().max()) + 1e-12
        assert float((gr - gp).abs().max()) <= rtol * 10 * gscale + atol, float((gr - gp).abs().max() / gscale)


def _run_both(name, x, labels, y=None, ref_labels=None, **kw):
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [None, None] if y is None else [y.clone().requires_grad_(), y.clone().requires_grad_()]
    ref = getattr(fd.reference, name)(xs[0], labels, ys[0], None if y is None else ref_labels, **kw)
    pml = _pml(name, **kw)(xs[1], labels, ref_emb=ys[1], ref_labels=None if y is None else ref_labels.clone())
    wrt_ref = [xs[0]] + ([] if y is None else [ys[0]])
    wrt_pml = [xs[1]] + ([] if y is None else [ys[1]])
    g_ref = torch.autograd.grad(ref, wrt_ref, allow_unused=True, materialize_grads=True)
    if pml.requires_grad:
        g_pml = torch.autograd.grad(pml, wrt_pml, allow_unused=True, materialize_grads=True)
    else:
        g_pml = [torch.zeros_like(t) for t in wrt_pml]
    return ref, pml, g_ref, g_pml


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("fp32", "fp64"))
@pytest.mark.parametrize("kind", ("by4", "ragged"))
@pytest.mark.parametrize("B", (8, 37, 96))
def test_reference_equals_pml_self_mode(name, dtype, kind, B):
    g = torch.Generator().manual_seed(B * 7 + len(kind))
    labels = _labels(kind, B, g)
    x = _clustered(labels, 24, g, dtype)
    ref, pml, g_ref, g_pml = _run_both(name, x, labels)
    assert ref.dtype == dtype
    assert float(pml.detach()) != 0.0  # a real case, not a degenerate zero
    _compare(ref, pml, g_ref, g_pml, dtype)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("fp32", "fp64"))
@pytest.mark.parametrize("B,M", ((13, 29), (40, 9), (64, 64)))
def test_reference_equals_pml_cross_mode(name, dtype, B, M):
    g = torch.Generator().manual_seed(B + 100 * M)
    all_labels = _labels("ragged", B + M, g)
    x_all = _clustered(all_labels, 16, g, dtype)
    x, y = x_all[:B], x_all[B:]
    ref, pml, g_ref, g_pml = _run_both(name, x, all_labels[:B], y, all_labels[B:])
    _compare(ref, pml, g_ref, g_pml, dtype)


@pytest.mark.parametrize("name", NAMES)
def test_non_default_parameters_equal_pml(name):
    kw = {"supcon": {"temperature": 0.37}, "multi_similarity": {"alpha": 3.0, "beta": 20.0, "base": 0.3},
          "circle": {"m": 0.25, "gamma": 32.0}}[name]
    g = torch.Generator().manual_seed(3)
    labels = _labels("ragged", 50, g)
    x = _clustered(labels, 12, g, torch.float64)
    ref, pml, g_ref, g_pml = _run_both(name, x, labels, **kw)
    _compare(ref, pml, g_ref, g_pml, torch.float64)


def _edge_cases():
    g = torch.Generator().manual_seed(11)
    d = 6
    yield "no_positive_anywhere", torch.randn(9, d, generator=g, dtype=torch.float64), torch.arange(9), None, None
    yield "no_negative_anywhere", torch.randn(7, d, generator=g, dtype=torch.float64), torch.zeros(7, dtype=torch.long), None, None
    yield "B1", torch.randn(1, d, generator=g, dtype=torch.float64), torch.tensor([3]), None, None
    yield "B2_different", torch.randn(2, d, generator=g, dtype=torch.float64), torch.tensor([0, 1]), None, None
    yield "B2_same", torch.randn(2, d, generator=g, dtype=torch.float64), torch.tensor([5, 5]), None, None
    dup = torch.randn(4, d, generator=g, dtype=torch.float64)
    yield "duplicate_rows", dup.repeat(3, 1), torch.tensor([0, 0, 1, 2] * 3), None, None
    # one anchor whose class is the only one: no negatives for it in cross mode
    yield ("cross_anchor_without_negatives", torch.randn(5, d, generator=g, dtype=torch.float64),
           torch.tensor([0, 0, 1, 2, 7]), torch.randn(4, d, generator=g, dtype=torch.float64),
           torch.tensor([0, 0, 0, 0]))
    yield ("cross_one_pos_one_neg", torch.randn(1, d, generator=g, dtype=torch.float64), torch.tensor([1]),
           torch.randn(2, d, generator=g, dtype=torch.float64), torch.tensor([1, 2]))
    yield ("cross_label_absent", torch.randn(6, d, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 9, 9, 8]),
           torch.randn(8, d, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 3, 3]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(_edge_cases()), ids=lambda c: c[0])
def test_reference_edge_cases_equal_pml(name, case):
    _, x, labels, y, ref_labels = case
    ref, pml, g_ref, g_pml = _run_both(name, x, labels, y, ref_labels)
    _compare(ref, pml, g_ref, g_pml, torch.float64)
    for gr in g_ref:
        assert torch.isfinite(gr).all()


def test_degenerate_batches_are_zero():
    """What the edge cases above pin down, spelled out: no pair, at most one pair of each kind, and (SupCon) a
    batch without positives or without negatives all give exactly 0."""
    x = torch.randn(6, 4, dtype=torch.float64)
    for name in NAMES:
        assert float(getattr(fd.reference, name)(x[:1], torch.tensor([0]))) == 0.0
        assert float(getattr(fd.reference, name)(x[:1], torch.tensor([1]), x[1:3], torch.tensor([1, 2]))) == 0.0
    assert float(fd.reference.supcon(x, torch.arange(6))) == 0.0
    assert float(fd.reference.supcon(x, torch.zeros(6, dtype=torch.long))) == 0.0
    assert float(fd.reference.circle(x, torch.zeros(6, dtype=torch.long))) == 0.0
    assert float(fd.reference.multi_similarity(x, torch.arange(6))) > 0.0  # negatives alone still count


# Circle is not here: its self-paced weights are detached by definition, so its gradient is not the derivative
# of its value and finite differences cannot check it (the pml comparisons above check it instead).
@pytest.mark.parametrize("name", ("supcon", "multi_similarity"))
@pytest.mark.parametrize("cross", (False, True))
def test_reference_gradcheck(name, cross):
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    x = _clustered(labels, 5, g, torch.float64, spread=0.5).requires_grad_()
    kw = {"multi_similarity": {"beta": 10.0}}.get(name, {})  # keeps the finite differences well scaled
    if cross:
        y = torch.randn(5, 5, generator=g, dtype=torch.float64).requires_grad_()
        rl = torch.tensor([0, 1, 1, 3, 4])
        fn = lambda a, b: getattr(fd.reference, name)(a, labels, b, rl, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, y))
    else:
        assert torch.autograd.gradcheck(lambda a: getattr(fd.reference, name)(a, labels, **kw), (x,))


def test_supcon_learnable_temperature_gradcheck():
    g = torch.Generator().manual_seed(6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    x = _clustered(labels, 4, g, torch.float64).requires_grad_()
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, tau: fd.reference.supcon(a, labels, temperature=tau), (x, t))
    loss = fd.reference.supcon(x, labels, temperature=t)
    assert float(loss) == pytest.approx(float(fd.reference.supcon(x, labels, temperature=0.3)), rel=1e-12)


def test_reference_nonfinite_gives_nan_and_bad_parameters_raise():
    x = torch.randn(8, 4)
    x[2, 1] = float("nan")
    labels = torch.arange(8) // 2
    for name in NAMES:
        assert torch.isnan(getattr(fd.reference, name)(x, labels))
    with pytest.raises(ValueError, match="alpha"):
        fd.reference.multi_similarity(x, labels, alpha=0.0)
    with pytest.raises(ValueError, match="gamma"):
        fd.reference.circle(x, labels, gamma=float("inf"))
    with pytest.raises(ValueError, match="temperature"):
        fd.reference.supcon(x, labels, temperature=-1.0)
