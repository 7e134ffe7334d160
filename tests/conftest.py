"""Test set-up. Runs before any test module imports flashdml, so the Triton interpreter is switched on before
any Triton kernel is defined (no GPU here: the Triton kernels run on CPU tensors under the interpreter)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import flashdml  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_backend():
    """Every test starts on "auto" and cannot leak a backend choice into the next."""
    flashdml.set_backend("auto")
    yield
    flashdml.set_backend("auto")


@pytest.fixture
def poison_triton_outputs(monkeypatch):
    """Every tensor a Triton launcher allocates through flashdml._debug.new_output starts as NaN (integers: a
    sentinel), so an element a kernel fails to write shows up. Returns the list of allocated shapes."""
    from flashdml import _debug

    calls = []

    def new_output(shape, *, dtype, device):
        calls.append(tuple(shape))
        fill = float("nan") if dtype.is_floating_point else _debug.POISON_INT
        return torch.full(tuple(shape), fill, dtype=dtype, device=device)

    monkeypatch.setattr(_debug, "new_output", new_output)
    return calls


@pytest.fixture(autouse=True)
def restore_precision_flags():
    """Every test starts from PyTorch's default fp32 matmul precision (no TF32) and leaves the flags as it found
    them. A test that sets them (the TF32 opt-in tests, benchmarks/gpu.py's precision modes) cannot leak an opt-in
    into later tests, whose Triton launches would then pick the TF32 configs."""
    # torch.set_float32_matmul_precision writes the CUDA and the oneDNN matmul settings: restore both, and the
    # generic one, or a later test would run with a leftover opt-in (or a legacy / new mix that raises)
    backends = (torch.backends, torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "none"
    try:
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value
        torch.get_float32_matmul_precision()  # the legacy view must stay readable (no legacy / new mix)
