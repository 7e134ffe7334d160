"""Reference similarity and selection primitives (docs/spec.md §1).

Plain PyTorch that materialises ``S`` ([B, M]); readable rather than fast. Computation runs in float64 when the
input is float64 and in float32 otherwise (``flashdml._math.compute_dtype``). Selections never rely on
``torch.topk``'s tie order: candidates are listed in increasing (flat) index order and then sorted by value
with a *stable* descending sort, so equal values keep the lower index first (docs/spec.md §0).

The private helpers (``_similarity_matrix``, ``_pair_masks``, ``_global_topk_flat``) are shared with the
reference losses so that every reference op selects and masks exactly the same way.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._math import compute_dtype, l2_normalize
from .._validation import (Batch, _define_check, _is_compiling, check_bool, check_finite_rows, check_positive_int,
                           prepare_batch)

__all__ = ["similarity", "knn", "hardest_negatives"]


# --------------------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------------------
def _similarity_matrix(batch: Batch, normalize: bool) -> Tensor:
    check_bool(normalize, "normalize")
    """``S = x̂ ŷᵀ`` in the compute dtype; in self mode both factors are the same tensor (gradient from both)."""
    dtype = compute_dtype(batch.x.dtype)
    xc = batch.x.to(dtype)
    if normalize:
        xc = l2_normalize(xc)
    if batch.self_mode:
        yc = xc
    else:
        yc = batch.y.to(dtype)
        if normalize:
            yc = l2_normalize(yc)
    return xc @ yc.T


def _diagonal_mask(batch: Batch) -> Tensor:
    """Bool [B, M], True on the pairs (i, i) that self mode drops; all False in cross mode."""
    B, M = batch.B, batch.M
    if not batch.self_mode:
        return torch.zeros(B, M, dtype=torch.bool, device=batch.x.device)
    return torch.eye(B, M, dtype=torch.bool, device=batch.x.device)


def _pair_masks(batch: Batch, *, keep_diagonal_positive: bool = False) -> Tuple[Tensor, Tensor]:
    """Positive and negative pair masks (bool [B, M]) from the labels (docs/spec.md §0).

    Self mode drops ``(i, i)`` from the positives unless ``keep_diagonal_positive`` (margin contrastive, 2.4).
    ``(i, i)`` always has equal labels, so it is never a negative.
    """
    same = batch.labels[:, None] == batch.ref_labels[None, :]
    pos = same
    if not keep_diagonal_positive:
        pos = same & ~_diagonal_mask(batch)
    neg = ~same
    return pos, neg


def _global_topk_flat(values: Tensor, mask: Tensor, k: int) -> Tensor:
    """Flat int64 indices ``i*M + j`` of the k largest ``values[mask]``, sorted by (value desc, flat index asc).

    ``_row_topk`` on the flattened matrix: every entry is sorted, so the output has a fixed size (no
    data-dependent candidate list, which ``torch.compile(fullgraph=True)`` could not slice to k). Fewer than k
    candidates leaves the non-candidates in the last slots (``min(k, B*M)`` slots in all): the callers either
    check ``k <= mask.sum()`` first or intersect the result with ``mask``.
    """
    flat = _row_topk(values.reshape(1, -1), mask.reshape(1, -1), min(k, mask.numel()))
    return flat.reshape(-1)


def _raise_unless_enough_negatives(neg: Tensor, k: int) -> None:
    n_neg = int(neg.sum())
    if k > n_neg:
        raise ValueError(f"k = {k} is larger than the number of negative pairs in the batch ({n_neg})")


_define_check("reference_negative_pairs", _raise_unless_enough_negatives)  # the same check in a compiled graph


def _check_enough_negatives(neg: Tensor, k: int) -> None:
    """``ValueError`` unless the negative mask ``neg`` has at least ``k`` pairs. Under torch.compile the count
    cannot reach Python (a host sync), so the check runs as an op when the compiled graph runs."""
    if _is_compiling():
        torch.ops.flashdml_checks.reference_negative_pairs(neg, k)
    else:
        _raise_unless_enough_negatives(neg, k)


def _row_topk(values: Tensor, candidate: Tensor, k: int) -> Tensor:
    """Per row, the column indices (int64 [B, k]) of the k largest candidate values, ties → lower column.

    A two-key sort: first a stable descending sort by value, then a stable sort that moves non-candidates to
    the end (keeping the value order among candidates). A row with fewer than k candidates ends with
    non-candidates.
    """
    order = torch.sort(values.detach(), dim=1, descending=True, stable=True).indices
    not_cand = (~candidate).gather(1, order).to(torch.uint8)
    order = order.gather(1, torch.sort(not_cand, dim=1, stable=True).indices)
    return order[:, :k]


# --------------------------------------------------------------------------------------------------------------
# public ops
# --------------------------------------------------------------------------------------------------------------
def similarity(x: Tensor, y: Optional[Tensor] = None, *, normalize: bool = True) -> Tensor:
    """The similarity matrix ``S = x̂ ŷᵀ`` (docs/spec.md §1.1), the one op whose output is B×M.

    ``x̂ = x / max(‖x‖₂, 1e-12)`` row-wise (likewise ``ŷ``), and the gradient flows through the normalisation;
    ``normalize=False`` gives the plain dot products ``x yᵀ``. No fused kernel computes it: ``flashdml.similarity``
    runs this reference function whatever the backend (under ``"auto"`` it warns once that it does; an explicitly
    chosen compiled backend raises).

    Args:
        x (Tensor): queries ``[B, d]``, fp16, bf16, fp32 or fp64.
        y (Tensor, optional): references ``[M, d]``, same dtype and device as ``x``. Default ``None``: self mode
            (``y = x``; the gradient reaches ``x`` through both factors).
        normalize (bool): cosine similarity (default ``True``) or plain dot products (``False``).

    Returns:
        Tensor: ``S``, ``[B, M]``, fp32 (float64 for float64 input).

    Raises:
        TypeError: ``x`` or ``y`` that is not a tensor; embeddings that are not fp16, bf16, fp32 or fp64; ``x``
            and ``y`` of different dtypes; ``normalize`` not a bool.
        ValueError: embeddings that are not 2-D, are empty or differ in ``d``; tensors on different devices.
        RuntimeError: (``flashdml.similarity``) an explicitly selected compiled backend, which has no kernel for it.

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> fd.similarity(x[:2]).tolist()
        [[1.0, 0.5], [0.5, 1.0]]
        >>> fd.similarity(x, torch.randn(6, 4)).shape          # cross mode: [B, M]
        torch.Size([4, 6])
    """
    batch = prepare_batch(x, y, pair_mode_default=False)
    return _similarity_matrix(batch, normalize)


def knn(
    x: Tensor,
    y: Optional[Tensor] = None,
    k: int = 10,
    *,
    normalize: bool = True,
    exclude_self: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Reference kNN (docs/spec.md §1.2): per row the k largest entries of ``S``, materialised.

    Sorted descending, ties → lower column index. In self mode with ``exclude_self``, column i is not a candidate
    for row i. The values are gathered from ``S``, so they carry its gradient.

    Args:
        x (Tensor): queries ``[B, d]``, any floating dtype (computed in float64 for float64, fp32 otherwise).
        y (Tensor, optional): references ``[M, d]``; ``None`` (default) is self mode.
        k (int): ``1 <= k <=`` the candidates per row (``M``, or ``B − 1`` with ``exclude_self``). Default 10.
        normalize (bool): cosine (default) or plain dot products.
        exclude_self (bool): self mode leaves the query itself out. Default ``True``.

    Returns:
        tuple[Tensor, Tensor]: ``(values [B, k]`` in the compute dtype, ``indices [B, k]`` int64).

    Raises:
        TypeError: wrong type or dtype, as :func:`flashdml.knn` (same checks, same messages).
        ValueError: a wrong shape, size, value or device, as :func:`flashdml.knn`.
        ValueError: also a NaN or infinite entry in ``x`` or ``y`` (a selection cannot rank it).

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> fd.reference.knn(x, k=2)[1].tolist()
        [[1, 2], [0, 2], [1, 0], [2, 1]]
    """
    batch = prepare_batch(x, y, pair_mode_default=False)
    check_finite_rows(batch, "knn")
    k = check_positive_int(k, "k")
    drop_self = batch.self_mode and check_bool(exclude_self, "exclude_self")
    n_candidates = batch.M - (1 if drop_self else 0)
    if k > n_candidates:
        raise ValueError(
            f"k = {k} is larger than the number of candidates per row ({n_candidates}"
            f"{' after excluding the query itself' if drop_self else ''})"
        )
    S = _similarity_matrix(batch, normalize)
    candidate = ~_diagonal_mask(batch) if drop_self else torch.ones_like(S, dtype=torch.bool)
    indices = _row_topk(S, candidate, k)
    return S.gather(1, indices), indices


def hardest_negatives(
    x: Tensor,
    y: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    k: Optional[int] = None,
    *,
    normalize: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference global hard-negative selection (docs/spec.md §1.3): the k largest ``S`` over all negative pairs.

    Sorted descending, ties → lower flat index ``i*M + j`` (int64). ``labels=None`` is pair mode (the negatives
    are the off-diagonal entries). The values are gathered from ``S`` and carry its gradient.

    Args:
        x (Tensor): queries ``[B, d]``, any floating dtype (computed in float64 for float64, fp32 otherwise).
        y (Tensor, optional): references ``[M, d]``; ``None`` (default) is self mode.
        labels (Tensor, optional): integer ``[B]``; ``None`` (default) is pair mode.
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        k (int, optional): ``1 <= k <=`` the number of negative pairs; ``None`` (default) means ``k = B``.
        normalize (bool): cosine (default) or plain dot products.

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``(values [k]`` in the compute dtype, ``rows [k]`` int64, ``cols [k]``
        int64).

    Raises:
        TypeError: wrong type or dtype, as :func:`flashdml.hardest_negatives` (same checks, same messages).
        ValueError: a wrong shape, size, value or device, as :func:`flashdml.hardest_negatives`.
        ValueError: also a NaN or infinite entry in ``x`` or ``y`` (a selection cannot rank it).

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.], [.5, .5, .5, .5], [0., 1., 0., 0.], [-1., 0., 0., 0.]])
        >>> values, rows, cols = fd.reference.hardest_negatives(x, labels=torch.tensor([0, 0, 1, 1]), k=3)
        >>> rows.tolist(), cols.tolist()
        ([1, 2, 0], [2, 1, 2])
    """
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=True)
    check_finite_rows(batch, "hardest_negatives")
    k = batch.B if k is None else check_positive_int(k, "k")
    _, neg = _pair_masks(batch)
    _check_enough_negatives(neg, k)
    S = _similarity_matrix(batch, normalize)
    flat = _global_topk_flat(S, neg, k)
    M = torch.tensor(batch.M, dtype=torch.int64, device=flat.device)
    rows = torch.div(flat, M, rounding_mode="floor")
    cols = flat - rows * M
    return S.reshape(-1)[flat], rows, cols
