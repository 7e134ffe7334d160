"""Contextual loss, fused (docs/spec.md §2.5): Liao, Tsiligkaridis & Kulis, ICML 2023.

The C++ CPU op ``flashdml::contextual_fwd`` makes one streaming pass over tiles of ``S = F Fᵀ`` that keeps, per
row, only the k largest ``−D`` values and the neighbour list ``N(i)`` (with the flags "in P(i)" and "clamped"),
and the margin-contrastive hinge sums and counts (docs/spec.md §2.4, the per-element rules of ``fd.contrastive_margin``),
then computes ``L_ctx`` from the lists in O(B·k²) and ``L_reg`` in O(B·d). Its backward
(``flashdml::contextual_bwd``) builds docs/spec.md's closed-form straight-through gradient as "sparse (O(k²) per row) +
row-constant + label-block" parts from the lists and applies it without recomputing S: the row-constant and L_reg
terms through column sums (O(B·d)), the label block through per-class sums, the sparse part and the clamp
corrections from the lists, the L_con hard positives per class and the hard negatives (only when the forward
counted any) from the forward's tiles. Memory is O((B + k²)·d + B·k²); nothing B×B is stored. A batch of
B <= 256 is one S tile (at most kTileRows·kTileCols entries): there the op holds S, Z and the closed-form gradient
of L_ctx densely (``csrc/cpu/contextual_one_tile.h``, < 2 MiB) and applies the gradient with one GEMM, which is
several times faster than the sparse bookkeeping at that size.

On CUDA tensors the Triton backend (``triton_kernels/contextual.py``: streamed S tiles for the thresholds, the hinge
terms and the neighbour lists, one recompute pass for the dense part of the gradient) and the CUDA C++ op
(``csrc/cuda/contextual.cu``: thresholds from the kNN kernels, L_con from the hinge-pair kernels, its own list
kernel) run the same computation; both run the sparse stage on the device through the one ATen implementation in
``csrc/aten``. Every backend takes the raw rows and ``normalize`` (the GPU ops normalise inside the op).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from .. import reference as _reference
from .._docs import shared_doc
from .._math import all_finite, nan_loss
from .._validation import check_bool, check_contextual_args, check_real, check_unnormalized_rows
from . import registry
from .traced import apply_factor, finite_or_stand_in

OP = "contextual_loss"
FAMILY = registry.register(registry.Family(
    name="contextual",
    reference={OP: _reference.contextual_loss},
    compiled={"contextual_fwd": registry.LossAutograd("contextual_bwd", grad_inputs=("x",),
                                                      saved_outputs=(2, 3, 4, 5))},
    cpp_helpers=("contextual_stage_loss", "contextual_stage_grad", "contextual_stage_grad_parts"),
))


def _distributed_contextual():
    from ..distributed import contextual  # imported on use: it imports this module

    return contextual


@shared_doc
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
    process_group=None,
) -> Tensor:
    """Contextual loss (Liao et al., ICML 2023; docs/spec.md §2.5), self mode only.

    ``L = context_weight·L_ctx + reg_weight·L_reg + contrastive_weight·L_con`` with ``F`` = the rows of ``x``
    (L2-normalised unless ``normalize=False``), ``S = F Fᵀ``, ``D = max(2 − 2S, 0)``, ``y_ij = [labels_i ==
    labels_j]``:

    * ``L_ctx``: neighbourhoods ``N_ij = [fl(−D_ij + ε) >= t_i]`` and ``P_ij = [fl(−D_ij + ε) >= h_i]`` in fp32
      (``t_i`` / ``h_i`` = the k-th / (k//2)-th largest ``−D_i``, the query included; inclusive, so ties and the
      whole ε band count), Jaccard-like ``W = ½(I + J)`` on N, reciprocal half-neighbourhoods ``R = P ⊙ Pᵀ``,
      query expansion ``Z = (1/|R|) R W``, ``js = ½(Z + Zᵀ)``; ``L_ctx = (1/B²) Σ_{i≠j} (y_ij − js_ij)²``.
    * ``L_reg = (mean_ij S_ij − reg_target)²`` (diagonal included).
    * ``L_con`` = :func:`contrastive_margin` (diagonal kept as a positive) with ``pos_margin``, ``neg_margin``.

    Gradient: the authors' straight-through estimator (each Heaviside step passes ``ste_slope`` to ``−D + ε`` on
    every entry; thresholds and |N| detached, |R| not), computed from docs/spec.md's closed form. Cost O(B²·d)
    for one GEMM pass plus O(B·k²·d); memory O((B + k²)·d + B·k²), nothing B×B.

    Published settings: the defaults are the 256-px setting; the 224-px setting is
    ``context_weight = 1 − lam, contrastive_weight = lam, reg_weight = 0.1, reg_target = 0.3, k = samples per
    class``, with ``lam = 0.05, eps = 0.04`` on CUB and ``lam = 0.2, eps = 0.05`` on Cars196 and SOP.

    Args:
        x (Tensor): embeddings ``[B, d]``, fp32, fp16 or bf16 (float64 runs on the reference, in float64).
        labels (Tensor): integer ``[B]``, required.
        k (int): neighbourhood size, ``2 <= k <= B``. Default 4.
        eps (float): the ε band added to ``−D`` before the threshold tests, finite and ``>= 0`` (compared in
            fp32). Default 0.05.
        context_weight (float): weight of ``L_ctx``, finite. Default 0.4.
        contrastive_weight (float): weight of ``L_con``, finite. Default 0.5.
        reg_weight (float): weight of ``L_reg``, finite. Default 0.1.
        reg_target (float): the target of the mean similarity in ``L_reg``, finite. Default 0.25.
        pos_margin (float): ``m+`` of ``L_con``, finite. Default 0.75.
        neg_margin (float): ``m−`` of ``L_con``, finite. Default 0.6.
        ste_slope (float): slope the straight-through estimator gives each step in the backward, finite.
            Default 10.0.
        normalize (bool): L2-normalise the rows first (default ``True``); ``False`` uses them as given, which
            should then already be unit vectors (``D = 2 − 2S`` assumes it).
        {{process_group_loss_arg}}
            The loss is that of the concatenated batch, identical on every rank; the local rows receive W × the
            gradient. Each rank computes its own rows against the gathered batch (thresholds, neighbour lists,
            hinge terms); the O(B·k²) sparse stage runs on every rank on the gathered neighbour lists
            (docs/spec.md §5.2).

    Returns:
        Tensor: the 0-dim fp32 loss (float64 for float64 input); the gradient comes back in the input dtype. NaN
        when ``x`` holds a NaN or an infinity.

    Raises:
        TypeError: ``x`` or ``labels`` that is not a tensor; embeddings that are not fp16, bf16, fp32 or fp64;
            non-integer labels; a non-integer ``k``; a weight, target, margin, ``eps`` or ``ste_slope`` that is
            not a real number; ``normalize`` not a bool.
        ValueError: ``labels`` missing (``None``), not 1-D or not of length B; ``x`` not 2-D or empty; tensors
            on different devices; ``k`` outside ``[2, B]``; ``eps < 0``; a NaN or infinite weight, target,
            margin, ``eps`` or ``ste_slope``; a collapsed batch (a row with ``|N(i)| = B``); with
            ``normalize=False``, a finite row whose squared norm overflows fp32 (norm above ~1.8e19) or a
            regulariser that does (it grows as the fourth power of the norms).
        RuntimeError: an explicitly selected backend that cannot run the call; ``create_graph=True`` through
            the fused backward.

    Example:
        >>> import torch, flashdml as fd
        >>> emb = torch.randn(16, 8, requires_grad=True)
        >>> labels = torch.arange(16) // 4                       # 4 samples per class
        >>> loss = fd.contextual_loss(emb, labels)                # 256-px setting
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
        >>> torch.allclose(loss, fd.reference.contextual_loss(emb, labels), atol=1e-6)
        True
        >>> cub = fd.contextual_loss(emb, labels, k=4, eps=0.04, context_weight=0.95,   # 224-px setting, CUB
        ...                          contrastive_weight=0.05, reg_target=0.3)
        >>> cub.backward()
    """
    if process_group is not None:
        return _distributed_contextual().contextual_loss(
            x, labels, process_group=process_group, k=k, eps=eps, context_weight=context_weight,
            contrastive_weight=contrastive_weight, reg_weight=reg_weight, reg_target=reg_target,
            pos_margin=pos_margin, neg_margin=neg_margin, ste_slope=ste_slope, normalize=normalize)
    batch, k, eps, ste_slope = check_contextual_args(x, labels, k, eps, ste_slope)
    context_weight = check_real(context_weight, "context_weight")
    contrastive_weight = check_real(contrastive_weight, "contrastive_weight")
    reg_weight = check_real(reg_weight, "reg_weight")
    reg_target = check_real(reg_target, "reg_target")
    pos_margin = check_real(pos_margin, "pos_margin")
    neg_margin = check_real(neg_margin, "neg_margin")
    check_bool(normalize, "normalize")
    ops = _dispatch.select(OP, batch.x)
    # fp32 arithmetic inside; rows with a NaN or an infinity are left to the non-finite rule below
    if not normalize and (ops is not None or batch.x.dtype != torch.float64):
        check_unnormalized_rows(batch.x, reg_weight, reg_target, "contextual_loss")
    if ops is not None and torch.compiler.is_compiling():  # no host sync, no branch on data (ops/traced.py)
        rows, factor = finite_or_stand_in(batch.x)
        loss = ops.contextual_fwd(rows.contiguous(), batch.labels.contiguous(), k, eps, context_weight,
                                  contrastive_weight, reg_weight, reg_target, pos_margin, neg_margin, ste_slope,
                                  normalize)[0]
        return apply_factor(loss, batch.x, factor)
    if ops is not None and not all_finite(batch.x):  # the non-finite rule: NaN, not a collapsed-batch error
        return nan_loss(batch.x)
    if ops is None:
        return _reference.contextual_loss(
            x, labels, k=k, eps=eps, context_weight=context_weight, contrastive_weight=contrastive_weight,
            reg_weight=reg_weight, reg_target=reg_target, pos_margin=pos_margin, neg_margin=neg_margin,
            ste_slope=ste_slope, normalize=normalize)
    return ops.contextual_fwd(batch.x.contiguous(), batch.labels.contiguous(), k, eps, context_weight,
                              contrastive_weight, reg_weight, reg_target, pos_margin, neg_margin, ste_slope,
                              normalize)[0]
