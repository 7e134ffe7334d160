"""Layers point downward only (read from the source, nothing imported):

    base      flashdml._schemas, _math, _debug, _ext, _validation, _docs (import nothing above them)
    kernels   flashdml.triton_kernels.*                              (base only)
    reference flashdml.reference.*                                   (base only)
    glue      flashdml.ops.*, _dispatch, metrics, losses, ...        (anything below)

and no kernel module imports another module's private (underscore) names.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = {"_schemas", "_math", "_debug", "_ext", "_validation", "_docs"}


def _imports(path: pathlib.Path, package: str):
    """(absolute module, imported names) of every import in ``path`` (a module of ``package``)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [a.name for a in node.names]
            if node.module is None:  # from . import x, from .. import y
                for n in names:
                    yield f"{module}.{n}", []
            else:
                yield module, names
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _modules(folder: pathlib.Path, package: str):
    for path in sorted(folder.glob("*.py")):
        yield path, package


@pytest.mark.parametrize("layer,folder,package", [
    ("kernels", ROOT / "triton_kernels", "flashdml.triton_kernels"),
    ("reference", ROOT / "python" / "flashdml" / "reference", "flashdml.reference"),
])
def test_lower_layers_import_only_the_base(layer, folder, package):
    bad = []
    for path, pkg in _modules(folder, package):
        for module, _ in _imports(path, pkg):
            if not module.startswith("flashdml"):
                continue
            if module.startswith(package):
                continue
            top = module.split(".")[1] if "." in module else ""
            if top not in BASE:
                bad.append(f"{path.name}: imports {module}")
    assert not bad, f"{layer} import from above the base layer:\n" + "\n".join(bad)


def test_base_modules_import_nothing_above_them():
    bad = []
    for name in BASE:
        path = ROOT / "python" / "flashdml" / f"{name}.py"
        for module, _ in _imports(path, "flashdml"):
            if module.startswith("flashdml") and module != "flashdml._C":
                top = module.split(".")[1] if "." in module else ""
                if top not in BASE:
                    bad.append(f"{name}.py: imports {module}")
    assert not bad, "\n".join(bad)


def test_kernel_modules_share_code_through_public_names():
    bad = []
    for path, pkg in _modules(ROOT / "triton_kernels", "flashdml.triton_kernels"):
        for module, names in _imports(path, pkg):
            if module.startswith("flashdml.triton_kernels.") and not module.split(".")[-1].startswith("_"):
                private = [n for n in names if n.startswith("_")]
                if private:
                    bad.append(f"{path.name}: {module} {private}")
    assert not bad, "private names imported from another kernel module:\n" + "\n".join(bad)
