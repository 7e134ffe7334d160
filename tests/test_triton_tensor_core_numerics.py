"""Tensor-core numerics of the Triton kernels, on CPU: ``triton_numerics.tensor_core_dots`` makes the interpreter's
``tl.dot`` round fp32 operands to TF32 where a kernel asks for "tf32" (head + tail for "tf32x3") and multiply
bf16 operands by value (the plain interpreter multiplies their raw bits), so the 16-bit paths are checked here
against float64 with tolerances taken from the formats (u = 2^-8 bf16, 2^-11 fp16 / TF32, 2^-24 fp32)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="checks the interpreter's dot (TRITON_INTERPRET=1)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import flashdml as fd  # noqa: E402
from triton_numerics import round_tf32, tensor_core_dots  # noqa: E402

U8, U11 = 2.0**-8, 2.0**-11


@triton.jit
def _dot16(a_ptr, b_ptr, o_ptr, PRECISION: tl.constexpr):
    r = tl.arange(0, 16)
    a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
    b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
    tl.store(o_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b, input_precision=PRECISION))


def _run_dot(a, b, precision):
    out = torch.empty(16, 16)
    _dot16[(1,)](a, b, out, precision)
    return out.double()


def test_mode_rounds_tf32_operands_and_multiplies_bf16_by_value():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    exact = a.double() @ b.double()
    as_tf32 = lambda t: torch.from_numpy(round_tf32(t.numpy())).double()  # noqa: E731
    with tensor_core_dots():
        ieee, tf32, tf32x3 = (_run_dot(a, b, p) for p in ("ieee", "tf32", "tf32x3"))
        bf16 = _run_dot(a.bfloat16(), b.bfloat16(), "tf32")
    scale = exact.abs().max().item()
    assert (ieee - exact).abs().max() <= 1e-6 * scale
    assert torch.allclose(tf32, as_tf32(a) @ as_tf32(b), rtol=0, atol=1e-6 * scale)
    assert (tf32 - exact).abs().max() > 1e-4 * scale  # TF32 rounding is visible ...
    assert (tf32x3 - exact).abs().max() <= 1e-5 * scale  # ... and the three-product split removes it
    assert torch.allclose(bf16, a.bfloat16().double() @ b.bfloat16().double(), rtol=0, atol=1e-6 * scale)
    plain = _run_dot(a.bfloat16(), b.bfloat16(), "tf32")  # outside the mode: the interpreter's bf16 dot is garbage
    assert not torch.allclose(plain, a.bfloat16().double() @ b.bfloat16().double(), atol=1.0)


def _hinge_case(dtype):
    from test_triton_hinge_pair import clear_inputs

    return clear_inputs(70, 70, 16, "self", "dup", False, dtype, 0.3, 0.1, seed=3)


def _hinge_parts(x, labels, wp, wn):
    """float64 reference gradients of the positive and the negative term separately (grad_loss 1)."""
    from test_triton_hinge_pair import reference

    pos = reference(x, x, labels, labels, 0.3, 0.1, wp, 0.0, True, False, 1.0)
    neg = reference(x, x, labels, labels, 0.3, 0.1, 0.0, wn, True, False, 1.0)
    return pos, neg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hinge_gradient_constants_are_not_rounded_to_16_bits(dtype):
    """dx = a·dx₊ + b·dx₋ fitted by least squares against the float64 parts: a and b are the factors the kernel
    applied to the constants −λ₊/#hp and λ₋/#hn. Rounding them to the 16-bit dtype (the old code) gives factors
    off by the constants' own rounding error (checked below to be > u/4 here); the head + tail product of
    ``_tiles.weights_dot`` keeps them to ~u². The per-element error of the 16-bit output is unbiased and mostly
    averages out of the fit (its standard error here is ~1e-4 for bf16, ~1.5e-5 for fp16: hence the bound u/8)."""
    from flashdml.triton_kernels import hinge_pair as hpk

    wp, wn = 0.8, 1.3
    x, _, labels, _ = _hinge_case(dtype)
    pos, neg = _hinge_parts(x, labels, wp, wn)
    cp, cn = int(pos["counts"][0]), int(neg["counts"][1])
    constants = torch.tensor([wp / cp, wn / cn], dtype=torch.float32)
    rounding = ((constants.to(dtype).float() - constants) / constants).abs()
    u = U8 if dtype == torch.bfloat16 else U11
    assert rounding.max() > u / 4, f"case does not exercise the rounding: {rounding.tolist()}"
    with tensor_core_dots():
        counts = torch.tensor([cp, cn])
        dx, dy = hpk.bwd_impl(torch.tensor(1.0), x, x, labels, labels, 0.3, 0.1, wp, wn, True, False, counts)
    got = (dx.double() + dy.double()).reshape(-1)  # self mode: x receives both
    A = torch.stack([(pos["dx"] + pos["dy"]).reshape(-1), (neg["dx"] + neg["dy"]).reshape(-1)], 1)
    factors = torch.linalg.lstsq(A, got[:, None]).solution.reshape(-1)
    assert (factors - 1).abs().max() < u / 8, f"fitted factors {factors.tolist()} (constants' rounding {rounding})"
    want = (A @ torch.ones(2, dtype=torch.float64))
    assert ((got - want).abs() <= 2 * u * want.abs() + 1e-5 * want.abs().max()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_contextual_low_precision_gradient_matches_reference(dtype):
    """The contextual gradient with 16-bit rows under tensor-core dots (bf16 never ran under the plain interpreter):
    against the float64 reference on the same rounded rows, within the 16-bit output rounding plus the kernel's fp32
    accumulation (the dense weights G go through a "tf32x3" product: ~2^-21, far below). For fp16 the factor
    fitted between the gradient and the reference (unbiased output rounding averages out, ~1e-5 here) is within
    2^-15: one "tf32" product (the old code) rounds G's constant parts and is off by ~1e-4."""
    from test_triton_contextual import _batch

    x, labels = _batch(40, 16, 4, 41)
    xl = torch.nn.functional.normalize(x, dim=1).to(dtype)  # unit rows as stored: no renormalisation rounding
    xd = xl.double().requires_grad_(True)
    ref = fd.reference.contextual_loss(xd, labels, normalize=False)
    (want,) = torch.autograd.grad(ref, xd)
    xf = xl.clone().requires_grad_(True)
    with tensor_core_dots(), fd.backend("triton"):
        got = fd.contextual_loss(xf, labels, normalize=False)
        got.backward()
    u = U8 if dtype == torch.bfloat16 else U11
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)
    err = (xf.grad.double() - want).abs()
    assert (err <= u * want.abs() + 1e-3 * want.abs().max()).all(), err.max().item()
    if dtype == torch.float16:
        g, w = xf.grad.double().reshape(-1), want.reshape(-1)
        factor = float((g @ w) / (w @ w))
        assert abs(factor - 1) < 2.0**-15, factor
