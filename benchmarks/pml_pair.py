"""Shared pieces of the benchmarks of pytorch-metric-learning's pair losses (supcon.py, multi_similarity.py,
circle.py, triplet_margin.py): fp32, forward+backward, self mode, d = 512, labels arange(B) // 4 (4 samples per
class, in order).

Providers: the reference, the fused kernels (flashdml-cpu; flashdml-triton / flashdml-cuda on CUDA tensors, listed
as "not run" while the op's family has no kernel for that backend), torch.compile(reference), and the peer
`pml-<Class>` = pytorch-metric-learning's class with the same arguments, called as `loss(x, labels)`.

Shapes: quick, one small cell (reference, flashdml-cpu, pml); targets, B = 1024 and 4096 with every provider and
B = 16384 for the fused kernels only; full adds 2048 and 8192.
"""
from __future__ import annotations

import dataclasses
import importlib

import torch

from .harness import FUSED, Op, Provider, loss_providers, loss_runner, module_available, pair_buffers, sweep

F32 = 4
PER_CLASS = 4
D = 512


def inputs_bytes(s) -> float:
    """x, its gradient and the autograd copies: ~4 fp32 B×d buffers."""
    return 4 * s["B"] * s["d"] * F32


def input_maker(kwargs: dict):
    """make_inputs(shape, device) -> ((x, labels), kwargs): self mode, labels = arange(B) // 4."""

    def make_inputs(shape: dict, device: str):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape["B"], shape["d"], generator=g).to(device).requires_grad_()
        labels = (torch.arange(shape["B"]) // PER_CLASS).to(device)
        return (x, labels), dict(kwargs)

    return make_inputs


def _family_has(fn_name: str, backend: str, available):
    """available() of a fused provider: the usual check, and the op's family lists ``backend``."""

    def check():
        ok, reason = available()
        if not ok:
            return ok, reason
        try:
            registry = importlib.import_module("flashdml.ops.registry")
            backends = registry.family_of(fn_name).backends
        except Exception as exc:  # noqa: BLE001 - an op the registry does not know runs the reference
            return False, f"flashdml.{fn_name} has no compiled family ({type(exc).__name__}: {exc})"
        return (True, "") if backend in backends else (False, f"no {backend} kernel for {fn_name}")

    return check


def make_op(name: str, pml_class: str, kwargs: dict, *, mem_reference, mem_compiled, mem_pml, pml_kwargs=None,
            quick_b: int = 128, label_extra: str = "", flops=None) -> Op:
    """The Op of a pml pair loss ``flashdml.<name>(x, labels, **kwargs)`` against ``pml.losses.<pml_class>``."""
    make_inputs = input_maker(kwargs)
    pml_kwargs = dict(kwargs if pml_kwargs is None else pml_kwargs)

    def pml_setup(shape: dict, device: str):
        losses = importlib.import_module("pytorch_metric_learning.losses")
        (x, labels), _ = make_inputs(shape, device)
        return loss_runner(getattr(losses, pml_class)(**pml_kwargs), (x, labels), {})

    pml_name = f"pml-{pml_class}"
    pml = Provider(pml_name, pml_setup, module_available("pytorch_metric_learning", "pytorch-metric-learning"),
                   "cpu", mem_pml)
    providers = loss_providers(name, make_inputs, mem_reference=mem_reference, mem_compiled=mem_compiled,
                               mem_fused=lambda s: inputs_bytes(s) + 64 * 1024**2, cpu_extra=(pml,))
    providers = [dataclasses.replace(p, available=_family_has(name, p.name.split("-")[1], p.available))
                 if p.name in ("flashdml-triton", "flashdml-cuda") else p for p in providers]

    def _sweep(bs, only=None):
        return sweep(bs, D, only)

    shapes = {
        "quick": _sweep([quick_b], only=["reference", "flashdml-cpu", pml_name, "reference-cuda", "flashdml-triton",
                                         "flashdml-cuda"]),
        "targets": _sweep([1024, 4096]) + _sweep([16384], only=FUSED),
    }
    shapes["full"] = shapes["targets"] + _sweep([2048, 8192])
    return Op(
        name=name,
        shapes=shapes,
        providers=providers,
        flops=flops or (lambda s: 8.0 * s["B"] * s["B"] * s["d"]),
        unit="fwd+bwd",
        sweep="B",
        plot_where={"d": D},
        label=lambda s: f"B=M={s['B']} d={s['d']} self 4/class{label_extra}",
    )


__all__ = ["make_op", "input_maker", "inputs_bytes", "pair_buffers", "F32", "PER_CLASS", "D"]
