"""The schema of every compiled op: one string per op, the same on every backend.

The C++ backends (CPU and CUDA) define these ops in the ``flashdml`` namespace (``csrc/ops.cpp``); the Triton
backend defines the same schemas in the ``flashdml_triton`` namespace (``torch.library.triton_op(...,
schema=SCHEMAS[name])``). ``tests/test_schemas.py`` checks that the C++ registrations equal this table, so
the two namespaces cannot drift apart. The meaning of every argument and output is documented next to the
C++ definitions and in ``docs/design.md``.

The fake (meta) kernel of every op is here too, next to its schema: ``register_fakes`` installs them for the
C++ namespace, ``triton_op`` defines a Triton op with its schema and fake in one step. This module imports
nothing from flashdml: kernels and glue both read it.
"""
from __future__ import annotations

from typing import Callable

import torch

SCHEMAS = {
    # ---- batch softmax / InfoNCE
    "batch_softmax_fwd": (
        "(Tensor x, Tensor y, Tensor? labels, Tensor temperature, bool symmetric, bool normalize) -> "
        "(Tensor loss, Tensor row_lse, Tensor col_lse)"),
    "batch_softmax_bwd": (
        "(Tensor grad_loss, Tensor x, Tensor y, Tensor? labels, Tensor temperature, bool symmetric, bool normalize, "
        "Tensor row_lse, Tensor col_lse) -> (Tensor dx, Tensor dy, Tensor dtemperature)"),
    # ---- cross-example softmax (global_partition=True) and NT-Xent (global_partition=False)
    "xent_fwd": (
        "(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, Tensor temperature, bool global_partition, "
        "bool self_mode, bool normalize) -> (Tensor loss, Tensor lse, Tensor coef)"),
    "xent_bwd": (
        "(Tensor grad_loss, Tensor x, Tensor y, Tensor labels, Tensor ref_labels, Tensor temperature, "
        "bool global_partition, bool self_mode, bool normalize, Tensor lse, Tensor coef) -> "
        "(Tensor dx, Tensor dy, Tensor dtemperature)"),
    # ---- hinge-pair losses: threshold-consistent margin and margin contrastive
    "hinge_pair_fwd": (
        "(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, float pos_margin, float neg_margin, "
        "float pos_weight, float neg_weight, bool drop_diagonal, bool strict, bool normalize) -> "
        "(Tensor loss, Tensor sums, Tensor counts)"),
    "hinge_pair_bwd": (
        "(Tensor grad_loss, Tensor x, Tensor y, Tensor labels, Tensor ref_labels, float pos_margin, "
        "float neg_margin, float pos_weight, float neg_weight, bool drop_diagonal, bool strict, bool normalize, "
        "Tensor counts) -> (Tensor dx, Tensor dy)"),
    # ---- triplet margin loss over every triplet (pml TripletMarginLoss)
    "triplet_fwd": (
        "(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, float margin, bool self_mode) -> "
        "(Tensor loss, Tensor sums, Tensor counts)"),
    "triplet_bwd": (
        "(Tensor grad_loss, Tensor x, Tensor y, Tensor labels, Tensor ref_labels, float margin, bool self_mode, "
        "Tensor counts) -> (Tensor dx, Tensor dy)"),
    # ---- selection: knn and hardest negatives
    "knn_fwd": "(Tensor x, Tensor y, int k, bool exclude_diagonal, bool normalize) -> (Tensor values, Tensor indices)",
    "hardest_negatives_fwd": (
        "(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, int k, bool self_mode, bool normalize) -> "
        "(Tensor values, Tensor rows, Tensor cols)"),
    # ---- contextual loss
    "contextual_fwd": (
        "(Tensor x, Tensor labels, int k, float eps, float context_weight, float contrastive_weight, "
        "float reg_weight, float reg_target, float pos_margin, float neg_margin, float ste_slope, bool normalize) -> "
        "(Tensor loss, Tensor terms, Tensor nbr_ptr, Tensor nbr, Tensor nbr_flags, Tensor con_counts)"),
    "contextual_bwd": (
        "(Tensor grad_loss, Tensor x, Tensor labels, int k, float eps, float context_weight, "
        "float contrastive_weight, float reg_weight, float reg_target, float pos_margin, float neg_margin, "
        "float ste_slope, bool normalize, Tensor nbr_ptr, Tensor nbr, Tensor nbr_flags, Tensor con_counts) -> "
        "Tensor dx"),
    # ---- metrics: one streaming pass (rows as given: the caller normalises)
    "metrics_pass": (
        "(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, Tensor rows, Tensor keep, bool self_mode, "
        "bool pair_hist, int opis_bins) -> (Tensor offsets, Tensor indices, Tensor values, Tensor pair_hist, "
        "Tensor class_pos, Tensor class_neg)"),
    # ---- anchor-LSE losses: SupCon (kind 0), Multi-Similarity (1), Circle (2)
    "anchor_lse_fwd": (
        "(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, Tensor temperature, int kind, float p0, float p1, "
        "float p2, bool self_mode) -> (Tensor loss, Tensor row_stats)"),
    "anchor_lse_bwd": (
        "(Tensor grad_loss, Tensor x, Tensor y, Tensor labels, Tensor ref_labels, Tensor temperature, int kind, "
        "float p0, float p1, float p2, bool self_mode, Tensor row_stats) -> (Tensor dx, Tensor dy, "
        "Tensor dtemperature)"),
}

# Namespaces: the C++ backends ("cpu", "cuda") share one op per name and dispatch on the device; Triton kernels
# run on CUDA tensors too, so they live in their own namespace with the same schemas.
CPP_NAMESPACE = "flashdml"
TRITON_NAMESPACE = "flashdml_triton"

PAIR_BINS = 1 << 16  # the fine similarity grid of metrics_pass (csrc/include/flashdml/histogram.h)


# ------------------------------------------------------------------------------------------------ fake kernels
def _f32(like, shape):
    return like.new_empty(shape, dtype=torch.float32)


def _i64(like, shape):
    return like.new_empty(shape, dtype=torch.int64)


def _dynamic():
    return torch.library.get_ctx().new_dynamic_size()


def _pair_grads(grad_loss, x, y, *rest):
    return torch.empty_like(x), torch.empty_like(y)


def _pair_grads_and_temperature(grad_loss, x, y, *rest):
    return torch.empty_like(x), torch.empty_like(y), _f32(x, ())


FAKES: dict[str, Callable] = {
    "batch_softmax_fwd": lambda x, y, labels, temperature, symmetric, normalize: (
        _f32(x, ()), _f32(x, (x.shape[0],)), _f32(x, (x.shape[0] if symmetric else 0,))),
    "batch_softmax_bwd": _pair_grads_and_temperature,
    "xent_fwd": lambda x, y, labels, ref_labels, temperature, global_partition, self_mode, normalize: (
        _f32(x, ()), _f32(x, (1 if global_partition else x.shape[0],)),
        _f32(x, (1 if global_partition else x.shape[0],))),
    "xent_bwd": _pair_grads_and_temperature,
    "hinge_pair_fwd": lambda x, y, *rest: (_f32(x, ()), _f32(x, (2,)), _i64(x, (2,))),
    "hinge_pair_bwd": _pair_grads,
    "triplet_fwd": lambda x, y, *rest: (_f32(x, ()), _f32(x, (1,)), _i64(x, (1,))),
    "triplet_bwd": _pair_grads,
    "knn_fwd": lambda x, y, k, exclude_diagonal, normalize: (_f32(x, (x.shape[0], k)), _i64(x, (x.shape[0], k))),
    "hardest_negatives_fwd": lambda x, y, labels, ref_labels, k, self_mode, normalize: (
        _f32(x, (k,)), _i64(x, (k,)), _i64(x, (k,))),
    "contextual_fwd": lambda x, labels, *rest: (
        _f32(x, ()), _f32(x, (3,)), _i64(x, (x.shape[0] + 1,)), x.new_empty((_dynamic(),), dtype=torch.int32),
        x.new_empty((_dynamic(),), dtype=torch.uint8), _i64(x, (2,))),
    "contextual_bwd": lambda grad_loss, x, *rest: torch.empty_like(x),
    "metrics_pass": lambda x, y, labels, ref_labels, rows, keep, self_mode, pair_hist, opis_bins: (
        _i64(x, (rows.shape[0] + 1,)), _i64(x, (_dynamic(),)), _f32(x, (_dynamic(),)),
        _i64(x, (2, PAIR_BINS) if (pair_hist or opis_bins > 0) else (0, 0)),
        _i64(x, (_dynamic(), opis_bins) if opis_bins > 0 else (0, 0)),
        _i64(x, (_dynamic(), opis_bins) if opis_bins > 0 else (0, 0))),
    "anchor_lse_fwd": lambda x, y, *rest: (_f32(x, ()), _f32(x, (x.shape[0], 4))),
    "anchor_lse_bwd": _pair_grads_and_temperature,
}


def register_fakes(namespace: str) -> None:
    """Install the fake kernel of every op of ``namespace`` that exists (the C++ ops, once ``flashdml._C`` loaded)."""
    for name, fake in FAKES.items():
        if hasattr(getattr(torch.ops, namespace), name):
            torch.library.register_fake(f"{namespace}::{name}")(fake)


def _keep_opaque(mode, op, types, args, kwargs):
    """FunctionalTensorMode rule that leaves the op as one node (what torch.export does for every triton_op)."""
    return mode.__torch_dispatch__(op, types, args, kwargs)


def triton_op(name: str, decompose: bool = True):
    """Decorator: define ``flashdml_triton::<name>`` with ``SCHEMAS[name]`` and the shared fake kernel.
    The decorated function's parameters must carry the schema's names.

    ``decompose=False`` for an op whose output sizes depend on the data (its body reads them on the host): when
    torch.compile / AOT dispatch functionalises a graph, torch.library.triton_op would trace the body itself on
    fake tensors; this keeps the op as one node that the fake kernel describes instead (with unbacked sizes), and
    the body runs, on real tensors, only when the op executes."""
    def define(fn):
        op = torch.library.triton_op(f"{TRITON_NAMESPACE}::{name}", fn, mutates_args=(), schema=SCHEMAS[name])
        op.register_fake(FAKES[name])
        if not decompose:
            from torch._subclasses.functional_tensor import FunctionalTensorMode

            op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
        return op
    return define
