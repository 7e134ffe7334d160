"""Package-level behaviour: importing, the optional extension, dispatch."""
import subprocess
import sys

import pytest
import torch

import flashdml as fd


def test_plain_import_loads_the_extension_when_built():
    # A fresh interpreter that imports flashdml before torch must still load flashdml._C.
    code = "import flashdml, json; print(json.dumps(flashdml.available_backends()['cpu']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[true, "C++ CPU kernels (flashdml._C)"]' or not fd._ext.C_LOADED


def test_package_imports_without_the_extension():
    code = (
        "import sys, builtins\n"
        "real_import = builtins.__import__\n"
        "def fake(name, globals=None, locals=None, fromlist=(), level=0):\n"
        "    if fromlist and '_C' in fromlist and globals and globals.get('__name__', '').startswith('flashdml'):\n"
        "        raise ImportError('simulated: extension not built')\n"
        "    return real_import(name, globals, locals, fromlist, level)\n"
        "builtins.__import__ = fake\n"
        "import warnings, torch, flashdml as fd\n"
        "ok, why = fd.available_backends()['cpu']\n"
        "assert not ok and 'simulated' in why, why\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    loss = fd.batch_softmax(torch.randn(6, 3), torch.randn(6, 3))\n"
        "assert any('reference' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "assert torch.isfinite(loss)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_backend_context_restores_previous_choice():
    fd.set_backend("reference")
    with fd.backend("cpu"):
        assert fd.get_backend() == "cpu"
    assert fd.get_backend() == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        fd.set_backend("tpu")


def test_auto_uses_reference_for_unfused_ops_and_explicit_backend_raises():
    assert fd.ops.registry.family_of("similarity").backends == (), "similarity got a kernel: pick another unfused op here"
    x = torch.randn(10, 4)
    fd._dispatch._warned.discard(("similarity", "cpu"))
    with pytest.warns(RuntimeWarning, match="similarity: using the pure-PyTorch reference"):
        got = fd.similarity(x)
    assert torch.equal(got, fd.reference.similarity(x))
    with fd.backend("cpu"), pytest.raises(RuntimeError, match="backend 'cpu' has no kernel for similarity"):
        fd.similarity(x)
    with fd.backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        fd.similarity(x)


def test_backend_blocks_are_local_to_their_thread():
    """Two threads inside ``with backend(...)`` blocks at the same time each see their own choice, and their
    exits (in any order) leave the process on its default."""
    import threading

    both_inside = threading.Barrier(2)
    seen = {}

    def worker(name):
        with fd.backend(name):
            both_inside.wait(timeout=10)
            seen[name] = fd.get_backend()
            both_inside.wait(timeout=10)
        seen[name + " after"] = fd.get_backend()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("reference", "cpu")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert seen == {"reference": "reference", "cpu": "cpu", "reference after": "auto", "cpu after": "auto"}
    assert fd.get_backend() == "auto"


def test_set_backend_is_the_default_of_every_thread():
    import threading

    fd.set_backend("reference")
    seen = []
    t = threading.Thread(target=lambda: seen.append(fd.get_backend()))
    t.start()
    t.join(timeout=10)
    assert seen == ["reference"]
