"""The op registry: every op family declares itself here once, and dispatch reads nothing else.

A :class:`Family` names

* the public ops it serves and the reference function of each (``flashdml.reference``, same signature);
* its compiled ops — names in :data:`flashdml._schemas.SCHEMAS`, one schema for every backend — and how
  autograd runs through each forward op (:class:`LossAutograd` for a fwd/bwd pair, :class:`CustomAutograd`
  for ops whose gradient the glue computes, ``None`` for ops without one);
* the fused backends that implement them and the input dtypes they take (float64 always runs the reference).

A backend is one of :data:`BACKENDS`: the C++ ops of ``flashdml._C`` ("cpu" and "cuda" share the ``flashdml``
namespace; the tensors' device picks the kernel) or the Triton ops (namespace ``flashdml_triton``, defined when
the family's module of ``flashdml.triton_kernels`` is imported — lazily, on first use). :func:`compiled_ops`
returns the namespace with autograd registered, so the glue calls ``ops.<name>(...)`` the same way on every
backend.

Adding a backend to an op family: implement the family's schemas for it and add its name to the family's
``backends``. Adding an op family: its schemas and fakes in ``_schemas.py``, its kernels, one ``register(...)``
call in its glue module.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from .. import _ext
from .._schemas import CPP_NAMESPACE, SCHEMAS, TRITON_NAMESPACE, register_fakes

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    namespace: str
    device_types: Tuple[str, ...]  # device types of the tensors it runs ("triton" also runs CPU tensors under
    #                                the interpreter: see flashdml._dispatch)


BACKENDS: Dict[str, Backend] = {
    "cpu": Backend("cpu", CPP_NAMESPACE, ("cpu",)),
    "cuda": Backend("cuda", CPP_NAMESPACE, ("cuda",)),
    "triton": Backend("triton", TRITON_NAMESPACE, ("cuda",)),
}


@dataclasses.dataclass(frozen=True)
class LossAutograd:
    """A loss op pair. ``bwd(grad_loss, *fwd inputs, *[fwd outputs i for i in saved_outputs])`` returns the
    gradients of the inputs named in ``grad_inputs``, in that order (a single tensor for one input)."""

    bwd: str
    grad_inputs: Tuple[str, ...]
    saved_outputs: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class CustomAutograd:
    """``torch.library.register_autograd``'s two functions, written by the op's glue."""

    setup_context: Callable
    backward: Callable


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    reference: Mapping[str, Callable]  # public op -> its reference
    compiled: Mapping[str, object]  # compiled forward op -> LossAutograd | CustomAutograd | None
    backends: Tuple[str, ...] = ("cpu", "cuda", "triton")
    dtypes: Tuple[torch.dtype, ...] = FUSED_DTYPES
    triton_module: Optional[str] = None  # module of flashdml.triton_kernels (default: the family's name)
    cpp_helpers: Tuple[str, ...] = ()  # C++ ops every backend's implementation calls (flashdml._C needed even for
    #                                    Triton), e.g. the contextual loss's sparse stage

    def compiled_names(self) -> Tuple[str, ...]:
        names = []
        for fwd, grad in self.compiled.items():
            names.append(fwd)
            if isinstance(grad, LossAutograd):
                names.append(grad.bwd)
        return tuple(names)


FAMILIES: Dict[str, Family] = {}
OP_FAMILY: Dict[str, Family] = {}
_loaded: set = set()  # (family, namespace) pairs whose autograd is registered


def register(family: Family) -> Family:
    """Declare an op family (once, from its glue module). C++ ops get their autograd now, Triton ops on first use."""
    unknown = [n for n in family.compiled_names() if n not in SCHEMAS]
    if unknown:
        raise ValueError(f"family {family.name!r}: no schema for {unknown} in flashdml._schemas")
    FAMILIES[family.name] = family
    for op in family.reference:
        OP_FAMILY[op] = family
    if _ext.C_LOADED and not missing_cpp_ops(family):
        _register_autograd(family, CPP_NAMESPACE)
    return family


def family_of(op: str) -> Family:
    try:
        return OP_FAMILY[op]
    except KeyError:
        raise KeyError(f"flashdml: no op family serves {op!r}") from None


def missing_cpp_ops(family: Family, helpers_only: bool = False) -> Tuple[str, ...]:
    """Compiled ops the loaded flashdml._C lacks (an extension built from an older tree, or none loaded)."""
    names = family.cpp_helpers if helpers_only else family.compiled_names() + family.cpp_helpers
    if not _ext.C_LOADED:
        return names
    ns = getattr(torch.ops, CPP_NAMESPACE)
    return tuple(n for n in names if not hasattr(ns, n))


def compiled_ops(backend: str, family: Family):
    """The op namespace of ``backend`` for ``family`` (``torch.ops.flashdml`` or ``torch.ops.flashdml_triton``),
    its Triton module imported and autograd registered on first use."""
    ns_name = BACKENDS[backend].namespace
    if (family.name, ns_name) not in _loaded:
        if ns_name == TRITON_NAMESPACE:
            importlib.import_module(f"flashdml.triton_kernels.{family.triton_module or family.name}")
        _register_autograd(family, ns_name)
    return getattr(torch.ops, ns_name)


def _register_autograd(family: Family, ns_name: str) -> None:
    for fwd, grad in family.compiled.items():
        qualname = f"{ns_name}::{fwd}"
        if isinstance(grad, LossAutograd):
            _register_loss_autograd(qualname, getattr(getattr(torch.ops, ns_name), grad.bwd), fwd, grad)
        elif isinstance(grad, CustomAutograd):
            torch.library.register_autograd(qualname, grad.backward, setup_context=grad.setup_context)
    _loaded.add((family.name, ns_name))


def refuse_double_backward(op: str) -> None:
    """The backward ops are not differentiable: under ``create_graph=True`` (grad mode on inside backward) their
    gradients would silently be taken as constants, so the second derivative would come out zero. Raise instead."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"flashdml: {op} does not support create_graph=True (double backward): its backward is a fused kernel "
            "without a derivative, so a second derivative would silently be zero. Compute this loss with "
            "`with flashdml.backend('reference'):` where second derivatives are needed (e.g. gradient penalties).")


def _input_names(op: str) -> Tuple[str, ...]:
    args = SCHEMAS[op].split(") ->")[0].lstrip("(")
    return tuple(a.split()[-1] for a in args.split(","))


def _register_loss_autograd(qualname: str, bwd_op, fwd: str, spec: LossAutograd) -> None:
    names = _input_names(fwd)
    grad_slot = {name: i for i, name in enumerate(names)}
    slots = [grad_slot[n] for n in spec.grad_inputs]

    def setup_context(ctx, inputs, output):
        tensors = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
        ctx.tensor_slots = tensors
        ctx.inputs = [None if isinstance(v, torch.Tensor) else v for v in inputs]
        ctx.save_for_backward(*[inputs[i] for i in tensors], *[output[i] for i in spec.saved_outputs])

    def backward(ctx, grad_loss, *unused):
        refuse_double_backward(fwd)
        saved = ctx.saved_tensors
        inputs = list(ctx.inputs)
        for slot, t in zip(ctx.tensor_slots, saved):
            inputs[slot] = t
        grads = bwd_op(grad_loss.contiguous(), *inputs, *saved[len(ctx.tensor_slots):])
        if isinstance(grads, torch.Tensor):
            grads = (grads,)
        out = [None] * len(names)
        for slot, g in zip(slots, grads):
            out[slot] = g
        return tuple(out)

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


# ------------------------------------------------------------------------------------------------------ autocast
# The fused ops take fp16 / bf16 / fp32 rows as given and accumulate in fp32 (their own tiles, not ATen's
# autocast-aware GEMMs), so autocast has nothing to change in them. Some C++ kernels call ATen GEMMs internally
# (the contextual loss's one-tile path); under autocast those would come back in fp16 / bf16 where the kernel
# expects fp32. This kernel on the autocast keys runs every C++ op with autocast off: the same result, in the
# input dtype, inside and outside an autocast region. Outside one the autocast keys are not dispatched at all.
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_autocast_lib = None


def _without_autocast(op, device_type: str):
    def kernel(*args):
        with torch.autocast(device_type, enabled=False):
            return op(*args)
    return kernel


def register_autocast_passthrough(namespace: str) -> None:
    global _autocast_lib
    _autocast_lib = _autocast_lib or torch.library.Library(namespace, "IMPL")
    ns = getattr(torch.ops, namespace)
    for name in SCHEMAS:
        if hasattr(ns, name):
            for device_type, key in _AUTOCAST_KEYS.items():
                _autocast_lib.impl(name, _without_autocast(getattr(ns, name).default, device_type), key)


if _ext.C_LOADED:
    register_fakes(CPP_NAMESPACE)
    register_autocast_passthrough(CPP_NAMESPACE)
