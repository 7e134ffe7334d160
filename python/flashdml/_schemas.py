"""The schema of every compiled op: one string per op, the same on every backend.

The C++ backends (CPU and CUDA) define these ops in the ``flashdml`` namespace (``csrc/ops.cpp``); the Triton
backend defines the same schemas in the ``flashdml_triton`` namespace (``torch.library.triton_op(...,
schema=SCHEMAS[name])``). ``tests/test_schemas.py`` checks that the C++ registrations equal this table, so
the two namespaces cannot drift apart. The meaning of every argument and output is documented next to the
C++ definitions and in ``docs/design.md``.

This module imports nothing from flashdml: kernels and glue both read it.
"""
from __future__ import annotations

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
}

# Namespaces: the C++ backends ("cpu", "cuda") share one op per name and dispatch on the device; Triton kernels
# run on CUDA tensors too, so they live in their own namespace with the same schemas.
CPP_NAMESPACE = "flashdml"
TRITON_NAMESPACE = "flashdml_triton"
