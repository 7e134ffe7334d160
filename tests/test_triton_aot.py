"""Ahead-of-time compilation of every Triton kernel for A100 (sm_80), A10 / L4 / RTX (sm_86) and H100 (sm_90), no
GPU needed.

Each spec in ``flashdml.triton_kernels._aot.all_specs()`` (the constexpr / dtype combinations the launchers use)
must compile for every architecture with no register spills, no stack or local memory, at most 255 registers and
shared memory within the architecture's per-block limit. sm_86 stands for the smallest supported target: sm_86 /
sm_89 parts (A10, A40, L4, L40, RTX 30xx / 40xx) allow 99 KiB per block, so a config that fits an A100 or H100 but
not 99 KiB would fail to launch there (the configs are launched as written on every GPU; the largest use 64 KiB).
GEMM kernels must use tensor cores for fp16/bf16: ``mma.sync`` on sm_80 / sm_86 and ``wgmma`` on sm_90. fp32 GEMM
kernels use the exact IEEE dot (``input_precision="ieee"``) by default, which Triton lowers to FMA instructions on every
architecture — asserted too, so a change shows up; their TF32 copies (``_aot.precision_variants``, launched when the
user allows TF32, with the TF32 tiles of their configs: ``_tiles.precision_config``) must use tensor cores like
fp16 / bf16, every ``tl.dot`` on wgmma on sm_90.
The interpreter accepts code the compiler rejects, so this complements tests/test_triton_*.py.
"""
from __future__ import annotations

import pytest
import torch

from flashdml.triton_kernels import _aot

SPECS = _aot.all_specs()
ARCHS = (80, 86, 90)
# Max dynamic shared memory per block (opt-in): A100 163 KiB, sm_86 / sm_89 99 KiB, H100 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}
# Spills and stack are asserted for the configs' tuning targets only: for sm_86, ptxas gives a few kernels 8–16 bytes
# of stack and xent_pos_stats / the fp32 k=64 kNN pass a few spilled bytes (triton 3.8; docs/verification.md §2).
SPILL_CHECKED = (80, 90)


@pytest.fixture(scope="module")
def aot(request):
    """{(spec name, cc): (compiled, resource usage)} for the (spec, architecture) pairs of the collected
    test_compiles_without_spills items, compiled once per module in one batch (so ``-k sm86`` compiles for sm_86
    only)."""
    problem = _aot.toolchain_problem()
    if problem is not None:
        pytest.skip(f"cannot compile Triton kernels ahead of time here: {problem}")
    items = [(it.callspec.params["spec"], it.callspec.params["cc"]) for it in request.session.items
             if getattr(it, "originalname", None) == "test_compiles_without_spills"]
    compiled = _aot.compile_many(items)
    return {(spec.name, cc): (c, _aot.resource_usage(c)) for (spec, cc), c in zip(items, compiled)}


@pytest.mark.parametrize("cc", ARCHS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_compiles_without_spills(spec, cc, aot):
    compiled, usage = aot[(spec.name, cc)]
    info = f"{spec.name} sm_{cc}: {usage}"
    if cc in SPILL_CHECKED:
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, f"register spills: {info}"
        assert usage["stack"] == 0 and usage["local"] == 0, f"stack / local memory in use: {info}"
    assert usage["registers"] <= 255, info
    assert usage["shared_dynamic"] + usage["shared"] <= SMEM_LIMIT[cc], f"shared memory over the limit: {info}"
    if not spec.gemm:
        return
    # fp16 / bf16, and fp32 with the TF32 opt-in (PRECISION="tf32", the specs' "_tf32" copies): tensor cores
    if spec.dtype in ("fp16", "bf16") or spec.constexprs.get("PRECISION") == "tf32":
        if cc >= 90:  # every tl.dot on wgmma: no fallback to sm_80-style mma.sync
            assert _aot.has_wgmma(compiled), f"{spec.name}: no wgmma in the sm_{cc} PTX"
            assert not _aot.has_mma(compiled), f"{spec.name}: some tl.dot fell back to mma.sync on sm_{cc}"
        else:
            assert _aot.has_mma(compiled), f"{spec.name}: no mma.sync in the sm_{cc} PTX"
    else:  # fp32 with input_precision="ieee": exact FMA dot, no tensor cores on either architecture
        assert spec.constexprs.get("PRECISION") == "ieee", spec.name
        assert not _aot.has_wgmma(compiled) and not _aot.has_mma(compiled), spec.name


def test_fp32_specs_come_in_both_precisions():
    """Every fp32 GEMM spec is compiled as launched by default ("ieee") and with the TF32 opt-in ("tf32"), except
    the metrics pass, which stays exact. A TF32 spec may have tiles of its own (BLOCK_M / BLOCK_N / BLOCK_D, warps,
    stages: the config's TF32 overrides, ``_tiles.precision_config``); everything else is its "ieee" spec's."""
    by_name = {s.name: s for s in SPECS}
    fp32 = [s for s in SPECS if s.dtype == "fp32" and s.gemm]
    assert fp32
    own = ("PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_D")
    retiled = 0
    for spec in fp32:
        if spec.name.endswith(_aot.TF32_SUFFIX):
            assert spec.constexprs["PRECISION"] == "tf32", spec.name
            base = by_name[spec.name[:-len(_aot.TF32_SUFFIX)]]
            assert base.constexprs["PRECISION"] == "ieee", spec.name
            assert {k: v for k, v in spec.constexprs.items() if k not in own} == \
                {k: v for k, v in base.constexprs.items() if k not in own}, spec.name
            assert (spec.kernel, spec.signature, spec.aligned) == (base.kernel, base.signature, base.aligned)
            retiled += (spec.constexprs, spec.num_warps, spec.num_stages) != \
                (dict(base.constexprs, PRECISION="tf32"), base.num_warps, base.num_stages)
        elif spec.name.startswith("metrics_"):
            assert spec.name + _aot.TF32_SUFFIX not in by_name
        else:
            assert spec.constexprs["PRECISION"] == "ieee" and spec.name + _aot.TF32_SUFFIX in by_name, spec.name
    assert retiled > 0  # some kernels do have TF32 tiles of their own


def test_tf32_passes_keep_one_block_k():
    """Passes that must see bitwise the same S (a forward and its backward recompute, the kNN rounds, the
    hardest-negatives passes, the contextual passes and their kNN fallback) are the fp32 GEMM specs of one kernel
    module (the contextual loss's with selection's); s_tile's value depends on BLOCK_K, so each such group has one
    BLOCK_K in each precision, whatever tiles TF32 gives it."""
    groups: dict = {}
    for spec in SPECS:
        if spec.dtype != "fp32" or not spec.gemm:
            continue
        module = _aot._jit_function(spec.kernel).fn.__module__.rsplit(".", 1)[1]
        module = "selection" if module == "contextual" else module
        groups.setdefault((module, spec.constexprs["PRECISION"]), set()).add(spec.constexprs["BLOCK_K"])
    assert {m for m, p in groups if p == "tf32"} >= {"selection", "xent", "hinge_pair", "anchor_lse", "triplet"}
    assert all(len(ks) == 1 for ks in groups.values()), groups


def _launch_spec(launch, specs):
    """The spec a recorded launch (``_launch_log.Launch``) compiles as: same kernel, constexprs, argument types,
    warps and stages; None if there is none."""
    names = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
             torch.int64: "*i64", torch.int32: "*i32", torch.uint8: "*u8"}

    def ttype(v):
        if isinstance(v, torch.Tensor):
            return names[v.dtype]
        return "i32" if isinstance(v, int) and not isinstance(v, bool) else "fp32" if isinstance(v, float) else None

    p = launch.params
    for spec in specs:
        if (_aot._jit_function(spec.kernel).fn.__name__ == launch.kernel and spec.num_warps == p["num_warps"]
                and spec.num_stages == p["num_stages"]
                and all(k in p and p[k] == v for k, v in spec.constexprs.items())
                and all(k in p and ttype(p[k]) == t for k, t in spec.signature.items())):
            return spec
    return None


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_fp32_launches_have_specs_in_either_precision(tf32):
    """Every launch of every Triton op on fp32 rows (forward and backward; d in one gradient chunk and in several; a
    ragged batch), recorded without running (``_launch_log``, through benchmarks/gemm_work.py's op drivers), is an
    AOT spec: with the TF32 opt-in the S-tile dots get PRECISION "tf32" and the "_tf32" spec with that config's
    TF32 tiles, by default "ieee" and the plain spec."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import gemm_work

    matmul = torch.backends.cuda.matmul
    saved = (torch.backends.fp32_precision, matmul.fp32_precision)
    torch.backends.fp32_precision = "none"
    matmul.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        for name in gemm_work.OPS:
            for d in (40, 3 * 64 + 5):
                x, y, labels = gemm_work.inputs(name, 53, d, torch.float32)
                fwd, bwd = gemm_work.record(name, x, y, labels)
                precisions = set()
                for launch in fwd + bwd:
                    spec = _launch_spec(launch, SPECS)
                    assert spec is not None, f"{name} d={d}: no AOT spec for {launch.kernel} {launch.params}"
                    if "PRECISION" in spec.constexprs:
                        precisions.add(spec.constexprs["PRECISION"])
                        assert spec.name.endswith(_aot.TF32_SUFFIX) == (spec.constexprs["PRECISION"] == "tf32")
                exact = name == "metrics"
                assert precisions == {"tf32" if tf32 and not exact else "ieee"}, (name, precisions)
    finally:
        torch.backends.fp32_precision, matmul.fp32_precision = saved


# Every integer argument of every kernel also compiled as the constant 1, as Triton's JIT specialises it at run
# time (flashdml.triton_kernels._aot.int_one_variant): one variant per (kernel, constexprs, argument), 330-odd.
# They go through Triton's front end only (AST -> Triton IR plus its passes, upto="ttir"), for one architecture:
# that is where a constant argument is folded in and where code such as `B.to(tl.int64)` fails, it is the same
# for every target, and it costs about a twentieth of a full compile (the full compiles of all variants took
# over 10 minutes on the 2-core development machines). Compile success only: a constant 1 folds code away;
# the resource checks above cover the general variant.
INT_ONE = _aot.int_one_specs(SPECS)
INT_ONE_ARCH = 90


@pytest.fixture(scope="module")
def aot_int_one():
    """{variant name: compiled kernel or CompileFailure} for every int-one variant on INT_ONE_ARCH."""
    problem = _aot.toolchain_problem()
    if problem is not None:
        pytest.skip(f"cannot compile Triton kernels ahead of time here: {problem}")
    compiled = _aot.compile_many([(spec, INT_ONE_ARCH) for spec in INT_ONE], errors="return", upto="ttir")
    return {spec.name: c for spec, c in zip(INT_ONE, compiled)}


@pytest.mark.parametrize("spec", INT_ONE, ids=lambda s: s.name)
def test_compiles_with_integer_argument_one(spec, aot_int_one):
    result = aot_int_one[spec.name]
    assert not isinstance(result, _aot.CompileFailure), f"{spec.name} sm_{INT_ONE_ARCH}: {result.error}"
    assert "tt.func" in result.ttir, spec.name


def test_int_one_variants_follow_triton():
    """The variants assume what Triton 3.8's JIT does with an integer argument: the value 1 becomes a constexpr,
    other values stay runtime i32 (16-divisible ones with a hint). If a Triton upgrade changes that, this fails
    and the variants must be revisited. Every integer argument of every kernel gets a variant."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    def kind(v):
        return native_specialize_impl(CUDABackend, v, False, True, True)

    assert kind(1) == ("constexpr", 1)
    assert kind(2) == ("i32", "") and kind(16) == ("i32", "D") and kind(0) == ("i32", "D")
    # do_not_specialize turns the constant off (not used by the kernels: they are written to compile either way)
    assert native_specialize_impl(CUDABackend, 1, False, False, True)[0] == "i32"

    wanted = {(_aot._jit_function(s.kernel).fn, a) for s in SPECS for a, t in s.signature.items()
              if t in ("i32", "i64")}
    got = {(_aot._jit_function(v.kernel).fn, v.name.rsplit("@", 1)[1][:-2]) for v in INT_ONE}
    assert wanted == got and len(wanted) > 50
    for v in INT_ONE:
        arg = v.name.rsplit("@", 1)[1][:-2]
        assert v.constexprs[arg] == 1 and arg not in v.signature and arg not in v.aligned


def test_every_kernel_has_a_spec():
    """Each @triton.jit kernel defined in a kernel module is covered by that module's AOT_SPECS."""
    import importlib
    import pkgutil

    import flashdml.triton_kernels as pkg

    covered = {_aot._jit_function(s.kernel).fn for s in SPECS}
    missing = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if callable(fn) and getattr(fn, "__module__", None) == module.__name__ and hasattr(obj, "arg_names"):
                # shared modules ("_tiles", "_topk") mostly hold inlined jit helpers; the kernels they hold for
                # several modules (named *_kernel) are compiled through the specs of a module that launches them
                if info.name.startswith("_") and not name.endswith("_kernel"):
                    continue
                if fn not in covered:
                    missing.append(f"{module.__name__}.{name}")
    assert not missing, f"kernels without AOT specs: {missing}"


def _triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64"}[
            value.dtype]
    if isinstance(value, bool):
        raise TypeError("bool runtime argument")
    if isinstance(value, int):
        return "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(type(value))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_specs_cover_batch_softmax_launches(dtype, labels, symmetric, monkeypatch):
    """Every launch the batch-softmax launchers make matches an AOT spec (types, constexprs, warps, stages)."""
    from flashdml.triton_kernels import batch_softmax as bs

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel, args, kwargs))
            return launch

    monkeypatch.setattr(bs, "wrap_triton", Recorder)
    B, d = 40, 48
    x = torch.zeros(B, d, dtype=dtype)
    lab = torch.zeros(B, dtype=torch.int64) if labels else None
    t = torch.tensor(0.1)
    loss, row_lse, col_lse = bs.fwd_impl(x, x.clone(), lab, t, symmetric)
    bs.bwd_impl(torch.tensor(1.0), x, x.clone(), lab, t, symmetric, row_lse, col_lse)
    assert launches
    for kernel, args, kwargs in launches:
        fn = _aot._jit_function(kernel)
        runtime = dict(zip(fn.arg_names, args))
        constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        signature = {k: _triton_type(v) for k, v in runtime.items()}
        matches = [s for s in SPECS if _aot._jit_function(s.kernel) is fn and s.constexprs == constexprs
                   and s.signature == signature and s.num_warps == kwargs["num_warps"]
                   and s.num_stages == kwargs["num_stages"]]
        assert matches, f"no AOT spec for {fn.__name__} with {signature} {kwargs}"
