"""Builds flashdml._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  FLASHDML_NO_CUDA=1      build the CPU kernels only
  CUDA_HOME               CUDA toolkit root (bin/nvcc, include/cuda_runtime.h); detected when unset
  TORCH_CUDA_ARCH_LIST    defaults to "8.0;9.0" when unset and no GPU is visible
  MAX_JOBS                parallel compile jobs for ninja (default: number of CPUs)

Importing this file builds nothing (the build runs under ``__main__``, as setuptools' build backend runs it): the
toolkit discovery (``find_cuda_home``) is importable, e.g. by tests/test_cuda_emulation.py.
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


def main() -> None:
    from setuptools import setup

    want_cuda = os.environ.get("FLASHDML_NO_CUDA", "0") not in ("1", "true", "yes")
    cuda_home = find_cuda_home() if want_cuda else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    build_cuda = bool(cuda_home) and torch.version.cuda is not None
    if build_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    # csrc/aten: device-generic ATen code (the contextual sparse stage), in every build
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/aten/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    native = os.environ.get("FLASHDML_NATIVE", "1") == "1"
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-march=native" if native else "-mavx2"]

    if build_cuda:
        ext = CUDAExtension(
            "flashdml._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs + pip_cuda_include_dirs(),
            define_macros=[("FLASHDML_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "-Xptxas=-v",
                         "--expt-relaxed-constexpr"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        if want_cuda:
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
