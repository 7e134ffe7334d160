"""Ahead-of-time compilation of the Triton kernels and their resource checks (no GPU needed).

Every kernel module of this package declares a module-level ``AOT_SPECS`` list of :class:`AOTSpec` — one per
constexpr / dtype combination its launchers can produce. :func:`all_specs` collects them from every module,
:func:`compile_for` compiles one for a compute capability (80 = A100, 86 = A10 / L4 / RTX, 90 = H100) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, and :func:`resource_usage` reads registers,
stack / local memory (``cuobjdump --dump-resource-usage`` on the cubin) and spill bytes (``ptxas -v`` on the same
PTX with the flags Triton uses). Under ``TRITON_INTERPRET=1`` (the test suite without a GPU) Triton's own library
functions are interpreter objects and nothing can be compiled in-process, so :func:`compile_many` / :func:`compile_for`
then compile in subprocesses started without that variable. :func:`int_one_specs` adds the variants Triton's JIT
builds at run time when an integer argument is 1 (it becomes a constant); they are checked through Triton's front
end only (``compile_many(..., upto="ttir")``).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pickle
import pkgutil
import re
import subprocess
import sys
import tempfile
import types
from typing import Any, Optional

_ALIGN = [["tt.divisibility", 16]]


@dataclasses.dataclass(frozen=True)
class AOTSpec:
    """One compile configuration of a kernel.

    ``signature``: Triton type string for every runtime argument (``"*fp16"``, ``"i32"``, ``"fp32"``);
    ``constexprs``: value of every ``tl.constexpr`` argument. ``aligned``: arguments given the 16-divisibility
    hint the JIT gives aligned pointers and multiples of 16 (``None``: every pointer and integer argument, the
    common production case). ``gemm``: the kernel's main loop is a ``tl.dot`` (checked for wgmma on sm_90).
    """

    name: str
    kernel: Any
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    dtype: str = "fp32"
    gemm: bool = False
    aligned: Optional[tuple] = None

    def __repr__(self) -> str:  # short ids in pytest output
        return self.name


# Triton pointer / scalar type names of the torch dtypes the kernels take (for AOTSpec signatures).
TRITON_TYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def torch_dtype_names() -> dict:
    """{torch dtype: Triton type name} for every dtype the kernels are compiled for."""
    import torch

    return {getattr(torch, k): v for k, v in TRITON_TYPE_NAMES.items()}


def with_alignments(spec: AOTSpec, always: tuple, batch: tuple) -> list:
    """The spec twice: with the 16-divisibility hints of an aligned batch (every pointer, ``always`` and ``batch``
    arguments) and of a ragged one (``batch`` without the hint, name suffix ``_unaligned``)."""
    ptrs = tuple(k for k, v in spec.signature.items() if v.startswith("*"))
    return [dataclasses.replace(spec, aligned=ptrs + always + batch),
            dataclasses.replace(spec, name=spec.name + "_unaligned", aligned=ptrs + always)]


def gemm_specs(name: str, kernel, signature: dict, cfg: dict, dtype: str, constexprs: dict,
               always: tuple = ("D", "cols_per_split"), batch: tuple = ("B", "M")) -> list:
    """with_alignments of a ``tl.dot`` kernel launched with the tile config ``cfg`` (its BLOCK_M / BLOCK_N /
    BLOCK_K / BLOCK_D, num_warps, num_stages) plus the other ``constexprs``; ``dtype``: the Triton type name."""
    consts = dict(constexprs)
    consts.update({k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D") if k in cfg})
    spec = AOTSpec(name, kernel, signature, consts, cfg["num_warps"], cfg["num_stages"], dtype=dtype, gemm=True)
    return with_alignments(spec, always, batch)


INT_ONE_SEP = "@"  # int_one_variant names: "<spec name>@<argument>=1"


def int_one_variant(spec: AOTSpec, arg: str) -> AOTSpec:
    """``spec`` with the integer argument ``arg`` turned into the compile-time constant 1.

    At run time Triton's JIT does exactly this to every integer argument whose value is 1 (Triton 3.8:
    ``specialize_impl`` returns ``("constexpr", 1)`` for it, while other integers only get a divisibility-by-16
    hint), so a launch with B = 1, one split, ... compiles this variant. Code that treats the argument as a
    tensor (``B.to(tl.int64)``) fails to compile there, and neither the interpreter (which passes every scalar
    as a tensor) nor the plain specs (which type every integer as ``i32``) would notice.
    """
    if spec.signature.get(arg) not in ("i32", "i64"):
        raise ValueError(f"{spec.name}: {arg!r} is not an integer runtime argument")
    signature = {k: v for k, v in spec.signature.items() if k != arg}
    constexprs = dict(spec.constexprs)
    constexprs[arg] = 1
    aligned = spec.aligned
    if aligned is None:
        aligned = tuple(n for n, t in spec.signature.items() if t.startswith("*") or t in ("i32", "i64"))
    aligned = tuple(n for n in aligned if n != arg)
    return dataclasses.replace(spec, name=f"{spec.name}{INT_ONE_SEP}{arg}=1", signature=signature,
                               constexprs=constexprs, aligned=aligned)


def int_one_specs(specs: Optional[list] = None) -> list[AOTSpec]:
    """The :func:`int_one_variant` of every integer argument, for one spec per distinct (kernel, constexprs).

    Specs that differ only in dtype or alignment hints run the same code paths (no kernel branches on a dtype),
    so one representative of each group keeps the number of extra compiles down; every constexpr combination
    is kept, since a constexpr can switch code on or off.
    """
    specs = all_specs() if specs is None else specs
    chosen: dict = {}
    for spec in specs:
        # A "tf32" copy of precision_variants with the "ieee" spec's tiles differs from it only in the
        # input_precision attribute of the dots (no kernel branches on PRECISION; split_tf32_dot branches on GPREC,
        # which the copies keep), so it shares the "ieee" spec's group; one with its own TF32 tiles
        # (_tiles.precision_config) is a group of its own.
        consts = dict(spec.constexprs)
        if spec.name.endswith(TF32_SUFFIX) and consts.get("PRECISION") == "tf32":
            consts["PRECISION"] = "ieee"
        key = (_jit_function(spec.kernel).fn, tuple(sorted((k, repr(v)) for k, v in consts.items())))
        chosen.setdefault(key, spec)
    return [int_one_variant(spec, arg) for spec in chosen.values()
            for arg, t in spec.signature.items() if t in ("i32", "i64")]


_JIT_CACHE: dict = {}


def _jit_function(kernel):
    """The compilable ``JITFunction`` behind ``kernel`` (which is an InterpretedFunction under TRITON_INTERPRET=1)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    fn = getattr(kernel, "fn", None)
    if fn is None:
        raise TypeError(f"not a triton kernel: {kernel!r}")
    if fn not in _JIT_CACHE:
        _JIT_CACHE[fn] = JITFunction(fn)
    return _JIT_CACHE[fn]


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 was active at import: then triton's own @jit library functions (tl.sum, tl.max,
    ...) are interpreter objects and cannot be compiled in this process."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


@dataclasses.dataclass
class CompiledArtifacts:
    """What a compile in a subprocess sends back: the same ``asm`` / ``metadata.shared`` a CompiledKernel has."""

    asm: dict
    metadata: Any


def compile_for(spec: AOTSpec, cc: int):
    """Compile ``spec`` for compute capability ``cc`` (80, 90, ...).

    Returns Triton's CompiledKernel, or under the interpreter a :class:`CompiledArtifacts` from a clean subprocess
    (the spec must then be one of :func:`all_specs`).
    """
    if interpreting():
        return compile_many([(spec, cc)])[0]
    return _compile_here(spec, cc)


@dataclasses.dataclass
class CompileFailure:
    """What :func:`compile_many` returns with ``errors="return"`` for a spec that does not compile."""

    name: str
    cc: int
    error: str


def _compile_or_failure(spec: AOTSpec, cc: int, upto: str = "cubin"):
    try:
        return _compile_here(spec, cc, upto)
    except Exception as exc:  # noqa: BLE001 -- any compiler error is the result
        return CompileFailure(spec.name, cc, f"{type(exc).__name__}: {exc}"[-4000:])


def compile_many(items, jobs: Optional[int] = None, errors: str = "raise", upto: str = "cubin") -> list:
    """Compile ``[(spec, cc), ...]``; under the interpreter in ``jobs`` parallel subprocesses without
    TRITON_INTERPRET (specs are looked up there by name in :func:`all_specs` and :func:`int_one_specs`).
    ``errors="return"``: a spec that fails to compile gives a :class:`CompileFailure` in its place instead of
    raising, so a caller can report every failure. ``upto="ttir"``: run only Triton's front end (see
    :func:`_compile_here`) and return :class:`FrontEnd` results."""
    items = list(items)
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
    if upto not in ("cubin", "ttir"):
        raise ValueError(f"upto must be 'cubin' or 'ttir', got {upto!r}")
    if not interpreting():
        results = [_compile_or_failure(spec, cc, upto) for spec, cc in items]
    else:
        results = _compile_in_subprocesses(items, jobs, upto)
    failed = [r for r in results if isinstance(r, CompileFailure)]
    if failed and errors == "raise":
        raise RuntimeError("AOT compile failed:\n" + "\n".join(f"{f.name} sm_{f.cc}: {f.error}" for f in failed))
    return results


def _compile_in_subprocesses(items: list, jobs: Optional[int], upto: str) -> list:
    jobs = max(1, min(jobs or min(2, os.cpu_count() or 1), len(items)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    chunks = [items[i::jobs] for i in range(jobs)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, chunk in enumerate(chunks):
            out = os.path.join(tmp, f"out{i}.pkl")
            request = json.dumps({"upto": upto, "items": [[spec.name, cc] for spec, cc in chunk]})
            proc = subprocess.Popen([sys.executable, "-m", __name__, out], env=env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            proc.stdin.write(request)
            proc.stdin.close()
            procs.append((proc, out))
        for proc, out in procs:
            log = proc.stdout.read()
            if proc.wait() != 0:
                raise RuntimeError(f"AOT compile subprocess failed:\n{log[-20000:]}")
            with open(out, "rb") as f:
                results.update(pickle.load(f))
    return [results[(spec.name, cc)] for spec, cc in items]


@dataclasses.dataclass
class FrontEnd:
    """What a front-end-only compile (``upto="ttir"``) returns: the kernel's Triton IR after the TTIR passes."""

    ttir: str


def _compile_here(spec: AOTSpec, cc: int, upto: str = "cubin"):
    """``triton.compile`` of ``spec`` for ``cc``; ``upto="ttir"`` stops after Triton's front end (the Python AST to
    Triton IR code generation, where constexpr arguments are folded in and a misuse such as ``.to`` on a constant
    fails, plus the target-independent TTIR passes): about a twentieth of the time of a full compile."""
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn = _jit_function(spec.kernel)
    signature = {}
    for name in fn.arg_names:
        if name in spec.constexprs:
            signature[name] = "constexpr"
        elif name in spec.signature:
            signature[name] = spec.signature[name]
        else:
            raise ValueError(f"{spec.name}: argument {name!r} has neither a type nor a constexpr value")
    extra = set(spec.signature) | set(spec.constexprs)
    extra -= set(fn.arg_names)
    if extra:
        raise ValueError(f"{spec.name}: unknown arguments {sorted(extra)}")
    aligned = spec.aligned
    if aligned is None:
        aligned = tuple(n for n, t in signature.items() if t.startswith("*") or t in ("i32", "i64"))
    attrs = {(fn.arg_names.index(n),): _ALIGN for n in aligned}
    src = ASTSource(fn, signature, constexprs=dict(spec.constexprs), attrs=attrs)
    target = GPUTarget("cuda", cc, 32)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if upto == "cubin":
        return triton.compile(src, target=target, options=options)
    backend = make_backend(target)
    opts = backend.parse_options(options)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context)
    stages: dict = {}
    backend.add_stages(stages, opts, src.language)
    module = stages["ttir"](module, {})
    return FrontEnd(ttir=str(module))


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found at {path}")
    return path


def toolchain_problem() -> Optional[str]:
    """None when ptxas and cuobjdump are present and runnable, else the reason (tests skip with it)."""
    try:
        for tool in ("ptxas", "cuobjdump"):
            subprocess.run([_tool(tool), "--version"], check=True, capture_output=True, timeout=60)
    except Exception as exc:  # noqa: BLE001
        return f"triton's CUDA toolchain is unusable: {type(exc).__name__}: {exc}"
    return None


def _ptx_arch(ptx: str) -> str:
    m = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M)
    if not m:
        raise ValueError("no .target in PTX")
    return m.group(1)


def resource_usage(compiled) -> dict:
    """Registers, spills, stack, local and shared memory of a compiled kernel.

    Keys: ``registers``, ``stack`` and ``local`` (bytes per thread, from cuobjdump on the cubin Triton built),
    ``shared`` (static bytes from cuobjdump; ``shared_dynamic`` from Triton's metadata), ``spill_stores`` /
    ``spill_loads`` (bytes, from ``ptxas -v`` rerun on the same PTX with Triton's flags), ``arch``.
    """
    cubin = compiled.asm["cubin"]
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        dump = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin_path], check=True,
                              capture_output=True, text=True).stdout
        ptx_path = os.path.join(tmp, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        arch = _ptx_arch(ptx)
        log = subprocess.run([_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                              ptx_path, "-o", os.path.join(tmp, "k.o")], check=True, capture_output=True,
                             text=True)
        log = log.stdout + log.stderr
    usage = {"arch": arch}
    for key, field in (("registers", "REG"), ("stack", "STACK"), ("shared", "SHARED"), ("local", "LOCAL")):
        m = re.search(rf"\b{field}:(\d+)", dump)
        if not m:
            raise ValueError(f"cannot parse {field} from cuobjdump output:\n{dump}")
        usage[key] = int(m.group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not m:
        raise ValueError(f"cannot parse spills from ptxas -v output:\n{log}")
    usage["spill_stores"], usage["spill_loads"] = int(m.group(1)), int(m.group(2))
    m = re.search(r"Used (\d+) registers", log)
    usage["registers_ptxas"] = int(m.group(1)) if m else None
    usage["shared_dynamic"] = int(getattr(compiled.metadata, "shared", 0) or 0)
    return usage


def has_wgmma(compiled) -> bool:
    return "wgmma.mma_async" in compiled.asm["ptx"]


def has_mma(compiled) -> bool:
    """Tensor-core mma.sync (sm_80 style) in the PTX."""
    return re.search(r"\bmma\.sync\.aligned", compiled.asm["ptx"]) is not None


# Kernel modules whose fp32 S tiles stay exact ("ieee") even when the user allows TF32 (their launchers pass
# exact=True to _tiles.precision): the metrics pass, whose re-ranking bound assumes fp32 products.
EXACT_FP32_MODULES = ("metrics",)
TF32_SUFFIX = "_tf32"


def spec_precisions(tf32: bool = False) -> list[tuple]:
    """``(torch dtype, Triton type name, PRECISION)`` for a kernel module's ``_specs(tf32)`` loop: every dtype with the
    precision its launches use by default (fp16 / bf16 "tf32", fp32 "ieee"); ``tf32=True``: fp32 only, with
    "tf32" (the launches under the user's TF32 opt-in). The module looks its tile configs up with
    ``_tiles.precision_config(table[dtype], dtype, prec)``, the call its launchers make, so the specs have the
    tiles that are launched whatever the flags are at import."""
    import torch

    if tf32:
        return [(torch.float32, TRITON_TYPE_NAMES["float32"], "tf32")]
    return [(d, t, "ieee" if d == torch.float32 else "tf32") for d, t in torch_dtype_names().items()]


def precision_variants(specs: list, tf32_specs: Optional[list] = None) -> list[AOTSpec]:
    """``specs`` with each fp32 spec that has a ``PRECISION`` constexpr in both precisions its launcher can use.

    fp32 launches pass ``PRECISION=_tiles.precision(torch.float32)``, which is "ieee" by default and "tf32" when
    the user opted into TF32 at launch time, with the tile config ``_tiles.precision_config`` gives for it. A
    module's ``AOT_SPECS`` hold the "ieee" specs, its ``AOT_SPECS_TF32`` the same specs built for "tf32" (fp32
    only, same names, the TF32 tile configs); here each fp32 spec of ``specs`` is kept and followed by its TF32
    twin from ``tf32_specs``, named ``<name>_tf32``. ``tf32_specs=None``: no TF32 copies (a module whose fp32
    launches stay exact). Other constexprs (e.g. the contextual gradient's ``GPREC``) are the module's.
    """
    twins = {s.name: s for s in tf32_specs or []}
    out = []
    for spec in specs:
        if spec.dtype != "fp32" or spec.constexprs.get("PRECISION") not in ("ieee", "tf32"):
            out.append(spec)
            continue
        out.append(dataclasses.replace(spec, constexprs=dict(spec.constexprs, PRECISION="ieee")))
        if tf32_specs is None:
            continue
        twin = twins.get(spec.name)
        if twin is None or twin.constexprs.get("PRECISION") != "tf32":
            raise ValueError(f"{spec.name}: no TF32 spec of that name with PRECISION='tf32' in AOT_SPECS_TF32")
        out.append(dataclasses.replace(twin, name=spec.name + TF32_SUFFIX))
    return out


def all_specs() -> list[AOTSpec]:
    """AOT_SPECS of every kernel module in this package (modules whose name starts with "_" are skipped), with the
    fp32 TF32 variants of :func:`precision_variants` (from each module's AOT_SPECS_TF32)."""
    specs: list[AOTSpec] = []
    package = __name__.rsplit(".", 1)[0]
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        tf32 = None if info.name in EXACT_FP32_MODULES else getattr(module, "AOT_SPECS_TF32", [])
        specs.extend(precision_variants(getattr(module, "AOT_SPECS", []), tf32))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate AOT spec names: {duplicates}")
    return specs


def _main(out_path: str) -> None:
    """Subprocess entry: read {"upto": ..., "items": [[spec name, cc], ...]} on stdin, pickle {(name, cc):
    CompiledArtifacts, FrontEnd or CompileFailure} to out_path."""
    request = json.loads(sys.stdin.read())
    upto = request["upto"]
    specs = all_specs()
    by_name = {s.name: s for s in specs + int_one_specs(specs)}
    results = {}
    for name, cc in request["items"]:
        compiled = _compile_or_failure(by_name[name], int(cc), upto)
        if isinstance(compiled, (CompileFailure, FrontEnd)):
            results[(name, int(cc))] = compiled
            continue
        meta = types.SimpleNamespace(shared=getattr(compiled.metadata, "shared", 0), name=compiled.metadata.name)
        results[(name, int(cc))] = CompiledArtifacts(
            asm={"ptx": compiled.asm["ptx"], "cubin": compiled.asm["cubin"]}, metadata=meta)
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    # Run the package's copy of this module, so the pickled classes are importable by the parent.
    importlib.import_module(__spec__.name)._main(sys.argv[1])
