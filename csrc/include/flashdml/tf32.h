// The user's TF32 opt-in for fp32 matmuls, as the CUDA op wrappers (csrc/cuda/*.cu) read it once per op call to
// choose the fp32 S tile's flavour (csrc/cuda/tile_gemm.cuh: exact SIMT FFMA or TF32 tensor cores).
// It is ATen's own switch for cuBLAS: true after torch.backends.cuda.matmul.allow_tf32 = True,
// torch.set_float32_matmul_precision("high" / "medium"), torch.backends.cuda.matmul.fp32_precision = "tf32",
// or a generic torch.backends.fp32_precision = "tf32" that the matmul setting inherits — the same rule as the
// Triton backend's triton_kernels/_tiles.py: tf32_opted_in() (tests/test_cuda_tf32.py compares the two).
#pragma once

#include <ATen/Context.h>

namespace flashdml {

inline bool fp32_matmul_tf32_opted_in() { return at::globalContext().allowTF32CuBLAS(); }

}  // namespace flashdml
