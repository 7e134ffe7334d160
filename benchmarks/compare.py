"""A/B timing of this tree against another flashdml build, in one run: ``python -m benchmarks.compare``.

    python -m benchmarks.compare --against ../old/python --op batch_softmax --where B=8192 --where d=256

Every cell of the selected ops and shapes (the ``targets`` mode's, or ``--mode``) is measured ``--rounds`` times
for each side, alternating this tree and the other one, each in a fresh worker process (the harness's) whose
``PYTHONPATH`` puts that side's ``python/`` directory first; the benchmark code itself is this tree's. The
torch.mm rate is measured before and after. Prints one markdown row per cell: the median of the per-round
medians of both sides and their ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

from . import OPS, harness


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", required=True, help="the other build's python/ directory (holds flashdml/)")
    ap.add_argument("--op", action="append", choices=OPS, required=True)
    ap.add_argument("--mode", default="targets", help="the ops' shape mode (default: targets)")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="keep the shapes whose KEY equals VALUE (integers compared as integers)")
    ap.add_argument("--provider", default="flashdml-cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=3.0, help="timing seconds per cell and round")
    return ap.parse_args(argv)


def _keep(shape: dict, where) -> bool:
    for cond in where:
        key, value = cond.split("=", 1)
        if str(shape.get(key)) != value:
            return False
    return True


def _run(op, shape, prov, pythonpath: str, budget: float) -> float | None:
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = pythonpath
    try:
        res = harness.run_cell(op, shape, prov, budget_s=budget, timeout_s=900.0)
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous
    return res.median_ms if res.status == "ok" else None


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    here = os.path.join(harness.ROOT, "python")
    other = os.path.abspath(args.against)
    gemm = (4096, 4096, 256)
    rate0 = harness.gemm_gflops("cpu", *gemm)
    rows = []
    for name in args.op:
        op = harness.load_op(name)
        prov = op.provider(args.provider)
        for shape in op.shapes[args.mode]:
            if not _keep(shape, args.where) or ("only" in shape and args.provider not in shape["only"]):
                continue
            times = {"this": [], "other": []}
            for _ in range(args.rounds):
                for side, path in (("this", here), ("other", other)):
                    t = _run(op, shape, prov, path, args.budget)
                    if t is not None:
                        times[side].append(t)
            med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
            rows.append((name, op.shape_label(shape), med["other"], med["this"], med["this"] / med["other"],
                         times))
    rate1 = harness.gemm_gflops("cpu", *gemm)
    print(f"torch.mm fp32 {'x'.join(map(str, gemm))}: {rate0:.1f} GFLOP/s before, {rate1:.1f} after; "
          f"{args.rounds} rounds, provider {args.provider}; this = {here}, other = {other}\n")
    print("| op | shape | other (ms) | this (ms) | this / other | rounds (other; this) |")
    print("|---|---|---:|---:|---:|---|")
    for name, label, t_other, t_this, ratio, times in rows:
        per = "; ".join(", ".join(f"{t:.1f}" for t in times[s]) for s in ("other", "this"))
        print(f"| {name} | {label} | {t_other:.1f} | {t_this:.1f} | {ratio:.3f} | {per} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
