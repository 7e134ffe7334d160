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
