"""Fused ops: validation, backend dispatch and autograd glue, one module per op family."""
