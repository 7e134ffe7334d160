// Emulated check of the fp32 S tile's two flavours (csrc/cuda/tile_gemm.cuh: s_tile<float, kTF32>, through
// pair_tiles.cuh's s_tile_rect as the pair kernels call it), one block per tile:
//  * kTF32 = false is the exact SIMT tile: every entry equals, bit for bit, the fp32 FMA chain over k = 0 .. d-1
//    (the code before the TF32 flavour existed computed exactly that);
//  * kTF32 = true: every entry equals, bit for bit, the sum in k order of the products of the operands rounded by
//    cvt.rna.tf32.f32 (what the emulated m16n16k8 tf32 MMA computes: the kernel must feed the right elements and
//    round them, not let the MMA truncate them), lies within (2u + u^2 + (d + 2) 2^-24) sum_k |a_k b_k| of the
//    float64 value (u = 2^-11), and differs from the exact tile on generic data by more than fp32's own bound;
//  * __float_to_tf32 itself: ties away from zero, 10 mantissa bits kept, Inf / NaN passed through.
// Usage: tf32_driver. Prints "<n> checks, <m> failures".
#include "emu.h"
#include "driver_common.h"
#include "pair_tiles.cuh"

#include <random>
#include <string>

using namespace flashdml;
using namespace flashdml::cuda;

static float bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

static void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) { ++failures; std::printf("FAIL %s\n", what.c_str()); }
}

static void rounding_cases() {
  using nvcuda::wmma::__float_to_tf32;
  const float one = 1.f, ulp = std::ldexp(1.f, -10);  // spacing of TF32 numbers in [1, 2)
  expect(__float_to_tf32(one + ulp / 2) == one + ulp, "tie 1 + 2^-11 rounds away from zero (even would give 1)");
  expect(__float_to_tf32(-(one + ulp / 2)) == -(one + ulp), "negative tie rounds away from zero");
  expect(__float_to_tf32(one + ulp / 2 - std::ldexp(1.f, -23)) == one, "just below the tie rounds down");
  expect(__float_to_tf32(one + 3 * ulp / 2) == one + 2 * ulp, "tie above an odd value");
  expect(__float_to_tf32(bits(0x3f800fffu)) == one && __float_to_tf32(bits(0x3f801000u)) == one + ulp,
         "the 13 dropped bits");
  const float r = __float_to_tf32(0.1f);
  uint32_t u; std::memcpy(&u, &r, 4);
  expect((u & 0x1fffu) == 0 && std::abs(r - 0.1f) <= std::ldexp(0.1f, -11), "0.1: low 13 bits clear, within u");
  expect(std::isinf(__float_to_tf32(INFINITY)) && std::isnan(__float_to_tf32(NAN)), "Inf / NaN pass through");
}

// One block computes the S tile of rows row0.. of A [na, d] against rows col0.. of B [nb, d] in both flavours.
static void tile_case(int64_t na, int64_t nb, int64_t d, int64_t row0, int64_t col0, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  int64_t dp = 0;
  std::vector<float> a(na * d), b(nb * d);
  for (auto& v : a) v = nd(rng);
  for (auto& v : b) v = nd(rng);
  const std::vector<float> ap = padded(a.data(), na, d, 4, dp), bp = padded(b.data(), nb, d, 4, dp);
  std::vector<float> st_exact(kBN * kLdS), st_tf32(kBN * kLdS);
  for (int flavour = 0; flavour < 2; ++flavour) {
    float* out = flavour ? st_tf32.data() : st_exact.data();
    emu_launch({1, 1, 1}, kThreads, [&] {
      __shared__ __align__(128) unsigned char smem[2 * TileCfg<float>::kStageBytes];
      __shared__ __align__(128) float St[kBN * kLdS];
      void* Xs = smem;
      void* Ys = smem + TileCfg<float>::kStageBytes;
      if (flavour) {
        pair::s_tile_rect<float, true>(ap.data(), na, bp.data(), nb, dp, row0, col0, Xs, Ys, St);
      } else {
        pair::s_tile_rect<float>(ap.data(), na, bp.data(), nb, dp, row0, col0, Xs, Ys, St);
      }
      __syncthreads();
      if (threadIdx.x == 0) std::memcpy(out, St, sizeof St);
    });
  }
  const double u = std::ldexp(1.0, -11), e32 = std::ldexp(1.0, -24);
  char tag[160];
  std::snprintf(tag, sizeof tag, "na=%ld nb=%ld d=%ld tile (%ld, %ld)", long(na), long(nb), long(d), long(row0),
                long(col0));
  int bad_exact = 0, bad_tf32_bits = 0, bad_tf32_bound = 0, differ = 0;
  double worst_tf32 = 0, worst_ratio = 0;
  for (int64_t m = 0; m < kBM; ++m) {
    for (int64_t n = 0; n < kBN; ++n) {
      const float ge = st_exact[n * kLdS + m], gt = st_tf32[n * kLdS + m];
      const int64_t i = row0 + m, j = col0 + n;
      if (i >= na || j >= nb) {  // outside the matrix: exact zeros in both flavours
        bad_exact += ge != 0.f;
        bad_tf32_bits += gt != 0.f;
        continue;
      }
      float chain = 0.f, tfsum = 0.f;
      double s64 = 0, sabs = 0;
      for (int64_t k = 0; k < d; ++k) {
        const float x = a[i * d + k], y = b[j * d + k];
        chain = std::fmaf(x, y, chain);
        tfsum += nvcuda::wmma::__float_to_tf32(x) * nvcuda::wmma::__float_to_tf32(y);
        s64 += double(x) * y;
        sabs += std::abs(double(x) * y);
      }
      bad_exact += ge != chain;
      bad_tf32_bits += gt != tfsum;
      const double bound = (2 * u + u * u + double(d + 2) * e32) * sabs;
      bad_tf32_bound += std::abs(gt - s64) > bound;
      differ += gt != ge;
      worst_tf32 = std::max(worst_tf32, std::abs(gt - s64));
      worst_ratio = std::max(worst_ratio, std::abs(gt - s64) / (double(d + 2) * e32 * sabs));
    }
  }
  expect(bad_exact == 0, std::string(tag) + ": exact flavour != fp32 FMA chain at " + std::to_string(bad_exact));
  expect(bad_tf32_bits == 0, std::string(tag) + ": TF32 flavour != rounded-operand sum at " +
                                 std::to_string(bad_tf32_bits));
  expect(bad_tf32_bound == 0, std::string(tag) + ": TF32 flavour outside the u bound at " +
                                  std::to_string(bad_tf32_bound));
  // Generic data: TF32 really switches (some entry differs) and is coarser than fp32 could be (worst error above
  // fp32's own bound (d + 2) 2^-24 sum |a b|).
  expect(differ > 0 && worst_ratio > 1.0, std::string(tag) + ": TF32 flavour indistinguishable from exact (" +
                                              std::to_string(differ) + " differ, ratio " +
                                              std::to_string(worst_ratio) + ")");
}

int main() {
  rounding_cases();
  tile_case(64, 64, 16, 0, 0, 1);      // one K slice
  tile_case(70, 100, 37, 64, 64, 2);   // ragged rows on both sides, ragged d (host-padded to 40)
  tile_case(130, 90, 200, 64, 0, 3);   // many K slices, B operand ragged
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures != 0;
}
