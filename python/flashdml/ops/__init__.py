"""Fused ops: the maths-facing glue (validation, the call of the compiled op, the reference when it must run), one
module per op family, each declaring itself once in :mod:`flashdml.ops.registry`."""
