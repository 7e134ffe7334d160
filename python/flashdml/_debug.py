"""Test support: poisoned outputs.

While ``poison_outputs()`` is active, every output a fused op allocates (Python launchers through
``new_output``, C++ ops through ``flashdml::new_output`` in csrc/include/flashdml/poison.h) starts as NaN
(floats) or -7777777 (integers), so an element a kernel forgets to write cannot pass as a plausible 0.

While ``zero_outputs()`` is active (the dry launch recorder, ``flashdml.triton_kernels._launch_log``, which skips
the kernels) the Python launchers' outputs start as zeros instead, so host code that reads a result back gets a
defined value.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

POISON_INT = -7777777
_poison = False
_zero = False


def poison_enabled() -> bool:
    return _poison


def new_output(shape: Sequence[int], *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, a poisoned tensor while ``poison_outputs()`` is active, zeros while ``zero_outputs()`` is."""
    if _zero:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _poison and out.numel() > 0:
        out.fill_(float("nan") if out.is_floating_point() else POISON_INT)
    return out


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Poison the outputs of every fused op (Python and C++) inside the block."""
    global _poison
    from . import _ext

    previous = _poison
    _poison = enabled
    if _ext.C_LOADED:
        torch.ops.flashdml._set_poison(enabled)
    try:
        yield
    finally:
        _poison = previous
        if _ext.C_LOADED:
            torch.ops.flashdml._set_poison(previous)


@contextlib.contextmanager
def zero_outputs(enabled: bool = True) -> Iterator[None]:
    """Zero-fill the outputs of the Python launchers (``new_output``) inside the block."""
    global _zero
    previous = _zero
    _zero = enabled
    try:
        yield
    finally:
        _zero = previous
