"""Spawning gloo ranks on 127.0.0.1 from a test, bounded in time.

``run_ranks("module:function", world, *args)`` starts ``world`` fresh processes (spawn), initialises a gloo
process group over loopback in each, imports ``module`` (a module of tests/, e.g. ``"test_distributed_losses"``)
and calls ``function(rank, world, *args)``. It returns the list of the functions' return values in rank order
(they must pickle), or fails the test with every rank's traceback when a rank raised, and kills them all when
they take longer than ``timeout`` seconds.

Starting a rank costs seconds of CPU (torch, triton and flashdml imports, the process group), more than most
cases, so the ranks are kept: one pool of ``world`` processes per world size for the whole pytest session, each
call sending the target to every rank of the pool and collecting the results. The process group and the imported
modules are reused; a call that fails or times out kills its pool (a rank may be stuck in a collective), and the
next call starts a fresh one. A call with ``spoils_group=True`` (a case that leaves a rank alone in a collective on
purpose, which leaves the group unusable) closes its pool afterwards.
"""
from __future__ import annotations

import atexit
import os
import pickle
import queue
import socket
import sys
import traceback

import pytest
import torch.multiprocessing as mp

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.join(os.path.dirname(TESTS_DIR), "python")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_target(rank: int, world: int, target: str, args: tuple):
    import importlib

    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)(rank, world, *args)


def _rank_main(rank: int, world: int, port: int, jobs, results) -> None:
    """A rank of a pool: joins the gloo group once, then runs every target sent to it until it gets ``None``."""
    for path in (TESTS_DIR, PYTHON_DIR):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))
        return
    try:
        while True:
            job = jobs.get()
            if job is None:
                break
            target, args = job
            try:
                value = _run_target(rank, world, target, args)
                # plain pickle copies tensors' bytes; the queue's own pickler would hand over shared-memory file
                # descriptors, which are lost when this process exits before the parent has received them
                results.put((rank, True, pickle.dumps(value)))
            except BaseException:  # noqa: BLE001 - reported to the parent
                results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _Pool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [ctx.Process(target=_rank_main, args=(r, world, port, self.jobs[r], self.results), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, target: str, args: tuple, timeout: float) -> dict:
        """rank -> (ok, payload) for the ranks that answered within ``timeout`` (stops at the first failure)."""
        for q in self.jobs:
            q.put((target, args))
        got = {}
        try:
            for _ in range(self.world):
                rank, ok, value = self.results.get(timeout=timeout)
                got[rank] = (ok, value)
                if not ok:
                    break
        except queue.Empty:
            pass
        return got

    def close(self, kill: bool) -> None:
        if not kill:
            for q in self.jobs:
                q.put(None)
        for p in self.procs:
            p.join(timeout=0 if kill else 5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


_POOLS: dict = {}


@atexit.register
def _close_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close(kill=False)


def run_ranks(target: str, world: int, *args, timeout: float = 90.0, spoils_group: bool = False):
    pool = _POOLS.pop(world, None) or _Pool(world)
    got = pool.run(target, args, timeout)
    healthy = len(got) == world and all(ok for ok, _ in got.values())
    if healthy and not spoils_group:
        _POOLS[world] = pool  # kept for the next call
    else:
        pool.close(kill=not healthy)
    failed = {r: v for r, (ok, v) in got.items() if not ok}
    if failed:
        pytest.fail("\n".join(f"--- rank {r} raised:\n{tb}" for r, tb in sorted(failed.items())))
    if len(got) < world:
        pytest.fail(f"{target}: only ranks {sorted(got)} of {world} finished within {timeout:.0f} s")
    return [pickle.loads(got[r][1]) for r in range(world)]
