"""Small tensor helpers shared by the reference and the fused paths."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

NORM_EPS = 1e-12


def _row_scale(x: Tensor) -> Tensor:
    """Per row, the power of two just above its largest |entry| (1 for an all-zero row), detached: rows are
    divided by it before their norm is taken, so the squares cannot overflow (a row of norm 2e19 would square
    to inf in fp32). A power of two makes the division exact, so ``(x/s) / ‖x/s‖`` is bit for bit
    ``x / ‖x‖`` wherever the latter does not overflow."""
    amax = x.detach().abs().amax(dim=1, keepdim=True)
    return torch.ldexp(torch.ones_like(amax), torch.frexp(amax).exponent)


def row_norms(x: Tensor) -> Tensor:
    """``‖x_i‖`` ``[B, 1]`` without overflow in the squares (finite whenever the norm itself is)."""
    s = _row_scale(x)
    return torch.linalg.vector_norm(x / s, dim=1, keepdim=True) * s


def l2_normalize(x: Tensor) -> Tensor:
    """``x / max(||x||, 1e-12)`` row-wise (docs/spec.md §0); differentiable. Computed as
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


# ------------------------------------------------------------------------------------------ non-finite inputs
def nan_if_nonfinite(loss: Tensor, *rows: Tensor) -> Tensor:
    """``loss``, or NaN when any of ``rows`` holds a NaN or an infinity — with NaN gradients too (the factor
    multiplies the upstream gradient). One pass over the rows, no host synchronisation; bit-identical to
    ``loss`` (factor 1.0) otherwise. This is the library's rule: a non-finite embedding anywhere in the batch
    makes the loss NaN on every backend, so a diverged run cannot look healthy."""
    finite = torch.stack([torch.isfinite(r).all() for r in rows]).all()
    one = torch.ones((), dtype=loss.dtype, device=loss.device)
    return loss * torch.where(finite, one, one * float("nan"))


def all_finite(*rows: Tensor) -> bool:
    """Whether every entry of ``rows`` is finite (synchronises: for ops that must branch on it)."""
    return all(bool(torch.isfinite(r).all()) for r in rows)


def nan_loss(*rows: Tensor) -> Tensor:
    """A 0-dim NaN (fp32; float64 for float64 rows) that sends NaN gradients to ``rows`` (for ops that cannot run
    on non-finite rows)."""
    dtype = compute_dtype(rows[0].dtype)
    return sum(r.to(dtype).sum() for r in rows) * float("nan")


def nonfinite_gives_nan(fn):
    """Decorator for a loss whose embeddings are its 2-D floating tensor arguments: applies
    :func:`nan_if_nonfinite` to its result."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        rows = [a for a in (*args, *kwargs.values())
                if isinstance(a, Tensor) and a.dim() == 2 and a.is_floating_point()]
        return nan_if_nonfinite(fn(*args, **kwargs), *rows)
    return run
