"""Results out: a markdown table (providers that could not run are named once, not per shape), CSV rows
carrying the machine info and versions, and the matplotlib figures of plots.py (one per op, one summary)."""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import sys

from .harness import Op, Result, default_threads

COLUMNS = ["op", "shape", "provider", "device", "status", "median_ms", "p20_ms", "p80_ms", "n_runs", "peak_mib",
           "flops", "achieved_gflops", "gemm_frac", "speedup", "warmup_s", "memory_method", "shape_json"]
MACHINE = ["cpu_model", "cores", "threads", "gpu", "torch", "triton", "flashdml", "flashdml_backends", "python",
           "platform", "gemm_shape", "gemm_gflops_cpu", "gemm_gflops_cuda", "load_avg", "mode", "timestamp"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int | None = None, ceilings: dict | None = None, mode: str = "",
                 gemm_shape: str = "") -> dict:
    import torch

    ceilings = ceilings or {}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    try:
        from .harness import flashdml_module

        fd = flashdml_module()
        fd_ver = getattr(fd, "__version__", _version("flashdml"))
        backends = ";".join(f"{k}={'yes' if v[0] else 'no'}" for k, v in fd.available_backends().items())
    except Exception as exc:  # noqa: BLE001
        fd_ver, backends = f"does not import ({type(exc).__name__})", ""
    return {
        "cpu_model": cpu_model(), "cores": os.cpu_count(), "threads": threads or default_threads(), "gpu": gpu,
        "torch": torch.__version__, "triton": _version("triton"), "flashdml": fd_ver, "flashdml_backends": backends,
        "python": sys.version.split()[0], "platform": platform.platform(), "gemm_shape": gemm_shape,
        "gemm_gflops_cpu": round(ceilings.get("cpu", 0.0), 1), "gemm_gflops_cuda": round(ceilings.get("cuda", 0.0), 1),
        "load_avg": " ".join(f"{v:.2f}" for v in os.getloadavg()), "mode": mode, "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _num(v, nd: int = 3) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.{max(0, nd - 1 - (v >= 10))}f}" if v >= 1 else f"{v:.{nd}g}"


def row(r: Result) -> dict:
    gf = r.flops / (r.median_ms / 1e3) / 1e9 if r.median_ms else None
    return {"op": r.op, "shape": r.shape, "provider": r.provider, "device": r.device, "status": r.status,
            "median_ms": r.median_ms, "p20_ms": r.p20_ms, "p80_ms": r.p80_ms, "n_runs": r.n_runs,
            "peak_mib": r.peak_mib, "flops": r.flops, "achieved_gflops": gf, "gemm_frac": r.gemm_frac,
            "speedup": r.speedup, "warmup_s": r.warmup_s, "memory_method": r.memory_method, "shape_json": json.dumps(r.shape_params, sort_keys=True)}


def _not_run(r: Result) -> bool:
    return r.status.startswith("not run")


def not_run_lines(results: list[Result]) -> list[str]:
    """The providers that could not run on this machine, one line per reason (not one row per shape):
    "not run: flashdml-cuda, reference-cuda — no CUDA device". A provider that is not run for one op only
    (an op-specific reason) names the op in brackets."""
    by_reason: dict[str, dict[str, set]] = {}
    for r in results:
        if _not_run(r):
            reason = r.status.split(":", 1)[1].strip() if ":" in r.status else "unavailable"
            by_reason.setdefault(reason, {}).setdefault(r.provider, set()).add(r.op)
    ops_with = {}
    for r in results:
        ops_with.setdefault(r.provider, set()).add(r.op)
    lines = []
    for reason, provs in by_reason.items():
        names = [p if ops == ops_with[p] else f"{p} ({', '.join(sorted(ops))})" for p, ops in provs.items()]
        lines.append(f"not run: {', '.join(names)} — {reason}")
    return lines


def markdown_table(results: list[Result]) -> str:
    """One row per cell that was attempted; the cells whose provider is unavailable here are summarised
    after the table by not_run_lines."""
    head = ["op", "shape", "provider", "median ms", "p20 ms", "p80 ms", "peak MiB", "% GEMM ceiling",
            "speedup vs ref", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 3 or i == 9 else "---:" for i in
                                                           range(len(head))) + "|"]
    for r in results:
        if _not_run(r):
            continue
        ok = r.status == "ok"
        cells = [r.op, r.shape, r.provider, _num(r.median_ms), _num(r.p20_ms), _num(r.p80_ms), _num(r.peak_mib),
                 "—" if r.gemm_frac is None else f"{100 * r.gemm_frac:.1f}%",
                 "—" if r.speedup is None else f"{r.speedup:.2f}x",
                 (f"n={r.n_runs}" + (" (baseline)" if r.reference else "")) if ok else r.status]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    missing = not_run_lines(results)
    return "\n".join(lines + ([""] + missing if missing else []))


def header(info: dict) -> str:
    gpu = "" if info["gpu"] == "none" else f", GPU {info['gpu']} (fp32 mm {info['gemm_gflops_cuda']} GFLOP/s)"
    return (f"{info['cpu_model']}, {info['cores']} cores, {info['threads']} threads, fp32 torch.mm "
            f"{info['gemm_shape']}: {info['gemm_gflops_cpu']} GFLOP/s{gpu}; torch {info['torch']}, "
            f"triton {info['triton']}, flashdml {info['flashdml']} [{info['flashdml_backends']}]; "
            f"load average {info['load_avg']}")


def write_csv(path: str, results: list[Result], info: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + MACHINE)
        w.writeheader()
        for r in results:
            w.writerow({**{k: ("" if v is None else v) for k, v in row(r).items()}, **{k: info.get(k, "") for k in MACHINE}})


def write_all(out_dir: str, mode: str, ops: list[Op], results: list[Result], info: dict) -> list[str]:
    """CSV (every cell, the not-run ones included) + PNG per op, the summary PNG and the markdown summary;
    returns the paths written."""
    from . import plots

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for op in ops:
        rs = [r for r in results if r.op == op.name]
        if not rs:
            continue
        csv_path = os.path.join(out_dir, f"{op.name}_{mode}.csv")
        write_csv(csv_path, rs, info)
        paths.append(csv_path)
        fig = plots.op_figure(op, rs, info)
        if fig is not None:
            paths.append(plots.save(fig, os.path.join(out_dir, f"{op.name}_{mode}.png")))
    fig = plots.summary_figure(ops, results, info)
    if fig is not None:
        paths.append(plots.save(fig, os.path.join(out_dir, f"summary_{mode}.png")))
    md = os.path.join(out_dir, f"summary_{mode}.md")
    with open(md, "w") as f:
        f.write(f"{header(info)}\n\n{markdown_table(results)}\n")
    paths.append(md)
    return paths
