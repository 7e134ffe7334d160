"""Public ops that have no fused kernel: they validate through the reference and run it, but still go
through dispatch, so "auto" warns once that it is using the reference and an explicit backend that lacks the
op raises instead of silently running something else."""
from __future__ import annotations

import functools

import torch

from .. import _dispatch
from .. import reference as _reference
from . import registry

# The ops without a compiled kernel: a family with no backends, so dispatch knows them.
FAMILY = registry.register(registry.Family(name="similarity", reference={"similarity": _reference.similarity},
                                           compiled={}, backends=()))


def _first_tensor_device(args, kwargs) -> torch.device:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def through_dispatch(op: str):
    ref = getattr(_reference, op)

    @functools.wraps(ref)
    def run(*args, **kwargs):
        _dispatch.resolve(op, _first_tensor_device(args, kwargs))
        return ref(*args, **kwargs)

    return run


similarity = through_dispatch("similarity")

