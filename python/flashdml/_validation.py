"""Input checks shared by the reference and the fused ops.

Every public op validates its arguments here, so a bad call fails the same way whichever backend runs it:
``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape, size, value or device, and the
message always names the offending argument.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

TemperatureLike = Union[float, int, Tensor]


def check_embeddings(t, name: str) -> Tensor:
    """A 2-D floating tensor with at least one row and one column."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [rows, d], got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: it has 0 rows (shape {tuple(t.shape)})")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has embedding dimension d = 0 (shape {tuple(t.shape)})")
    return t


def check_labels(labels, name: str, length: int, length_name: str, device: torch.device) -> Tensor:
    """A 1-D integer tensor of the given length on the given device."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(labels).__name__}")
    if labels.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != length:
        raise ValueError(f"{name} has {labels.shape[0]} entries but {length_name} has {length} rows")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the embeddings are on {device} (mixed devices)")
    return labels


@dataclass
class Batch:
    """Validated inputs of a pairwise op.

    ``y``/``ref_labels`` are ``x``/``labels`` themselves in self mode. ``labels`` and ``ref_labels`` are int64
    (``arange`` in pair mode) or both ``None`` when the op takes no labels.
    """

    x: Tensor
    y: Tensor
    labels: Optional[Tensor]
    ref_labels: Optional[Tensor]
    self_mode: bool
    pair_mode: bool

    @property
    def B(self) -> int:
        return self.x.shape[0]

    @property
    def M(self) -> int:
        return self.y.shape[0]


def prepare_batch(
    x,
    y=None,
    labels=None,
    ref_labels=None,
    *,
    labels_required: bool = False,
    pair_mode_default: bool = True,
    require_square: bool = False,
    require_y: bool = False,
    self_mode_allowed: bool = True,
) -> Batch:
    """Check ``x, y, labels, ref_labels`` (docs/spec.md §0) and fill in self mode and pair mode.

    * ``y=None`` is self mode (``y = x``, ``ref_labels = labels``); ``ref_labels`` without ``y`` is an error.
    * ``labels=None`` is pair mode (``arange``) when ``pair_mode_default``, an error when ``labels_required``.
    * In cross mode with labels, ``ref_labels`` is required.
    """
    x = check_embeddings(x, "x")
    if y is None:
        if require_y:
            raise ValueError("y is required: this op compares x with a separate reference set y")
        if not self_mode_allowed:
            raise ValueError("self mode (y=None) is not supported by this op")
        if ref_labels is not None:
            raise ValueError("ref_labels was given without y: in self mode (y=None) ref_labels = labels")
        self_mode = True
        y = x
    else:
        y = check_embeddings(y, "y")
        self_mode = False
        if y.shape[1] != x.shape[1]:
            raise ValueError(
                f"x and y must have the same embedding dimension d, got x {tuple(x.shape)} and y {tuple(y.shape)}"
            )
        if y.device != x.device:
            raise ValueError(f"x is on {x.device} but y is on {y.device} (mixed devices)")
        if y.dtype != x.dtype:
            raise TypeError(f"x and y must have the same dtype, got x {x.dtype} and y {y.dtype}")
    B, M = x.shape[0], y.shape[0]
    if require_square and B != M:
        raise ValueError(f"this op needs as many references as queries (B == M), got x {B} rows and y {M} rows")

    pair_mode = False
    if labels is None:
        if ref_labels is not None:
            raise ValueError("ref_labels was given without labels")
        if labels_required:
            raise ValueError("labels is required by this op")
        if pair_mode_default:
            pair_mode = True
            labels = torch.arange(B, device=x.device)
            ref_labels = labels if self_mode else torch.arange(M, device=x.device)
    else:
        labels = check_labels(labels, "labels", B, "x", x.device).long()
        if self_mode:
            ref_labels = labels
        else:
            if ref_labels is None:
                raise ValueError("ref_labels is required when y and labels are given (cross mode)")
            ref_labels = check_labels(ref_labels, "ref_labels", M, "y", x.device).long()
    return Batch(x, y, labels, ref_labels, self_mode, pair_mode)


def check_temperature(temperature: TemperatureLike, device: torch.device, name: str = "temperature") -> Tensor:
    """A positive Python number or 0-dim tensor; returned as a 0-dim float32 tensor (grad kept if learnable).

    A Python number or a CPU tensor is checked here (``ValueError`` / ``TypeError``); a 0-dim tensor on a GPU is
    not read on the host (no per-call synchronisation): an invalid value there makes the result NaN
    (:func:`nan_unless_valid`; docs/gpu.md, "Host synchronisations"). Under torch.compile the check runs as an op.
    """
    if isinstance(temperature, Tensor):
        if temperature.dim() != 0:
            raise ValueError(f"{name} must be a Python number or a 0-dim tensor, got shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {temperature.dtype}")
        if temperature.device != device and temperature.device.type != "cpu":
            raise ValueError(f"{name} is on {temperature.device} but the embeddings are on {device} (mixed devices)")
        if _is_compiling():  # no host sync in a traced graph: the check runs as an op, when the graph runs
            torch.ops.flashdml_checks.temperature(temperature.detach(), name)
        elif host_readable(temperature):  # reading a CPU tensor does not wait for a device
            _check_temperature_value(float(temperature.detach()), name)
        else:
            return nan_unless_valid(temperature.to(device=device, dtype=torch.float32))
        return temperature.to(device=device, dtype=torch.float32)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{name} must be a Python number or a 0-dim tensor, got {type(temperature).__name__}")
    _check_temperature_value(float(temperature), name)
    # a fill on the device, not torch.tensor(...): that copies from the host and waits for the copy
    return torch.full((), float(temperature), dtype=torch.float32, device=device)


def host_readable(t: Tensor) -> bool:
    """Whether reading ``t``'s value on the host costs no device synchronisation (a CPU tensor). Tests patch it to
    take the device path with CPU tensors."""
    return t.device.type == "cpu"


def nan_unless_valid(t: Tensor) -> Tensor:
    """A device-resident temperature is not read on the host (that would synchronise on every call): a value that
    ``_check_temperature_value`` rejects (<= 0, below MIN_TEMPERATURE, NaN, infinite) becomes NaN here, so the loss
    and every gradient come out NaN instead of a wrong finite number. The gradient still reaches a valid ``t``."""
    ok = (t >= MIN_TEMPERATURE) & torch.isfinite(t)
    return torch.where(ok, t, torch.full_like(t, float("nan")))


MIN_TEMPERATURE = 1e-12  # 1/τ² (the scale of the temperature's gradient) stays finite in fp32 above it


def _check_temperature_value(value: float, name: str) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < MIN_TEMPERATURE:
        raise ValueError(f"{name} = {value:g} is below {MIN_TEMPERATURE:g}: the logits S / {name} and their "
                         "gradients would overflow fp32")


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(value, name: str) -> float:
    """A finite real number (margins, weights, slopes, eps...: NaN or inf would silently poison the loss)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_finite_rows(batch: "Batch", op: str) -> None:
    """Selections cannot rank NaN or infinite similarities: a ``ValueError`` naming the first bad row
    (synchronises; the selections return indices, so their callers synchronise anyway). Under torch.compile the
    same check runs as the op ``flashdml_checks::finite_rows`` when the compiled graph runs."""
    if _is_compiling():
        torch.ops.flashdml_checks.finite_rows(batch.x, batch.y, batch.self_mode, op)
        return
    _raise_on_nonfinite_rows(batch.x, batch.y, batch.self_mode, op)


def _raise_on_nonfinite_rows(x: Tensor, y: Tensor, self_mode: bool, op: str) -> None:
    for name, t in (("x", x), ("y", y)):
        # Fast path: a finite sum proves every entry finite (NaN and infinities propagate through it); only a
        # non-finite sum (a bad entry, or finite entries summing beyond fp32) pays for the row-wise check, which
        # allocates a bool copy of t and takes ~10x as long.
        if bool(torch.isfinite(t.sum(dtype=torch.float32))):
            if self_mode:
                break
            continue
        bad = ~torch.isfinite(t).all(dim=1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: {name}[{row}] has a NaN or infinite entry; a selection cannot rank it "
                             "(remove or fix the non-finite rows)")
        if self_mode:
            break


FP32_MAX = float(torch.finfo(torch.float32).max)


def check_unnormalized_rows(x: Tensor, reg_weight: float, reg_target: float, op: str) -> None:
    """``normalize=False`` (contextual loss): the ops take the rows as given and return fp32 values, so two things
    must fit in fp32: every row's squared norm (the similarities) and the regulariser
    ``reg_weight·(mean(S) − reg_target)²``, which grows as the fourth power of the row norms. A ``ValueError`` naming
    ``normalize=False`` and the offending row or term instead of an overflow inside the op. Rows with a NaN or
    infinity are left to the non-finite rule. Cost: one O(B·d) float64 pass and one host sync (under torch.compile
    the op ``flashdml_checks::unnormalized_rows``, run when the graph runs)."""
    if _is_compiling():
        torch.ops.flashdml_checks.unnormalized_rows(x.detach(), float(reg_weight), float(reg_target), op)
        return
    _raise_on_unnormalized_rows(x, reg_weight, reg_target, op)


def _raise_on_unnormalized_rows(x: Tensor, reg_weight: float, reg_target: float, op: str) -> None:
    xd = x.detach().double()
    finite = torch.isfinite(xd).all(dim=1)
    sq = xd.square().sum(dim=1)
    mean_s = xd.sum(dim=0).square().sum() / float(x.shape[0]) ** 2  # mean of S = x xᵀ, diagonal included
    bad = finite & (sq > FP32_MAX)
    stats = torch.stack([bad.any().double(), bad.double().argmax().double(), finite.all().double(), mean_s,
                         sq.masked_fill(~finite, 0).argmax().double()]).tolist()
    any_bad, first_bad, all_finite, mean_s, largest = stats[0], int(stats[1]), stats[2], stats[3], int(stats[4])
    if any_bad:
        norm = float(sq[first_bad].sqrt())
        raise ValueError(f"{op}: with normalize=False every row's squared norm must be finite in float32; row "
                         f"{first_bad} has norm {norm:.4g} (scale the rows down or pass normalize=True)")
    l_reg = reg_weight * (mean_s - reg_target) ** 2
    if all_finite and not l_reg <= FP32_MAX:
        raise ValueError(f"{op}: with normalize=False the regulariser reg_weight·(mean(S) - reg_target)² = "
                         f"{l_reg:.4g} overflows float32 (mean(S) = {mean_s:.4g}; the largest row is row {largest}, "
                         f"norm {float(sq[largest].sqrt()):.4g}); scale the rows down or pass normalize=True")


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_ks(ks, n_candidates: int) -> Tuple[int, ...]:
    if isinstance(ks, numbers.Integral) and not isinstance(ks, bool):
        ks = (ks,)
    if not isinstance(ks, Iterable):
        raise TypeError(f"ks must be an integer or a sequence of integers, got {type(ks).__name__}")
    ks = tuple(dict.fromkeys(check_positive_int(k, "ks") for k in ks))  # de-duplicated, order kept
    if not ks:
        raise ValueError("ks is empty: give at least one k")
    if max(ks) > n_candidates:
        raise ValueError(
            f"ks contains k = {max(ks)} but each query has only {n_candidates} references to retrieve from"
        )
    return ks


def check_opis_options(far_range, n_thresholds, beta):
    if not isinstance(far_range, Sequence) or len(far_range) != 2:
        raise TypeError("far_range must be a pair (far_min, far_max)")
    lo, hi = check_real(far_range[0], "far_range[0]"), check_real(far_range[1], "far_range[1]")
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"far_range must satisfy 0 < far_min <= far_max <= 1, got {tuple(far_range)}")
    n_thresholds = check_positive_int(n_thresholds, "n_thresholds")
    beta = check_real(beta, "beta")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return (lo, hi), n_thresholds, beta


def check_contextual_args(x, labels, k, eps, ste_slope):
    batch = prepare_batch(x, None, labels, labels_required=True)
    k = check_positive_int(k, "k", minimum=2)
    if k > batch.B:
        raise ValueError(f"k = {k} is larger than the batch size B = {batch.B} (the contextual loss needs 2 <= k <= B)")
    eps = check_real(eps, "eps")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    ste_slope = check_real(ste_slope, "ste_slope")
    return batch, k, eps, ste_slope


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


# ------------------------------------------------------------------------------------- checks under torch.compile
# A check that reads tensor values (a tensor temperature, non-finite rows) needs a host sync, which a graph traced
# with fullgraph=True cannot contain. Under compile the glue calls these ops instead: opaque to the tracer, run
# when the compiled graph runs, raising the same errors with the same messages as the eager checks. They return
# nothing, so they are marked side-effecting: dead-code elimination keeps them.
def _define_check(name: str, fn):
    op = torch.library.custom_op(f"flashdml_checks::{name}", fn, mutates_args=())
    op.register_fake(lambda *args: None)
    torch.fx.node.has_side_effect(getattr(torch.ops.flashdml_checks, name).default)
    return op


def _temperature_check(t: Tensor, name: str) -> None:
    _check_temperature_value(float(t), name)


def _finite_rows_check(x: Tensor, y: Tensor, self_mode: bool, op: str) -> None:
    _raise_on_nonfinite_rows(x, y, self_mode, op)


_define_check("temperature", _temperature_check)
_define_check("finite_rows", _finite_rows_check)
_define_check("unnormalized_rows", _raise_on_unnormalized_rows)
