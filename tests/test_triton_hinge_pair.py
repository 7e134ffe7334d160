"""Numerics of the Triton hinge-pair kernels (Threshold-Consistent Margin docs/spec.md §2.3, margin contrastive docs/spec.md §2.4)
against a dense float64 computation of the raw-op contract (L2-normalised inputs, labels as int64 tensors).

Without a GPU the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 must be set before any
kernel is defined: tests/conftest.py does it; set it in the shell when running this file alone). Production tile
configurations: partial tiles, several row / column / d blocks, column splits. Two kinds of data: random unit rows
(checked to keep every similarity clear of the margins by more than the fp32 dot error, so the hard sets are not
ambiguous) and "exact" rows with entries in {0, ±1/2, ±1}, whose similarities (in {0, ±1/2, ±1}) are exact in every
precision and fall exactly on the margins: inclusive vs strict and the diagonal rules are then tested bit for bit.
bf16 is tested in tests/test_triton_tensor_core_numerics.py (the plain interpreter's bf16 ``tl.dot`` is broken, see
docs/verification.md).
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

import flashdml  # noqa: E402
from flashdml.triton_kernels import hinge_pair as hpk  # noqa: E402
from helpers import (  # noqa: E402
    assert_rows_close, exact_unit_rows, normalization_d, raw_row_grad_tolerance, varied_norm_rows)

U32 = 2.0**-24
U16 = 2.0**-11
MAX_BLOCK_N = 128  # widest S tile of the forward (fp16); the fp32 row sums of one tile have at most this many terms


@pytest.fixture(autouse=True)
def poisoned(poison_triton_outputs):
    return poison_triton_outputs  # conftest.py


def _exact_rows(n, d, g):
    """Unit rows with entries in {0, ±1/2, ±1} (d >= 4: also four halves), so every dot product is exact."""
    choices = [torch.eye(d, dtype=torch.float64)[k] for k in range(min(d, 4))]
    if d >= 4:
        h = torch.zeros(d, dtype=torch.float64)
        h[:4] = 0.5
        choices += [h, h * torch.tensor([1, 1, 1, -1] + [0] * (d - 4), dtype=torch.float64),
                    h * torch.tensor([1, -1, 1, -1] + [0] * (d - 4), dtype=torch.float64)]
    choices += [-c for c in choices]
    idx = torch.randint(0, len(choices), (n,), generator=g)
    return torch.stack([choices[i] for i in idx])


def make_inputs(B, M, d, mode, labels_mode, exact, dtype, seed=0):
    """mode: "self" (y is x), "cross", "pair" (labels = ref_labels = arange, M = B). labels_mode: "dup" (classes
    of ~3), "one" (no negatives), "distinct" (no positives apart from the diagonal in self mode), "absent" (cross:
    label sets overlap only partly)."""
    g = torch.Generator().manual_seed(seed + 1000 * B + 7 * M + d)
    if mode != "cross":
        M = B
    if exact:
        x, y = _exact_rows(B, d, g), _exact_rows(M, d, g)
    else:
        x = torch.nn.functional.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
        y = torch.nn.functional.normalize(torch.randn(M, d, generator=g, dtype=torch.float64), dim=1)
    ncls = max(2, B // 3)
    if mode == "pair":
        labels = ref_labels = torch.arange(B)
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


def _f32(v):
    return float(np.float32(v))


class Ambiguous(Exception):
    """Random test data with a similarity within rounding of a margin."""


def clear_inputs(B, M, d, mode, labels_mode, exact, dtype, mp, mn, seed=0):
    """make_inputs, moving to the next seed (deterministically) while a similarity of a positive pair lies within
    2(d + 2)·u of m+ or one of a negative pair within that of m− (the fp32 kernels could then classify it either
    way). Exact data is never ambiguous: its similarities are exact."""
    for s in range(seed, seed + 20):
        x, y, labels, ref_labels = make_inputs(B, M, d, mode, labels_mode, exact, dtype, seed=s)
        if exact:
            return x, y, labels, ref_labels
        S = x.double().cpu() @ y.double().cpu().T
        same = labels.cpu()[:, None] == ref_labels.cpu()[None, :]
        eps = 2 * (d + 2) * U32
        near = (((S - _f32(mp)).abs() <= eps) & same) | (((S - _f32(mn)).abs() <= eps) & ~same)
        if not near.any():
            return x, y, labels, ref_labels
    raise Ambiguous(f"no clear seed for B={B} M={M} d={d}")


def reference(x, y, labels, ref_labels, mp, mn, wp, wn, drop_diagonal, strict, grad_loss):
    """The contract in float64 on the (dtype-rounded) inputs, margins rounded to fp32 as the kernels see them
    (inputs from clear_inputs: no similarity within rounding of a margin unless it is exact)."""
    mp, mn = _f32(mp), _f32(mn)
    xd = x.double().cpu().requires_grad_()
    yd = y.double().cpu().clone().requires_grad_()
    S = xd @ yd.T
    Sd = S.detach()
    same = labels.cpu()[:, None] == ref_labels.cpu()[None, :]
    keep = torch.ones_like(same)
    if drop_diagonal:
        keep &= ~torch.eye(len(labels), dtype=torch.bool)
    hp = same & keep & ((Sd < mp) if strict else (Sd <= mp))
    hn = ~same & keep & ((Sd > mn) if strict else (Sd >= mn))
    cp, cn = int(hp.sum()), int(hn.sum())
    pos_sum, neg_sum = (mp - S)[hp].sum(), (S - mn)[hn].sum()
    loss = (wp * pos_sum / cp if cp else 0 * S.sum()) + (wn * neg_sum / cn if cn else 0 * S.sum())
    dx, dy, G = torch.autograd.grad(loss * grad_loss, (xd, yd, S))
    return dict(loss=loss.detach(), sums=torch.stack([pos_sum, neg_sum]).detach(), counts=torch.tensor([cp, cn]),
                dx=dx, dy=dy, G=G, hinges=((mp - Sd).abs()[hp].sum(), (Sd - mn).abs()[hn].sum()))


def tolerances(ref, d, wp, wn, dtype):
    """Worst-case absolute bounds. A similarity is off by <= d·u (fp32 dot of unit rows; fp16 products are exact
    in fp32), a hinge by that plus its own rounding (u·|h|); the fp32 sum of one tile row (<= MAX_BLOCK_N terms)
    adds MAX_BLOCK_N·u·Σ|h| (everything after it is fp64), the fp32 output one more u. The gradient constants
    ∓w/count are exact to one fp32 rounding (fp16: one 2^-11 rounding for the tensor cores); dx_i = Σ_j G_ij y_j
    (|y_j| = 1) then errs by <= (that + n·u)·Σ_j |G_ij| with n = B + M fp32 additions (+ 2^-11·|dx| for the fp16
    result). Exact data: every similarity and hinge is exact, only the sums' rounding remains."""
    B, M = ref["G"].shape
    c = ref["counts"].double()
    hs = torch.stack(ref["hinges"])
    sums = c * d * U32 + (MAX_BLOCK_N + 3) * U32 * hs
    per = torch.where(c > 0, sums / c.clamp_min(1), 0.0)
    loss = abs(wp) * per[0] + abs(wn) * per[1] + 2 * U32 * ref["loss"].abs()
    rel = U32 + (B + M + 8) * U32 + (U16 if dtype == torch.float16 else 0.0)
    out16 = U16 if dtype == torch.float16 else 0.0
    absG = ref["G"].abs()
    return dict(loss=loss, sums=sums, dx=(rel * absG.sum(1))[:, None] + out16 * ref["dx"].abs(),
                dy=(rel * absG.sum(0))[:, None] + out16 * ref["dy"].abs())


def assert_close(name, actual, expected, atol):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.double().cpu()
    assert not torch.isnan(a).any(), f"{name}: NaN left (unwritten poisoned output or NaN result)"
    err = (a - expected).abs()
    bound = torch.as_tensor(atol, dtype=torch.float64).expand_as(err)
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), \
        f"{name}: error {err.reshape(-1)[worst]:.3e} > tolerance {bound.reshape(-1)[worst]:.3e} at flat index {worst}"


# (B, M, d, mode, labels, exact, loss, (m+, m-), num_splits). loss "tcm": drop_diagonal = self mode, inclusive,
# weights (0.8, 1.3); "con": contrastive, keeps the diagonal, strict, weights 1.
FP32_CASES = [
    (1, 1, 1, "self", "dup", True, "tcm", (0.5, 0.5), None),
    (1, 3, 3, "cross", "dup", False, "con", (0.3, 0.1), None),
    (2, 2, 16, "pair", None, True, "tcm", (0.5, 0.0), None),
    (2, 5, 129, "cross", "one", False, "tcm", (0.3, 0.1), None),
    (5, 5, 1, "self", "dup", True, "con", (1.0, -1.0), None),
    (5, 5, 4, "self", "distinct", True, "tcm", (0.5, 0.5), None),
    (37, 37, 16, "self", "dup", True, "tcm", (0.5, 0.5), 2),
    (37, 37, 16, "self", "dup", True, "con", (0.5, 0.5), 2),
    (37, 37, 3, "self", "one", False, "con", (0.3, 0.1), None),
    (37, 37, 129, "pair", None, False, "con", (0.2, 0.05), 2),
    (37, 70, 3, "cross", "dup", False, "tcm", (0.3, 0.1), 3),
    (70, 70, 129, "self", "dup", False, "tcm", (0.3, 0.1), None),
    (70, 37, 16, "cross", "dup", True, "con", (1.0, 0.0), 2),
    (70, 70, 4, "pair", None, True, "tcm", (0.5, -0.5), None),
    (70, 130, 16, "cross", "dup", False, "con", (0.3, 0.1), None),
    (70, 70, 3, "self", "distinct", False, "tcm", (-2.0, 2.0), 2),  # no hard pair at all: loss 0, no gradient
    (37, 50, 16, "cross", "absent", True, "tcm", (0.5, 0.5), None),
]
FP16_CASES = [
    (5, 7, 3, "cross", "dup", False, "tcm", (0.3, 0.1), None),
    (37, 37, 129, "self", "dup", False, "con", (0.3, 0.1), 2),
    (70, 70, 16, "self", "dup", True, "tcm", (0.5, 0.5), None),
    (70, 37, 16, "cross", "dup", True, "con", (0.5, 0.0), 2),
]


def _case_id(case):
    B, M, d, mode, lab, exact, loss, (mp, mn), ns = case
    return f"B{B}-M{M}-d{d}-{mode}-{lab or 'pairs'}-{'exact' if exact else 'rand'}-{loss}-m{mp}_{mn}-s{ns or 'auto'}"


def _flags(loss, mode):
    if loss == "tcm":
        return dict(pos_weight=0.8, neg_weight=1.3, drop_diagonal=mode == "self", strict=False)
    return dict(pos_weight=1.0, neg_weight=1.0, drop_diagonal=False, strict=True)


def _run_and_compare(dtype, case):
    B, M, d, mode, labels_mode, exact, which, (mp, mn), ns = case
    x, y, labels, ref_labels = clear_inputs(B, M, d, mode, labels_mode, exact, dtype, mp, mn)
    f = _flags(which, mode)
    args = (mp, mn, f["pos_weight"], f["neg_weight"], f["drop_diagonal"], f["strict"])
    g = torch.tensor(0.75, device=DEVICE)
    loss, sums, counts = hpk.fwd_impl(x, y, labels, ref_labels, *args, num_splits=ns)
    dx, dy = hpk.bwd_impl(g, x, y, labels, ref_labels, *args, counts, num_splits=ns)
    ref = reference(x, y, labels, ref_labels, *args, 0.75)
    tol = tolerances(ref, d, f["pos_weight"], f["neg_weight"], dtype)
    assert loss.dtype == sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert dx.dtype == dy.dtype == dtype and dx.shape == x.shape and dy.shape == y.shape
    assert torch.equal(counts.cpu(), ref["counts"]), f"counts {counts.tolist()} != {ref['counts'].tolist()}"
    for name, value in (("loss", loss), ("sums", sums), ("dx", dx), ("dy", dy)):
        assert_close(name, value, ref[name], tol[name])
    if int(ref["counts"].sum()) == 0:
        assert loss.item() == 0.0 and not dx.double().abs().max() and not dy.double().abs().max()


@pytest.mark.parametrize("case", FP32_CASES, ids=_case_id)
def test_fp32_matches_float64_contract(case):
    _run_and_compare(torch.float32, case)


@pytest.mark.parametrize("case", FP16_CASES, ids=_case_id)
def test_fp16_matches_float64_contract(case):
    _run_and_compare(torch.float16, case)


@pytest.mark.parametrize("which", ["tcm", "con"])
def test_matches_flashdml_reference(which):
    """Same semantics as flashdml.reference (which normalises the already-unit rows again: a rounding-level change)
    in self mode, where TCM drops and the contrastive loss keeps the diagonal."""
    x, _, labels, _ = clear_inputs(37, 37, 16, "self", "dup", False, torch.float32, 0.3, 0.1, seed=5)
    f = _flags(which, "self")
    out = hpk.fwd_impl(x, x, labels, labels, 0.3, 0.1, f["pos_weight"], f["neg_weight"], f["drop_diagonal"],
                       f["strict"])[0]
    if which == "tcm":
        want = flashdml.reference.threshold_consistent_margin(x.double().cpu(), labels.cpu(), pos_margin=0.3,
                                                              neg_margin=0.1, pos_weight=0.8, neg_weight=1.3)
    else:
        want = flashdml.reference.contrastive_margin(x.double().cpu(), labels.cpu(), pos_margin=0.3, neg_margin=0.1)
    assert abs(out.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))


def test_registered_ops_deterministic_and_fully_written():
    x, y, labels, ref_labels = clear_inputs(37, 50, 16, "cross", "dup", False, torch.float32, 0.3, 0.1, seed=3)
    g = torch.tensor(1.0, device=DEVICE)
    outs = []
    for _ in range(2):
        fwd = torch.ops.flashdml_triton.hinge_pair_fwd(x, y, labels, ref_labels, 0.3, 0.1, 0.8, 1.3, False, False,
                                                       False)
        bwd = torch.ops.flashdml_triton.hinge_pair_bwd(g, x, y, labels, ref_labels, 0.3, 0.1, 0.8, 1.3, False,
                                                       False, False, fwd[2])
        outs.append(fwd + bwd)
    for a, b in zip(*outs):
        assert torch.equal(a, b) and not (a.is_floating_point() and torch.isnan(a).any())
    ref = reference(x, y, labels, ref_labels, 0.3, 0.1, 0.8, 1.3, False, False, 1.0)
    tol = tolerances(ref, 16, 0.8, 1.3, torch.float32)
    assert torch.equal(outs[0][2].cpu(), ref["counts"])
    for i, name in ((0, "loss"), (1, "sums"), (3, "dx"), (4, "dy")):
        assert_close(name, outs[0][i], ref[name], tol[name])


def test_fake_impls_match_real_shapes():
    x, y, labels, ref_labels = make_inputs(5, 7, 3, "cross", "dup", False, torch.float16)
    from torch._subclasses.fake_tensor import FakeTensorMode

    for norm in (False, True):
        args = (0.3, 0.1, 1.0, 1.0, False, True, norm)
        real = torch.ops.flashdml_triton.hinge_pair_fwd(x, y, labels, ref_labels, *args)
        rb = torch.ops.flashdml_triton.hinge_pair_bwd(real[0], x, y, labels, ref_labels, *args, real[2])
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx, fy, fl, fr = (mode.from_tensor(v) for v in (x, y, labels, ref_labels))
            f = torch.ops.flashdml_triton.hinge_pair_fwd(fx, fy, fl, fr, *args)
            b = torch.ops.flashdml_triton.hinge_pair_bwd(f[0], fx, fy, fl, fr, *args, f[2])
        assert [(v.shape, v.dtype) for v in f] == [(v.shape, v.dtype) for v in real]
        assert [(v.shape, v.dtype) for v in b] == [(v.shape, v.dtype) for v in rb]


def test_rejects_bad_inputs():
    x, y, labels, ref_labels = make_inputs(5, 7, 3, "cross", "dup", False, torch.float32)
    with pytest.raises(RuntimeError, match="drop_diagonal"):
        hpk.fwd_impl(x, y, labels, ref_labels, 0.3, 0.1, 1.0, 1.0, True, False)
    with pytest.raises(RuntimeError, match="dtypes"):
        hpk.fwd_impl(x, y.half(), labels, ref_labels, 0.3, 0.1, 1.0, 1.0, False, False)
    with pytest.raises(RuntimeError, match="ref_labels"):
        hpk.fwd_impl(x, y, labels, labels, 0.3, 0.1, 1.0, 1.0, False, False)


def test_opcheck():
    """Schema, fake implementations and autograd registration of the raw ops (test_aot_dispatch_dynamic needs a
    GPU: interpreted kernels are not traceable)."""
    x, y, labels, ref_labels = make_inputs(5, 7, 3, "cross", "dup", False, torch.float32)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    if not INTERPRET:
        utils += ("test_aot_dispatch_dynamic",)
    for strict, norm in ((False, False), (True, False), (True, True)):
        args = (0.3, 0.1, 0.8, 1.3, False, strict, norm)
        torch.library.opcheck(torch.ops.flashdml_triton.hinge_pair_fwd.default, (x, y, labels, ref_labels, *args),
                              test_utils=utils)
        counts = torch.ops.flashdml_triton.hinge_pair_fwd(x, y, labels, ref_labels, *args)[2]
        torch.library.opcheck(torch.ops.flashdml_triton.hinge_pair_bwd.default,
                              (torch.tensor(1.0, device=DEVICE), x, y, labels, ref_labels, *args, counts),
                              test_utils=utils)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_specs_cover_launches(dtype, monkeypatch):
    from test_triton_xent import assert_launches_have_specs, recorded_launches

    B, M, d = 40, 70, 48
    x, y = torch.zeros(B, d, dtype=dtype), torch.zeros(M, d, dtype=dtype)
    lab, ref = torch.zeros(B, dtype=torch.int64), torch.zeros(M, dtype=torch.int64)

    def run():
        for drop, strict in ((False, True), (True, False)):
            yy, rr = (x, lab) if drop else (y, ref)
            hpk.fwd_impl(x, yy, lab, rr, 0.3, 0.1, 1.0, 1.0, drop, strict)
            hpk.bwd_impl(torch.tensor(1.0), x, yy, lab, rr, 0.3, 0.1, 1.0, 1.0, drop, strict,
                         torch.ones(2, dtype=torch.int64))

    assert_launches_have_specs(recorded_launches(hpk, monkeypatch, run))


def _clear_raw_inputs(B, M, d, mode, mp, mn):
    """Raw fp32 rows (norms 1e-3 .. 1e3, one x row below the 1e-12 clamp; self mode: y is x) whose similarities on
    the exact x / ‖x‖ keep 2·normalization_d(d)·u away from the margin their pair is tested against: the op's fp32
    similarity (the dot error plus the normalisation's rounding, <= normalization_d(d)·u) then selects the same
    hard pairs as the float64 reference. Next seed (deterministically) otherwise."""
    eps = 2 * normalization_d(d) * U32
    for seed in range(20):
        xu, yu, labels, ref_labels = make_inputs(B, M, d, mode, "dup", False, torch.float64, seed=seed)
        x = varied_norm_rows(xu, 10 + seed, tiny_row=True)
        y = x if mode == "self" else varied_norm_rows(yu, 50 + seed)
        S = exact_unit_rows(x) @ exact_unit_rows(y).T
        same = labels.cpu()[:, None] == ref_labels.cpu()[None, :]
        near = ((((S - _f32(mp)).abs() <= eps) | ((S - mp).abs() <= eps)) & same) | \
            ((((S - _f32(mn)).abs() <= eps) | ((S - mn).abs() <= eps)) & ~same)
        if not near.any():
            return x, y, labels, ref_labels
    raise Ambiguous(f"no clear seed for B={B} M={M} d={d}")


@pytest.mark.parametrize("which,mode", [("tcm", "self"), ("con", "self"), ("tcm", "cross"), ("con", "cross")])
def test_normalize_flag_on_raw_rows(which, mode):
    """normalize=True on raw rows: the forward outputs are bitwise those of normalize=False on the op's own
    normalised rows (flashdml._math.normalized_rows), and the gradients with respect to the raw rows (self mode: the
    sum of the two slots, as autograd adds them) match autograd through flashdml.reference (TCM / margin
    contrastive, which always normalise) in float64. Bounds: this module's ``tolerances`` at tests/helpers.py
    ``normalization_d``, mapped by ``raw_row_grad_tolerance``."""
    from flashdml._math import normalized_rows

    B, M, d, mp, mn = 37, 50, 16, 0.3, 0.1
    x, y, labels, ref_labels = _clear_raw_inputs(B, M, d, mode, mp, mn)
    self_mode = mode == "self"
    xh = normalized_rows(x)[0]
    yh = xh if self_mode else normalized_rows(y)[0]
    f = _flags(which, mode)
    args = (mp, mn, f["pos_weight"], f["neg_weight"], f["drop_diagonal"], f["strict"])
    g = torch.tensor(0.75, device=DEVICE)
    ops = torch.ops.flashdml_triton
    fwd = ops.hinge_pair_fwd(x, y, labels, ref_labels, *args, True)
    fwd_hat = ops.hinge_pair_fwd(xh, yh, labels, ref_labels, *args, False)
    for a, b in zip(fwd, fwd_hat):
        assert torch.equal(a, b)
    dx, dy = ops.hinge_pair_bwd(g, x, y, labels, ref_labels, *args, True, fwd[2])
    gx, gy = ops.hinge_pair_bwd(g, xh, yh, labels, ref_labels, *args, False, fwd[2])
    assert dx.dtype == dy.dtype == torch.float32 and dx.shape == x.shape and dy.shape == y.shape

    xd = x.double().cpu().requires_grad_()
    yd = None if self_mode else y.double().cpu().requires_grad_()
    lab, rlab = labels.cpu(), None if self_mode else ref_labels.cpu()
    if which == "tcm":
        loss = flashdml.reference.threshold_consistent_margin(xd, lab, yd, rlab, pos_margin=mp, neg_margin=mn,
                                                              pos_weight=f["pos_weight"], neg_weight=f["neg_weight"])
    else:
        loss = flashdml.reference.contrastive_margin(xd, lab, yd, rlab, pos_margin=mp, neg_margin=mn)
    grads = torch.autograd.grad(loss * 0.75, [v for v in (xd, yd) if v is not None])
    # error bounds of the kernels on x̂: this module's contract model on the exact x / ‖x‖ (fp32 margins; the
    # reference's float64 margins move the loss by <= |w|·2^-25 (m <= 1), far inside the loss bound)
    ref = reference(exact_unit_rows(x), exact_unit_rows(y), labels, ref_labels, *args, 0.75)
    tol = tolerances(ref, normalization_d(d), f["pos_weight"], f["neg_weight"], torch.float32)
    assert torch.equal(fwd[2].cpu(), ref["counts"]), f"counts {fwd[2].tolist()} != {ref['counts'].tolist()}"
    assert int(ref["counts"].min()) > 0  # both terms (and their gradients) are exercised
    assert_close("loss", fwd[0], loss.detach().reshape(()), tol["loss"])
    tol_x = raw_row_grad_tolerance(tol["dx"], gx, x)
    tol_y = raw_row_grad_tolerance(tol["dy"], gy, y)
    if self_mode:
        assert_rows_close("dx + dy", dx + dy, grads[0], tol_x + tol_y)
    else:
        assert_rows_close("dx", dx, grads[0], tol_x)
        assert_rows_close("dy", dy, grads[1], tol_y)
