"""One schema per op: the Triton ops (``flashdml_triton::``) are defined with the same schema strings as the C++ ops
(``flashdml::``, csrc/ops.cpp), from ``flashdml._schemas.SCHEMAS``, and their Python implementations take the
schema's argument names in the schema's order."""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import flashdml
from flashdml._schemas import CPP_NAMESPACE, SCHEMAS, TRITON_NAMESPACE

pytestmark = pytest.mark.skipif(not flashdml.available_backends()["triton"][0], reason="triton backend unavailable")

# The op names each Triton kernel module defines.
TRITON_MODULES = {
    "batch_softmax": ("batch_softmax_fwd", "batch_softmax_bwd"),
    "xent": ("xent_fwd", "xent_bwd"),
    "hinge_pair": ("hinge_pair_fwd", "hinge_pair_bwd"),
    "triplet": ("triplet_fwd", "triplet_bwd"),
    "selection": ("knn_fwd", "hardest_negatives_fwd"),
    "metrics": ("metrics_pass",),
    "contextual": ("contextual_fwd", "contextual_bwd"),
    "anchor_lse": ("anchor_lse_fwd", "anchor_lse_bwd"),
}
NAMES = [n for names in TRITON_MODULES.values() for n in names]
MODULE_OF = {n: m for m, names in TRITON_MODULES.items() for n in names}


def _triton_op(name):
    importlib.import_module(f"flashdml.triton_kernels.{MODULE_OF[name]}")
    return getattr(torch.ops, TRITON_NAMESPACE).__getattr__(name).default


def test_every_schema_has_a_triton_module():
    """Every op of a family served by Triton (families not yet ported, e.g. the CPU-only triplet loss, are
    left out through their ``backends``)."""
    from flashdml.ops import registry

    served = {n for fam in registry.FAMILIES.values() if "triton" in fam.backends for n in fam.compiled_names()}
    assert set(NAMES) == served
    assert served <= set(SCHEMAS)


@pytest.mark.parametrize("name", NAMES)
def test_triton_schema_is_the_table_entry(name):
    want = torch._C.parse_schema(f"{TRITON_NAMESPACE}::{name}{SCHEMAS[name]}")
    assert str(_triton_op(name)._schema) == str(want)


@pytest.mark.parametrize("name", NAMES)
def test_triton_schema_equals_cpp_schema(name):
    triton = _triton_op(name)
    if not flashdml._ext.C_LOADED or not hasattr(getattr(torch.ops, CPP_NAMESPACE), name):
        pytest.skip(f"flashdml._C is not loaded or defines no {CPP_NAMESPACE}::{name}")
    cpp = getattr(torch.ops, CPP_NAMESPACE).__getattr__(name).default
    assert str(triton._schema).replace(f"{TRITON_NAMESPACE}::", f"{CPP_NAMESPACE}::", 1) == str(cpp._schema)


@pytest.mark.parametrize("name", NAMES)
def test_python_parameters_are_the_schema_arguments(name):
    module = importlib.import_module(f"flashdml.triton_kernels.{MODULE_OF[name]}")
    opdef = getattr(module, name)  # the CustomOpDef triton_op returned; the function it wraps is in its closure
    fn = inspect.getclosurevars(opdef._init_fn).nonlocals["fn"]
    assert list(inspect.signature(fn).parameters) == [a.name for a in _triton_op(name)._schema.arguments]
