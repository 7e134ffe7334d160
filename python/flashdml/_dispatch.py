"""Backend selection: the one module that decides which implementation runs an op.

``set_backend(name)`` / ``with backend(name):`` choose among "auto", "reference", "cpu", "triton" and "cuda".
"auto" picks per call and device: the C++ CPU kernels for CPU tensors, the fastest GPU backend for CUDA
tensors (Triton, then the CUDA C++ kernels), and the reference where nothing compiled can run the op (with a
one-time warning that says why). An explicitly chosen backend that cannot run the call raises instead.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from typing import Dict, Iterator, Tuple

import torch

from . import _ext

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

# Which ops each compiled backend implements. An op missing here runs on the reference under "auto".
FUSED_OPS: Dict[str, frozenset] = {
    "cpu": frozenset({
        "batch_softmax", "cross_example_softmax", "ntxent", "threshold_consistent_margin", "contrastive_margin",
        "knn", "hardest_negatives", "cross_example_softmax_top_k", "contextual_loss",
        "recall_at_k", "map_at_r", "pr_auc", "opis", "eps_opis", "evaluate",
    }),
    "triton": frozenset({
        "batch_softmax", "cross_example_softmax", "ntxent", "threshold_consistent_margin", "contrastive_margin",
        "knn", "hardest_negatives", "cross_example_softmax_top_k", "contextual_loss",
        "recall_at_k", "map_at_r", "pr_auc", "opis", "eps_opis", "evaluate",
    }),
    "cuda": frozenset({
        "batch_softmax", "cross_example_softmax", "ntxent", "threshold_consistent_margin", "contrastive_margin",
        "knn", "hardest_negatives", "cross_example_softmax_top_k", "contextual_loss",
        "recall_at_k", "map_at_r", "pr_auc", "opis", "eps_opis", "evaluate",
    }),
}

_current = "auto"
_warned: set = set()


def set_backend(name: str) -> None:
    """Select the backend for every following call (process-wide)."""
    global _current
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    _current = name


def get_backend() -> str:
    return _current


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with flashdml.backend("cpu"): ...`` runs the block on that backend, then restores the previous one."""
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


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
    """``{name: (available, reason)}`` for every backend: what this install can run, and why not the rest."""
    return {name: status() for name, status in _STATUS.items()}


def _can_run(name: str, op: str, device: torch.device) -> Tuple[bool, str]:
    if name == "reference":
        return True, ""
    ok, why = _STATUS[name]()  # only this backend's status: resolve runs on every call
    if not ok:
        return False, why
    if op not in FUSED_OPS[name]:
        return False, f"backend {name!r} has no kernel for {op} yet"
    if name == "cpu" and device.type != "cpu":
        return False, f"backend 'cpu' runs CPU tensors, got tensors on {device}"
    if name == "cuda" and device.type != "cuda":
        return False, f"backend 'cuda' runs CUDA tensors, got tensors on {device}"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreter_enabled()):
        return False, f"backend 'triton' runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"
    return True, ""


def resolve(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on tensors on ``device`` now."""
    name = _current
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
    if key not in _warned:
        _warned.add(key)
        detail = "; ".join(reasons) if reasons else f"no compiled backend for {device.type} tensors"
        warnings.warn(f"flashdml.{op}: using the pure-PyTorch reference ({detail})", RuntimeWarning, stacklevel=3)
    return "reference"
