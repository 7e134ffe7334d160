// The user's TF32 opt-in for fp32 matmuls, as the CUDA op wrappers (csrc/cuda/*.cu) read it once per op call to
// choose the fp32 S tile's flavour (csrc/cuda/tile_gemm.cuh: exact SIMT FFMA or TF32 tensor cores).
// It is ATen's fp32 precision of CUDA matmuls, the value torch.backends.cuda.matmul.fp32_precision shows: "tf32"
// after torch.backends.cuda.matmul.allow_tf32 = True, torch.set_float32_matmul_precision("high" / "medium"),
// torch.backends.cuda.matmul.fp32_precision = "tf32", or a generic torch.backends.fp32_precision = "tf32" that the
// matmul setting ("none") inherits — the rule of the Triton backend's triton_kernels/_tiles.py: tf32_opted_in()
// (tests/test_cuda_tf32.py compares the two). Not at::Context::allowTF32CuBLAS(): in torch 2.14 that one throws
// when the legacy and the new settings disagree (e.g. after only the generic setting was changed).
#pragma once

#include <ATen/Context.h>

namespace flashdml {

inline bool fp32_matmul_tf32_opted_in() {
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
}

}  // namespace flashdml
