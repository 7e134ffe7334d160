"""Device → host synchronisations on the per-call path of the Triton ops (docs/gpu.md, "Host synchronisations").

No GPU needed: the interpreter runs the Triton ops on CPU tensors through the same Python code as on CUDA, and
``record_host_reads`` patches the Tensor methods that read a value on the host (``__float__``, ``__int__``,
``__bool__``, ``__index__``, ``item``, ``tolist``, ``cpu``) to record who called them. On a GPU each of those calls
waits for the device. The one branch that differs between CPU and GPU tensors — a tensor temperature on the CPU is
checked on the host, because reading it there is free — is switched to the device path by patching
``_validation.host_readable``. Each op may make exactly the reads docs/gpu.md lists for it (forward and backward).
"""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="runs the Triton ops on CPU tensors (TRITON_INTERPRET=1)")

import flashdml as fd  # noqa: E402
from flashdml import _validation  # noqa: E402

READS = ("__float__", "__int__", "__bool__", "__index__", "item", "tolist", "cpu")


@contextlib.contextmanager
def record_host_reads():
    """Yields a list that collects ``(method, "file.py:function")`` for every host read of a tensor's value made
    inside the block by flashdml's own code (reads by torch or pytest internals are not ours to remove)."""
    calls: list = []
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name):
        original = saved[name]

        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            path = frame.f_code.co_filename
            while frame.f_code.co_name.startswith("<") and frame.f_back is not None \
                    and frame.f_back.f_code.co_filename == path:  # a generator expression: name its function
                frame = frame.f_back
            if f"{os.sep}flashdml{os.sep}" in path:
                calls.append((name, f"{os.path.basename(path)}:{frame.f_code.co_name}"))
            return original(self, *args, **kwargs)
        return read

    for name in READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


_FINITE = {"_math.py:all_finite"}  # the non-finite rule: NaN loss instead of running a selection
_ROWS = {"_validation.py:_raise_on_nonfinite_rows"}  # selections reject non-finite rows with a ValueError
_NEG = {"selection.py:count_negatives", "selection.py:hardest_negatives_impl"}  # k <= #negatives (glue, op)

# op -> (fn(x, labels, temperature tensor), the host reads docs/gpu.md documents for it)
OPS = {
    "batch_softmax": (lambda x, lab, t: fd.batch_softmax(x, x.flip(0), temperature=t, symmetric=True), set()),
    "ntxent": (lambda x, lab, t: fd.ntxent(x, lab, temperature=t), set()),
    "cross_example_softmax": (lambda x, lab, t: fd.cross_example_softmax(x, labels=lab, temperature=t), set()),
    "supcon": (lambda x, lab, t: fd.supcon(x, lab, temperature=t), set()),
    "cross_example_softmax_top_k": (
        lambda x, lab, t: fd.cross_example_softmax(x, labels=lab, temperature=t, top_k=8),
        _FINITE | _NEG | {"selection.py:positive_pairs"}),
    "threshold_consistent_margin": (lambda x, lab, t: fd.threshold_consistent_margin(x, lab), set()),
    "contrastive_margin": (lambda x, lab, t: fd.contrastive_margin(x, lab), set()),
    "multi_similarity": (lambda x, lab, t: fd.multi_similarity(x, lab), set()),
    "circle": (lambda x, lab, t: fd.circle(x, lab), set()),
    "triplet_margin": (lambda x, lab, t: fd.triplet_margin(x, lab), {"triplet.py:__init__"}),
    "contextual_loss": (lambda x, lab, t: fd.contextual_loss(x, lab, k=4), _FINITE),
    "knn": (lambda x, lab, t: fd.knn(x, k=5)[0], _ROWS),
    "hardest_negatives": (lambda x, lab, t: fd.hardest_negatives(x, labels=lab, k=3)[0], _ROWS | _NEG),
}


@pytest.fixture
def device_path(monkeypatch):
    """Tensor temperatures take the path of a GPU-resident one (not read on the host)."""
    monkeypatch.setattr(_validation, "host_readable", lambda t: False)


@pytest.mark.parametrize("name", list(OPS))
def test_only_documented_host_reads(name, device_path):
    fn, allowed = OPS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 16, generator=g).requires_grad_()
    labels = torch.randint(0, 4, (24,), generator=g)
    t = torch.tensor(0.1, requires_grad=True)
    with fd.backend("triton"), record_host_reads() as calls:
        out = fn(x, labels, t)
        out.sum().backward()
    assert x.grad is not None and torch.isfinite(out).all()
    seen = {where for _, where in calls}
    assert seen <= allowed, f"{name}: undocumented host reads {sorted(seen - allowed)} ({calls})"


def test_recorder_sees_reads():
    """The recorder is not blind: a temperature read on the host (the CPU path) is caught."""
    with record_host_reads() as calls:
        _validation.check_temperature(torch.tensor(0.1), torch.device("cpu"))
    assert ("__float__", "_validation.py:check_temperature") in calls


@pytest.mark.parametrize("bad", [0.0, -0.1, 1e-30, float("inf"), float("nan")])
def test_invalid_device_temperature_gives_nan(bad, device_path):
    """A device-resident temperature is not read on the host: an invalid value makes the loss and the gradients
    NaN (never a finite wrong number); a valid one is passed through, gradient included."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, generator=g).requires_grad_()
    labels = torch.randint(0, 3, (16,), generator=g)
    for backend in ("triton", "reference"):
        x.grad = None
        t = torch.tensor(bad, requires_grad=True)
        with fd.backend(backend):
            loss = fd.ntxent(x, labels, temperature=t)
            loss.backward()
        assert torch.isnan(loss) and torch.isnan(x.grad).all(), backend
    good = torch.tensor(0.1, requires_grad=True)
    checked = _validation.check_temperature(good, torch.device("cpu"))
    assert torch.equal(checked.detach(), good.detach())
    checked.backward()
    assert good.grad == 1.0


def test_cpu_tensor_temperature_still_raises():
    """Reading a CPU tensor costs no device sync, so it is still checked eagerly with the usual message."""
    with pytest.raises(ValueError, match="temperature must be > 0"):
        _validation.check_temperature(torch.tensor(-1.0), torch.device("cpu"))
