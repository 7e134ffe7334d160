"""A recorder of Triton launches (benchmarks/gemm_work.py's input, tests/test_gemm_work.py).

Every launch of this package goes through ``_tiles.wrap_triton``; while ``record_launches()`` is active each one
is appended to the log as a :class:`Launch`: the kernel's name, the grid, and the launch's arguments bound to the
kernel's parameter names (positional arguments and the constexpr / launch keywords alike). The recorded tensors are
the launch's own objects, not copies: a model that reads one (the XE positive pass reads its row ranges) sees its
value at the end of the block, which is the value at launch time for every tensor the launchers do not rewrite.

``dry=True`` records without running the kernels, so the launchers run at B = 32768 on CPU tensors in seconds (no
interpreter, no GPU). Outputs of ``flashdml._debug.new_output`` are then zero-filled; whatever a launcher reads
back from a kernel is that zero, so the host-side decisions that depend on kernel results take their "nothing
found" branch: the contextual loss's list-overflow rerun never happens (a real batch whose neighbour band exceeds
the list capacity makes one more ``_ctx_list_kernel`` launch over the overflowing rows), and the hardest-negatives
radix passes run over a zero histogram (same launches, same grids). Every other launch sequence depends only on
shapes, labels and arguments, so a dry log equals the real one.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional

from .. import _debug


@dataclasses.dataclass
class Launch:
    """One recorded launch: ``params`` maps every parameter name of the kernel that the launch passed (positional
    or keyword, ``num_warps`` / ``num_stages`` included) to its value."""

    kernel: str
    grid: tuple
    params: dict


@dataclasses.dataclass
class LaunchLog:
    dry: bool
    launches: list = dataclasses.field(default_factory=list)


_active: Optional[LaunchLog] = None


def current() -> Optional[LaunchLog]:
    """The active log, or None outside ``record_launches()``."""
    return _active


def kernel_name(kernel: Any) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", str(fn))


def record(kernel: Any, grid, args: tuple, kwargs: dict) -> bool:
    """Append a launch to the active log; True when the kernel must not run (dry mode). Called by wrap_triton."""
    log = _active
    if log is None:
        return False
    names = list(getattr(kernel, "arg_names", ()))
    if len(names) < len(args):
        names += [f"arg{i}" for i in range(len(names), len(args))]
    params = dict(zip(names, args))
    params.update(kwargs)
    log.launches.append(Launch(kernel_name(kernel), tuple(grid) if isinstance(grid, (tuple, list)) else (grid,),
                               params))
    return log.dry


@contextlib.contextmanager
def record_launches(dry: bool = False) -> Iterator[LaunchLog]:
    """Record every Triton launch of the block (nested blocks: the inner one records, the outer sees nothing)."""
    global _active
    previous = _active
    log = LaunchLog(dry=dry)
    _active = log
    try:
        with _debug.zero_outputs(dry):
            yield log
    finally:
        _active = previous
