"""One schema per op on every backend, and ``torch.library.opcheck`` on every compiled op × backend that runs here.

The C++ ops (``flashdml::``, CPU kernels here) and the Triton ops (``flashdml_triton::``, under the interpreter)
must both equal :data:`flashdml._schemas.SCHEMAS`; opcheck then checks each op's fake kernel, autograd
registration and schema against real runs, with ``normalize`` both ways.
"""
from __future__ import annotations

import pytest
import torch

import flashdml as fd
from flashdml._schemas import SCHEMAS
from flashdml.ops import registry

from helpers import backend_params, device_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _schema_of(namespace: str, name: str) -> str:
    schema = str(getattr(getattr(torch.ops, namespace), name).default._schema)
    return schema[len(f"{namespace}::{name}"):]


def _family_ops():
    for family in registry.FAMILIES.values():
        for name in family.compiled_names():
            yield family, name


def _served_by(backend: str) -> set:
    """The compiled ops a backend must define: those of the families that list it in ``backends`` (a family
    not yet ported to a backend, e.g. the CPU-only anchor-LSE losses, is left out there)."""
    return {name for family, name in _family_ops() if backend in family.backends}


@pytest.mark.parametrize("backend", backend_params())
def test_every_compiled_op_has_the_one_schema(backend):
    names = []
    for family, name in _family_ops():
        if backend not in family.backends:
            continue
        registry.compiled_ops(backend, family)  # defines the Triton ops
        assert _schema_of(registry.BACKENDS[backend].namespace, name) == SCHEMAS[name], f"{backend}: {name}"
        names.append(name)
    assert set(names) == _served_by(backend), f"{backend} lacks {_served_by(backend) - set(names)}"


def test_every_family_is_served_by_the_compiled_ops_it_names():
    served = {n for fam in registry.FAMILIES.values() for n in fam.compiled_names()}
    assert served == set(SCHEMAS)
    for op in ("batch_softmax", "cross_example_softmax", "ntxent", "threshold_consistent_margin",
               "contrastive_margin", "knn", "hardest_negatives", "cross_example_softmax_top_k", "contextual_loss",
               "recall_at_k", "map_at_r", "pr_auc", "opis", "eps_opis", "evaluate", "similarity",
               "supcon", "multi_similarity", "circle"):
        family = registry.family_of(op)
        assert op in family.reference


# ------------------------------------------------------------------------------------------------ opcheck
def _rows(n, d, seed, device):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) * torch.linspace(0.5, 3.0, n)[:, None]).to(device)


def _cases(device):
    """(fwd op, args, bwd op or None, saved output slots): small inputs for every forward op."""
    x, y = _rows(13, 5, 0, device).requires_grad_(), _rows(11, 5, 1, device).requires_grad_()
    lx, ly = (torch.arange(13) % 4).to(device), (torch.arange(11) % 4).to(device)
    t = torch.tensor(0.1, device=device, requires_grad=True)
    xs = _rows(11, 5, 2, device).requires_grad_()
    for normalize in (False, True):
        yield "batch_softmax_fwd", (xs, y, ly, t, True, normalize)
        yield "batch_softmax_fwd", (xs, y, None, t, False, normalize)
        yield "xent_fwd", (x, y, lx, ly, t, True, False, normalize)
        yield "xent_fwd", (x, x, lx, lx, t, False, True, normalize)
        yield "knn_fwd", (x, y, 3, False, normalize)
        yield "hardest_negatives_fwd", (x, x, lx, lx, 6, True, normalize)
        yield "contextual_fwd", (_rows(16, 6, 3, device).requires_grad_(), (torch.arange(16) // 4).to(device), 4,
                                 0.05, 0.4, 0.5, 0.1, 0.25, 0.75, 0.6, 10.0, normalize)
    yield "hinge_pair_fwd", (x, y, lx, ly, 0.5, 0.1, 1.0, 1.0, False, False, True)
    yield "hinge_pair_fwd", (x, x, lx, lx, 0.5, 0.1, 1.0, 1.0, False, True, True)
    xn = torch.nn.functional.normalize(x.detach(), dim=1)
    yn = torch.nn.functional.normalize(y.detach(), dim=1)
    rows = torch.arange(13, device=device)
    yield "metrics_pass", (xn, yn, lx, ly, rows, torch.full((13,), 3, device=device), False, True, 0)
    yield "anchor_lse_fwd", (x, x, lx, lx, t, 0, 0.0, 0.0, 0.0, True)
    yield "anchor_lse_fwd", (x, y, lx, ly, torch.tensor(1.0, device=device), 1, 2.0, 50.0, 0.5, False)
    yield "anchor_lse_fwd", (x, y, lx, ly, torch.tensor(1.0, device=device), 2, 0.4, 80.0, 0.0, False)


# Ops whose output sizes depend on data (their fakes declare those sizes dynamic): opcheck's aot_dispatch test
# runs on them for the C++ CPU ops (checked here); on GPU backends the schema / fake / autograd checks cover them.
_DATA_DEPENDENT = {"contextual_fwd", "metrics_pass"}


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck_every_op(backend):
    device = device_of(backend)
    ops_by_name = {}
    for family, name in _family_ops():
        if backend in family.backends:
            ops_by_name[name] = (family, registry.compiled_ops(backend, family))
    checked = set()
    for name, args in _cases(device):
        if name not in ops_by_name:  # a family this backend does not serve (yet)
            continue
        family, ops = ops_by_name[name]
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        if backend == "cpu" or (name not in _DATA_DEPENDENT and device.type == "cuda"):
            # (the Triton interpreter cannot trace a triton_op on fake tensors: aot_dispatch runs on a GPU only)
            utils += ("test_aot_dispatch_dynamic",)
        res = torch.library.opcheck(getattr(ops, name), args, test_utils=utils)
        assert set(res.values()) == {"SUCCESS"}, (name, res)
        checked.add(name)
        grad = family.compiled[name]
        if isinstance(grad, registry.LossAutograd):
            with torch.no_grad():
                out = getattr(ops, name)(*args)
            bwd_args = (torch.tensor(0.7, device=device),) + tuple(
                a.detach() if isinstance(a, torch.Tensor) else a for a in args) + tuple(
                out[i] for i in grad.saved_outputs)
            res = torch.library.opcheck(getattr(ops, grad.bwd), bwd_args,
                                        test_utils=("test_schema", "test_faketensor"))
            assert set(res.values()) == {"SUCCESS"}, (grad.bwd, res)
            checked.add(grad.bwd)
    assert checked == _served_by(backend)


@pytest.mark.parametrize("backend", backend_params())
def test_normalize_inside_the_op_equals_normalised_rows(backend):
    """normalize=True on raw rows gives the values and (through the op's autograd) the raw-row gradients that
    normalising first does — on every backend, since all of them take ``normalize``."""
    device = device_of(backend)
    family = registry.family_of("cross_example_softmax")
    ops = registry.compiled_ops(backend, family)
    x = _rows(21, 7, 5, device).requires_grad_()
    y = _rows(17, 7, 6, device).requires_grad_()
    lx, ly = (torch.arange(21) % 5).to(device), (torch.arange(17) % 5).to(device)
    t = torch.tensor(0.2, device=device)
    inside = ops.xent_fwd(x, y, lx, ly, t, True, False, True)[0]
    gx, gy = torch.autograd.grad(inside, (x, y))
    x2, y2 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    outside = ops.xent_fwd(torch.nn.functional.normalize(x2, dim=1), torch.nn.functional.normalize(y2, dim=1),
                           lx, ly, t, True, False, False)[0]
    hx, hy = torch.autograd.grad(outside, (x2, y2))
    # the same normalised rows up to one rounding of x / ‖x‖ (fp32): values and gradients agree to ~1e-6
    torch.testing.assert_close(inside, outside, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, hx, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gy, hy, rtol=1e-4, atol=1e-6)
    assert fd.available_backends()[backend][0]
