"""Threshold-Consistent Margin (docs/spec.md §2.3), fp32, forward+backward, self mode with 4 samples per class.

Providers: the reference (materialises B×M), the fused kernels (flashdml-cpu; flashdml-triton and flashdml-cuda
on CUDA tensors), torch.compile(reference), `chunked-pytorch` (row blocks of 1024: the forward keeps only the
hinge sums and exact int64 counts of the hard positives / negatives, the backward recomputes each block and
applies the constant per-pair gradient −λ+/#hp, +λ−/#hn), and the peer `pml-ThresholdConsistentMarginLoss`
(pytorch-metric-learning), which gathers both embeddings of every pair: O(B²·d) memory (~10 GiB at B = 1024,
d = 512), so its prediction skips it above the cap.

FLOPs per call = 8·B·M·d (S forward, S recomputed, dx, dy).
"""
from __future__ import annotations

import torch

from .cross_example_softmax import block_masks, prepare, zero_grads
from .harness import (
    FUSED, QUICK, Op, Provider, block_buffers, loss_providers, loss_runner, module_available, pair_buffers, sweep,
)

POS_MARGIN, NEG_MARGIN = 0.9, 0.5
BLOCK = 1024
F32 = 4
PER_CLASS = 4


# ------------------------------------------------------------------------------------------- chunked TCM
class _ChunkedTCM(torch.autograd.Function):
    """L = λ+·Σ_hp (m+ − s)/#hp + λ−·Σ_hn (s − m−)/#hn; saves the two counts only."""

    @staticmethod
    def forward(ctx, xn, yn, labels, ref_labels, margins: tuple, weights: tuple, self_mode: bool, block: int):
        mp, mn = margins
        B = xn.shape[0]
        sums = [torch.zeros((), dtype=xn.dtype, device=xn.device) for _ in range(2)]
        counts = [0, 0]
        for r0 in range(0, B, block):
            S = torch.mm(xn[r0:r0 + block], yn.t())
            pos, neg = block_masks(labels, ref_labels, r0, S.shape[0], self_mode)
            hp = pos.logical_and_(S <= mp)
            hn = neg.logical_and_(S >= mn)
            sums[0] = sums[0] + (mp - S[hp]).sum()
            sums[1] = sums[1] + (S[hn] - mn).sum()
            counts[0] += int(hp.sum())
            counts[1] += int(hn.sum())
        ctx.margins, ctx.weights, ctx.counts, ctx.self_mode, ctx.block = margins, weights, counts, self_mode, block
        ctx.save_for_backward(xn, yn, labels, ref_labels)
        # each mean: exact int count, quotient in float64 rounded once (as the reference does)
        terms = [(sm.to(torch.float64) / max(n, 1)).to(xn.dtype) for sm, n in zip(sums, counts)]
        return weights[0] * terms[0] + weights[1] * terms[1]

    @staticmethod
    def backward(ctx, grad_out):
        xn, yn, labels, ref_labels = ctx.saved_tensors
        (mp, mn), (wp, wn), (n_hp, n_hn) = ctx.margins, ctx.weights, ctx.counts
        if n_hp == 0 and n_hn == 0:
            return (*zero_grads(xn, yn), None, None, None, None, None, None)
        gp = -wp / max(n_hp, 1)
        gn = wn / max(n_hn, 1)
        B, block = xn.shape[0], ctx.block
        dx = torch.empty_like(xn)
        dy = torch.zeros_like(yn)
        for r0 in range(0, B, block):
            xb = xn[r0:r0 + block]
            S = torch.mm(xb, yn.t())
            pos, neg = block_masks(labels, ref_labels, r0, S.shape[0], ctx.self_mode)
            hp = pos.logical_and_(S <= mp)
            hn = neg.logical_and_(S >= mn)
            g = S.zero_().masked_fill_(hp, gp).masked_fill_(hn, gn).mul_(grad_out)
            dx[r0:r0 + block] = torch.mm(g, yn)
            dy.addmm_(g.t(), xb)
        return dx, dy, None, None, None, None, None, None


def chunked_threshold_consistent_margin(x, labels, y=None, ref_labels=None, *, pos_margin: float = POS_MARGIN,
                                        neg_margin: float = NEG_MARGIN, pos_weight: float = 1.0,
                                        neg_weight: float = 1.0, block: int = BLOCK) -> torch.Tensor:
    """Plain-PyTorch streaming TCM (docs/spec.md §2.3; cosine always), O(block·M) extra memory."""
    xn, yn, lab, ref, self_mode = prepare(x, y, labels, ref_labels, normalize=True)
    return _ChunkedTCM.apply(xn, yn, lab, ref, (float(pos_margin), float(neg_margin)),
                             (float(pos_weight), float(neg_weight)), self_mode, int(block))


# ------------------------------------------------------------------------------------------- the op
def make_inputs(shape: dict, device: str):
    """Self mode, labels = arange(B) // 4, the paper's margins (0.9, 0.5)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape["B"], shape["d"], generator=g).to(device).requires_grad_()
    labels = (torch.arange(shape["B"]) // PER_CLASS).to(device)
    return (x, labels), {"pos_margin": POS_MARGIN, "neg_margin": NEG_MARGIN}


def _chunked_setup(shape: dict, device: str):
    return loss_runner(chunked_threshold_consistent_margin, *make_inputs(shape, device))


_pml_ok = module_available("pytorch_metric_learning", "pytorch-metric-learning")


def _pml_setup(shape: dict, device: str):
    from pytorch_metric_learning.losses import ThresholdConsistentMarginLoss

    (x, labels), _ = make_inputs(shape, device)
    loss = ThresholdConsistentMarginLoss(margin_plus=POS_MARGIN, margin_minus=NEG_MARGIN)
    return loss_runner(loss, (x, labels), {})


# Predicted peaks (bytes) for the memory cap, measured as in cross_example_softmax.py: the reference ≈ 5.3 fp32
# B×M buffers at B = 1024, 2048, chunked ≈ 4.5 block×M.
def _inputs(s):
    return 4 * s["B"] * s["d"] * F32


_mem_reference = pair_buffers(6, _inputs)
_mem_compiled = pair_buffers(3, _inputs)
_mem_chunked = block_buffers(5, BLOCK, _inputs)


def _mem_pml(s):
    """pml gathers x[a] and x[n] for every pair and normalises copies of them: ~5 fp32 B²·d buffers
    (measured 158 MiB at B = 128 and 638 MiB at B = 256, d = 512: 5.0 and 4.98 buffers; reported 10 GiB at
    B = 1024, which this predicts)."""
    return 5 * s["B"] * s["B"] * s["d"] * F32


def _label(s):
    return f"B=M={s['B']} d={s['d']} self 4/class"


PML = Provider("pml-ThresholdConsistentMarginLoss", _pml_setup, _pml_ok, "cpu", _mem_pml)
PROVIDERS = loss_providers(
    "threshold_consistent_margin", make_inputs, mem_reference=_mem_reference, mem_compiled=_mem_compiled,
    mem_fused=_inputs,
    cpu_extra=(Provider("chunked-pytorch", _chunked_setup, device="cpu", mem_bytes=_mem_chunked), PML),
)


def _sweep(bs, d=512, only=None):
    return sweep(bs, d, only)


SHAPES = {
    # `make bench`: one shape, B = 128, with pml.
    "quick": _sweep([128], only=QUICK + [PML.name]),
    # `--op threshold_consistent_margin`: the target shapes (B = 1024 with every provider incl. pml;
    # B = 16384 fused only), then the sweep for the plots (pml is skipped by its memory prediction above 1024).
    "targets": _sweep([1024]) + _sweep([16384], only=FUSED) + _sweep([256, 512, 2048, 4096]),
}
SHAPES["full"] = SHAPES["targets"] + _sweep([8192])

OP = Op(
    name="threshold_consistent_margin",
    shapes=SHAPES,
    providers=PROVIDERS,
    flops=lambda s: 8.0 * s["B"] * s["B"] * s["d"],
    unit="fwd+bwd",
    sweep="B",
    plot_where={"d": 512},
    label=_label,
)
