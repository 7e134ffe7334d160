"""Fused batch softmax (docs/spec.md §2.1) on every backend against the reference, plus validation and registration."""
import pytest
import torch

import flashdml as fd
from helpers import CPU_SHAPES, SMALL_SHAPES, backend_params, check_against_reference, clustered

# Tolerances (fp32 kernel vs float64 reference on the same fp32 inputs): each S entry carries a dot-product
# rounding error of at most ~d * 2^-24 (~1e-5 for d = 129, typically sqrt(d) * 2^-24); logits divide it by
# the temperature (0.1 here, so <= 1e-4 absolute on z, typically 1e-6), the exp polynomial adds ~2 ulp and the
# LSE / mean keep relative error. rtol 2e-5 with atol 2e-6 leaves a ~5x margin over what we observe.
RTOL, ATOL = 2e-5, 2e-6


def _shapes(backend):
    return CPU_SHAPES if backend == "cpu" else SMALL_SHAPES


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("label_kind", ["none", "classes", "all_equal"])
def test_matches_reference(backend, symmetric, label_kind):
    for i, (B, d) in enumerate(_shapes(backend)):
        x, labels = clustered(B, d, n_classes=max(1, B // 4), seed=i)
        y, _ = clustered(B, d, n_classes=max(1, B // 4), seed=100 + i)
        if label_kind == "none":
            labels = None
        elif label_kind == "all_equal":  # every off-diagonal pair is a false negative: loss 0 exactly
            labels = torch.zeros(B, dtype=torch.long)
        t = torch.tensor(0.1, requires_grad=True)
        check_against_reference(
            "batch_softmax", backend, dict(x=x, y=y, labels=labels, temperature=t), dict(symmetric=symmetric),
            grad_names=("x", "y", "temperature"), rtol=RTOL, atol=ATOL, atol_by_name={"temperature": 1e-4},
        )


@pytest.mark.parametrize("backend", backend_params())
def test_unnormalized_and_float_temperature(backend):
    x, labels = clustered(37, 16, 9, seed=3)
    y, _ = clustered(37, 16, 9, seed=4)
    x, y = 0.3 * x, 0.3 * y  # dot products of order 1, logits of order 20
    check_against_reference("batch_softmax", backend, dict(x=x, y=y, labels=labels),
                            dict(temperature=0.05, normalize=False), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", backend_params())
def test_duplicate_rows_ties(backend):
    base = torch.randn(6, 8)
    x = base.repeat(4, 1)  # 24 rows, every row has 3 exact duplicates
    y = base.repeat(4, 1).flip(0)
    labels = torch.arange(24) % 5
    check_against_reference("batch_softmax", backend, dict(x=x, y=y, labels=labels),
                            dict(temperature=0.2, symmetric=True), rtol=RTOL, atol=ATOL)


def test_all_equal_labels_loss_is_zero_with_zero_grad():
    x, y = torch.randn(9, 5, requires_grad=True), torch.randn(9, 5, requires_grad=True)
    with fd.backend("cpu"):
        loss = fd.batch_softmax(x, y, torch.zeros(9, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(y.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_fp32_loss_and_input_dtype_grads(dtype):
    x, labels = clustered(50, 32, 10, seed=5)
    y, _ = clustered(50, 32, 10, seed=6)
    xh, yh = x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_()
    with fd.backend("cpu"):
        loss = fd.batch_softmax(xh, yh, labels, temperature=0.1)
    loss.backward()
    ref = fd.reference.batch_softmax(xh.detach().double(), yh.detach().double(), labels, temperature=0.1)
    assert loss.dtype == torch.float32 and xh.grad.dtype == dtype and yh.grad.dtype == dtype
    assert abs(loss.item() - ref.item()) < 1e-4 * max(1.0, abs(ref.item()))


def test_deterministic_bitwise():
    x, labels = clustered(700, 40, 100, seed=7)
    y, _ = clustered(700, 40, 100, seed=8)
    runs = []
    for _ in range(2):
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        with fd.backend("cpu"):
            loss = fd.batch_softmax(xr, yr, labels, symmetric=True)
        loss.backward()
        runs.append((loss.detach(), xr.grad, yr.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_nonfinite_inputs_propagate_nan_like_reference():
    x, y = torch.randn(20, 4), torch.randn(20, 4)
    x[3, 1] = float("nan")
    ref = fd.reference.batch_softmax(x, y)
    with fd.backend("cpu"):
        got = fd.batch_softmax(x, y)
    assert torch.isnan(ref) and torch.isnan(got)


def test_float64_runs_the_reference_exactly():
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    with fd.backend("cpu"):
        got = fd.batch_softmax(x, y, temperature=0.3)
    assert got.dtype == torch.float64
    assert torch.equal(got, fd.reference.batch_softmax(x, y, temperature=0.3))


def test_module_wraps_functional_with_learnable_temperature():
    x, labels = clustered(30, 8, 6, seed=9)
    y, _ = clustered(30, 8, 6, seed=10)
    module = fd.losses.BatchSoftmaxLoss(temperature=0.07, symmetric=True, learnable_temperature=True)
    loss = module(x, labels, ref_emb=y)
    loss.backward()
    want = fd.batch_softmax(x, y, labels, temperature=0.07, symmetric=True)
    assert torch.allclose(loss, want)
    assert module.temperature.grad is not None and module.temperature.grad.abs().item() > 0


BAD_INPUTS = [
    (lambda x, y, l: fd.batch_softmax(x[0], y), ValueError, "x must be a 2-D"),
    (lambda x, y, l: fd.batch_softmax(x, y[:, :3]), ValueError, "embedding dimension"),
    (lambda x, y, l: fd.batch_softmax(x, y[:5]), ValueError, "B == M"),
    (lambda x, y, l: fd.batch_softmax(x, None), ValueError, "y is required"),
    (lambda x, y, l: fd.batch_softmax(x, y, l[:4]), ValueError, "labels has 4 entries"),
    (lambda x, y, l: fd.batch_softmax(x, y, l.float()), TypeError, "labels must be an integer"),
    (lambda x, y, l: fd.batch_softmax(x, y, temperature=0.0), ValueError, "temperature must be > 0"),
    (lambda x, y, l: fd.batch_softmax(x, y, temperature=torch.tensor(-1.0)), ValueError, "temperature must be > 0"),
    (lambda x, y, l: fd.batch_softmax(x, y, temperature="hot"), TypeError, "temperature"),
    (lambda x, y, l: fd.batch_softmax(x[:0], y[:0]), ValueError, "x is empty"),
    (lambda x, y, l: fd.batch_softmax(x.long(), y), TypeError, "x must be float16"),
    (lambda x, y, l: fd.batch_softmax(x, y.to("meta")), ValueError, "mixed devices"),
    (lambda x, y, l: fd.batch_softmax(x, y.double()), TypeError, "same dtype"),
    (lambda x, y, l: fd.batch_softmax(x.numpy(), y), TypeError, "x must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("call,exc,message", BAD_INPUTS)
def test_bad_input_raises_clear_error(backend, call, exc, message):
    x, y, labels = torch.randn(8, 4), torch.randn(8, 4), torch.arange(8)
    with fd.backend(backend), pytest.raises(exc, match=message):
        call(x, y, labels)


@pytest.mark.skipif(not fd.available_backends()["cpu"][0], reason="flashdml._C not built")
def test_cpu_ops_pass_opcheck():
    x, y = torch.randn(40, 7), torch.randn(40, 7)
    x = torch.nn.functional.normalize(x, dim=1).requires_grad_()
    y = torch.nn.functional.normalize(y, dim=1).requires_grad_()
    labels = torch.arange(40) // 3
    t = torch.tensor(0.1, requires_grad=True)
    for lab, sym in [(labels, True), (None, False)]:
        for normalize in (False, True):
            torch.library.opcheck(torch.ops.flashdml.batch_softmax_fwd, (x, y, lab, t, sym, normalize))


@pytest.mark.skipif(not fd.available_backends()["cpu"][0], reason="flashdml._C not built")
def test_torch_compile_fullgraph_matches_eager():
    x, labels = clustered(64, 16, 16, seed=11)
    y, _ = clustered(64, 16, 16, seed=12)
    fn = torch.compile(lambda a, b, l: fd.batch_softmax(a, b, l, temperature=0.1, symmetric=True), fullgraph=True,
                       backend="aot_eager")
    with fd.backend("cpu"):
        xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
        got = fn(xa, ya, labels)
        got.backward()
        xb, yb = x.clone().requires_grad_(), y.clone().requires_grad_()
        want = fd.batch_softmax(xb, yb, labels, temperature=0.1, symmetric=True)
        want.backward()
    assert torch.allclose(got, want) and torch.allclose(xa.grad, xb.grad) and torch.allclose(ya.grad, yb.grad)


def test_explicit_backend_that_cannot_run_raises():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    with fd.backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
        fd.batch_softmax(x, y)


def test_available_backends_explains_every_backend():
    status = fd.available_backends()
    assert set(status) == {"reference", "cpu", "triton", "cuda"}
    for name, (ok, why) in status.items():
        assert isinstance(ok, bool) and isinstance(why, str) and why
