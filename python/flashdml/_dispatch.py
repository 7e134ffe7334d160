"""Backend selection: the one module that decides which implementation runs an op.

``set_backend(name)`` / ``with backend(name):`` choose among "auto", "reference", "cpu", "triton" and "cuda".
"auto" picks per call and device: the C++ CPU kernels for CPU tensors, the fastest GPU backend for CUDA
tensors (Triton, then the CUDA C++ kernels), and the reference where nothing compiled can run the op (with a
one-time warning that says why). An explicitly chosen backend that cannot run the call raises instead.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch

from . import _ext
from .ops import registry

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

# The process default (set_backend) and the choice of the current thread / task (with backend(...)).
_default = "auto"
_scoped: contextvars.ContextVar = contextvars.ContextVar("flashdml_backend", default=None)
_warned: set = set()


def set_backend(name: str) -> None:
    """Select the backend that runs every following call of the process.

    The choice is the process default: a block ``with flashdml.backend(...)`` overrides it in its own thread or
    asyncio task. Under ``"auto"`` (the initial choice) each call picks the C++ CPU kernels for CPU tensors,
    Triton then the CUDA C++ kernels for CUDA tensors, and the reference (warning once, saying why) where no
    compiled kernel can run it. An explicit backend that cannot run a call makes that call raise instead.

    Args:
        name (str): one of ``"auto"``, ``"reference"`` (the pure-PyTorch oracle), ``"cpu"`` (C++ kernels),
            ``"triton"`` or ``"cuda"`` (CUDA C++ kernels). The name is accepted whether or not this install
            can run that backend (see :func:`available_backends`).

    Returns:
        None.

    Raises:
        ValueError: ``name`` is not one of the five backend names. (An op that the chosen backend cannot run
            raises ``RuntimeError`` when it is called, not here.)

    Example:
        >>> import flashdml as fd
        >>> fd.set_backend("reference")
        >>> fd.get_backend()
        'reference'
        >>> fd.set_backend("auto")   # back to the default
    """
    global _default
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    _default = name


def get_backend() -> str:
    """The backend name the next call of this thread / task resolves from.

    That is the innermost active ``with flashdml.backend(...)`` block of the calling thread or asyncio task,
    or else the process default set by :func:`set_backend` (``"auto"`` initially). It is the name that was
    chosen, not the backend ``"auto"`` will pick for a given call.

    Returns:
        str: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Example:
        >>> import flashdml as fd
        >>> fd.get_backend()
        'auto'
        >>> with fd.backend("reference"):
        ...     fd.get_backend()
        'reference'
    """
    scoped = _scoped.get()
    return _default if scoped is None else scoped


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager: run the ``with`` block on one backend, then restore the previous choice.

    The choice is local to the calling thread (or asyncio task, through a context variable): other threads
    keep theirs, and blocks nest (the innermost wins). It overrides :func:`set_backend` inside the block.

    Args:
        name (str): ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``, as for
            :func:`set_backend`.

    Returns:
        A context manager; ``with`` binds nothing (``None``).

    Raises:
        ValueError: ``name`` is not a backend name (raised on entering the block).

    Example:
        >>> import torch, flashdml as fd
        >>> x = torch.randn(8, 4)
        >>> with fd.backend("reference"):          # the pure-PyTorch oracle
        ...     loss = fd.ntxent(x, torch.arange(8) // 2)
        >>> fd.get_backend()
        'auto'
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    token = _scoped.set(name)
    try:
        yield
    finally:
        _scoped.reset(token)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, "triton kernels on the CUDA device"
    if triton_interpreter_enabled():
        return True, "triton kernels under the interpreter (TRITON_INTERPRET=1), CPU tensors, for testing"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels under the interpreter)"


def _cpu_status() -> Tuple[bool, str]:
    return (True, "C++ CPU kernels (flashdml._C)") if _ext.C_LOADED else (False, _ext.C_ERROR)


def _cuda_status() -> Tuple[bool, str]:
    if not _ext.C_LOADED:
        return False, _ext.C_ERROR
    if not _ext.C_HAS_CUDA:
        return False, "flashdml._C was built without CUDA kernels (FLASHDML_NO_CUDA, no nvcc or CPU-only torch)"
    if not torch.cuda.is_available():
        return False, "CUDA kernels are built but no CUDA device is visible"
    return True, "CUDA C++ kernels (flashdml._C)"


_STATUS = {"reference": lambda: (True, "pure PyTorch, always available"), "cpu": _cpu_status,
           "triton": _triton_status, "cuda": _cuda_status}


def available_backends() -> Dict[str, Tuple[bool, str]]:
    """What this install can run: ``{name: (available, reason)}`` for every backend except ``"auto"``.

    A backend is available when its code can run here at all: ``"reference"`` always; ``"cpu"`` when the
    extension ``flashdml._C`` loaded; ``"cuda"`` when it was built with CUDA kernels and a CUDA device is
    visible; ``"triton"`` when Triton is installed and there is a CUDA device (or ``TRITON_INTERPRET=1``, which
    runs the kernels on CPU tensors for testing). Whether a particular op has a kernel on a backend is decided
    per call.

    Returns:
        dict[str, tuple[bool, str]]: keys ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``; each value is
        ``(available, reason)``, the reason a short sentence saying what runs or why it cannot.

    Example:
        >>> import flashdml as fd
        >>> status = fd.available_backends()
        >>> sorted(status)
        ['cpu', 'cuda', 'reference', 'triton']
        >>> status["reference"][0]                  # the oracle runs everywhere
        True
    """
    return {name: status() for name, status in _STATUS.items()}


def _can_run(name: str, op: str, device: torch.device) -> Tuple[bool, str]:
    if name == "reference":
        return True, ""
    ok, why = _STATUS[name]()  # only this backend's status: resolve runs on every call
    if not ok:
        return False, why
    family = registry.family_of(op)
    if name not in family.backends:
        return False, f"backend {name!r} has no kernel for {op}"
    missing = registry.missing_cpp_ops(family, helpers_only=registry.BACKENDS[name].namespace != registry.CPP_NAMESPACE)
    if missing:
        why = _ext.C_ERROR if not _ext.C_LOADED else "built from an older tree"
        return False, (f"{op} needs flashdml._C's {', '.join(missing)} ({why}); rebuild it with "
                       "`pip install -e . --no-build-isolation`")
    devices = registry.BACKENDS[name].device_types
    if name == "triton" and triton_interpreter_enabled():
        devices = devices + ("cpu",)
    if device.type not in devices:
        return False, f"backend {name!r} runs tensors on {' or '.join(devices)}, got tensors on {device}"
    return True, ""


def resolve(op: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs ``op`` on tensors of ``dtype`` on ``device`` now. Dtypes no fused backend takes
    (float64) run the reference, whatever the backend."""
    if dtype is not None and dtype not in registry.family_of(op).dtypes:
        return "reference"
    name = get_backend()
    if name != "auto":
        ok, why = _can_run(name, op, device)
        if not ok:
            raise RuntimeError(f"flashdml.{op}: backend {name!r} cannot run this call: {why}")
        return name
    candidates = ["cpu"] if device.type == "cpu" else (["triton", "cuda"] if device.type == "cuda" else [])
    reasons = []
    for cand in candidates:
        ok, why = _can_run(cand, op, device)
        if ok:
            return cand
        reasons.append(why)
    key = (op, device.type)
    if key not in _warned and not torch.compiler.is_compiling():  # (warnings cannot be traced: eager warns)
        _warned.add(key)
        detail = "; ".join(reasons) if reasons else f"no compiled backend for {device.type} tensors"
        warnings.warn(f"flashdml.{op}: using the pure-PyTorch reference ({detail})", RuntimeWarning, stacklevel=4)
    return "reference"


def select(op: str, x: torch.Tensor):
    """The compiled ops that run ``op`` on ``x`` (``torch.ops.flashdml`` or ``torch.ops.flashdml_triton``, the
    same schemas on both), or ``None`` when the reference runs it."""
    name = resolve(op, x.device, x.dtype)
    if name == "reference":
        return None
    return registry.compiled_ops(name, registry.family_of(op))
