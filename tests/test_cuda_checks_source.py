"""The CUDA entries check their inputs exactly as the CPU entries do (source-level: CUDA does not run here).

Every op's argument checks live in one function, ``flashdml::check::<op>_inputs`` (csrc/include/flashdml/op_checks.h).
This test reads csrc/cpu/*.cpp and csrc/cuda/*.cu, finds the function each ``TORCH_LIBRARY_IMPL(flashdml, CPU / CUDA)``
block registers for an op, and asserts that its body calls that op's check function with the op's own name before
it touches any tensor data or launches anything, so the two backends cannot drift apart.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CPU_ONLY = {"_contextual_dense_path"}  # a test-support query of the CPU op, no CUDA counterpart
# What must not come before the check: reading tensor data, launching, moving to the device, normalising the rows.
TOUCHES = re.compile(r"data_ptr|<<<|CUDAGuard|\.item\s*<|kernel_rows|normalized_rows|\.contiguous\(|new_output")


def _strip_comments(text: str) -> str:
    text = re.sub(r"//[^\n]*", "", text)  # line comments first: they may name paths such as cpu/*.cpp
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def _matching(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise AssertionError(f"unbalanced {open_}{close}")


def _function_body(text: str, name: str) -> str:
    """The body of the definition of `name` (the occurrence whose parameter list is followed by `{`)."""
    for m in re.finditer(rf"\b{re.escape(name)}\s*\(", text):
        end = _matching(text, m.end() - 1, "(", ")")
        rest = text[end:].lstrip()
        if rest.startswith("{"):
            start = end + (len(text[end:]) - len(rest))
            return text[start:_matching(text, start, "{", "}")]
    raise AssertionError(f"no definition of {name}")


def _entries(key: str) -> Dict[str, Tuple[Path, str]]:
    """{op: (source file, body of the registered function)} for TORCH_LIBRARY_IMPL(flashdml, key, m)."""
    pattern = "cpu/*.cpp" if key == "CPU" else "cuda/*.cu"
    found: Dict[str, Tuple[Path, str]] = {}
    for path in sorted(CSRC.glob(pattern)):
        text = _strip_comments(path.read_text())
        for block in re.finditer(rf"TORCH_LIBRARY_IMPL\(\s*flashdml\s*,\s*{key}\s*,\s*m\s*\)\s*\{{", text):
            body = text[block.end() - 1:_matching(text, block.end() - 1, "{", "}")]
            for op, fn in re.findall(r'm\.impl\(\s*"(\w+)"\s*,\s*&([\w:]+)\s*\)', body):
                assert op not in found, f"{op} registered twice for {key}"
                found[op] = (path, _function_body(text, fn.split("::")[-1]))
    return found


CPU = _entries("CPU")
CUDA = _entries("CUDA")


def _ops_without_cuda() -> set:
    """Compiled ops of the families whose ``backends`` leave out "cuda" (not ported yet: CPU entries only)."""
    import flashdml  # noqa: F401  (imports every op family's glue, which registers it)
    from flashdml.ops import registry

    return {n for fam in registry.FAMILIES.values() if "cuda" not in fam.backends for n in fam.compiled_names()}


NO_CUDA = _ops_without_cuda()


def test_the_parser_finds_every_entry():
    assert len(CPU) >= 11 and len(CUDA) >= 11, (sorted(CPU), sorted(CUDA))
    assert set(CPU) - CPU_ONLY - NO_CUDA == set(CUDA), "ops registered for only one of CPU / CUDA"
    assert not NO_CUDA & set(CUDA), "a family registers CUDA kernels but does not list 'cuda' in its backends"


def _check_call(op: str, path: Path, body: str) -> None:
    call = re.search(rf"\bcheck::{op}_inputs\s*\(\s*([^,]+),", body)
    assert call, f"{path.name}: the {op} entry does not call check::{op}_inputs (flashdml/op_checks.h)"
    name = call.group(1).strip()
    if not name.startswith('"'):  # a variable: `constexpr const char* op = "..."` in the same body
        decl = re.search(rf"\b{re.escape(name)}\s*=\s*(\"\w+\")", body)
        assert decl, f"{path.name}: {op}: cannot resolve the op name {name!r} passed to the check"
        name = decl.group(1)
    assert name == f'"{op}"', f"{path.name}: check::{op}_inputs is called with the op name {name}"
    touch = TOUCHES.search(body)
    assert touch is None or touch.start() > call.start(), (
        f"{path.name}: the {op} entry uses {touch.group(0)!r} before check::{op}_inputs")


@pytest.mark.parametrize("op", sorted(CUDA))
def test_cuda_entry_runs_the_shared_check_first(op):
    _check_call(op, *CUDA[op])


@pytest.mark.parametrize("op", sorted(set(CPU) - CPU_ONLY))
def test_cpu_entry_runs_the_shared_check_first(op):
    _check_call(op, *CPU[op])


def test_every_shared_check_is_used_and_local_copies_are_gone():
    header = _strip_comments((CSRC / "include" / "flashdml" / "op_checks.h").read_text())
    defined = set(re.findall(r"inline void (\w+)_inputs\s*\(", header))
    assert defined == set(CUDA) | NO_CUDA, (
        f"op_checks.h defines checks for {sorted(defined)}, CUDA has {sorted(CUDA)}, CPU only {sorted(NO_CUDA)}")
    for path in sorted(CSRC.glob("cpu/*.cpp")) + sorted(CSRC.glob("cuda/*.cu")):
        text = _strip_comments(path.read_text())
        # The per-file argument checks that used to drift (check_inputs, check_xent_inputs, check_label_tensor).
        assert not re.search(r"\bvoid check_\w*inputs\s*\(", text), f"{path.name} defines its own input check"
        assert "check_label_tensor(" not in text, f"{path.name} checks labels outside op_checks.h"
