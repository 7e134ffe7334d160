"""The fused anchor-LSE kernels (SupCon, Multi-Similarity, Circle; docs/spec.md §6.1-6.3) against the reference.

Values and every gradient (dx, dy, and SupCon's learnable temperature) on poisoned outputs, ragged shapes, self
and cross mode, fp32 / fp16 / bf16; the pml zero cases; NaN input; the schema and its checks; and the memory of
a B = 16384 batch (O(B·d), far below the 1 GiB of one B×B fp32 matrix).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import flashdml as fd
from flashdml._debug import poison_outputs

from helpers import check_against_reference

pytestmark = pytest.mark.skipif(not fd.available_backends()["cpu"][0], reason="C++ CPU backend unavailable")

NAMES = ("supcon", "multi_similarity", "circle")
# (B, M or None for self mode, d): B and M not multiples of the CPU tiles (128 x 512), d = 1, 3, 129, 512
SHAPES = [(1, None, 3), (2, None, 1), (37, None, 129), (130, None, 3), (600, None, 16), (257, 70, 33),
          (45, 530, 512), (129, 513, 1)]

# fp32 tolerances, relative to the largest reference value (atol covers entries that cancel to ~0). The fused
# similarities carry ~sqrt(d)·u of rounding; Circle multiplies them by γ = 80 (and by S again) before
# exponentiating, so its weights are the most sensitive. Measured worst cases here (d <= 512): SupCon and MS
# ~1e-6, Circle ~6e-6 relative to the largest gradient entry; the bounds leave a factor of ~10-20.
RTOL = {"supcon": 2e-5, "multi_similarity": 5e-5, "circle": 1e-4}


def _batch(B, M, d, seed):
    g = torch.Generator().manual_seed(seed)
    n = B + (M or 0)
    labels = torch.randint(0, max(1, n // 4), (n,), generator=g)
    centres = torch.randn(int(labels.max()) + 1, d, generator=g)
    x = centres[labels] + 0.8 * torch.randn(n, d, generator=g)
    if M is None:
        return x, labels, None, None
    return x[:B], labels[:B], x[B:], labels[B:]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("B,M,d", SHAPES, ids=[f"{b}x{m}x{d}" for b, m, d in SHAPES])
def test_fused_equals_reference_fp32(name, B, M, d):
    x, labels, y, ref_labels = _batch(B, M, d, seed=B + d)
    tensors = {"x": x, "labels": labels, "y": y, "ref_labels": ref_labels}
    grads = ("x",) if y is None else ("x", "y")
    kwargs = {}
    if name == "supcon":
        tensors["temperature"] = torch.tensor(0.1)  # learnable: its gradient is compared too
        grads += ("temperature",)
    # d = 1: every unit row is ±1, so the exact gradient of the raw rows is 0 (the normalisation projects it out)
    # and what the kernel returns is the fp32 rounding of g·u / ‖x‖, with |g| up to ~γ: an absolute tolerance.
    atol = 1e-4 if d == 1 else 1e-6
    check_against_reference(name, "cpu", tensors, kwargs, grad_names=grads, rtol=RTOL[name], atol=atol,
                            atol_by_name={"temperature": 1e-4})


@pytest.mark.parametrize("name,kw", [("supcon", {"temperature": 0.5}),
                                     ("multi_similarity", {"alpha": 3.0, "beta": 10.0, "base": 0.2}),
                                     ("circle", {"m": 0.25, "gamma": 16.0})])
@pytest.mark.parametrize("cross", (False, True))
def test_fused_non_default_parameters(name, kw, cross):
    x, labels, y, ref_labels = _batch(140, 90 if cross else None, 20, seed=9)
    tensors = {"x": x, "labels": labels, "y": y, "ref_labels": ref_labels}
    check_against_reference(name, "cpu", tensors, kw, grad_names=("x",) if y is None else ("x", "y"),
                            rtol=RTOL[name], atol=1e-6)


# fp16 / bf16: the kernel and the reference read the same rounded rows (upcast), so the loss keeps the fp32
# tolerance; the gradients come back in the input dtype, one rounding each: 2^-11 (fp16) / 2^-8 (bf16) relative
# to the entry, at most that relative to the largest entry — twice that as the bound.
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,grad_rtol", [(torch.float16, 2 * 2.0**-11), (torch.bfloat16, 2 * 2.0**-8)],
                         ids=("fp16", "bf16"))
@pytest.mark.parametrize("cross", (False, True))
def test_fused_half_precision(name, dtype, grad_rtol, cross):
    x, labels, y, ref_labels = _batch(150, 70 if cross else None, 64, seed=4)
    x, y = x.to(dtype), None if y is None else y.to(dtype)
    xr = x.detach().double().requires_grad_()
    yr = None if y is None else y.detach().double().requires_grad_()
    ref = getattr(fd.reference, name)(xr, labels, yr, ref_labels)
    ref.backward()
    xf = x.clone().requires_grad_()
    yf = None if y is None else y.clone().requires_grad_()
    with fd.backend("cpu"), poison_outputs():
        loss = getattr(fd, name)(xf, labels, yf, ref_labels)
        loss.backward()
    assert loss.dtype == torch.float32 and xf.grad.dtype == dtype
    assert abs(float(loss.detach()) - float(ref)) <= RTOL[name] * abs(float(ref)) + 1e-6
    for got, want in ((xf.grad, xr.grad),) + (() if y is None else ((yf.grad, yr.grad),)):
        scale = float(want.abs().max())
        assert float((got.double() - want).abs().max()) <= (grad_rtol + RTOL[name]) * scale + 1e-6


def test_fused_zero_cases_match_the_reference():
    x = torch.randn(6, 5, requires_grad=True)
    cases = [(x[:1], torch.tensor([0]), None, None),                      # B = 1: no pair
             (x[:1], torch.tensor([1]), x[1:3], torch.tensor([1, 2])),    # one positive, one negative pair
             (x, torch.arange(6), None, None),                            # no positive pair
             (x, torch.zeros(6, dtype=torch.long), None, None)]           # no negative pair
    for name in NAMES:
        for xx, lab, yy, rl in cases:
            with fd.backend("cpu"), poison_outputs():
                got = getattr(fd, name)(xx, lab, yy, rl)
            want = getattr(fd.reference, name)(xx.detach().double(), lab, None if yy is None else yy.detach().double(), rl)
            assert float(got) == pytest.approx(float(want), rel=RTOL[name], abs=1e-6), (name, lab)
            (g,) = torch.autograd.grad(got, x)
            assert torch.isfinite(g).all()


@pytest.mark.parametrize("name", NAMES)
def test_nan_input_gives_nan(name):
    x = torch.randn(20, 8)
    x[3, 2] = float("nan")
    with fd.backend("cpu"):
        assert torch.isnan(getattr(fd, name)(x, torch.arange(20) // 4))
    y = torch.randn(9, 8)
    y[0, 0] = float("inf")
    with fd.backend("cpu"):
        assert torch.isnan(getattr(fd, name)(x.nan_to_num(), torch.arange(20) // 4, y, torch.arange(9) // 3))


def test_float64_runs_the_reference_and_auto_picks_the_kernel():
    x, labels = torch.randn(30, 6, dtype=torch.float64), torch.arange(30) // 3
    with fd.backend("cpu"):
        assert fd.supcon(x, labels).dtype == torch.float64
    assert fd._dispatch.resolve("circle", x.device, torch.float32) == "cpu"


def test_op_checks():
    ops = torch.ops.flashdml
    x, lab, t = torch.randn(5, 3), torch.arange(5), torch.tensor(0.1)
    with pytest.raises(ValueError, match="kind"):
        ops.anchor_lse_fwd(x, x, lab, lab, t, 3, 0.0, 0.0, 0.0, True)
    with pytest.raises(ValueError, match="alpha"):
        ops.anchor_lse_fwd(x, x, lab, lab, t, 1, 0.0, 50.0, 0.5, True)
    with pytest.raises(ValueError, match="finite"):
        ops.anchor_lse_fwd(x, x, lab, lab, t, 2, float("nan"), 80.0, 0.0, True)
    with pytest.raises(ValueError, match="self_mode"):
        ops.anchor_lse_fwd(x, x[:4], lab, lab[:4], t, 0, 0.0, 0.0, 0.0, True)
    loss, stats = ops.anchor_lse_fwd(x, x, lab // 2, lab // 2, t, 0, 0.0, 0.0, 0.0, True)
    assert stats.shape == (5, 4) and stats.dtype == torch.float32
    with pytest.raises(ValueError, match="row_stats"):
        ops.anchor_lse_bwd(torch.tensor(1.0), x, x, lab, lab, t, 0, 0.0, 0.0, 0.0, True, stats[:, :3])
    with pytest.raises(TypeError, match="row_stats"):
        ops.anchor_lse_bwd(torch.tensor(1.0), x, x, lab, lab, t, 0, 0.0, 0.0, 0.0, True, stats.double())
    with pytest.raises(ValueError, match="alpha"):
        fd.multi_similarity(x, lab, alpha=0)


def test_double_backward_is_refused():
    x = torch.randn(12, 4, requires_grad=True)
    with fd.backend("cpu"):
        loss = fd.supcon(x, torch.arange(12) // 3)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, x, create_graph=True)


_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, torch, flashdml as fd
    torch.manual_seed(0)
    B, d = 16384, 64
    x = torch.randn(B, d, requires_grad=True)
    labels = torch.arange(B) // 4
    with fd.backend("cpu"):
        fd.supcon(x[:256], labels[:256]).backward()   # warm up: allocator, thread pools
    x.grad = None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with fd.backend("cpu"):
        loss = fd.{name}(x, labels)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
""")


@pytest.mark.parametrize("name", ("supcon", "circle"))
def test_memory_is_linear_in_the_batch(name):
    """B = 16384, d = 64, forward + backward: the peak RSS grows by far less than one B×B fp32 matrix (1 GiB).
    Linear memory is ~B·d·4 bytes per copy (4 MiB) plus per-task tiles; 128 MiB leaves room for the allocator."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT.replace("{name}", name)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    grown_mib = int(out.stdout.strip().splitlines()[-1])
    assert grown_mib < 128, f"peak RSS grew by {grown_mib} MiB"
