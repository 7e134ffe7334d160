"""The CUDA C++ backend (csrc/cuda): what can be checked without a GPU, and what needs one.

Without a GPU: the kernels compiled into ``flashdml/_C*.so`` are inspected with ``cuobjdump``: every kernel
exists for sm_80 and sm_90, uses no local memory or stack (no register spills), at most 255 registers and only
static shared memory below 48 KiB, and the fp16 / bf16 tile kernels run on tensor cores (HMMA in the SASS).
With a GPU (skipped here, "no CUDA device"): the batch softmax ops against a dense float64 torch computation, on
ragged shapes, every dtype, with and without labels, symmetric or not, on normalised rows and on raw rows with
normalize=True; bitwise determinism; no unwritten outputs. Every CUDA op with a normalize argument: normalize=True on
raw rows against normalize=False on the rows flashdml._math.normalized_rows gives (the same in-op normalisation), the
gradients mapped back with normalized_rows_backward; the same check runs on the CPU ops here (their own in-kernel
normalisation), so the test's expectations are exercised without a GPU.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from functools import lru_cache
from typing import Dict, Optional

import pytest
import torch

ARCHS = ("sm_80", "sm_90")
# Kernels of csrc/cuda/batch_softmax.cu (substrings of the mangled names); templated ones for every dtype.
DTYPES_MANGLED = ("If", "I6__half", "I13__nv_bfloat16")
BATCH_SOFTMAX_TEMPLATED = ("bs_lse_kernel", "bs_grad_kernel", "reduce_splits_kernel")
BATCH_SOFTMAX_PLAIN = ("finalize_lse_kernel", "scaled_sum_kernel")
# csrc/cuda/xent.cu (cross-example softmax / NT-Xent) and hinge_pair.cu (TCM / margin contrastive); the shared
# pair_grad_kernel<T, Op, kOutY, kExact, kChunked> (pair_tiles.cuh) must exist per dtype for each op's weight functor.
XENT_TEMPLATED = ("xe_lse_kernel", "xe_pos_kernel", "pair_reduce_kernel")
XENT_PLAIN = ("xe_count_kernel", "xe_row_lse_kernel", "xe_scalars_kernel", "xe_rows_kernel", "xe_final_kernel",
              "xe_bwd_prep_kernel", "xe_dtau_kernel")
HINGE_TEMPLATED = ("hp_stats_kernel",)
HINGE_PLAIN = ("hp_final_kernel", "hp_bwd_prep_kernel")
# csrc/cuda/selection.cu (kNN, hardest negatives)
SELECTION_TEMPLATED = ("knn_partial_kernel", "hn_pass_kernel")
SELECTION_PLAIN = ("knn_merge_kernel", "hn_select_kernel")
# csrc/cuda/contextual.cu (the neighbour-list pass; the rest of the op reuses the kernels above and ATen)
CONTEXTUAL_TEMPLATED = ("ctx_list_kernel",)
# csrc/cuda/metrics.cu (the metrics pass: top-k rounds and histograms; the merge is selection's knn_merge_kernel)
METRICS_TEMPLATED = ("metrics_pass_kernel",)
METRICS_PLAIN = ("metrics_scatter_kernel",)
# csrc/cuda/triplet.cu (triplet margin loss; its d_an gradient is pair_grad_kernel with TripletOp)
TRIPLET_TEMPLATED = ("tri_stats_kernel", "tri_pos_dist_kernel", "tri_pos_grad_kernel")
# csrc/cuda/anchor_lse.cu (SupCon, Multi-Similarity, Circle): the tile kernel per dtype and kind, the row / reducer
# kernels (templates on a dummy parameter), and pair_grad_kernel with AnchorOp<kind> for each of the three kinds
ANCHOR_LSE_TEMPLATED = ("al_fwd_kernel",)
ANCHOR_LSE_PLAIN = ("al_rows_kernel", "al_final_kernel", "al_bwd_prep_kernel", "al_dtemp_kernel")
PAIR_GRAD_OPS = ("XentOp", "HingeOp", "TripletOp", "AnchorOpILi0EE", "AnchorOpILi1EE", "AnchorOpILi2EE")
TEMPLATED = (BATCH_SOFTMAX_TEMPLATED + XENT_TEMPLATED + HINGE_TEMPLATED + SELECTION_TEMPLATED + CONTEXTUAL_TEMPLATED
             + METRICS_TEMPLATED + TRIPLET_TEMPLATED + ANCHOR_LSE_TEMPLATED)
PLAIN = BATCH_SOFTMAX_PLAIN + XENT_PLAIN + HINGE_PLAIN + SELECTION_PLAIN + METRICS_PLAIN + ANCHOR_LSE_PLAIN
# their fp16 / bf16 versions must use HMMA; fp32: the exact version (template flag kTF32 = false) must not, the
# TF32 version (kTF32 = true, launched after the user's TF32 opt-in; docs/gpu.md) must. The flag is each kernel's
# last template argument, so it mangles to Lb0E / Lb1E just before the closing EEEv.
TENSOR_CORE_KERNELS = ("bs_lse_kernel", "bs_grad_kernel", "xe_lse_kernel", "xe_pos_kernel", "hp_stats_kernel",
                       "pair_grad_kernel", "knn_partial_kernel", "hn_pass_kernel", "ctx_list_kernel",
                       "metrics_pass_kernel", "tri_stats_kernel", "al_fwd_kernel")
EXACT_ONLY_KERNELS = ("metrics_pass_kernel",)  # no TF32 flavour: its error bound assumes fp32 products
# kTF32 of an S-tile kernel: its last template argument, or the one before the G·B width kW of the gradient kernels
TF32_FLAG = re.compile(r"Lb([01])E(?:Li\d+E)?EEv")
# (kChunked, kTF32, kW) of bs_grad_kernel / pair_grad_kernel
CHUNKED_TF32 = re.compile(r"Lb([01])ELb([01])ELi(\d+)EEEv")


def _grad_flavours(dt: str) -> list:
    """(kChunked, kTF32, kW) of the gradient kernels per dtype: one kDV chunk, the chunk loop and, for fp16 / bf16,
    the 64-column one-chunk product of d <= 64 (gb_plan); fp32 (kDV = 64) in both TF32 flavours."""
    if dt == "If":
        return [("0", "0", "64"), ("1", "0", "64"), ("0", "1", "64"), ("1", "1", "64")]
    return [("0", "0", "64"), ("0", "0", "128"), ("1", "0", "128")]


def _extension_so() -> Optional[str]:
    try:
        import flashdml._C as C
    except Exception:  # noqa: BLE001 - any import failure means "not built"
        return None
    return getattr(C, "__file__", None)


def _has_cuda_kernels() -> bool:
    if _extension_so() is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("flashdml::batch_softmax_fwd", "CUDA"))
    except Exception:  # noqa: BLE001
        return False


def _find_cuobjdump() -> Optional[str]:
    candidates = [shutil.which("cuobjdump")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", "cuobjdump"))
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/cuobjdump"), reverse=True)
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except Exception:  # noqa: BLE001
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _build_skip_reason() -> Optional[str]:
    if _extension_so() is None:
        return "flashdml._C is not built"
    if not _has_cuda_kernels():
        return "flashdml._C was built without CUDA kernels (CPU-only build: no nvcc / torch without CUDA / FLASHDML_NO_CUDA)"
    if _find_cuobjdump() is None:
        return "cuobjdump not found (CUDA toolkit bin/ or triton/backends/nvidia/bin)"
    return None


@lru_cache(maxsize=1)
def _resource_usage() -> Dict[str, Dict[str, Dict[str, int]]]:
    """{arch: {mangled kernel name: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}}} for the flashdml kernels."""
    out = subprocess.run([_find_cuobjdump(), "--dump-resource-usage", _extension_so()], capture_output=True,
                         text=True, check=True).stdout
    usage: Dict[str, Dict[str, Dict[str, int]]] = {}
    arch = None
    name = None
    for line in out.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            usage.setdefault(arch, {})
            continue
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            name = m.group(1)
            continue
        if name is not None and arch is not None and "REG:" in line:
            if "flashdml" in name:
                usage[arch][name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            name = None
    return usage


@lru_cache(maxsize=1)
def _sass_by_function() -> Dict[str, Dict[str, str]]:
    """{arch: {mangled kernel name: SASS text}} for the flashdml kernels."""
    out = subprocess.run([_find_cuobjdump(), "--dump-sass", _extension_so()], capture_output=True, text=True,
                         check=True).stdout
    sass: Dict[str, Dict[str, str]] = {}
    arch = None
    name = None
    for line in out.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch, name = m.group(1), None
            sass.setdefault(arch, {})
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m and arch is not None:
            name = m.group(1)
            sass[arch][name] = ""
            continue
        if name is not None and "flashdml" in name:
            sass[arch][name] += line + "\n"
    return {a: {k: v for k, v in fns.items() if "flashdml" in k} for a, fns in sass.items()}


needs_cuda_build = pytest.mark.skipif(_build_skip_reason() is not None, reason=str(_build_skip_reason()))


@needs_cuda_build
def test_every_kernel_is_built_for_sm80_and_sm90():
    usage = _resource_usage()
    for arch in ARCHS:
        assert arch in usage, f"no {arch} code in {_extension_so()} (TORCH_CUDA_ARCH_LIST must include 8.0 and 9.0)"
        names = list(usage[arch])
        for base in TEMPLATED:
            for dt in DTYPES_MANGLED:
                assert any(base + dt in n for n in names), f"{arch}: kernel {base}<{dt}> missing"
        for base in PLAIN:
            assert any(base in n for n in names), f"{arch}: kernel {base} missing"
        for op in PAIR_GRAD_OPS:
            for dt in DTYPES_MANGLED:
                hits = [n for n in names if "pair_grad_kernel" + dt in n and op in n]
                # dx and dy, each as kChunked = false (d <= kDV) and true (the d-chunk loop inside the block),
                # fp32 each also as kTF32 = true (the TF32 opt-in), fp16 / bf16 also with the 64-column product;
                # (kChunked, kTF32, kW) mangle before the closing EEEv
                flavours = sorted(CHUNKED_TF32.search(n).groups() for n in hits)
                assert flavours == sorted(_grad_flavours(dt) * 2), f"{arch}: pair_grad_kernel<{dt}, {op}>: {hits}"
        for dt in DTYPES_MANGLED:
            hits = [n for n in names if "bs_grad_kernel" + dt in n]
            flavours = sorted(CHUNKED_TF32.search(n).groups() for n in hits)
            assert flavours == sorted(_grad_flavours(dt)), f"{arch}: bs_grad_kernel<{dt}, kChunked, kTF32, kW>: {hits}"
        for base in TENSOR_CORE_KERNELS:  # every fp32 S-tile kernel in both flavours (metrics: exact only)
            flags = {m.group(1) for n in names if base + "If" in n for m in [TF32_FLAG.search(n)] if m}
            want = set() if base in EXACT_ONLY_KERNELS else {"0", "1"}
            assert flags == want, f"{arch}: {base}<float> kTF32 instantiations {sorted(flags)}, want {sorted(want)}"
    assert set(usage[ARCHS[0]]) == set(usage[ARCHS[1]]), "the two architectures hold different kernel sets"


@needs_cuda_build
def test_no_spills_no_stack_registers_and_static_smem_in_limits():
    usage = _resource_usage()
    problems = []
    for arch in ARCHS:
        for name, res in usage.get(arch, {}).items():
            if res.get("LOCAL", 0) != 0 or res.get("STACK", 0) != 0:
                problems.append(f"{arch} {name}: local memory {res.get('LOCAL')} B, stack {res.get('STACK')} B (spills)")
            if res.get("REG", 0) > 255:
                problems.append(f"{arch} {name}: {res['REG']} registers > 255")
            if res.get("SHARED", 0) > 48 * 1024:
                problems.append(f"{arch} {name}: {res['SHARED']} B static shared memory > 48 KiB")
    assert not problems, "\n".join(problems)


@needs_cuda_build
def test_half_precision_tiles_use_tensor_cores():
    sass = _sass_by_function()
    for arch in ARCHS:
        for base in TENSOR_CORE_KERNELS:
            for dt in ("I6__half", "I13__nv_bfloat16"):
                hits = [n for n in sass.get(arch, {}) if base + dt in n]
                assert hits, f"{arch}: no SASS for {base}<{dt}>"
                assert all("HMMA" in sass[arch][n] for n in hits), f"{arch}: {base}<{dt}> has no HMMA instruction"
            fp32 = [n for n in sass.get(arch, {}) if base + "If" in n]
            tf32 = [n for n in fp32 if base not in EXACT_ONLY_KERNELS and TF32_FLAG.search(n).group(1) == "1"]
            exact = [n for n in fp32 if n not in tf32]
            assert exact and all("HMMA" not in sass[arch][n] for n in exact), \
                f"{arch}: {base}<float> must stay exact fp32"
            assert all("HMMA" in sass[arch][n] for n in tf32), f"{arch}: {base}<float, kTF32 = true> has no HMMA"


# ---- numerics on a GPU ----------------------------------------------------------------------------------

def _dense(x, y, labels, tau, symmetric, normalize=False):
    """loss, row_lse, col_lse and (dx, dy, dtau) by autograd, all float64, B x B materialised; normalize: the rows
    L2-normalised first (the gradients are with respect to the raw rows)."""
    from flashdml._math import l2_normalize

    x = x.detach().double().requires_grad_(True)
    y = y.detach().double().requires_grad_(True)
    t = tau.detach().double().requires_grad_(True)
    xn, yn = (l2_normalize(x), l2_normalize(y)) if normalize else (x, y)
    z = (xn @ yn.T) / t
    B = z.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=z.device)
    allowed = torch.ones_like(eye) if labels is None else eye | (labels[:, None] != labels[None, :])
    zm = z.masked_fill(~allowed, float("-inf"))
    diag = z.diagonal()
    row_lse = torch.logsumexp(zm, dim=1)
    loss = (row_lse - diag).mean()
    col_lse = torch.logsumexp(zm, dim=0)
    if symmetric:
        loss = 0.5 * (loss + (col_lse - diag).mean())
    return loss, row_lse.detach(), col_lse.detach(), (x, y, t)


GPU_SHAPES = [(1, 1), (2, 3), (5, 1), (37, 129), (64, 64), (65, 128), (70, 3), (130, 16), (257, 33), (600, 129),
              (1030, 64), (2000, 256)]
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _close(name, got, want, tol, unit=1e-3):
    """max |got - want| <= tol * max(max |want|, unit). `unit` is the natural size of the quantity, for outputs
    that are sums of cancelling terms (dx for d = 1 can be ~1e-12 exactly, with terms of size grad / (B tau);
    dtemperature sums B^2 terms to something much smaller than grad / tau)."""
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten poisoned output?)"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = max(want.abs().max().item() if want.numel() else 0.0, unit)
    assert err <= tol * scale, f"{name}: max abs error {err:.3e} > {tol:.1e} * {scale:.3e}"


@pytest.mark.skipif(
    not torch.cuda.is_available() or not _has_cuda_kernels(),
    reason="no CUDA device" if not torch.cuda.is_available() else "flashdml._C has no CUDA kernels",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("label_kind", ["none", "classes", "all_equal"])
@pytest.mark.parametrize("normalize", [False, True])
def test_cuda_ops_match_dense_torch(dtype, symmetric, label_kind, normalize):
    ops = torch.ops.flashdml
    dev = torch.device("cuda")
    for i, (B, d) in enumerate(GPU_SHAPES):
        g = torch.Generator().manual_seed(i)
        labels = torch.randint(0, max(1, B // 4), (B,), generator=g)
        x = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=1).to(dev, dtype)
        y = torch.nn.functional.normalize(x.float().cpu() + 0.5 * torch.randn(B, d, generator=g), dim=1).to(dev, dtype)
        if normalize:  # raw rows of norms 0.5 .. 2 (the op normalises them)
            x = (x.float() * (0.5 + 1.5 * torch.rand(B, 1, generator=g)).to(dev)).to(dtype)
            y = (y.float() * (0.5 + 1.5 * torch.rand(B, 1, generator=g)).to(dev)).to(dtype)
        labels = labels.to(dev)
        if label_kind == "none":
            labels = None
        elif label_kind == "all_equal":
            labels = torch.zeros(B, dtype=torch.long, device=dev)
        tau = torch.tensor(0.07, device=dev)
        grad = torch.tensor(0.7, device=dev)
        tol = TOL[dtype]
        tag = f"B={B} d={d} {dtype} sym={symmetric} labels={label_kind} normalize={normalize}"

        ref_loss, ref_row, ref_col, (xr, yr, tr) = _dense(x, y, labels, tau, symmetric, normalize)
        (ref_loss * 0.7).backward()

        torch.ops.flashdml._set_poison(True)
        try:
            loss, row_lse, col_lse = ops.batch_softmax_fwd(x, y, labels, tau, symmetric, normalize)
            dx, dy, dtau = ops.batch_softmax_bwd(grad, x, y, labels, tau, symmetric, normalize, row_lse, col_lse)
            loss2, row2, col2 = ops.batch_softmax_fwd(x, y, labels, tau, symmetric, normalize)
            dx2, dy2, dtau2 = ops.batch_softmax_bwd(grad, x, y, labels, tau, symmetric, normalize, row_lse, col_lse)
        finally:
            torch.ops.flashdml._set_poison(False)
        torch.cuda.synchronize()

        assert loss.dtype == torch.float32 and loss.dim() == 0, tag
        assert dx.dtype == dtype and dy.dtype == dtype and dtau.dtype == torch.float32 and dtau.dim() == 0, tag
        assert col_lse.shape == ((B,) if symmetric else (0,)), tag
        _close(f"{tag} loss", loss, ref_loss, tol)
        _close(f"{tag} row_lse", row_lse, ref_row, tol)
        if symmetric:
            _close(f"{tag} col_lse", col_lse, ref_col, tol)
        g_over_tau = 0.7 / 0.07
        _close(f"{tag} dx", dx, xr.grad, tol, g_over_tau / B)
        _close(f"{tag} dy", dy, yr.grad, tol, g_over_tau / B)
        _close(f"{tag} dtemperature", dtau, tr.grad, tol, g_over_tau)
        for a, b, what in ((loss, loss2, "loss"), (row_lse, row2, "row_lse"), (col_lse, col2, "col_lse"),
                           (dx, dx2, "dx"), (dy, dy2, "dy"), (dtau, dtau2, "dtemperature")):
            assert torch.equal(a, b), f"{tag}: {what} is not bitwise deterministic"


# ---- normalize=True on every op (CUDA with a GPU; the CPU ops here) ---------------------------------------------

def _close_rel(name, got, want, rtol):
    """max |got - want| <= rtol * max |want| (integers and bools: equal)."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.shape} {got.dtype} vs {want.dtype}"
    if not got.is_floating_point():
        assert torch.equal(got, want), f"{name}: differs"
        return
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten poisoned output?)"
    if got.numel() == 0:
        return
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= rtol * scale + 1e-30, f"{name}: max abs error {err:.3e} > {rtol:.1e} * {scale:.3e}"


def _normalize_cases(B, d, dev, dtype, seed):
    """(name, fwd, bwd, n_fwd_outputs_for_bwd) per op; fwd(x, y, normalize), bwd(x, y, normalize, fwd_outputs)
    -> tuple of row gradients (one per row argument)."""
    ops = torch.ops.flashdml
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, max(2, B // 4), (B,), generator=g).to(dev)
    ref_labels = torch.randint(0, max(2, B // 4), (B,), generator=g).to(dev)
    tau = torch.tensor(0.1, device=dev)
    grad = torch.tensor(0.7, device=dev)
    k = min(5, B - 1)
    return [
        ("batch_softmax", lambda x, y, n: ops.batch_softmax_fwd(x, y, labels, tau, True, n),
         lambda x, y, n, o: ops.batch_softmax_bwd(grad, x, y, labels, tau, True, n, o[1], o[2])[:2], False),
        ("xent (global, cross)", lambda x, y, n: ops.xent_fwd(x, y, labels, ref_labels, tau, True, False, n),
         lambda x, y, n, o: ops.xent_bwd(grad, x, y, labels, ref_labels, tau, True, False, n, o[1], o[2])[:2], False),
        ("ntxent (self)", lambda x, y, n: ops.xent_fwd(x, x, labels, labels, tau, False, True, n),
         lambda x, y, n, o: ops.xent_bwd(grad, x, x, labels, labels, tau, False, True, n, o[1], o[2])[:2], True),
        ("tcm (self)", lambda x, y, n: ops.hinge_pair_fwd(x, x, labels, labels, 0.6, 0.2, 1.0, 0.5, True, False, n),
         lambda x, y, n, o: ops.hinge_pair_bwd(grad, x, x, labels, labels, 0.6, 0.2, 1.0, 0.5, True, False, n, o[2]),
         True),
        ("contrastive (cross)",
         lambda x, y, n: ops.hinge_pair_fwd(x, y, labels, ref_labels, 0.7, 0.1, 1.0, 1.0, False, True, n),
         lambda x, y, n, o: ops.hinge_pair_bwd(grad, x, y, labels, ref_labels, 0.7, 0.1, 1.0, 1.0, False, True, n,
                                               o[2]), False),
        ("knn (self)", lambda x, y, n: ops.knn_fwd(x, x, k, True, n), None, True),
        ("knn (cross)", lambda x, y, n: ops.knn_fwd(x, y, k, False, n), None, False),
        ("hardest_negatives", lambda x, y, n: ops.hardest_negatives_fwd(x, y, labels, ref_labels, 7, False, n), None,
         False),
        ("contextual", lambda x, y, n: ops.contextual_fwd(x, labels, 4, 0.05, 0.4, 0.5, 0.1, 0.25, 0.75, 0.6, 10.0, n),
         lambda x, y, n, o: (ops.contextual_bwd(grad, x, labels, 4, 0.05, 0.4, 0.5, 0.1, 0.25, 0.75, 0.6, 10.0, n,
                                                *o[2:]),), True),
    ]


_NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available() or not _has_cuda_kernels(),
                                reason="no CUDA device" if not torch.cuda.is_available() else "no CUDA kernels")
# (device, dtype, rtol): on CUDA both sides run the same kernels on the same rows; the CPU kernels normalise inside
def _no_diagonal_clamp(out):
    """The contextual forward's outputs with the clamped bit of the diagonal entries cleared: the CPU kernel normalises
    with its own arithmetic, so S_ii rounds to either side of 1 (C_ii is 0 or 1) in the two runs."""
    ptr, col, flag = out[2], out[3], out[4]
    rows = torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=ptr.device), ptr[1:] - ptr[:-1])
    return (*out[:4], torch.where(rows == col, flag & 0xFD, flag), *out[5:])


NORMALIZE_RUNS = [pytest.param("cpu", torch.float32, 1e-4, id="cpu-fp32")] + [
    pytest.param("cuda", dt, tol, id=f"cuda-{name}", marks=_NEEDS_GPU)
    for dt, tol, name in ((torch.float32, 1e-5, "fp32"), (torch.float16, 2e-3, "fp16"), (torch.bfloat16, 1e-2, "bf16"))]


@pytest.mark.parametrize("device,dtype,rtol", NORMALIZE_RUNS)
@pytest.mark.parametrize("B,d", [(37, 129), (130, 16)])
def test_normalize_inside_matches_prenormalised_rows(device, dtype, rtol, B, d):
    """op(raw rows, normalize=True) = op(x^, normalize=False) with x^ = flashdml._math.normalized_rows(raw) (the
    arithmetic of the CUDA ops' normalize_rows.h), and its gradients = normalized_rows_backward(the x^ gradients, raw).
    On CUDA the two sides run the same kernels on the same rows; on the CPU the kernels normalise inside."""
    from flashdml._math import normalized_rows, normalized_rows_backward

    g = torch.Generator().manual_seed(B + d)
    scale = lambda n: 0.3 + 3.0 * torch.rand(n, 1, generator=g)  # noqa: E731
    x = (torch.randn(B, d, generator=g) * scale(B)).to(device, dtype)
    y = (torch.randn(B, d, generator=g) * scale(B)).to(device, dtype)
    xh, yh = normalized_rows(x)[0], normalized_rows(y)[0]
    torch.ops.flashdml._set_poison(True)
    try:
        for name, fwd, bwd, self_mode in _normalize_cases(B, d, device, dtype, B * d):
            yr, yhh = (x, xh) if self_mode else (y, yh)
            raw = fwd(x, yr, True)
            pre = fwd(xh, yhh, False)
            outs = zip(raw, pre)
            if name == "contextual" and device == "cpu":
                outs = zip(_no_diagonal_clamp(raw), _no_diagonal_clamp(pre))
            for i, (a, b) in enumerate(outs):
                _close_rel(f"{name} {dtype} B={B} d={d} output {i}", a, b, rtol)
            if bwd is None:
                continue
            got = bwd(x, yr, True, raw)
            want = bwd(xh, yhh, False, raw)  # the same saved outputs on both sides
            for i, (a, b) in enumerate(zip(got, want)):
                rows = x if i == 0 else yr
                _close_rel(f"{name} {dtype} B={B} d={d} grad {i}", a, normalized_rows_backward(b, rows), rtol)
    finally:
        torch.ops.flashdml._set_poison(False)
