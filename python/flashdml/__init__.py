"""flashdml: fused kernels for deep metric learning.

Functional API (docs/spec.md §4)::

    import flashdml as fd
    loss = fd.batch_softmax(x, y, temperature=0.05)
    fd.available_backends()          # {"cpu": (True, "..."), "triton": (False, "no CUDA device ..."), ...}
    with fd.backend("reference"):    # the pure-PyTorch oracle
        ...
"""
from . import _ext  # noqa: F401  (loads flashdml._C when it was built)
from . import reference
from ._dispatch import available_backends, backend, get_backend, set_backend
from .ops.batch_softmax import batch_softmax
from .ops.xent import cross_example_softmax, ntxent
from .ops.hinge_pair import contrastive_margin, threshold_consistent_margin
from .ops.selection import hardest_negatives, knn
from .ops.contextual import contextual_loss
from .ops.triplet import triplet_margin
from .ops.anchor_lse import circle, multi_similarity, supcon
from .ops.unfused import similarity
from . import losses, metrics  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "similarity", "knn", "hardest_negatives",
    "batch_softmax", "ntxent", "cross_example_softmax",
    "threshold_consistent_margin", "contrastive_margin", "contextual_loss",
    "triplet_margin",
    "supcon", "multi_similarity", "circle",
    "losses", "metrics", "reference",
    "set_backend", "get_backend", "backend", "available_backends",
]
