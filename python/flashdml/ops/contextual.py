"""Contextual loss, fused (SPEC 2.5): Liao, Tsiligkaridis & Kulis, ICML 2023.

The C++ CPU op ``flashdml::contextual_fwd`` makes one streaming pass over tiles of ``S = F Fᵀ`` that keeps, per
row, only the k largest ``−D`` values and the neighbour list ``N(i)`` (with the flags "in P(i)" and "clamped"),
and the margin-contrastive hinge sums and counts (SPEC 2.4, the per-element rules of ``fd.contrastive_margin``),
then computes ``L_ctx`` from the lists in O(B·k²) and ``L_reg`` in O(B·d). Its backward
(``flashdml::contextual_bwd``) builds SPEC's closed-form straight-through gradient as "sparse (O(k²) per row) +
row-constant + label-block" parts from the lists and applies it without recomputing S: the row-constant and L_reg
terms through column sums (O(B·d)), the label block through per-class sums, the sparse part and the clamp
corrections from the lists, the L_con hard positives per class and the hard negatives (only when the forward
counted any) from the forward's tiles. Memory is O((B + k²)·d + B·k²); nothing B×B is stored. A batch of
B <= 256 is one S tile (at most kTileRows·kTileCols entries): there the op holds S, Z and the closed-form gradient
of L_ctx densely (``csrc/cpu/contextual_one_tile.h``, < 2 MiB) and applies the gradient with one GEMM, which is
several times faster than the sparse bookkeeping at that size.

On CUDA tensors the Triton backend (``triton_kernels/contextual.py``: streamed S tiles for the thresholds, the hinge
terms and the neighbour lists, one recompute pass for the dense part of the gradient) runs the same computation,
with the sparse stage as torch ops on the device (``ops/contextual_device.py``). The CUDA C++ op
(``csrc/cuda/contextual.cu``, backend "cuda") takes the thresholds from the kNN kernels, L_con from the hinge-pair
kernels, writes the lists with its own kernel and runs the sparse stage and backward as ATen ops on the device.
Both GPU backends get L2-normalised rows (normalised here, differentiably).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch, _ext
from .. import reference as _reference
from .._validation import check_real
from ..reference.contextual import _check_contextual_args
from ._registry import register_loss_autograd, rows_for_backend

OP = "contextual_loss"

_INPUTS = ("x", "labels", "k", "eps", "context_weight", "contrastive_weight", "reg_weight", "reg_target",
           "pos_margin", "neg_margin", "ste_slope", "normalize")

HAS_KERNEL = _ext.C_LOADED and hasattr(torch.ops.flashdml, "contextual_fwd")


def _fake_fwd(x, labels, k, eps, context_weight, contrastive_weight, reg_weight, reg_target, pos_margin, neg_margin,
              ste_slope, normalize):
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty((), dtype=torch.float32), x.new_empty((3,), dtype=torch.float32),
            x.new_empty((x.shape[0] + 1,), dtype=torch.int64), x.new_empty((nnz,), dtype=torch.int32),
            x.new_empty((nnz,), dtype=torch.uint8), x.new_empty((2,), dtype=torch.int64))


def _fake_bwd(grad_loss, x, *rest):
    return torch.empty_like(x)


def _bwd(*args):
    return (torch.ops.flashdml.contextual_bwd(*args),)


if HAS_KERNEL:
    torch.library.register_fake("flashdml::contextual_fwd")(_fake_fwd)
    torch.library.register_fake("flashdml::contextual_bwd")(_fake_bwd)
    register_loss_autograd(
        "flashdml::contextual_fwd", _bwd, input_names=_INPUTS, grad_inputs=("x",), saved_outputs=(2, 3, 4, 5),
        attrs=_INPUTS[2:],
    )


def _triton_ops():
    """The Triton contextual ops (normalised rows in, no normalize flag), autograd registered once."""
    from ..triton_kernels import contextual as _tk  # noqa: F401  (defines the flashdml_triton ops)

    if not getattr(_triton_ops, "registered", False):
        register_loss_autograd(
            "flashdml_triton::contextual_fwd", lambda *a: (torch.ops.flashdml_triton.contextual_bwd(*a),),
            input_names=_INPUTS[:-1], grad_inputs=("x",), saved_outputs=(2, 3, 4, 5), attrs=_INPUTS[2:-1])
        _triton_ops.registered = True
    return torch.ops.flashdml_triton


def contextual_loss(
    x: Tensor,
    labels: Tensor,
    *,
    k: int = 4,
    eps: float = 0.05,
    context_weight: float = 0.4,
    contrastive_weight: float = 0.5,
    reg_weight: float = 0.1,
    reg_target: float = 0.25,
    pos_margin: float = 0.75,
    neg_margin: float = 0.6,
    ste_slope: float = 10.0,
    normalize: bool = True,
) -> Tensor:
    """Contextual loss (SPEC 2.5): ``context_weight·L_ctx + reg_weight·L_reg + contrastive_weight·L_con``.

    Self mode only. ``F`` = the L2-normalised rows of ``x`` (``normalize=False``: the rows as given, which should
    already be unit vectors), ``S = F Fᵀ``, ``D = max(2 − 2S, 0)``, ``y_ij = [labels_i == labels_j]``.

    * ``L_ctx``: neighbourhoods ``N_ij = [fl(−D_ij + ε) >= t_i]`` and ``P_ij = [fl(−D_ij + ε) >= h_i]`` in fp32
      (``t_i`` / ``h_i`` = the k-th / (k//2)-th largest ``−D_i``, the query included; inclusive, so ties and the
      whole ε band count), Jaccard-like ``W = ½(I + J)`` on N, reciprocal half-neighbourhoods ``R = P ⊙ Pᵀ``,
      query expansion ``Z = (1/|R|) R W``, ``js = ½(Z + Zᵀ)``; ``(1/B²) Σ_{i≠j} (y_ij − js_ij)²``.
    * ``L_reg = (mean_ij S_ij − reg_target)²`` (diagonal included).
    * ``L_con`` = ``contrastive_margin`` (SPEC 2.4, diagonal kept as a positive) with ``pos_margin``,
      ``neg_margin``.

    Gradient: the authors' straight-through estimator (each Heaviside step passes ``ste_slope`` to ``−D + ε`` on
    every entry; thresholds and |N| detached, |R| not), computed from SPEC's closed form.

    Published settings:

    * 256-px setting (the defaults): ``k=4, eps=0.05, context_weight=0.4, contrastive_weight=0.5,
      reg_weight=0.1, reg_target=0.25, pos_margin=0.75, neg_margin=0.6``.
    * 224-px setting: ``context_weight = 1 − lam, contrastive_weight = lam, reg_weight = 0.1,
      reg_target = 0.3, k = samples per class``; CUB: ``lam = 0.05, eps = 0.04``; Cars196 and SOP:
      ``lam = 0.2, eps = 0.05``.

    Args:
        x: embeddings ``[B, d]`` (fp32, fp16 or bf16; float64 runs on the reference).
        labels: int ``[B]`` (required).
        k: neighbourhood size, ``2 <= k <= B``.
        eps: the ε band (>= 0), compared in fp32.

    Returns a 0-dim fp32 loss; the gradient comes back in the input dtype. Cost O(B²·d) for the one GEMM pass
    plus O(B·k²·d) (sparse stage and backward); memory O((B + k²)·d + B·k²), nothing B×B. Raises ``ValueError``
    for ``k`` outside ``[2, B]``, ``eps < 0`` and a collapsed batch (a row with ``|N(i)| = B``).

    Example::

        loss = flashdml.contextual_loss(emb, labels)                       # 256-px setting
        loss = flashdml.contextual_loss(emb, labels, k=4, eps=0.04,        # 224-px setting, CUB
                                        context_weight=0.95, contrastive_weight=0.05, reg_target=0.3)
        loss.backward()
    """
    batch, k, eps, ste_slope = _check_contextual_args(x, labels, k, eps, ste_slope)
    context_weight = check_real(context_weight, "context_weight")
    contrastive_weight = check_real(contrastive_weight, "contrastive_weight")
    reg_weight = check_real(reg_weight, "reg_weight")
    reg_target = check_real(reg_target, "reg_target")
    pos_margin = check_real(pos_margin, "pos_margin")
    neg_margin = check_real(neg_margin, "neg_margin")
    normalize = bool(normalize)
    name = "reference" if batch.x.dtype == torch.float64 else _dispatch.resolve(OP, batch.x.device)
    if name == "reference":
        return _reference.contextual_loss(
            x, labels, k=k, eps=eps, context_weight=context_weight, contrastive_weight=contrastive_weight,
            reg_weight=reg_weight, reg_target=reg_target, pos_margin=pos_margin, neg_margin=neg_margin,
            ste_slope=ste_slope, normalize=normalize)
    if name == "triton":  # rows normalised (differentiably) before the kernels, as for the other Triton ops
        xh = rows_for_backend(name, batch.x, None, normalize, self_mode=True)[0]
        return _triton_ops().contextual_fwd(
            xh, batch.labels.contiguous(), k, eps, context_weight, contrastive_weight, reg_weight, reg_target,
            pos_margin, neg_margin, ste_slope)[0]
    if not HAS_KERNEL:
        raise RuntimeError("flashdml.contextual_loss: flashdml._C was built without the contextual ops; rebuild it "
                           "with `pip install -e . --no-build-isolation`")
    # CPU: raw rows + normalize (the kernel normalises); CUDA: normalised rows, normalize=False
    xk, _, flag = rows_for_backend(name, batch.x, None, normalize, self_mode=True)
    return torch.ops.flashdml.contextual_fwd(
        xk, batch.labels.contiguous(), k, eps, context_weight, contrastive_weight, reg_weight,
        reg_target, pos_margin, neg_margin, ste_slope, flag)[0]
