// Shared by the CPU (.cpp) and CUDA (.cu) translation units: host/device qualifiers and small constants.
#pragma once

#if defined(__CUDACC__)
#define FLASHDML_HD __host__ __device__ __forceinline__
#else
#define FLASHDML_HD inline
#endif

namespace flashdml {

// exp(-inf) must be 0 and never NaN: the "empty" state of every online reduction uses this value.
constexpr float kNegInf = -__builtin_huge_valf();

}  // namespace flashdml
