"""The CUDA triplet margin loss (csrc/cuda/triplet.cu) on a GPU: loss, exact count and gradients against the float64
reference, every dtype, self / cross / pair mode, ragged shapes; bitwise repeatability; the non-finite rule.
Skipped without a CUDA device or without the CUDA kernels (tests/cuda_emulation/triplet_driver.cpp runs the same
kernel code on the CPU)."""
import pytest
import torch

import flashdml as fd
from flashdml.ops import triplet as tm

pytestmark = pytest.mark.skipif(
    not fd.available_backends()["cuda"][0] or not torch.cuda.is_available()
    or not torch._C._dispatch_has_kernel_for_dispatch_key("flashdml::triplet_fwd", "CUDA"),
    reason="needs a CUDA device and flashdml._C with the CUDA triplet kernels")

TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _batch(B, M, d, cross, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    labels = torch.randint(0, max(2, B // 4), (B,), generator=g)
    if not cross:
        return x, labels, None, None
    return x, labels, torch.randn(M, d, generator=g), torch.randint(0, max(2, B // 4), (M,), generator=g)


def _grads(fn, x, labels, y, ref_labels, dtype, device):
    xs = x.to(device, dtype).requires_grad_(True)
    ys = None if y is None else y.to(device, dtype).requires_grad_(True)
    loss = fn(xs, labels.to(device), ys, None if ref_labels is None else ref_labels.to(device), margin=0.1)
    loss.backward()
    return loss.detach(), xs.grad, (None if ys is None else ys.grad)


def _close(name, got, want, tol):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), name
    err = (got - want).abs().max().item()
    assert err <= tol * max(want.abs().max().item(), 1e-6), f"{name}: {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,M,d,cross", [(1, 1, 3, False), (37, 37, 33, False), (130, 70, 16, True),
                                         (70, 130, 129, True), (600, 600, 64, False)])
def test_cuda_matches_float64_reference(dtype, B, M, d, cross):
    x, labels, y, ref_labels = _batch(B, M, d, cross, B * 7 + M + d)
    with fd.backend("cuda"):
        got = _grads(fd.triplet_margin, x, labels, y, ref_labels, dtype, "cuda")
    # the reference on the very rows the kernel read (rounded to dtype), in float64
    xr = x.to(dtype).double()
    yr = None if y is None else y.to(dtype).double()
    want = _grads(fd.reference.triplet_margin, xr, labels, yr, ref_labels, torch.float64, "cpu")
    _close(f"loss {dtype}", got[0], want[0], TOL[dtype])
    _close(f"dx {dtype}", got[1], want[1], 10 * TOL[dtype])
    if cross:
        _close(f"dy {dtype}", got[2], want[2], 10 * TOL[dtype])


def test_cuda_ops_count_exactly_and_repeat_bitwise():
    x, labels, y, ref_labels = _batch(300, 200, 40, True, 3)
    x, y, labels, ref_labels = x.cuda(), y.cuda(), labels.cuda(), ref_labels.cuda()
    ops = torch.ops.flashdml
    out1 = ops.triplet_fwd(x, y, labels, ref_labels, 0.1, False)
    out2 = ops.triplet_fwd(x, y, labels, ref_labels, 0.1, False)
    cpu = ops.triplet_fwd(x.cpu(), y.cpu(), labels.cpu(), ref_labels.cpu(), 0.1, False)
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[2], out2[2])
    assert abs(int(out1[2]) - int(cpu[2])) <= 2  # fp32 hinge tests on differently summed S: ties only
    grad = torch.tensor(0.7, device="cuda")
    g1 = ops.triplet_bwd(grad, x, y, labels, ref_labels, 0.1, False, out1[2])
    g2 = ops.triplet_bwd(grad, x, y, labels, ref_labels, 0.1, False, out1[2])
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_cuda_no_triplet_and_nonfinite():
    x = torch.randn(16, 8, device="cuda", requires_grad=True)
    with fd.backend("cuda"):
        loss = fd.triplet_margin(x, torch.arange(16, device="cuda"))  # all distinct: no positive
        loss.backward()
        assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
        bad = x.detach().clone()
        bad[3, 2] = float("nan")
        assert torch.isnan(fd.triplet_margin(bad, torch.arange(16, device="cuda") // 4))
    assert "cuda" in tm.FAMILY.backends
