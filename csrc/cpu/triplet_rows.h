// The per-anchor pieces of the CPU triplet margin loss (cpu/triplet.cpp, docs/spec.md §6.4): the setup shared by
// its forward and backward passes (normalised rows, squared norms, label classes, the CSR list of every anchor's
// positives with their distances from the row differences) and what each pass does with one anchor's row of
// distances to a tile's columns (row_stats forward, row_grad backward).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <vector>

#include "cpu_tiles.h"
#include "label_index.h"

namespace flashdml {
namespace cpu {
namespace triplet {

// Rows per parallel chunk of the O(rows * d) loops: about 2^20 multiply-adds each, so that small batches run them
// on the calling thread (one parallel region less to wait for on a busy machine).
inline int64_t row_grain(int64_t d) { return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(d, 1)); }

struct TripletSetup {
  at::Tensor x, y;                // normalised fp32 rows, contiguous; y is x itself in self mode
  at::Tensor x_inv, y_inv;        // 1 / max(|row|, 1e-12)
  std::vector<float> x_sq, y_sq;  // |x^_i|^2, |y^_j|^2 (fp32 of a double sum)
  LabelIndex classes;
  std::vector<int64_t> pos_ptr;   // [B + 1]: anchor a's positives are pos_col[pos_ptr[a] .. pos_ptr[a + 1])
  std::vector<int64_t> pos_col;
  std::vector<float> pos_dist;    // d_ap = |x^_a - y^_p|
  float margin;
};

inline std::vector<float> squared_norms(const at::Tensor& rows) {
  const int64_t n = rows.size(0), d = rows.size(1);
  std::vector<float> out(n);
  const float* p = rows.data_ptr<float>();
  at::parallel_for(0, n, row_grain(rows.size(1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double ss = 0.0;
      const float* a = p + r * d;
#pragma omp simd reduction(+ : ss)
      for (int64_t k = 0; k < d; ++k) ss += double(a[k]) * double(a[k]);
      out[r] = float(ss);
    }
  });
  return out;
}

// Call check::triplet_fwd_inputs (or _bwd_inputs) first.
inline TripletSetup make_setup(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& labels,
                        const at::Tensor& ref_labels, double margin, bool self_mode) {
  TripletSetup s;
  s.x = normalized_rows(x_in, true, &s.x_inv);
  if (x_in.is_same(y_in)) {
    s.y = s.x;
    s.y_inv = s.x_inv;
  } else {
    s.y = normalized_rows(y_in, true, &s.y_inv);
  }
  s.x_sq = squared_norms(s.x);
  s.y_sq = x_in.is_same(y_in) ? s.x_sq : squared_norms(s.y);
  s.classes = build_label_index(labels, ref_labels);
  s.margin = static_cast<float>(margin);

  const int64_t B = s.x.size(0), d = s.x.size(1);
  s.pos_ptr.assign(B + 1, 0);
  for (int64_t a = 0; a < B; ++a) {
    const int32_t c = s.classes.row_class[a];
    int64_t n = c < 0 ? 0 : s.classes.class_start[c + 1] - s.classes.class_start[c];
    if (self_mode && c >= 0) --n;  // (a, a) is not a positive in self mode
    s.pos_ptr[a + 1] = s.pos_ptr[a] + n;
  }
  s.pos_col.resize(s.pos_ptr[B]);
  s.pos_dist.resize(s.pos_ptr[B]);
  const float* xp = s.x.data_ptr<float>();
  const float* yp = s.y.data_ptr<float>();
  at::parallel_for(0, B, row_grain(d), [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      const int32_t c = s.classes.row_class[a];
      if (c < 0) continue;
      int64_t q = s.pos_ptr[a];
      for (int64_t k = s.classes.class_start[c]; k < s.classes.class_start[c + 1]; ++k) {
        const int64_t p = s.classes.cols_by_class[k];
        if (self_mode && p == a) continue;
        const float* u = xp + a * d;
        const float* v = yp + p * d;
        double ss = 0.0;
#pragma omp simd reduction(+ : ss)
        for (int64_t t = 0; t < d; ++t) {
          const double diff = double(u[t]) - double(v[t]);
          ss += diff * diff;
        }
        s.pos_col[q] = p;
        s.pos_dist[q] = float(std::sqrt(ss));
        ++q;
      }
    }
  });
  return s;
}

// Tile row -> the anchor's distances to the tile's columns, in place: sqrt(max(|x_a|^2 + |y_j|^2 - 2 s, 0)).
// With AVX the sqrt runs on 8 lanes (GCC keeps std::sqrt scalar because of errno); every column is computed
// by the same instructions in the forward and the backward pass, so both see bitwise the same distances.
inline void distances_in_place(float* s, int64_t cn, float xa_sq, const float* y_sq) {
  int64_t c = 0;
#if defined(__AVX__)
  const __m256 xa = _mm256_set1_ps(xa_sq), two = _mm256_set1_ps(2.f), zero = _mm256_setzero_ps();
  for (; c + 8 <= cn; c += 8) {
    const __m256 sq = _mm256_sub_ps(_mm256_add_ps(xa, _mm256_loadu_ps(y_sq + c)),
                                    _mm256_mul_ps(two, _mm256_loadu_ps(s + c)));
    _mm256_storeu_ps(s + c, _mm256_sqrt_ps(_mm256_max_ps(sq, zero)));
  }
#endif
  for (; c < cn; ++c) s[c] = std::sqrt(std::max((xa_sq + y_sq[c]) - 2.f * s[c], 0.f));
}

// The hinge of one triplet in fp32, written once so that forward and backward evaluate the same expression.
inline float hinge(float d_ap, float d_an, float margin) { return (d_ap - d_an) + margin; }

struct TripletStats {
  double sum = 0.0;
  int64_t count = 0;
};

// Adds anchor a's triplets with the columns of one row of distances dn (col: those columns' classes).
inline void row_stats(const TripletSetup& p, int64_t a, const float* dn, const int32_t* col, int64_t cn,
                      TripletStats& st) {
  const int32_t ca = p.classes.row_class[a];
  for (int64_t q = p.pos_ptr[a]; q < p.pos_ptr[a + 1]; ++q) {
    // fp32 partials over one tile row (<= 512 terms: cnt exact, sum to ~1e-7), then double
    const float dap = p.pos_dist[q];
    float sum = 0.f, cnt = 0.f;
#pragma omp simd reduction(+ : sum, cnt)
    for (int64_t c = 0; c < cn; ++c) {
      const float h = hinge(dap, dn[c], p.margin);
      const bool active = (col[c] != ca) & (h > 0.f);
      sum += active ? h : 0.f;
      cnt += active ? 1.f : 0.f;
    }
    st.sum += double(sum);
    st.count += static_cast<int64_t>(cnt);
  }
}

// Overwrites anchor a's row of distances g with G_an = #{p : active} s / d_an (0 where d_an = 0: the
// subgradient, and on non-negatives) and adds #{n : active} of each positive pair to pos_active[q].
// na: scratch of cn floats.
inline void row_grad(const TripletSetup& p, int64_t a, float* g, const int32_t* col, int64_t cn, float s, float* na,
                     double* pos_active) {
  const int32_t ca = p.classes.row_class[a];
  std::fill(na, na + cn, 0.f);
  for (int64_t q = p.pos_ptr[a]; q < p.pos_ptr[a + 1]; ++q) {
    const float dap = p.pos_dist[q];
    float cnt = 0.f;  // exact: <= 512
#pragma omp simd reduction(+ : cnt)
    for (int64_t c = 0; c < cn; ++c) {
      const bool active = (col[c] != ca) & (hinge(dap, g[c], p.margin) > 0.f);
      na[c] += active ? 1.f : 0.f;
      cnt += active ? 1.f : 0.f;
    }
    pos_active[q] += double(cnt);
  }
#pragma omp simd
  for (int64_t c = 0; c < cn; ++c) g[c] = (na[c] > 0.f && g[c] > 0.f) ? na[c] * s / g[c] : 0.f;
}

}  // namespace triplet
}  // namespace cpu
}  // namespace flashdml
