"""SupCon (pytorch-metric-learning's SupConLoss, temperature 0.1), fp32, forward+backward, self mode, d = 512,
4 samples per class; see pml_pair.py for the providers and shapes.

pml's SupConLoss is matrix-based: the B×B similarity, its masks and log-probabilities, O(B²) memory (about ten
fp32 B×B buffers with autograd's copies), so it runs at B = 4096 (~0.7 GiB predicted) but not at 16384.
FLOPs per call = 8·B²·d (S forward, S recomputed, dx, dy), the fused algorithm's GEMM work.
"""
from __future__ import annotations

from .pml_pair import inputs_bytes, make_op, pair_buffers

KWARGS = {"temperature": 0.1}
# fp32 B×B buffers at the peak, measured at B = 1024 (27 and 49 MiB): reference ~5, pml ~10 (with margin)
REF, PML = 6, 11

OP = make_op("supcon", "SupConLoss", KWARGS, mem_reference=pair_buffers(REF, inputs_bytes),
             mem_compiled=pair_buffers(4, inputs_bytes), mem_pml=pair_buffers(PML, inputs_bytes))
