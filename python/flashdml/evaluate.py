"""Command line: retrieval and threshold-consistency metrics of saved embeddings (docs/spec.md §3).

    python -m flashdml.evaluate EMBEDDINGS LABELS [--gallery G --gallery-labels GL]
                                [--metrics recall_at_k map_at_r pr_auc opis] [--ks 1 10 100] [--json OUT]

EMBEDDINGS / G are ``[N, d]`` float arrays, LABELS / GL ``[N]`` integer arrays, as ``.npy`` or ``.pt`` (a tensor,
or a dict with one tensor). Without ``--gallery`` it is self mode (each query retrieves from the others). Runs
:func:`flashdml.metrics.evaluate` (one streaming pass), prints a table and optionally writes the dict as JSON.
OPIS needs self mode: with ``--gallery`` the default metric list drops it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Optional

import torch

DEFAULT_METRICS = ("recall_at_k", "map_at_r", "pr_auc", "opis")


def load_array(path: str, what: str) -> torch.Tensor:
    """A tensor from a .npy or .pt file (a .pt may hold a tensor, an array or a dict with exactly one tensor)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path, allow_pickle=False))
    if ext in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
            if len(tensors) != 1:
                raise ValueError(f"{what}: {path!r} holds a dict with {len(tensors)} tensors; save exactly one")
            obj = tensors[0]
        if not isinstance(obj, torch.Tensor):
            obj = torch.as_tensor(obj)
        return obj
    raise ValueError(f"{what}: {path!r} is neither .npy nor .pt")


def _labels(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.is_floating_point():
        if not bool((t == t.round()).all()):
            raise ValueError(f"{what} must hold integer class ids")
        t = t.long()
    return t.reshape(-1) if t.dim() == 2 and 1 in t.shape else t


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m flashdml.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("embeddings", help="query embeddings [N, d] (.npy or .pt)")
    ap.add_argument("labels", help="query labels [N] (.npy or .pt)")
    ap.add_argument("--gallery", help="separate gallery embeddings [M, d]; default: self mode")
    ap.add_argument("--gallery-labels", help="gallery labels [M] (required with --gallery)")
    ap.add_argument("--metrics", nargs="+", choices=("recall_at_k", "map_at_r", "pr_auc", "opis", "eps_opis"),
                    help=f"default: {' '.join(DEFAULT_METRICS)} (without opis when a gallery is given)")
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 10, 100], help="k values of recall@k (default 1 10 100)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    ap.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return ap.parse_args(argv)


def format_table(results: dict) -> str:
    width = max(len(k) for k in results) if results else 6
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    for k, v in results.items():
        lines.append(f"{k:<{width}}  {'nan' if math.isnan(v) else f'{v:.6f}'}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    if (args.gallery is None) != (args.gallery_labels is None):
        print("error: --gallery and --gallery-labels go together", file=sys.stderr)
        return 2
    import flashdml as fd

    try:
        x = load_array(args.embeddings, "EMBEDDINGS")
        labels = _labels(load_array(args.labels, "LABELS"), "LABELS")
        y = load_array(args.gallery, "--gallery") if args.gallery else None
        ref_labels = _labels(load_array(args.gallery_labels, "--gallery-labels"), "--gallery-labels") if y is not None else None
        if y is not None and y.dtype != x.dtype and x.is_floating_point() and y.is_floating_point():
            common = torch.promote_types(x.dtype, y.dtype)  # e.g. float32 queries, float64 gallery
            x, y = x.to(common), y.to(common)
        metrics = args.metrics or tuple(m for m in DEFAULT_METRICS if y is None or m not in ("opis", "eps_opis"))
        ks = args.ks if any(m == "recall_at_k" for m in metrics) else (1,)
        results = fd.metrics.evaluate(x, labels, metrics=metrics, ks=ks, y=y, ref_labels=ref_labels,
                                      progress=False if args.no_progress else None)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mode = "self mode" if y is None else f"gallery of {y.shape[0]}"
    print(f"{x.shape[0]} queries, d = {x.shape[1]}, {mode}")
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: (None if math.isnan(v) else v) for k, v in results.items()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
