"""Every compiled op checks its inputs: a mis-sized, mis-typed or out-of-range argument is a clear Python exception
that names the op and the argument, never a segfault or an out-of-bounds read.

For every op of ``SCHEMAS`` (the C++ namespace ``torch.ops.flashdml``, CPU tensors):
  * valid calls run (so the harness builds right arguments), and the same calls with every tensor argument a
    non-contiguous view give the same outputs bit for bit (the kernels copy what they need);
  * each bad call differs from a valid one in one argument. All bad calls first run in subprocesses (a crash is
    reported as a failure that names the call and the signal, and the next subprocess goes on after it); then each
    call that ended cleanly there is repeated in-process, asserting the exception type and message.

Errors follow ``flashdml/_validation.py``: TypeError for a wrong dtype, ValueError for a wrong shape, size, value or
device (csrc/include/flashdml/check.h; each op's checks are one function of op_checks.h, which the CUDA entries call
too: tests/test_cuda_checks_source.py).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import pytest
import torch

import flashdml  # noqa: F401  (loads flashdml._C and registers the ops)
from flashdml import _ext
from flashdml._schemas import CPP_NAMESPACE, SCHEMAS

B, M, D = 16, 12, 8  # queries, references, embedding dimension
BC, DC, KC = 16, 6, 4  # contextual: batch, dimension, k

pytestmark = pytest.mark.skipif(not _ext.C_LOADED, reason="flashdml._C not built")


def _arg_names(op: str) -> List[str]:
    args = SCHEMAS[op].split(") ->")[0].lstrip("(")
    return [a.split()[-1] for a in args.split(",")]


def _op(name: str):
    return getattr(getattr(torch.ops, CPP_NAMESPACE), name)


def _call(op: str, args: Dict[str, object]):
    return _op(op)(*[args[n] for n in _arg_names(op)])


# ------------------------------------------------------------------------------------------------ valid inputs
def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _data():
    return dict(x=_rows(B, D, 0), y=_rows(M, D, 1), ys=_rows(B, D, 2), labels=torch.arange(B) % 4,
                ref_labels=torch.arange(M) % 4, t=torch.tensor(0.1))


def _valid(op: str, variant: int = 0) -> Dict[str, object]:
    """Valid arguments of ``op`` by name (``variant`` picks another valid mode of the op)."""
    d = _data()
    x, y, ys, labels, ref_labels, t = d["x"], d["y"], d["ys"], d["labels"], d["ref_labels"], d["t"]
    if op in ("batch_softmax_fwd", "batch_softmax_bwd"):
        lab, sym = (labels, True) if variant == 0 else (None, False)
        a = dict(x=x, y=ys, labels=lab, temperature=t, symmetric=sym, normalize=True)
        if op == "batch_softmax_bwd":
            _, row_lse, col_lse = _call("batch_softmax_fwd", a)
            a.update(grad_loss=torch.tensor(1.0), row_lse=row_lse, col_lse=col_lse)
        return a
    if op in ("xent_fwd", "xent_bwd"):
        glob = variant == 1
        a = dict(x=x, y=y, labels=labels, ref_labels=ref_labels, temperature=t, global_partition=glob,
                 self_mode=False, normalize=True)
        if variant == 2:  # self mode: y is x
            a.update(y=x, ref_labels=labels, self_mode=True)
        if op == "xent_bwd":
            _, lse, coef = _call("xent_fwd", a)
            a.update(grad_loss=torch.tensor(1.0), lse=lse, coef=coef)
        return a
    if op in ("hinge_pair_fwd", "hinge_pair_bwd"):
        a = dict(x=x, y=y, labels=labels, ref_labels=ref_labels, pos_margin=0.5, neg_margin=0.1, pos_weight=1.0,
                 neg_weight=1.0, drop_diagonal=False, strict=False, normalize=True)
        if variant == 1:  # TCM self mode
            a.update(y=x, ref_labels=labels, drop_diagonal=True)
        if op == "hinge_pair_bwd":
            _, _, counts = _call("hinge_pair_fwd", a)
            a.update(grad_loss=torch.tensor(1.0), counts=counts)
        return a
    if op == "knn_fwd":
        return dict(x=x, y=y, k=3, exclude_diagonal=False, normalize=True) if variant == 0 else \
            dict(x=x, y=x, k=B - 1, exclude_diagonal=True, normalize=True)
    if op == "hardest_negatives_fwd":
        return dict(x=x, y=y, labels=labels, ref_labels=ref_labels, k=6, self_mode=False, normalize=True) \
            if variant == 0 else dict(x=x, y=x, labels=labels, ref_labels=labels, k=6, self_mode=True, normalize=True)
    if op in ("contextual_fwd", "contextual_bwd"):
        a = dict(x=_rows(BC, DC, 3) * torch.linspace(0.5, 3.0, BC)[:, None], labels=torch.arange(BC) // 4, k=KC,
                 eps=0.05, context_weight=0.4, contrastive_weight=0.5, reg_weight=0.1, reg_target=0.25,
                 pos_margin=0.75, neg_margin=0.6, ste_slope=10.0, normalize=True)
        if op == "contextual_bwd":
            _, _, ptr, nbr, flags, counts = _call("contextual_fwd", a)
            a.update(grad_loss=torch.tensor(1.0), nbr_ptr=ptr, nbr=nbr, nbr_flags=flags, con_counts=counts)
        return a
    if op == "metrics_pass":
        if variant == 0:
            return dict(x=x, y=y, labels=labels, ref_labels=ref_labels, rows=torch.arange(B),
                        keep=torch.full((B,), 3), self_mode=False, pair_hist=True, opis_bins=0)
        order = torch.argsort(labels, stable=True)  # self mode with OPIS histograms: rows sorted by class
        return dict(x=x, y=x, labels=labels, ref_labels=labels, rows=order, keep=torch.full((B,), 2),
                    self_mode=True, pair_hist=False, opis_bins=64)
    if op in ("anchor_lse_fwd", "anchor_lse_bwd"):
        # variant 0: SupCon cross mode, 1: Multi-Similarity self mode, 2: Circle cross mode
        kind, p = [(0, (0.0, 0.0, 0.0)), (1, (2.0, 50.0, 0.5)), (2, (0.4, 80.0, 0.0))][variant]
        a = dict(x=x, y=y, labels=labels, ref_labels=ref_labels, temperature=t, kind=kind, p0=p[0], p1=p[1], p2=p[2],
                 self_mode=False)
        if variant == 1:
            a.update(y=x, ref_labels=labels, self_mode=True)
        if op == "anchor_lse_bwd":
            _, stats = _call("anchor_lse_fwd", a)
            a.update(grad_loss=torch.tensor(1.0), row_stats=stats)
        return a
    raise KeyError(op)


VALID_VARIANTS = {"anchor_lse_fwd": 3, "anchor_lse_bwd": 3, "batch_softmax_fwd": 2, "batch_softmax_bwd": 2, "xent_fwd": 3, "xent_bwd": 3, "hinge_pair_fwd": 2,
                  "hinge_pair_bwd": 2, "knn_fwd": 2, "hardest_negatives_fwd": 2, "contextual_fwd": 1,
                  "contextual_bwd": 1, "metrics_pass": 2}


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a wider buffer)."""
    if t.dim() == 0:
        return t
    v = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    assert torch.equal(v, t) and (t.numel() <= 1 or not v.is_contiguous())
    return v


def _outputs_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        a, b = (a,), (b,)
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


# ---------------------------------------------------------------------------------------------------- bad calls
@dataclass
class Bad:
    op: str
    what: str
    change: Callable[[Dict[str, object]], None]  # edits valid arguments in place
    exc: Optional[type]  # None: an edge case that may run or raise, but must not crash
    match: str  # regex searched in the message
    variant: int = 0

    @property
    def id(self) -> str:
        return f"{self.op}-{self.what}"


def _set(**kw):
    def change(a):
        for k, v in kw.items():
            a[k] = v(a) if callable(v) else v
    return change


ANCHOR_LSE_OPS = ("anchor_lse_fwd", "anchor_lse_bwd")
ROW_OPS = ("batch_softmax_fwd", "batch_softmax_bwd", "xent_fwd", "xent_bwd", "hinge_pair_fwd", "hinge_pair_bwd",
           "knn_fwd", "hardest_negatives_fwd", "metrics_pass") + ANCHOR_LSE_OPS
LABEL_OPS = ("batch_softmax_fwd", "batch_softmax_bwd", "xent_fwd", "xent_bwd", "hinge_pair_fwd", "hinge_pair_bwd",
             "hardest_negatives_fwd", "metrics_pass", "contextual_fwd", "contextual_bwd") + ANCHOR_LSE_OPS
REF_LABEL_OPS = ("xent_fwd", "xent_bwd", "hinge_pair_fwd", "hinge_pair_bwd", "hardest_negatives_fwd",
                 "metrics_pass") + ANCHOR_LSE_OPS
TEMPERATURE_OPS = ("batch_softmax_fwd", "batch_softmax_bwd", "xent_fwd", "xent_bwd") + ANCHOR_LSE_OPS
BWD_OPS = ("batch_softmax_bwd", "xent_bwd", "hinge_pair_bwd", "contextual_bwd", "anchor_lse_bwd")


def _bad_cases() -> List[Bad]:
    cases: List[Bad] = []
    add = cases.append
    for op in ROW_OPS:
        add(Bad(op, "y_other_d", _set(y=lambda a: torch.randn(a["y"].shape[0], D + 1)), ValueError,
                rf"^{op}: x and y must have the same embedding dimension d"))
        add(Bad(op, "y_other_dtype", _set(y=lambda a: a["y"].half()), TypeError,
                rf"^{op}: x and y must have the same dtype, got x torch.float32 and y torch.float16"))
        add(Bad(op, "x_y_float64", _set(x=lambda a: a["x"].double(), y=lambda a: a["y"].double()), TypeError,
                rf"^{op}: x must be float32, float16 or bfloat16, got torch.float64"))
        add(Bad(op, "x_y_int64", _set(x=lambda a: a["x"].long(), y=lambda a: a["y"].long()), TypeError,
                rf"^{op}: x must be float32, float16 or bfloat16, got torch.int64"))
        add(Bad(op, "x_1d", _set(x=lambda a: a["x"][0]), ValueError, rf"^{op}: x must be a 2-D tensor \[rows, d\]"))
        add(Bad(op, "y_3d", _set(y=lambda a: a["y"][None]), ValueError, rf"^{op}: y must be a 2-D tensor \[rows, d\]"))
    for op in ("contextual_fwd", "contextual_bwd"):
        add(Bad(op, "x_float64", _set(x=lambda a: a["x"].double()), TypeError,
                rf"^{op}: x must be float32, float16 or bfloat16, got torch.float64"))
        add(Bad(op, "x_1d", _set(x=lambda a: a["x"][0]), ValueError, rf"^{op}: x must be a 2-D tensor"))
    for op in LABEL_OPS:
        n = BC if op.startswith("contextual") else B
        add(Bad(op, "labels_short", _set(labels=lambda a: a["labels"][:-1]), ValueError,
                rf"^{op}: labels has {n - 1} elements, expected B = {n}"))
        add(Bad(op, "labels_empty", _set(labels=lambda a: a["labels"][:0]), ValueError,
                rf"^{op}: labels has 0 elements, expected B = {n}"))
        add(Bad(op, "labels_int32", _set(labels=lambda a: a["labels"].int()), TypeError,
                rf"^{op}: labels must be torch.int64, got torch.int32"))
        add(Bad(op, "labels_float", _set(labels=lambda a: a["labels"].float()), TypeError,
                rf"^{op}: labels must be torch.int64, got torch.float32"))
        add(Bad(op, "labels_2d", _set(labels=lambda a: a["labels"][:, None]), ValueError,
                rf"^{op}: labels must be a 1-D tensor"))
    for op in REF_LABEL_OPS:
        add(Bad(op, "ref_labels_long", _set(ref_labels=lambda a: torch.arange(M + 5) % 4), ValueError,
                rf"^{op}: ref_labels has {M + 5} elements, expected M = {M}"))
        add(Bad(op, "ref_labels_int32", _set(ref_labels=lambda a: a["ref_labels"].int()), TypeError,
                rf"^{op}: ref_labels must be torch.int64, got torch.int32"))
    for op in TEMPERATURE_OPS:
        add(Bad(op, "temperature_1d", _set(temperature=torch.tensor([0.1])), ValueError,
                rf"^{op}: temperature must be a 0-dim float32 tensor, got shape \[1\]"))
        add(Bad(op, "temperature_empty", _set(temperature=torch.empty(0)), ValueError,
                rf"^{op}: temperature must be a 0-dim float32 tensor, got shape \[0\]"))
        add(Bad(op, "temperature_float64", _set(temperature=torch.tensor(0.1, dtype=torch.float64)), TypeError,
                rf"^{op}: temperature must be a 0-dim float32 tensor, got torch.float64"))
    for op in BWD_OPS:
        add(Bad(op, "grad_loss_empty", _set(grad_loss=torch.empty(0)), ValueError,
                rf"^{op}: grad_loss must have one element"))
        add(Bad(op, "grad_loss_int", _set(grad_loss=torch.tensor(1)), TypeError,
                rf"^{op}: grad_loss must be a floating tensor, got torch.int64"))

    # batch softmax: row i's positive is column i (B == M); row_lse [B], col_lse [B] when symmetric
    for op in ("batch_softmax_fwd", "batch_softmax_bwd"):
        add(Bad(op, "y_other_rows", _set(y=lambda a: a["y"][:-1]), ValueError,
                rf"^{op}: y has {B - 1} rows, expected B = {B}"))
    op = "batch_softmax_bwd"
    add(Bad(op, "row_lse_empty", _set(row_lse=torch.empty(0)), ValueError,
            rf"^{op}: row_lse has 0 elements, expected B = {B}"))
    add(Bad(op, "row_lse_float64", _set(row_lse=lambda a: a["row_lse"].double()), TypeError,
            rf"^{op}: row_lse must be torch.float32, got torch.float64"))
    add(Bad(op, "col_lse_empty", _set(col_lse=torch.empty(0)), ValueError,
            rf"^{op}: col_lse has 0 elements, expected B = {B}"))
    add(Bad(op, "col_lse_short_2d", _set(col_lse=lambda a: a["col_lse"][None]), ValueError,
            rf"^{op}: col_lse must be a 1-D tensor"))

    # xent: lse / coef [1] (global_partition) or [B]; self mode needs B == M
    op = "xent_fwd"
    add(Bad(op, "self_mode_other_rows", _set(self_mode=True), ValueError, rf"^{op}: self_mode needs y = x"))
    op = "xent_bwd"
    add(Bad(op, "self_mode_other_rows", _set(self_mode=True), ValueError, rf"^{op}: self_mode needs y = x"))
    add(Bad(op, "lse_empty", _set(lse=torch.empty(0)), ValueError,
            rf"^{op}: lse has 0 elements, expected B = {B} \(global_partition = false\)"))
    add(Bad(op, "lse_empty_global", _set(lse=torch.empty(0)), ValueError,
            rf"^{op}: lse has 0 elements, expected 1 \(global_partition\)", variant=1))
    add(Bad(op, "lse_per_row_for_global", _set(lse=torch.zeros(B)), ValueError,
            rf"^{op}: lse has {B} elements, expected 1 \(global_partition\)", variant=1))
    add(Bad(op, "coef_short", _set(coef=lambda a: a["coef"][:-1]), ValueError,
            rf"^{op}: coef has {B - 1} elements, expected B = {B}"))
    add(Bad(op, "coef_float64", _set(coef=lambda a: a["coef"].double()), TypeError,
            rf"^{op}: coef must be torch.float32, got torch.float64"))
    add(Bad(op, "lse_2d", _set(lse=lambda a: a["lse"][:, None]), ValueError, rf"^{op}: lse must be a 1-D tensor"))

    # hinge pair: drop_diagonal needs B == M; counts int64 [2] >= 0
    for op in ("hinge_pair_fwd", "hinge_pair_bwd"):
        add(Bad(op, "drop_diagonal_other_rows", _set(drop_diagonal=True), ValueError,
                rf"^{op}: drop_diagonal needs y = x"))
    op = "hinge_pair_bwd"
    add(Bad(op, "counts_empty", _set(counts=torch.empty(0, dtype=torch.int64)), ValueError,
            rf"^{op}: counts has 0 elements, expected 2"))
    add(Bad(op, "counts_int32", _set(counts=lambda a: a["counts"].int()), TypeError,
            rf"^{op}: counts must be torch.int64, got torch.int32"))
    add(Bad(op, "counts_negative", _set(counts=torch.tensor([3, -1])), ValueError,
            rf"^{op}: counts must be counts >= 0, got \[3, -1\]"))

    # selection: 1 <= k <= candidates / negatives; exclude_diagonal and self_mode need B == M
    op = "knn_fwd"
    add(Bad(op, "k_zero", _set(k=0), ValueError, rf"^{op}: k = 0 is out of range, expected \[1, M = {M}\]"))
    add(Bad(op, "k_negative", _set(k=-3), ValueError, rf"^{op}: k = -3 is out of range"))
    add(Bad(op, "k_above_M", _set(k=M + 1), ValueError, rf"^{op}: k = {M + 1} is out of range, expected \[1, M = {M}\]"))
    add(Bad(op, "k_self_excluded", _set(k=B), ValueError,
            rf"^{op}: k = {B} is out of range, expected \[1, M - 1 = {B - 1}\]", variant=1))
    add(Bad(op, "exclude_diagonal_other_rows", _set(exclude_diagonal=True), ValueError,
            rf"^{op}: exclude_diagonal needs y = x"))
    op = "hardest_negatives_fwd"
    n_neg = int((torch.arange(B)[:, None] % 4 != torch.arange(M)[None] % 4).sum())
    add(Bad(op, "k_zero", _set(k=0), ValueError, rf"^{op}: k = 0 is out of range, expected \[1, "))
    add(Bad(op, "k_above_negatives", _set(k=n_neg + 1), ValueError,
            rf"^{op}: k = {n_neg + 1} is out of range, expected \[1, number of negatives = {n_neg}\]"))
    add(Bad(op, "self_mode_other_rows", _set(self_mode=True), ValueError, rf"^{op}: self_mode needs y = x"))

    # contextual: 2 <= k <= B, eps >= 0; the neighbour lists consistent with x (CSR, columns in [0, B))
    for op in ("contextual_fwd", "contextual_bwd"):
        add(Bad(op, "k_one", _set(k=1), ValueError, rf"^{op}: k = 1 is out of range, expected \[2, B = {BC}\]"))
        add(Bad(op, "k_above_B", _set(k=BC + 1), ValueError, rf"^{op}: k = {BC + 1} is out of range"))
        add(Bad(op, "eps_negative", _set(eps=-0.1), ValueError, rf"^{op}: eps must be >= 0, got -0.1"))
    op = "contextual_bwd"

    def edit(name, fn):
        def change(a):
            t = a[name].clone()
            fn(t, a)
            a[name] = t
        return change

    add(Bad(op, "nbr_ptr_short", _set(nbr_ptr=lambda a: a["nbr_ptr"][:-1]), ValueError,
            rf"^{op}: nbr_ptr has {BC} elements, expected B \+ 1 = {BC + 1}"))
    add(Bad(op, "nbr_ptr_int32", _set(nbr_ptr=lambda a: a["nbr_ptr"].int()), TypeError,
            rf"^{op}: nbr_ptr must be torch.int64, got torch.int32"))
    add(Bad(op, "nbr_ptr_not_from_zero", edit("nbr_ptr", lambda t, a: t.__setitem__(0, 1)), ValueError,
            rf"^{op}: nbr_ptr\[0\] = 1, expected 0"))
    add(Bad(op, "nbr_ptr_huge_entry", edit("nbr_ptr", lambda t, a: t.__setitem__(5, 1 << 40)), ValueError,
            rf"^{op}: nbr_ptr\[5\] = {1 << 40} is beyond nbr's \d+ elements"))
    add(Bad(op, "nbr_ptr_negative_entry", edit("nbr_ptr", lambda t, a: t.__setitem__(5, -(1 << 40))), ValueError,
            rf"^{op}: nbr_ptr must be non-decreasing, got nbr_ptr\[4\] = \d+ > nbr_ptr\[5\] = -{1 << 40}"))
    add(Bad(op, "nbr_ptr_end", edit("nbr_ptr", lambda t, a: t.__setitem__(-1, t[-1] - 1)), ValueError,
            rf"^{op}: nbr_ptr\[B\] = \d+ but nbr has \d+ elements"))
    add(Bad(op, "nbr_column_B", edit("nbr", lambda t, a: t.__setitem__(-1, BC)), ValueError,
            rf"^{op}: nbr\[\d+\] = {BC} \(row {BC - 1}\) is out of range, expected a column in \[0, B = {BC}\)"))
    add(Bad(op, "nbr_column_huge", edit("nbr", lambda t, a: t.__setitem__(0, 1 << 30)), ValueError,
            rf"^{op}: nbr\[0\] = {1 << 30} \(row 0\) is out of range"))
    add(Bad(op, "nbr_column_negative", edit("nbr", lambda t, a: t.__setitem__(0, -1)), ValueError,
            rf"^{op}: nbr\[0\] = -1 \(row 0\) is out of range"))
    add(Bad(op, "nbr_unsorted", edit("nbr", lambda t, a: t.__setitem__(slice(0, 2), t[:2].flip(0))), ValueError,
            rf"^{op}: the columns of row 0 must be strictly ascending, got nbr\[0\] = \d+ then nbr\[1\] = \d+"))
    add(Bad(op, "nbr_int64", _set(nbr=lambda a: a["nbr"].long()), TypeError,
            rf"^{op}: nbr must be torch.int32, got torch.int64"))
    add(Bad(op, "nbr_short", _set(nbr=lambda a: a["nbr"][:-1]), ValueError,
            rf"^{op}: nbr_flags has \d+ elements, expected nnz = nbr.numel\(\) = \d+"))
    add(Bad(op, "nbr_flags_short", _set(nbr_flags=lambda a: a["nbr_flags"][:-1]), ValueError,
            rf"^{op}: nbr_flags has \d+ elements, expected nnz = nbr.numel\(\) = \d+"))
    add(Bad(op, "nbr_flags_int64", _set(nbr_flags=lambda a: a["nbr_flags"].long()), TypeError,
            rf"^{op}: nbr_flags must be torch.uint8, got torch.int64"))
    add(Bad(op, "nbr_flags_high_bits", edit("nbr_flags", lambda t, a: t.__setitem__(0, 0x84)), ValueError,
            rf"^{op}: nbr_flags\[0\] = 132 has bits other than 0 and 1 set"))
    add(Bad(op, "lists_of_another_batch", _set(nbr_ptr=lambda a: a["nbr_ptr"][:9], nbr=lambda a: a["nbr"][:int(a["nbr_ptr"][8])],
                                               nbr_flags=lambda a: a["nbr_flags"][:int(a["nbr_ptr"][8])]), ValueError,
            rf"^{op}: nbr_ptr has 9 elements, expected B \+ 1 = {BC + 1}"))
    add(Bad(op, "con_counts_short", _set(con_counts=lambda a: a["con_counts"][:1]), ValueError,
            rf"^{op}: con_counts has 1 elements, expected 2"))
    add(Bad(op, "con_counts_float", _set(con_counts=lambda a: a["con_counts"].float()), TypeError,
            rf"^{op}: con_counts must be torch.int64, got torch.float32"))
    add(Bad(op, "con_counts_negative", _set(con_counts=torch.tensor([-2, 0])), ValueError,
            rf"^{op}: con_counts must be counts >= 0"))

    # anchor-LSE: kind in [0, 2], finite p0..p2 (MS: alpha, beta non-zero), self mode needs B == M,
    # row_stats fp32 [B, 4]
    for op in ANCHOR_LSE_OPS:
        add(Bad(op, "kind_3", _set(kind=3), ValueError, rf"^{op}: kind = 3 is out of range, expected \[0, 2\]"))
        add(Bad(op, "kind_negative", _set(kind=-1), ValueError, rf"^{op}: kind = -1 is out of range"))
        add(Bad(op, "p_nan", _set(p0=float("nan")), ValueError, rf"^{op}: p0, p1 and p2 must be finite"))
        add(Bad(op, "ms_alpha_zero", _set(p0=0.0), ValueError, rf"^{op}: multi_similarity \(kind 1\) needs alpha",
                variant=1))
        add(Bad(op, "self_mode_other_rows", _set(self_mode=True), ValueError, rf"^{op}: self_mode needs y = x"))
    op = "anchor_lse_bwd"
    add(Bad(op, "row_stats_short", _set(row_stats=lambda a: a["row_stats"][:-1]), ValueError,
            rf"^{op}: row_stats must have shape \[B = {B}, 4\]"))
    add(Bad(op, "row_stats_1d", _set(row_stats=lambda a: a["row_stats"][:, 0]), ValueError,
            rf"^{op}: row_stats must have shape"))
    add(Bad(op, "row_stats_float64", _set(row_stats=lambda a: a["row_stats"].double()), TypeError,
            rf"^{op}: row_stats must be float32, got torch.float64"))

    # metrics: rows int64 [R] in [0, B), keep int64 [R] in [0, candidates], opis_bins >= 0 (a power of two)
    op = "metrics_pass"
    add(Bad(op, "rows_int32", _set(rows=lambda a: a["rows"].int()), TypeError,
            rf"^{op}: rows must be torch.int64, got torch.int32"))
    add(Bad(op, "rows_2d", _set(rows=lambda a: a["rows"][:, None]), ValueError, rf"^{op}: rows must be a 1-D tensor"))
    add(Bad(op, "rows_index_B", edit("rows", lambda t, a: t.__setitem__(3, B)), ValueError,
            rf"^{op}: rows\[3\] = {B} is out of range, expected a row of x in \[0, B = {B}\)"))
    add(Bad(op, "rows_index_huge", edit("rows", lambda t, a: t.__setitem__(3, 1 << 40)), ValueError,
            rf"^{op}: rows\[3\] = {1 << 40} is out of range"))
    add(Bad(op, "rows_index_negative", edit("rows", lambda t, a: t.__setitem__(0, -1)), ValueError,
            rf"^{op}: rows\[0\] = -1 is out of range"))
    add(Bad(op, "keep_short", _set(keep=lambda a: a["keep"][:-1]), ValueError,
            rf"^{op}: keep has {B - 1} elements, expected R = rows.numel\(\) = {B}"))
    add(Bad(op, "keep_int32", _set(keep=lambda a: a["keep"].int()), TypeError,
            rf"^{op}: keep must be torch.int64, got torch.int32"))
    add(Bad(op, "keep_above_candidates", edit("keep", lambda t, a: t.__setitem__(2, M + 1)), ValueError,
            rf"^{op}: keep\[2\] = {M + 1} is out of range, expected \[0, candidates = {M}\]"))
    add(Bad(op, "keep_self_candidates", edit("keep", lambda t, a: t.__setitem__(2, B)), ValueError,
            rf"^{op}: keep\[2\] = {B} is out of range, expected \[0, candidates = {B - 1}\]", variant=1))
    add(Bad(op, "keep_negative", edit("keep", lambda t, a: t.__setitem__(2, -1)), ValueError,
            rf"^{op}: keep\[2\] = -1 is out of range"))
    add(Bad(op, "opis_bins_negative", _set(opis_bins=-1), ValueError,
            rf"^{op}: opis_bins = -1 is out of range, expected \[0, 65536\]"))
    add(Bad(op, "opis_bins_not_power_of_two", _set(opis_bins=48), ValueError,
            rf"^{op}: opis_bins must be a power of two <= 2\^16, got 48", variant=1))
    add(Bad(op, "opis_bins_too_large", _set(opis_bins=1 << 17), ValueError,
            rf"^{op}: opis_bins = {1 << 17} is out of range", variant=1))
    add(Bad(op, "opis_in_cross_mode", _set(opis_bins=64), ValueError,
            rf"^{op}: per-class histograms \(opis_bins > 0\) need self mode"))
    add(Bad(op, "opis_rows_unsorted", _set(rows=torch.arange(B)), ValueError,
            rf"^{op}: rows must be sorted by class", variant=1))
    add(Bad(op, "self_mode_other_rows", _set(self_mode=True), ValueError, rf"^{op}: self_mode needs y = x"))

    # empty edges (B = 0, M = 0 or d = 0 with every size-dependent argument to match): a result or an error
    for op, n in VALID_VARIANTS.items():
        for variant in range(n):
            for what in ("B0", "M0", "d0"):
                add(Bad(op, f"empty_{what}_{variant}", _empty(what), None, "", variant))
    return cases


def _empty(what: str):
    def change(a):
        for k, v in list(a.items()):
            if not isinstance(v, torch.Tensor):
                continue
            if what == "d0" and k in ("x", "y"):
                a[k] = v[:, :0]
            elif what == "B0" and k in ("x", "labels", "rows", "keep") or \
                    what == "B0" and k in ("lse", "coef", "row_lse", "col_lse") and v.numel() > 1:
                a[k] = v[:0]
            elif what == "M0" and k in ("y", "ref_labels"):
                a[k] = v[:0]
            elif what == "B0" and k == "nbr_ptr":
                a.update(nbr_ptr=v[:1], nbr=a["nbr"][:0], nbr_flags=a["nbr_flags"][:0])
    return change


BAD_CASES = _bad_cases()
BAD_BY_ID = {c.id: c for c in BAD_CASES}
assert len(BAD_BY_ID) == len(BAD_CASES), "duplicate case ids"


def _bad_args(case: Bad) -> Dict[str, object]:
    a = _valid(case.op, case.variant)
    case.change(a)
    return a


# ------------------------------------------------------------------------------------- the subprocess batch
def _run_batch(start: int) -> None:
    """Runs the bad calls from index ``start`` on, printing one JSON line per call (a crash cuts the output)."""
    for i in range(start, len(BAD_CASES)):
        case = BAD_CASES[i]
        print(json.dumps({"start": case.id}), flush=True)
        try:
            _call(case.op, _bad_args(case))
            res = {"id": case.id, "exc": None, "msg": ""}
        except Exception as e:  # noqa: BLE001
            res = {"id": case.id, "exc": type(e).__name__, "msg": str(e).splitlines()[0] if str(e) else ""}
        print(json.dumps(res), flush=True)


def _subprocess_results() -> Dict[str, dict]:
    """{case id: {"exc", "msg"} or {"crash": description}}, running the batch in as many subprocesses as crashes
    need (each goes on after the call that crashed the previous one)."""
    env = dict(os.environ)
    paths = [os.path.dirname(os.path.dirname(os.path.abspath(flashdml.__file__))), os.path.dirname(__file__)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    results: Dict[str, dict] = {}
    start = 0
    while start < len(BAD_CASES):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--batch", str(start)], env=env,
                              capture_output=True, text=True, timeout=600)
        last_started = None
        for line in proc.stdout.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "start" in rec:
                last_started = rec["start"]
            else:
                results[rec["id"]] = rec
        if proc.returncode == 0:
            break
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        if last_started is None or last_started in results:
            pytest.fail(f"the batch subprocess failed outside a call ({how}):\n{proc.stderr[-3000:]}")
        results[last_started] = {"crash": f"the call killed its process ({how}); stderr tail:\n"
                                          f"{proc.stderr[-1500:]}"}
        start = [c.id for c in BAD_CASES].index(last_started) + 1
    return results


@pytest.fixture(scope="module")
def batch_results():
    return _subprocess_results()


# ------------------------------------------------------------------------------------------------------ tests
def test_every_op_is_covered():
    ops_with_bad = {c.op for c in BAD_CASES if c.exc is not None}
    assert set(VALID_VARIANTS) == set(SCHEMAS) == ops_with_bad


@pytest.mark.parametrize("op,variant", [(op, v) for op, n in VALID_VARIANTS.items() for v in range(n)])
def test_valid_call_runs_and_non_contiguous_inputs_give_the_same_outputs(op, variant):
    args = _valid(op, variant)
    out = _call(op, args)
    strided = {k: _strided(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    assert any(isinstance(v, torch.Tensor) and not v.is_contiguous() for v in strided.values())
    assert _outputs_equal(_call(op, strided), out)


def test_batch_ran_every_call(batch_results):
    assert set(batch_results) == set(BAD_BY_ID)


@pytest.mark.parametrize("case_id", list(BAD_BY_ID))
def test_bad_argument_is_a_clear_error(case_id, batch_results):
    case = BAD_BY_ID[case_id]
    res = batch_results.get(case_id)
    assert res is not None, f"{case_id}: the subprocess batch did not reach this call"
    if "crash" in res:
        pytest.fail(f"{case_id}: {res['crash']}")
    if case.exc is None:  # an edge: it ended cleanly, whichever way
        return
    assert res["exc"] is not None, f"{case_id}: the call returned instead of raising (subprocess)"
    # It ended cleanly in a subprocess: safe to repeat here, with the real exception type.
    with pytest.raises(case.exc) as info:
        _call(case.op, _bad_args(case))
    msg = str(info.value).splitlines()[0]
    assert re.search(case.match, msg), f"{case_id}: message {msg!r} does not match {case.match!r}"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--batch":
    _run_batch(int(sys.argv[2]))
