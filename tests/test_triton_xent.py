"""Numerics of the Triton cross-example softmax / NT-Xent kernels (docs/spec.md §2.2 without top_k, 2.1b) against a dense
float64 computation of the raw-op contract (L2-normalised inputs, labels as int64 tensors).

Without a GPU the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 must be set before any
kernel is defined: tests/conftest.py does it; set it in the shell when running this file alone). The tile
configurations are the production ones, so partial tiles, several row / column / d blocks (d = 129 > BLOCK_D),
column splits and the label-sorted positive pass are all exercised. bf16 is not tested here: the interpreter's bf16
``tl.dot`` is broken (see docs/verification.md).
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

from flashdml.triton_kernels import xent  # noqa: E402
from helpers import (  # noqa: E402
    assert_rows_close, exact_unit_rows, normalization_d, raw_row_grad_tolerance, varied_norm_rows)

U32 = 2.0**-24  # fp32 unit roundoff
U16 = 2.0**-11  # fp16 unit roundoff


@pytest.fixture(autouse=True)
def poisoned(poison_triton_outputs):
    return poison_triton_outputs  # conftest.py


def make_inputs(B, M, d, mode, labels_mode, dtype, seed=0):
    """mode: "self" (y is x), "cross" (M rows of their own), "pair" (cross, labels = arange, M = B).
    labels_mode: "dup" (classes of ~3), "one" (one class: no negatives), "distinct" (no positives in self mode),
    "absent" (cross: label sets overlap only partly), "ties" (duplicated rows: exact ties)."""
    g = torch.Generator().manual_seed(seed + 1000 * B + 7 * M + d)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    if labels_mode == "ties":
        x = x[: max(1, B // 3)].repeat(4, 1)[:B]
    x = torch.nn.functional.normalize(x, dim=1)
    if mode == "self":
        M, y = B, x
    elif mode == "pair":
        M = B
        y = torch.nn.functional.normalize(x + 0.7 * torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    else:
        y = torch.nn.functional.normalize(torch.randn(M, d, generator=g, dtype=torch.float64), dim=1)
    ncls = max(2, B // 3)
    if mode == "pair":
        labels = torch.arange(B)
        ref_labels = labels
    elif labels_mode == "one":
        labels, ref_labels = torch.full((B,), 3), torch.full((M,), 3)
    elif labels_mode == "distinct":
        labels = torch.randperm(B, generator=g) * 5
        ref_labels = labels if mode == "self" else torch.randperm(M, generator=g) * 5 + 10**6
    elif labels_mode == "absent":  # cross mode, some query labels never occur among the references and v.v.
        labels = torch.randint(0, ncls, (B,), generator=g)
        ref_labels = torch.randint(0, ncls, (M,), generator=g) + ncls // 2
    else:
        labels = torch.randint(0, ncls, (B,), generator=g)
        ref_labels = labels if mode == "self" else torch.randint(0, ncls, (M,), generator=g)
    xt = x.to(dtype).to(DEVICE)
    yt = xt if mode == "self" else y.to(dtype).to(DEVICE)
    return xt, yt, labels.to(DEVICE), ref_labels.to(DEVICE)


def reference(x, y, labels, ref_labels, tau, global_partition, self_mode, grad_loss):
    """The contract, densely in float64 (autograd gives dx, dy, dτ with x and y as separate leaves, and G = dL/dS
    for the error bounds)."""
    xd = x.double().cpu().requires_grad_()
    yd = y.double().cpu().clone().requires_grad_()
    td = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    S = xd @ yd.T
    z = S / td
    lab, ref = labels.cpu(), ref_labels.cpu()
    same = lab[:, None] == ref[None, :]
    keep = torch.ones_like(same)
    if self_mode:
        keep &= ~torch.eye(len(lab), dtype=torch.bool)
    pos, neg = same & keep, ~same & keep
    npos = int(pos.sum())
    zn = z.masked_fill(~neg, float("-inf"))
    if global_partition:
        has = bool(neg.any())
        lse_row = (torch.logsumexp(zn.reshape(-1), 0) if has else torch.tensor(0.0, dtype=torch.float64)).expand(
            z.shape[0])
        has_row = torch.full((z.shape[0],), has)
    else:
        has_row = neg.any(1)
        lse_row = torch.where(has_row, torch.logsumexp(torch.where(has_row[:, None], zn, 0.0), 1), 0.0)
    t = lse_row[:, None] - z
    counted = pos & has_row[:, None]
    sp = torch.nn.functional.softplus(t)
    loss = sp[counted].sum() / npos if npos else z.sum() * 0.0
    dx, dy, dt, G = torch.autograd.grad(loss * grad_loss, (xd, yd, td, S))
    sig = torch.sigmoid(t.detach()).masked_fill(~counted, 0.0)
    lse_out = lse_row.detach().masked_fill(~has_row, float("-inf"))
    if global_partition:
        coef = sig.sum().reshape(1) / max(npos, 1)
        share = counted.sum().reshape(1) / max(npos, 1)
        lse_out = lse_out[:1]
    else:
        coef = sig.sum(1) / max(npos, 1)
        share = counted.sum(1) / max(npos, 1)
    return dict(loss=loss.detach(), lse=lse_out, coef=coef, dx=dx, dy=dy, dtemperature=dt, G=G, z=z.detach(),
                share=share.double())


def tolerances(ref, d, tau, dtype):
    """Worst-case absolute error bounds, per element, from the reference's own magnitudes (unit-norm rows).

    * a logit z = s/τ: the fp32 dot of d terms is off by <= d·u·Σ|x_k y_k| <= d·u (Cauchy-Schwarz; fp16 products
      are exact in fp32, so the same for fp16 inputs), then 1/τ (<= 2 ulp) and one multiply: dz = (d + 3)·u/τ.
    * an LSE: a softmax-weighted average of logit errors (<= dz), exp2 argument rounding (2u·|z| <= 2u/τ), and the
      fp32 sum of at most n = B + M + 8 partial terms in a fixed order (n·u, absolute in the log): dl.
    * softplus / sigmoid are 1- / 0.25-Lipschitz in t = lse − z: the loss moves by <= dz + dl, coef (row i) by
      (dz + dl)·(its positives / |P|), plus their own fp32 sums (n·u relative).
    * W = dL/dz has a relative error <= e_w = 2(dz + dl) + (n + 8)·u (sigmoid or exp of a shifted logit, times
      coef, itself relative-accurate to dz + dl + n·u). dx_i = Σ_j G_ij y_j with |y_j| = 1 is then off by
      <= (e_w + n·u)·Σ_j |G_ij| (fp16: one 2^-11 rounding of W for the tensor cores, one of the fp16 result);
      dy the same over the columns; dτ = -τ⁻¹ Σ G_ij s_ij by <= (e_w + n·u)·Σ|G s|/τ + Σ|G|·(d + 3)·u/τ.
    """
    B, M = ref["G"].shape
    n = B + M + 8
    dz = (d + 3) * U32 / tau
    dl = dz + 2 * U32 / tau + n * U32
    e_w = 2 * (dz + dl) + (n + 8) * U32
    absG = ref["G"].abs()
    w16 = U16 if dtype == torch.float16 else 0.0
    out16 = U16 if dtype == torch.float16 else 0.0
    S = ref["z"] * tau
    return dict(
        loss=dz + dl + n * U32 * ref["loss"].abs(),
        lse=torch.full_like(ref["lse"], dl),
        coef=(dz + dl) * ref["share"] + n * U32 * ref["coef"],
        dx=((e_w + n * U32 + w16) * absG.sum(1))[:, None] + out16 * ref["dx"].abs(),
        dy=((e_w + n * U32 + w16) * absG.sum(0))[:, None] + out16 * ref["dy"].abs(),
        dtemperature=((e_w + n * U32) * (absG * S.abs()).sum() + absG.sum() * (d + 3) * U32) / tau,
    )


def assert_close(name, actual, expected, atol):
    """|actual − expected| <= atol elementwise (atol broadcasts); infinities must match exactly."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.double().cpu()
    assert not torch.isnan(a).any(), f"{name}: NaN left (unwritten poisoned output or NaN result)"
    inf = torch.isinf(expected)
    assert torch.equal(torch.isinf(a), inf) and torch.equal(a[inf], expected[inf]), f"{name}: infinities differ"
    err = torch.where(inf, 0.0, a - expected).abs()
    bound = torch.as_tensor(atol, dtype=torch.float64).expand_as(err)
    worst = (err - bound).argmax() if err.numel() else None
    assert err.numel() == 0 or bool((err <= bound).all()), (
        f"{name}: error {err.reshape(-1)[worst]:.3e} > tolerance {bound.reshape(-1)[worst]:.3e} at flat index {worst}")


# (B, M, d, mode, labels, global, tau, num_splits): every B in {1, 2, 5, 37, 70} and d in {1, 3, 16, 129}, each
# mode with both partitions, partial tiles everywhere, forced column splits, the edge label patterns.
FP32_CASES = [
    (1, 1, 1, "self", "dup", True, 0.1, None),
    (1, 3, 3, "cross", "dup", False, 0.1, None),
    (2, 2, 16, "pair", None, True, 0.1, None),
    (2, 5, 129, "cross", "one", False, 0.05, None),
    (5, 5, 1, "self", "dup", False, 0.07, None),
    (5, 5, 3, "self", "distinct", True, 0.1, None),
    (37, 37, 16, "self", "dup", True, 0.1, 2),
    (37, 37, 3, "self", "one", False, 0.1, None),
    (37, 37, 129, "pair", None, False, 0.5, 2),
    (37, 70, 3, "cross", "ties", True, 0.05, 3),
    (70, 70, 129, "self", "ties", False, 0.1, None),
    (70, 37, 16, "cross", "dup", False, 0.1, 2),
    (70, 70, 1, "pair", None, True, 0.05, None),
    (70, 130, 16, "cross", "dup", True, 0.1, None),
    (70, 70, 3, "self", "distinct", False, 0.2, 2),
    (37, 50, 16, "cross", "absent", False, 0.1, None),
    (37, 50, 3, "cross", "absent", True, 0.1, 2),
]
FP16_CASES = [
    (5, 7, 3, "cross", "dup", True, 0.1, None),
    (37, 37, 129, "self", "dup", False, 0.05, 2),
    (70, 70, 16, "pair", None, True, 0.1, None),
    (70, 37, 16, "cross", "ties", False, 0.1, 2),
]


def _case_id(case):
    B, M, d, mode, lab, glob, tau, ns = case
    return f"B{B}-M{M}-d{d}-{mode}-{lab or 'pairs'}-{'xe' if glob else 'ntxent'}-tau{tau}-splits{ns or 'auto'}"


def _run_and_compare(dtype, case):
    B, M, d, mode, labels_mode, glob, tau, ns = case
    x, y, labels, ref_labels = make_inputs(B, M, d, mode, labels_mode, dtype)
    self_mode = mode == "self"
    t = torch.tensor(tau, dtype=torch.float32, device=DEVICE)
    g = torch.tensor(0.75, dtype=torch.float32, device=DEVICE)
    loss, lse, coef = xent.fwd_impl(x, y, labels, ref_labels, t, glob, self_mode, num_splits=ns)
    dx, dy, dt = xent.bwd_impl(g, x, y, labels, ref_labels, t, glob, self_mode, lse, coef, num_splits=ns)
    ref = reference(x, y, labels, ref_labels, tau, glob, self_mode, 0.75)
    tol = tolerances(ref, d, tau, dtype)
    assert loss.dtype == lse.dtype == coef.dtype == dt.dtype == torch.float32
    assert dx.dtype == dy.dtype == dtype and dx.shape == x.shape and dy.shape == y.shape
    for name, value in (("loss", loss), ("lse", lse), ("coef", coef), ("dx", dx), ("dy", dy), ("dtemperature", dt)):
        assert_close(name, value, ref[name], tol[name])
    if labels_mode in ("one", "distinct") or (mode == "self" and B == 1):  # empty P or N: exactly 0
        assert loss.item() == 0.0 and not dx.double().abs().max() and not dy.double().abs().max() and dt.item() == 0


@pytest.mark.parametrize("case", FP32_CASES, ids=_case_id)
def test_fp32_matches_float64_contract(case):
    _run_and_compare(torch.float32, case)


@pytest.mark.parametrize("case", FP16_CASES, ids=_case_id)
def test_fp16_matches_float64_contract(case):
    _run_and_compare(torch.float16, case)


def test_registered_ops_deterministic_and_fully_written():
    """The torch.ops entry points: same results as the reference, bitwise repeatable, every output written."""
    for glob in (True, False):
        x, y, labels, ref_labels = make_inputs(37, 50, 16, "cross", "dup", torch.float32, seed=3)
        t = torch.tensor(0.05, device=DEVICE)
        g = torch.tensor(1.0, device=DEVICE)
        outs = []
        for _ in range(2):
            fwd = torch.ops.flashdml_triton.xent_fwd(x, y, labels, ref_labels, t, glob, False, False)
            bwd = torch.ops.flashdml_triton.xent_bwd(g, x, y, labels, ref_labels, t, glob, False, False, fwd[1],
                                                     fwd[2])
            outs.append(fwd + bwd)
        for a, b in zip(*outs):
            assert not torch.isnan(a).any()
            assert torch.equal(a, b)
        ref = reference(x, y, labels, ref_labels, 0.05, glob, False, 1.0)
        tol = tolerances(ref, 16, 0.05, torch.float32)
        for i, name in enumerate(("loss", "lse", "coef", "dx", "dy", "dtemperature")):
            assert_close(name, outs[0][i], ref[name], tol[name])


def test_fake_impls_match_real_shapes():
    x, y, labels, ref_labels = make_inputs(5, 7, 3, "cross", "dup", torch.float16)
    t = torch.tensor(0.1, device=DEVICE)
    from torch._subclasses.fake_tensor import FakeTensorMode

    for glob, norm in ((False, False), (True, False), (True, True)):
        real = torch.ops.flashdml_triton.xent_fwd(x, y, labels, ref_labels, t, glob, False, norm)
        rb = torch.ops.flashdml_triton.xent_bwd(t, x, y, labels, ref_labels, t, glob, False, norm, real[1], real[2])
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx, fy, fl, fr, ft = (mode.from_tensor(v) for v in (x, y, labels, ref_labels, t))
            f = torch.ops.flashdml_triton.xent_fwd(fx, fy, fl, fr, ft, glob, False, norm)
            b = torch.ops.flashdml_triton.xent_bwd(ft, fx, fy, fl, fr, ft, glob, False, norm, f[1], f[2])
        assert [(v.shape, v.dtype) for v in f] == [(v.shape, v.dtype) for v in real]
        assert [(v.shape, v.dtype) for v in b] == [(v.shape, v.dtype) for v in rb]


def test_rejects_bad_inputs():
    x, y, labels, ref_labels = make_inputs(5, 7, 3, "cross", "dup", torch.float32)
    t = torch.tensor(0.1, device=DEVICE)
    with pytest.raises(RuntimeError, match="same d"):
        xent.fwd_impl(x, y[:, :2].contiguous(), labels, ref_labels, t, True, False)
    with pytest.raises(RuntimeError, match="dtypes"):
        xent.fwd_impl(x, y.half(), labels, ref_labels, t, True, False)
    with pytest.raises(RuntimeError, match="ref_labels"):
        xent.fwd_impl(x, y, labels, labels, t, True, False)
    with pytest.raises(RuntimeError, match="self_mode"):
        xent.fwd_impl(x, y, labels, ref_labels, t, True, True)


def test_opcheck():
    """Schema, fake (meta) implementations and autograd registration of the raw ops. (test_aot_dispatch_dynamic
    needs traceable kernels, which interpreted ones are not; it belongs to a GPU run.)"""
    x, y, labels, ref_labels = make_inputs(5, 7, 3, "cross", "dup", torch.float32)
    t = torch.tensor(0.1, device=DEVICE)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    if not INTERPRET:
        utils += ("test_aot_dispatch_dynamic",)
    for glob, norm in ((False, False), (True, False), (True, True)):
        fwd = torch.ops.flashdml_triton.xent_fwd.default
        torch.library.opcheck(fwd, (x, y, labels, ref_labels, t, glob, False, norm), test_utils=utils)
        _, lse, coef = fwd(x, y, labels, ref_labels, t, glob, False, norm)
        torch.library.opcheck(torch.ops.flashdml_triton.xent_bwd.default,
                              (torch.tensor(1.0, device=DEVICE), x, y, labels, ref_labels, t, glob, False, norm, lse,
                               coef), test_utils=utils)


def recorded_launches(module, monkeypatch, run):
    """Run ``run()`` with ``module.wrap_triton`` replaced by a recorder: returns [(kernel, args, kwargs)]."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    monkeypatch.setattr(module, "wrap_triton", Recorder)
    run()
    return launches


def assert_launches_have_specs(launches):
    """Every launch matches an AOT spec of some kernel module (types, constexprs, warps, stages), so the kernels
    compiled and resource-checked by tests/test_triton_aot.py are the ones production launches."""
    from flashdml.triton_kernels import _aot

    types = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
             torch.int64: "*i64", torch.int32: "*i32"}

    def ttype(v):
        if isinstance(v, torch.Tensor):
            return types[v.dtype]
        assert not isinstance(v, bool), "bool runtime argument"
        return "i32" if isinstance(v, int) else "fp32"

    specs = _aot.all_specs()
    assert launches
    for kernel, args, kwargs in launches:
        fn = _aot._jit_function(kernel)
        signature = {k: ttype(v) for k, v in zip(fn.arg_names, args)}
        constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        assert any(_aot._jit_function(s.kernel) is fn and s.constexprs == constexprs and s.signature == signature
                   and s.num_warps == kwargs["num_warps"] and s.num_stages == kwargs["num_stages"] for s in specs), \
            f"no AOT spec for {fn.__name__} with {signature} {kwargs}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("glob", [False, True])
def test_specs_cover_launches(dtype, glob, monkeypatch):
    B, M, d = 40, 70, 48
    x, y = torch.zeros(B, d, dtype=dtype), torch.zeros(M, d, dtype=dtype)
    lab, ref = torch.zeros(B, dtype=torch.int64), torch.zeros(M, dtype=torch.int64)
    t = torch.tensor(0.1)
    n = 1 if glob else B

    def run():
        xent.fwd_impl(x, y, lab, ref, t, glob, False)
        xent.fwd_impl(x, x, lab, lab, t, glob, True)
        xent.bwd_impl(t, x, y, lab, ref, t, glob, False, torch.zeros(n), torch.zeros(n))

    assert_launches_have_specs(recorded_launches(xent, monkeypatch, run))


def test_pow2_prescale():
    """The gradient prescale maps the largest |W| into (2^13, 2^14] with an exact power of two, down to tiny bounds
    (|P| ~ 2^60) where a fixed 2^14 would flush every fp16 weight; 0 gives 1."""
    from flashdml.triton_kernels import _tiles

    for bound in (1.0, 0.75, 2.0**-30, 3e-19, 1.0 / 3.0, 5.0):
        p = _tiles.pow2_prescale(torch.tensor(bound, dtype=torch.float64)).item()
        assert p == 2.0 ** round(math.log2(p)) and 2.0**13 < p * bound <= 2.0**14, (bound, p)
    assert _tiles.pow2_prescale(torch.tensor(0.0)).item() == 1.0


@pytest.mark.parametrize("mode", ["self", "cross"])
@pytest.mark.parametrize("glob", [False, True])
def test_normalize_flag_on_raw_rows(mode, glob):
    """normalize=True on raw rows (norms 1e-3 .. 1e3, one x row below the 1e-12 clamp; self mode: y is x, one
    tensor in both slots): every forward output and dτ are bitwise those of normalize=False on the op's own
    normalised rows (flashdml._math.normalized_rows), and the gradients with respect to the raw rows (self mode:
    the sum of the two slots, as autograd adds them) match autograd through flashdml.reference in float64. Bounds:
    this module's ``tolerances`` at tests/helpers.py ``normalization_d``, mapped by ``raw_row_grad_tolerance``."""
    import flashdml
    from flashdml._math import normalized_rows

    B, M, d, tau = 37, 50, 16, 0.1
    self_mode = mode == "self"
    xu, yu, labels, ref_labels = make_inputs(B, M, d, mode, "dup", torch.float64, seed=11)
    x = varied_norm_rows(xu, 1, tiny_row=True)
    y = x if self_mode else varied_norm_rows(yu, 2)
    xh = normalized_rows(x)[0]
    yh = xh if self_mode else normalized_rows(y)[0]
    t = torch.tensor(tau, device=DEVICE)
    g = torch.tensor(0.75, device=DEVICE)
    ops = torch.ops.flashdml_triton
    fwd = ops.xent_fwd(x, y, labels, ref_labels, t, glob, self_mode, True)
    fwd_hat = ops.xent_fwd(xh, yh, labels, ref_labels, t, glob, self_mode, False)
    for a, b in zip(fwd, fwd_hat):
        assert torch.equal(a, b)
    dx, dy, dt = ops.xent_bwd(g, x, y, labels, ref_labels, t, glob, self_mode, True, fwd[1], fwd[2])
    gx, gy, dt_hat = ops.xent_bwd(g, xh, yh, labels, ref_labels, t, glob, self_mode, False, fwd[1], fwd[2])
    assert torch.equal(dt, dt_hat)
    assert dx.dtype == dy.dtype == torch.float32 and dx.shape == x.shape and dy.shape == y.shape

    xd = x.double().cpu().requires_grad_()
    yd = None if self_mode else y.double().cpu().requires_grad_()
    td = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    lab, rlab = labels.cpu(), None if self_mode else ref_labels.cpu()
    if glob:
        loss = flashdml.reference.cross_example_softmax(xd, yd, lab, rlab, temperature=td, normalize=True)
    else:
        loss = flashdml.reference.ntxent(xd, lab, yd, rlab, temperature=td, normalize=True)
    grads = torch.autograd.grad(loss * 0.75, [v for v in (xd, yd, td) if v is not None])
    # error bounds of the kernels on x̂: this module's contract model on the exact x / ‖x‖
    ref = reference(exact_unit_rows(x), exact_unit_rows(y), labels, ref_labels, tau, glob, self_mode, 0.75)
    tol = tolerances(ref, normalization_d(d), tau, torch.float32)
    assert_close("loss", fwd[0], loss.detach().reshape(()), tol["loss"])
    assert_close("dtemperature", dt, grads[-1], tol["dtemperature"])
    tol_x = raw_row_grad_tolerance(tol["dx"], gx, x)
    tol_y = raw_row_grad_tolerance(tol["dy"], gy, y)
    if self_mode:
        assert_rows_close("dx + dy", dx + dy, grads[0], tol_x + tol_y)
    else:
        assert_rows_close("dx", dx, grads[0], tol_x)
        assert_rows_close("dy", dy, grads[1], tol_y)
