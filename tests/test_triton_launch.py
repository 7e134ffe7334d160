"""Every Triton launch runs on the device of its tensors (issue 16 item 2).

Triton launches on the current CUDA device and its current stream, whatever device the pointers are on. The
launchers therefore use ``flashdml.triton_kernels._tiles.wrap_triton``, which enters ``torch.cuda.device(...)``
of the launch's first tensor around torch's ``wrap_triton`` launch. Without a GPU these tests check that with
mocks: the guard makes the tensor's device current at the moment of the launch, every kernel module launches
through it (source scan), and the ops' real launches all pass through it (interpreter run, counted).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import re

import pytest
import torch

import flashdml.triton_kernels as pkg
from flashdml.triton_kernels import _tiles

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class _OnCuda1(torch.Tensor):
    """A CPU tensor that reports cuda:1 as its device (only ``.device`` is read by the guard)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Mocks torch.cuda.device (records the "current device") and torch.library.wrap_triton (records the current
    device at each launch). Returns (launches, guards)."""
    state = {"current": "cuda:0"}
    launches, guards = [], []

    @contextlib.contextmanager
    def device(dev):
        guards.append(str(dev))
        prev, state["current"] = state["current"], str(dev)
        try:
            yield
        finally:
            state["current"] = prev

    class Wrapped:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, grid, state["current"]))

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.library, "wrap_triton", Wrapped)
    return launches, guards, state


def test_guard_makes_the_tensors_device_current(fake_cuda):
    launches, guards, state = fake_cuda
    x = torch.zeros(4).as_subclass(_OnCuda1)
    assert x.device == torch.device("cuda", 1)
    _tiles.wrap_triton("kernel")[(3,)](x, 7, BLOCK=16)
    assert launches == [("kernel", (3,), "cuda:1")] and guards == ["cuda:1"]
    assert state["current"] == "cuda:0"  # restored after the launch
    # CPU tensors (the interpreter) have no device to switch to: launched unguarded
    _tiles.wrap_triton("kernel")[(1,)](torch.zeros(2), 1)
    assert launches[-1] == ("kernel", (1,), "cuda:0") and guards == ["cuda:1"]


def _kernel_modules():
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("_aot", "_tiles"):
            yield importlib.import_module(f"{pkg.__name__}.{info.name}")


def test_every_launch_site_uses_the_guard():
    """No kernel module launches a kernel directly (``k[grid](...)``) or through torch's own wrap_triton."""
    problems = []
    for module in _kernel_modules():
        with open(module.__file__) as f:
            src = f.read()
        kernels = [n for n, v in vars(module).items() if hasattr(v, "arg_names") and callable(getattr(v, "fn", None))]
        if re.search(r"\bwrap_triton\(", src) and getattr(module, "wrap_triton", None) is not _tiles.wrap_triton:
            problems.append(f"{module.__name__}: wrap_triton is not _tiles.wrap_triton")
        if re.search(r"torch\.library\.wrap_triton|from torch\.library import[^\n]*wrap_triton", src):
            problems.append(f"{module.__name__}: uses torch.library.wrap_triton")
        for name in kernels:
            if re.search(rf"(?<![\w.]){re.escape(name)}\[", src):
                problems.append(f"{module.__name__}: direct launch of {name}")
    assert not problems, problems


@pytest.mark.skipif(not INTERPRET, reason="counts the interpreter's launches on CPU tensors")
def test_the_ops_launch_through_the_guard(monkeypatch):
    """Every kernel launch the ops make passes the guard's device lookup (one lookup per launch)."""
    from flashdml.triton_kernels import batch_softmax as bs
    from flashdml.triton_kernels import selection as sel

    looked_up, launched = [], []
    lookup = _tiles.launch_device
    monkeypatch.setattr(_tiles, "launch_device", lambda args: looked_up.append(1) or lookup(args))
    real = torch.library.wrap_triton

    def counting(kernel):
        wrapped = real(kernel)

        class Counted:
            def __getitem__(self, grid):
                run = wrapped[grid]
                return lambda *a, **k: launched.append(1) or run(*a, **k)
        return Counted()

    monkeypatch.setattr(torch.library, "wrap_triton", counting)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    y = torch.randn(7, 5, generator=g)
    t = torch.tensor(0.1)
    y6 = y[:6].contiguous()
    loss, row_lse, col_lse = bs.fwd_impl(x, y6, None, t, True)
    bs.bwd_impl(torch.tensor(1.0), x, y6, None, t, True, row_lse, col_lse)
    sel.knn_impl(x, y, 2, False)
    sel.hardest_negatives_impl(x, y, torch.arange(6), torch.arange(7) % 3, 3, False)
    assert len(launched) >= 8 and len(looked_up) == len(launched)


def test_launch_log_records_and_dry_mode_skips(fake_cuda):
    """record_launches() logs (kernel, grid, params bound to the kernel's names); dry mode logs without launching
    and zero-fills the launchers' outputs; outside the block nothing is recorded."""
    from flashdml import _debug
    from flashdml.triton_kernels import _launch_log

    launches, _, _ = fake_cuda

    def my_kernel():
        pass

    class Kernel:
        arg_names = ["x_ptr", "B", "BLOCK"]
        fn = staticmethod(my_kernel)

    kernel = Kernel()
    x = torch.zeros(2)
    with _launch_log.record_launches() as log:
        _tiles.wrap_triton(kernel)[(3, 2)](x, 5, BLOCK=16, num_warps=4)
    assert len(launches) == 1 and len(log.launches) == 1
    rec = log.launches[0]
    assert rec.kernel == "my_kernel" and rec.grid == (3, 2)
    assert rec.params["x_ptr"] is x and rec.params["B"] == 5 and rec.params["BLOCK"] == 16
    assert rec.params["num_warps"] == 4
    with _launch_log.record_launches(dry=True) as dry:
        _tiles.wrap_triton(kernel)[(1,)](x, 7, BLOCK=8)
        out = _debug.new_output((3,), dtype=torch.float32, device="cpu")
        assert torch.equal(out, torch.zeros(3))
    assert len(launches) == 1 and [r.params["B"] for r in dry.launches] == [7]
    _tiles.wrap_triton(kernel)[(1,)](x, 9, BLOCK=8)
    assert len(launches) == 2 and len(log.launches) == 1 and len(dry.launches) == 1
    assert _launch_log.current() is None and not _debug._zero
