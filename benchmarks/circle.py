"""Circle loss (pytorch-metric-learning's CircleLoss, m 0.4, gamma 80), fp32, forward+backward, self mode,
d = 512, 4 samples per class; see pml_pair.py for the providers and shapes.

pml's loss is matrix-based (the B×B similarity, masks, the weighted logits matrix, two masked log-sum-exps),
O(B²) memory. FLOPs per call = 8·B²·d (S forward, S recomputed, dx, dy).
"""
from __future__ import annotations

from .pml_pair import inputs_bytes, make_op, pair_buffers

KWARGS = {"m": 0.4, "gamma": 80.0}
# fp32 B×B buffers at the peak, measured at B = 1024 (40 and 66 MiB): reference ~8, pml ~14.5
REF, PML = 9, 15

OP = make_op("circle", "CircleLoss", KWARGS, mem_reference=pair_buffers(REF, inputs_bytes),
             mem_compiled=pair_buffers(4, inputs_bytes), mem_pml=pair_buffers(PML, inputs_bytes))
