"""Reference contextual loss (docs/spec.md §2.5) — Liao, Tsiligkaridis & Kulis, ICML 2023.

"Supervised Metric Learning to Rank for Retrieval via Contextual Similarity Optimization". Everything is
materialised as B×B matrices (O(B³) time, ~21·B² words); this is the oracle the fused version is checked
against, not something to train with at large B.
"""
from __future__ import annotations

from typing import Dict, Union

import torch
from torch import Tensor

from .._math import nan_if_nonfinite
from .._validation import _define_check, _is_compiling, check_contextual_args, check_real
from .losses import _contrastive_margin_from_S
from .similarity import _similarity_matrix

__all__ = ["contextual_loss", "contextual_loss_terms", "contextual_context_grad_closed_form"]


def _raise_on_empty_neighbourhoods(a: Tensor, r: Tensor, finite: Tensor) -> None:
    """The two sets step 4-6 divide by: ``|N̄(i)| = B − |N(i)|`` and ``|R(i)|``. Skipped for a batch with a
    non-finite entry, whose loss is NaN whatever these sets are."""
    if not bool(finite):
        return
    B = a.shape[0]
    if bool((a >= B).any()):
        rows = torch.nonzero(a >= B).reshape(-1)[:5].tolist()
        raise ValueError(
            "contextual_loss: collapsed batch — every sample is in the k-neighbourhood of row(s) "
            f"{rows} (|N(i)| = B = {B}), so the complement intersection J is 0/0. The embeddings are (nearly) "
            "identical within eps; use a smaller eps or k, or a batch with more spread."
        )
    if bool((r <= 0).any()):
        raise ValueError("contextual_loss: a row has an empty reciprocal half-neighbourhood R(i) (|R(i)| = 0)")


_define_check("reference_contextual_sets", _raise_on_empty_neighbourhoods)  # the same check in a compiled graph


def _check_neighbourhoods(a: Tensor, r: Tensor, finite: Tensor) -> None:
    """Under torch.compile the sets cannot reach Python (a host sync): the check runs as an op when the compiled
    graph runs, raising the same errors."""
    if _is_compiling():
        torch.ops.flashdml_checks.reference_contextual_sets(a, r, finite)
    else:
        _raise_on_empty_neighbourhoods(a, r, finite)


def _context_forward(S: Tensor, same: Tensor, k: int, eps: float, ste_slope: float,
                     finite: Union[Tensor, bool] = True) -> Dict[str, Tensor]:
    """Steps 1-8 of docs/spec.md §2.5 on ``S`` ([B, B], compute dtype), with the straight-through estimator.

    Returns ``L_ctx`` and the (hard, detached) intermediates the closed-form gradient needs. ``finite`` (a bool
    or a 0-dim bool tensor) says whether the embeddings behind ``S`` are finite; if not, the empty-set checks
    are skipped (the caller turns the loss into NaN).
    """
    B = S.shape[0]
    dtype = S.dtype
    # 1. D = max(2 - 2S, 0); the clamp passes no gradient where 2 - 2S <= 0 (C = 0).
    D_raw = 2.0 - 2.0 * S
    C = D_raw.detach() > 0
    D = torch.where(C, D_raw, torch.zeros_like(D_raw))
    # 3. the Heaviside input u = fl(-D + eps), eps as a constant of the compute dtype (fp32 in fp32 runs).
    u = -D + torch.tensor(eps, dtype=dtype, device=S.device)
    u_hard = u.detach()
    # 2. thresholds from values only, the query itself included: t = k-th, h = (k//2)-th largest of -D_i.
    top = torch.topk(-D.detach(), k, dim=1).values
    t = top[:, k - 1]
    h = top[:, k // 2 - 1]
    N_hard = (u_hard >= t[:, None]).to(dtype)
    P_hard = (u_hard >= h[:, None]).to(dtype)
    # STE: forward value is exactly the hard step (slope * 0 = 0); backward passes ste_slope to u everywhere.
    ste = ste_slope * (u - u_hard)
    N = N_hard + ste
    P = P_hard + ste
    # 4. intersections; |N(i)| and |N̄(i)| are detached counts, the intersections carry the gradient.
    a = N_hard.sum(dim=1)
    c = B - a  # 0 in a collapsed batch (|N(i)| = B): the check below raises
    Nc = 1.0 - N  # N̄ = 1 - N, STE gradient included
    I = (N @ N.T) / a[:, None]
    J = (Nc @ Nc.T) / c[:, None]
    # 5. W = ½(I + J) ⊙ N
    W = 0.5 * (I + J) * N
    # 6. reciprocal half-neighbourhoods and query expansion; |R(i)| is NOT detached.
    R = P * P.T
    r = R.sum(dim=1)
    _check_neighbourhoods(a, r.detach(), torch.as_tensor(finite, device=S.device))
    Q = R @ W
    Z = Q / r[:, None]
    # 7.-8.
    js = 0.5 * (Z + Z.T)
    y = same.to(dtype)
    off = ~torch.eye(B, dtype=torch.bool, device=S.device)
    L_ctx = ((y - js) ** 2 * off).sum() / (B * B)
    hard = dict(C=C, N=N_hard, P=P_hard, a=a, c=c, I=I.detach(), J=J.detach(), W=W.detach(),
                R=R.detach(), r=r.detach(), Q=Q.detach(), js=js.detach(), y=y, t=t, h=h)
    return {"L_ctx": L_ctx, **hard}


def contextual_loss_terms(
    x: Tensor,
    labels: Tensor,
    *,
    k: int = 4,
    eps: float = 0.05,
    reg_target: float = 0.25,
    pos_margin: float = 0.75,
    neg_margin: float = 0.6,
    ste_slope: float = 10.0,
    normalize: bool = True,
) -> Dict[str, Tensor]:
    """The three unweighted terms ``{"L_ctx", "L_reg", "L_con"}`` of :func:`contextual_loss` (same arguments).

    ``contextual_loss = context_weight·L_ctx + reg_weight·L_reg + contrastive_weight·L_con``; the tests use the
    terms one by one.

    Args:
        x (Tensor): embeddings ``[B, d]``, any floating dtype (computed in float64 for float64, fp32 otherwise).
        labels (Tensor): integer ``[B]``, required.
        k (int): neighbourhood size, ``2 <= k <= B``. Default 4.
        eps (float): the ε band, finite and ``>= 0``. Default 0.05.
        reg_target (float): target of the mean similarity in ``L_reg``. Default 0.25.
        pos_margin (float): ``m+`` of ``L_con``. Default 0.75.
        neg_margin (float): ``m−`` of ``L_con``. Default 0.6.
        ste_slope (float): the straight-through slope of each step. Default 10.0.
        normalize (bool): L2-normalise the rows first. Default ``True``.

    Returns:
        dict[str, Tensor]: 0-dim tensors in the compute dtype under the keys ``"L_ctx"``, ``"L_reg"`` and
        ``"L_con"``; all three NaN when ``x`` holds a NaN or an infinity.

    Raises:
        TypeError: wrong type or dtype, as :func:`contextual_loss`.
        ValueError: as :func:`contextual_loss` (``k`` outside ``[2, B]``, ``eps < 0``, a collapsed batch, ...).

    Example:
        >>> import torch
        >>> from flashdml.reference.contextual import contextual_loss_terms
        >>> terms = contextual_loss_terms(torch.randn(16, 8, dtype=torch.float64), torch.arange(16) // 4)
        >>> sorted(terms)
        ['L_con', 'L_ctx', 'L_reg']
    """
    batch, k, eps, ste_slope = check_contextual_args(x, labels, k, eps, ste_slope)
    reg_target = check_real(reg_target, "reg_target")
    pos_margin = check_real(pos_margin, "pos_margin")
    neg_margin = check_real(neg_margin, "neg_margin")
    # the non-finite rule: NaN (with NaN gradients), not a collapsed-batch error from the NaN rows
    finite = torch.isfinite(batch.x).all()
    S = _similarity_matrix(batch, normalize)
    same = batch.labels[:, None] == batch.labels[None, :]  # diagonal included
    L_ctx = _context_forward(S, same, k, eps, ste_slope, finite)["L_ctx"]
    L_reg = (S.mean() - reg_target) ** 2  # 9. diagonal included
    L_con = _contrastive_margin_from_S(S, same, ~same, pos_margin, neg_margin)  # 10. = docs/spec.md §2.4 (diag kept)
    return {name: nan_if_nonfinite(term, batch.x) for name, term in
            (("L_ctx", L_ctx), ("L_reg", L_reg), ("L_con", L_con))}


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
    """Reference contextual loss (docs/spec.md §2.5), every B×B matrix materialised.

    ``L = context_weight·L_ctx + reg_weight·L_reg + contrastive_weight·L_con``, self mode only. ``F`` = the
    L2-normalised rows of ``x`` (``normalize=False``: the rows as given, which the caller must already have
    normalised; ``D = 2 − 2S`` assumes unit rows), ``S = F Fᵀ``, ``D = max(2 − 2S, 0)``,
    ``y_ij = [labels_i == labels_j]``.

    * ``L_ctx``: contextual (Jaccard-like) similarity ``js`` from k-neighbourhoods
      ``N_ij = [−D_ij + ε >= t_i]`` (t_i = k-th largest of ``−D_i``, the query included; inclusive, so ties
      and everything within ``eps`` of the k-th neighbour count), reciprocal half-neighbourhoods and query
      expansion; ``(1/B²) Σ_{i≠j} (y_ij − js_ij)²``.
    * ``L_reg = (mean_ij S_ij − reg_target)²`` (diagonal included).
    * ``L_con`` = ``contrastive_margin`` (docs/spec.md §2.4, diagonal kept as a positive) with ``pos_margin``,
      ``neg_margin``.

    Published settings: the defaults are the 256-px setting; the 224-px setting is
    ``context_weight = 1 − lam, contrastive_weight = lam, reg_weight = 0.1, reg_target = 0.3, k = samples per
    class``, with ``lam = 0.05, eps = 0.04`` on CUB and ``lam = 0.2, eps = 0.05`` on Cars196 and SOP.

    Gradient (straight-through estimator, as the authors train): the forward uses the hard steps; in the
    backward each step ``[u >= threshold]`` with ``u = −D + ε`` passes ``ste_slope`` times the incoming
    gradient to ``u`` on **every** entry (not only near the threshold), so ``∂N_ij/∂S_ij = 2·ste_slope`` where
    ``2 − 2S_ij > 0`` and 0 elsewhere. ``t_i``, ``h_i``, ``|N(i)|``, ``|N̄(i)|`` are detached; ``|R(i)|`` is
    not. ``contextual_context_grad_closed_form`` gives the same ``dL_ctx/dS`` in closed form.

    Args:
        x (Tensor): embeddings ``[B, d]``, any floating dtype (computed in float64 for float64, fp32 otherwise).
        labels (Tensor): integer ``[B]``, required.
        k (int): neighbourhood size, ``2 <= k <= B``. Default 4.
        eps (float): the ε band, finite and ``>= 0``. Default 0.05.
        context_weight (float): weight of ``L_ctx``. Default 0.4.
        contrastive_weight (float): weight of ``L_con``. Default 0.5.
        reg_weight (float): weight of ``L_reg``. Default 0.1.
        reg_target (float): target of the mean similarity in ``L_reg``. Default 0.25.
        pos_margin (float): ``m+`` of ``L_con``. Default 0.75.
        neg_margin (float): ``m−`` of ``L_con``. Default 0.6.
        ste_slope (float): the straight-through slope of each step. Default 10.0.
        normalize (bool): L2-normalise the rows first. Default ``True``.

    Returns:
        Tensor: the 0-dim loss in the compute dtype; NaN when ``x`` holds a NaN or an infinity.

    Raises:
        TypeError: wrong type or dtype, as :func:`flashdml.contextual_loss` (same checks, same messages).
        ValueError: as :func:`flashdml.contextual_loss`: ``k`` outside ``[2, B]``, ``eps < 0``, a non-finite
            number, and a collapsed batch (a row with ``|N(i)| = B``, where ``J`` would be 0/0).

    Example:
        >>> import torch, flashdml as fd
        >>> emb = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
        >>> loss = fd.reference.contextual_loss(emb, torch.arange(16) // 4, k=4, eps=0.05)
        >>> loss.dtype
        torch.float64
        >>> loss.backward()
    """
    context_weight = check_real(context_weight, "context_weight")
    contrastive_weight = check_real(contrastive_weight, "contrastive_weight")
    reg_weight = check_real(reg_weight, "reg_weight")
    terms = contextual_loss_terms(
        x, labels, k=k, eps=eps, reg_target=reg_target, pos_margin=pos_margin, neg_margin=neg_margin,
        ste_slope=ste_slope, normalize=normalize,
    )
    return context_weight * terms["L_ctx"] + reg_weight * terms["L_reg"] + contrastive_weight * terms["L_con"]


@torch.no_grad()
def contextual_context_grad_closed_form(
    x: Tensor,
    labels: Tensor,
    *,
    k: int = 4,
    eps: float = 0.05,
    ste_slope: float = 10.0,
    normalize: bool = True,
) -> Tensor:
    """The gradient ``dL_ctx/dS`` of the unweighted ``L_ctx`` in docs/spec.md §2.5's closed form (no autograd).

    ``a = |N(·)|``, ``c = B − a``, ``M = 1 − N``, ``H = ½(NNᵀ/a + MMᵀ/c)``, ``W = H⊙N``, ``r = |R(·)|``,
    ``Q = RW``::

        G  = (2/B²)(js − y) ⊙ (1 − I)
        GQ = G / r;  gr_i = −Σ_j G_ij Q_ij / r_i²
        GR = GQ Wᵀ + gr 1ᵀ;  GW = Rᵀ GQ
        GP = GR ⊙ Pᵀ + (GR ⊙ P)ᵀ
        GN = GW ⊙ H + GI N + GIᵀ N − GJ M − GJᵀ M,  GI = ½(GW⊙N)/a,  GJ = ½(GW⊙N)/c
        dL_ctx/dS = 2·ste_slope · C ⊙ (GN + GP),  C = [2 − 2S > 0]

    Used by the tests to check the autograd straight-through gradient of the reference.

    Args:
        x (Tensor): embeddings ``[B, d]``, any floating dtype (computed in float64 for float64, fp32 otherwise).
        labels (Tensor): integer ``[B]``, required.
        k (int): neighbourhood size, ``2 <= k <= B``. Default 4.
        eps (float): the ε band, finite and ``>= 0``. Default 0.05.
        ste_slope (float): the straight-through slope of each step. Default 10.0.
        normalize (bool): L2-normalise the rows first. Default ``True``.

    Returns:
        Tensor: ``dL_ctx/dS``, ``[B, B]``, in the compute dtype (fp32, or float64 for float64 input).

    Raises:
        TypeError: wrong type or dtype, as :func:`contextual_loss`.
        ValueError: as :func:`contextual_loss` (``k`` outside ``[2, B]``, ``eps < 0``, a collapsed batch, ...).

    Example:
        >>> import torch
        >>> from flashdml.reference.contextual import contextual_context_grad_closed_form
        >>> contextual_context_grad_closed_form(torch.randn(16, 8), torch.arange(16) // 4, k=4).shape
        torch.Size([16, 16])
    """
    batch, k, eps, ste_slope = check_contextual_args(x, labels, k, eps, ste_slope)
    S = _similarity_matrix(batch, normalize)
    B = S.shape[0]
    same = batch.labels[:, None] == batch.labels[None, :]
    f = _context_forward(S, same, k, eps, ste_slope, torch.isfinite(batch.x).all())
    N, P, R, W, Q, js, y = f["N"], f["P"], f["R"], f["W"], f["Q"], f["js"], f["y"]
    a, c, r = f["a"][:, None], f["c"][:, None], f["r"][:, None]
    M = 1.0 - N
    H = 0.5 * (f["I"] + f["J"])
    eye = torch.eye(B, dtype=S.dtype, device=S.device)
    G = (2.0 / (B * B)) * (js - y) * (1.0 - eye)
    GQ = G / r
    gr = -(G * Q).sum(dim=1, keepdim=True) / r ** 2
    GR = GQ @ W.T + gr
    GW = R.T @ GQ
    GP = GR * P.T + (GR * P).T
    GWN = GW * N
    GI = 0.5 * GWN / a
    GJ = 0.5 * GWN / c
    GN = GW * H + GI @ N + GI.T @ N - GJ @ M - GJ.T @ M
    return 2.0 * ste_slope * f["C"].to(S.dtype) * (GN + GP)
