"""NT-Xent with labels (docs/spec.md §2.1b), fp32, forward+backward, self mode with 4 samples per class.

Providers: the reference (materialises B×M), the fused kernels (flashdml-cpu; flashdml-triton and flashdml-cuda
on CUDA tensors), torch.compile(reference), `chunked-pytorch` (the streaming algorithm in plain PyTorch: row
blocks of 1024, one negative LSE per row saved by the forward, the backward recomputes each block with the
closed-form gradient), and the peer `pml-NTXentLoss` = pytorch-metric-learning's
`NTXentLoss(temperature=0.07)(x, labels)`, which builds |P|×|N| buffers (B·3 × B·(B−4) here, i.e. O(B³)):
its predicted memory skips it above the cap (≈ 6.5 GiB at B = 512, ≈ 52 GiB at B = 1024).

FLOPs per call = 8·B·M·d (S forward, S recomputed, dx, dy), the fused algorithm's GEMM work.
"""
from __future__ import annotations

import torch

from .cross_example_softmax import block_masks, prepare, zero_grads
from .harness import (
    FUSED, QUICK, Op, Provider, block_buffers, loss_providers, loss_runner, module_available, pair_buffers, sweep,
)

TEMPERATURE = 0.07
BLOCK = 1024
F32 = 4
PER_CLASS = 4


# ------------------------------------------------------------------------------------------- chunked NT-Xent
class _ChunkedNTXent(torch.autograd.Function):
    """L = (1/|P|) Σ_{(a,p)∈P} softplus(lse_a − z_ap), lse_a = LSE_{n∈N(a)} z_an; saves lse [B] only."""

    @staticmethod
    def forward(ctx, xn, yn, labels, ref_labels, inv_t: float, self_mode: bool, block: int):
        B = xn.shape[0]
        lse = torch.empty(B, dtype=xn.dtype, device=xn.device)
        total = torch.zeros((), dtype=xn.dtype, device=xn.device)
        n_pos = 0
        for r0 in range(0, B, block):
            z = torch.mm(xn[r0:r0 + block], yn.t()).mul_(inv_t)
            pos, neg = block_masks(labels, ref_labels, r0, z.shape[0], self_mode)
            lb = torch.logsumexp(z.masked_fill(~neg, float("-inf")), dim=1)  # -inf: row without negatives
            lse[r0:r0 + block] = lb
            n_pos += int(pos.sum())
            keep = pos & torch.isfinite(lb)[:, None]  # the others are softplus(-inf) = 0
            v = (lb[:, None] - z)[keep]
            total = total + torch.logaddexp(v, torch.zeros_like(v)).sum()
        ctx.inv_t, ctx.self_mode, ctx.block, ctx.n_pos = inv_t, self_mode, block, n_pos
        ctx.save_for_backward(xn, yn, labels, ref_labels, lse)
        # exact int count; the quotient in float64, rounded once (as the reference does)
        return (total.to(torch.float64) / max(n_pos, 1)).to(xn.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xn, yn, labels, ref_labels, lse = ctx.saved_tensors
        if ctx.n_pos == 0:
            return (*zero_grads(xn, yn), None, None, None, None, None)
        B, inv_t, block = xn.shape[0], ctx.inv_t, ctx.block
        scale = grad_out * inv_t
        dx = torch.empty_like(xn)
        dy = torch.zeros_like(yn)
        for r0 in range(0, B, block):
            xb = xn[r0:r0 + block]
            z = torch.mm(xb, yn.t()).mul_(inv_t)
            pos, neg = block_masks(labels, ref_labels, r0, z.shape[0], ctx.self_mode)
            lb = lse[r0:r0 + block]
            has = torch.isfinite(lb)
            lb = torch.where(has, lb, torch.zeros_like(lb))[:, None]
            # positives: σ_ap = sigmoid(lse_a − z_ap) (0 in rows without negatives); c_a = Σ_p σ_ap / |P|
            sig = (lb - z).sigmoid_().masked_fill_(~(pos & has[:, None]), 0.0).div_(ctx.n_pos)
            c = sig.sum(1, keepdim=True)
            # negatives: c_a · exp(z_an − lse_a); positives: −σ_ap / |P|; others 0
            e = z.sub_(lb).exp_().mul_(c)
            g = torch.where(neg, e, sig.neg_()).mul_(scale)
            dx[r0:r0 + block] = torch.mm(g, yn)
            dy.addmm_(g.t(), xb)
        return dx, dy, None, None, None, None, None


def chunked_ntxent(x, labels, y=None, ref_labels=None, *, temperature: float = TEMPERATURE,
                   normalize: bool = True, block: int = BLOCK) -> torch.Tensor:
    """Plain-PyTorch streaming NT-Xent (docs/spec.md §2.1b), O(block·M) extra memory. Same signature as the reference."""
    xn, yn, lab, ref, self_mode = prepare(x, y, labels, ref_labels, normalize)
    return _ChunkedNTXent.apply(xn, yn, lab, ref, 1.0 / float(temperature), self_mode, int(block))


# ------------------------------------------------------------------------------------------- the op
def make_inputs(shape: dict, device: str):
    """Self mode, labels = arange(B) // 4."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape["B"], shape["d"], generator=g).to(device).requires_grad_()
    labels = (torch.arange(shape["B"]) // PER_CLASS).to(device)
    return (x, labels), {"temperature": TEMPERATURE}


def _chunked_setup(shape: dict, device: str):
    return loss_runner(chunked_ntxent, *make_inputs(shape, device))


_pml_ok = module_available("pytorch_metric_learning", "pytorch-metric-learning")


def _pml_setup(shape: dict, device: str):
    from pytorch_metric_learning.losses import NTXentLoss

    (x, labels), _ = make_inputs(shape, device)
    return loss_runner(NTXentLoss(temperature=TEMPERATURE), (x, labels), {})


# Predicted peaks (bytes) for the memory cap, measured as in cross_example_softmax.py: the reference ≈ 9.3 fp32
# B×M buffers at B = 1024, 2048 (the per-pair softplus matrix comes on top of XE's), chunked ≈ 7.3 block×M.
def _inputs(s):
    return 4 * s["B"] * s["d"] * F32


_mem_reference = pair_buffers(10, _inputs)
_mem_compiled = pair_buffers(3, _inputs)
_mem_chunked = block_buffers(8, BLOCK, _inputs)


def pml_pairs(s) -> tuple[int, int]:
    """(|P|, |N|) of a self-mode batch with PER_CLASS samples per class."""
    B = s["B"]
    return B * (PER_CLASS - 1), B * (B - PER_CLASS)


def _mem_pml(s):
    """pml's _compute_loss holds ~4.3 fp32 |P|×|N| buffers (n_per_p, its bool masks, neg_pairs, exp(neg − max),
    autograd's saved copies): measured 100 MiB at B = 128 and 806 MiB at B = 256 (|P|·|N| ∝ B³). Predicted
    with 4.4: 6.6 GiB at B = 512 (the reported ≈ 6.5 GiB) and 52 GiB at B = 1024."""
    n_p, n_n = pml_pairs(s)
    return 4.4 * n_p * n_n * F32 + _mem_reference(s)


def _label(s):
    return f"B=M={s['B']} d={s['d']} self 4/class"


PML = Provider("pml-NTXentLoss", _pml_setup, _pml_ok, "cpu", _mem_pml)
PROVIDERS = loss_providers(
    "ntxent", make_inputs, mem_reference=_mem_reference, mem_compiled=_mem_compiled, mem_fused=_inputs,
    cpu_extra=(Provider("chunked-pytorch", _chunked_setup, device="cpu", mem_bytes=_mem_chunked), PML),
)


def _sweep(bs, d=512, only=None):
    return sweep(bs, d, only)


SHAPES = {
    # `make bench`: one shape, B = 128: pml's time grows fast with B (~10 s a call at 256 on 2 loaded cores).
    "quick": _sweep([128], only=QUICK + ["pml-NTXentLoss"]),
    # `--op ntxent`: the target shapes (B = 512 with every provider incl. pml; B = 16384 fused only), then
    # the sweep for the plots (pml is skipped by its memory prediction from B = 1024 on).
    "targets": _sweep([512]) + _sweep([16384], only=FUSED) + _sweep([256, 1024, 2048, 4096]),
}
SHAPES["full"] = SHAPES["targets"] + _sweep([8192])

OP = Op(
    name="ntxent",
    shapes=SHAPES,
    providers=PROVIDERS,
    flops=lambda s: 8.0 * s["B"] * s["B"] * s["d"],
    unit="fwd+bwd",
    sweep="B",
    plot_where={"d": 512},
    label=_label,
)
