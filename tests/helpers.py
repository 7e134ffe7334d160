"""Comparing a fused backend with the reference: values and gradients, on poisoned outputs.

``check_against_reference`` runs an op twice on identical inputs — once through ``fd.reference`` in float64
(the oracle, from the same fp32 inputs upcast) and once through a fused backend under ``poison_outputs()`` —
then compares the loss and the gradients of every differentiable input (a random upstream gradient is used,
so a backward that ignores it fails). Tolerances are ``atol + rtol * max|reference|`` per tensor.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import pytest
import torch

import flashdml as fd
from flashdml._debug import poison_outputs

# Ragged shapes: B not a multiple of any tile (CPU tiles are 128 x 512, Triton 64/128), d = 1, 3, 129.
SMALL_SHAPES = [(1, 1), (2, 3), (5, 1), (37, 129), (70, 3), (130, 16)]
CPU_SHAPES = SMALL_SHAPES + [(257, 33), (600, 129), (1030, 64)]


FUSED_BACKENDS = ("cpu", "triton", "cuda")


def device_of(backend: str) -> torch.device:
    """Where a backend runs here: "cpu" on the CPU, "cuda" on the GPU, "triton" on the GPU when there is one,
    else on CPU tensors under the interpreter."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def backend_params():
    """pytest params for every fused backend (cpu, triton, cuda), each skipped with its reason when it cannot run
    on this machine; a test gets the backend's name and runs its tensors on ``device_of(name)``."""
    status = fd.available_backends()
    out = []
    for name in FUSED_BACKENDS:
        ok, why = status[name]
        marks = [] if ok else [pytest.mark.skip(reason=f"{name}: {why}")]
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def clustered(B: int, d: int, n_classes: int, *, seed: int = 0, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Embeddings near their class centre (so positives are similar) and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, max(n_classes, 1), (B,), generator=g)
    centres = torch.randn(max(n_classes, 1), d, generator=g)
    x = centres[labels] + 0.7 * torch.randn(B, d, generator=g)
    return x.to(dtype), labels


def _close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got64 = got.detach().double()
    want64 = want.detach().double()
    assert torch.isfinite(got64).all(), f"{name}: non-finite values (unwritten poisoned output?)"
    err = (got64 - want64).abs().max().item() if got64.numel() else 0.0
    scale = want64.abs().max().item() if want64.numel() else 0.0
    assert err <= atol + rtol * scale, f"{name}: max abs error {err:.3e} > {atol:.1e} + {rtol:.1e} * {scale:.3e}"


def check_against_reference(
    op: str,
    backend: str,
    tensors: Dict[str, Optional[torch.Tensor]],
    kwargs: Dict,
    *,
    grad_names: Sequence[str] = ("x", "y"),
    rtol: float = 1e-4,
    atol: float = 1e-6,
    upstream: float = 0.7,
    atol_by_name: Optional[Dict[str, float]] = None,
) -> None:
    """Loss and gradients of ``fd.<op>`` on ``backend`` vs ``fd.reference.<op>`` in float64.

    ``atol_by_name`` overrides ``atol`` for one gradient: dL/dτ = −Σ G⊙z / τ sums terms of size O(1/τ) that
    can cancel to ~0 (e.g. when every logit is equal), so its fp32 error is absolute, ~1e-6 · Σ|G z| / τ."""

    def leaves(dtype_for_ref: bool):
        out = {}
        for k, v in tensors.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v = v.detach().double() if dtype_for_ref else v.detach().clone()
                out[k] = v.requires_grad_(k in grad_names)
            else:
                out[k] = v
        return out

    ref_in = leaves(True)
    ref_loss = getattr(fd.reference, op)(**ref_in, **kwargs)
    (ref_loss * upstream).backward()

    device = device_of(backend)
    fused_in = {k: (v.to(device).detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
                for k, v in leaves(False).items()}
    with fd.backend(backend), poison_outputs():
        loss = getattr(fd, op)(**fused_in, **kwargs)
        assert loss.dtype == torch.float32 and loss.dim() == 0, f"loss must be a 0-dim fp32 tensor, got {loss.dtype} {tuple(loss.shape)}"
        (loss * upstream).backward()

    _close(f"{op}[{backend}] loss", loss.cpu(), ref_loss, rtol, atol)
    for k in grad_names:
        if k not in ref_in or ref_in[k] is None:
            continue
        assert fused_in[k].grad is not None, f"{op}[{backend}]: no gradient for {k}"
        assert fused_in[k].grad.dtype == fused_in[k].dtype, f"{k}.grad dtype {fused_in[k].grad.dtype} != input dtype"
        _close(f"{op}[{backend}] d{k}", fused_in[k].grad.cpu(), ref_in[k].grad, rtol, (atol_by_name or {}).get(k, atol))



# ------------------------------------------------------------------ normalize=True on raw rows (the fused ops' flag)
U32 = 2.0**-24  # fp32 unit roundoff
TINY_NORM = 1e-13  # below l2_normalize's clamp (1e-12): the row is divided by 1e-12, its gradient is g / 1e-12


def varied_norm_rows(unit: torch.Tensor, seed: int, tiny_row: bool = False) -> torch.Tensor:
    """fp32 raw rows: the (unit) rows of ``unit`` times norms spread log-uniformly over [1e-3, 1e3]; with
    ``tiny_row`` the last row gets the norm ``TINY_NORM``, where the normalisation clamps."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** (6 * torch.rand(unit.shape[0], 1, generator=g, dtype=torch.float64) - 3)
    if tiny_row and unit.shape[0] > 1:
        scale[-1] = TINY_NORM
    return (unit.double().cpu() * scale).float().to(unit.device)


def normalization_d(d: int) -> int:
    """The ``d`` at which to evaluate a kernel test's error bound (derived for inputs given exactly in fp32, a
    similarity off by about d·u) when the op normalises raw rows itself and is compared with float64 on the exact
    x / ‖x‖: the fp32 x̂ differs from it by <= (d/2 + 2)·u in 2-norm (d-term fp32 sum of squares, sqrt, divide),
    so every similarity moves by up to (d + 4)·u more: d·u + (d + 4)·u = (2d + 4)·u."""
    return 2 * d + 4


def raw_row_grad_tolerance(tol_hat, g_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row bound [n, 1] on |fused dx_raw − exact dx_raw| for dx_raw = (g − x̂(x̂·g)) / max(‖x‖, 1e-12).

    ``tol_hat``: the elementwise bound of the kernel's gradient with respect to x̂ (scalar, [n, 1] or [n, d]; taken
    per row), ``g_hat``: that gradient (the kernel's, normalize=False on the op's x̂), ``x``: the raw rows.
    * the kernel's error δg maps through (I − x̂x̂ᵀ) / ‖x‖, whose 2-norm is <= 1/‖x‖: |·|∞ <= √d·|δg|∞ / ‖x‖;
    * the map itself in fp32 (normalized_rows_backward): the d-term dot x̂·g, x̂ (<= (d/2 + 2)·u), the norm, the
      subtraction, the division and the output rounding stay below (2d + 8)·u·‖g‖₂ / ‖x‖, with
      ‖g‖₂ <= ‖g̃‖₂ + √d·|δg|∞."""
    n, d = x.shape
    t = torch.as_tensor(tol_hat, dtype=torch.float64).cpu()
    t = t.expand(n, d).amax(1, keepdim=True) if t.dim() else t.expand(n, 1)
    g_norm = torch.linalg.vector_norm(g_hat.double().cpu(), dim=1, keepdim=True) + d**0.5 * t
    norm = torch.linalg.vector_norm(x.double().cpu(), dim=1, keepdim=True).clamp_min(1e-12)
    return (d**0.5 * t + (2 * d + 8) * U32 * g_norm) / norm


def assert_rows_close(name: str, actual: torch.Tensor, expected: torch.Tensor, row_tol: torch.Tensor) -> None:
    """|actual − expected| <= row_tol (per row, [n, 1]) elementwise; no NaN."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    assert not torch.isnan(a).any(), f"{name}: NaN (unwritten poisoned output or NaN result)"
    err = (a - expected.detach().double().cpu()).abs()
    bound = row_tol.expand_as(err)
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (f"{name}: error {err.reshape(-1)[worst]:.3e} > tolerance "
                                        f"{bound.reshape(-1)[worst]:.3e} at flat index {int(worst)}")


def exact_unit_rows(x: torch.Tensor) -> torch.Tensor:
    """float64 (CPU) x / max(‖x‖, 1e-12) of the raw rows: what the float64 reference multiplies."""
    x = x.detach().double().cpu()
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
