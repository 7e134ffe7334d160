// The backward of the CPU contextual loss (docs/spec.md §2.5) without any S tile: the closed-form straight-through gradient
// dL_ctx/dS = s_ctx · C ⊙ (SP + u 1ᵀ + LB) is split into
//  * X: the sparse part (O(|N|²) per row, from the neighbour lists), with the small classes' label block and the
//    C = 0 corrections folded in, applied as (X + Xᵀ) F: for B < kKnApartRows (where a row of X has about B
//    non-zeros anyway) through dense row blocks and GEMMs (apply_sparse_dense), else stored with its transpose
//    (apply_sparse_stored);
//  * for B >= kKnApartRows, the two widest pieces of X taken out of it and applied through column-chunked [B, ·]
//    intermediates (apply_factored): K N (the GI / GJ products with N) and the dense part ½ GW' ⊙ (1 − a_j/c_i)
//    of GW' ⊙ H;
//  * u 1ᵀ and the big classes' label block through column and class sums (O(B·d), in contextual.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "contextual_grad.h"
#include "contextual_sparse.h"
#include "flashdml/contextual.h"
#include "label_index.h"

namespace flashdml {
namespace cpu {
namespace ctx {

// --------------------------------------------------------------------------------------------- backward
struct Backward {
  const BatchView p;
  const std::vector<uint8_t>& big;  // per class: label block applied through class sums, not as sparse entries
  const Nbr& nb;
  const Context& cx;
  double beta;
  std::vector<double> gr, gwn, u, gp1, gp2;
  bool kn_apart = false;  // K N (the GI N, GIᵀ N, GJ N, GJᵀ N products) applied as K (N F) + Nᵀ (K F), not in X

  // K = Kr + Krᵀ, Kr_il = ½ GW_il (1/a_i + 1/c_i) on the entries e = (i, l) of N.
  double kr(int64_t e, int64_t i) const { return 0.5 * gwn[e] * (1.0 / cx.a[i] + 1.0 / cx.c[i]); }
  // (K N)_ij, for the clamped entries (binary searches: there are few of them).
  double kn_at(int64_t i, int32_t j) const {
    double v = 0.0;
    for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e)
      if (nb.find(nb.col[e], j) >= 0) v += kr(e, i);
    for (int64_t q = nb.tptr[i]; q < nb.tptr[i + 1]; ++q)
      if (nb.find(nb.trow[q], j) >= 0) v += kr(nb.tpos[q], nb.trow[q]);
    return v;
  }

  bool same(int64_t i, int64_t j) const { return p.cls.row_class[i] == p.cls.row_class[j]; }
  // G_ij = dL_ctx/dZ_ij = β (js_ij − y_ij) [i ≠ j].
  double G(int64_t i, int32_t j) const { return i == j ? 0.0 : beta * (cx.js.at(i, j) - (same(i, j) ? 1.0 : 0.0)); }
  void prepare() {
    const int64_t B = p.B;
    gr.assign(B, 0.0);
    gwn.assign(nb.ptr[B], 0.0);
    u.assign(B, 0.0);
    for_each_row(B, [&](int64_t, int64_t i) {
      double s = 0.0;
      for (int64_t e = cx.js.begin(i); e < cx.js.end(i); ++e) {  // Σ_j G_ij Z_ij
        const int32_t j = cx.js.col[e];
        if (j != i) s += beta * (cx.js.val[e] - (same(i, j) ? 1.0 : 0.0)) * cx.zj[e];
      }
      gr[i] = -s / cx.r[i];
      // GW_il = Σ_{m∈R(i)} G_ml / r_m on l ∈ N(i)
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
        const int32_t l = nb.col[e];
        double g = 0.0;
        for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) g += G(cx.R.col[q], l) / cx.r[cx.R.col[q]];
        gwn[e] = g;
      }
    });
    // u_i = −(Σ_l GJ_il + Σ_l GJ_li); GP on the entries e = (l, i) of N with i ∈ P(l): GR_li (h1, in row l's
    // turn) + GR_il (h2, in row i's turn), each with that row of js scattered densely.
    gp1.assign(nb.ptr[B], 0.0);
    gp2.assign(nb.ptr[B], 0.0);
    const int64_t T = num_row_tasks(B);
    std::vector<SparseAcc> dense(T, SparseAcc(B));
    for_each_row(B, [&](int64_t t, int64_t a) {
      double s = 0.0;
      for (int64_t e = nb.ptr[a]; e < nb.ptr[a + 1]; ++e) s += 0.5 * gwn[e] / cx.c[a];
      for (int64_t q = nb.tptr[a]; q < nb.tptr[a + 1]; ++q) s += 0.5 * gwn[nb.tpos[q]] / cx.c[nb.trow[q]];
      u[a] = -s;
      SparseAcc& js_a = dense[t];
      for (int64_t e = cx.js.begin(a); e < cx.js.end(a); ++e) js_a.set(cx.js.col[e], cx.js.val[e]);
      const int32_t ca = p.cls.row_class[a];
      auto GRa = [&](int64_t b) {  // GR_ab = (1/r_a) Σ_{j∈N(b)} G_aj W_bj + gr_a, G_aj from the dense js row
        double acc = 0.0;
        for (int64_t e = nb.ptr[b]; e < nb.ptr[b + 1]; ++e) {
          const int32_t j = nb.col[e];
          if (j == a) continue;
          acc += beta * (js_a.v[j] - (p.cls.row_class[j] == ca ? 1.0 : 0.0)) * cx.w[e];
        }
        return acc / cx.r[a] + gr[a];
      };
      for (int64_t e = nb.ptr[a]; e < nb.ptr[a + 1]; ++e)
        if (nb.flag[e] & kCtxInP) gp1[e] = GRa(nb.col[e]);
      for (int64_t q = nb.tptr[a]; q < nb.tptr[a + 1]; ++q)
        if (nb.flag[nb.tpos[q]] & kCtxInP) gp2[nb.tpos[q]] = GRa(nb.trow[q]);
      js_a.clear();
    });
  }

  // X = the sparse part SP of GN + GP (GN + GP = SP + u 1ᵀ + LB) plus the label block of the small classes, with
  // the clamped entries set so that X + u 1ᵀ + LB_big vanishes there (C ⊙ is applied); rows unsorted.
  struct RowScratch {
    SparseAcc an, ag, o;
    std::vector<double> rh;
    RowScratch(int64_t B, int64_t nc) : an(B), ag(B), o(B), rh(nc, 0.0) {}
  };

  // Row i of X, emit(j, X_ij) for each non-zero (columns unsorted).
  template <typename Emit>
  void sparse_row(RowScratch& sc, int64_t i, const Emit& emit) const {
    sparse_row_into(sc, i, sc.o);
    for (int32_t j : sc.o.idx) emit(j, sc.o.v[j]);
    sc.o.clear();
  }
  // A dense row as the target of sparse_row_into (for rows with about B non-zeros): no column bookkeeping.
  struct DenseRow {
    double* v;
    void add(int32_t j, double x) { v[j] += x; }
    void set(int32_t j, double x) { v[j] = x; }
  };
  // Row i of X accumulated into o (o.add / o.set per entry).
  template <typename Out>
  void sparse_row_into(RowScratch& sc, int64_t i, Out& o) const {
    const int64_t B = p.B;
    const int32_t* cl = p.cls.row_class.data();
    {
      SparseAcc &an = sc.an, &ag = sc.ag;
      std::vector<double>& rh = sc.rh;
      const double ai = cx.a[i], ci = cx.c[i], s_ac = 1.0 / ai + 1.0 / ci;
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {  // n_ij = |N(i) ∩ N(j)|
        const int32_t l = nb.col[e];
        for (int64_t q = nb.tptr[l]; q < nb.tptr[l + 1]; ++q) an.add(nb.trow[q], 1.0);
      }
      // With kn_apart, GW' is needed only where n_ij != 0 and on the clamped entries (touched in an, value 0).
      if (kn_apart)
        for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e)
          if (nb.flag[e] & kCtxClamped) an.touch(nb.col[e]);
      for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) {  // js-driven part of GW, and ρ_i
        const int32_t m = cx.R.col[q];
        const double wm = beta / cx.r[m];
        for (int64_t e = cx.js.begin(m); e < cx.js.end(m); ++e) {
          const int32_t j = cx.js.col[e];
          if (j != m && (!kn_apart || an.on[j])) ag.add(j, wm * cx.js.val[e]);
        }
        if (!kn_apart || an.on[m]) ag.add(m, wm);  // the label part's own diagonal m = j removed from the class sum
        rh[cl[m]] += 1.0 / cx.r[m];
      }
      // GW' ⊙ H (H = ½(1 − a_j/c_i) + ½ n_ij (1/a_i + 1/c_i)) and the label part of GW times the n part of H
      // GW'⊙H, H_ij = ½ s_ac n_ij + ½(1 − a_j/c_i): with kn_apart the second part (T2) goes through apply_factored
      for (int32_t j : ag.idx)
        if (!kn_apart) o.add(j, ag.v[j] * ctx_h(an.v[j], ai, cx.a[j], double(B)));
        else if (an.v[j] != 0.0) o.add(j, ag.v[j] * 0.5 * an.v[j] * s_ac);
      for (int32_t j : an.idx) {
        const double rj = rh[cl[j]];
        if (rj != 0.0) o.add(j, -beta * rj * 0.5 * an.v[j] * s_ac);
      }
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1] && !kn_apart; ++e) {  // GI N − (GJ M − gj 1ᵀ), sparse parts
        const int32_t l = nb.col[e];
        const double coef = kr(e, i);
        for (int64_t e2 = nb.ptr[l]; e2 < nb.ptr[l + 1]; ++e2) o.add(nb.col[e2], coef);
      }
      for (int64_t q = nb.tptr[i]; q < nb.tptr[i + 1]; ++q) {  // GIᵀ N − (GJᵀ M − gjt 1ᵀ), and GP
        const int32_t l = nb.trow[q];
        const double coef = kr(nb.tpos[q], l);
        if (!kn_apart)
          for (int64_t e2 = nb.ptr[l]; e2 < nb.ptr[l + 1]; ++e2) o.add(nb.col[e2], coef);
        if (nb.flag[nb.tpos[q]] & kCtxInP) o.add(l, gp1[nb.tpos[q]] + gp2[nb.tpos[q]]);  // GP_il = P_li (GR_il + GR_li)
      }
      // LB_ij = −(β/2) ρ_i(κ_j)(1 − a_j/c_i) of the small classes, as sparse entries (each class once)
      for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) {
        const int32_t kc = cl[cx.R.col[q]];
        if (big[kc] || rh[kc] == 0.0) continue;
        const double w = -0.5 * beta * rh[kc];
        for (int64_t m = p.cls.class_start[kc]; m < p.cls.class_start[kc + 1]; ++m) {
          const int64_t j = p.cls.cols_by_class[m];
          o.add(int32_t(j), w * (1.0 - cx.a[j] / ci));
        }
        rh[kc] = 0.0;
      }
      // C_ij = 0 (clamped) entries: the whole ctx gradient there, SP + u_i + LB_ij, is removed
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
        if (!(nb.flag[e] & kCtxClamped)) continue;
        const int32_t j = nb.col[e];
        const double lb_big = big[cl[j]] ? -0.5 * beta * rh[cl[j]] * (1.0 - cx.a[j] / ci) : 0.0;
        const double t2 = kn_apart && ag.on[j] ? 0.5 * ag.v[j] * (1.0 - cx.a[j] / ci) : 0.0;
        o.set(j, -u[i] - lb_big - (kn_apart ? kn_at(i, j) + t2 : 0.0));
      }
      an.clear();
      ag.clear();
      for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) rh[cl[cx.R.col[q]]] = 0.0;
    }
  }

  // dF += s_ctx ((K N) + (K N)ᵀ + T2 + T2ᵀ) F through [B, ·] intermediates, every update row-owned:
  //   K N:  K (N F) + Nᵀ (K F)  (K symmetric), NF and KF interleaved per row;
  //   T2 = ½ GW' ⊙ (1 − a_j/c_i) with GW' = β R D_r E (E = js off the diagonal, 1 on it; E, R symmetric):
  //   T2 F = ½β [R D_r (E F) − D_1/c R D_r E (D_a F)],  T2ᵀ F = ½β [E C − D_a E Cc],  C = D_r R F, Cc = D_r R D_1/c F
  //   (D_r = diag(1/r)). E is never formed: js = ½(D_r R W + Wᵀ R D_r) (docs/spec.md §2.5 steps 6-7), so
  //   E Y = ½[D_r R (W Y) + Wᵀ (R (D_r Y))] + (1 − js_ii) Y_i: short-list gathers (|N| and |R| per row, each way)
  //   instead of one per entry of js (|js(i)| ≈ 2|R||N|); Y = [F | D_a F | C | Cc] becomes E Y in place.
  // Everything is linear in F's columns, so it runs over chunks of kFeatureChunk columns: the five intermediates
  // are then B x (14·kFeatureChunk) floats in all (29 MiB at B = 4096: about the L3; allocated once), not B x 6d.
  static constexpr int64_t kFeatureChunk = 128;
  void apply_factored(const Rows& rows, float* D, double s_ctx) const {
    const int64_t B = p.B, d = p.d, w = std::min(kFeatureChunk, d);
    auto rows_parallel = [&](auto&& fn) { for_each_row(B, [&](int64_t, int64_t i) { fn(i); }); };
    std::vector<float> krv(nb.ptr[B]), keep(B);  // K's entries kr(e, i) on N; 1 − js_ii (E's diagonal minus js's)
    rows_parallel([&](int64_t i) {
      for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) krv[e] = float(kr(e, i));
      keep[i] = float(1.0 - cx.js.at(i, int32_t(i)));
    });
    // Uninitialised: every row of NK and Y is written in the first pass of a chunk, of WY and RY in the second.
    const std::unique_ptr<float[]> NK(new float[B * 2 * w]), Y(new float[B * 4 * w]), WY(new float[B * 4 * w]),
        RY(new float[B * 4 * w]);
    const double h = 0.5 * beta * s_ctx;
    for (int64_t q0 = 0; q0 < d; q0 += w) {
      const int64_t n = std::min(w, d - q0), n2 = 2 * n, n4 = 4 * n;  // rows of NK: 2n, of Y, WY, RY: 4n
      auto axpy = [](float* out, const float* in, float c, int64_t m) {
#pragma omp simd
        for (int64_t q = 0; q < m; ++q) out[q] += c * in[q];
      };
      auto f = [&](int64_t l) { return rows.row(l) + q0; };
      rows_parallel([&](int64_t i) {  // NK = [N F | K F], Y = [F | D_a F | C | Cc]
        float *nf = NK.get() + i * n2, *kf = nf + n, *y = Y.get() + i * n4;
        std::fill_n(nf, n2, 0.f);
        std::fill_n(y, n4, 0.f);
        for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) {
          const int32_t l = nb.col[e];
          axpy(nf, f(l), rows.s(l), n);
          axpy(kf, f(l), krv[e] * rows.s(l), n);
        }
        for (int64_t q = nb.tptr[i]; q < nb.tptr[i + 1]; ++q) {
          const int32_t l = nb.trow[q];
          axpy(kf, f(l), krv[nb.tpos[q]] * rows.s(l), n);
        }
        axpy(y, f(i), rows.s(i), n);
        axpy(y + n, f(i), float(cx.a[i]) * rows.s(i), n);
        for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) {
          const int32_t m = cx.R.col[q];
          axpy(y + n2, f(m), float(1.0 / cx.r[i]) * rows.s(m), n);
          axpy(y + 3 * n, f(m), float(1.0 / (cx.r[i] * cx.c[m])) * rows.s(m), n);
        }
      });
      rows_parallel([&](int64_t l) {  // W Y and R D_r Y
        float *wy = WY.get() + l * n4, *ry = RY.get() + l * n4;
        std::fill_n(wy, n4, 0.f);
        std::fill_n(ry, n4, 0.f);
        for (int64_t e = nb.ptr[l]; e < nb.ptr[l + 1]; ++e) axpy(wy, Y.get() + nb.col[e] * n4, float(cx.w[e]), n4);
        for (int64_t q = cx.R.begin(l); q < cx.R.end(l); ++q) {
          const int32_t m = cx.R.col[q];
          axpy(ry, Y.get() + m * n4, float(1.0 / cx.r[m]), n4);
        }
      });
      rows_parallel([&](int64_t i) {  // Y_i <- (E Y)_i (reads row i of Y only)
        float* y = Y.get() + i * n4;
#pragma omp simd
        for (int64_t q = 0; q < n4; ++q) y[q] *= keep[i];
        for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) axpy(y, WY.get() + cx.R.col[q] * n4, float(0.5 / cx.r[i]), n4);
        for (int64_t q = nb.tptr[i]; q < nb.tptr[i + 1]; ++q)
          axpy(y, RY.get() + nb.trow[q] * n4, float(0.5 * cx.w[nb.tpos[q]]), n4);
      });
      rows_parallel([&](int64_t i) {
        float* out = D + i * d + q0;
        auto axpy2 = [&](const float* in, float c1, float c2) {  // out += c1 in[0:n] + c2 in[n:2n]
#pragma omp simd
          for (int64_t q = 0; q < n; ++q) out[q] += c1 * in[q] + c2 * in[n + q];
        };
        const float sc = float(s_ctx);
        for (int64_t e = nb.ptr[i]; e < nb.ptr[i + 1]; ++e) axpy(out, NK.get() + nb.col[e] * n2, sc * krv[e], n);
        for (int64_t q = nb.tptr[i]; q < nb.tptr[i + 1]; ++q)
          axpy2(NK.get() + nb.trow[q] * n2, sc * krv[nb.tpos[q]], sc);
        for (int64_t q = cx.R.begin(i); q < cx.R.end(i); ++q) {  // R D_r (E F) and R D_r E (D_a F)
          const int64_t m = cx.R.col[q];
          axpy2(Y.get() + m * n4, float(h / cx.r[m]), float(-h / (cx.r[m] * cx.c[i])));
        }
        axpy2(Y.get() + i * n4 + n2, float(h), float(-h * cx.a[i]));  // E C − D_a E Cc, row i
      });
    }
  }

  // dF += s_ctx (X + Xᵀ) F with X and Xᵀ stored (B >= kKnApartRows, where X is short): row-owned gathers only
  // (the transpose XT is built so that every output row is written by the one task that owns it).
  void apply_sparse_stored(const Rows& rows, float* D, double s_ctx) const {
    const int64_t B = p.B, d = p.d, nc = num_classes(p.cls);
    std::vector<RowScratch> sc;
    for (int64_t t = 0; t < num_row_tasks(B); ++t) sc.emplace_back(B, nc);  // the tasks build_rows runs
    const Csr X = build_rows(B, [&](int64_t t, int64_t i, std::vector<int32_t>& cols, std::vector<double>& vals) {
      sparse_row(sc[t], i, [&](int32_t j, double v) {
        cols.push_back(j);
        vals.push_back(v);
      });
    });
    sc.clear();
    const Csr XT = transpose(X, B);
    const int64_t T = stage_tasks(B, B);
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t i = t0 * B / T; i < t1 * B / T; ++i) {
        float* out = D + i * d;
        for (const Csr* m : {&X, &XT})
          for (int64_t e = m->begin(i); e < m->end(i); ++e) {
            const int32_t j = m->col[e];
            const float w = float(s_ctx * m->val[e]) * rows.s(j);
            const float* f = rows.row(j);
#pragma omp simd
            for (int64_t q = 0; q < d; ++q) out[q] += w * f[q];
          }
      }
    });
  }

  // dF += s_ctx (X + Xᵀ) F for small batches, where a row of X has about as many non-zeros as B: blocks of
  // kDenseBlockRows rows of X are written densely (scaled by the row norms, F = diag(s) x) and applied with two GEMMs,
  // D[block] += (X_b diag(s)) x and D += (diag(s_b) X_b)ᵀ x[block]. Memory 2·kDenseBlockRows·B floats.
  static constexpr int64_t kDenseBlockRows = 64;
  void apply_sparse_dense(const Rows& rows, at::Tensor& dx, double s_ctx) const {
    const int64_t B = p.B, d = p.d, nc = num_classes(p.cls);
    const at::Tensor x = at::from_blob(const_cast<float*>(rows.x), {B, d}, dx.options());
    at::Tensor xs = at::empty({kDenseBlockRows, B}, dx.options()), xt = at::empty({kDenseBlockRows, B}, dx.options());
    const int64_t T = std::min<int64_t>(at::get_num_threads(), kDenseBlockRows);
    std::vector<RowScratch> sc;
    for (int64_t t = 0; t < T; ++t) sc.emplace_back(B, nc);
    std::vector<std::vector<double>> dense(T, std::vector<double>(B));
    for (int64_t r0 = 0; r0 < B; r0 += kDenseBlockRows) {
      const int64_t rn = std::min(kDenseBlockRows, B - r0);
      float* a = xs.data_ptr<float>();
      float* b = xt.data_ptr<float>();
      at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {  // task t writes rows [t·rn/T, (t+1)·rn/T) of the block
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t r = t * rn / T; r < (t + 1) * rn / T; ++r) {
            double* v = dense[t].data();
            std::fill_n(v, B, 0.0);
            DenseRow row{v};
            sparse_row_into(sc[t], r0 + r, row);
            const float si = rows.s(r0 + r);
            float *ar = a + r * B, *br = b + r * B;
            for (int64_t j = 0; j < B; ++j) {
              const float w = float(s_ctx * v[j]);
              ar[j] = w * rows.s(j);
              br[j] = w * si;
            }
          }
      });
      at::Tensor rows_out = dx.narrow(0, r0, rn);
      at::addmm_out(rows_out, rows_out, xs.narrow(0, 0, rn), x);
      at::addmm_out(dx, dx, xt.narrow(0, 0, rn).t(), x.narrow(0, r0, rn));
    }
  }
};

// Class sums for the label block of the big classes: SF = Σ_{j∈κ} F_j, SaF = Σ_{j∈κ} a_j F_j and
// V = Σ_{m∈κ} Σ_{i∈R(m)} F_i / r_m, U = the same with 1 / (r_m c_i), so that
//   (LB F)_i  = −(β/2) Σ_{m∈R(i), κ_m big} (SF_κm − SaF_κm / c_i) / r_m,   (LBᵀ F)_j = −(β/2)(V_κj − a_j U_κj).
struct BigClassSums {
  std::vector<int64_t> slot;  // per class, index into the sums or -1
  std::vector<double> SF, SaF, V, U;  // [n_big, d]
};

inline BigClassSums big_class_sums(const BatchView& p, const Context& cx, const std::vector<uint8_t>& big) {
  BigClassSums s;
  const int64_t nc = num_classes(p.cls), d = p.d;
  s.slot.assign(nc, -1);
  int64_t n = 0;
  for (int64_t c = 0; c < nc; ++c)
    if (big[c]) s.slot[c] = n++;
  s.SF.assign(n * d, 0.0);
  s.SaF.assign(n * d, 0.0);
  s.V.assign(n * d, 0.0);
  s.U.assign(n * d, 0.0);
  for (int64_t c = 0; c < nc; ++c) {
    if (!big[c]) continue;
    const int64_t o = s.slot[c] * d;
    for (int64_t q = p.cls.class_start[c]; q < p.cls.class_start[c + 1]; ++q) {
      const int64_t m = p.cls.cols_by_class[q];
      axpy_row(s.SF.data() + o, p.rows, m, 1.0);
      axpy_row(s.SaF.data() + o, p.rows, m, cx.a[m]);
      for (int64_t e = cx.R.begin(m); e < cx.R.end(m); ++e) {
        const int32_t i = cx.R.col[e];
        axpy_row(s.V.data() + o, p.rows, i, 1.0 / cx.r[m]);
        axpy_row(s.U.data() + o, p.rows, i, 1.0 / (cx.r[m] * cx.c[i]));
      }
    }
  }
  return s;
}

}  // namespace ctx
}  // namespace cpu
}  // namespace flashdml
