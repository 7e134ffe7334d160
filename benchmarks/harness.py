"""The measuring machinery shared by every op module.

An op module (``benchmarks/<op>.py``) exports ``OP = Op(...)``: its shapes per mode, its providers and its FLOP
count. Every (op, shape, provider) cell runs in a **process of its own**: a fresh subprocess (``python -m
benchmarks --_worker JSON``), or for CPU cells under run_ops a child forked from a server that has imported torch
once (forkserver.py; the same worker code, without paying the import per cell). It builds the inputs, warms up,
measures peak memory above the post-warm-up baseline (CPU: the VmHWM high-water mark after resetting it through
/proc/self/clear_refs; GPU: torch.cuda.max_memory_allocated), then times the call adaptively (perf_counter on CPU,
CUDA events on GPU). The parent enforces a time limit and a memory cap (it polls the child's RSS and kills it above
the cap), skips providers whose predicted memory exceeds the cap, and turns every failure into a result row: "oom",
"timeout", "skipped: ...", "not run: ...", "error: ...". Nothing here crashes the run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_TAG = "@@RESULT "
GiB = 1024.0**3
MiB = 1024.0**2


# ----------------------------------------------------------------------------------------------- interfaces
def _always() -> tuple[bool, str]:
    return True, ""


@dataclasses.dataclass
class Provider:
    """One way of computing an op.

    setup(shape, device) builds the inputs and returns a zero-argument callable: the unit that is timed
    (forward+backward for losses). available() -> (ok, reason) is checked in the parent; a provider that
    is not available becomes a "not run: <reason>" row. mem_bytes(shape) predicts the peak memory; above
    the cap the cell is "skipped". reference=True marks the baseline of the speedup column (per device).
    """

    name: str
    setup: Callable[[dict, str], Callable[[], Any]]
    available: Callable[[], tuple[bool, str]] = _always
    device: str = "cpu"
    mem_bytes: Callable[[dict], float] | None = None
    reference: bool = False
    modes: tuple | None = None  # run only in these modes (None: every mode that lists it)


@dataclasses.dataclass
class Op:
    """An op family. shapes: mode ("quick" | "full" | "targets") -> list of shape dicts. A shape may carry
    "only": [provider names] to restrict the providers run on it. flops(shape) = FLOPs the algorithm must
    do per timed call. sweep = the shape key on the plots' x axis; plot_where = the other keys' values that
    select the plotted sweep (None: every shape)."""

    name: str
    shapes: dict[str, list[dict]]
    providers: list[Provider]
    flops: Callable[[dict], float]
    unit: str = "fwd+bwd"
    sweep: str = "B"
    plot_where: dict | None = None
    label: Callable[[dict], str] | None = None
    module: str = ""  # filled by load_op: where a worker finds this op again

    def shape_label(self, shape: dict) -> str:
        s = {k: v for k, v in shape.items() if k not in ("only", "prec")}
        text = self.label(s) if self.label else " ".join(f"{k}={v}" for k, v in s.items())
        return text + (f" prec={shape['prec']}" if "prec" in shape else "")

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"{self.name} has no provider {name!r}")


@dataclasses.dataclass
class Result:
    op: str
    shape: str
    provider: str
    device: str = "cpu"
    status: str = "ok"
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    n_runs: int = 0
    peak_mib: float | None = None
    warmup_s: float | None = None  # first call (includes torch.compile's compilation)
    memory_method: str = ""
    flops: float = 0.0
    gemm_frac: float | None = None  # achieved GFLOP/s / torch.mm GFLOP/s on the same device
    speedup: float | None = None  # reference median / this median (same op, shape, device)
    sweep_value: float | None = None
    reference: bool = False  # this row is the speedup baseline
    shape_params: dict = dataclasses.field(default_factory=dict)


def load_op(name_or_path: str) -> Op:
    """`batch_softmax` -> benchmarks.batch_softmax.OP; a path to a .py file is loaded from that file."""
    if name_or_path.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"_bench_op_{abs(hash(name_or_path))}", name_or_path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(name_or_path if "." in name_or_path else f"benchmarks.{name_or_path}")
    op = mod.OP
    op.module = name_or_path
    return op


def ensure_flashdml_importable() -> None:
    """Use the installed flashdml, else the source tree's python/ (the package then imports without _C)."""
    if importlib.util.find_spec("flashdml") is None:  # find, not import: importing is flashdml_module's job
        path = os.path.join(ROOT, "python")
        if os.path.isdir(os.path.join(path, "flashdml")) and path not in sys.path:
            sys.path.insert(0, path)


# ------------------------------------------------------------------------------------------ small helpers
def quantile(samples, q: float) -> float:
    """Linear-interpolation quantile (numpy's default method), q in [0, 1]."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("quantile of no samples")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def _status_kib(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). Returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in msg for s in ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")
    )


def fmt_gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.3g} GiB"


# ----------------------------------------------------------------------------- measuring (in the worker)
def measure(fn: Callable[[], Any], device: str = "cpu", budget_s: float = 3.0, min_runs: int = 3,
            max_runs: int = 100) -> dict:
    """Warm up once; time one call while measuring its peak memory above the post-warm-up baseline; then
    time more calls until `budget_s` is spent (at least `min_runs` timed calls in all, at most `max_runs`).
    CPU: perf_counter; GPU: CUDA events. Returns seconds and bytes."""
    cuda = device.startswith("cuda")
    if cuda:
        import torch

    def timed() -> float:
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            out = fn()
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / 1e3
        t = time.perf_counter()
        out = fn()  # noqa: F841 — alive until the clock stops, like the caller's result would be
        return time.perf_counter() - t

    warmup_s = timed()
    gc.collect()
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = [timed()]
        peak, method = torch.cuda.max_memory_allocated() - base, "cuda.max_memory_allocated"
    else:
        base = _status_kib("VmRSS") * 1024
        ok = reset_peak_rss()
        times = [timed()]
        peak = _status_kib("VmHWM") * 1024 - base if ok else None
        method = "VmHWM-after-clear_refs" if ok else "unavailable"
    gc.collect()
    start = time.perf_counter()
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() - start < budget_s):
        times.append(timed())
    return {"times": times, "peak_bytes": max(peak, 0) if peak is not None else None,
            "warmup_s": warmup_s, "memory_method": method}


def worker_main(spec_json: str) -> int:
    """Entry of the per-cell subprocess: prints one RESULT_TAG line of JSON on stdout."""
    spec = json.loads(spec_json)
    out: dict = {}
    try:
        ensure_flashdml_importable()
        op = load_op(spec["op"])
        prov = op.provider(spec["provider"])
        if "torch" in sys.modules or prov.device != "cpu":
            import torch

            torch.set_num_threads(int(spec["threads"]))
        shape = dict(spec["shape"])
        prec = shape.pop("prec", None)  # the GPU mode's precision (benchmarks/gpu.py)
        from .gpu import apply_precision

        with apply_precision(prec, dtype=True):
            fn = prov.setup(shape, prov.device)
        with apply_precision(prec, dtype=False):
            out = measure(fn, prov.device, spec["budget_s"], spec["min_runs"], spec["max_runs"])
        out["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 — every failure becomes a result
        msg = " ".join(str(exc).split())[:200]
        out = {"status": "oom" if is_oom(exc) else f"error: {type(exc).__name__}: {msg}"}
        if out["status"] == "oom":
            out["detail"] = msg
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------------------- running (in the parent)
def gemm_gflops(device: str = "cpu", m: int = 4096, n: int = 4096, k: int = 256, budget_s: float = 1.0) -> float:
    """torch.mm fp32 GFLOP/s for [m, k] @ [k, n]: the ceiling the ops' GEMM fractions are relative to."""
    import torch

    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    r = measure(lambda: torch.mm(a, b), device, budget_s=budget_s, min_runs=3, max_runs=50)
    return 2.0 * m * n * k / quantile(r["times"], 0.5) / 1e9


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything it started (compile workers)
    proc.wait()


def _watch(proc: subprocess.Popen, cpu: bool, timeout_s: float, cap: float) -> str | None:
    """Wait for the worker; kill it past the time limit or (CPU) past the memory cap and say why."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        killed = None
        if time.monotonic() > deadline:
            killed = f"timeout: > {timeout_s:g} s"
        else:
            with contextlib.suppress(OSError):
                if cpu and _status_kib("VmRSS", str(proc.pid)) * 1024 > cap:
                    killed = f"oom: RSS passed the {fmt_gib(cap)} cap"
        if killed:
            _kill_group(proc)
            return killed
        time.sleep(0.05)
    return None


def worker_env() -> dict:
    """The environment of the worker processes (and of the fork server)."""
    env = dict(os.environ)
    # Fixed glibc thresholds: big blocks are mmap'd and returned on free, so RSS follows live memory and the
    # post-warm-up baseline does not hide reused heap (the dynamic threshold would retain up to 32 MiB blocks).
    env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_cell(op: Op, shape: dict, prov: Provider, *, budget_s: float = 3.0, timeout_s: float = 300.0,
             mem_cap_bytes: float = 12 * GiB, threads: int | None = None, min_runs: int = 3,
             max_runs: int = 100, cuda_ok: bool | None = None, server=None,
             gpu_mem_cap_bytes: float | None = None) -> Result:
    """One (op, shape, provider) cell, always returning a Result. `server`: a running
    forkserver.ForkServer that CPU cells are forked from (else, or if it has failed: a fresh subprocess)."""
    params = {k: v for k, v in shape.items() if k != "only"}
    res = Result(op.name, op.shape_label(shape), prov.name, prov.device, flops=float(op.flops(params)),
                 sweep_value=params.get(op.sweep), reference=prov.reference, shape_params=params)
    if prov.device.startswith("cuda"):
        if cuda_ok is None:
            import torch

            cuda_ok = torch.cuda.is_available()
        if not cuda_ok:
            res.status = "not run: no CUDA device"
            return res
    try:
        ok, reason = prov.available()
    except Exception as exc:  # noqa: BLE001
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    if not ok:
        res.status = f"not run: {reason}"
        return res
    if prov.mem_bytes is not None and prov.device == "cpu":
        need = float(prov.mem_bytes(params))
        if need > mem_cap_bytes:
            res.status = f"skipped: needs ~{fmt_gib(need)} > {fmt_gib(mem_cap_bytes)} cap"
            return res
    if prov.mem_bytes is not None and prov.device != "cpu" and gpu_mem_cap_bytes is not None:
        need = float(prov.mem_bytes(params))
        if need > gpu_mem_cap_bytes:
            res.status = f"skipped: needs ~{fmt_gib(need)} > {fmt_gib(gpu_mem_cap_bytes)} GPU cap"
            return res
    spec = dict(op=op.module or op.name, provider=prov.name, shape=params, budget_s=budget_s,
                min_runs=min_runs, max_runs=max_runs, threads=threads or default_threads())
    # Files, not pipes: a chatty worker (compiler warnings) must not block on a full pipe while we poll.
    with tempfile.NamedTemporaryFile("w+") as fout, tempfile.NamedTemporaryFile("w+") as ferr:
        proc = None
        if server is not None and server.alive and prov.device == "cpu":
            with contextlib.suppress(OSError, RuntimeError, ValueError):  # a failed server: fresh subprocess
                proc = server.start(json.dumps(spec), fout.name, ferr.name)
        if proc is None:
            cmd = [sys.executable, "-m", "benchmarks", "--_worker", json.dumps(spec)]
            proc = subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stdout=fout, stderr=ferr,
                                    start_new_session=True)
        killed = _watch(proc, prov.device == "cpu", timeout_s, mem_cap_bytes)
        fout.seek(0)
        ferr.seek(0)
        stdout, stderr = fout.read(), ferr.read()
    if killed:
        res.status = killed
        return res
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith(RESULT_TAG)), None)
    if line is None:
        if proc.returncode in (-signal.SIGKILL, 137):
            res.status = "oom: killed (SIGKILL, likely the OOM killer)"
        else:
            tail = " ".join(stderr.strip().splitlines()[-1:])[:200]
            res.status = f"error: worker exited with {proc.returncode}: {tail}"
        return res
    out = json.loads(line[len(RESULT_TAG):])
    res.status = out["status"]
    if res.status == "ok":
        ts = out["times"]
        res.median_ms, res.p20_ms, res.p80_ms = (1e3 * quantile(ts, q) for q in (0.5, 0.2, 0.8))
        res.n_runs = len(ts)
        res.peak_mib = None if out["peak_bytes"] is None else out["peak_bytes"] / MiB
        res.warmup_s, res.memory_method = out["warmup_s"], out["memory_method"]
    return res


def finish(results: list[Result], ceilings: dict[str, float]) -> None:
    """Fill the GEMM-ceiling fraction and the speedup vs the reference on the same device."""
    refs = {}
    for r in results:
        if r.status == "ok" and r.median_ms:
            dev = r.device.split(":")[0]
            if ceilings.get(dev):
                r.gemm_frac = r.flops / (r.median_ms / 1e3) / 1e9 / ceilings[dev]
    for r in results:
        if r.status == "ok" and r.reference:
            refs[(r.op, r.shape, r.device)] = r.median_ms
    for r in results:
        ref = refs.get((r.op, r.shape, r.device))
        if r.status == "ok" and ref:
            r.speedup = ref / r.median_ms


def cells(op: Op, mode: str, only_providers: list[str] | None = None):
    if mode.startswith("gpu"):
        from .gpu import add_gpu_shapes

        add_gpu_shapes(op)
    seen = set()
    for shape in op.shapes.get(mode, []):
        label = op.shape_label(shape)
        if label in seen:
            continue
        seen.add(label)
        for prov in op.providers:
            if shape.get("only") is not None and prov.name not in shape["only"]:
                continue
            if only_providers and prov.name not in only_providers:
                continue
            if prov.modes is not None and mode not in prov.modes:
                continue
            yield shape, prov


def progress_bar(total: int, stream=None, disable: bool = False):
    """A tqdm bar over the cells, on stderr (tqdm is a benchmark-only extra, imported here)."""
    from tqdm import tqdm

    return tqdm(total=total, file=stream or sys.stderr, unit="cell", dynamic_ncols=True, disable=disable,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")


def run_ops(ops: list[Op], mode: str, *, only_providers=None, ceilings: dict[str, float] | None = None,
            progress_stream=None, show_progress: bool = True, fork_server: bool = True,
            deadline: float | None = None, order: Callable[[dict, Provider], Any] | None = None, on_result: Callable[[list], None] | None = None,
            **cell_kw) -> list[Result]:
    """Every cell of every op in `mode`, with a progress bar over the cells on stderr (or
    `progress_stream`); returns the finished results (fractions, speedups filled). fork_server: fork the CPU
    cells from one process that has imported torch already (forkserver.py) instead of starting each anew.
    deadline (time.monotonic()): cells not started by then become "not run: time budget spent"; on_result(results)
    is called after every cell; order(shape, provider): run the cells sorted by this key (stable)."""
    from .forkserver import ForkServer

    todo = [(op, s, p) for op in ops for s, p in cells(op, mode, only_providers)]
    if order is not None:  # e.g. the GPU mode: the fused cells of every op before the references
        todo.sort(key=lambda c: order(c[1], c[2]))
    results = []
    server = None
    if fork_server and sum(p.device == "cpu" for _, _, p in todo) > 1:
        server = ForkServer(worker_env(), ROOT, [op.module or op.name for op in ops])
    try:
        with progress_bar(len(todo), progress_stream, disable=not show_progress) as bar:
            for op, shape, prov in todo:
                bar.set_description(op.name, refresh=False)
                bar.set_postfix_str(f"{op.shape_label(shape)} {prov.name}")
                if deadline is not None and time.monotonic() > deadline:  # the --time-budget is spent
                    r = Result(op.name, op.shape_label(shape), prov.name, prov.device,
                               status="not run: time budget spent", reference=prov.reference)
                else:
                    r = run_cell(op, shape, prov, server=server, **cell_kw)
                results.append(r)
                if on_result is not None:
                    on_result(results)
                bar.update()
    finally:
        if server is not None:
            server.close()
    finish(results, ceilings or {})
    return results


# ------------------------------------------------------------- provider builders that op modules reuse
def flashdml_module():
    ensure_flashdml_importable()
    import torch  # noqa: F401  (before flashdml._C, which links against torch's libraries)
    import flashdml

    return flashdml


def loss_runner(fn: Callable, args: tuple, kwargs: dict, backend: str | None = None) -> Callable[[], Any]:
    """The timed unit of a loss: forward, then torch.autograd.grad w.r.t. every tensor that requires grad
    (no .grad accumulation between calls). Under `with flashdml.backend(backend)` when one is given."""
    import torch

    diff = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]

    fd = flashdml_module() if backend else None

    def run():
        with fd.backend(backend) if backend else contextlib.nullcontext():
            return torch.autograd.grad(fn(*args, **kwargs), diff)

    return run


def flashdml_check(fn_name: str, backend: str | None = None) -> Callable[[], tuple[bool, str]]:
    """available(): flashdml imports, has `fn_name` (or reference.fn_name), and `backend` is available."""

    def check() -> tuple[bool, str]:
        try:
            fd = flashdml_module()
        except Exception as exc:  # noqa: BLE001
            return False, f"flashdml does not import ({type(exc).__name__}: {exc})"
        if backend is None:
            try:
                ref = importlib.import_module("flashdml.reference")
            except Exception as exc:  # noqa: BLE001
                return False, f"flashdml.reference does not import ({type(exc).__name__}: {exc})"
            return (True, "") if hasattr(ref, fn_name) else (False, f"flashdml.reference.{fn_name} missing")
        if not hasattr(fd, fn_name):
            return False, f"flashdml.{fn_name} missing"
        ok, reason = fd.available_backends().get(backend, (False, f"unknown backend {backend!r}"))
        return bool(ok), str(reason or f"backend {backend!r} unavailable")

    return check


# Provider-name groups the loss benchmarks select shapes with.
FUSED = ["flashdml-cpu", "flashdml-triton", "flashdml-cuda"]
GPU = ["reference-cuda", "flashdml-triton", "flashdml-cuda"]
QUICK = ["reference", "flashdml-cpu", "chunked-pytorch"] + GPU


def sweep(bs, d: int, only=None, **fields) -> list:
    """Shapes {"B": b, "d": d, **fields} for b in bs, each run by the providers ``only`` (None: all)."""
    return [{"B": b, "d": d, **fields, **({"only": only} if only else {})} for b in bs]


def pair_buffers(n: float, inputs: Callable[[dict], float]) -> Callable[[dict], float]:
    """Predicted peak (bytes) of an implementation holding ``n`` fp32 B×B buffers, plus ``inputs(shape)``."""
    return lambda s: n * s["B"] * s["B"] * 4 + inputs(s)


def block_buffers(n: float, block: int, inputs: Callable[[dict], float]) -> Callable[[dict], float]:
    """Predicted peak (bytes) of a chunked implementation holding ``n`` fp32 [min(block, B), B] row blocks."""
    return lambda s: n * min(block, s["B"]) * s["B"] * 4 + inputs(s)


def module_available(module: str, package: str) -> Callable[[], tuple[bool, str]]:
    """A provider ``available`` check: is ``module`` importable (``package``: the name to install)?"""
    def check():
        found = importlib.util.find_spec(module) is not None
        return (True, "") if found else (False, f"{package} not installed")
    return check


def loss_providers(fn_name: str, make_inputs: Callable[[dict, str], tuple[tuple, dict]], *,
                   mem_reference: Callable[[dict], float] | None = None,
                   mem_compiled: Callable[[dict], float] | None = None,
                   mem_fused: Callable[[dict], float] | None = None,
                   cpu_extra: tuple[Provider, ...] = ()) -> list[Provider]:
    """The standard providers of a loss `flashdml.<fn_name>` (fwd+bwd): reference, flashdml-cpu,
    torch.compile(reference), `cpu_extra` (peers), and the CUDA rows reference-cuda, flashdml-triton,
    flashdml-cuda, torch.compile(reference)-cuda (the last in the GPU mode only). make_inputs(shape, device) -> (args, kwargs) with requires_grad set on the inputs."""

    from .gpu import compiled_cuda_provider

    def ref_fn():
        return getattr(importlib.import_module("flashdml.reference"), fn_name)

    def reference(shape, dev):
        return loss_runner(ref_fn(), *make_inputs(shape, dev))

    def compiled(shape, dev):
        import torch

        return loss_runner(torch.compile(ref_fn()), *make_inputs(shape, dev))

    def fused(backend):
        return lambda shape, dev: loss_runner(getattr(flashdml_module(), fn_name), *make_inputs(shape, dev), backend)

    ref_ok = flashdml_check(fn_name)
    return [
        Provider("reference", reference, ref_ok, "cpu", mem_reference, reference=True),
        Provider("flashdml-cpu", fused("cpu"), flashdml_check(fn_name, "cpu"), "cpu", mem_fused),
        Provider("torch.compile(reference)", compiled, ref_ok, "cpu", mem_compiled or mem_reference),
        *cpu_extra,
        Provider("reference-cuda", reference, ref_ok, "cuda", mem_reference, reference=True),
        Provider("flashdml-triton", fused("triton"), flashdml_check(fn_name, "triton"), "cuda", mem_fused),
        Provider("flashdml-cuda", fused("cuda"), flashdml_check(fn_name, "cuda"), "cuda", mem_fused),
        compiled_cuda_provider("torch.compile(reference)-cuda", compiled, ref_ok, mem_compiled or mem_reference),
    ]
