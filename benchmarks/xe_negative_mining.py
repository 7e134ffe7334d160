"""Cross-Example Negative Mining (docs/spec.md §2.2 with top_k = B), fp32, forward+backward, self mode with 4 samples
per class.

Providers: the reference (materialises S, selects with a global sort), the fused kernels (flashdml-cpu: one
hardest-negatives pass over S, then O((k + |P|)·d) gathers forward and backward), torch.compile(reference), and
plain XE fused (`flashdml-cpu-plain-xe`: the same loss without mining, for scale).
FLOPs per call = 2·B·M·d (the one S pass the mined loss needs).
"""
from __future__ import annotations

import torch

from .cross_example_softmax import TEMPERATURE
from .harness import Op, Provider, flashdml_module, loss_providers, loss_runner

F32 = 4


def make_inputs(shape: dict, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape["B"], shape["d"], generator=g).to(device).requires_grad_()
    labels = (torch.arange(shape["B"]) // 4).to(device)
    return (x,), {"labels": labels, "temperature": TEMPERATURE, "top_k": shape["B"]}


def _plain(shape, dev):
    args, kw = make_inputs(shape, dev)
    kw.pop("top_k")
    return loss_runner(flashdml_module().cross_example_softmax, args, kw, "cpu")


def _inputs(s):
    return 4 * s["B"] * s["d"] * F32


def _mem_reference(s):
    return 9 * s["B"] * s["B"] * F32 + _inputs(s)


PROVIDERS = loss_providers(
    "cross_example_softmax", make_inputs, mem_reference=_mem_reference, mem_fused=_inputs,
    cpu_extra=(Provider("flashdml-cpu-plain-xe", _plain, device="cpu", mem_bytes=_inputs),),
)
QUICK = ["reference", "flashdml-cpu", "flashdml-cpu-plain-xe", "reference-cuda", "flashdml-triton",
         "flashdml-cuda"]


def _sweep(bs, d=128, only=None):
    return [{"B": b, "d": d, **({"only": only} if only else {})} for b in bs]


SHAPES = {
    "quick": _sweep([1024], only=QUICK),  # `make bench`: one shape
    "targets": _sweep([4096]) + _sweep([16384], only=["reference", "flashdml-cpu", "flashdml-cpu-plain-xe"]),
}
SHAPES["full"] = SHAPES["targets"] + _sweep([32768], only=["flashdml-cpu", "flashdml-cpu-plain-xe"])

OP = Op(
    name="xe_negative_mining",
    shapes=SHAPES,
    providers=PROVIDERS,
    flops=lambda s: 2.0 * s["B"] * s["B"] * s["d"],
    unit="fwd+bwd",
    sweep="B",
    plot_where={"d": 128},
    label=lambda s: f"B=M={s['B']} d={s['d']} top_k=B self 4/class",
)
