"""``python -m benchmarks --op distributed``: the global-batch losses over gloo ranks on this machine
(docs/spec.md §5).

Cross-Example Softmax and NT-Xent at B_global = 8192, d = 256 (4 samples per class, fp32), W = 2 and 4 ranks,
each rank with one torch thread. Per rank and provider, fwd + bwd of one step:

* ``compute``: CPU time of the rank's main thread over the step minus the time spent inside collectives — the
  work the rank itself does (with W processes sharing 2 cores, wall time measures the scheduler, not the work);
* ``wall``: the step's wall time (contended: every rank of the run shares the machine);
* ``peak``: the rank's resident-memory high-water mark during the step above its level before it;
* ``sent``: bytes this rank's collectives moved (its all-gather outputs and all-to-all inputs).

Providers: ``flashdml process_group`` (local rows × gathered columns); ``gather + fused`` (gather the embeddings
with gradient, the fused loss on the whole batch on every rank); ``pml DistributedLossWrapper`` (efficient=False)
around the flashdml drop-in (pml's own ``NTXentLoss`` builds a |P|×|N| buffer: at B = 8192 with 4 per class
that is 24576 × 67 million pairs, so it is listed as skipped). ``one process`` is the fused loss on the whole
batch in a single process with one thread: the per-rank compute is compared with it.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

B_GLOBAL, D, PER_CLASS = 8192, 256, 4
WORLDS = (2, 4)
OPS = ("cross_example_softmax", "ntxent")
RUNS = 2


def _inputs(world: int, rank: int, b_global: int):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(b_global, D, generator=g)
    labels = torch.arange(b_global) // PER_CLASS
    sizes = [b_global // world + (r < b_global % world) for r in range(world)]
    off = sum(sizes[:rank])
    return x, labels, x[off:off + sizes[rank]].clone(), labels[off:off + sizes[rank]].clone()


class _Meter:
    """Wraps the collectives flashdml and the baselines call: time inside them and the bytes they move."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.seconds, self.cpu, self.bytes = dist, 0.0, 0.0, 0
        for name in ("all_gather", "all_to_all_single", "all_reduce", "all_gather_into_tensor"):
            setattr(dist, name, self._wrap(getattr(dist, name), name))

    def _wrap(self, fn, name):
        def run(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = fn(*args, **kwargs)
            if kwargs.get("async_op"):
                out.wait()
            self.seconds += time.perf_counter() - t0
            self.cpu += time.thread_time() - c0
            first = args[0] if args else kwargs.get("tensor_list")
            if name == "all_gather":
                self.bytes += sum(t.numel() * t.element_size() for t in first)
            elif name == "all_to_all_single":
                src = args[1] if len(args) > 1 else kwargs["input"]
                self.bytes += src.numel() * src.element_size()
            else:
                self.bytes += first.numel() * first.element_size()
            return out
        return run


def _step_fns(op: str, world: int, rank: int, b_global: int):
    import torch.distributed as dist

    import flashdml as fd
    from flashdml.distributed import _comm

    x_all, lab_all, x, lab = _inputs(world, rank, b_global)
    pg = dist.group.WORLD
    fn = getattr(fd, op)

    def call(emb, labels, **kw):
        return fn(emb, labels, temperature=0.1, **kw) if op == "ntxent" else \
            fn(emb, labels=labels, temperature=0.1, **kw)

    def flashdml_pg():
        xl = x.clone().requires_grad_()
        call(xl, lab, process_group=pg).backward()

    def gather_fused():
        xl = x.clone().requires_grad_()
        shards = _comm.shard_layout(xl.shape[0], xl.device, pg)
        labels = _comm.all_gather_rows(lab, shards)
        call(_comm.gather_rows(xl, shards), labels).backward()

    def pml_wrapper():
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

        from flashdml.integrations import pml as fdpml

        inner = (fdpml.CrossExampleSoftmaxLoss if op == "cross_example_softmax" else fdpml.NTXentLoss)(
            temperature=0.1)
        xl = x.clone().requires_grad_()
        DistributedLossWrapper(inner, efficient=False)(xl, lab).backward()

    return {"flashdml process_group": flashdml_pg, "gather + fused": gather_fused,
            "pml DistributedLossWrapper(drop-in)": pml_wrapper}


def _peak_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Hand freed heap back to the OS (so the high-water mark starts at what is alive) and reset VmHWM."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _measure(fn, meter, runs: int):
    import torch.distributed as dist

    fn()  # warm-up
    rows = []
    for _ in range(runs):
        dist.barrier()
        meter.seconds = meter.cpu = 0.0
        meter.bytes = 0
        _reset_peak()
        base = _rss_kib()
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        rows.append((cpu - meter.cpu, wall, (_peak_kib() - base) * 1024, meter.bytes))
    return tuple(statistics.median(r[i] for r in rows) for i in range(4))


def _rank_main(rank: int, world: int, port: int, b_global: int, runs: int, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        meter = _Meter()
        out = {}
        for op in OPS:
            for name, fn in _step_fns(op, world, rank, b_global).items():
                try:
                    out[(op, name)] = _measure(fn, meter, runs)
                except Exception as exc:  # noqa: BLE001 - a row of the table, not a crash
                    out[(op, name)] = f"error: {type(exc).__name__}: {str(exc)[:80]}"
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def _one_process(b_global: int, runs: int):
    import torch

    import flashdml as fd

    torch.set_num_threads(1)
    x, labels, _, _ = _inputs(1, 0, b_global)
    res = {}
    for op in OPS:
        fn = getattr(fd, op)

        def step():
            xl = x.clone().requires_grad_()
            (fn(xl, labels, temperature=0.1) if op == "ntxent" else
             fn(xl, labels=labels, temperature=0.1)).backward()
        step()
        times = []
        for _ in range(runs):
            c0 = time.thread_time()
            step()
            times.append(time.thread_time() - c0)
        res[op] = statistics.median(times)
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(worlds=WORLDS, b_global: int = B_GLOBAL, runs: int = RUNS):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    # large blocks straight from mmap, returned on free: the peak of each provider is its own
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    single = _one_process(b_global, runs)
    results = {}
    for world in worlds:
        q = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, b_global, runs, q)) for r in range(world)]
        for p in procs:
            p.start()
        per_rank = dict(q.get(timeout=3600) for _ in range(world))
        for p in procs:
            p.join()
        results[world] = per_rank
    return single, results


def table(single, results, b_global: int = B_GLOBAL) -> str:
    lines = [f"B_global = {b_global}, d = {D}, fp32, {PER_CLASS} per class, gloo on loopback, 1 thread per rank; "
             "per-rank medians (the slowest rank shown)",
             "", "| op | W | provider | compute / rank (s) | × one process | wall (s) | peak / rank (MiB) | "
             "sent / rank (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for op in OPS:
        lines.append(f"| {op} | 1 | one process (fused, whole batch) | {single[op]:.2f} | 1.00 | | | |")
        for world, per_rank in results.items():
            names = list(per_rank[0].keys())
            for key in names:
                if key[0] != op:
                    continue
                vals = [per_rank[r][key] for r in range(world)]
                if any(isinstance(v, str) for v in vals):
                    msg = next(v for v in vals if isinstance(v, str))
                    lines.append(f"| {op} | {world} | {key[1]} | {msg} | | | | |")
                    continue
                comp, wall, peak, sent = (max(v[i] for v in vals) for i in range(4))
                lines.append(f"| {op} | {world} | {key[1]} | {comp:.2f} | {comp / single[op]:.2f} | {wall:.2f} | "
                             f"{peak / 2**20:.0f} | {sent / 2**20:.1f} |")
        if op == "ntxent":
            lines.append(f"| {op} | any | pml DistributedLossWrapper(pml NTXentLoss) | skipped: a |P|×|N| buffer "
                         f"of {b_global * (PER_CLASS - 1)} × {b_global * (b_global - PER_CLASS)} pairs | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks --op distributed")
    ap.add_argument("--b-global", type=int, default=B_GLOBAL)
    ap.add_argument("--worlds", default=",".join(map(str, WORLDS)))
    ap.add_argument("--runs", type=int, default=RUNS)
    args = ap.parse_args(argv)
    single, results = run(tuple(int(w) for w in args.worlds.split(",")), args.b_global, args.runs)
    text = table(single, results, args.b_global)
    print(text)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "distributed.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
