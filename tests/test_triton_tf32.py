"""The TF32 opt-in of the fp32 Triton kernels (``_tiles.precision``), on CPU under the interpreter.

``triton_numerics.tensor_core_dots()`` makes every interpreted ``tl.dot`` with ``input_precision="tf32"`` round its
fp32 operands to TF32 (the plain interpreter ignores the precision), so the opt-in shows here as it would on a GPU.
Forward and backward both run inside the mode and under the same flags.

Tolerances. With unit rows (every op below normalises), one S entry computed from TF32-rounded operands (unit
roundoff u = 2^-11, each operand relatively) and summed in fp32 is off by at most
``δS = 2u + u² + (d + 2)·2^-24`` (Σ|x_k y_k| ≤ 1 by Cauchy–Schwarz). Each loss is then within ``lip · δS`` of
the float64 reference, ``lip`` being its Lipschitz constant in the max-norm of S: log-sum-exp and linear terms are
1-Lipschitz, so 2/τ for the softmax losses (a row's LSE plus its positive logit), 2 for multi-similarity (two
log(1 + Σ exp) terms divided by their own scale), pos_weight + neg_weight for the TCM mean hinges (as long as no
pair is within δS of a margin, which changes a count; the margins are in the tails of these cosines), 1/min d for
triplet (d = √(2 − 2s) on unit rows; no triplet within δS of its hinge, as for TCM), 4/ε for the contextual
loss (its band weights move with S/ε; the data are chosen so that no neighbourhood changes, ``_context_seed``).
kNN values are order statistics, each within δS. Gradients: every product of the backward rounds its operands to
TF32 as well, and their weights move with S/τ, so we allow a relative error of ``16·u/τ_eff`` in norm (observed:
about u); it is loose, but a wrong tile precision in one direction or an S that differs between forward and
backward (a neighbourhood or hinge decision taken on other values: 4e-2 in the contextual gradient when a
half-neighbourhood flips) shows up far above it. The opt-out must meet the same bounds with fp32's
``(d + 4)·2^-24`` in place of δS (and ``64·d·2^-24/τ_eff`` for the gradients); TF32's errors exceed that for
most families but not all (triplet's and the contextual loss's loss values barely move), so
``test_opt_out_is_todays_result`` also pins the opt-out's launches to "ieee" and its bits to the old code's.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Every test starts from PyTorch's defaults (no TF32) and leaves the flags as it found them (tests/conftest.py).
pytestmark = [pytest.mark.skipif(not INTERPRET, reason="checks the interpreter's dot (TRITON_INTERPRET=1)"),
              pytest.mark.usefixtures("restore_precision_flags")]

import flashdml as fd  # noqa: E402
from flashdml.triton_kernels import _tiles  # noqa: E402
from triton_numerics import tensor_core_dots  # noqa: E402

U = 2.0**-11
B, D = 32, 32
TAU = 0.1
DELTA_S = 2 * U + U * U + (D + 2) * 2.0**-24




def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"


def test_opt_in_follows_pytorch_flags():
    matmul = torch.backends.cuda.matmul
    assert _tiles.precision(torch.float32) == "ieee" and not _tiles.tf32_opted_in()
    assert _tiles.precision(torch.float16) == _tiles.precision(torch.bfloat16) == "tf32"
    torch.set_float32_matmul_precision("high")
    assert _tiles.precision(torch.float32) == "tf32"
    assert _tiles.precision(torch.float32, exact=True) == "ieee"
    torch.set_float32_matmul_precision("highest")
    assert _tiles.precision(torch.float32) == "ieee"
    matmul.allow_tf32 = True
    assert _tiles.precision(torch.float32) == "tf32"
    matmul.allow_tf32 = False
    assert _tiles.precision(torch.float32) == "ieee"
    matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"  # the generic setting, inherited by cuda matmul ...
    assert _tiles.precision(torch.float32) == "tf32"
    matmul.fp32_precision = "ieee"  # ... unless matmul says otherwise
    assert _tiles.precision(torch.float32) == "ieee"


def _data(seed: int = 0, b: int = B):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, D, generator=g), torch.randint(0, 6, (b,), generator=g),
            torch.randn(b, D, generator=g))


CONTEXT_B = 16  # fewer pairs, so that a seed with no pair near a band edge is quickly found


def _context_seed(k: int, eps: float) -> int:
    """The first seed whose neighbourhood bands are TF32-safe: every float64 distance D_ij = 2 − 2S_ij is more
    than 4·δS away from its row's band edges D_(k) + eps and D_(k//2) + eps (S off by δS moves D_ij and the
    k-th distance by 2·δS each), so N(i) and the half-neighbourhood are the same in float64 and in TF32; the
    loss and gradient are then smooth in S."""
    for seed in range(200):
        x = torch.nn.functional.normalize(_data(seed, CONTEXT_B)[0].double(), dim=1)
        dist = (2 - 2 * x @ x.T).clamp_min(0)
        srt = dist.sort(1).values
        edges = (srt[:, k - 1:k] + eps, srt[:, k // 2 - 1:k // 2] + eps)  # N(i) and the half-neighbourhood
        if all(((dist - e).abs() > 4 * DELTA_S).all() for e in edges):
            return seed
    raise AssertionError("no TF32-safe seed")


def _min_dist(x: torch.Tensor) -> float:
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    return math.sqrt((2 - 2 * xn @ xn.T).clamp_min(0).fill_diagonal_(4).min().item())


# name -> (fn(module, x, labels, y), Lipschitz constant of the output in max|ΔS|, 1/τ_eff of the gradient)
CASES = {
    "batch_softmax": (lambda m, x, lab, y: m.batch_softmax(x, y, temperature=TAU), 2 / TAU, 1 / TAU),
    "ntxent": (lambda m, x, lab, y: m.ntxent(x, lab, temperature=TAU), 2 / TAU, 1 / TAU),
    "threshold_consistent_margin": (lambda m, x, lab, y: m.threshold_consistent_margin(x, lab), 2.0, 1.0),
    "multi_similarity": (lambda m, x, lab, y: m.multi_similarity(x, lab), 2.0, 50.0),
    "triplet_margin": (lambda m, x, lab, y: m.triplet_margin(x, lab), None, 1.0),
    "contextual_loss": (lambda m, x, lab, y: m.contextual_loss(x, lab, k=4, contrastive_weight=0.0), None, 1.0),
    "knn": (lambda m, x, lab, y: m.knn(x, k=5)[0], 1.0, 1.0),
}


def _run(name, module, x, lab, y, dtype=None):
    fn = CASES[name][0]
    xx = x.to(dtype or x.dtype).clone().requires_grad_()
    out = fn(module, xx, lab, y.to(xx.dtype))
    out.sum().backward()
    return out.detach().double(), xx.grad.double()


def _triton(name, x, lab, y, tf32: bool):
    _set_tf32(tf32)
    with fd.backend("triton"), tensor_core_dots():
        return _run(name, fd, x, lab, y)


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_with_tf32_opt_in(name):
    x, lab, y = _data(_context_seed(4, 0.05), CONTEXT_B) if name == "contextual_loss" else _data()
    ref, ref_grad = _run(name, fd.reference, x, lab, y, torch.float64)
    off, off_grad = _triton(name, x, lab, y, False)
    on, on_grad = _triton(name, x, lab, y, True)
    _, lip, inv_tau = CASES[name]
    if name == "triplet_margin":
        lip = 1.0 / _min_dist(x)  # d = sqrt(2 - 2s): |dd/ds| = 1/d
    if name == "contextual_loss":
        lip = 4.0 / 0.05  # the band weights move with S / eps (no band change, see _context_seed)
    # the opt-in agrees with float64 to the TF32 bound ...
    assert (on - ref).abs().max().item() <= lip * DELTA_S, (name, (on - ref).abs().max().item())
    grad_tol = 16 * U * inv_tau
    assert ((on_grad - ref_grad).norm() / ref_grad.norm()).item() <= grad_tol, name
    # ... is really taken (TF32 rounding shows) ...
    assert not torch.equal(on, off) or not torch.equal(on_grad, off_grad), name
    # ... and opting out keeps exact fp32 products: to the fp32 bound (u = 2^-24), far below TF32's
    fp32_delta = (D + 4) * 2.0**-24
    assert (off - ref).abs().max().item() <= lip * fp32_delta, (name, (off - ref).abs().max().item())
    assert ((off_grad - ref_grad).norm() / ref_grad.norm()).item() <= 64 * 2.0**-24 * inv_tau * D, name


@pytest.mark.parametrize("name", ["ntxent", "threshold_consistent_margin"])
def test_opt_out_is_todays_result(name, monkeypatch):
    """With the flags at PyTorch's defaults the fp32 launches get PRECISION="ieee", and the result is bit for bit
    that of the pre-opt-in code (precision() pinned to "ieee")."""
    x, lab, y = _data()
    seen = []
    real = _tiles.precision

    def spy(dtype, exact=False):
        seen.append(real(dtype, exact))
        return seen[-1]

    torch.backends.cuda.matmul.fp32_precision = "none"
    monkeypatch.setattr(_tiles, "precision", spy)
    with fd.backend("triton"), tensor_core_dots():
        now = _run(name, fd, x, lab, y)
    assert seen and set(seen) == {"ieee"}
    monkeypatch.setattr(_tiles, "precision", lambda dtype, exact=False: "ieee" if dtype == torch.float32 else "tf32")
    with fd.backend("triton"), tensor_core_dots():
        old = _run(name, fd, x, lab, y)
    assert torch.equal(now[0], old[0]) and torch.equal(now[1], old[1])
