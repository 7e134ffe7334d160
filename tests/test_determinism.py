"""Run-to-run determinism of the GPU glue's scatter-sums (docs/gpu.md, "Determinism").

``index_add_`` on CUDA adds with atomics, in an order that changes from run to run. The pair gradient of the
selection ops (``ops/selection.py: pair_grads``) and the contextual sparse stage (``csrc/aten/contextual_stage.cpp``)
instead sort by target and sum each target's terms in one fixed order. Without a GPU the atomics cannot be seen,
so the CPU tests assert the formulation: the pair gradient is bit-identical whatever order the pairs come in (an
order-dependent sum such as ``index_add_`` is not), and still equals a float64 computation. With a GPU the same
ops run twice on CUDA tensors and must agree bit for bit.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from flashdml import _ext
from flashdml.ops.selection import pair_grads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pairs(B, M, n, seed, device="cpu"):
    """n distinct random (row, col) pairs of a B×M matrix, many per row and per column, and random gradients."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(B * M, generator=g)[:n]
    grad = torch.randn(n, generator=g)
    return (flat // M).to(device), (flat % M).to(device), grad.to(device)


def _inputs(B, M, d, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed + 100)
    x = (3.0 * torch.randn(B, d, generator=g)).to(device, dtype)
    y = (3.0 * torch.randn(M, d, generator=g)).to(device, dtype)
    return x, y


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("self_mode", [False, True])
def test_pair_grads_ignore_the_pair_order(normalize, self_mode):
    B, M, d = 40, 40 if self_mode else 55, 33
    x, y = _inputs(B, M, d, seed=1)
    if self_mode:
        y = x
    rows, cols, grad = _pairs(B, M, 1500, seed=2)
    dx, dy = pair_grads(x, y, rows, cols, grad, normalize)
    for seed in range(3):
        perm = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(seed))
        px, py = pair_grads(x, y, rows[perm], cols[perm], grad[perm], normalize)
        assert torch.equal(px, dx) and torch.equal(py, dy), f"pair order changed the gradient (permutation {seed})"


def test_an_order_dependent_sum_would_fail():
    """The permutation test above has teeth: index_add_ of the same terms in a permuted order changes bits."""
    B, M, d = 40, 55, 33
    x, y = _inputs(B, M, d, seed=1)
    rows, cols, grad = _pairs(B, M, 1500, seed=2)
    terms = grad[:, None] * y[cols]
    want = torch.zeros(B, d).index_add_(0, rows, terms)
    perm = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(torch.zeros(B, d).index_add_(0, rows[perm], terms[perm]), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [False, True])
def test_pair_grads_match_float64(device, normalize):
    B, M, d = 37, 50, 20
    x, y = _inputs(B, M, d, seed=3, device=device)
    rows, cols, grad = _pairs(B, M, 900, seed=4, device=device)
    dx, dy = pair_grads(x, y, rows, cols, grad, normalize)
    assert dx.dtype == x.dtype and dy.dtype == y.dtype
    xd, yd = x.double().requires_grad_(), y.double().requires_grad_()
    xh = torch.nn.functional.normalize(xd, dim=1, eps=1e-12) if normalize else xd
    yh = torch.nn.functional.normalize(yd, dim=1, eps=1e-12) if normalize else yd
    ((xh[rows] * yh[cols]).sum(1) * grad.double()).sum().backward()
    for got, want in ((dx, xd.grad), (dy, yd.grad)):
        assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_pair_grads_bitwise_on_cuda():
    B, M, d = 300, 200, 64  # ~250 pairs per row and 375 per column: many colliding additions
    x, y = _inputs(B, M, d, seed=5, device="cuda")
    rows, cols, grad = _pairs(B, M, 75000, seed=6, device="cuda")
    first = pair_grads(x, y, rows, cols, grad, True)
    for _ in range(3):
        again = pair_grads(x, y, rows, cols, grad, True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(not (_ext.C_LOADED and hasattr(torch.ops.flashdml, "contextual_stage_grad")),
                    reason="flashdml._C with the contextual_stage ops is not built")
def test_contextual_stage_bitwise_on_cuda():
    from test_contextual_stage import _batch, _reference_lists

    x, labels = _batch(300, 16, 6, seed=7)
    F = torch.nn.functional.normalize(x.double(), dim=1)
    ptr, col, flag, _ = _reference_lists(F, labels, 12, 0.05)
    dev = [t.cuda() for t in (ptr, col, flag, labels)]
    ops = torch.ops.flashdml
    runs = [(ops.contextual_stage_loss(*dev), ops.contextual_stage_grad(*dev, F.cuda()),
             *ops.contextual_stage_grad_parts(*dev, F.float().cuda())) for _ in range(3)]
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


def test_no_atomic_scatter_sums_in_the_contextual_stage():
    """The stage runs on CUDA tensors in the GPU ops: no index_add_ / scatter_add_ call (atomics there), comments
    aside; its scatter-sums go through add_at / coalesce."""
    with open(os.path.join(ROOT, "csrc/aten/contextual_stage.cpp")) as f:
        code = "\n".join(line.split("//", 1)[0] for line in f.read().splitlines())
    assert not re.search(r"\b(index_add_?|scatter_add_?|index_reduce_?)\s*\(", code)
    assert code.count("add_at(") >= 10 and "segment_reduce(" in code
