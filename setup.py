"""Builds flashdml._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  FLASHDML_NO_CUDA=1      build the CPU kernels only
  CUDA_HOME               CUDA toolkit root (bin/nvcc, include/cuda_runtime.h); detected when unset
  TORCH_CUDA_ARCH_LIST    target GPU architectures, 8.0 and newer (older ones are dropped with a message, see
                          ``cuda_arch_list``); unset: the visible GPUs' architectures, or "8.0;9.0" when none is
                          visible
  MAX_JOBS                parallel compile jobs for ninja (default: number of CPUs)

Importing this file builds nothing (the build runs under ``__main__``, as setuptools' build backend runs it): the
toolkit discovery (``find_cuda_home``), the architecture choice (``cuda_arch_list``) and the nvcc flags
(``NVCC_FLAGS``) are importable, e.g. by tests/test_cuda_emulation.py and tests/test_setup_arch.py.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit_root(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home() -> str | None:
    """The real toolkit root. An `nvcc` on PATH may be a wrapper script (`exec /usr/local/cuda-X/bin/nvcc`),
    from which torch would guess a wrong CUDA_HOME, so follow wrappers and symlinks."""
    if _is_toolkit_root(os.environ.get("CUDA_HOME")):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for m in re.finditer(rb"(/[^\s\"']+)/bin/nvcc", head):
                    candidates.append(m.group(1).decode())
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_toolkit_root(c):
            return c
    return None


def pip_cuda_include_dirs() -> list[str]:
    """Headers of the nvidia cu13 pip packages torch depends on (cusparse.h & co. are not in every toolkit)."""
    dirs = []
    for p in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            d = os.path.join(p, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


# nvcc flags of the CUDA kernels. No --use_fast_math, nor the parts of it (-ftz=true, --prec-div=false,
# --prec-sqrt=false): it flushes fp32 denormals to zero and turns expf / logf / division / sqrtf into approximate
# instructions, which the CPU emulation of the kernels (tests/cuda_emulation: g++ with IEEE libm) does not model.
# A kernel that wants a fast intrinsic calls it by name (__expf, ...) so the choice is visible in its source
# (docs/gpu.md, "Precision"). tests/test_setup_arch.py checks this list.
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo", "-Xptxas=-v", "--expt-relaxed-constexpr"]

# The CUDA kernels need sm_80 or newer: the bf16 wmma fragments of tile_gemm.cuh do not exist before Ampere, and
# the CPU and CUDA sources are one extension, so a failed CUDA compile would cost the CPU backend too. Older
# entries are therefore dropped (with a message) and the rest is built.
MIN_CUDA_ARCH = (8, 0)
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100, H100: used when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset
# torch's named architectures (TORCH_CUDA_ARCH_LIST accepts them): the oldest compute capability each stands for
_NAMED_ARCHS = {"kepler": (3, 5), "maxwell": (5, 0), "pascal": (6, 0), "volta": (7, 0), "turing": (7, 5),
                "ampere": (8, 0), "ada": (8, 9), "hopper": (9, 0), "blackwell": (10, 0)}


def _arch_version(entry: str):
    """(major, minor) of a TORCH_CUDA_ARCH_LIST entry ("8.6", "8.6+PTX", "9.0a", "Ampere"), None if unreadable."""
    base = entry.split("+", 1)[0].strip()
    if base.lower() in _NAMED_ARCHS:
        return _NAMED_ARCHS[base.lower()]
    m = re.fullmatch(r"(\d+)\.(\d+)[a-z]?", base)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_arch_list(env_value, torch_cuda):
    """The TORCH_CUDA_ARCH_LIST to build the CUDA kernels for, and a message for the build log (or None).

    ``env_value``: the user's TORCH_CUDA_ARCH_LIST (None or "" when unset); ``torch_cuda``: the ``torch.cuda``
    module (queried for the visible GPUs only when ``env_value`` is unset or "native"). Returns ``(archs,
    message)``: ``archs`` is the value to give TORCH_CUDA_ARCH_LIST — the list without its entries below 8.0, or
    "native" (torch's own choice for the visible GPUs) when they are all 8.0 or newer — or None when no
    architecture is left: then only the CPU kernels are built. Dropped entries (e.g. "7.5", "7.0+PTX", "Volta",
    a visible T4 / V100) are named in ``message``; unreadable entries are kept for torch to judge.
    """
    env_value = (env_value or "").strip()
    if env_value and env_value != "native":
        entries = [e for e in re.split(r"[;\s]+", env_value) if e]
        source = f"TORCH_CUDA_ARCH_LIST={env_value!r}"
    elif torch_cuda.is_available() and torch_cuda.device_count() > 0:
        caps = sorted({tuple(torch_cuda.get_device_capability(i)) for i in range(torch_cuda.device_count())})
        if min(caps) >= MIN_CUDA_ARCH:
            return "native", None
        entries = [f"{major}.{minor}" for major, minor in caps]
        source = "the visible GPUs (" + ", ".join(entries) + ")"
        entries[-1] += "+PTX"  # as torch does for the newest visible GPU
    else:
        return DEFAULT_CUDA_ARCHS, None
    keep, dropped = [], []
    for e in entries:
        v = _arch_version(e)
        (dropped if v is not None and v < MIN_CUDA_ARCH else keep).append(e)
    if not dropped:
        return ";".join(keep), None
    what = f"dropping CUDA architecture(s) {', '.join(dropped)} from {source}: the CUDA kernels need sm_80 or newer"
    if not keep:
        return None, f"flashdml: {what}; none is left, so only the CPU kernels are built"
    return ";".join(keep), f"flashdml: {what}; building for {';'.join(keep)}"


def main() -> None:
    from setuptools import setup

    want_cuda = os.environ.get("FLASHDML_NO_CUDA", "0") not in ("1", "true", "yes")
    cuda_home = find_cuda_home() if want_cuda else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    build_cuda = bool(cuda_home) and torch.version.cuda is not None
    no_arch = False
    if build_cuda:
        archs, message = cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), torch.cuda)
        if message:
            print(message, file=sys.stderr)
        if archs is None:
            build_cuda, no_arch = False, True
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs

    # csrc/aten: device-generic ATen code (the contextual sparse stage), in every build
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/aten/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    native = os.environ.get("FLASHDML_NATIVE", "1") == "1"
    # -fno-trapping-math: GCC will not vectorise the float -> int conversion of fast_exp.h's exp polynomial while it
    # must keep floating-point exceptions exact (its default), so the exp loops of the CPU kernels would run scalar
    # (~4x slower per element). It changes no value: no reassociation, no fast-math.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-march=native" if native else "-mavx2"]

    if build_cuda:
        ext = CUDAExtension(
            "flashdml._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs + pip_cuda_include_dirs(),
            define_macros=[("FLASHDML_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": list(NVCC_FLAGS),
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        if want_cuda and not no_arch:
            reason = "torch has no CUDA" if torch.version.cuda is None else "nvcc / CUDA toolkit not found"
            print(f"flashdml: building the CPU kernels only ({reason})", file=sys.stderr)
        ext = CppExtension(
            "flashdml._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )

    # Name, version, dependencies, license and the rest of the metadata are in pyproject.toml ([project]).
    setup(
        package_dir={"flashdml": "python/flashdml", "flashdml.triton_kernels": "triton_kernels"},
        packages=["flashdml", "flashdml.reference", "flashdml.ops", "flashdml.integrations",
                  "flashdml.triton_kernels"],
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
