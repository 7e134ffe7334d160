"""Fused hinge-pair losses on the CPU — Threshold-Consistent Margin (docs/spec.md §2.3) and margin contrastive (docs/spec.md §2.4) —
against the reference (values and gradients, poisoned outputs), pytorch-metric-learning, exact ties at the
margins, empty sets, registration (opcheck, torch.compile) and memory."""
import os
import time

import pytest
import torch
import torch.nn.functional as F

import flashdml as fd
from flashdml import _dispatch
from flashdml.ops import registry
from flashdml._debug import poison_outputs
from flashdml.ops import hinge_pair as ml
from helpers import CPU_SHAPES, check_against_reference, clustered


# Tolerances (fp32 kernel vs float64 reference on the same fp32 inputs): every S entry carries a dot-product
# rounding error of at most ~d * 2^-24 (typically sqrt(d) * 2^-24 ~ 1e-7); the loss is a mean of such hinges
# (sums in double), the gradient a constant per hard pair. Margins are kept >= 4e-6 away from every similarity
# (_clear_margins) so fp32 and float64 select the same pairs; exact ties are tested separately on inputs whose
# similarities are exact in fp32.
RTOL, ATOL = 2e-5, 2e-6
LOSSES = {
    "threshold_consistent_margin": dict(pos_margin=0.6, neg_margin=0.05, pos_weight=1.3, neg_weight=0.6),
    "contrastive_margin": dict(pos_margin=0.7, neg_margin=0.0),
}
CROSS_SHAPES = [(1, 1, 1), (2, 5, 3), (37, 70, 129), (130, 1030, 16), (600, 513, 129), (1030, 70, 3)]


def test_public_api_routes_to_the_fused_ops():
    assert fd.threshold_consistent_margin is ml.threshold_consistent_margin
    assert fd.contrastive_margin is ml.contrastive_margin
    for op in (ml.TCM_OP, ml.CONTRASTIVE_OP):
        assert registry.family_of(op) is ml.FAMILY
        assert _dispatch.resolve(op, torch.device("cpu"), torch.float32) == "cpu"


def _similarities64(x, y=None):
    xs = F.normalize(x.double(), dim=1)
    ys = xs if y is None else F.normalize(y.double(), dim=1)
    return xs @ ys.T


def _clear_margins(kwargs, x, y=None, delta=4e-6):
    """kwargs with each margin moved to the nearest point that has no similarity within ``delta`` (there fp32 and
    float64 may legitimately select differently)."""
    s = torch.sort(_similarities64(x, y).reshape(-1)).values
    pts = torch.cat([s.new_tensor([-2.0]), s, s.new_tensor([2.0])])
    mids = ((pts[1:] + pts[:-1]) / 2)[(pts[1:] - pts[:-1]) > 2 * delta]
    out = dict(kwargs)
    for key in ("pos_margin", "neg_margin"):
        m = kwargs[key]
        if ((s - m).abs() < delta).any():
            out[key] = float(mids[(mids - m).abs().argmin()])
    return out


def _stats(x, y, labels, ref_labels, loss, kwargs):
    """The op's (loss, sums, counts) for a public-call configuration."""
    tcm = loss == "threshold_consistent_margin"
    self_mode = y is None
    yy = x if self_mode else y
    rl = labels if self_mode else ref_labels
    return torch.ops.flashdml.hinge_pair_fwd(
        x, yy, labels, rl, kwargs["pos_margin"], kwargs["neg_margin"], kwargs.get("pos_weight", 1.0),
        kwargs.get("neg_weight", 1.0), self_mode and tcm, not tcm, True)


def _mask_counts(S, labels, ref_labels, loss, kwargs, self_mode):
    """Exact hard-pair counts and hinge sums from a float64 S (the reference's masks)."""
    same = labels[:, None] == ref_labels[None, :]
    mp, mn = kwargs["pos_margin"], kwargs["neg_margin"]
    if loss == "threshold_consistent_margin":
        pos = same & (S <= mp)
        neg = ~same & (S >= mn)
        if self_mode:
            pos &= ~torch.eye(S.shape[0], dtype=torch.bool)
    else:
        pos, neg = same & (S < mp), ~same & (S > mn)
    return (int(pos.sum()), int(neg.sum())), ((mp - S)[pos].sum().item(), (S - mn)[neg].sum().item())


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("label_kind", ["classes", "pair"])
def test_self_mode_matches_reference(loss, label_kind):
    for i, (B, d) in enumerate(CPU_SHAPES):
        x, labels = clustered(B, d, n_classes=max(1, B // 5), seed=i)
        labels = None if label_kind == "pair" else labels
        kwargs = _clear_margins(LOSSES[loss], x)
        check_against_reference(loss, "cpu", dict(x=x, labels=labels), kwargs, grad_names=("x",), rtol=RTOL,
                                atol=ATOL)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("label_kind", ["classes", "pair", "absent_labels"])
def test_cross_mode_matches_reference(loss, label_kind):
    for i, (B, M, d) in enumerate(CROSS_SHAPES):
        if label_kind == "pair" and B != M:
            B = M = min(B, M) + 1
        x, labels = clustered(B, d, n_classes=max(1, B // 5), seed=i)
        y, ref_labels = clustered(M, d, n_classes=max(1, B // 5), seed=50 + i)
        if label_kind == "pair":
            labels = ref_labels = None
        elif label_kind == "absent_labels":  # rows whose label no reference has: only negative pairs
            labels = labels + max(1, B // 10)
        kwargs = _clear_margins(LOSSES[loss], x, y)
        check_against_reference(loss, "cpu", dict(x=x, labels=labels, y=y, ref_labels=ref_labels), kwargs,
                                rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_stats_outputs_are_exact_counts_and_sums(loss):
    x, labels = clustered(600, 24, 60, seed=3)
    y, ref_labels = clustered(700, 24, 60, seed=4)
    for yy, rl in ((None, None), (y, ref_labels)):
        kwargs = _clear_margins(LOSSES[loss], x, yy)
        with poison_outputs():
            _, sums, counts = _stats(x, yy, labels, rl, loss, kwargs)
        S = _similarities64(x, yy)
        want_counts, want_sums = _mask_counts(S, labels, labels if yy is None else rl, loss, kwargs, yy is None)
        assert counts.dtype == torch.int64 and tuple(counts.tolist()) == want_counts
        assert min(want_counts) > 0  # the case exercises both terms
        assert sums.dtype == torch.float32
        assert torch.allclose(sums.double(), torch.tensor(want_sums, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def _dyadic_rows(n, seed, scale=True):
    """Rows whose normalised pairwise cosines are exact in fp32 (multiples of 1/16), with many exact ties:
    permutations and sign flips of unit vectors with dyadic entries, times powers of two (norms exact)."""
    g = torch.Generator().manual_seed(seed)
    bases = torch.tensor([[1.0, 0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5, 0], [0.75, 0.5, 0.25, 0.25, 0.25]])
    rows = bases[torch.randint(0, 3, (n,), generator=g)]
    perm = torch.argsort(torch.rand(n, 5, generator=g), dim=1)
    rows = torch.gather(rows, 1, perm) * (torch.randint(0, 2, (n, 5), generator=g) * 2 - 1)
    if scale:
        rows = rows * 2.0 ** torch.randint(-1, 3, (n, 1), generator=g)
    return rows.float()


TIE_MARGINS = {
    "threshold_consistent_margin": [(0.75, 0.5), (0.5, 0.25), (1.0, 0.0), (0.875, -0.25)],
    "contrastive_margin": [(0.75, 0.5), (1.0, 0.5), (1.25, 0.875), (0.0, -0.5)],
}


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("mode", ["self", "cross"])
def test_exact_ties_at_the_margins(loss, mode):
    """Similarities exactly equal to a margin: inclusive (TCM) counts them, strict (contrastive) does not; the
    backward selects exactly what the forward counted. Includes duplicate rows (s = 1 exactly)."""
    x = _dyadic_rows(200, seed=1)
    labels = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(2))
    y = ref_labels = None
    if mode == "cross":
        y = _dyadic_rows(600, seed=3)  # two column tiles, the second ragged
        ref_labels = torch.randint(0, 4, (600,), generator=torch.Generator().manual_seed(4))
    S = _similarities64(x, y)
    assert torch.equal(S.float().double(), S)  # exact in fp32
    for mp, mn in TIE_MARGINS[loss]:
        kwargs = dict(pos_margin=mp, neg_margin=mn)
        assert all((S == m).any() for m in (mp, mn) if abs(m) <= 1)  # the ties this test is about occur
        check_against_reference(loss, "cpu", dict(x=x, labels=labels, y=y, ref_labels=ref_labels), kwargs,
                                grad_names=("x",) if y is None else ("x", "y"), rtol=RTOL, atol=ATOL)
        _, _, counts = _stats(x, y, labels, ref_labels, loss, kwargs)
        want, _ = _mask_counts(S, labels, labels if y is None else ref_labels, loss, kwargs, y is None)
        assert tuple(counts.tolist()) == want


@pytest.mark.parametrize("strict", [False, True])
def test_backward_selects_exactly_the_forward_pairs(strict):
    """With normalize=False and y = I, S = x and dx = G: the gradient is -w+/#hp on exactly the hard positives,
    +w-/#hn on exactly the hard negatives, 0 elsewhere (ties included)."""
    x = _dyadic_rows(300, seed=5, scale=False)
    y = torch.eye(5)
    labels = torch.randint(0, 2, (300,), generator=torch.Generator().manual_seed(6))
    ref_labels = torch.tensor([0, 1, 0, 1, 1])
    args = (x, y, labels, ref_labels, 0.5, 0.25, 1.5, 0.5, False, strict)
    loss, _, counts = torch.ops.flashdml.hinge_pair_fwd(*args, False)
    dx, dy = torch.ops.flashdml.hinge_pair_bwd(torch.tensor(2.0), *args, False, counts)
    same = labels[:, None] == ref_labels[None, :]
    hp = same & ((x < 0.5) if strict else (x <= 0.5))
    hn = ~same & ((x > 0.25) if strict else (x >= 0.25))
    assert counts.tolist() == [int(hp.sum()), int(hn.sum())] and min(counts.tolist()) > 0
    want = torch.zeros_like(x)
    want[hp] = -2.0 * 1.5 / int(hp.sum())
    want[hn] = 2.0 * 0.5 / int(hn.sum())
    assert torch.allclose(dx, want, rtol=1e-6, atol=0) and torch.equal(dx == 0, want == 0)


def test_known_value_from_pml_unit_test():
    from reference.test_reference_losses import _pml_tcm_batch

    x, labels = _pml_tcm_batch(torch.float32)
    with fd.backend("cpu"):
        tcm = fd.threshold_consistent_margin(x, labels, pos_margin=0.9, neg_margin=0.5)
        con = fd.contrastive_margin(x, labels, pos_margin=0.9, neg_margin=0.4)
    want = fd.reference.threshold_consistent_margin(x.double(), labels, pos_margin=0.9, neg_margin=0.5).item()
    assert tcm.item() == pytest.approx(want, abs=1e-6) and tcm.item() == pytest.approx(0.518, abs=5e-4)
    assert con.item() == pytest.approx(0.4866, abs=1e-4)
    assert (tcm + con).item() == pytest.approx(1.0045, abs=1e-4)
    check_against_reference("threshold_consistent_margin", "cpu", dict(x=x, labels=labels),
                            dict(pos_margin=0.9, neg_margin=0.5), grad_names=("x",), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("B,d,n_classes,seed", [(20, 6, 4, 0), (20, 6, 4, 1), (128, 32, 16, 2), (300, 64, 30, 3)])
def test_tcm_equals_pml_self_mode(B, d, n_classes, seed):
    from pytorch_metric_learning.losses import ThresholdConsistentMarginLoss

    x, labels = clustered(B, d, n_classes, seed=seed)
    for mp, mn, lp, ln in ((0.9, 0.5, 1.0, 1.0), (0.3, 0.1, 0.7, 1.3), (0.5, -0.2, 1.0, 2.0), (0.7, 0.2, 1.0, 1.0)):
        kw = _clear_margins(dict(pos_margin=mp, neg_margin=mn), x)
        with fd.backend("cpu"):
            ours = fd.threshold_consistent_margin(x, labels, pos_weight=lp, neg_weight=ln, **kw)
        pml = ThresholdConsistentMarginLoss(lambda_plus=lp, lambda_minus=ln, margin_plus=kw["pos_margin"],
                                            margin_minus=kw["neg_margin"])(x, labels)
        assert abs(ours.item() - pml.item()) <= 1e-6


@pytest.mark.parametrize("loss", list(LOSSES))
def test_empty_sets_give_zero_and_zero_gradient(loss):
    x, labels = clustered(150, 8, 10, seed=7)
    xr = x.clone().requires_grad_()
    with fd.backend("cpu"), poison_outputs():
        got = getattr(fd, loss)(xr, labels, pos_margin=-2.0, neg_margin=2.0)  # nothing is hard
        got.backward()
    assert got.item() == 0.0 and torch.equal(xr.grad, torch.zeros_like(x))
    # only one term empty: self pair mode has no positive pair (TCM; contrastive keeps the diagonal, s = 1 > m+)
    check_against_reference(loss, "cpu", dict(x=x, labels=None), _clear_margins(dict(LOSSES[loss]), x),
                            grad_names=("x",), rtol=RTOL, atol=ATOL)
    _, _, counts = _stats(x, None, torch.arange(150), None, loss, LOSSES[loss])
    assert counts[0].item() == 0 and counts[1].item() > 0


def test_contrastive_diagonal_is_a_positive_pair_in_self_mode():
    x, labels = clustered(40, 8, 40, seed=8)  # most labels unique: the diagonal dominates the positives
    for mp in (1.25, 1.5):  # hinge m+ - 1 > 0 on the diagonal: counted, as the reference does
        check_against_reference("contrastive_margin", "cpu", dict(x=x, labels=labels), dict(pos_margin=mp, neg_margin=0.3),
                                grad_names=("x",), rtol=RTOL, atol=ATOL)
        _, _, counts = _stats(x, None, labels, None, "contrastive_margin", dict(pos_margin=mp, neg_margin=0.3))
        assert counts[0].item() >= 40


def test_deterministic_bitwise():
    x, labels = clustered(700, 40, 100, seed=9)
    runs = []
    for _ in range(2):
        xr = x.clone().requires_grad_()
        with fd.backend("cpu"):
            loss = fd.threshold_consistent_margin(xr, labels, pos_margin=0.7, neg_margin=0.1)
            loss = loss + fd.contrastive_margin(xr, labels)
        loss.backward()
        runs.append((loss.detach(), xr.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_fp32_loss_and_input_dtype_grads(dtype):
    x, labels = clustered(60, 32, 10, seed=10)
    xh = x.to(dtype)
    kw = _clear_margins(dict(pos_margin=0.7, neg_margin=0.1), xh.float())
    for loss in LOSSES:
        xr = xh.clone().requires_grad_()
        with fd.backend("cpu"):
            got = getattr(fd, loss)(xr, labels, **kw)
        got.backward()
        ref = getattr(fd.reference, loss)(xh.double(), labels, **kw)
        assert got.dtype == torch.float32 and xr.grad.dtype == dtype
        assert abs(got.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))


def test_nonfinite_rows_give_nan_like_the_reference():
    x, labels = torch.randn(20, 4), torch.arange(20) % 4
    x[3, 1] = float("nan")  # NaN similarities fail every margin test; the non-finite rule makes the loss NaN
    for loss in LOSSES:
        with fd.backend("cpu"):
            got = getattr(fd, loss)(x, labels, pos_margin=0.5, neg_margin=0.1)
        want = getattr(fd.reference, loss)(x, labels, pos_margin=0.5, neg_margin=0.1)
        assert torch.isnan(got) and torch.isnan(want)


def test_float64_runs_the_reference_exactly():
    x, labels = torch.randn(12, 3, dtype=torch.float64), torch.arange(12) % 3
    for loss in LOSSES:
        with fd.backend("cpu"):
            got = getattr(fd, loss)(x, labels)
        assert got.dtype == torch.float64 and torch.equal(got, getattr(fd.reference, loss)(x, labels))


BAD_INPUTS = [
    (lambda f, x, l: f(x[0], l), ValueError, "x must be a 2-D"),
    (lambda f, x, l: f(x, l, x[:, :3], l), ValueError, "embedding dimension"),
    (lambda f, x, l: f(x, l, x), ValueError, "ref_labels is required"),
    (lambda f, x, l: f(x, None, None, l), ValueError, "ref_labels was given without y"),
    (lambda f, x, l: f(x, l[:4]), ValueError, "labels has 4 entries"),
    (lambda f, x, l: f(x, l.float()), TypeError, "labels must be an integer"),
    (lambda f, x, l: f(x, l, pos_margin="0.9"), TypeError, "pos_margin"),
    (lambda f, x, l: f(x, l, neg_margin=None), TypeError, "neg_margin"),
    (lambda f, x, l: f(x[:0], l[:0]), ValueError, "x is empty"),
    (lambda f, x, l: f(x.long(), l), TypeError, "x must be float16"),
    (lambda f, x, l: f(x, l, x.to("meta"), l), ValueError, "mixed devices"),
    (lambda f, x, l: f(x, l, x.double(), l), TypeError, "same dtype"),
    (lambda f, x, l: f(x.numpy(), l), TypeError, "x must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("call,exc,message", BAD_INPUTS)
def test_bad_input_raises_like_the_reference(backend, loss, call, exc, message):
    x, labels = torch.randn(8, 4), torch.arange(8) % 3
    with fd.backend(backend), pytest.raises(exc, match=message):
        call(getattr(fd, loss), x, labels)
    with pytest.raises(exc, match=message):
        call(getattr(fd.reference, loss), x, labels)
    if loss == "threshold_consistent_margin":
        with fd.backend(backend), pytest.raises(TypeError, match="pos_weight"):
            fd.threshold_consistent_margin(x, labels, pos_weight="1")


def test_ops_pass_opcheck():
    x = torch.randn(40, 7, requires_grad=True)
    y = torch.randn(33, 7, requires_grad=True)
    labels, ref_labels = torch.arange(40) // 3, torch.arange(33) // 3
    for strict in (False, True):
        for normalize in (False, True):
            torch.library.opcheck(torch.ops.flashdml.hinge_pair_fwd,
                                  (x, y, labels, ref_labels, 0.3, 0.1, 1.2, 0.8, False, strict, normalize))
            torch.library.opcheck(torch.ops.flashdml.hinge_pair_fwd,
                                  (x, x, labels, labels, 0.3, 0.1, 1.0, 1.0, True, strict, normalize))
    _, _, counts = torch.ops.flashdml.hinge_pair_fwd(x, y, labels, ref_labels, 0.3, 0.1, 1.2, 0.8, False, False, True)
    torch.library.opcheck(torch.ops.flashdml.hinge_pair_bwd,
                          (torch.tensor(1.0), x.detach(), y.detach(), labels, ref_labels, 0.3, 0.1, 1.2, 0.8, False,
                           False, True, counts))


def test_torch_compile_fullgraph_matches_eager():
    x, labels = clustered(64, 16, 16, seed=11)
    y, ref_labels = clustered(80, 16, 16, seed=12)

    def both(a, b):
        return fd.threshold_consistent_margin(a, labels, b, ref_labels, pos_margin=0.7, neg_margin=0.1) + \
            fd.contrastive_margin(a, labels)

    fn = torch.compile(both, fullgraph=True, backend="aot_eager")
    with fd.backend("cpu"):
        xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
        got = fn(xa, ya)
        got.backward()
        xb, yb = x.clone().requires_grad_(), y.clone().requires_grad_()
        want = both(xb, yb)
        want.backward()
    assert torch.allclose(got, want) and torch.allclose(xa.grad, xb.grad) and torch.allclose(ya.grad, yb.grad)


def _vm_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_memory_stays_linear_at_large_batch():
    """B = 16384, d = 64: a B x B fp32 matrix would be 1 GiB; forward + backward must stay far below."""
    B, d = 16384, 64
    x, labels = clustered(B, d, B // 8, seed=13)
    xr = x.clone().requires_grad_()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _vm_kib("VmRSS")
    t0 = time.perf_counter()
    with fd.backend("cpu"):
        loss = fd.threshold_consistent_margin(xr, labels, pos_margin=0.7, neg_margin=0.2)
    loss.backward()
    elapsed = time.perf_counter() - t0
    growth_mib = (_vm_kib("VmHWM") - base) / 1024
    assert torch.isfinite(loss) and loss.item() > 0 and torch.isfinite(xr.grad).all()
    assert growth_mib < 256, f"peak RSS grew by {growth_mib:.0f} MiB"
    print(f"TCM fwd+bwd B={B} d={d}: {elapsed:.2f} s, peak RSS growth {growth_mib:.1f} MiB")


@pytest.mark.skipif(not fd.available_backends()["triton"][0], reason="triton backend unavailable here")
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("mode", ["self", "cross"])
def test_triton_backend_through_the_public_api_matches_reference(loss, mode):
    """The Python glue (normalisation outside the kernel, self mode as x twice) on the Triton ops, small ragged
    shapes (the kernels run under the interpreter here)."""
    for i, (B, M, d) in enumerate([(5, 7, 1), (37, 70, 129), (70, 33, 3)]):
        x, labels = clustered(B, d, n_classes=max(1, B // 5), seed=i)
        y, ref_labels = clustered(M, d, n_classes=max(1, B // 5), seed=50 + i)
        if mode == "self":
            y = ref_labels = None
        kwargs = _clear_margins(LOSSES[loss], x, y)
        check_against_reference(loss, "triton", dict(x=x, labels=labels, y=y, ref_labels=ref_labels), kwargs,
                                grad_names=("x",) if mode == "self" else ("x", "y"), rtol=RTOL, atol=ATOL)
