"""Cross-Example Softmax (docs/spec.md §2.2), fp32, forward+backward, self mode with 4 samples per class.

Providers: the reference (materialises B×M), the fused kernels (flashdml-cpu; flashdml-triton and flashdml-cuda
on CUDA tensors), torch.compile(reference), and `chunked-pytorch`: the fused kernels' streaming algorithm in
plain PyTorch — row blocks of 1024 through torch.mm / exp / sum; the forward keeps one online max and sum for
the batch-wide negative LSE Λ plus the positive logits (|P| values), the backward recomputes each block and
applies docs/spec.md §2.2's closed-form gradient. Nothing B×M is stored.

FLOPs per call = 8·B·M·d: S forward, S recomputed backward, dx = G ŷ and dy = Gᵀ x̂ (2·B·M·d each).

The helpers `prepare` and `block_masks` are shared with the NT-Xent and TCM benchmark modules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import FUSED, QUICK, Op, Provider, block_buffers, loss_providers, loss_runner, pair_buffers, sweep

TEMPERATURE = 0.05
BLOCK = 1024
F32 = 4
NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------- shared chunked helpers
def prepare(x, y, labels, ref_labels, normalize: bool = True):
    """(x̂, ŷ, labels, ref_labels, self_mode) in the compute dtype (float64 stays float64, else fp32).
    Self mode: ŷ *is* x̂ (the same tensor), so autograd adds the two gradients: dx̂ = G ŷ + Gᵀ x̂.
    labels=None is pair mode (arange)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    self_mode = y is None
    xn = x.to(dt)
    if normalize:
        xn = F.normalize(xn, dim=1, eps=1e-12)
    if self_mode:
        yn, ref_labels = xn, labels
    else:
        yn = y.to(dt)
        if normalize:
            yn = F.normalize(yn, dim=1, eps=1e-12)
    if labels is None:
        labels = torch.arange(xn.shape[0], device=x.device)
        ref_labels = torch.arange(yn.shape[0], device=x.device)
    return xn, yn, labels.contiguous(), ref_labels.contiguous(), self_mode


def block_masks(labels, ref_labels, r0: int, rows: int, self_mode: bool):
    """Positive and negative masks of rows r0..r0+rows (self mode: (i, i) is neither)."""
    same = labels[r0:r0 + rows, None] == ref_labels[None, :]
    neg = ~same
    if self_mode:
        i = torch.arange(rows, device=same.device)
        same[i, i + r0] = False
    return same, neg


def zero_grads(xn, yn):
    return torch.zeros_like(xn), torch.zeros_like(yn)


# ------------------------------------------------------------------------------------------- chunked XE
class _ChunkedXE(torch.autograd.Function):
    """L = mean_{p∈P} softplus(Λ − z_p), Λ = LSE_N z; saves Λ, c = mean σ_p and |P| (O(1) besides inputs)."""

    @staticmethod
    def forward(ctx, xn, yn, labels, ref_labels, inv_t: float, self_mode: bool, block: int):
        B = xn.shape[0]
        # online max m and sum s of exp(z_n − m) over all negatives of all blocks
        m = torch.tensor(NEG_INF, dtype=xn.dtype, device=xn.device)
        s = torch.zeros((), dtype=xn.dtype, device=xn.device)
        zpos = []
        for r0 in range(0, B, block):
            z = torch.mm(xn[r0:r0 + block], yn.t()).mul_(inv_t)
            pos, neg = block_masks(labels, ref_labels, r0, z.shape[0], self_mode)
            zpos.append(z[pos])
            zn = z.masked_fill_(~neg, NEG_INF)
            mb = zn.max()
            if torch.isfinite(mb):
                m_new = torch.maximum(m, mb)
                s = s * torch.exp(m - m_new) + zn.sub_(m_new).exp_().sum()
                m = m_new
        zp = torch.cat(zpos)
        ctx.inv_t, ctx.self_mode, ctx.block, ctx.n_pos = inv_t, self_mode, block, zp.numel()
        if zp.numel() == 0 or s == 0:  # no positive or no negative pair: 0, zero gradient
            ctx.empty = True
            ctx.save_for_backward(xn, yn)
            return torch.zeros((), dtype=xn.dtype, device=xn.device)
        lam = m + torch.log(s)
        v = lam - zp
        c = torch.sigmoid(v).mean()
        ctx.empty = False
        ctx.save_for_backward(xn, yn, labels, ref_labels, lam, c)
        return torch.logaddexp(v, torch.zeros_like(v)).mean()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.empty:
            return (*zero_grads(*ctx.saved_tensors), None, None, None, None, None)
        xn, yn, labels, ref_labels, lam, c = ctx.saved_tensors
        B, inv_t, block = xn.shape[0], ctx.inv_t, ctx.block
        scale = grad_out * inv_t  # dL/dS = (dL/dz) / τ
        dx = torch.empty_like(xn)
        dy = torch.zeros_like(yn)
        for r0 in range(0, B, block):
            xb = xn[r0:r0 + block]
            z = torch.mm(xb, yn.t()).mul_(inv_t)
            pos, neg = block_masks(labels, ref_labels, r0, z.shape[0], self_mode=ctx.self_mode)
            # negatives: c·exp(z_n − Λ); positives: −σ(Λ − z_p)/|P|; others 0
            e = (z - lam).exp_().mul_(c)
            p = z.sub_(lam).neg_().sigmoid_().mul_(-1.0 / ctx.n_pos).masked_fill_(~pos, 0.0)
            g = torch.where(neg, e, p).mul_(scale)
            dx[r0:r0 + block] = torch.mm(g, yn)
            dy.addmm_(g.t(), xb)
        return dx, dy, None, None, None, None, None


def chunked_cross_example_softmax(x, y=None, labels=None, ref_labels=None, *, temperature: float = TEMPERATURE,
                                  normalize: bool = True, block: int = BLOCK) -> torch.Tensor:
    """Plain-PyTorch streaming XE (docs/spec.md §2.2 without top_k), O(block·M) extra memory."""
    xn, yn, lab, ref, self_mode = prepare(x, y, labels, ref_labels, normalize)
    return _ChunkedXE.apply(xn, yn, lab, ref, 1.0 / float(temperature), self_mode, int(block))


# ------------------------------------------------------------------------------------------- the op
def make_inputs(shape: dict, device: str):
    """Self mode, labels = arange(B) // 4: x [B, d] only (M = B)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape["B"], shape["d"], generator=g).to(device).requires_grad_()
    labels = (torch.arange(shape["B"]) // 4).to(device)
    return (x,), {"labels": labels, "temperature": TEMPERATURE}


def _chunked_setup(shape: dict, device: str):
    return loss_runner(chunked_cross_example_softmax, *make_inputs(shape, device))


# Predicted peaks (bytes) for the memory cap, from `harness.run_cell` peaks (RSS above the post-warm-up
# baseline) at B = 1024, 2048: the reference ≈ 5.4 fp32 B×M buffers (S, z, the -inf-filled copy, masks,
# autograd's saved tensors), chunked ≈ 6.1 block×M; torch.compile(reference) as for batch softmax (~half).
def _inputs(s):
    return 4 * s["B"] * s["d"] * F32


_mem_reference = pair_buffers(6, _inputs)
_mem_compiled = pair_buffers(3, _inputs)
_mem_chunked = block_buffers(7, BLOCK, _inputs)


def _label(s):
    return f"B=M={s['B']} d={s['d']} self 4/class"


PROVIDERS = loss_providers(
    "cross_example_softmax", make_inputs, mem_reference=_mem_reference, mem_compiled=_mem_compiled,
    mem_fused=_inputs,
    cpu_extra=(Provider("chunked-pytorch", _chunked_setup, device="cpu", mem_bytes=_mem_chunked),),
)


def _sweep(bs, d=256, only=None):
    return sweep(bs, d, only)


SHAPES = {
    # `make bench`: one shape, a few seconds per cell on 2 cores.
    "quick": _sweep([1024], only=QUICK),
    # `--op cross_example_softmax`: the target shapes (B = M = 8192 with every provider; B = M = 32768 fused,
    # where the reference row records its skip), then the sweep for the plots.
    # (The B = M = 50000, d = 16 pair-mode cell is a correctness check, covered by tests/test_xent.py.)
    "targets": _sweep([8192])
    + [{"B": 32768, "d": 128, "only": ["reference"] + FUSED}]
    + _sweep([1024, 2048, 4096]),
}
SHAPES["full"] = SHAPES["targets"] + _sweep([16384])

OP = Op(
    name="cross_example_softmax",
    shapes=SHAPES,
    providers=PROVIDERS,
    flops=lambda s: 8.0 * s["B"] * s["B"] * s["d"],
    unit="fwd+bwd",
    sweep="B",
    plot_where={"d": 256},
    label=_label,
)
