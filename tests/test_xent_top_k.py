"""Cross-Example Negative Mining (docs/spec.md §2.2 with top_k) fused on the CPU against the reference: loss and gradients
(x, y, a learnable temperature) in every mode, exact ties, top_k >= |N| equal to plain XE, the module option."""
import pytest
import torch

import flashdml as fd
from flashdml._debug import poison_outputs
from helpers import CPU_SHAPES, check_against_reference, clustered

pytestmark = pytest.mark.skipif(not fd.available_backends()["cpu"][0], reason="flashdml._C not built")

RTOL, ATOL = 2e-5, 2e-6
TEMP_ATOL = {"temperature": 1e-4}


def _batch(mode, B, d, seed):
    M = B if mode in ("self", "pair_self", "pair_cross") else (3 * B) // 2 + 1
    x, labels = clustered(B, d, n_classes=max(1, B // 4), seed=seed)
    y, ref_labels = clustered(M, d, n_classes=max(1, B // 4), seed=50 + seed)
    if mode == "self":
        y, ref_labels = None, None
    elif mode == "pair_cross":
        labels = ref_labels = None
    elif mode == "pair_self":
        y = labels = ref_labels = None
    return x, y, labels, ref_labels


def _n_neg(x, y, labels, ref_labels):
    b = fd._validation.prepare_batch(x, y, labels, ref_labels)
    return int((b.labels[:, None] != b.ref_labels[None, :]).sum())


def _check(x, y, labels, ref_labels, k, t=0.1, **kw):
    tensors = dict(x=x, y=y, labels=labels, ref_labels=ref_labels, temperature=torch.tensor(t, requires_grad=True))
    check_against_reference("cross_example_softmax", "cpu", tensors, dict(top_k=k, **kw),
                            grad_names=("x", "y", "temperature"), rtol=RTOL, atol=ATOL, atol_by_name=TEMP_ATOL)


@pytest.mark.parametrize("mode", ["self", "cross", "pair_cross", "pair_self"])
def test_top_k_matches_reference(mode):
    for i, (B, d) in enumerate(CPU_SHAPES[:8]):
        x, y, labels, ref_labels = _batch(mode, B, d, i)
        n = _n_neg(x, y, labels, ref_labels)
        for k in sorted({1, B, max(1, n - 1), max(1, n), n + 5}):
            _check(x, y, labels, ref_labels, k)


@pytest.mark.parametrize("mode", ["self", "cross"])
def test_top_k_exact_ties_match_reference(mode):
    """Integer rows, normalize=False: many exactly equal S values; the selected negatives (and so the gradient)
    must be the reference's (ties -> lower flat index)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (90, 3), generator=g).float()
    labels = torch.randint(0, 6, (90,), generator=g)
    y, ref_labels = (None, None) if mode == "self" else (torch.cat([x[:40], x[:40] + 1]), labels[:40].repeat(2))
    for k in (1, 7, 90, 1000):
        _check(x, y, labels, ref_labels, k, t=1.0, normalize=False)


def test_top_k_at_or_above_all_negatives_is_plain_xe():
    x, labels = clustered(200, 16, 30, seed=2)
    n = _n_neg(x, None, labels, None)
    with fd.backend("cpu"):
        plain = fd.cross_example_softmax(x, labels=labels)
        for k in (n, n + 1, 10 * n):
            assert torch.equal(fd.cross_example_softmax(x, labels=labels, top_k=k), plain)
        assert fd.cross_example_softmax(x, labels=labels, top_k=n // 10).item() < plain.item()


def test_top_k_empty_sets_give_zero():
    for labels in (torch.arange(12), torch.zeros(12, dtype=torch.long)):  # no positives / no negatives
        x = torch.randn(12, 5, requires_grad=True)
        with fd.backend("cpu"):
            loss = fd.cross_example_softmax(x, labels=labels, top_k=3)
        loss.backward()
        assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def test_top_k_gradient_reaches_only_selected_negatives_and_positives():
    """Self mode, 10 pairs of same-class rows and 30 singletons (no positives): a singleton that is not in any
    selected negative pair gets exactly zero gradient; every selected or positive row gets some."""
    x, _ = clustered(50, 8, 10, seed=4)
    x = x.requires_grad_()
    labels = torch.cat([torch.arange(10).repeat_interleave(2), torch.arange(100, 130)])
    with fd.backend("cpu"):
        _, r, c = fd.hardest_negatives(x, labels=labels, k=5)
        fd.cross_example_softmax(x, labels=labels, top_k=5).backward()
    touched = torch.zeros(50, dtype=torch.bool)
    touched[:20] = True
    touched[r] = True
    touched[c] = True
    norms = x.grad.abs().sum(1)
    assert (norms[~touched] == 0).all() and (norms[touched] > 0).all()
    assert (~touched).sum() > 10


def test_module_passes_top_k():
    x, labels = clustered(64, 8, 16, seed=6)
    with fd.backend("cpu"):
        want = fd.cross_example_softmax(x, labels=labels, top_k=64, temperature=0.05)
        got = fd.losses.CrossExampleSoftmaxLoss(temperature=0.05, top_k=64)(x, labels=labels)
    assert torch.equal(got, want)


def test_top_k_runs_the_fused_selection():
    """The fused path really goes through the kernel (poisoned outputs are overwritten) and is deterministic."""
    x, labels = clustered(300, 12, 40, seed=7)
    outs = []
    for _ in range(2):
        xr = x.clone().requires_grad_()
        with fd.backend("cpu"), poison_outputs():
            loss = fd.cross_example_softmax(xr, labels=labels, top_k=300)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(xr.grad).all()
        outs.append((loss.detach(), xr.grad))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
