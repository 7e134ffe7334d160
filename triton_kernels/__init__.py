"""Triton GPU kernels of flashdml (installed as ``flashdml.triton_kernels``), one module per op family.

Importing a module registers its ``torch.ops.flashdml_triton::*`` ops. ``_aot`` compiles every kernel ahead of time
for sm_80 / sm_90 and checks its resources (see tests/test_triton_aot.py).
"""
