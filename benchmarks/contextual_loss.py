"""Contextual loss (docs/spec.md §2.5), fp32, forward+backward, k = 4, ε = 0.05 (the paper's 256-px setting), labels
arange(B) // 4 (4 samples per class).

Providers: the reference (the paper's formulation: every step a B×B matrix, 18·B³ + 6·B²·d FLOPs, ~21·B² fp32
words), torch.compile(reference), and the fused kernels (flashdml-cpu: one streaming GEMM pass over S tiles for the
neighbour lists and the margin-contrastive sums, an O(B·k²) sparse stage, the closed-form backward without any B×B
matrix; flashdml-triton and flashdml-cuda, the same algorithm on CUDA tensors, with the sparse stage as device
tensor ops). reference-cuda runs the reference on a GPU when there is one.

Inputs: random rows (the default), or `input="duplicate_clusters"`: two clusters of identical rows (+1 and −1), so
every ε-band holds half the batch — the worst case of the fused op's sparse stage (~B·|N|²), where the CPU op
switches to its dense B×B path.

FLOPs per call (for the GEMM-ceiling column) = 8·B²·d: the fused algorithm's GEMM work — the forward S pass and,
backward, S recomputed, G F and Gᵀ F.
"""
from __future__ import annotations

import torch

from .harness import Op, loss_providers, sweep

K, EPS = 4, 0.05
PER_CLASS = 4
F32 = 4


def make_inputs(shape: dict, device: str):
    g = torch.Generator().manual_seed(0)
    B, d = shape["B"], shape["d"]
    if shape.get("input") == "duplicate_clusters":
        x = torch.cat([torch.ones(B // 2, d), -torch.ones(B - B // 2, d)]).to(device).requires_grad_()
    else:
        x = torch.randn(B, d, generator=g).to(device).requires_grad_()
    labels = (torch.arange(shape["B"]) // PER_CLASS).to(device)
    return (x, labels), {"k": K, "eps": EPS}


def _inputs(s):
    return 4 * s["B"] * s["d"] * F32


def _mem_reference(s):
    """~21 live B×B fp32 buffers (docs/spec.md §2.5) plus autograd's saved copies: predicted 30·B² words."""
    return 30 * s["B"] * s["B"] * F32 + _inputs(s)


def _mem_fused(s):
    return _inputs(s) + 64 * 1024**2


def _label(s):
    extra = f" {s['input']}" if s.get("input") else ""
    return f"B={s['B']} d={s['d']} k={K} 4/class{extra}"


PROVIDERS = loss_providers("contextual_loss", make_inputs, mem_reference=_mem_reference,
                           mem_compiled=_mem_reference, mem_fused=_mem_fused)


def _sweep(bs, d=512, only=None):
    return sweep(bs, d, only)


SHAPES = {
    "quick": _sweep([1024], only=["reference", "flashdml-cpu", "reference-cuda", "flashdml-triton",
                                 "flashdml-cuda"]),
    # `--op contextual_loss`: the target shapes; at B = 16384 the reference's ~32 GiB prediction skips it.
    # plus the wide-band worst case: two clusters of duplicate rows (every |N(i)| = B/2).
    "targets": _sweep([128, 1024, 4096, 16384]) + sweep([2048], 32, input="duplicate_clusters"),
}
SHAPES["full"] = SHAPES["targets"] + _sweep([2048, 8192])

OP = Op(
    name="contextual_loss",
    shapes=SHAPES,
    providers=PROVIDERS,
    flops=lambda s: 8.0 * s["B"] * s["B"] * s["d"],
    unit="fwd+bwd",
    sweep="B",
    plot_where={"d": 512},
    label=_label,
)
