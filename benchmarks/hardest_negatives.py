"""Hardest negatives (docs/spec.md §1.3, Cross-Example Negative Mining's selection), forward only, fp32, self mode with
4 samples per class.

Providers: the reference (materialises S and sorts every negative), the fused kernels (flashdml-cpu;
flashdml-triton and flashdml-cuda on CUDA tensors), and `chunked-mm-topk`: row blocks of 1024 through torch.mm, the
non-negatives masked to -inf, torch.topk of the block merged with the running top k (O(1024·M + k) memory).

The target shape: B = M = 16384, d = 128, k = 16384; target peak < 256 MiB above the inputs.
FLOPs per call = 2·B·M·d (one S GEMM; the CPU kernel's one-pass strategy does exactly that).
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from .harness import Op, Provider, flashdml_check, flashdml_module

BLOCK = 1024
F32 = 4


def make_inputs(shape: dict, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape["B"], shape["d"], generator=g).to(device)
    labels = (torch.arange(shape["B"]) // 4).to(device)
    return x, labels


def chunked_hardest_negatives(x, labels, k: int, block: int = BLOCK):
    """Plain-PyTorch streaming selection (self mode): per row block the top k negatives, merged with the running
    top k. Values only ordered by torch.topk (its tie order is not docs/spec.md's)."""
    xn = F.normalize(x, dim=1)
    B = xn.shape[0]
    best_v = xn.new_empty(0)
    best_i = torch.empty(0, dtype=torch.long, device=x.device)
    for r0 in range(0, B, block):
        s = torch.mm(xn[r0:r0 + block], xn.t())
        s.masked_fill_(labels[r0:r0 + block, None] == labels[None, :], float("-inf"))
        v, i = torch.topk(s.reshape(-1), min(k, s.numel()))
        v, j = torch.topk(torch.cat([best_v, v]), min(k, best_v.numel() + v.numel()))
        best_i = torch.cat([best_i, i + r0 * B])[j]
        best_v = v
    return best_v, best_i // B, best_i % B


def _reference(shape, dev):
    ref = importlib.import_module("flashdml.reference")
    x, labels = make_inputs(shape, dev)
    return lambda: ref.hardest_negatives(x, labels=labels, k=shape["k"])


def _fused(backend):
    def setup(shape, dev):
        fd = flashdml_module()
        x, labels = make_inputs(shape, dev)

        def run():
            with fd.backend(backend):
                return fd.hardest_negatives(x, labels=labels, k=shape["k"])
        return run
    return setup


def _chunked(shape, dev):
    x, labels = make_inputs(shape, dev)
    return lambda: chunked_hardest_negatives(x, labels, shape["k"])


def _inputs(s):
    return 2 * s["B"] * s["d"] * F32 + 24 * s["k"]


def _mem_reference(s):  # S, the masks, the candidate list (int64) and its values, the sort's output
    return s["B"] * s["B"] * (F32 + 2 + 8 + F32 + 8 + F32) + _inputs(s)


def _mem_chunked(s):
    return 3 * min(BLOCK, s["B"]) * s["B"] * F32 + 8 * s["k"] * 4 + _inputs(s)


PROVIDERS = [
    Provider("reference", _reference, flashdml_check("hardest_negatives"), "cpu", _mem_reference, reference=True),
    Provider("flashdml-cpu", _fused("cpu"), flashdml_check("hardest_negatives", "cpu"), "cpu", _inputs),
    Provider("chunked-mm-topk", _chunked, device="cpu", mem_bytes=_mem_chunked),
    Provider("reference-cuda", _reference, flashdml_check("hardest_negatives"), "cuda", _mem_reference,
             reference=True),
    Provider("flashdml-triton", _fused("triton"), flashdml_check("hardest_negatives", "triton"), "cuda", _inputs),
    Provider("flashdml-cuda", _fused("cuda"), flashdml_check("hardest_negatives", "cuda"), "cuda", _inputs),
]


def _label(s):
    return f"B=M={s['B']} d={s['d']} k={s['k']} self 4/class"


def _shape(B, d=128, k=None, only=None):
    return {"B": B, "d": d, "k": B if k is None else k, **({"only": only} if only else {})}


SHAPES = {
    "quick": [_shape(2048)],  # `make bench`: one shape
    "targets": [_shape(16384), _shape(16384, k=1 << 20)] + [_shape(b) for b in (2048, 4096, 8192)],
}
SHAPES["full"] = SHAPES["targets"] + [_shape(32768)]

OP = Op(
    name="hardest_negatives",
    shapes=SHAPES,
    providers=PROVIDERS,
    flops=lambda s: 2.0 * s["B"] * s["B"] * s["d"],
    unit="fwd",
    sweep="B",
    plot_where={"d": 128},
    label=_label,
)
