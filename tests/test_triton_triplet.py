"""Numerics of the Triton triplet-margin kernels (docs/spec.md §6.4) against a dense float64 computation of the
raw-op contract, and the ops' registration.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 before any kernel is
defined: tests/conftest.py sets it). The kernels see the rows normalised and rounded to the input dtype
(``flashdml._math.normalized_rows``), so the float64 contract below starts from those rows: it differs from the
kernels only by fp32 rounding. Random data is redrawn (deterministically) until no hinge d_ap − d_an + margin lies
within ``CLEAR`` of 0, so the active set cannot depend on that rounding and the counts must match exactly. bf16 runs
under ``triton_numerics.tensor_core_dots`` (the plain interpreter's bf16 ``tl.dot`` is wrong, docs/verification.md).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(),
    reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1 set before triton kernels are defined",
)
DEVICE = "cpu" if INTERPRET else "cuda"

import flashdml as fd  # noqa: E402
from flashdml._math import normalized_rows  # noqa: E402
from flashdml.triton_kernels import triplet as tk  # noqa: E402
from triton_numerics import tensor_core_dots  # noqa: E402

U32 = 2.0**-24
CLEAR = 2e-5  # no hinge of the test data within this of 0 (the fp32 distances err by < 1e-6 here)


@pytest.fixture(autouse=True)
def poisoned(poison_triton_outputs):
    return poison_triton_outputs  # conftest.py


def make_inputs(B, M, d, mode, labels_mode, dtype, seed=0):
    """Raw rows (norms 0.5 .. 3) and labels. mode "self" (y is x) or "cross"; labels_mode "dup" (classes of ~3),
    "one" (one class: no negatives), "distinct" (self: no positives), "absent" (cross: partly disjoint labels)."""
    g = torch.Generator().manual_seed(seed + 1000 * B + 7 * M + d)
    x = torch.randn(B, d, generator=g, dtype=torch.float64) * (0.5 + 2.5 * torch.rand(B, 1, generator=g))
    y = torch.randn(M, d, generator=g, dtype=torch.float64) * (0.5 + 2.5 * torch.rand(M, 1, generator=g))
    ncls = max(2, B // 3)
    if labels_mode == "one":
        labels, ref_labels = torch.full((B,), 3), torch.full((M,), 3)
    elif labels_mode == "distinct":
        labels = ref_labels = torch.randperm(B, generator=g) * 5
    elif labels_mode == "absent":
        labels = torch.randint(0, ncls, (B,), generator=g)
        ref_labels = torch.randint(0, ncls, (M,), generator=g) + ncls // 2
    else:
        labels = torch.randint(0, ncls, (B,), generator=g)
        ref_labels = labels if mode == "self" else torch.randint(0, ncls, (M,), generator=g)
    xt = x.to(dtype).to(DEVICE)
    yt = xt if mode == "self" else y.to(dtype).to(DEVICE)
    return xt, yt, labels.to(DEVICE), (labels if mode == "self" else ref_labels).to(DEVICE)


def contract(x, y, labels, ref_labels, margin, self_mode, grad=1.0):
    """The raw-op contract in float64 on the rows the kernels see (normalised, rounded to the dtype): loss, sum,
    count, the gradients with respect to those rows, dL/dD, and the smallest |hinge| over every triplet."""
    xh = normalized_rows(x)[0].double().cpu()
    yh = xh if self_mode else normalized_rows(y)[0].double().cpu()
    xd = xh.clone().requires_grad_()
    yd = yh.clone().requires_grad_()
    D = torch.cdist(xd, yd, compute_mode="donot_use_mm_for_euclid_dist")
    same = labels.cpu()[:, None] == ref_labels.cpu()[None, :]
    pos = same & ~torch.eye(*same.shape, dtype=torch.bool) if self_mode else same
    h = D[:, :, None] - D[:, None, :] + float(np.float32(margin))  # [a, p, n]
    trip = pos[:, :, None] & ~same[:, None, :]
    active = trip & (h > 0)
    total, count = h[active].sum(), int(active.sum())
    loss = total / count if count else D.sum() * 0
    dx, dy, G = torch.autograd.grad(loss * grad, (xd, yd, D))
    closest = h.detach()[trip].abs().min().item() if trip.any() else float("inf")
    return dict(loss=loss.detach(), sum=total.detach(), count=count, dx=dx, dy=dy, G=G, closest=closest)


def clear_inputs(B, M, d, mode, labels_mode, dtype, margin):
    for seed in range(20):
        args = make_inputs(B, M, d, mode, labels_mode, dtype, seed)
        if contract(*args, margin, mode == "self")["closest"] > CLEAR:
            return args
    raise AssertionError(f"no clear seed for B={B} M={M} d={d}")


def assert_close(name, actual, expected, atol):
    a = actual.double().cpu()
    assert a.shape == expected.shape, name
    assert not torch.isnan(a).any(), f"{name}: NaN (an unwritten poisoned output?)"
    err = (a - expected).abs()
    bound = torch.as_tensor(atol, dtype=torch.float64).expand_as(err)
    assert bool((err <= bound).all()), f"{name}: max excess {(err - bound).max():.3e}"


def check_case(dtype, B, M, d, mode, labels_mode, margin, num_splits, grad=0.75):
    self_mode = mode == "self"
    x, y, labels, ref_labels = clear_inputs(B, M, d, mode, labels_mode, dtype, margin)
    loss, sums, counts = tk.fwd_impl(x, y, labels, ref_labels, margin, self_mode, num_splits=num_splits)
    dx, dy = tk.bwd_impl(torch.tensor(grad, device=DEVICE), x, y, labels, ref_labels, margin, self_mode, counts,
                         num_splits=num_splits)
    ref = contract(x, y, labels, ref_labels, margin, self_mode, grad)
    assert loss.dtype == sums.dtype == torch.float32 and counts.dtype == torch.int64 and counts.shape == (1,)
    assert dx.dtype == dy.dtype == dtype and dx.shape == x.shape and dy.shape == y.shape
    assert int(counts.item()) == ref["count"]
    # the sum: fp32 hinges (error ~ (d + 8)·u each, unit rows), fp32 per-tile-row partials (<= 128 terms)
    n = max(ref["count"], 1)
    sum_tol = n * 4 * (d + 16) * U32 + 136 * U32 * float(ref["sum"].abs())
    assert_close("sums", sums, ref["sum"].reshape(1), sum_tol)
    assert_close("loss", loss, ref["loss"], sum_tol / n + 2 * U32 * float(ref["loss"].abs()))
    # gradients: dx̂_a = Σ_j dL/dD_aj · (unit vector), so an error bound is rel · Σ_j |dL/dD_aj| with rel covering
    # the distances' fp32 rounding and the B + M + d + 16 fp32 additions of a row (2x slack; measured <= 0.07 of
    # it); split-TF32 weights (16-bit rows) are kept to 2^-20; a 16-bit result adds one rounding of itself
    rel = 2 * (B + M + d + 16) * U32 + (2.0**-20 if dtype != torch.float32 else 0.0)
    out = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    absG = ref["G"].abs()
    tol_x = (rel * absG.sum(1))[:, None] + out * ref["dx"].abs()
    tol_y = (rel * absG.sum(0))[:, None] + out * ref["dy"].abs()
    if self_mode:  # the two slots of one tensor: autograd adds them
        assert_close("dx + dy", dx.double() + dy.double(), ref["dx"] + ref["dy"], tol_x + tol_y)
    else:
        assert_close("dx", dx, ref["dx"], tol_x)
        assert_close("dy", dy, ref["dy"], tol_y)
    if ref["count"] == 0:
        assert loss.item() == 0.0 and not dx.double().abs().max() and not dy.double().abs().max()
    else:
        assert ref["dx"].abs().max() > 0  # the case exercises the gradient
    return ref


# (B, M, d, mode, labels, margin, num_splits)
FP32_CASES = [
    (1, 1, 1, "self", "dup", 0.3, None),          # one row: no positive, loss 0
    (5, 7, 1, "cross", "dup", 0.3, None),         # d = 1: distances 0 or 2 exactly, zero-distance subgradient
    (37, 37, 3, "self", "dup", 0.3, 2),
    (37, 70, 3, "cross", "dup", 0.2, 3),
    (70, 70, 129, "self", "dup", 0.05, None),
    (20, 33, 129, "cross", "dup", 0.5, 2),
    (70, 37, 16, "cross", "absent", 0.3, None),
    (37, 37, 16, "self", "one", 0.3, None),       # no negative: loss 0
    (37, 37, 16, "self", "distinct", 0.3, 2),     # no positive: loss 0
    (30, 30, 16, "self", "dup", -0.3, None),      # negative margin
]
FP16_CASES = [(37, 37, 129, "self", "dup", 0.3, 2), (30, 45, 16, "cross", "dup", 0.2, None)]
BF16_CASES = [(37, 37, 16, "self", "dup", 0.3, None), (20, 33, 129, "cross", "dup", 0.3, 2)]


def _id(case):
    B, M, d, mode, lab, m, ns = case
    return f"B{B}-M{M}-d{d}-{mode}-{lab}-m{m}-s{ns or 'auto'}"


@pytest.mark.parametrize("case", FP32_CASES, ids=_id)
def test_fp32_matches_float64_contract(case):
    check_case(torch.float32, *case)


@pytest.mark.parametrize("case", FP16_CASES, ids=_id)
def test_fp16_matches_float64_contract(case):
    check_case(torch.float16, *case)


@pytest.mark.parametrize("case", BF16_CASES, ids=_id)
def test_bf16_matches_float64_contract(case):
    with tensor_core_dots():
        check_case(torch.bfloat16, *case)


@pytest.mark.parametrize("mode", ["self", "cross"])
def test_public_api_matches_reference(mode):
    """fd.triplet_margin on the Triton backend (raw rows, autograd through the registered ops) equals
    fd.reference.triplet_margin in float64: loss and raw-row gradients."""
    x, y, labels, ref_labels = clear_inputs(37, 50, 16, mode, "dup", torch.float32, 0.1)
    xr = x.clone().requires_grad_()
    yr = None if mode == "self" else y.clone().requires_grad_()
    rl = None if mode == "self" else ref_labels
    with fd.backend("triton"):
        loss = fd.triplet_margin(xr, labels, yr, rl, margin=0.1)
    grads = torch.autograd.grad(loss, [v for v in (xr, yr) if v is not None])
    xd = x.double().cpu().requires_grad_()
    yd = None if mode == "self" else y.double().cpu().requires_grad_()
    want = fd.reference.triplet_margin(xd, labels.cpu(), yd, None if rl is None else rl.cpu(), margin=0.1)
    wgrads = torch.autograd.grad(want, [v for v in (xd, yd) if v is not None])
    assert abs(loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    for g, w in zip(grads, wgrads):
        assert torch.allclose(g.double().cpu(), w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))


def test_registered_ops_deterministic_and_fully_written():
    x, y, labels, ref_labels = clear_inputs(37, 50, 16, "cross", "dup", torch.float32, 0.3)
    g = torch.tensor(1.0, device=DEVICE)
    outs = []
    for _ in range(2):
        fwd = torch.ops.flashdml_triton.triplet_fwd(x, y, labels, ref_labels, 0.3, False)
        bwd = torch.ops.flashdml_triton.triplet_bwd(g, x, y, labels, ref_labels, 0.3, False, fwd[2])
        outs.append(fwd + bwd)
    for a, b in zip(*outs):
        assert torch.equal(a, b) and not (a.is_floating_point() and torch.isnan(a).any())
    assert int(outs[0][2]) == contract(x, y, labels, ref_labels, 0.3, False)["count"]


def test_grad_loss_rules():
    """A zero upstream gradient gives zero gradients, a NaN one NaN everywhere (as the CPU op)."""
    x, y, labels, ref_labels = clear_inputs(20, 33, 16, "cross", "dup", torch.float32, 0.3)
    counts = tk.fwd_impl(x, y, labels, ref_labels, 0.3, False)[2]
    assert int(counts) > 0
    dx, dy = tk.bwd_impl(torch.tensor(0.0, device=DEVICE), x, y, labels, ref_labels, 0.3, False, counts)
    assert not dx.abs().max() and not dy.abs().max()
    dx, dy = tk.bwd_impl(torch.tensor(float("nan"), device=DEVICE), x, y, labels, ref_labels, 0.3, False, counts)
    assert torch.isnan(dx).all() and torch.isnan(dy).all()


def test_fake_impls_match_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, y, labels, ref_labels = make_inputs(5, 7, 3, "cross", "dup", torch.float16)
    real = torch.ops.flashdml_triton.triplet_fwd(x, y, labels, ref_labels, 0.3, False)
    rb = torch.ops.flashdml_triton.triplet_bwd(real[0], x, y, labels, ref_labels, 0.3, False, real[2])
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx, fy, fl, fr = (mode.from_tensor(v) for v in (x, y, labels, ref_labels))
        f = torch.ops.flashdml_triton.triplet_fwd(fx, fy, fl, fr, 0.3, False)
        b = torch.ops.flashdml_triton.triplet_bwd(f[0], fx, fy, fl, fr, 0.3, False, f[2])
    assert [(v.shape, v.dtype) for v in f] == [(v.shape, v.dtype) for v in real]
    assert [(v.shape, v.dtype) for v in b] == [(v.shape, v.dtype) for v in rb]


def test_rejects_bad_inputs():
    x, y, labels, ref_labels = make_inputs(5, 7, 3, "cross", "dup", torch.float32)
    with pytest.raises(RuntimeError, match="self_mode"):
        tk.fwd_impl(x, y, labels, ref_labels, 0.3, True)
    with pytest.raises(RuntimeError, match="dtypes"):
        tk.fwd_impl(x, y.half(), labels, ref_labels, 0.3, False)
    with pytest.raises(RuntimeError, match="ref_labels"):
        tk.fwd_impl(x, y, labels, labels, 0.3, False)


def test_opcheck():
    """Schema, fake implementations and autograd registration of the raw ops (test_aot_dispatch_dynamic needs a
    GPU: interpreted kernels are not traceable)."""
    x, y, labels, ref_labels = make_inputs(5, 7, 3, "cross", "dup", torch.float32)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    if not INTERPRET:
        utils += ("test_aot_dispatch_dynamic",)
    for yy, rr, self_mode in ((y, ref_labels, False), (x, labels, True)):
        torch.library.opcheck(torch.ops.flashdml_triton.triplet_fwd.default, (x, yy, labels, rr, 0.3, self_mode),
                              test_utils=utils)
        counts = torch.ops.flashdml_triton.triplet_fwd(x, yy, labels, rr, 0.3, self_mode)[2]
        torch.library.opcheck(torch.ops.flashdml_triton.triplet_bwd.default,
                              (torch.tensor(1.0, device=DEVICE), x, yy, labels, rr, 0.3, self_mode, counts),
                              test_utils=utils)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_specs_cover_launches(dtype, monkeypatch):
    from test_triton_xent import assert_launches_have_specs, recorded_launches

    B, M, d = 40, 70, 48
    x, y = torch.randn(B, d).to(dtype), torch.randn(M, d).to(dtype)
    lab, ref = torch.arange(B) % 7, torch.arange(M) % 7

    def run():
        for yy, rr, self_mode in ((y, ref, False), (x, lab, True)):
            tk.fwd_impl(x, yy, lab, rr, 0.3, self_mode)
            tk.bwd_impl(torch.tensor(1.0), x, yy, lab, rr, 0.3, self_mode, torch.ones(1, dtype=torch.int64))

    assert_launches_have_specs(recorded_launches(tk, monkeypatch, run))
