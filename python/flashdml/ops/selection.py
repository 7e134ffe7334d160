"""Fused similarity + top-k selection: ``knn`` (docs/spec.md §1.2) and ``hardest_negatives`` (docs/spec.md §1.3).

The kernels (C++ ``flashdml::knn_fwd`` / ``flashdml::hardest_negatives_fwd``, Triton
``flashdml_triton::knn_fwd`` / ``hardest_negatives_fwd``) stream S tile by tile and return the selected values
and indices; nothing B×M is stored. The values are differentiable: the autograd registered here sends the
upstream gradient of each selected value ``s = x̂_r · ŷ_c`` to ``x̂_r`` and ``ŷ_c`` (O(k·d) gathers and
fixed-order sums, then back through the normalisation), which is exactly the gradient of the reference's gather
from S. The sums are deterministic on every device and independent of the order of the pairs (``pair_grads``).

Values: the returned values are the kernel's own fp32 S entries — the ones the selection was made on, so they
are sorted exactly as the indices are. A dot product recomputed from the selected pairs (``(x̂[r] * ŷ[c]).sum()``)
differs from the tiled GEMM's value in the last bits (different summation order), which is why it is used only
for the gradient. Indices equal the reference's (value descending, ties → lower index) whenever the fp32 S
values order the candidates like the reference's S does.

The pair helpers (``positive_pairs``, ``pair_similarity``, ``count_negatives``) are shared with the
cross-example negative mining path of ``ops/xent.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _dispatch
from .. import reference as _reference
from .._docs import shared_doc
from .._math import l2_normalize, normalized_rows_backward, row_norms
from .._validation import _define_check, check_bool, check_finite_rows, check_positive_int, prepare_batch
from . import registry

_CHUNK = 1 << 16  # pairs per gather chunk: O(_CHUNK·d) temporary memory


# ------------------------------------------------------------------------------------------- pair helpers
def count_negatives(labels: Tensor, ref_labels: Tensor) -> int:
    """Number of pairs (i, j) with ``labels[i] != ref_labels[j]`` (exact, O(B + M))."""
    B = labels.shape[0]
    uniq, inv = torch.unique(torch.cat([labels, ref_labels]), return_inverse=True)
    cb = torch.bincount(inv[:B], minlength=uniq.numel())
    cm = torch.bincount(inv[B:], minlength=uniq.numel())
    return B * ref_labels.shape[0] - int((cb * cm).sum())


def check_negative_count(labels: Tensor, ref_labels: Tensor, k: int) -> None:
    """``ValueError`` unless the batch has at least ``k`` negative pairs (synchronises)."""
    n_neg = count_negatives(labels, ref_labels)
    if k > n_neg:
        raise ValueError(f"k = {k} is larger than the number of negative pairs in the batch ({n_neg})")


_define_check("negative_count", check_negative_count)  # the same check when a torch.compile'd graph runs


def positive_pairs(labels: Tensor, ref_labels: Tensor, self_mode: bool) -> Tuple[Tensor, Tensor]:
    """Rows and columns (int64, row-major, columns ascending) of the positive pairs; self mode drops (i, i).
    O(|P|) memory, no B×M mask."""
    B = labels.shape[0]
    order = torch.argsort(ref_labels, stable=True)
    sorted_ref = ref_labels[order]
    start = torch.searchsorted(sorted_ref, labels, right=False)
    cnt = torch.searchsorted(sorted_ref, labels, right=True) - start
    total = int(cnt.sum())
    rows = torch.repeat_interleave(torch.arange(B, device=labels.device), cnt, output_size=total)
    first = torch.repeat_interleave(start - (torch.cumsum(cnt, 0) - cnt), cnt, output_size=total)
    cols = order[first + torch.arange(total, device=labels.device)]
    if self_mode:
        keep = rows != cols
        rows, cols = rows[keep], cols[keep]
    return rows, cols


def _pair_dots(xh: Tensor, yh: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    out = xh.new_empty(rows.shape[0])
    for c0 in range(0, rows.shape[0], _CHUNK):
        r, c = rows[c0:c0 + _CHUNK], cols[c0:c0 + _CHUNK]
        out[c0:c0 + _CHUNK] = (xh[r] * yh[c]).sum(-1)
    return out


def _normalized(x: Tensor, normalize: bool):
    """(x̂, ‖x‖) in fp32; x̂ = x / max(‖x‖, 1e-12) (docs/spec.md §0)."""
    x = x.detach().float()
    if not normalize:
        return x, None
    return l2_normalize(x), row_norms(x)


def _add_rows(out: Tensor, idx: Tensor, src: Tensor) -> None:
    """``out[idx[p]] += src[p]``, each row's terms summed in their order in ``idx``: on CPU ``index_add_`` (a
    sequential loop); on CUDA ``index_put_(accumulate=True)``, which sorts the indices (stably) and sums each
    row's run in a fixed order, where ``index_add_`` would use atomics in a run-dependent order."""
    if out.device.type == "cpu":
        out.index_add_(0, idx, src)
    else:
        out.index_put_((idx,), src, accumulate=True)


def pair_grads(x: Tensor, y: Tensor, rows: Tensor, cols: Tensor, grad: Tensor, normalize: bool):
    """``(dx, dy)`` of ``Σ_p grad_p · x̂[rows_p] · ŷ[cols_p]`` (input dtypes), through the normalisation;
    in chunks of pairs, O((B + M)·d + _CHUNK·d) memory.

    Bit-reproducible: the pairs are put in one canonical order first — by (row, col) for ``dx``, by (col, row)
    for ``dy`` — and each output row's terms are summed in that order, so the result is the same from run to run
    on a GPU and whatever order the pairs come in (for distinct pairs, as every caller passes)."""
    xh, _ = _normalized(x, normalize)
    yh = xh if y is x else _normalized(y, normalize)[0]
    dxh, dyh = torch.zeros_like(xh), torch.zeros_like(yh)
    g = grad.reshape(-1).float()
    rows, cols = rows.reshape(-1).long(), cols.reshape(-1).long()
    for out, idx, other, src, n_other in ((dxh, rows, cols, yh, yh.shape[0]), (dyh, cols, rows, xh, xh.shape[0])):
        order = torch.sort(idx * n_other + other, stable=True).indices
        for c0 in range(0, order.shape[0], _CHUNK):
            p = order[c0:c0 + _CHUNK]
            _add_rows(out, idx[p], g[p, None] * src[other[p]])
    if normalize:
        return normalized_rows_backward(dxh, x), normalized_rows_backward(dyh, y)
    return dxh.to(x.dtype), dyh.to(y.dtype)


class _PairSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, rows, cols, normalize: bool):
        xh, _ = _normalized(x, normalize)
        yh = xh if y is x else _normalized(y, normalize)[0]
        ctx.save_for_backward(x, y, rows, cols)
        ctx.normalize = normalize
        return _pair_dots(xh, yh, rows, cols)

    @staticmethod
    def backward(ctx, grad):
        registry.refuse_double_backward("the pair similarities of cross_example_softmax(top_k=...)")
        x, y, rows, cols = ctx.saved_tensors
        dx, dy = pair_grads(x, y, rows, cols, grad, ctx.normalize)
        return dx, dy, None, None, None


def pair_similarity(x: Tensor, y: Tensor, rows: Tensor, cols: Tensor, normalize: bool) -> Tensor:
    """fp32 ``x̂[rows] · ŷ[cols]`` per pair, differentiable, computed in chunks (no [n_pairs, d] buffer)."""
    return _PairSimilarity.apply(x, y, rows, cols, normalize)


# ----------------------------------------------------------------------------------- op registration
def _setup_selection(ctx, inputs, output):
    ctx.normalize = bool(inputs[-1])
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(inputs[0], inputs[1], *output[1:])


def _knn_backward(ctx, grad_values, *unused):
    registry.refuse_double_backward("knn_fwd")
    x, y, idx = ctx.saved_tensors
    rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(idx.shape[1])
    dx, dy = pair_grads(x, y, rows, idx.reshape(-1), grad_values, ctx.normalize)
    return (dx, dy) + (None,) * (ctx.n_inputs - 2)


def _hardest_negatives_backward(ctx, grad_values, *unused):
    registry.refuse_double_backward("hardest_negatives_fwd")
    x, y, rows, cols = ctx.saved_tensors
    dx, dy = pair_grads(x, y, rows, cols, grad_values, ctx.normalize)
    return (dx, dy) + (None,) * (ctx.n_inputs - 2)


FAMILY = registry.register(registry.Family(
    name="selection",
    reference={"knn": _reference.knn, "hardest_negatives": _reference.hardest_negatives,
               # Cross-Example Negative Mining (ops/xent.py): this family's selection, then O(k + |P|) gathers
               "cross_example_softmax_top_k": _reference.cross_example_softmax},
    compiled={"knn_fwd": registry.CustomAutograd(_setup_selection, _knn_backward),
              "hardest_negatives_fwd": registry.CustomAutograd(_setup_selection, _hardest_negatives_backward)},
))


def selected_negatives(ops, batch, k: int, normalize: bool):
    """``(values, rows, cols)`` of the k hardest negatives of a validated batch, by the selection ops ``ops``."""
    xc = batch.x.contiguous()
    yc = xc if batch.self_mode else batch.y.contiguous()
    return ops.hardest_negatives_fwd(xc, yc, batch.labels, batch.ref_labels, k, batch.self_mode, normalize)


# ------------------------------------------------------------------------------------------- public ops
def _distributed_selection():
    from ..distributed import selection  # imported on use: it imports this module

    return selection


@shared_doc
def knn(
    x: Tensor,
    y: Optional[Tensor] = None,
    k: int = 10,
    *,
    normalize: bool = True,
    exclude_self: bool = True,
    process_group=None,
) -> Tuple[Tensor, Tensor]:
    """Per row of ``x``, the k most similar rows of ``y`` (docs/spec.md §1.2), without materialising S.

    For each row ``i`` the k largest entries of ``S[i, :]``, ``S = x̂ ŷᵀ``, sorted in decreasing order, equal
    values → lower column index first. The fused kernels stream tiles of S: memory O((B + M)·d + B·k). The
    values are the kernel's fp32 entries of S and carry their gradient (to ``x̂_i`` and ``ŷ_j`` of each
    selected pair).

    Args:
        x (Tensor): queries ``[B, d]``, fp32, fp16 or bf16 (float64 runs on the reference, in float64).
        y (Tensor, optional): references ``[M, d]``, same dtype and device as ``x``. Default ``None``: self mode
            (``y = x``).
        k (int): neighbours per row, ``1 <= k <= M`` (``B − 1`` in self mode with ``exclude_self``). Default 10.
        normalize (bool): cosine similarity (default ``True``) or plain dot products (``False``).
        exclude_self (bool): in self mode, column ``i`` is not a candidate for row ``i``; no effect in cross
            mode. Default ``True``.
        {{process_group_shard_arg}}
            Here the gallery ``y`` (in self mode ``x``) is the concatenation of the shards, the queries stay
            local: each rank gets its own rows of the one-process result, indices into the concatenated
            gallery. The gradient is the ordinary one of those rows (no W factor; the gallery shard receives
            the sum over ranks).

    Returns:
        tuple[Tensor, Tensor]: ``(values, indices)``, both ``[B, k]``: values fp32 (float64 for float64 input),
        indices int64 into the rows of ``y``.

    Raises:
        TypeError: ``x`` or ``y`` that is not a tensor; embeddings that are not fp16, bf16, fp32 or fp64; ``x``
            and ``y`` of different dtypes; a non-integer ``k``; ``normalize`` or ``exclude_self`` not a bool.
        ValueError: embeddings that are not 2-D, are empty or differ in ``d``; tensors on different devices;
            ``k < 1`` or more than the candidates per row; a NaN or infinite entry in ``x`` or ``y`` (the
            message names the first such row).
        RuntimeError: an explicitly selected backend that cannot run the call; ``create_graph=True`` through
            the fused backward.

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.],                 # unit rows: S is exact
        ...                   [.5, .5, .5, .5],
        ...                   [0., 1., 0., 0.],
        ...                   [-1., 0., 0., 0.]])
        >>> values, indices = fd.knn(x, k=2)                     # self mode: the query itself is excluded
        >>> indices.tolist()                                     # row 2: columns 0 and 3 tie at 0 -> column 0
        [[1, 2], [0, 2], [1, 0], [2, 1]]
        >>> values.tolist()
        [[0.5, 0.0], [0.5, 0.5], [0.5, 0.0], [0.0, -0.5]]
        >>> values, indices = fd.knn(torch.randn(5, 4), torch.randn(20, 4), k=3)    # queries vs a gallery
        >>> values.shape, indices.dtype
        (torch.Size([5, 3]), torch.int64)
    """
    if process_group is not None:
        return _distributed_selection().knn(x, y, k, normalize=normalize, exclude_self=exclude_self,
                                            process_group=process_group)
    batch = prepare_batch(x, y, pair_mode_default=False)
    check_finite_rows(batch, "knn")
    k = check_positive_int(k, "k")
    check_bool(normalize, "normalize")
    drop_self = batch.self_mode and check_bool(exclude_self, "exclude_self")
    n_candidates = batch.M - (1 if drop_self else 0)
    if k > n_candidates:
        raise ValueError(
            f"k = {k} is larger than the number of candidates per row ({n_candidates}"
            f"{' after excluding the query itself' if drop_self else ''})"
        )
    ops = _dispatch.select("knn", batch.x)
    if ops is None:
        return _reference.knn(x, y, k, normalize=normalize, exclude_self=exclude_self)
    xc = batch.x.contiguous()
    return ops.knn_fwd(xc, xc if batch.self_mode else batch.y.contiguous(), k, drop_self, normalize)


@shared_doc
def hardest_negatives(
    x: Tensor,
    y: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    k: Optional[int] = None,
    *,
    normalize: bool = True,
    process_group=None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The k most similar negative pairs of the whole batch (docs/spec.md §1.3; Cross-Example Negative Mining).

    Among all negative pairs ``(i, j)`` (``labels[i] != ref_labels[j]``; not row by row), the k largest entries
    of ``S = x̂ ŷᵀ``, sorted in decreasing order, equal values → lower flat index ``i·M + j`` first (int64, so
    B·M > 2^31 works). Memory O((B + M)·d + k) plus fixed-size histograms, for any k up to B·M (the CPU kernel
    radix-selects the k-th value over streamed tiles of S). The values carry the gradient of S's entries.

    Args:
        x (Tensor): queries ``[B, d]``, fp32, fp16 or bf16 (float64 runs on the reference, in float64).
        y (Tensor, optional): references ``[M, d]``, same dtype and device as ``x``. Default ``None``: self mode
            (the diagonal is never a negative).
        labels (Tensor, optional): integer ``[B]``. Default ``None``: pair mode (the negatives are all
            off-diagonal pairs).
        ref_labels (Tensor, optional): integer ``[M]``; required in cross mode with labels.
        k (int, optional): the number of pairs, ``1 <= k <=`` the number of negative pairs. Default ``None``:
            ``k = B``.
        normalize (bool): cosine similarity (default ``True``) or plain dot products (``False``).
        {{process_group_shard_arg}}
            The selection is over the concatenated batch (``k = None``: its row count): the same values, rows
            and columns (global indices) on every rank; the local inputs receive W × the gradient.

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``(values, rows, cols)``, each ``[k]``: values fp32 (float64 for float64
        input), rows and cols int64 (the pair ``(rows[p], cols[p])``).

    Raises:
        TypeError: ``x``, ``y``, ``labels`` or ``ref_labels`` that is not a tensor; embeddings that are not fp16,
            bf16, fp32 or fp64; ``x`` and ``y`` of different dtypes; non-integer labels; a non-integer ``k``;
            ``normalize`` not a bool.
        ValueError: embeddings that are not 2-D, are empty or differ in ``d``; labels that are not 1-D or do not
            match their rows; ``ref_labels`` without ``y`` or without ``labels``; ``y`` and ``labels`` without
            ``ref_labels``; tensors on different devices; ``k < 1`` or more than the negative pairs; a NaN or
            infinite entry in ``x`` or ``y`` (the message names the first such row).
        RuntimeError: an explicitly selected backend that cannot run the call; ``create_graph=True`` through
            the fused backward.

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.tensor([[1., 0., 0., 0.],                 # unit rows: S is exact
        ...                   [.5, .5, .5, .5],
        ...                   [0., 1., 0., 0.],
        ...                   [-1., 0., 0., 0.]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> values, rows, cols = fd.hardest_negatives(x, labels=labels, k=3)
        >>> values.tolist(), rows.tolist(), cols.tolist()       # (1, 2) and (2, 1) tie: lower flat index first
        ([0.5, 0.5, 0.0], [1, 2, 0], [2, 1, 2])
        >>> values, rows, cols = fd.hardest_negatives(torch.randn(8, 4), torch.randn(8, 4))   # pair mode, k = B
        >>> values.shape
        torch.Size([8])
    """
    if process_group is not None:
        return _distributed_selection().hardest_negatives(x, y, labels, ref_labels, k, normalize=normalize,
                                                          process_group=process_group)
    batch = prepare_batch(x, y, labels, ref_labels, pair_mode_default=True)
    check_finite_rows(batch, "hardest_negatives")
    k = batch.B if k is None else check_positive_int(k, "k")
    check_bool(normalize, "normalize")
    if torch.compiler.is_compiling():
        torch.ops.flashdml_checks.negative_count(batch.labels, batch.ref_labels, k)
    else:
        check_negative_count(batch.labels, batch.ref_labels, k)
    ops = _dispatch.select("hardest_negatives", batch.x)
    if ops is None:
        return _reference.hardest_negatives(x, y, labels, ref_labels, k, normalize=normalize)
    return selected_negatives(ops, batch, k, normalize)
