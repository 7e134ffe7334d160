"""Multi-Similarity (pytorch-metric-learning's MultiSimilarityLoss, alpha 2, beta 50, base 0.5), fp32,
forward+backward, self mode, d = 512, 4 samples per class; see pml_pair.py for the providers and shapes.

pml's loss is matrix-based (the B×B similarity, masks, two masked log-sum-exps with an extra zero column),
O(B²) memory. FLOPs per call = 8·B²·d (S forward, S recomputed, dx, dy).
"""
from __future__ import annotations

from .pml_pair import inputs_bytes, make_op, pair_buffers

KWARGS = {"alpha": 2.0, "beta": 50.0, "base": 0.5}
# fp32 B×B buffers at the peak, measured at B = 1024 (26 and 55 MiB): reference ~5, pml ~12
REF, PML = 6, 13

OP = make_op("multi_similarity", "MultiSimilarityLoss", KWARGS, mem_reference=pair_buffers(REF, inputs_bytes),
             mem_compiled=pair_buffers(4, inputs_bytes), mem_pml=pair_buffers(PML, inputs_bytes))
