"""The GPU mode of the suite: ``python -m benchmarks --gpu [--quick | --full]``.

Only the providers that run on CUDA tensors: reference-cuda (eager PyTorch), torch.compile(reference)-cuda (the
losses), flashdml-triton and flashdml-cuda; each in three precisions, carried by the shape's ``prec`` field and
applied by the worker around the provider's set-up (apply_precision):

* ``fp32``: fp32 inputs, ``torch.set_float32_matmul_precision("highest")`` (no TF32 in cuBLAS);
* ``tf32``: fp32 inputs, TF32 allowed in cuBLAS / cuDNN matmuls (``"high"``): this changes the eager and
  compiled references; the fused kernels choose their dot precision themselves (Triton's ``input_precision``)
  and ignore the switch;
* ``bf16``: bf16 inputs — the default dtype is bf16 while the provider builds its inputs, so every
  ``torch.randn`` of the op modules makes bf16 tensors (integer labels are unaffected).

Shapes: the op's quick shape with its batch size (the op's sweep key: B, or N for metrics) replaced by the values
of GPU_SWEEP. Quick: B = 32768 only, sized for about 4 minutes on one H100 (each cell is a fresh process, ~3-5 s
of start-up and JIT compilation, more for torch.compile; the kernels themselves take milliseconds: a fwd+bwd at
B = 32768, d = 256 is ~5·2·B²·d ≈ 3 TFLOP, ~60 ms at 50 TFLOP/s fp32/TF32, ~8 ms at 400 bf16). The references,
which hold several B×B buffers, are skipped where their predicted peak passes the GPU memory cap.
"""
from __future__ import annotations

import contextlib

from .harness import Op, Provider, flashdml_check, flashdml_module

PRECISIONS = ("fp32", "tf32", "bf16")
GPU_MODES = ("gpu-quick", "gpu-full")
GPU_SWEEP = {"gpu-quick": (32768,), "gpu-full": (2048, 8192, 32768)}
CUDA_DEVICES = ("cuda",)


@contextlib.contextmanager
def apply_precision(prec: str | None, dtype: bool = True):
    """Set the matmul precision (and, with dtype=True and prec "bf16", the default dtype: for building the
    inputs) for a cell; restores the previous settings after."""
    if prec is None:
        yield
        return
    if prec not in PRECISIONS:
        raise ValueError(f"unknown precision {prec!r} (one of {PRECISIONS})")
    import torch

    # Save each fp32 precision setting the calls below write (generic, CUDA / oneDNN matmul, cuDNN), not the
    # legacy get_float32_matmul_precision(): that one summarises them, and setting its value back can turn on
    # TF32 for CUDA matmuls where only the oneDNN setting had been changed.
    settings = [torch.backends, torch.backends.cuda.matmul, torch.backends.mkldnn.matmul, torch.backends.cudnn.conv,
                torch.backends.cudnn.rnn]
    old_dtype, old_prec = torch.get_default_dtype(), [s.fp32_precision for s in settings]
    tf32 = prec == "tf32"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if prec == "bf16" and dtype:
        torch.set_default_dtype(torch.bfloat16)
    try:
        yield
    finally:
        torch.set_default_dtype(old_dtype)
        for setting, value in zip(settings, old_prec):
            setting.fp32_precision = value


def _template(op: Op) -> dict:
    return {k: v for k, v in op.shapes["quick"][0].items() if k != "only"}


def gpu_shapes(op: Op, mode: str) -> list[dict]:
    """The op's quick shape at each batch size of GPU_SWEEP[mode], in every precision."""
    out = []
    for b in GPU_SWEEP[mode]:
        base = dict(_template(op), **{op.sweep: b})
        if op.sweep == "N" and "T" in base:  # metrics: keep 5 samples per class
            base["T"] = max(1, b // 5)
        if "M" in base:  # knn: a gallery as large as the queries
            base["M"] = b
        out.extend(dict(base, prec=p) for p in PRECISIONS)
    return out


def gpu_providers(op: Op) -> list[Provider]:
    """The op's CUDA providers (those flagged for the GPU mode only included)."""
    return [p for p in op.providers if p.device in CUDA_DEVICES]


def add_gpu_shapes(op: Op) -> Op:
    """Fill op.shapes["gpu-quick"] / ["gpu-full"] (restricted to the CUDA providers) if the module has none."""
    names = [p.name for p in gpu_providers(op)]
    for mode in GPU_MODES:
        if mode not in op.shapes:
            op.shapes[mode] = [dict(s, only=names) for s in gpu_shapes(op, mode)]
    return op


def compiled_cuda_provider(name: str, setup_compiled, available, mem_bytes) -> Provider:
    """torch.compile(reference) on CUDA tensors: run in the GPU mode only (the CPU modes' lists stay as they are)."""
    return Provider(name, setup_compiled, available, "cuda", mem_bytes, modes=GPU_MODES)


def metrics_gpu_providers(make_inputs, metrics, ks, inputs_bytes) -> list[Provider]:
    """fd.metrics.evaluate on CUDA tensors through the Triton and the CUDA backends (GPU mode only)."""

    def fused(backend):
        def setup(shape, dev):
            fd = flashdml_module()
            x, labels = make_inputs(shape)
            x, labels = x.to(dev), labels.to(dev)

            def run():
                with fd.backend(backend):
                    return fd.metrics.evaluate(x, labels, metrics=metrics, ks=ks, progress=False)

            return run

        return setup

    return [Provider(f"flashdml-{b}", fused(b), flashdml_check("metrics", b), "cuda",
                     lambda s: 4 * inputs_bytes(s) + 2 * 2 ** 30, modes=GPU_MODES) for b in ("triton", "cuda")]


def run_order(shape: dict, prov: Provider) -> tuple:
    """The run order under a time budget: the fused kernels of every op first, then eager PyTorch, then
    torch.compile (the slowest to start); within each, fp32 of every op before bf16 before TF32. The fused
    kernels' tf32 rows come last of all: they do not read torch's TF32 switch, so they time the same kernels
    as the fp32 rows."""
    fused = prov.name.startswith("flashdml-")
    prec = {"fp32": 0, "bf16": 1, "tf32": 2}.get(shape.get("prec"), 3)
    rank = 0 if fused else 1 if prov.name == "reference-cuda" else 2
    return (3 if fused and prec == 2 else rank), prec


def gpu_memory_cap() -> float | None:
    """85 % of the first CUDA device's memory, None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return 0.85 * torch.cuda.get_device_properties(0).total_memory
