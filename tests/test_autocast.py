"""Every public op under ``torch.autocast("cpu", dtype=bf16 / fp16)``, at B <= 256 (the contextual loss's one-tile
path) and B > 256 (its streamed path): it runs, its result and the gradient are finite and within the format's
precision of the fp32 result, and the gradient comes back in the input's dtype.

The fused ops take rows as given (fp32 accumulation) and run with autocast off inside, so with fp32 inputs they
give exactly the fp32 result; ``similarity`` (plain PyTorch) runs its GEMM in the autocast dtype. Low-precision
inputs differ from fp32 ones by one rounding of each entry, which sets the tolerance: a few units of the
format's epsilon, relative to the result's scale (gradients: against the fp32 op on the rounded rows, since
a selection or a hinge can flip between a row and its rounding).
"""
from __future__ import annotations

import pytest
import torch

import flashdml as fd

from helpers import clustered

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

D = 16
OPS = {
    "similarity": lambda x, y, lab: fd.similarity(x, y),
    "knn": lambda x, y, lab: fd.knn(x, y, k=5)[0],
    "hardest_negatives": lambda x, y, lab: fd.hardest_negatives(x, labels=lab, k=64)[0],
    "batch_softmax": lambda x, y, lab: fd.batch_softmax(x, y, temperature=0.1, symmetric=True),
    "ntxent": lambda x, y, lab: fd.ntxent(x, lab, temperature=0.1),
    "cross_example_softmax": lambda x, y, lab: fd.cross_example_softmax(x, labels=lab, temperature=0.1),
    "cross_example_softmax_top_k": lambda x, y, lab: fd.cross_example_softmax(x, labels=lab, temperature=0.1,
                                                                             top_k=64),
    "threshold_consistent_margin": lambda x, y, lab: fd.threshold_consistent_margin(x, lab, pos_margin=0.8),
    "contrastive_margin": lambda x, y, lab: fd.contrastive_margin(x, lab),
    "contextual_loss": lambda x, y, lab: fd.contextual_loss(x, lab, k=4),
}
DTYPES = [torch.bfloat16] + ([torch.float16] if torch.amp.is_autocast_available("cpu") else [])


def _value_and_grad(fn, x, y, lab):
    x = x.clone().requires_grad_()
    out = fn(x, y, lab)
    weights = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    (gx,) = torch.autograd.grad((out.float() * weights).sum(), x)
    return out, gx


@pytest.mark.parametrize("B", [64, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(OPS))
def test_op_under_cpu_autocast(name, dtype, B):
    fn = OPS[name]
    x, lab = clustered(B, D, B // 4, seed=1)
    y, _ = clustered(B, D, B // 4, seed=2)
    want, want_gx = _value_and_grad(fn, x, y, lab)
    eps = torch.finfo(dtype).eps
    for inputs in (x, x.to(dtype)):  # fp32 rows (autocast's usual case) and rows already in the low format
        with torch.autocast("cpu", dtype=dtype):
            got, gx = _value_and_grad(fn, inputs, y.to(inputs.dtype), lab)
        assert gx.dtype == inputs.dtype
        assert torch.isfinite(got).all() and torch.isfinite(gx).all()
        scale = float(want.detach().abs().max().clamp_min(1.0))
        torch.testing.assert_close(got.detach().float(), want.detach(), rtol=0, atol=8 * eps * scale)
        if inputs.dtype == torch.float32 and name != "similarity":
            # the fused ops ignore autocast: exactly the fp32 result
            assert torch.equal(got, want) and torch.equal(gx, want_gx)
        else:
            # gradients: against the fp32 op on the same rounded rows (a selection or a hinge may flip between
            # the fp32 rows and their rounding); the gradient is then rounded once to the input format
            _, ref_gx = _value_and_grad(fn, inputs.float(), y.to(inputs.dtype).float(), lab)
            gscale = float(ref_gx.abs().max().clamp_min(1e-3))
            torch.testing.assert_close(gx.float(), ref_gx, rtol=0, atol=4 * eps * gscale)
