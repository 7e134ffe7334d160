"""Every compiled flashdml op once, forward and backward, on small CUDA tensors: the program `make gpu-check` runs
under compute-sanitizer (memcheck, racecheck). Shapes are small and ragged against the tile sizes (B = 37, d = 33)
so partial tiles are exercised while the sanitizer's slowdown stays affordable.

    python tools/gpu_sanitize_cases.py [--backends cuda,triton] [--list]

CASES maps each op of flashdml._schemas.SCHEMAS to the public call that reaches it (tests/test_gpu_check.py checks
that every schema has a case). Exit status: 0 when every case ran, 1 when one raised (each failure is printed),
2 without a CUDA device (`--list` needs none).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

B, D, K = 37, 33, 5


def _inputs(dev, grad=True):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g).to(dev).requires_grad_(grad)
    y = torch.randn(B, D, generator=g).to(dev).requires_grad_(grad)
    labels = (torch.arange(B) // 4).to(dev)
    return x, y, labels


def _backward(loss, *tensors):
    import torch

    torch.autograd.grad(loss * 1.5, [t for t in tensors if t.requires_grad])


def case_batch_softmax(fd, dev):
    x, y, labels = _inputs(dev)
    _backward(fd.batch_softmax(x, y, labels, temperature=0.1), x, y)


def case_xent(fd, dev):
    x, _, labels = _inputs(dev)
    _backward(fd.cross_example_softmax(x, labels=labels, temperature=0.1), x)
    _backward(fd.ntxent(x, labels, temperature=0.1), x)


def case_hinge_pair(fd, dev):
    x, _, labels = _inputs(dev)
    _backward(fd.threshold_consistent_margin(x, labels, pos_margin=0.9, neg_margin=0.3), x)
    _backward(fd.contrastive_margin(x, labels), x)


def case_triplet(fd, dev):
    x, y, labels = _inputs(dev)
    _backward(fd.triplet_margin(x, labels, margin=0.2), x)
    _backward(fd.triplet_margin(x, labels, y, labels, margin=0.2), x, y)


def case_knn(fd, dev):
    x, y, _ = _inputs(dev, grad=False)
    fd.knn(x, y, K)


def case_hardest_negatives(fd, dev):
    x, _, labels = _inputs(dev, grad=False)
    fd.hardest_negatives(x, labels=labels, k=K)


def case_contextual(fd, dev):
    x, _, labels = _inputs(dev)
    _backward(fd.contextual_loss(x, labels, k=K), x)


def case_metrics(fd, dev):
    x, _, labels = _inputs(dev, grad=False)
    fd.metrics.evaluate(x, labels, metrics=("recall_at_k", "map_at_r", "opis", "pr_auc"), ks=(1, 4),
                        progress=False)


# op name in SCHEMAS -> the case that calls it (forward and, where the op has one, backward)
CASES = {
    "batch_softmax_fwd": case_batch_softmax, "batch_softmax_bwd": case_batch_softmax,
    "xent_fwd": case_xent, "xent_bwd": case_xent,
    "hinge_pair_fwd": case_hinge_pair, "hinge_pair_bwd": case_hinge_pair,
    "triplet_fwd": case_triplet, "triplet_bwd": case_triplet,
    "knn_fwd": case_knn,
    "hardest_negatives_fwd": case_hardest_negatives,
    "contextual_fwd": case_contextual, "contextual_bwd": case_contextual,
    "metrics_pass": case_metrics,
}


def unique_cases():
    """The distinct case functions, in CASES order, with the op names each covers."""
    out: dict = {}
    for op, fn in CASES.items():
        out.setdefault(fn, []).append(op)
    return list(out.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="cuda,triton", help="comma-separated fused backends (default cuda,triton)")
    ap.add_argument("--list", action="store_true", help="print op name -> case, run nothing")
    args = ap.parse_args(argv)
    if args.list:
        for op, fn in CASES.items():
            print(f"{op}\t{fn.__name__}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_sanitize_cases: no CUDA device (torch.cuda.is_available() is False)")
        return 2
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    import flashdml as fd

    failed = 0
    for backend in args.backends.split(","):
        ok, why = fd.available_backends().get(backend, (False, "unknown backend"))
        if not ok:
            print(f"FAIL {backend}: backend unavailable ({why})")
            failed += 1
            continue
        for fn, ops in unique_cases():
            try:
                with fd.backend(backend):
                    fn(fd, "cuda")
                torch.cuda.synchronize()
                print(f"ok   {backend:7s} {fn.__name__} ({', '.join(ops)})", flush=True)
            except Exception:  # noqa: BLE001 — report every case, fail at the end
                failed += 1
                print(f"FAIL {backend:7s} {fn.__name__} ({', '.join(ops)})\n{traceback.format_exc()}", flush=True)
    print(f"gpu_sanitize_cases: {failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
