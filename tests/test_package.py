"""Package-level behaviour: importing, the optional extension, dispatch; the packaging metadata and the sdist."""
import ast
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

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


# --- packaging: pyproject.toml metadata, LICENSE, the source distribution ---------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _names(requirements):
    """Distribution names of PEP 508 strings, lower-case, without versions, extras or markers."""
    return {re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", r).group(1).lower() for r in requirements}


def test_project_metadata_is_declared_in_pyproject():
    project = _pyproject()["project"]
    assert project["name"] == "flashdml"
    assert project["version"] == fd.__version__
    assert project["description"]
    assert project["readme"] == "README.md" and (ROOT / "README.md").is_file()
    assert project["requires-python"] == ">=3.10"
    assert _names(project["dependencies"]) == {"torch", "numpy", "triton"}
    triton = [r for r in project["dependencies"] if r.startswith("triton")]
    assert len(triton) == 1 and "sys_platform == 'linux'" in triton[0], triton
    assert not project.get("dynamic"), "metadata is static: setup.py must not supply any"


def test_extras_name_the_optional_peers():
    extras = {k: _names(v) for k, v in _pyproject()["project"]["optional-dependencies"].items()}
    assert extras == {
        "pml": {"pytorch-metric-learning"},
        "bench": {"matplotlib", "tqdm", "faiss-cpu", "pytorch-metric-learning"},
        "test": {"pytest", "hypothesis", "pytorch-metric-learning", "faiss-cpu", "scikit-learn", "matplotlib"},
        "examples": {"scikit-learn", "matplotlib", "pytorch-metric-learning"},
    }


def test_every_declared_requirement_is_pinned_in_requirements_txt():
    # `make test` / `make bench` install requirements.txt only: it must cover the runtime and every extra.
    project = _pyproject()["project"]
    declared = _names(project["dependencies"])
    for reqs in project["optional-dependencies"].values():
        declared |= _names(reqs)
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    pinned = {ln.split("==")[0].lower() for ln in lines if "==" in ln}
    assert declared <= pinned, declared - pinned


def test_setup_py_leaves_the_metadata_to_pyproject():
    # setuptools ignores (or rejects) [project] fields passed to setup() again; keep one source.
    tree = ast.parse((ROOT / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1
    given = {kw.arg for kw in calls[0].keywords}
    assert given & {"name", "version", "description", "python_requires", "install_requires", "extras_require",
                    "license", "author", "url", "long_description"} == set(), given
    assert {"ext_modules", "packages", "package_dir"} <= given


def test_license_file_is_the_declared_apache_license():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


def test_sdist_carries_every_source_the_build_needs(tmp_path):
    if not (ROOT / "setup.py").is_file():
        pytest.skip("not a source checkout")
    env = dict(os.environ, FLASHDML_NO_CUDA="1")  # the file list must not depend on finding nvcc
    cmd = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
           "sdist", "--dist-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = tmp_path.glob("flashdml-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "csrc").rglob("*"))
               if p.suffix in (".cpp", ".cu", ".cuh", ".h")]
    assert any(s.endswith(".cu") for s in sources) and any(s.startswith("csrc/include/") for s in sources)
    kernels = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "triton_kernels").glob("*.py"))]
    required = set(sources) | set(kernels) | {
        "LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "PKG-INFO",
        "python/flashdml/__init__.py", "python/flashdml/reference/__init__.py", "docs/spec.md",
    }
    assert required <= names, sorted(required - names)
    assert not [n for n in names if n.endswith(".so")]
    pkg_info = tarfile.open(archive).extractfile(f"{archive.name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
    assert "License-Expression: Apache-2.0" in pkg_info and "Requires-Dist: torch>=2.13" in pkg_info


def test_readme_install_section_matches_setup_py():
    readme = (ROOT / "README.md").read_text()
    default = re.search(r'^DEFAULT_CUDA_ARCHS = "([^"]+)"', (ROOT / "setup.py").read_text(), re.M)
    assert default, "setup.py no longer sets a default TORCH_CUDA_ARCH_LIST: update the README's Install section"
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert f"`{default.group(1)}`" in install
    assert "FLASHDML_NO_CUDA=1 pip install --no-build-isolation ." in install
    for extra in _pyproject()["project"]["optional-dependencies"]:
        assert f"| `{extra}` |" in install, extra
    # the two quick-start commands stay as they are
    assert "make bench   # set-up" in readme and "make test    # same set-up" in readme
