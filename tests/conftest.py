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


@pytest.fixture
def restore_precision_flags():
    """The test starts from PyTorch's default fp32 matmul precision (no TF32) and leaves the flags as it found
    them (tests of the TF32 opt-in: tests/test_triton_tf32.py, tests/test_cuda_tf32.py)."""
    matmul = torch.backends.cuda.matmul
    saved = (torch.backends.fp32_precision, matmul.fp32_precision)
    torch.backends.fp32_precision = "none"
    matmul.fp32_precision = "none"
    try:
        yield
    finally:
        torch.backends.fp32_precision, matmul.fp32_precision = saved
        torch.get_float32_matmul_precision()  # the legacy view must stay readable (no legacy / new mix)
