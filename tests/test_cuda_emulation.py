"""The CUDA kernels (batch softmax, cross-example softmax / NT-Xent, hinge-pair losses, kNN / hardest negatives,
the contextual loss's neighbour lists, metrics pass, triplet margin loss, the anchor-LSE losses), run on the CPU.

There is no GPU here, so `tests/cuda_emulation/` compiles the real kernel code of csrc/cuda/ with g++ against a
small emulation of the CUDA features it uses (every CUDA thread a std::thread, __syncthreads a barrier, wmma
fragments by their API semantics) and runs the host pipeline of each csrc/cuda/*.cu against a dense float64
reference: ragged shapes, all label kinds and modes, 1 and 132 SMs (so the column splits run), aligned and
misaligned (scalar-load, or for the pair losses host-padded) inputs, and for every backward pass d over several
kDV column chunks (d = 389 / 392) with the count of S tiles each launch computed asserted to be row blocks x tiles
(each tile once, not once per chunk of d), and for fp16 / bf16 the 64-column G·B product of d <= 64 (batch
softmax and xent: d = 64 and the ragged d = 40, besides the smaller d every driver runs). It checks the
kernels' index math, tiling, reductions and formulas; it does not check timing, the hardware fragment layout, or the ATen wrappers (tests/test_cuda_build.py and the
GPU tests cover what they can).
"""
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_include():
    # setup.py builds only when run as __main__: importing it gives its toolkit finder.
    spec = importlib.util.spec_from_file_location("flashdml_setup", os.path.join(ROOT, "setup.py"))
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)
    home = setup_module.find_cuda_home()
    return None if home is None else os.path.join(home, "include")


# One driver per CUDA op family: tests/cuda_emulation/<name>_driver.cpp mirrors csrc/cuda/<name>.cu's host pipeline.
#  batch_softmax: docs/spec.md §2.1 (row / column LSE, symmetric), B == M.
#  xent: cross-example softmax (global partition) and NT-Xent (per-row partition), self / cross / pair mode,
#        B != M, one class (no negatives), all labels distinct (no positives), ragged d (host zero-padding).
#  hinge_pair: TCM (inclusive, diagonal dropped) and margin contrastive (strict, diagonal kept), embeddings on a
#        1/8 grid so that similarities are exact and many pairs tie with the margins; exact int64 counts.
#  selection: kNN (rounds of 32, exclude_diagonal) and hardest negatives (radix select), embeddings on a 1/8 grid
#        with repeated rows: exact ties everywhere, indices compared bit for bit; k = 1 .. all candidates.
#  contextual: the neighbour-list pass (fixed capacity per column split, gathered overflow rerun; 132 and 1 SMs)
#        on a 1/8 grid with repeated rows:
#        N(i), the P / clamp flags and the column order equal docs/spec.md §2.5 step 3's fp32 tests bit for bit.
#  metrics: the metrics pass (per-row top-k in rounds of 32, fine pair and per-class OPIS histograms), self / cross
#        mode, row subsets, classes with one sample, keep 0 .. all candidates, embeddings on a scaled 1/8 grid (exact
#        S, values on bin edges): lists and integer histograms compared exactly. The histograms go through the
#        kernel's block hash tables (4096 slots); test_metrics_block_tables adds other capacities and the atomics.
#  triplet: triplet margin loss over every triplet, self / cross / pair mode, B != M, one class (no negatives), all
#        labels distinct (no positives), ragged d, rows repeated in their class (d_ap = 0); a margin with no hinge
#        within 2e-5 of 0, so the int64 count equals the float64 one exactly; loss, dL/dx^ and dL/dy^ compared.
#  anchor_lse: SupCon, Multi-Similarity and Circle (docs/spec.md §6.1-6.3) against a float64 computation written from
#        their definitions: loss, row LSEs, dx, dy, dtemperature; self / cross / pair mode, B != M, one class, all
#        labels distinct (pml's zero cases), ragged d, 1 and 132 SMs.
DRIVERS = ("batch_softmax", "xent", "hinge_pair", "selection", "contextual", "metrics", "triplet", "anchor_lse")


@pytest.fixture(scope="module")
def build_driver(tmp_path_factory):
    return driver_builder(tmp_path_factory.mktemp("cuda_emulation"))


def driver_builder(out_dir, defines=(), suffix=""):
    """``get(name)`` -> the path of tests/cuda_emulation/<name>_driver.cpp compiled with g++ into ``out_dir``
    (once per name; ``defines`` as -D flags). Skips the test when there are no CUDA headers or no g++."""
    include = _cuda_include()
    if include is None or not os.path.isfile(os.path.join(include, "cuda_fp16.h")):
        pytest.skip("no CUDA toolkit headers (cuda_fp16.h) to emulate the kernels with")
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    built = {}

    def get(name):
        if name not in built:
            exe = str(out_dir / f"{name}_driver{suffix}")
            cmd = ["g++", "-std=c++20", "-O2", "-pthread", *(f"-D{d}" for d in defines), f"-I{include}",
                   f"-I{ROOT}/csrc/cuda", f"-I{ROOT}/csrc/include", f"{ROOT}/tests/cuda_emulation/{name}_driver.cpp",
                   "-o", exe]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            built[name] = exe
        return built[name]

    return get


@pytest.mark.parametrize("driver_name", DRIVERS)
@pytest.mark.parametrize("dtype_index,name", [(0, "fp32"), (1, "fp16"), (2, "bf16")])
def test_cuda_kernels_match_float64_reference(build_driver, driver_name, dtype_index, name):
    driver = build_driver(driver_name)
    out = subprocess.run([driver, str(dtype_index)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{driver_name} {name}: {out.stdout[-3000:]}{out.stderr[-3000:]}"
    assert out.stdout.strip().endswith("0 failures"), out.stdout[-2000:]


_ATOMICS = re.compile(r"^atomics (\w+) .*: pairs (\d+) counts (\d+) table (\d+) per-pair (\d+)$", re.M)


@pytest.mark.parametrize("dtype_index,name", [(0, "fp32"), (1, "fp16"), (2, "bf16")])
def test_metrics_block_tables(build_driver, dtype_index, name):
    """The metrics pass's block hash tables (csrc/cuda/metrics_kernels.cuh, BlockCounts; `metrics_driver <dtype>
    table`): the histograms equal the float64 model's exactly with tables of 0 (one global atomic per count, the
    kernel before the tables), 2, 16 and 4096 slots (the small ones overflow, most counts take the global fallback),
    with NaN rows, OPIS classes, self / cross mode and ragged sizes; and the global histogram atomics the emulation
    counts: on clustered embeddings (similarities concentrated in a few thousand fine bins per block) at most
    pairs / 8 with the table, while the per-pair path makes one per count (more than pairs / 8); on random
    directions (spread over ~10^4 bins per block) the table gains little, but never adds atomics."""
    driver = build_driver("metrics")
    out = subprocess.run([driver, str(dtype_index), "table"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"metrics table {name}: {out.stdout[-3000:]}{out.stderr[-3000:]}"
    assert out.stdout.strip().endswith("0 failures"), out.stdout[-2000:]
    stats = [(m[0], *map(int, m[1:])) for m in _ATOMICS.findall(out.stdout)]
    assert [s[0] for s in stats] == ["clustered", "clustered", "random"], out.stdout[-2000:]
    for what, pairs, counts, table, per_pair in stats:
        assert per_pair == counts >= pairs > 0, (what, pairs, counts, per_pair)
        assert table <= per_pair, (what, table, per_pair)
        if what == "clustered":
            assert 8 * table <= pairs < 8 * per_pair, (what, pairs, table, per_pair)
