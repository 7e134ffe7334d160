"""Autograd and fake-kernel registration shared by every fused op.

Each compiled op comes as a pair ``<name>_fwd`` / ``<name>_bwd`` with the same contract on every backend
(C++ ops in the ``flashdml`` namespace, Triton ops in ``flashdml_triton``). ``register_loss_autograd`` wires a
pair into ``torch.library.register_autograd`` so the fused op works with autograd and torch.compile.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def register_loss_autograd(
    fwd_qualname: str,
    bwd_op: Callable,
    *,
    input_names: Sequence[str],
    grad_inputs: Sequence[str],
    saved_outputs: Sequence[int],
    attrs: Sequence[str] = (),
) -> None:
    """Register autograd for ``fwd_qualname`` whose output 0 is the scalar loss.

    ``bwd_op(grad_loss, *saved_inputs, *attrs, *saved_outputs)`` must return the gradients named in
    ``grad_inputs`` (in that order); every other input gets ``None``. ``attrs`` are non-tensor inputs passed
    through to the backward op.
    """
    names = list(input_names)
    tensor_inputs = [n for n in names if n not in attrs]

    def setup_context(ctx, inputs, output):
        values = dict(zip(names, inputs))
        ctx.save_for_backward(*[values[n] for n in tensor_inputs], *[output[i] for i in saved_outputs])
        ctx.attrs = [values[a] for a in attrs]

    def backward(ctx, grad_loss, *unused_grads):
        saved = ctx.saved_tensors
        n = len(tensor_inputs)
        values = dict(zip(tensor_inputs, saved[:n]))
        grads = bwd_op(grad_loss.contiguous(), *saved[:n], *ctx.attrs, *saved[n:])
        by_name = dict(zip(grad_inputs, grads))
        return tuple(by_name.get(name) for name in names)

    torch.library.register_autograd(fwd_qualname, backward, setup_context=setup_context)


def rows_for_backend(backend: str, x, y, normalize: bool, self_mode: bool = False):
    """``(x, y, normalize_flag)`` as a backend's kernels take them.

    The C++ CPU kernels normalise inside the kernel (nothing B×d is kept between the passes), so they get the
    raw rows and ``normalize``. GPU kernels take normalised rows: normalised in fp32, cast back to fp16/bf16 for
    the tensor-core GEMMs, with ``normalize=False`` for the C++ CUDA ops. In self mode the same tensor fills
    both slots (autograd then adds the two gradients).
    """
    from .._math import l2_normalize

    x = x.contiguous()
    if backend == "cpu":
        return x, (x if self_mode else y.contiguous()), normalize
    xh = l2_normalize(x.float()).to(x.dtype) if normalize else x
    if self_mode:
        return xh, xh, False
    yh = l2_normalize(y.float()).to(y.dtype) if normalize else y
    return xh, yh.contiguous(), False
