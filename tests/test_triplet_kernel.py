"""Fused CPU triplet margin loss (docs/spec.md §6.4) against the reference: values, dx, dy on ragged shapes in
self and cross mode, fp16 / bf16, poisoned outputs, exact counts, edge cases, the non-finite rule and memory."""
import time

import pytest
import torch
import torch.nn.functional as F

import flashdml as fd
from flashdml import _dispatch, _ext
from flashdml._debug import poison_outputs
from flashdml.ops import registry
from flashdml.ops import triplet as tm
from helpers import check_against_reference, clustered

pytestmark = pytest.mark.skipif(not _ext.C_LOADED, reason="flashdml._C not built")

# Tolerances (fp32 kernel vs the float64 reference on the same inputs). The kernel's anchor–negative distance
# comes from an fp32 S entry, sqrt(|x|² + |y|² − 2s): s carries ~sqrt(d)·2^-24 of rounding (d·2^-24 at worst,
# 8e-6 at d = 512), so d_an is off by about that over 2·d_an; the anchor–positive distances are summed in double.
# Margins are moved so that no float64 hinge lies within CLEAR of 0 (_clear_margin): there fp32 and float64 could
# legitimately count a triplet differently. The gradient per negative pair is #active·s/d_an, so its relative
# error is that of d_an; the loss is a mean of hinges summed in double.
RTOL, ATOL = 1e-4, 1e-6
CLEAR = 1e-5
SELF_SHAPES = [(1, 1), (2, 3), (5, 1), (37, 129), (70, 3), (130, 16), (257, 33), (600, 129), (300, 512), (1030, 64)]
CROSS_SHAPES = [(1, 1, 1), (2, 5, 3), (37, 70, 129), (130, 1030, 16), (600, 513, 129), (200, 300, 512), (1030, 70, 3)]


def _hinges64(x, labels, y=None, ref_labels=None, margin=0.0):
    """Every triplet's hinge d_ap − d_an + margin in float64 (small inputs only; for choosing margins)."""
    xh = F.normalize(x.double(), dim=1)
    yh = xh if y is None else F.normalize(y.double(), dim=1)
    rl = labels if y is None else ref_labels
    D = torch.cdist(xh, yh, compute_mode="donot_use_mm_for_euclid_dist")
    same = labels[:, None] == rl[None, :]
    pos = same.clone()
    if y is None:
        pos.fill_diagonal_(False)
    out = []
    for a in range(x.shape[0]):
        dp, dn = D[a][pos[a]], D[a][~same[a]]
        out.append((dp[:, None] - dn[None, :] + margin).reshape(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _clear_margin(margin, x, labels, y=None, ref_labels=None, delta=CLEAR):
    """The margin nearest to ``margin`` at which no float64 hinge lies within ``delta`` of 0 (a hinge is 0 at
    margin = d_an − d_ap: the middle of the nearest gap of width > 2·delta between those values)."""
    v = torch.sort(-_hinges64(x, labels, y, ref_labels)).values
    if v.numel() == 0 or not bool(((v - margin).abs() < delta).any()):
        return margin
    pts = torch.cat([v.new_tensor([v[0] - 1.0]), v, v.new_tensor([v[-1] + 1.0])])
    mids = ((pts[1:] + pts[:-1]) / 2)[(pts[1:] - pts[:-1]) > 2 * delta]
    return float(mids[(mids - margin).abs().argmin()])


def _labels_4_per_class(B, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(B) // 4)[torch.randperm(B, generator=g)]


def _case(B, d, seed, M=None):
    x, _ = clustered(B, d, max(1, B // 4), seed=seed)
    labels = _labels_4_per_class(B, seed)
    if M is None:
        return x, labels, None, None
    y, _ = clustered(M, d, max(1, M // 4), seed=seed + 1)
    ref_labels = _labels_4_per_class(M, seed + 1) % max(1, B // 4 + 1)  # shares classes with the anchors
    return x, labels, y, ref_labels


def test_public_api_routes_to_the_fused_op():
    assert fd.triplet_margin is tm.triplet_margin
    assert registry.family_of(tm.TRIPLET_OP) is tm.FAMILY and tm.FAMILY.backends == ("cpu", "cuda", "triton")
    assert _dispatch.resolve(tm.TRIPLET_OP, torch.device("cpu"), torch.float32) == "cpu"
    assert _dispatch.resolve(tm.TRIPLET_OP, torch.device("cpu"), torch.float64) == "reference"


@pytest.mark.parametrize("B,d", SELF_SHAPES)
def test_self_mode_matches_reference(B, d):
    x, labels, _, _ = _case(B, d, seed=B + d)
    margin = _clear_margin(0.05 if d > 1 else 0.3, x, labels)
    check_against_reference("triplet_margin", "cpu", dict(x=x, labels=labels), dict(margin=margin),
                            grad_names=("x",), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("B,M,d", CROSS_SHAPES)
def test_cross_mode_matches_reference(B, M, d):
    x, labels, y, ref_labels = _case(B, d, seed=B + M + d, M=M)
    margin = _clear_margin(0.05 if d > 1 else 0.3, x, labels, y, ref_labels)
    check_against_reference("triplet_margin", "cpu", dict(x=x, labels=labels, y=y, ref_labels=ref_labels),
                            dict(margin=margin), grad_names=("x", "y"), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("mode", ["self", "cross"])
def test_half_precision_inputs(dtype, rtol, mode):
    """The kernel reads fp16 / bf16 rows exactly and computes in fp32 (the loss as accurate as for fp32 inputs);
    the gradients come back rounded to the input dtype: 2^-11 (fp16) or 2^-8 (bf16) relative per element, so the
    bound on max|error| relative to max|gradient| is 2e-3 / 1e-2 (with the fp32 error on top)."""
    x, labels, y, ref_labels = _case(130, 33, seed=21, M=None if mode == "self" else 90)
    x = x.to(dtype)
    y = y.to(dtype) if y is not None else None
    margin = _clear_margin(0.05, x, labels, y, ref_labels)
    tensors = dict(x=x, labels=labels) if mode == "self" else dict(x=x, labels=labels, y=y, ref_labels=ref_labels)
    check_against_reference("triplet_margin", "cpu", tensors, dict(margin=margin),
                            grad_names=("x",) if mode == "self" else ("x", "y"), rtol=rtol, atol=ATOL)


@pytest.mark.parametrize("mode", ["self", "cross"])
def test_counts_and_sums_are_exact(mode):
    """The op's own outputs (poisoned first): counts = the float64 number of positive hinges, exactly; sums and
    loss = sums / counts to fp32 accuracy."""
    x, labels, y, ref_labels = _case(257, 17, seed=5, M=None if mode == "self" else 301)
    margin = _clear_margin(0.1, x, labels, y, ref_labels)
    h = _hinges64(x, labels, y, ref_labels, margin)
    yy, rl = (x, labels) if y is None else (y, ref_labels)
    with poison_outputs():
        loss, sums, counts = torch.ops.flashdml.triplet_fwd(x, yy, labels, rl, margin, mode == "self")
    assert counts.dtype == torch.int64 and counts.shape == (1,) and sums.shape == (1,)
    assert counts.item() == int((h > 0).sum()) > 0
    want = h[h > 0].sum()
    assert abs(sums.item() - want.item()) <= 1e-5 * want.item()
    assert abs(loss.item() - want.item() / counts.item()) <= 1e-5 * loss.item()


def test_cross_mode_with_the_batch_itself_has_zero_distance_positives():
    """y = x with separate ref_labels: the pairs (i, i) are positives at distance exactly 0 in both."""
    x, labels, _, _ = _case(64, 12, seed=3)
    margin = _clear_margin(0.8, x, labels, x, labels)
    check_against_reference("triplet_margin", "cpu", dict(x=x, labels=labels, y=x.clone(), ref_labels=labels.clone()),
                            dict(margin=margin), grad_names=("x", "y"), rtol=RTOL, atol=ATOL)


def test_duplicate_rows():
    """Rows repeated inside their class: d_ap = 0 exactly (no NaN from 0/0 in the backward)."""
    x, labels, _, _ = _case(60, 10, seed=6)
    x, labels = torch.cat([x, x[:10]]), torch.cat([labels, labels[:10]])
    margin = _clear_margin(0.3, x, labels)
    check_against_reference("triplet_margin", "cpu", dict(x=x, labels=labels), dict(margin=margin),
                            grad_names=("x",), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", ["one_class", "all_distinct", "single_row", "labels_absent_from_refs",
                                  "all_hinges_negative", "pair_mode_self"])
def test_no_active_triplet_gives_zero_loss_and_zero_gradient(case):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 5, generator=g)
    labels, y, ref_labels, margin = torch.arange(12) % 3, None, None, 0.05
    if case == "one_class":
        labels = torch.zeros(12, dtype=torch.int64)
    elif case == "all_distinct":
        labels = torch.arange(12)
    elif case == "single_row":
        x, labels = x[:1], labels[:1]
    elif case == "labels_absent_from_refs":
        y, ref_labels = torch.randn(7, 5, generator=g), torch.full((7,), 9)
    elif case == "all_hinges_negative":
        margin = -3.0  # d_ap − d_an <= 2 < 3
    else:
        labels = None
    x.requires_grad_(True)
    with fd.backend("cpu"):
        loss = fd.triplet_margin(x, labels, y, ref_labels, margin=margin)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_nonfinite_rows_give_nan():
    x, labels, _, _ = _case(40, 6, seed=8)
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[3, 1] = bad
        xb.requires_grad_(True)
        with fd.backend("cpu"):
            loss = fd.triplet_margin(xb, labels)
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(fd.reference.triplet_margin(xb.detach(), labels))
        assert torch.isnan(xb.grad).all()  # NaN upstream: the backward op returns NaN everywhere


def test_float64_runs_the_reference_exactly():
    x, labels = torch.randn(12, 3, dtype=torch.float64), torch.arange(12) % 3
    with fd.backend("cpu"):
        got = fd.triplet_margin(x, labels)
    assert got.dtype == torch.float64 and torch.equal(got, fd.reference.triplet_margin(x, labels))


def test_deterministic():
    x, labels, _, _ = _case(700, 40, seed=9)
    runs = []
    for _ in range(2):
        xr = x.clone().requires_grad_(True)
        fd.triplet_margin(xr, labels).backward()
        runs.append(xr.grad)
    assert torch.equal(runs[0], runs[1])


def test_double_backward_is_refused():
    x, labels, _, _ = _case(20, 4, seed=10)
    x.requires_grad_(True)
    loss = fd.triplet_margin(x, labels, margin=0.5)
    (g,) = torch.autograd.grad(loss, x, create_graph=False)
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(fd.triplet_margin(x, labels, margin=0.5), x, create_graph=True)


def _vm_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def test_memory_stays_linear_at_large_batch():
    """B = 16384, d = 64, 4 per class: a B×B fp32 distance matrix would be 1 GiB and the triplet list
    B·3·(B − 4) ≈ 8e8 entries; forward + backward must stay far below (O(B·d) rows and gradients, a few tiles,
    O(B·|P|) positive lists)."""
    B, d = 16384, 64
    x, _ = clustered(B, d, B // 4, seed=13)
    labels = _labels_4_per_class(B, 13)
    xr = x.clone().requires_grad_()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _vm_kib("VmRSS")
    t0 = time.perf_counter()
    with fd.backend("cpu"):
        loss = fd.triplet_margin(xr, labels, margin=0.2)
    loss.backward()
    elapsed = time.perf_counter() - t0
    growth_mib = (_vm_kib("VmHWM") - base) / 1024
    assert torch.isfinite(loss) and loss.item() > 0 and torch.isfinite(xr.grad).all()
    assert growth_mib < 256, f"peak RSS grew by {growth_mib:.0f} MiB"
    print(f"triplet fwd+bwd B={B} d={d}: {elapsed:.2f} s, peak RSS growth {growth_mib:.1f} MiB")
