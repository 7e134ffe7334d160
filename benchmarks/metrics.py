"""Gallery-scale evaluation (docs/spec.md §3): recall@{1,10,100}, MAP@R, OPIS (+ε-OPIS) and PR-AUC, self mode, fp32.

Providers:
* `flashdml-cpu`: `fd.metrics.evaluate` — one streaming pass (C++ tiles, top-k lists + histograms).
* `gemm-only`: the N×N GEMM alone, x̂ x̂ᵀ in row blocks of 1024 into one reused buffer (the lower bound the
  fused pass is measured against: target ≤ 1.5× this, same run).
* `reference`: `fd.reference.evaluate` (materialises N×N in float64; skipped above the memory cap).
* `pml-faiss`: pytorch-metric-learning's AccuracyCalculator (precision_at_1 = recall@1, MAP@R) with its default
  faiss kNN (k = max class size); it has no recall@10/100 beyond that k, OPIS or PR-AUC, so it does less work.

FLOPs per call = 2·N²·d (the S GEMM).
"""
from __future__ import annotations

import importlib.util

import torch

from .gpu import metrics_gpu_providers
from .harness import Op, Provider, flashdml_check, flashdml_module

KS = (1, 10, 100)
METRICS = ("recall_at_k", "map_at_r", "opis", "pr_auc")
F32, F64 = 4, 8
BLOCK = 1024


def make_inputs(shape: dict):
    """N rows, T classes of N / T samples each (shuffled), clustered so the metrics are non-trivial."""
    g = torch.Generator().manual_seed(0)
    N, d, T = shape["N"], shape["d"], shape["T"]
    labels = torch.arange(N) % T
    labels = labels[torch.randperm(N, generator=g)]
    centres = torch.randn(T, d, generator=g)
    x = centres[labels] + 1.5 * torch.randn(N, d, generator=g)
    return x, labels


def _fused(shape, dev):
    fd = flashdml_module()
    x, labels = make_inputs(shape)

    def run():
        with fd.backend("cpu"):
            return fd.metrics.evaluate(x, labels, metrics=METRICS, ks=KS, progress=False)

    return run


def _reference(shape, dev):
    fd = flashdml_module()
    x, labels = make_inputs(shape)
    return lambda: fd.reference.evaluate(x, labels, metrics=METRICS, ks=KS)


def _gemm(shape, dev):
    x, _ = make_inputs(shape)
    xn = torch.nn.functional.normalize(x, dim=1)
    out = torch.empty(BLOCK, x.shape[0])

    def run():
        for r0 in range(0, xn.shape[0], BLOCK):
            rows = xn[r0:r0 + BLOCK]
            torch.mm(rows, xn.t(), out=out[:rows.shape[0]])
        return out

    return run


def _pml(shape, dev):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, labels = make_inputs(shape)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                              device=torch.device("cpu"))
    return lambda: calc.get_accuracy(x, labels)


def _pml_ok():
    for mod in ("pytorch_metric_learning", "faiss"):
        if importlib.util.find_spec(mod) is None:
            return False, f"{mod} is not installed"
    return True, ""


def _inputs(s):
    return s["N"] * s["d"] * F32


PROVIDERS = [
    Provider("reference", _reference, flashdml_check("evaluate"), "cpu",
             lambda s: 8 * s["N"] * s["N"] * F64 + _inputs(s), reference=True),
    Provider("flashdml-cpu", _fused, flashdml_check("metrics", "cpu"), "cpu", lambda s: 4 * _inputs(s) + 2 * 2 ** 30),
    Provider("gemm-only", _gemm, lambda: (True, ""), "cpu", lambda s: BLOCK * s["N"] * F32 + 2 * _inputs(s)),
    Provider("pml-faiss", _pml, _pml_ok, "cpu", lambda s: 4 * s["N"] * s["N"] * F32 / 8 + 8 * _inputs(s)),
    # `--gpu` only: the same streaming pass on CUDA tensors (benchmarks/gpu.py)
    *metrics_gpu_providers(make_inputs, METRICS, KS, _inputs),
]


def _label(s):
    return f"N={s['N']} d={s['d']} T={s['T']} self"


SHAPES = {
    # `make bench`: one shape, small: the reference evaluate takes seconds per call even at N = 512
    "quick": [{"N": 512, "d": 128, "T": 102}],
    # the target shape: N = 60 000, d = 512, 12 000 classes (the reference does not fit); N = 8192 with all
    "targets": [{"N": 8192, "d": 512, "T": 1638}, {"N": 60000, "d": 512, "T": 12000}],
}
SHAPES["full"] = [{"N": 2048, "d": 128, "T": 410}, {"N": 4096, "d": 128, "T": 820}] + SHAPES["targets"]

OP = Op(
    name="metrics",
    shapes=SHAPES,
    providers=PROVIDERS,
    flops=lambda s: 2.0 * s["N"] * s["N"] * s["d"],
    unit="evaluate",
    sweep="N",
    plot_where={"d": 128},
    label=_label,
)
