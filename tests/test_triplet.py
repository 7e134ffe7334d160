"""Reference triplet margin loss (docs/spec.md §6.4) against pytorch-metric-learning's TripletMarginLoss:
values and gradients on clustered batches (self and cross mode), edge cases, gradcheck, and that the reference
never builds the triplet list."""
import pytest
import torch

import flashdml as fd

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

MARGIN = 0.05


def _batch(sizes, d, *, seed, dtype=torch.float32, spread=None):
    """Rows clustered by class (class c has sizes[c] rows), shuffled; the spread (default 0.7 for d <= 16, 1.5
    above) keeps some triplets active."""
    spread = spread if spread is not None else (0.7 if d <= 16 else 1.5)
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    centres = torch.randn(len(sizes), d, generator=g, dtype=torch.float64)
    x = centres[labels] + spread * torch.randn(labels.numel(), d, generator=g, dtype=torch.float64)
    return x.to(dtype), labels


def _pml(x, labels, y=None, ref_labels=None, margin=MARGIN):
    loss_fn = pml_losses.TripletMarginLoss(margin=margin)
    return loss_fn(x, labels, ref_emb=y, ref_labels=ref_labels)


def _loss_and_grads(fn, tensors, upstream=0.7):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors[:1] + tensors[2:3]]
    args = list(tensors)
    args[0] = leaves[0]
    if len(args) > 2 and args[2] is not None:
        args[2] = leaves[1]
    loss = fn(*args)
    (loss * upstream).backward()
    return loss.detach(), [leaf.grad if leaf is not None else None for leaf in leaves]


def _assert_close(got, want, rtol, atol=0.0, what=""):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= atol + rtol * scale, f"{what}: error {err:.3e} > {atol:.1e} + {rtol:.1e} * {scale:.3e}"


def _compare_with_pml(x, labels, y=None, ref_labels=None, rtol=1e-5, atol=0.0, margin=MARGIN):
    """Reference vs pml: the loss against pml in the same dtype; the gradients against pml in float64 on the same
    inputs. (pml's fp32 cdist goes through |a|² + |b|² − 2a·b: on a close pair the cancellation costs it ~1e-4
    relative in the gradient, 1/d_ap times the rounding of the squares; the reference takes the differences.)"""
    ref_loss, ref_grads = _loss_and_grads(lambda a, l, b, r: fd.reference.triplet_margin(a, l, b, r, margin=margin),
                                          [x, labels, y, ref_labels])
    pml = lambda a, l, b, r: _pml(a, l, b, r, margin=margin)  # noqa: E731
    pml_loss, _ = _loss_and_grads(pml, [x, labels, y, ref_labels])
    wide = [t.double() if t is not None and t.is_floating_point() else t for t in (x, labels, y, ref_labels)]
    _, pml_grads = _loss_and_grads(pml, wide)
    assert ref_loss.dtype == pml_loss.dtype
    _assert_close(ref_loss, pml_loss, rtol, atol, "loss")
    for name, g_ref, g_pml in zip(("dx", "dy"), ref_grads, pml_grads):
        if g_pml is None:
            continue
        assert g_ref is not None and g_ref.dtype == x.dtype and torch.isfinite(g_ref).all()
        _assert_close(g_ref, g_pml, rtol, atol, name)
    return ref_loss


# Class sizes: 4 per class, ragged (singletons: anchors without positives), one big class.
SIZES = [[4] * 8, [4] * 32, [1, 2, 3, 5, 7, 2, 1, 9], [20, 3, 3, 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}cls-{sum(s)}")
@pytest.mark.parametrize("d", [3, 16, 129])
def test_reference_equals_pml_self_mode(sizes, d, dtype):
    x, labels = _batch(sizes, d, seed=sum(sizes) + d, dtype=dtype)
    loss = _compare_with_pml(x, labels, rtol=1e-5 if dtype == torch.float32 else 1e-10)
    assert loss > 0  # the batches have active triplets: the comparison is not 0 == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,M,d", [(5, 40, 8), (30, 17, 33), (64, 64, 129)])
def test_reference_equals_pml_cross_mode(B, M, d, dtype):
    x, labels = _batch([B // 4 + 1] * 4, d, seed=B * M + d, dtype=dtype)
    x, labels = x[:B], labels[:B]
    y, ref_labels = _batch([M // 5 + 1] * 5, d, seed=B + M + d + 1, dtype=dtype)
    y, ref_labels = y[:M], ref_labels[:M]
    loss = _compare_with_pml(x, labels, y, ref_labels, rtol=1e-5 if dtype == torch.float32 else 1e-10)
    assert loss > 0


def test_cross_mode_with_the_batch_itself_keeps_the_self_pairs():
    """y = x with separate ref_labels: (i, i) is a positive at distance 0 (exact 0, zero subgradient), as pml's
    ref_emb when ref_labels is not the same object as labels."""
    x, labels = _batch([4] * 6, 12, seed=3, dtype=torch.float64)
    loss = _compare_with_pml(x, labels, x.clone(), labels.clone(), rtol=1e-10, margin=0.8)
    self_loss = fd.reference.triplet_margin(x, labels, margin=0.8)
    assert not torch.allclose(loss, self_loss)  # the diagonal positives (d_ap = 0) add active triplets


def test_duplicate_rows_distance_zero():
    """Rows repeated inside a class: d_ap = 0 exactly, and the gradient stays finite (pml's subgradient 0)."""
    x, labels = _batch([4] * 6, 10, seed=5, dtype=torch.float64)
    x = torch.cat([x, x[:6]])
    labels = torch.cat([labels, labels[:6]])
    _compare_with_pml(x, labels, rtol=1e-10)
    # In fp32 pml's cdist (|a|² + |b|² − 2a·b) leaves ~1e-4 of rounding noise on a zero distance; the reference
    # computes it from the differences (exact 0), so only float64 is compared tightly.
    _compare_with_pml(x.float(), labels, rtol=1e-3, atol=1e-3)


def test_all_zero_hinges_give_zero_loss_and_zero_gradient():
    # Two tight, far-apart classes: every d_ap - d_an + margin < 0.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    loss = fd.reference.triplet_margin(x, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    assert _pml(x.detach(), labels).item() == 0.0


@pytest.mark.parametrize("case", ["one_class", "all_distinct", "single_row", "labels_absent_from_refs"])
def test_no_triplets_gives_zero(case):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = ref_labels = None
    if case == "one_class":  # positives but no negatives
        labels = torch.zeros(6, dtype=torch.int64)
    elif case == "all_distinct":  # negatives but no positives
        labels = torch.arange(6)
    elif case == "single_row":
        x = x[:1].detach().requires_grad_(True)
        labels = torch.tensor([3])
    else:
        labels = torch.arange(6) % 2
        y, ref_labels = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.tensor([7, 8, 7, 9])
    loss = fd.reference.triplet_margin(x, labels, y, ref_labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    assert _pml(x.detach(), labels, y, ref_labels).item() == 0.0


def test_anchors_without_positives_or_negatives_are_skipped():
    """Class 0 has one row (no positive), class 1 has all others: only class-1 anchors with class-0 negatives."""
    x, _ = _batch([7], 6, seed=2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1, 1, 1, 1])
    _compare_with_pml(x, labels, rtol=1e-10)
    # by hand: anchors 1..6, positives the other five of class 1, the one negative row 0
    xh = torch.nn.functional.normalize(x, dim=1)
    D = torch.cdist(xh, xh)
    h = torch.stack([D[a, p] - D[a, 0] + MARGIN for a in range(1, 7) for p in range(1, 7) if p != a])
    want = h[h > 0].mean() if (h > 0).any() else h.new_zeros(())
    assert torch.allclose(fd.reference.triplet_margin(x, labels), want, rtol=1e-12, atol=0)


def test_margin_changes_the_loss_and_counts():
    x, labels = _batch([4] * 5, 8, seed=9, dtype=torch.float64)
    for m in (0.0, 0.2, 1.0):
        want = pml_losses.TripletMarginLoss(margin=m)(x, labels)
        got = fd.reference.triplet_margin(x, labels, margin=m)
        assert torch.allclose(got, want, rtol=1e-10, atol=0)
    assert fd.reference.triplet_margin(x, labels, margin=1.0) > fd.reference.triplet_margin(x, labels, margin=0.0)


def test_gradcheck_float64():
    x, labels = _batch([3, 3, 2], 5, seed=4, dtype=torch.float64, spread=0.4)
    y, ref_labels = _batch([2, 2, 3], 5, seed=6, dtype=torch.float64, spread=0.4)
    xg, yg = x.requires_grad_(True), y.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: fd.reference.triplet_margin(a, labels, margin=0.3), (xg,))
    assert torch.autograd.gradcheck(
        lambda a, b: fd.reference.triplet_margin(a, labels, b, ref_labels, margin=0.3), (xg, yg))


def test_reference_never_builds_the_triplet_list():
    """No tensor the reference computes (forward or backward) has more than B·M entries; the triplet list would
    have Σ_a |P_a|·|N_a| = 64·15·48 here, 15× more."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    x, labels = _batch([16] * 4, 8, seed=7)
    B = x.shape[0]
    x.requires_grad_(True)
    with LargestOutput():
        loss = fd.reference.triplet_margin(x, labels)
        loss.backward()
    assert B * B <= LargestOutput.largest <= B * B  # the distance matrix is the largest tensor
    assert torch.allclose(loss, _pml(x.detach(), labels), rtol=1e-5)


def test_non_finite_input_gives_nan():
    x, labels = _batch([4] * 4, 6, seed=8)
    x[3, 2] = float("nan")
    assert torch.isnan(fd.reference.triplet_margin(x, labels))
    x[3, 2] = float("inf")
    assert torch.isnan(fd.reference.triplet_margin(x, labels))


def test_invalid_arguments_raise():
    x, labels = _batch([4] * 2, 6, seed=8)
    with pytest.raises(TypeError, match="margin"):
        fd.reference.triplet_margin(x, labels, margin="0.1")
    with pytest.raises(ValueError, match="margin"):
        fd.reference.triplet_margin(x, labels, margin=float("nan"))
    with pytest.raises(ValueError, match="ref_labels"):
        fd.reference.triplet_margin(x, labels, x)
