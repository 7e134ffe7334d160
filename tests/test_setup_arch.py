"""setup.py's choice of CUDA architectures (``cuda_arch_list``), without a GPU and without building anything.

The CUDA kernels need sm_80+ (bf16 wmma); an older entry in TORCH_CUDA_ARCH_LIST, or an older visible GPU, must be
dropped with a message instead of failing the whole extension (which would lose the CPU backend too).
"""
from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_module():
    # Importing setup.py builds nothing (the build runs under __main__).
    spec = importlib.util.spec_from_file_location("flashdml_setup_arch", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeCuda:
    """Stands in for torch.cuda: the given compute capabilities are the visible GPUs."""

    def __init__(self, *caps):
        self.caps = list(caps)
        self.queried = False

    def is_available(self):
        self.queried = True
        return bool(self.caps)

    def device_count(self):
        return len(self.caps)

    def get_device_capability(self, i):
        return self.caps[i]


@pytest.mark.parametrize("env, want", [
    ("8.0;9.0", "8.0;9.0"),
    ("8.6+PTX", "8.6+PTX"),
    ("8.0 8.6 8.9 9.0a", "8.0;8.6;8.9;9.0a"),
    ("Ampere;Hopper", "Ampere;Hopper"),
])
def test_supported_lists_pass_unchanged(setup_module, env, want):
    cuda = FakeCuda((7, 5))  # a visible old GPU must not matter when the list is given
    assert setup_module.cuda_arch_list(env, cuda) == (want, None)
    assert not cuda.queried


@pytest.mark.parametrize("env, want, dropped", [
    ("7.0;7.5;8.0", "8.0", "7.0, 7.5"),
    ("7.5+PTX;8.6+PTX", "8.6+PTX", "7.5+PTX"),
    ("6.1 Volta 9.0", "9.0", "6.1, Volta"),
])
def test_old_entries_are_dropped_with_a_message(setup_module, env, want, dropped):
    archs, message = setup_module.cuda_arch_list(env, FakeCuda())
    assert archs == want
    assert message is not None and f"dropping CUDA architecture(s) {dropped}" in message
    assert "sm_80 or newer" in message and f"building for {want}" in message


@pytest.mark.parametrize("env", ["7.5", "7.0;7.5+PTX", "Turing"])
def test_only_old_entries_build_the_cpu_kernels(setup_module, env):
    archs, message = setup_module.cuda_arch_list(env, FakeCuda())
    assert archs is None
    assert "only the CPU kernels are built" in message


def test_no_gpu_and_no_list_gives_the_default(setup_module):
    assert setup_module.cuda_arch_list(None, FakeCuda()) == ("8.0;9.0", None)
    assert setup_module.cuda_arch_list("  ", FakeCuda()) == ("8.0;9.0", None)


def test_visible_gpus(setup_module):
    # a visible T4 alone: no CUDA architecture left -> CPU-only build, with the reason
    archs, message = setup_module.cuda_arch_list(None, FakeCuda((7, 5)))
    assert archs is None and "7.5" in message and "the visible GPUs" in message
    assert "only the CPU kernels" in message
    # "native" means the visible GPUs too
    assert setup_module.cuda_arch_list("native", FakeCuda((7, 0)))[0] is None
    # an A10 (8.6) next to a V100 (7.0): build for 8.6 only, with PTX as torch adds for the newest GPU
    archs, message = setup_module.cuda_arch_list(None, FakeCuda((8, 6), (7, 0), (8, 6)))
    assert archs == "8.6+PTX" and "7.0" in message and "building for 8.6+PTX" in message
    # only supported GPUs (an H100, or an A100 with an L4): torch's own choice for them, no message
    assert setup_module.cuda_arch_list("", FakeCuda((9, 0))) == ("native", None)
    assert setup_module.cuda_arch_list("native", FakeCuda((8, 0), (8, 9))) == ("native", None)


def test_main_uses_the_choice(setup_module):
    """main() passes the choice on (guards against the function being defined but not called)."""
    import inspect

    src = inspect.getsource(setup_module.main)
    assert "cuda_arch_list(" in src and 'os.environ["TORCH_CUDA_ARCH_LIST"] = archs' in src


def test_nvcc_flags_keep_ieee_float_math(setup_module):
    """The CUDA kernels build without fast math: --use_fast_math flushes fp32 denormals to zero and makes expf,
    logf, division and sqrtf approximate, none of which the CPU emulation of the kernels (tests/cuda_emulation,
    g++ with IEEE libm) models, so its float64 comparisons would no longer vouch for the GPU build."""
    import inspect

    flags = setup_module.NVCC_FLAGS
    joined = " ".join(flags)
    for bad in ("--use_fast_math", "-use_fast_math", "-ftz=true", "--ftz=true", "--prec-div=false",
                "-prec-div=false", "--prec-sqrt=false", "-prec-sqrt=false"):
        assert bad not in joined, f"{bad} in setup.py's NVCC_FLAGS"
    assert "-Xptxas=-v" in flags and "-O3" in flags  # the list is the real one, not an empty stand-in
    # main() compiles with exactly this list
    src = inspect.getsource(setup_module.main)
    assert '"nvcc": list(NVCC_FLAGS)' in src
