"""The paths the glue takes while ``torch.compile`` traces it (``torch.compiler.is_compiling()``).

The eager glue branches on tensor values in two places: Cross-Example Negative Mining (``top_k >= |N|`` or no
positive pair runs plain XE; |P| sizes the positive-pair list; non-finite rows give a NaN loss) and the contextual
loss (non-finite rows give a NaN loss instead of running the kernel). A graph traced with ``fullgraph=True`` can
hold neither a host sync nor a Python branch on a tensor, so under compile these ops compute the same loss
without branching:

* ``flashdml_compile::top_k_negatives`` selects the hardest negatives into ``k`` fixed slots with a validity mask
  (fewer than ``k`` negatives leaves slots empty: selecting them all is plain XE's partition), and
  ``flashdml_compile::positive_pairs`` lists the positive pairs, its length an unbacked size in the graph. Both
  are opaque ops (they run the eager code when the graph runs); the loss over the selected pairs is plain
  PyTorch, differentiated by autograd.
* the contextual loss runs on fixed finite rows when the batch has a non-finite entry, and the result is then
  replaced by NaN (with NaN gradients), as the eager path's ``nan_loss``.

The eager paths are untouched: none of this runs outside ``torch.compile``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._math import l2_normalize, nan_if_nonfinite
from . import registry


# ------------------------------------------------------------------------------ Cross-Example Negative Mining
@torch.library.custom_op("flashdml_compile::top_k_negatives", mutates_args=())
def _top_k_negatives(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, k: int, self_mode: bool,
                     normalize: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    from .selection import FAMILY, count_negatives

    rows = torch.zeros(k, dtype=torch.int64, device=x.device)
    cols = torch.zeros(k, dtype=torch.int64, device=x.device)
    valid = torch.zeros(k, dtype=torch.bool, device=x.device)
    finite = bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())
    n = min(k, count_negatives(labels, ref_labels)) if finite else 0  # non-finite rows: the loss becomes NaN
    if n > 0:
        ops = registry.compiled_ops(backend, FAMILY)
        _, r, c = ops.hardest_negatives_fwd(x, y, labels, ref_labels, n, self_mode, normalize)
        rows[:n], cols[:n], valid[:n] = r, c, True
    return rows, cols, valid


@_top_k_negatives.register_fake
def _(x, y, labels, ref_labels, k, self_mode, normalize, backend):
    return (x.new_empty((k,), dtype=torch.int64), x.new_empty((k,), dtype=torch.int64),
            x.new_empty((k,), dtype=torch.bool))


@torch.library.custom_op("flashdml_compile::positive_pairs", mutates_args=())
def _positive_pairs(labels: Tensor, ref_labels: Tensor, self_mode: bool) -> tuple[Tensor, Tensor]:
    from .selection import positive_pairs

    rows, cols = positive_pairs(labels, ref_labels, self_mode)
    return rows.clone(), cols.clone()


@_positive_pairs.register_fake
def _(labels, ref_labels, self_mode):
    n = torch.library.get_ctx().new_dynamic_size()
    return labels.new_empty((n,), dtype=torch.int64), labels.new_empty((n,), dtype=torch.int64)


def cross_example_softmax_top_k(batch, t: Tensor, top_k: int, normalize: bool, backend: str) -> Tensor:
    """``mean_p softplus(Λ − z_p)`` with ``Λ`` the LSE over the ``top_k`` hardest negatives (all of them when
    there are fewer); 0 with zero gradient when there is no positive or no negative pair."""
    xc = batch.x.contiguous()
    yc = xc if batch.self_mode else batch.y.contiguous()
    rows_n, cols_n, valid = torch.ops.flashdml_compile.top_k_negatives(
        xc, yc, batch.labels, batch.ref_labels, top_k, batch.self_mode, normalize, backend)
    rows_p, cols_p = torch.ops.flashdml_compile.positive_pairs(batch.labels, batch.ref_labels, batch.self_mode)
    xh = batch.x.float()
    xh = l2_normalize(xh) if normalize else xh
    if batch.self_mode:
        yh = xh
    else:
        yh = l2_normalize(batch.y.float()) if normalize else batch.y.float()
    z_n = (xh[rows_n] * yh[cols_n]).sum(-1) / t
    z_p = (xh[rows_p] * yh[cols_p]).sum(-1) / t
    has_neg = valid.any()
    z_n = torch.where(valid, z_n, float("-inf"))
    z_n = torch.where(has_neg, z_n, 0.0)  # keeps Λ finite when nothing was selected; the loss is zeroed below
    lam = torch.logsumexp(z_n, 0)
    terms = torch.nn.functional.softplus(lam - z_p)
    n_pos = torch.ones_like(terms).sum().clamp_min(1.0)
    loss = terms.sum() / n_pos * has_neg.to(terms.dtype)
    return nan_if_nonfinite(loss, batch.x, batch.y)


# ------------------------------------------------------------------------------------------- contextual loss
def finite_or_stand_in(x: Tensor):
    """``(rows, factor)``: ``x`` itself and 1 when every entry is finite, else fixed finite rows (distinct,
    so the kernel sees no collapsed batch) and NaN. :func:`apply_factor` then gives the kernel's loss or NaN."""
    finite = torch.isfinite(x).all()
    i = torch.arange(x.shape[0], device=x.device, dtype=torch.float32)[:, None]
    j = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)[None, :]
    stand_in = torch.cos(0.731 * (i + 1) * (j + 1) + 0.377 * i).to(x.dtype)
    factor = torch.where(finite, 1.0, float("nan"))
    return torch.where(finite, x, stand_in), factor


def apply_factor(loss: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """``loss`` (factor 1), or NaN with NaN gradients for ``x`` (factor NaN): ``x − x.detach()`` is 0 where
    ``x`` is finite and carries ``factor − 1`` (0 or NaN) to every entry of ``x``'s gradient."""
    return loss * factor + (x - x.detach()).float().sum() * (factor - 1.0)
