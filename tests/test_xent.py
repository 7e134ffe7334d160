"""Fused cross-example softmax (docs/spec.md §2.2) and NT-Xent (docs/spec.md §2.1b) against the reference and pml."""
import pytest
import torch

import flashdml as fd
from helpers import CPU_SHAPES, backend_params, check_against_reference, clustered

# Same error budget as batch softmax (see test_batch_softmax.py): fp32 tiles vs a float64 oracle, temperature 0.1.
RTOL, ATOL = 2e-5, 2e-6
OPS = ["cross_example_softmax", "ntxent"]


def _call_kwargs(op, x, y, labels, ref_labels, t):
    return dict(x=x, y=y, labels=labels, ref_labels=ref_labels, temperature=t)


def _shapes(backend):
    # Triton runs under the interpreter here: the glue needs a few ragged shapes; tests/test_triton_xent.py covers
    # the kernels' tiling on many more.
    return CPU_SHAPES if backend == "cpu" else [(1, 1), (37, 129), (70, 3)]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", ["self", "cross", "pair_cross", "pair_self"])
def test_matches_reference(backend, op, mode):
    for i, (B, d) in enumerate(_shapes(backend)):
        M = B if mode in ("self", "pair_self", "pair_cross") else max(1, (3 * B) // 2 + 1)
        x, labels = clustered(B, d, n_classes=max(1, B // 4), seed=i)
        y, ref_labels = clustered(M, d, n_classes=max(1, B // 4), seed=50 + i)
        if mode == "self":
            y, ref_labels = None, None
        elif mode == "pair_cross":
            labels = ref_labels = None
        elif mode == "pair_self":
            y = labels = ref_labels = None
        t = torch.tensor(0.1, requires_grad=True)
        check_against_reference(op, backend, _call_kwargs(op, x, y, labels, ref_labels, t), {},
                                grad_names=("x", "y", "temperature"), rtol=RTOL, atol=ATOL,
                                atol_by_name={"temperature": 1e-4})


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", ["one_class", "all_distinct", "absent_labels", "duplicates"])
def test_edge_cases_match_reference(op, case):
    B, d = 40, 6
    x, labels = clustered(B, d, 8, seed=3)
    y, ref_labels = None, None
    if case == "one_class":  # no negatives at all: loss 0, zero gradients
        labels = torch.zeros(B, dtype=torch.long)
    elif case == "all_distinct":  # self mode with no positives: loss 0
        labels = torch.arange(B)
    elif case == "absent_labels":  # cross mode, some query labels never occur among the references
        y, ref_labels = clustered(50, d, 8, seed=4)
        labels = labels + 4
    elif case == "duplicates":  # exact ties everywhere
        x = x[:10].repeat(4, 1)
        labels = labels[:10].repeat(4)
    check_against_reference(op, "cpu", _call_kwargs(op, x, y, labels, ref_labels, torch.tensor(0.2, requires_grad=True)),
                            {}, grad_names=("x", "y", "temperature"), rtol=RTOL, atol=ATOL,
                                atol_by_name={"temperature": 1e-4})


@pytest.mark.parametrize("op", OPS)
def test_empty_sets_give_zero_loss_and_zero_grad(op):
    x = torch.randn(12, 5, requires_grad=True)
    with fd.backend("cpu"):
        loss = getattr(fd, op)(x, labels=torch.zeros(12, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("op", OPS)
def test_deterministic_bitwise(op):
    x, labels = clustered(900, 24, 200, seed=5)
    outs = []
    for _ in range(2):
        xr = x.clone().requires_grad_()
        t = torch.tensor(0.05, requires_grad=True)
        with fd.backend("cpu"):
            loss = getattr(fd, op)(xr, labels=labels, temperature=t)
        loss.backward()
        outs.append((loss.detach(), xr.grad, t.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_xe_is_transpose_invariant_on_the_fused_path():
    x, labels = clustered(70, 9, 12, seed=6)
    y, ref_labels = clustered(90, 9, 12, seed=7)
    with fd.backend("cpu"):
        a = fd.cross_example_softmax(x, y, labels, ref_labels)
        b = fd.cross_example_softmax(y, x, ref_labels, labels)
    assert abs(a.item() - b.item()) < 1e-5 * abs(a.item())


def test_ntxent_equals_pml():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    for seed in range(3):
        x, labels = clustered(64, 16, 16, seed=seed)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        want = pml.NTXentLoss(temperature=0.07)(xa, labels)
        want.backward()
        with fd.backend("cpu"):
            got = fd.ntxent(xb, labels, temperature=0.07)
        got.backward()
        assert abs(got.item() - want.item()) < 1e-5
        assert torch.allclose(xb.grad, xa.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(not fd.available_backends()["cpu"][0], reason="flashdml._C not built")
def test_xent_ops_pass_opcheck():
    x, labels = clustered(30, 7, 6, seed=8)
    y, ref_labels = clustered(20, 7, 6, seed=9)
    x, y = x.requires_grad_(), y.requires_grad_()
    t = torch.tensor(0.1, requires_grad=True)
    for glob in (True, False):
        torch.library.opcheck(torch.ops.flashdml.xent_fwd, (x, y, labels, ref_labels, t, glob, False, True))
        torch.library.opcheck(torch.ops.flashdml.xent_fwd, (x, x, labels, labels, t, glob, True, False))


def test_xe_bad_inputs():
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        fd.cross_example_softmax(x, labels=torch.arange(3))
    with pytest.raises(ValueError, match="ref_labels is required"):
        fd.cross_example_softmax(x, torch.randn(5, 4), torch.arange(8))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fd.ntxent(x, torch.arange(8), temperature=-0.1)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        fd.cross_example_softmax(x, top_k=0)


@pytest.mark.skipif(not fd.available_backends()["cpu"][0], reason="flashdml._C not built")
def test_xe_beyond_int32_pair_count_matches_float64_chunked():
    """B = M = 50000 (B·M = 2.5e9 > 2^31 pairs): the fused loss equals a float64 chunked computation."""
    B, d, tau = 50_000, 16, 0.05
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=1)
    y = torch.nn.functional.normalize(x + 0.3 * torch.randn(B, d, generator=g), dim=1)
    with fd.backend("cpu"):
        got = fd.cross_example_softmax(x, y, temperature=tau).item()  # pair mode: row i matches column i
    x64, y64 = x.double(), y.double()
    lse_parts, pos = [], (x64 * y64).sum(1) / tau
    for r0 in range(0, B, 2048):
        z = x64[r0:r0 + 2048] @ y64.T / tau
        z[torch.arange(z.shape[0]), torch.arange(r0, r0 + z.shape[0])] = float("-inf")  # drop the positives
        lse_parts.append(torch.logsumexp(z.reshape(-1), 0))
    lam = torch.logsumexp(torch.stack(lse_parts), 0)
    want = torch.nn.functional.softplus(lam - pos).mean().item()
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)
