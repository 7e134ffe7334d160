"""Tensor-core numerics for ``tl.dot`` under Triton's interpreter.

The interpreter computes every ``tl.dot`` as an fp32 numpy product of the operands as stored: it ignores
``input_precision`` (so TF32 rounding never shows) and it multiplies bfloat16 operands as their raw uint16 bits
(numpy has no bfloat16), so a bf16 kernel's result is meaningless there. ``tensor_core_dots()`` replaces the
interpreter's dot while it is active with what the GPU's tensor cores do to the operands:

* bf16 and fp16 operands are exact (their values, upcast); fp32 operands with ``input_precision="ieee"`` too;
* fp32 operands with ``"tf32"`` are rounded to TF32 (10 explicit mantissa bits, round to nearest, ties away
  from zero, as Triton's ``cvt.rna.tf32.f32``); ``"tf32x3"`` splits each operand into a TF32 head and a TF32
  tail and sums the three products head·head + head·tail + tail·head, as the compiled kernel does;
* fp32 → bf16 casts round to nearest even, as the GPU's default conversion does (the interpreter truncates them,
  which biases every bf16 result towards zero by ~2^-9);
* products and sums are formed in float64 and rounded once to the accumulator's dtype — the tensor core's own
  accumulation error (fp32, in an order we do not control) is left out, so tolerances derived from the formats
  add it themselves.

Tolerances in tests that use this mode come from the formats: unit roundoff u = 2^-8 (bf16), 2^-11 (fp16, TF32),
2^-24 (fp32).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter as _interpreter


def round_tf32(a: np.ndarray) -> np.ndarray:
    """fp32 -> the nearest TF32 value (ties away from zero), still stored as fp32; inf and NaN unchanged."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32)
    rounded = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    return np.where(np.isfinite(a), rounded, a).astype(np.float32)


def _values(handle) -> np.ndarray:
    """The operand's values in float64 (bf16 is stored as its uint16 bits by the interpreter)."""
    if handle.dtype.scalar == tl.bfloat16:
        return (handle.data.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    return handle.data.astype(np.float64)


def _precision(input_precision) -> str:
    return str(input_precision).split(".")[-1].lower()


def _tensor_core_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    av, bv = _values(a), _values(b)
    mode = _precision(input_precision)
    fp32 = a.dtype.scalar == tl.float32 and b.dtype.scalar == tl.float32
    if fp32 and mode == "tf32":
        av = round_tf32(av.astype(np.float32)).astype(np.float64)
        bv = round_tf32(bv.astype(np.float32)).astype(np.float64)
        out = np.matmul(av, bv)
    elif fp32 and mode == "tf32x3":
        a32, b32 = av.astype(np.float32), bv.astype(np.float32)
        a_hi, b_hi = round_tf32(a32), round_tf32(b32)
        a_lo, b_lo = round_tf32(a32 - a_hi), round_tf32(b32 - b_hi)
        f = np.float64
        out = (np.matmul(a_hi.astype(f), b_hi.astype(f)) + np.matmul(a_hi.astype(f), b_lo.astype(f))
               + np.matmul(a_lo.astype(f), b_hi.astype(f)))
    else:
        out = np.matmul(av, bv)
    acc = d.data
    result = (out + acc.astype(np.float64)).astype(acc.dtype)
    return _interpreter.TensorHandle(result, d.dtype.scalar)


def _to_bf16_bits(data: np.ndarray) -> np.ndarray:
    """fp32 values -> bf16 (round to nearest even, torch's conversion) as the interpreter stores it: uint16 bits."""
    t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def _rounding_cast(original):
    def cast(self, src, dst_type, *rest):
        rounding = rest[0] if rest else None
        if (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16
                and "RTZ" not in str(rounding).upper()):
            return _interpreter.TensorHandle(_to_bf16_bits(src.data), tl.bfloat16)
        return original(self, src, dst_type, *rest)
    return cast


@contextlib.contextmanager
def tensor_core_dots():
    """While active, every interpreted ``tl.dot`` follows the tensor-core rules above, and fp32 → bf16 casts round
    to nearest even."""
    builder = _interpreter.InterpreterBuilder
    saved = {name: getattr(builder, name) for name in ("create_dot", "cast_impl", "create_fp_trunc",
                                                         "create_fp_to_fp")}
    builder.create_dot = _tensor_core_dot
    builder.cast_impl = _rounding_cast(saved["cast_impl"])
    builder.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)
    builder.create_fp_to_fp = _rounding_cast(saved["create_fp_to_fp"])
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(builder, name, fn)
