"""The TF32 opt-in of the CUDA C++ backend's fp32 kernels, checked without a GPU.

* The host's decision: every csrc/cuda/*.cu op reads ``flashdml::fp32_matmul_tf32_opted_in()``
  (csrc/include/flashdml/tf32.h: ATen's fp32 precision of CUDA matmuls) once per call. A small extension
  compiled here from that header must agree with the Triton backend's ``_tiles.tf32_opted_in()`` under every
  way PyTorch offers to set it.
* The tile: ``tests/cuda_emulation/tf32_driver.cpp`` runs the fp32 S tile's two flavours (tile_gemm.cuh) under the
  CPU emulation. The exact flavour equals the fp32 FMA chain bit for bit (what the code computed before the TF32
  flavour existed, so without the opt-in nothing changes); the TF32 flavour equals the sum of the operands rounded
  by ``__float_to_tf32`` (round to nearest, ties away), is within (2u + u² + (d + 2)·2⁻²⁴)·Σ|a b| of float64
  (u = 2⁻¹¹) and differs from the exact tile on generic data by more than fp32 could.
* The ops: the emulation drivers built with ``-DFLASHDML_EMU_TF32=1`` launch every fp32 S-tile kernel in its TF32
  flavour (what the .cu files launch after an opt-in) and check losses, LSEs and gradients against float64 with
  bounds derived from δS = 2u + u² + (d + 2)·2⁻²⁴ (each driver states its own: an LSE of S/τ is within δS/τ, a
  loss within its Lipschitz constant times δS, gradients within 16u/τ_eff relatively, as
  tests/test_triton_tf32.py). The drivers on a 1/8 grid (hinge pair, selection, contextual) hold exact TF32
  values, so their TF32 flavour must reproduce the exact results bit for bit (the index math of the TF32 tile).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from test_cuda_emulation import ROOT, driver_builder


@pytest.fixture(scope="module")
def build_tf32(tmp_path_factory):
    """``get(name, tf32=True)``: the emulation driver, with tf32 built with -DFLASHDML_EMU_TF32=1 (the fp32
    kernels' TF32 flavour)."""
    out_dir = tmp_path_factory.mktemp("cuda_tf32")
    builders = {True: driver_builder(out_dir, defines=("FLASHDML_EMU_TF32=1",), suffix="_tf32"),
                False: driver_builder(out_dir)}
    return lambda name, tf32=True: builders[tf32](name)


# ---- the host's decision ----------------------------------------------------------------------------------------

_PROBE = """
#include "flashdml/tf32.h"
bool cuda_fp32_tf32() { return flashdml::fp32_matmul_tf32_opted_in(); }
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    if shutil.which("ninja") is None:
        pytest.skip("ninja not found (torch.utils.cpp_extension needs it)")
    from torch.utils.cpp_extension import load_inline

    build = tmp_path_factory.mktemp("tf32_probe")
    return load_inline("flashdml_tf32_probe", cpp_sources=[_PROBE], functions=["cuda_fp32_tf32"],
                       extra_include_paths=[os.path.join(ROOT, "csrc", "include")], build_directory=str(build),
                       verbose=False)


def _settings():
    """(name, setter, expected opt-in) for each way of choosing the fp32 matmul precision."""
    matmul = torch.backends.cuda.matmul

    def allow(v):
        return lambda: setattr(matmul, "allow_tf32", v)

    def legacy(v):
        return lambda: torch.set_float32_matmul_precision(v)

    def generic_tf32(matmul_value):
        def set_():
            matmul.fp32_precision = matmul_value
            torch.backends.fp32_precision = "tf32"
        return set_

    return [("default", lambda: None, False), ("allow_tf32=True", allow(True), True),
            ("allow_tf32=False", allow(False), False), ("highest", legacy("highest"), False),
            ("high", legacy("high"), True), ("medium", legacy("medium"), True),
            ("matmul=tf32", lambda: setattr(matmul, "fp32_precision", "tf32"), True),
            ("matmul=ieee", lambda: setattr(matmul, "fp32_precision", "ieee"), False),
            ("generic tf32, matmul none", generic_tf32("none"), True),
            ("generic tf32, matmul ieee", generic_tf32("ieee"), False)]


@pytest.mark.usefixtures("restore_precision_flags")
def test_cpp_decision_equals_triton_rule(probe):
    from flashdml.triton_kernels import _tiles

    seen = []
    for name, set_, want in _settings():
        set_()
        got_cpp, got_py = probe.cuda_fp32_tf32(), _tiles.tf32_opted_in()
        seen.append((name, got_cpp, got_py, want))
        # back to the defaults for the next setting
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "none"
    assert all(c == p == w for _, c, p, w in seen), seen
    assert {w for *_, w in seen} == {True, False}


# ---- the tile ---------------------------------------------------------------------------------------------------

def test_tf32_tile_flavour(build_tf32):
    out = subprocess.run([build_tf32("tf32", tf32=False)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # 7 rounding checks + 4 per tile case x 3 cases: every check ran
    assert out.stdout.strip().endswith("19 checks, 0 failures"), out.stdout[-2000:]


# ---- the ops ------------------------------------------------------------------------------------------------------

# generic data: TF32 bounds; 1/8 grid: TF32 is exact there, results bit for bit as the exact flavour's
TF32_DRIVERS = ("batch_softmax", "xent", "anchor_lse", "triplet", "hinge_pair", "selection", "contextual")


@pytest.mark.parametrize("driver_name", TF32_DRIVERS)
def test_fp32_ops_in_tf32_match_float64(build_tf32, driver_name):
    args = [build_tf32(driver_name), "0"]
    if driver_name == "batch_softmax":
        args += ["short"]  # its reduced shape set (d = 3 and d = 136 over two kDV chunks)
    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{driver_name} tf32: {out.stdout[-3000:]}{out.stderr[-3000:]}"
    assert out.stdout.strip().endswith(" 0 failures"), out.stdout[-2000:]
