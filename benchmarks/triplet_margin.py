"""Triplet margin (pytorch-metric-learning's TripletMarginLoss, margin 0.05: every triplet, L2 distance of
normalised rows, AvgNonZeroReducer), fp32, forward+backward, self mode, d = 512, 4 samples per class; see
pml_pair.py for the providers and shapes.

pml lists every triplet: T = B·3·(B − 4) (3.1 M at B = 1024, 50 M at 4096), three int64 index tensors plus the
gathered distances and hinges (~64 bytes a triplet with autograd's copies), and while B³ < 2³¹ it finds them in
a B×B×B uint8 tensor (1 GiB at B = 1024; above that it loops over the anchors). The reference and the fused op
never build that list (the reference goes one positive rank at a time).

FLOPs per call = 8·B²·d, the GEMM work of S forward, S recomputed, dx, dy (the per-triplet work, B²·3 compares
and adds per anchor row, is not counted).
"""
from __future__ import annotations

from .pml_pair import PER_CLASS, inputs_bytes, make_op, pair_buffers

KWARGS = {"margin": 0.05}  # measured at B = 1024: reference 33 MiB (~6 B×B buffers), pml 1.1 GiB


def triplets(s) -> int:
    B = s["B"]
    return B * (PER_CLASS - 1) * (B - PER_CLASS)


def _mem_pml(s):
    B = s["B"]
    cube = B ** 3 if B ** 3 < 2 ** 31 - 1 else 0  # the vectorised search's uint8 B×B×B tensor
    return cube + 64 * triplets(s) + pair_buffers(4, inputs_bytes)(s)


OP = make_op("triplet_margin", "TripletMarginLoss", KWARGS, mem_reference=pair_buffers(7, inputs_bytes),
             mem_compiled=pair_buffers(6, inputs_bytes), mem_pml=_mem_pml)
