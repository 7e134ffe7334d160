"""Small tensor helpers shared by the reference and the fused paths."""
from __future__ import annotations

import torch
from torch import Tensor

NORM_EPS = 1e-12


def _row_scale(x: Tensor) -> Tensor:
    """Per row, the largest |entry| (1 for an all-zero row), detached: rows are divided by it before their norm
    is taken, so the squares cannot overflow (a row of norm 2e19 would square to inf in fp32)."""
    s = x.detach().abs().amax(dim=1, keepdim=True)
    return torch.where(s > 0, s, torch.ones_like(s))


def row_norms(x: Tensor) -> Tensor:
    """``‖x_i‖`` ``[B, 1]`` without overflow in the squares (finite whenever the norm itself is)."""
    s = _row_scale(x)
    return torch.linalg.vector_norm(x / s, dim=1, keepdim=True) * s


def l2_normalize(x: Tensor) -> Tensor:
    """``x / max(||x||, 1e-12)`` row-wise (SPEC section 0); differentiable. Computed as
    ``(x/s) / max(‖x/s‖, 1e-12/s)`` with ``s`` the row's largest |entry|: the same function (its value and
    its gradient do not depend on ``s``), without overflow for huge rows."""
    s = _row_scale(x)
    xs = x / s
    return xs / torch.maximum(torch.linalg.vector_norm(xs, dim=1, keepdim=True), NORM_EPS / s)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 inputs are accumulated in fp32; float64 stays float64 (reference only)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalized_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x̂, ‖x‖)`` for the GPU kernels: norms ``[B, 1]`` in fp32, ``x̂ = x / max(‖x‖, 1e-12)`` cast back to
    ``x.dtype`` (the tensor-core GEMMs read fp16/bf16 rows). Not differentiable: the backward ops map their
    gradients back with ``normalized_rows_backward``."""
    xf = x.detach().float()
    return l2_normalize(xf).to(x.dtype), row_norms(xf)


def normalized_rows_backward(g: Tensor, x: Tensor) -> Tensor:
    """Gradient with respect to the raw rows ``x`` of a function of ``x̂ = x / max(‖x‖, eps)`` whose gradient with
    respect to ``x̂`` is ``g``: ``(g − x̂ (x̂·g)) / ‖x‖`` where ``‖x‖ >= eps``, ``g / eps`` below (the clamp passes
    no gradient to the norm) — the same as autograd through ``l2_normalize``. Computed in fp32, returned in
    ``x.dtype``."""
    xf = x.detach().float()
    gf = g.float()
    n = row_norms(xf)
    xh = l2_normalize(xf)
    active = (n >= NORM_EPS).to(gf.dtype)
    return ((gf - active * xh * (xh * gf).sum(1, keepdim=True)) / n.clamp_min(NORM_EPS)).to(x.dtype)
