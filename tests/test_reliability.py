"""No silent wrong answers: what the fused ops do with inputs a training loop meets (double backward, ...)."""
from __future__ import annotations

import pytest
import torch

import flashdml as fd

from helpers import backend_params, device_of

LOSSES = {
    "cross_example_softmax": lambda x, l: fd.cross_example_softmax(x, labels=l),
    "cross_example_softmax_top_k": lambda x, l: fd.cross_example_softmax(x, labels=l, top_k=7),
    "ntxent": lambda x, l: fd.ntxent(x, l),
    "batch_softmax": lambda x, l: fd.batch_softmax(x, x.flip(0), l),
    "threshold_consistent_margin": lambda x, l: fd.threshold_consistent_margin(x, l),
    "contrastive_margin": lambda x, l: fd.contrastive_margin(x, l),
    "contextual_loss": lambda x, l: fd.contextual_loss(x, l),
    "knn": lambda x, l: fd.knn(x, k=3)[0].sum(),
    "hardest_negatives": lambda x, l: fd.hardest_negatives(x, labels=l, k=5)[0].sum(),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("op", list(LOSSES))
def test_double_backward_raises_instead_of_a_silent_zero(backend, op):
    x = torch.randn(16, 8, device=device_of(backend), requires_grad=True)
    labels = (torch.arange(16) // 4).to(x.device)
    with fd.backend(backend):
        with pytest.raises(RuntimeError, match="create_graph=True"):
            torch.autograd.grad(LOSSES[op](x, labels), x, create_graph=True)
        (g,) = torch.autograd.grad(LOSSES[op](x, labels), x)  # a plain backward is unaffected
    assert torch.isfinite(g).all()


def test_double_backward_works_on_the_reference():
    x = torch.randn(16, 8, requires_grad=True)
    labels = torch.arange(16) // 4
    with fd.backend("reference"):
        (g,) = torch.autograd.grad(fd.cross_example_softmax(x, labels=labels), x, create_graph=True)
        g.pow(2).sum().backward()
    assert x.grad.abs().sum() > 0


HUGE = 1e20  # rows of norm ~1e21: their squares overflow fp32, so a plain ‖x‖ would be inf and x̂ zero


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
@pytest.mark.parametrize("op", ["cross_example_softmax", "ntxent", "threshold_consistent_margin", "contextual_loss",
                                "knn"])
def test_huge_rows_normalise_like_ordinary_ones(backend, op):
    device = torch.device("cpu") if backend == "reference" else device_of(backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 8, generator=g).to(device)
    labels = (torch.arange(16) // 4).to(device)
    with fd.backend(backend):
        want = LOSSES[op](x, labels)
        got = LOSSES[op](x * HUGE, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_metrics_of_huge_rows_equal_the_float64_reference():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 8, generator=g)
    labels = torch.arange(64) // 4
    want = fd.reference.evaluate(x.double() * HUGE, labels)
    got = fd.metrics.evaluate(x * HUGE, labels)
    assert got.keys() == want.keys()
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


BAD_ARGUMENTS = [  # (call, exception, message): each was silently accepted before
    (lambda x, l: fd.similarity(x, normalize="no"), TypeError, "normalize must be a bool"),
    (lambda x, l: fd.contextual_loss(x, l, normalize="no"), TypeError, "normalize must be a bool"),
    (lambda x, l: fd.knn(x, k=2, exclude_self="yes"), TypeError, "exclude_self must be a bool"),
    (lambda x, l: fd.contextual_loss(x, l, ste_slope=float("nan")), ValueError, "ste_slope must be finite"),
    (lambda x, l: fd.threshold_consistent_margin(x, l, pos_margin=float("inf")), ValueError,
     "pos_margin must be finite"),
    (lambda x, l: fd.contrastive_margin(x, l, neg_margin=float("nan")), ValueError, "neg_margin must be finite"),
    (lambda x, l: fd.threshold_consistent_margin(x, l, neg_weight=float("inf")), ValueError,
     "neg_weight must be finite"),
    (lambda x, l: fd.cross_example_softmax(x, labels=l, temperature=1e-30), ValueError, "temperature = 1e-30"),
    (lambda x, l: fd.ntxent(x, l, temperature=torch.tensor(float("inf"))), ValueError, "temperature must be finite"),
]


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
@pytest.mark.parametrize("case", range(len(BAD_ARGUMENTS)))
def test_bad_arguments_raise_naming_the_argument(backend, case):
    call, exc, message = BAD_ARGUMENTS[case]
    device = torch.device("cpu") if backend == "reference" else device_of(backend)
    x, labels = torch.randn(12, 4, device=device), (torch.arange(12) // 3).to(device)
    if case == 0 and backend != "reference":
        backend = "auto"  # similarity has no fused kernel: an explicit fused backend refuses it before validating
    with fd.backend(backend), pytest.raises(exc, match=message):
        call(x, labels)


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contextual_without_normalize_names_a_row_whose_norm_overflows_fp32(backend, dtype):
    """normalize=False takes the rows as given and returns fp32: a row of norm ~1e30 (or ~1e12, through the
    regulariser) is refused up front, naming normalize=False and the row (before: torch's generic 'value cannot be
    converted to type float without overflow' from inside the CPU op, inf from the reference)."""
    device = torch.device("cpu") if backend == "reference" else device_of(backend)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 4, generator=g)
    labels = (torch.arange(12) // 3).to(device)
    huge = x.clone()
    huge[3] *= 1e30
    with fd.backend(backend):
        with pytest.raises(ValueError, match=r"normalize=False.*float32; row 3 has norm \d(\.\d+)?e\+30"):
            fd.contextual_loss(huge.to(device, dtype), labels, normalize=False)
        # norm 1e12: S fits fp32 but reg_weight·(mean(S) - reg_target)² ~ 5e42 does not (it grows as norm⁴)
        big = x.clone()
        big[5] *= 1e12
        with pytest.raises(ValueError, match=r"normalize=False the regulariser .* overflows float32 .*row 5"):
            fd.contextual_loss(big.to(device, dtype), labels, normalize=False)
        if dtype != torch.float32:  # (bf16 rows of d = 4 within eps of each other can be a collapsed batch)
            return
        # the same row with normalize=True (the default) is fine, and so are unit rows with normalize=False
        assert torch.isfinite(fd.contextual_loss(huge.to(device, dtype), labels))
        unit = torch.nn.functional.normalize(x, dim=1)
        assert torch.isfinite(fd.contextual_loss(unit.to(device, dtype), labels, normalize=False))


# ---------------------------------------------------------------------------------------- non-finite inputs
LOSS_OPS = [op for op in LOSSES if op not in ("knn", "hardest_negatives")]


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
@pytest.mark.parametrize("op", LOSS_OPS)
@pytest.mark.parametrize("where", ["all", "one_row", "one_inf"])
def test_a_nonfinite_embedding_makes_the_loss_and_its_gradient_nan(backend, op, where):
    """The rule on every backend: a NaN or infinity anywhere in the batch gives a NaN loss and NaN gradients
    (before: the CPU XE / NT-Xent of an all-NaN batch were 0.0, TCM / contrastive with one NaN row finite)."""
    device = torch.device("cpu") if backend == "reference" else device_of(backend)
    x = torch.randn(16, 8)
    if where == "all":
        x[:] = float("nan")
    elif where == "one_row":
        x[5] = float("nan")
    else:
        x[9, 3] = float("inf")
    x = x.to(device).requires_grad_()
    labels = (torch.arange(16) // 4).to(device)
    with fd.backend(backend):
        loss = LOSSES[op](x, labels)
        (g,) = torch.autograd.grad(loss, x)
    assert torch.isnan(loss), float(loss)
    assert torch.isnan(g).any()


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
@pytest.mark.parametrize("op", ["knn", "hardest_negatives", "knn_gallery"])
def test_selection_of_a_nonfinite_row_raises_naming_it(backend, op):
    device = torch.device("cpu") if backend == "reference" else device_of(backend)
    x = torch.randn(16, 8)
    x[6, 1] = float("nan")
    x = x.to(device)
    labels = (torch.arange(16) // 4).to(device)
    calls = {"knn": lambda: fd.knn(x, k=3), "hardest_negatives": lambda: fd.hardest_negatives(x, labels=labels, k=4),
             "knn_gallery": lambda: fd.knn(torch.randn(3, 8, device=device), x, k=3)}
    name = "y" if op == "knn_gallery" else "x"
    with fd.backend(backend), pytest.raises(ValueError, match=rf"{name}\[6\] has a NaN or infinite entry"):
        calls[op]()
