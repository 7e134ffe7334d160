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
