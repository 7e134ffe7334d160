"""Numerics of the Triton batch-softmax kernels (docs/spec.md §2.1) against a dense float64 computation of the op contract.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 must be set before
any kernel is defined: tests/conftest.py does it; set it in the shell when running this file alone). Shapes are
small because the interpreter is slow; the tile configurations are the production ones, so masking of partial
tiles, several row / column / d blocks and the column splits are all exercised. bf16 is not tested here: the
interpreter's bf16 ``tl.dot`` is broken (see docs/verification.md).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(),
    reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1 set before triton kernels are defined",
)
DEVICE = "cpu" if INTERPRET else "cuda"

from flashdml.triton_kernels import batch_softmax as bs  # noqa: E402
from helpers import (  # noqa: E402
    assert_rows_close, normalization_d, raw_row_grad_tolerance, varied_norm_rows)

U32 = 2.0**-24  # fp32 unit roundoff
U16 = 2.0**-11  # fp16 unit roundoff


@pytest.fixture(autouse=True)
def poisoned(poison_triton_outputs):
    return poison_triton_outputs  # conftest.py


def make_inputs(B, d, labels_mode, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * B + d)
    x = torch.nn.functional.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(x + 0.7 * torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    if labels_mode is None:
        labels = None
    elif labels_mode == "dup":  # classes of ~3 samples: false negatives in most rows
        labels = torch.randint(0, max(2, B // 3), (B,), generator=g)
    elif labels_mode == "equal":  # every off-diagonal pair is masked: row_lse_i = z_ii, loss 0
        labels = torch.full((B,), 4, dtype=torch.int64)
    else:
        raise ValueError(labels_mode)
    x, y = x.to(dtype).to(DEVICE), y.to(dtype).to(DEVICE)
    return x, y, None if labels is None else labels.to(DEVICE)


def reference(x, y, labels, tau, symmetric, grad_loss):
    """The contract, densely in float64 (autograd gives dx, dy, dτ)."""
    xd = x.double().cpu().requires_grad_()
    yd = y.double().cpu().requires_grad_()
    td = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    B = xd.shape[0]
    z = xd @ yd.T / td
    allowed = torch.eye(B, dtype=torch.bool)
    if labels is None:
        allowed = torch.ones(B, B, dtype=torch.bool)
    else:
        lab = labels.cpu()
        allowed = allowed | (lab[:, None] != lab[None, :])
    zm = z.masked_fill(~allowed, float("-inf"))
    row_lse, col_lse = torch.logsumexp(zm, 1), torch.logsumexp(zm, 0)
    loss = (row_lse - z.diagonal()).mean()
    if symmetric:
        loss = 0.5 * (loss + (col_lse - z.diagonal()).mean())
    dx, dy, dt = torch.autograd.grad(loss * grad_loss, (xd, yd, td))
    return loss.detach(), row_lse.detach(), col_lse.detach(), dx, dy, dt


def tolerances(B, d, tau, dtype):
    """Absolute error bounds (worst case, not statistical) for fp32 / fp16 inputs, unit-norm rows.

    * one logit z = (x·y)/τ: the fp32 dot product of d terms is off by at most d·u·Σ|x_k y_k| <= d·u (unit rows,
      Cauchy-Schwarz), plus the 1/τ scaling (the kernel's 1/τ is div.full.f32, <= 2 ulp, then one multiply):
      dz = (d + 4)·u/τ. fp16 inputs: fp16·fp16 products are exact in fp32, so the same bound holds.
    * an LSE: a softmax-weighted average of the logit errors (<= dz), plus the fp32 sum of at most B exponentials
      (relative error <= (B + 8)·u, absolute in the log) and exp2/log rounding relative to |lse|.
    * gradients: |dL/dz_ij| sums to at most 4a/B per row (probabilities plus the diagonal term, both directions), so
      |dx_i| <= 4/(Bτ); each weight exp(z - lse) carries a relative error <= 2·dz + (B + 8)·u, and the B-term fp32
      accumulation adds (B + 8)·u. fp16: the weights are cast to fp16 for the tensor-core product and dx/dy are
      returned in fp16: two more relative roundings of 2^-11 each.
    * dτ = -Σ (dL/dz) z / τ with |z| <= 1/τ: the same relative error as the weights, on a bound of 4/τ², plus dz/τ.
    """
    lse_mag = 1.0 / tau + math.log(B) + 1.0
    dz = (d + 4) * U32 / tau
    rel_w = 2 * dz + (B + 8) * U32
    lse = dz + (B + 8) * U32 + 4 * U32 * lse_mag
    grad_rel = rel_w + (B + 8) * U32 + (3 * U16 if dtype == torch.float16 else 0.0)
    grad = 4.0 / (B * tau) * grad_rel
    dtemp = 4.0 / tau**2 * rel_w + 4.0 * dz / tau
    return dict(loss=lse + dz, lse=lse, grad=grad, dtemp=dtemp)


def assert_close(name, actual, expected, atol):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.double().cpu()
    assert not torch.isnan(a).any(), f"{name}: NaN left (unwritten poisoned output or NaN result)"
    err = (a - expected).abs().max().item() if a.numel() else 0.0
    assert err <= atol, f"{name}: max abs error {err:.3e} > tolerance {atol:.3e}"


# (B, d, labels, symmetric, tau, num_splits): every B and every d appear, each label mode with both symmetric
# settings, partial tiles everywhere, several d chunks in the backward (d = 129 > BLOCK_D), forced column splits.
FP32_CASES = [
    (1, 1, None, False, 0.1, None),
    (1, 3, "equal", True, 0.05, None),
    (2, 16, None, True, 0.1, None),
    (2, 129, "equal", False, 0.1, None),
    (5, 1, "dup", True, 0.07, None),
    (5, 16, None, False, 0.05, None),
    (37, 3, "dup", False, 0.1, 2),
    (37, 16, "equal", True, 0.1, None),
    (37, 129, None, True, 0.5, 2),
    (130, 1, "dup", True, 0.05, 3),
    (130, 16, None, False, 0.1, None),
    (130, 129, "dup", True, 0.1, None),
]
FP16_CASES = [
    (5, 3, None, True, 0.1, None),
    (37, 129, "dup", True, 0.05, 2),
    (130, 16, "dup", False, 0.1, None),
    (130, 3, "equal", True, 0.1, 2),
]


def _case_id(case):
    B, d, lab, sym, tau, ns = case
    return f"B{B}-d{d}-{lab or 'nolabels'}-{'sym' if sym else 'rows'}-tau{tau}-splits{ns or 'auto'}"


def _run_and_compare(dtype, case, poisoned):
    B, d, labels_mode, symmetric, tau, num_splits = case
    x, y, labels = make_inputs(B, d, labels_mode, dtype)
    temperature = torch.tensor(tau, dtype=torch.float32, device=DEVICE)
    grad_loss = torch.tensor(0.75, dtype=torch.float32, device=DEVICE)
    loss, row_lse, col_lse = bs.fwd_impl(x, y, labels, temperature, symmetric, num_splits=num_splits)
    dx, dy, dtemp = bs.bwd_impl(grad_loss, x, y, labels, temperature, symmetric, row_lse, col_lse,
                                num_splits=num_splits)
    assert poisoned, "the launchers did not allocate through flashdml._debug.new_output"
    L, RL, CL, DX, DY, DT = reference(x, y, labels, tau, symmetric, 0.75)
    tol = tolerances(B, d, tau, dtype)
    assert loss.dtype == row_lse.dtype == col_lse.dtype == dtemp.dtype == torch.float32
    assert dx.dtype == dy.dtype == dtype
    assert_close("loss", loss, L, tol["loss"])
    assert_close("row_lse", row_lse, RL, tol["lse"])
    if symmetric:
        assert_close("col_lse", col_lse, CL, tol["lse"])
    else:
        assert col_lse.shape == (0,)
    assert_close("dx", dx, DX, tol["grad"])
    assert_close("dy", dy, DY, tol["grad"])
    assert_close("dtemperature", dtemp, DT, tol["dtemp"])
    if labels_mode == "equal":  # only the positive is allowed: row_lse_i = z_ii exactly up to rounding
        assert abs(loss.item()) <= tol["loss"]


@pytest.mark.parametrize("case", FP32_CASES, ids=_case_id)
def test_fp32_matches_float64_contract(case, poisoned):
    _run_and_compare(torch.float32, case, poisoned)


@pytest.mark.parametrize("case", FP16_CASES, ids=_case_id)
def test_fp16_matches_float64_contract(case, poisoned):
    _run_and_compare(torch.float16, case, poisoned)


def test_registered_ops_deterministic_and_fully_written(poisoned):
    """The torch.ops entry points: same results as the impls, bitwise repeatable, every output written."""
    x, y, labels = make_inputs(37, 16, "dup", torch.float32, seed=3)
    t = torch.tensor(0.05, device=DEVICE)
    g = torch.tensor(1.0, device=DEVICE)
    outs = []
    for _ in range(2):
        fwd = torch.ops.flashdml_triton.batch_softmax_fwd(x, y, labels, t, True, False)
        bwd = torch.ops.flashdml_triton.batch_softmax_bwd(g, x, y, labels, t, True, False, fwd[1], fwd[2])
        outs.append(fwd + bwd)
    for a, b in zip(*outs):
        assert not torch.isnan(a).any()
        assert torch.equal(a, b)
    L, RL, CL, DX, DY, DT = reference(x, y, labels, 0.05, True, 1.0)
    tol = tolerances(37, 16, 0.05, torch.float32)
    assert_close("loss", outs[0][0], L, tol["loss"])
    assert_close("dx", outs[0][3], DX, tol["grad"])


def test_fake_impls_match_real_shapes():
    x, y, labels = make_inputs(5, 3, None, torch.float16)
    t = torch.tensor(0.1, device=DEVICE)
    real = torch.ops.flashdml_triton.batch_softmax_fwd(x, y, labels, t, False, False)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx, fy, ft = (mode.from_tensor(v) for v in (x, y, t))
        for sym in (False, True):
            for norm in (False, True):
                f = torch.ops.flashdml_triton.batch_softmax_fwd(fx, fy, None, ft, sym, norm)
                assert [tuple(v.shape) for v in f] == [(), (5,), (5 if sym else 0,)]
                assert all(v.dtype == torch.float32 for v in f)
                b = torch.ops.flashdml_triton.batch_softmax_bwd(ft, fx, fy, None, ft, sym, norm, f[1], f[2])
                assert [(tuple(v.shape), v.dtype) for v in b] == [((5, 3), x.dtype), ((5, 3), y.dtype),
                                                                  ((), torch.float32)]
    assert [tuple(v.shape) for v in real] == [(), (5,), (0,)]


def test_rejects_bad_inputs():
    x, y, _ = make_inputs(5, 3, None, torch.float32)
    t = torch.tensor(0.1, device=DEVICE)
    with pytest.raises(RuntimeError, match="B == M"):
        bs.fwd_impl(x, y[:4].contiguous(), None, t, False)
    with pytest.raises(RuntimeError, match="dtypes"):
        bs.fwd_impl(x, y.half(), None, t, False)


@pytest.mark.parametrize("labels_mode", [None, "dup"])
def test_opcheck(labels_mode):
    """Schema, fake (meta) implementations and autograd registration of the raw ops. (test_aot_dispatch_dynamic
    needs traceable kernels, which interpreted ones are not; it belongs to a GPU run.)"""
    x, y, labels = make_inputs(5, 3, labels_mode, torch.float32)
    t = torch.tensor(0.1, device=DEVICE)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    if not INTERPRET:
        utils += ("test_aot_dispatch_dynamic",)
    for sym, norm in ((False, False), (True, False), (True, True)):
        fwd = torch.ops.flashdml_triton.batch_softmax_fwd.default
        torch.library.opcheck(fwd, (x, y, labels, t, sym, norm), test_utils=utils)
        _, rl, cl = fwd(x, y, labels, t, sym, norm)
        torch.library.opcheck(torch.ops.flashdml_triton.batch_softmax_bwd.default,
                              (torch.tensor(1.0, device=DEVICE), x, y, labels, t, sym, norm, rl, cl), test_utils=utils)


@pytest.mark.parametrize("symmetric", [False, True])
def test_normalize_flag_on_raw_rows(symmetric):
    """normalize=True on raw rows (norms 1e-3 .. 1e3, one row below the 1e-12 clamp): the forward outputs and dτ
    are bitwise those of normalize=False on the op's own normalised rows (flashdml._math.normalized_rows), and the
    gradients with respect to the raw rows match autograd through flashdml.reference in float64 (bounds:
    tests/helpers.py normalization_d / raw_row_grad_tolerance on top of this module's ``tolerances``)."""
    from flashdml._math import normalized_rows

    B, d, tau = 37, 16, 0.1
    xu, yu, labels = make_inputs(B, d, "dup", torch.float64, seed=7)
    x, y = varied_norm_rows(xu, 1, tiny_row=True), varied_norm_rows(yu, 2)
    xh, yh = normalized_rows(x)[0], normalized_rows(y)[0]
    t = torch.tensor(tau, device=DEVICE)
    g = torch.tensor(0.75, device=DEVICE)
    ops = torch.ops.flashdml_triton
    fwd = ops.batch_softmax_fwd(x, y, labels, t, symmetric, True)
    fwd_hat = ops.batch_softmax_fwd(xh, yh, labels, t, symmetric, False)
    for a, b in zip(fwd, fwd_hat):
        assert torch.equal(a, b)
    dx, dy, dt = ops.batch_softmax_bwd(g, x, y, labels, t, symmetric, True, fwd[1], fwd[2])
    gx, gy, dt_hat = ops.batch_softmax_bwd(g, xh, yh, labels, t, symmetric, False, fwd[1], fwd[2])
    assert torch.equal(dt, dt_hat)
    assert dx.dtype == dy.dtype == torch.float32 and dx.shape == x.shape and dy.shape == y.shape

    import flashdml

    xd, yd = x.double().cpu().requires_grad_(), y.double().cpu().requires_grad_()
    td = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    loss = flashdml.reference.batch_softmax(xd, yd, labels.cpu(), temperature=td, symmetric=symmetric, normalize=True)
    DX, DY, DT = torch.autograd.grad(loss * 0.75, (xd, yd, td))
    tol = tolerances(B, normalization_d(d), tau, torch.float32)
    assert_close("loss", fwd[0], loss.detach(), tol["loss"])
    assert_close("dtemperature", dt, DT, tol["dtemp"])
    assert_rows_close("dx", dx, DX, raw_row_grad_tolerance(tol["grad"], gx, x))
    assert_rows_close("dy", dy, DY, raw_row_grad_tolerance(tol["grad"], gy, y))
    assert DX[-1].abs().max() > 1e6  # the clamped row: gradient g / 1e-12, checked like the others
