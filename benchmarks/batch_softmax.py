"""Batch softmax / InfoNCE (docs/spec.md §2.1), fp32, forward+backward.

Providers: the reference (materialises B×M), the fused kernels (flashdml-cpu; flashdml-triton and
flashdml-cuda on CUDA tensors), torch.compile(reference), and `chunked-pytorch`: the same recompute algorithm
as the fused kernels written in plain PyTorch (row blocks of 1024 through torch.mm / exp / sum, a backward
that recomputes the blocks) — the "what you get without a kernel" baseline.

FLOPs per call = 8·B·M·d: four GEMMs of 2·B·M·d — S in the forward, S recomputed in the backward, dx = G y
and dy = Gᵀ x — the recompute algorithm's GEMM work, which is how the ceiling fraction is defined.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import FUSED, GPU, QUICK, Op, Provider, block_buffers, loss_providers, loss_runner, pair_buffers, sweep

TEMPERATURE = 0.05
BLOCK = 1024
F32 = 4


def _mask_false_negatives_(z: torch.Tensor, labels: torch.Tensor | None, r0: int) -> torch.Tensor:
    """Row block z = rows r0.. of z: columns j ≠ i with labels[j] == labels[i] get -inf."""
    if labels is not None:
        rows = torch.arange(z.shape[0], device=z.device)
        same = labels[r0:r0 + z.shape[0], None] == labels[None, :]
        same[rows, rows + r0] = False
        z.masked_fill_(same, float("-inf"))
    return z


class _ChunkedBatchSoftmax(torch.autograd.Function):
    """L = mean_i (LSE_{j ∈ {i} ∪ neg(i)} z_ij − z_ii) on normalised inputs; saves only the per-row LSE."""

    @staticmethod
    def forward(ctx, xn, yn, labels, inv_t: float, block: int):
        B = xn.shape[0]
        lse = torch.empty(B, dtype=torch.promote_types(xn.dtype, torch.float32), device=xn.device)
        for r0 in range(0, B, block):
            z = torch.mm(xn[r0:r0 + block], yn.t()).mul_(inv_t)
            lse[r0:r0 + block] = torch.logsumexp(_mask_false_negatives_(z, labels, r0), dim=1)
        diag = (xn * yn).sum(1) * inv_t
        ctx.save_for_backward(xn, yn, labels, lse)
        ctx.inv_t, ctx.block = inv_t, block
        return (lse - diag).mean()

    @staticmethod
    def backward(ctx, grad_out):
        xn, yn, labels, lse = ctx.saved_tensors
        B, inv_t, block = xn.shape[0], ctx.inv_t, ctx.block
        scale = grad_out * (inv_t / B)  # dL/dS = (softmax − onehot(i)) / (B τ)
        dx = torch.empty_like(xn)
        dy = torch.zeros_like(yn)
        for r0 in range(0, B, block):
            xb = xn[r0:r0 + block]
            g = torch.mm(xb, yn.t()).mul_(inv_t)
            _mask_false_negatives_(g, labels, r0)
            g.sub_(lse[r0:r0 + block, None]).exp_()
            rows = torch.arange(g.shape[0], device=g.device)
            g[rows, rows + r0] -= 1.0
            g.mul_(scale)
            dx[r0:r0 + block] = torch.mm(g, yn)
            dy.addmm_(g.t(), xb)
        return dx, dy, None, None, None


def chunked_batch_softmax(x, y, labels=None, *, temperature: float = TEMPERATURE, normalize: bool = True,
                          block: int = BLOCK) -> torch.Tensor:
    """Plain-PyTorch recompute implementation of docs/spec.md §2.1 (symmetric=False), O(block·M) extra memory."""
    if x.shape[0] != y.shape[0]:
        raise ValueError("batch_softmax needs B == M")
    xn = F.normalize(x, dim=1, eps=1e-12) if normalize else x
    yn = F.normalize(y, dim=1, eps=1e-12) if normalize else y
    lab = None if labels is None else labels.contiguous()
    return _ChunkedBatchSoftmax.apply(xn, yn, lab, 1.0 / float(temperature), int(block))


def make_inputs(shape: dict, device: str):
    g = torch.Generator().manual_seed(0)
    B, d = shape["B"], shape["d"]
    x = torch.randn(B, d, generator=g).to(device).requires_grad_()
    y = torch.randn(B, d, generator=g).to(device).requires_grad_()
    labels = (torch.arange(B) // 4).to(device) if shape.get("labels", "4/class") != "none" else None
    return (x, y, labels), {"temperature": TEMPERATURE}


def _chunked_setup(shape: dict, device: str):
    return loss_runner(chunked_batch_softmax, *make_inputs(shape, device))


# Predicted peaks (bytes) for the memory cap; the B×M buffers dominate. The reference keeps S, the logits,
# the mask and the softmax alive through the backward (measured: ~5.5 fp32 B×M), torch.compile fuses about half away.
def _inputs(s):
    return 6 * s["B"] * s["d"] * F32


_mem_reference = pair_buffers(6, _inputs)
_mem_compiled = pair_buffers(3, _inputs)
_mem_chunked = block_buffers(3, BLOCK, _inputs)


def _label(s):
    return f"B=M={s['B']} d={s['d']} labels={s.get('labels', '4/class')}"


PROVIDERS = loss_providers(
    "batch_softmax", make_inputs, mem_reference=_mem_reference, mem_compiled=_mem_compiled,
    mem_fused=_inputs,
    cpu_extra=(Provider("chunked-pytorch", _chunked_setup, device="cpu", mem_bytes=_mem_chunked),),
)


def _sweep(bs, d=256, only=None):
    return sweep(bs, d, only, labels="4/class")


SHAPES = {
    # `make bench`: one shape, a few seconds per cell on 2 cores, still shows the fused speedup.
    "quick": _sweep([1024], only=QUICK),
    # `--op batch_softmax`: the target shapes, plus the sweep for the plots and a labels=None case.
    "targets": _sweep([8192])
    + [{"B": 32768, "d": 128, "labels": "4/class", "only": ["reference"] + FUSED}]
    + _sweep([1024, 2048, 4096])
    + [{"B": 4096, "d": 256, "labels": "none", "only": ["reference", "flashdml-cpu", "chunked-pytorch"] + GPU}],
}
SHAPES["full"] = SHAPES["targets"] + _sweep([16384])

OP = Op(
    name="batch_softmax",
    shapes=SHAPES,
    providers=PROVIDERS,
    flops=lambda s: 8.0 * s["B"] * s["B"] * s["d"],
    unit="fwd+bwd",
    sweep="B",
    plot_where={"d": 256, "labels": "4/class"},
    label=_label,
)
