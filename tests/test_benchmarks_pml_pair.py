"""Benchmark modules of pytorch-metric-learning's pair losses (supcon, multi_similarity, circle, triplet_margin):
listed, the declared shapes and providers, the timed inputs computing the same loss as pml's class with the same
arguments, the memory predictions, and fused GPU providers reported "not run" while the op has no such kernel."""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flashdml.reference as R  # noqa: E402
from benchmarks import OPS, harness, pml_pair  # noqa: E402
from benchmarks.harness import GiB  # noqa: E402

NAMES = {"supcon": "SupConLoss", "multi_similarity": "MultiSimilarityLoss", "circle": "CircleLoss",
         "triplet_margin": "TripletMarginLoss"}
CAP = 12 * GiB
FUSED = {"flashdml-cpu", "flashdml-triton", "flashdml-cuda"}


def _providers_at(op, mode, B):
    return {p.name for s, p in harness.cells(op, mode) if s["B"] == B}


@pytest.mark.parametrize("name", NAMES)
def test_declares_the_shapes_and_providers(name):
    assert name in OPS
    op = harness.load_op(name)
    pml = f"pml-{NAMES[name]}"
    assert op.name == name and op.flops({"B": 1024, "d": 512}) == 8 * 1024 * 1024 * 512
    labels = [op.shape_label(s) for s in op.shapes["targets"]]
    assert labels == ["B=M=1024 d=512 self 4/class", "B=M=4096 d=512 self 4/class", "B=M=16384 d=512 self 4/class"]
    for B in (1024, 4096):
        assert _providers_at(op, "targets", B) >= {"reference", "flashdml-cpu", "torch.compile(reference)", pml}
    assert _providers_at(op, "targets", 16384) == FUSED
    assert [op.shape_label(s) for s in op.shapes["quick"]] == ["B=M=128 d=512 self 4/class"]  # one small cell
    assert {p.name for s, p in harness.cells(op, "quick") if p.device == "cpu"} == {"reference", "flashdml-cpu", pml}


@pytest.mark.parametrize("name", NAMES)
def test_timed_inputs_are_pmls_loss(name):
    """make_inputs' arguments given to the reference and to pml's class (the peer's setup) give the same loss:
    the benchmark compares the same computation."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    mod = importlib.import_module(f"benchmarks.{name}")
    op = mod.OP
    make_inputs = pml_pair.input_maker(mod.KWARGS)
    (x, labels), kw = make_inputs({"B": 64, "d": 16}, "cpu")
    want = getattr(pml_losses, NAMES[name])(**kw)(x, labels)
    got = getattr(R, op.name)(x, labels, **kw)
    assert want.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert torch.equal(labels, torch.arange(64) // 4) and x.requires_grad


def test_memory_predictions():
    """Every targets-mode CPU cell is predicted under the 12 GiB cap (so pml runs at B = 4096), and pml's
    triplet list is what dominates its prediction (1 GiB cube + 64 B a triplet at B = 1024)."""
    for name in NAMES:
        op = harness.load_op(name)
        for shape, prov in harness.cells(op, "targets"):
            s = {k: v for k, v in shape.items() if k != "only"}
            if prov.device == "cpu" and prov.mem_bytes is not None:
                assert prov.mem_bytes(s) < CAP, (name, s, prov.name)
    tm = harness.load_op("triplet_margin").provider("pml-TripletMarginLoss").mem_bytes
    assert 1.0 * GiB < tm({"B": 1024, "d": 512}) < 1.5 * GiB  # measured 1.1 GiB
    assert 2.5 * GiB < tm({"B": 4096, "d": 512}) < 4 * GiB  # 50 M triplets, the anchor loop (no cube)
    ref = harness.load_op("supcon").provider("reference").mem_bytes
    assert ref({"B": 16384, "d": 512}) > 5 * GiB  # why B = 16384 is fused only


def test_gpu_providers_need_a_kernel_of_the_family(monkeypatch):
    """flashdml-triton / flashdml-cuda are "not run" unless the op's family lists that backend."""
    check = pml_pair._family_has("supcon", "triton", lambda: (True, ""))
    registry = importlib.import_module("flashdml.ops.registry")

    class Fam:
        backends = ("cpu",)

    monkeypatch.setattr(registry, "family_of", lambda op: Fam)
    ok, reason = check()
    assert not ok and "no triton kernel" in reason
    Fam.backends = ("cpu", "triton")
    assert check() == (True, "")
    assert pml_pair._family_has("supcon", "cuda", lambda: (False, "no CUDA device"))() == (False, "no CUDA device")
