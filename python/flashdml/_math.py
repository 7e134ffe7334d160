"""Small tensor helpers shared by the reference and the fused paths."""
from __future__ import annotations

import torch
from torch import Tensor

NORM_EPS = 1e-12


def l2_normalize(x: Tensor) -> Tensor:
    """``x / max(||x||, 1e-12)`` row-wise (SPEC section 0); differentiable."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(NORM_EPS)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 inputs are accumulated in fp32; float64 stays float64 (reference only)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
