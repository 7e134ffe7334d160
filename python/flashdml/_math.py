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


def normalized_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x̂, ‖x‖)`` for the GPU kernels: norms ``[B, 1]`` in fp32, ``x̂ = x / max(‖x‖, 1e-12)`` cast back to
    ``x.dtype`` (the tensor-core GEMMs read fp16/bf16 rows). Not differentiable: the backward ops map their
    gradients back with ``normalized_rows_backward``."""
    xf = x.detach().float()
    n = torch.linalg.vector_norm(xf, dim=1, keepdim=True)
    return (xf / n.clamp_min(NORM_EPS)).to(x.dtype), n


def normalized_rows_backward(g: Tensor, x: Tensor) -> Tensor:
    """Gradient with respect to the raw rows ``x`` of a function of ``x̂ = x / max(‖x‖, eps)`` whose gradient with
    respect to ``x̂`` is ``g``: ``(g − x̂ (x̂·g)) / ‖x‖`` where ``‖x‖ >= eps``, ``g / eps`` below (the clamp passes
    no gradient to the norm) — the same as autograd through ``l2_normalize``. Computed in fp32, returned in
    ``x.dtype``."""
    xf = x.detach().float()
    gf = g.float()
    n = torch.linalg.vector_norm(xf, dim=1, keepdim=True)
    xh = xf / n.clamp_min(NORM_EPS)
    active = (n >= NORM_EPS).to(gf.dtype)
    return ((gf - active * xh * (xh * gf).sum(1, keepdim=True)) / n.clamp_min(NORM_EPS)).to(x.dtype)
