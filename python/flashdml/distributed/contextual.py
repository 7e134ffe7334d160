"""``contextual_loss`` with ``process_group=`` (docs/spec.md §5) — the gather-with-gradient version.

Not yet the local-rows × global-columns driver the other ops have: every rank gathers the rows with gradient
(``gather_rows``) and the labels, and runs the one-process fused op on the whole concatenated batch. The value is
the global loss, identical on every rank (the same op on the same bits); the gather's backward sums the ranks'
identical gradients of the global rows, so the local rows receive W × ∂L/∂x_local, as the contract says. The cost
is what the contract means to avoid: O(B_global²·d) work and the op's O((B_global + k²)·d + B_global·k²) memory on
every rank (still nothing B_global × B_global), i.e. W times the one-process work in all. A per-rank version would
split the threshold pass and the hinge sums by rows (as the other losses do) and run the O(B·k²) sparse stage on
the gathered neighbour lists.
"""
from __future__ import annotations

from .._validation import check_bool, check_real
from . import _comm
from ._local import prepare_shard

_REALS = ("eps", "context_weight", "contrastive_weight", "reg_weight", "reg_target", "pos_margin", "neg_margin",
          "ste_slope")


def contextual_loss(x, labels, *, process_group, **options):
    from ..ops.contextual import contextual_loss as one_process  # imported on use: it imports this module

    _, x, _, labels, _ = prepare_shard(x, None, labels, labels_required=True)
    for name in _REALS:
        check_real(options[name], name)
    check_bool(options["normalize"], "normalize")
    # k is checked against the global batch by the one-process op (the same error on every rank)
    xs = _comm.shard_layout(x.shape[0], x.device, process_group)
    _comm.check_same_call(xs, "contextual_loss", d=x.shape[1], dtype=x.dtype, **options)
    X = _comm.gather_rows(x, xs)
    return one_process(X, _comm.all_gather_rows(labels, xs), **options)
