// Output allocation shared by every host-side op wrapper (CPU and CUDA). When poisoning is switched on
// (tests: flashdml._debug.poison_outputs()), outputs are filled with NaN (floats) or a sentinel (integers)
// before the kernel runs, so an element a kernel forgets to write shows up in the comparison with the
// reference instead of silently reading as 0.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <limits>

namespace flashdml {

inline std::atomic<bool>& poison_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_flag().load(std::memory_order_relaxed) && out.numel() > 0) {
    if (at::isFloatingType(out.scalar_type())) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      out.fill_(-7777777);
    }
  }
  return out;
}

}  // namespace flashdml
