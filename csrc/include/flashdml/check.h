// Input checks shared by every op entry, CPU (.cpp) and CUDA (.cu host code) alike: header-only. The building
// blocks; each op's complete check is one function of flashdml/op_checks.h, called by both of its entries.
//
// Every compiled op can be called directly (torch.ops.flashdml.*, opcheck, torch.compile, other libraries), so
// each entry checks that its tensor arguments have the device, dtype, dimension count and sizes that the schema
// comments in csrc/ops.cpp describe, and that its integer arguments are in range, before any kernel reads memory.
// Errors follow python/flashdml/_validation.py: TypeError (TORCH_CHECK_TYPE) for a wrong dtype, ValueError
// (TORCH_CHECK_VALUE) for a wrong shape, size, device or value; the message names the op and the argument.
// All checks are O(1) except the explicitly named O(n) value checks (index ranges, CSR lists), which read CPU
// tensors in place and use reductions (one host sync) on other devices.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace flashdml {
namespace check {

// torch's name of a dtype ("float32", "int64"), for messages.
inline const char* dtype_name(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return c10::toString(st);
  }
}

// The row dtypes every kernel takes (all accumulation is fp32 inside).
inline bool is_row_dtype(at::ScalarType st) { return st == at::kFloat || st == at::kHalf || st == at::kBFloat16; }

// `t` (argument `name`) is on the device of x.
inline void same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
                    " (every tensor argument must be on the device of x)");
}

// One row tensor [rows, d]: 2-D, fp32, fp16 or bf16.
inline void row_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be a 2-D tensor [rows, d], got shape ", t.sizes());
  TORCH_CHECK_TYPE(is_row_dtype(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
                   dtype_name(t.scalar_type()));
}

// x [B, d] and y [M, d]: row tensors with the same d, dtype and device.
inline void rows(const char* op, const at::Tensor& x, const at::Tensor& y) {
  row_tensor(op, "x", x);
  row_tensor(op, "y", y);
  same_device(op, "y", y, x);
  TORCH_CHECK_TYPE(x.scalar_type() == y.scalar_type(), op, ": x and y must have the same dtype, got x ",
                   dtype_name(x.scalar_type()), " and y ", dtype_name(y.scalar_type()));
  TORCH_CHECK_VALUE(x.size(1) == y.size(1), op, ": x and y must have the same embedding dimension d, got x ",
                    x.sizes(), " and y ", y.sizes());
}

// A 1-D tensor of `dtype` with n entries on the device of x; `expected` says what n is ("B = 16").
inline void vector(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t n,
                   const std::string& expected, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor");
  same_device(op, name, t, x);
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype_name(dtype), ", got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be a 1-D tensor of ", expected, " elements, got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.size(0) == n, op, ": ", name, " has ", t.size(0), " elements, expected ", expected);
}

// The same with n named by a size symbol: "labels has 3 elements, expected B = 16".
inline void vector(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t n,
                   const char* n_name, const at::Tensor& x) {
  vector(op, name, t, dtype, n, c10::str(n_name, " = ", n), x);
}

// Labels: int64 [n] on the device of x (name "labels" with n_name "B", or "ref_labels" with "M").
inline void labels(const char* op, const char* name, const at::Tensor& t, int64_t n, const char* n_name,
                   const at::Tensor& x) {
  vector(op, name, t, at::kLong, n, n_name, x);
}

// A 0-dim fp32 tensor on the device of x (the temperature).
inline void scalar_f32(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor");
  same_device(op, name, t, x);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be a 0-dim float32 tensor, got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 0, op, ": ", name, " must be a 0-dim float32 tensor, got shape ", t.sizes());
}

// The upstream gradient of a scalar loss: one floating element on the device of x.
inline void grad_loss(const char* op, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.defined(), op, ": grad_loss is an undefined tensor");
  same_device(op, "grad_loss", t, x);
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": grad_loss must be a floating tensor, got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.numel() == 1, op, ": grad_loss must have one element (the gradient of the scalar loss), got "
                    "shape ", t.sizes());
}

// An integer argument in [lo, hi]; `range` says where the bounds come from ("[1, M = 12]").
inline void int_in_range(const char* op, const char* name, int64_t v, int64_t lo, int64_t hi,
                         const std::string& range) {
  TORCH_CHECK_VALUE(v >= lo && v <= hi, op, ": ", name, " = ", v, " is out of range, expected ", range);
}

// int64 counts (hinge_pair_bwd counts, contextual_bwd con_counts): int64 [2]; on the CPU also both >= 0 (a device
// tensor's values are not read here: that would cost a host sync).
inline void pair_counts(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  vector(op, name, t, at::kLong, 2, std::string("2 (the forward's [positive, negative] counts)"), x);
  if (!t.is_cpu()) return;
  const at::Tensor c = t.contiguous();
  const int64_t a = c.data_ptr<int64_t>()[0], b = c.data_ptr<int64_t>()[1];
  TORCH_CHECK_VALUE(a >= 0 && b >= 0, op, ": ", name, " must be counts >= 0, got [", a, ", ", b, "]");
}

// Every value of the int64 / int32 tensor t in [lo, hi) (O(n); one host sync on a device).
inline void values_in_range(const char* op, const char* name, const at::Tensor& t, int64_t lo, int64_t hi,
                            const std::string& range) {
  if (t.numel() == 0) return;
  if (t.is_cpu()) {
    const at::Tensor c = t.contiguous();
    auto scan = [&](const auto* p) {
      for (int64_t i = 0, n = c.numel(); i < n; ++i) {
        const int64_t v = int64_t(p[i]);
        TORCH_CHECK_VALUE(v >= lo && v < hi, op, ": ", name, "[", i, "] = ", v, " is out of range, expected ", range);
      }
    };
    if (c.scalar_type() == at::kLong) scan(c.data_ptr<int64_t>());
    else if (c.scalar_type() == at::kInt) scan(c.data_ptr<int32_t>());
    else TORCH_CHECK_TYPE(false, op, ": ", name, " must be an integer tensor, got ", dtype_name(c.scalar_type()));
    return;
  }
  const at::Tensor bad = ((t < lo) | (t >= hi)).nonzero();
  if (bad.numel() > 0) {
    const int64_t i = bad[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, op, ": ", name, "[", i, "] = ", t[i].item<int64_t>(), " is out of range, expected ",
                      range);
  }
}

// The neighbour lists of contextual_fwd, as contextual_bwd takes them back (docs/spec.md §2.5): nbr_ptr int64 [B + 1] from 0,
// non-decreasing, to nnz = nbr.numel(); nbr int32 [nnz] with the columns of each row strictly ascending in
// [0, B); nbr_flags uint8 [nnz] with only bits 0 and 1 set. O(B + nnz); a device's lists are copied to the host
// once (one sync).
inline void neighbour_lists(const char* op, const at::Tensor& nbr_ptr, const at::Tensor& nbr,
                            const at::Tensor& nbr_flags, int64_t B, const at::Tensor& x) {
  TORCH_CHECK_VALUE(nbr.defined() && nbr.dim() == 1, op, ": nbr must be a 1-D int32 tensor, got shape ",
                    nbr.defined() ? nbr.sizes() : at::IntArrayRef{});
  const int64_t nnz = nbr.size(0);
  vector(op, "nbr", nbr, at::kInt, nnz, c10::str("nnz = ", nnz), x);
  vector(op, "nbr_flags", nbr_flags, at::kByte, nnz, c10::str("nnz = nbr.numel() = ", nnz), x);
  vector(op, "nbr_ptr", nbr_ptr, at::kLong, B + 1, c10::str("B + 1 = ", B + 1), x);
  const at::Tensor p = nbr_ptr.cpu().contiguous(), c = nbr.cpu().contiguous(), f = nbr_flags.cpu().contiguous();
  const int64_t* pp = p.data_ptr<int64_t>();
  const int32_t* cp = c.data_ptr<int32_t>();
  const uint8_t* fp = f.data_ptr<uint8_t>();
  TORCH_CHECK_VALUE(pp[0] == 0, op, ": nbr_ptr[0] = ", pp[0], ", expected 0");
  TORCH_CHECK_VALUE(pp[B] == nnz, op, ": nbr_ptr[B] = ", pp[B], " but nbr has ", nnz, " elements");
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_VALUE(pp[i + 1] >= pp[i], op, ": nbr_ptr must be non-decreasing, got nbr_ptr[", i, "] = ", pp[i],
                      " > nbr_ptr[", i + 1, "] = ", pp[i + 1]);
    TORCH_CHECK_VALUE(pp[i + 1] <= nnz, op, ": nbr_ptr[", i + 1, "] = ", pp[i + 1], " is beyond nbr's ", nnz,
                      " elements");
    for (int64_t e = pp[i]; e < pp[i + 1]; ++e) {
      TORCH_CHECK_VALUE(cp[e] >= 0 && cp[e] < B, op, ": nbr[", e, "] = ", cp[e], " (row ", i,
                        ") is out of range, expected a column in [0, B = ", B, ")");
      TORCH_CHECK_VALUE(e == pp[i] || cp[e] > cp[e - 1], op, ": the columns of row ", i,
                        " must be strictly ascending, got nbr[", e - 1, "] = ", cp[e - 1], " then nbr[", e, "] = ",
                        cp[e]);
      TORCH_CHECK_VALUE(fp[e] < 4, op, ": nbr_flags[", e, "] = ", int(fp[e]), " has bits other than 0 and 1 set");
    }
  }
}

}  // namespace check
}  // namespace flashdml
