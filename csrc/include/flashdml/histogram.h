// Similarity histograms for the metrics (docs/spec.md §3), shared by the CPU pass and the CUDA kernel (csrc/cuda/metrics_kernels.cuh).
//
// The fine grid has kSimBins = 2^16 bins over [-1, 1]: bin b covers [e_b, e_{b+1}) with e_b = -1 + b * h,
// h = 2 / kSimBins = 2^-15 (every edge is exact in fp32). Values below -1 go to bin 0, values >= 1 (a duplicate
// row can give 1 + ulp) to the last bin. The bin is floor(fl(s + 1) * 2^15): a monotone function of s, equal to
// the true bin except for s within one fp32 ulp (1.2e-7) below an edge, which may land in the bin above.
// Coarser grids (per-class OPIS histograms) merge 2^shift fine bins: coarse bin = fine bin >> shift, so every
// coarse edge is a fine edge and counts "at or above an edge" are exact on both grids.
#pragma once

#include <cstdint>

#include "flashdml/common.h"

namespace flashdml {

constexpr int kSimBinsLog2 = 16;
constexpr int64_t kSimBins = int64_t(1) << kSimBinsLog2;

// Fine bin of a similarity; NaN maps to bin 0.
FLASHDML_HD int32_t similarity_bin(float s) {
  const float v = (s + 1.f) * float(kSimBins / 2);  // times a power of two: exact
  const int32_t b = v > 0.f ? int32_t(v) : 0;       // truncation = floor for v >= 0
  return b < int32_t(kSimBins) ? b : int32_t(kSimBins) - 1;
}

// Bin of a grid with 2^(kSimBinsLog2 - shift) bins over [-1, 1].
FLASHDML_HD int32_t coarse_bin(int32_t fine_bin, int shift) { return fine_bin >> shift; }

}  // namespace flashdml
