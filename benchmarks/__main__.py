"""CLI: python -m benchmarks --quick | --full | --op NAME [options]  (see --help)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import OPS


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=(
        "flashdml microbenchmarks. Each (op, shape, provider) runs in a process of its own: median and p20/p80 "
        "wall time, peak memory above the inputs, fraction of the torch.mm fp32 ceiling, speedup vs the reference. "
        "Writes a markdown table to stdout and CSV + PNG plots (matplotlib) under benchmarks/results/; "
        "a tqdm progress bar goes to stderr."))
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="one small shape of every op, a short timing budget: under 5 minutes on 2 cores "
                      "(`make bench`; the default)")
    mode.add_argument("--full", action="store_const", dest="mode", const="full", help="every shape of every op")
    ap.add_argument("--gpu", action="store_true",
                    help="only the CUDA providers (reference-cuda, torch.compile(reference)-cuda, flashdml-triton, "
                    "flashdml-cuda) in fp32, TF32 and bf16, at GPU batch sizes up to 32768 (benchmarks/gpu.py); "
                    "with --quick (the default) about 4 minutes on one H100")
    ap.add_argument("--time-budget", type=float,
                    help="seconds for the whole run: cells not started by then are recorded as not run "
                    "(default: none; 240 with --gpu --quick)")
    ap.add_argument("--op", action="append", choices=OPS + ("distributed", "gemm_work"), metavar="NAME",
                    help=f"only this op ({', '.join(OPS)}); alone it runs the shapes its targets are stated at. "
                    "`--op distributed` runs the global-batch losses over gloo ranks instead "
                    "(benchmarks/distributed.py, its own runner: it spawns the ranks); `--op gemm_work` prints the "
                    "GEMM-work table of the Triton kernels (benchmarks/gemm_work.py: FLOPs per launch from the "
                    "grids, no kernel runs; its own options via python -m benchmarks.gemm_work)")
    ap.add_argument("--providers", help="comma-separated provider names to run (default: all)")
    ap.add_argument("--budget", type=float, help="timing seconds per cell (default 0.3 quick, 5 otherwise)")
    ap.add_argument("--timeout", type=float, help="seconds per cell before it is recorded as a timeout "
                    "(default 120 quick, 900 otherwise)")
    ap.add_argument("--mem-cap-gib", type=float, default=12.0,
                    help="CPU memory cap: predicted peaks above it are skipped, workers passing it are killed")
    ap.add_argument("--threads", type=int, help="torch threads (default: the CPUs this process may use)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--list", action="store_true", help="list ops, shapes and providers, run nothing")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_forkserver", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from . import harness

    if args._worker:
        return harness.worker_main(args._worker)
    if args._forkserver:
        from .forkserver import serve

        return serve(json.loads(args._forkserver))
    harness.ensure_flashdml_importable()
    if args.op and "distributed" in args.op:
        from . import distributed

        return distributed.main([])
    if args.op and "gemm_work" in args.op:
        from . import gemm_work

        return gemm_work.main([])
    mode = args.mode or ("targets" if args.op else "quick")
    if args.gpu:
        mode = "gpu-full" if mode == "full" else "gpu-quick"
    ops = [harness.load_op(n) for n in (args.op or OPS)]
    only = args.providers.split(",") if args.providers else None
    if args.list:
        for op in ops:
            for shape, prov in harness.cells(op, mode, only):
                print(f"{op.name}\t{op.shape_label(shape)}\t{prov.name}\t{prov.device}")
        return 0
    import torch

    from . import report

    if args.gpu:
        return gpu_main(args, ops, mode, only)

    threads = args.threads or harness.default_threads()
    torch.set_num_threads(threads)
    t0 = time.monotonic()
    gemm = (4096, 4096, 256)
    ceilings = {"cpu": harness.gemm_gflops("cpu", *gemm)}
    if torch.cuda.is_available():
        ceilings["cuda"] = harness.gemm_gflops("cuda", 8192, 8192, 8192)
    quick = mode == "quick"
    # Quick: each cell's fresh worker spends seconds importing torch, so the timing itself is kept short
    # (0.3 s, at most 10 calls, at least 3) to bring the whole suite under 5 minutes on 2 loaded cores.
    results = harness.run_ops(
        ops, mode, only_providers=only, threads=threads,
        budget_s=args.budget or (0.3 if quick else 5.0), timeout_s=args.timeout or (120.0 if quick else 900.0),
        mem_cap_bytes=args.mem_cap_gib * harness.GiB, max_runs=10 if quick else 100)
    # Measured again at the end: the better of the two is the ceiling (other load on the machine lowers it).
    ceilings["cpu"] = max(ceilings["cpu"], harness.gemm_gflops("cpu", *gemm))
    harness.finish(results, ceilings)
    info = report.machine_info(threads, ceilings, mode, "x".join(map(str, gemm)) + " (m x n x k)")
    paths = report.write_all(args.out, mode, ops, results, info)
    print(report.header(info) + "\n")
    print(report.markdown_table(results))
    print(f"\n{len(results)} cells in {time.monotonic() - t0:.0f} s; wrote " +
          ", ".join(os.path.relpath(p) for p in paths))
    return 0


def gpu_main(args, ops, mode: str, only) -> int:
    """`--gpu`: the CUDA cells only; without a CUDA device one line says so and nothing runs (exit 0)."""
    import torch

    from . import gpu, harness, report

    if not torch.cuda.is_available():
        print("benchmarks --gpu: no CUDA device (torch.cuda.is_available() is False); nothing to run")
        return 0
    threads = args.threads or harness.default_threads()
    torch.set_num_threads(threads)
    t0 = time.monotonic()
    ceilings = {"cuda": harness.gemm_gflops("cuda", 8192, 8192, 8192)}
    quick = mode == "gpu-quick"
    budget = args.time_budget if args.time_budget is not None else (240.0 if quick else None)
    info = report.machine_info(threads, ceilings, mode, "8192x8192x8192 (m x n x k, cuda fp32)")
    os.makedirs(args.out, exist_ok=True)
    partial = os.path.join(args.out, f"partial_{mode}.md")

    def save_partial(results):  # after every cell: a run killed from outside still leaves its table
        with open(partial, "w") as f:
            f.write(f"{report.header(info)}\n\n{report.markdown_table(results)}\n")

    results = harness.run_ops(
        ops, mode, only_providers=only, threads=threads, fork_server=False,
        budget_s=args.budget or (0.3 if quick else 2.0), timeout_s=args.timeout or (60.0 if quick else 300.0),
        mem_cap_bytes=args.mem_cap_gib * harness.GiB, gpu_mem_cap_bytes=gpu.gpu_memory_cap(),
        max_runs=20 if quick else 100, cuda_ok=True,
        deadline=None if budget is None else t0 + budget, on_result=save_partial, order=gpu.run_order)
    harness.finish(results, ceilings)
    paths = report.write_all(args.out, mode, ops, results, info)
    print(report.header(info) + "\n")
    print(report.markdown_table(results))
    print(f"\n{len(results)} cells in {time.monotonic() - t0:.0f} s; wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
