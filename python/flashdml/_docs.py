"""Docstring pieces shared by several public functions (the metrics and their references), kept in one place.

``@shared_doc`` replaces a line holding only ``{{name}}`` by the fragment ``name``, indented like the marker, so
that ``help()``, ``inspect.getdoc`` and doctest see the full text. Only whole-line markers are replaced: the rest
of a docstring (dict literals in examples included) is left as written.
"""
from __future__ import annotations

import re

_INPUT_TYPE_ERRORS = """\
TypeError: ``x`` or a label tensor that is not a tensor; embeddings that are not floating; non-integer
    labels; ``x`` and ``y`` of different dtypes.
ValueError: ``labels`` missing, not 1-D or not matching its rows; embeddings that are
    not 2-D, empty or of different ``d``; ``ref_labels`` without ``y`` or ``y`` without ``ref_labels``;
    tensors on different devices"""

FRAGMENTS = {
    # Returns / Raises of every pytorch-metric-learning loss drop-in (flashdml.integrations.pml).
    "pml_dropin_returns_raises": """\
Returns:
    Calling the module (``forward(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)``)
    returns a 0-dim loss of the embeddings' dtype.

Raises:
    pml's errors (mismatched shapes, ...); flashdml's ``ValueError`` / ``TypeError`` for bad fused inputs.""",
    # Args of a pml drop-in: its process group.
    "pml_dropin_process_group_arg": """\
process_group: ``None`` (default) or a ``torch.distributed`` group: the fused loss of the concatenated
    batch over the ranks' shards (docs/spec.md §5); a call only pml could run raises ``ValueError``.""",
    # Args: the process group of the global-batch losses (docs/spec.md §5).
    "process_group_loss_arg": """\
process_group (ProcessGroup, optional): ``None`` (default): one process. A ``torch.distributed`` group (e.g.
    ``torch.distributed.group.WORLD``): the tensors are this rank's shard of the global batch (any number of
    rows, 0 included; labels are global class ids); every rank gets the loss of the concatenated batch and its
    inputs receive ``W ×`` that loss's gradient (W ranks; docs/spec.md §5).""",
    # Args: the optional gallery of the retrieval metrics (cross mode).
    "gallery_args": """\
y (Tensor, optional): a separate gallery ``[M, d]`` (cross mode). Default ``None``: self mode, the query
    itself excluded from its list and from the pairs.
ref_labels (Tensor, optional): integer ``[M]``, the gallery's labels; required with ``y``.""",
    # Raises: the input checks of a retrieval metric, on the reference ...
    "input_errors": _INPUT_TYPE_ERRORS + ".",
    # ... and on the fused backends, which also refuse non-finite rows and can be unavailable.
    "input_errors_fused": _INPUT_TYPE_ERRORS + """; a NaN or infinite embedding (fused backends).
RuntimeError: an explicitly selected backend that cannot run the call.""",
    # Args: the keyword of the global-batch selections and metrics (docs/spec.md §5).
    "process_group_shard_arg": """\
process_group (ProcessGroup, optional): run on the batch sharded over this ``torch.distributed`` group
    (e.g. ``torch.distributed.group.WORLD``; docs/spec.md §5): each rank passes its own rows (any number, 0
    included; labels are global ids) and every rank must make the same call. Default ``None``: one process.""",
}

_MARKER = re.compile(r"^([ \t]*)\{\{(\w+)\}\}[ \t]*$", re.M)


def shared_doc(fn):
    """Expand the ``{{name}}`` marker lines of ``fn.__doc__`` with :data:`FRAGMENTS` (a ``KeyError`` names an
    unknown fragment at import time)."""
    def expand(m):
        indent = m.group(1)
        return "\n".join(indent + line if line else line for line in FRAGMENTS[m.group(2)].splitlines())
    fn.__doc__ = _MARKER.sub(expand, fn.__doc__)
    return fn
