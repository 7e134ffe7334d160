"""`make gpu-check` without a GPU: tools/gpu_check.sh, the sanitizer driver's op coverage, the benchmarks' --gpu mode.

The script's GPU path is exercised with a stand-in interpreter (a shell script that reports a device and lets
each phase pass, fail or hang), so the phase bookkeeping, the time limits and summary.md are checked here too.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from flashdml._schemas import SCHEMAS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
NO_GPU_LINE = ("gpu-check: no CUDA device is visible (torch.cuda.is_available() is False) — nothing to check; "
               "the CPU suite is `make test`")


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(ROOT, "python"), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _run_script(out_dir, py, **extra):
    return subprocess.run(["bash", SCRIPT], cwd=ROOT, env=_env(OUT=str(out_dir), PY=py, **extra),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_without_gpu_says_so_and_exits_0(tmp_path):
    r = _run_script(tmp_path, sys.executable)
    assert r.returncode == 0, r.stdout + r.stderr
    assert NO_GPU_LINE in r.stdout.splitlines()
    summary = (tmp_path / "summary.md").read_text()
    assert NO_GPU_LINE in summary
    assert "| phase |" not in summary  # no phase ran


FAKE_PY = """#!/bin/bash
# a stand-in interpreter: every `python -c` succeeds (a "device" is visible); pytest exits $FAKE_PYTEST_RC
echo "fake-python $*"
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then sleep "${FAKE_PYTEST_SLEEP:-0}"; exit "${FAKE_PYTEST_RC:-0}"; fi
exit 0
"""


@pytest.fixture
def fake_py(tmp_path):
    path = tmp_path / "fake-python"
    path.write_text(FAKE_PY)
    path.chmod(0o755)
    return str(path)


def _phase_rows(summary: str) -> dict:
    rows = [ln.strip("|").split("|") for ln in summary.splitlines() if ln.startswith("| ") and "phase" not in ln]
    return {cells[0].strip(): cells[1].strip() for cells in rows}


def test_gpu_check_phases_pass_and_fail(tmp_path, fake_py):
    ok = _run_script(tmp_path / "ok", fake_py, PATH="/usr/bin:/bin")  # no compute-sanitizer on this PATH
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rows = _phase_rows((tmp_path / "ok" / "summary.md").read_text())
    assert rows["1 pytest (GPU test files)"] == "passed"
    assert rows["3 benchmarks --gpu --quick"] == "passed"
    assert "--gpu --quick" in (tmp_path / "ok" / "bench.log").read_text()
    # the pytest phase gets the GPU-relevant files, among them the CUDA build tests
    assert "tests/test_cuda_build.py" in (tmp_path / "ok" / "pytest.log").read_text()

    bad = _run_script(tmp_path / "bad", fake_py, FAKE_PYTEST_RC="3")
    assert bad.returncode == 1
    summary = (tmp_path / "bad" / "summary.md").read_text()
    assert _phase_rows(summary)["1 pytest (GPU test files)"] == "FAILED (exit 3)"
    assert "SOME PHASES FAILED" in summary


def test_gpu_check_phase_time_limit(tmp_path, fake_py):
    r = _run_script(tmp_path, fake_py, FAKE_PYTEST_SLEEP="30", GPU_CHECK_T_TESTS="1")
    assert r.returncode == 1
    assert _phase_rows((tmp_path / "summary.md").read_text())["1 pytest (GPU test files)"] == "TIMED OUT after 1 s"


def test_sanitizer_cases_cover_every_schema():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import gpu_sanitize_cases as cases
    finally:
        sys.path.remove(os.path.join(ROOT, "tools"))
    # every op a GPU backend serves (families not ported to CUDA / Triton yet have nothing to sanitise)
    from flashdml.ops import registry

    gpu_ops = {n for fam in registry.FAMILIES.values() if {"cuda", "triton"} & set(fam.backends)
               for n in fam.compiled_names()}
    assert gpu_ops <= set(SCHEMAS)
    assert set(cases.CASES) == gpu_ops
    listed = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_sanitize_cases.py"), "--list"],
                            capture_output=True, text=True, timeout=60, env=_env())
    assert listed.returncode == 0
    assert {ln.split("\t")[0] for ln in listed.stdout.splitlines()} == gpu_ops


def _bench_list(*args):
    r = subprocess.run([sys.executable, "-m", "benchmarks", *args, "--list"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [ln.split("\t") for ln in r.stdout.splitlines()]


def test_benchmarks_gpu_quick_list():
    from benchmarks import OPS

    rows = _bench_list("--gpu", "--quick")
    assert {r[3] for r in rows} == {"cuda"}
    for op in OPS:
        labels = [r[1] for r in rows if r[0] == op]
        for prec in ("fp32", "tf32", "bf16"):
            assert any(lab.endswith(f"prec={prec}") for lab in labels), (op, prec)
        assert any("=32768" in lab for lab in labels), op
        fused = {r[2] for r in rows if r[0] == op}
        assert {"flashdml-triton", "flashdml-cuda"} <= fused, op
    # eager PyTorch and torch.compile of the reference on the GPU, for the losses
    assert {"reference-cuda", "torch.compile(reference)-cuda"} <= {r[2] for r in rows if r[0] == "ntxent"}


def test_cpu_quick_list_has_no_gpu_mode_cells():
    rows = _bench_list("--quick")
    assert not any("prec=" in r[1] or r[2] == "torch.compile(reference)-cuda" for r in rows)
    # unchanged: one shape per op, and the CPU providers as before
    assert {r[2] for r in rows if r[0] == "batch_softmax"} == {
        "reference", "flashdml-cpu", "chunked-pytorch", "reference-cuda", "flashdml-triton", "flashdml-cuda"}
    assert {r[2] for r in rows if r[0] == "metrics"} == {"reference", "flashdml-cpu", "gemm-only", "pml-faiss"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_benchmarks_gpu_run_without_gpu(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--gpu", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("no CUDA device") == 1


def test_apply_precision_restores_each_setting():
    """Only oneDNN's matmul set (as torch.set_float32_matmul_precision("medium") followed by a reset of the CUDA
    one leaves it): the legacy getter reads "medium", and restoring that value would opt CUDA matmuls into TF32."""
    from benchmarks.gpu import apply_precision

    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    cuda_before = torch.backends.cuda.matmul.fp32_precision
    with apply_precision("tf32", dtype=False):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == cuda_before != "tf32"
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"


def test_apply_precision_sets_and_restores():
    from benchmarks.gpu import apply_precision

    before = torch.get_float32_matmul_precision()
    with apply_precision("bf16"):
        assert torch.randn(2).dtype == torch.bfloat16
        assert torch.get_float32_matmul_precision() == "highest"
    with apply_precision("tf32", dtype=False):
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.randn(2).dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError):
        with apply_precision("fp8"):
            pass


def test_gpu_run_order_puts_redundant_cells_last():
    from benchmarks import OPS, gpu, harness

    todo = [(s, p) for op in map(harness.load_op, OPS) for s, p in harness.cells(op, "gpu-quick")]
    todo.sort(key=lambda c: gpu.run_order(*c))
    first, last = todo[0], todo[-1]
    assert first[1].name.startswith("flashdml-") and first[0]["prec"] == "fp32"
    assert last[1].name.startswith("flashdml-") and last[0]["prec"] == "tf32"
    names = [p.name for _, p in todo]
    assert names.index("torch.compile(reference)-cuda") > max(i for i, n in enumerate(names) if n == "reference-cuda")
