"""kNN (docs/spec.md §1.2): per query the k most similar references (cosine), forward only, fp32.

Providers: the reference (materialises the B×M matrix and sorts it), the fused kernels (flashdml-cpu; flashdml-triton
and flashdml-cuda on CUDA tensors), `faiss-IndexFlatIP` (faiss-cpu's exact inner-product search on the same
threads, rows normalised beforehand and the index built outside the timed call — both in faiss's favour), and
`chunked-mm-topk`: row blocks of 1024 queries through torch.mm + torch.topk (O(1024·M) memory).

The target shape: 10 000 queries × 100 000 references, d = 128, k = 10 (also k = 100, 1000). Targets: no slower
than faiss, >= 1.5x faster than chunked mm + topk. FLOPs per call = 2·B·M·d (the S GEMM).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .harness import Op, Provider, flashdml_check, flashdml_module

BLOCK = 1024
F32 = 4


def make_inputs(shape: dict, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape["B"], shape["d"], generator=g).to(device)
    y = torch.randn(shape["M"], shape["d"], generator=g).to(device)
    return x, y


def chunked_knn(x, y, k: int, block: int = BLOCK):
    """Plain-PyTorch streaming cosine kNN: normalise, then torch.mm + torch.topk per row block."""
    xn, yn = F.normalize(x, dim=1), F.normalize(y, dim=1)
    vals, idx = [], []
    for r0 in range(0, xn.shape[0], block):
        v, i = torch.topk(torch.mm(xn[r0:r0 + block], yn.t()), k, dim=1)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def _reference(shape, dev):
    ref = importlib.import_module("flashdml.reference")
    x, y = make_inputs(shape, dev)
    return lambda: ref.knn(x, y, shape["k"])


def _fused(backend):
    def setup(shape, dev):
        fd = flashdml_module()
        x, y = make_inputs(shape, dev)

        def run():
            with fd.backend(backend):
                return fd.knn(x, y, shape["k"])
        return run
    return setup


def _chunked(shape, dev):
    x, y = make_inputs(shape, dev)
    return lambda: chunked_knn(x, y, shape["k"])


def _faiss_ok():
    return (True, "") if importlib.util.find_spec("faiss") else (False, "faiss-cpu is not installed")


def _faiss(shape, dev):
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    x, y = make_inputs(shape, dev)
    xn = F.normalize(x, dim=1).numpy()
    index = faiss.IndexFlatIP(shape["d"])
    index.add(F.normalize(y, dim=1).numpy())
    return lambda: index.search(xn, shape["k"])


def _inputs(s):
    return 2 * (s["B"] + s["M"]) * s["d"] * F32 + s["B"] * s["k"] * 12


def _mem_reference(s):  # S, the sorted values and their int64 order, the candidate mask
    return s["B"] * s["M"] * (F32 + F32 + 8 + 8 + 1) + _inputs(s)


def _mem_chunked(s):
    return 3 * min(BLOCK, s["B"]) * s["M"] * F32 + _inputs(s)


PROVIDERS = [
    Provider("reference", _reference, flashdml_check("knn"), "cpu", _mem_reference, reference=True),
    Provider("flashdml-cpu", _fused("cpu"), flashdml_check("knn", "cpu"), "cpu", _inputs),
    Provider("faiss-IndexFlatIP", _faiss, _faiss_ok, "cpu", _inputs),
    Provider("chunked-mm-topk", _chunked, device="cpu", mem_bytes=_mem_chunked),
    Provider("reference-cuda", _reference, flashdml_check("knn"), "cuda", _mem_reference, reference=True),
    Provider("flashdml-triton", _fused("triton"), flashdml_check("knn", "triton"), "cuda", _inputs),
    Provider("flashdml-cuda", _fused("cuda"), flashdml_check("knn", "cuda"), "cuda", _inputs),
]


def _label(s):
    return f"B={s['B']} M={s['M']} d={s['d']} k={s['k']}"


def _shape(B, M, d=128, k=10, only=None):
    return {"B": B, "M": M, "d": d, "k": k, **({"only": only} if only else {})}


SHAPES = {
    "quick": [_shape(1000, 10_000, k=10)],  # `make bench`: one shape
    # the target shape with every provider (the reference records its memory skip), then a sweep over M
    "targets": [_shape(10_000, 100_000, k=k) for k in (10, 100, 1000)]
    + [_shape(10_000, m, k=10) for m in (10_000, 30_000)],
}
SHAPES["full"] = SHAPES["targets"] + [_shape(10_000, 300_000, k=10)]

OP = Op(
    name="knn",
    shapes=SHAPES,
    providers=PROVIDERS,
    flops=lambda s: 2.0 * s["B"] * s["M"] * s["d"],
    unit="fwd",
    sweep="M",
    plot_where={"B": 10_000, "d": 128, "k": 10},
    label=_label,
)
