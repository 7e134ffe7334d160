"""Spawning gloo ranks on 127.0.0.1 from a test, bounded in time.

``run_ranks("module:function", world, *args)`` starts ``world`` fresh processes (spawn), initialises a gloo
process group over loopback in each, imports ``module`` (a module of tests/, e.g. ``"test_distributed_losses"``)
and calls ``function(rank, world, *args)``. It returns the list of the functions' return values in rank order
(they must pickle), or fails the test with every rank's traceback when a rank raised, and kills them all when
they take longer than ``timeout`` seconds. Starting a rank costs seconds (torch and flashdml imports), so a test
file should run many cases in one spawn rather than one spawn per case.
"""
from __future__ import annotations

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


def _rank_main(rank: int, world: int, port: int, target: str, args: tuple, results) -> None:
    for path in (TESTS_DIR, PYTHON_DIR):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import importlib

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        module, fn = target.split(":")
        value = getattr(importlib.import_module(module), fn)(rank, world, *args)
        # plain pickle copies tensors' bytes; the queue's own pickler would hand over shared-memory file
        # descriptors, which are lost when this process exits before the parent has received them
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(target: str, world: int, *args, timeout: float = 90.0):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, target, args, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(world):
            rank, ok, value = results.get(timeout=timeout)
            got[rank] = (ok, value)
            if not ok:
                break
    except queue.Empty:
        pass
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    failed = {r: v for r, (ok, v) in got.items() if not ok}
    if failed:
        pytest.fail("\n".join(f"--- rank {r} raised:\n{tb}" for r, tb in sorted(failed.items())))
    if len(got) < world:
        pytest.fail(f"{target}: only ranks {sorted(got)} of {world} finished within {timeout:.0f} s")
    return [pickle.loads(got[r][1]) for r in range(world)]
