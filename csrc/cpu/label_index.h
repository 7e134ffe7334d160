// Label bookkeeping shared by the CPU kernels of label-aware losses.
//  * dense int32 class ids (columns: their class among the distinct ref_labels; rows: the same id, or -1 when
//    the row's label never occurs among the references), so "is (i, j) a negative" is one int32 compare that
//    vectorises next to the fp32 tile math;
//  * a CSR list of each class's reference columns in increasing order, so a row's positives inside any column
//    tile are a contiguous sub-range found by binary search (positives are sparse: no scan of the whole row).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace flashdml {
namespace cpu {

struct LabelIndex {
  std::vector<int32_t> row_class;   // [B], -1: no reference shares this label
  std::vector<int32_t> col_class;   // [M]
  std::vector<int64_t> class_start; // [C + 1] offsets into cols_by_class
  std::vector<int64_t> cols_by_class; // [M] reference columns grouped by class, increasing within a class

  // Reference columns of row i's class in [c0, c1) (empty when the row's label is absent).
  std::pair<const int64_t*, const int64_t*> positives_in(int64_t i, int64_t c0, int64_t c1) const {
    const int32_t c = row_class[i];
    if (c < 0) return {nullptr, nullptr};
    const int64_t* b = cols_by_class.data() + class_start[c];
    const int64_t* e = cols_by_class.data() + class_start[c + 1];
    return {std::lower_bound(b, e, c0), std::lower_bound(b, e, c1)};
  }

  // Number of positive pairs (i, j), minus the diagonal in self mode.
  int64_t num_positive_pairs(bool self_mode) const {
    int64_t n = 0;
    for (int32_t c : row_class)
      if (c >= 0) n += class_start[c + 1] - class_start[c];
    if (self_mode) n -= int64_t(row_class.size());
    return n;
  }
};

inline LabelIndex build_label_index(const at::Tensor& labels_in, const at::Tensor& ref_labels_in) {
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const at::Tensor refs = ref_labels_in.to(at::kLong).contiguous();
  const int64_t B = labels.size(0), M = refs.size(0);
  const int64_t* lp = labels.data_ptr<int64_t>();
  const int64_t* rp = refs.data_ptr<int64_t>();
  LabelIndex idx;
  // Stable order of columns by label value: classes in increasing label order, columns increasing inside.
  std::vector<int64_t> order(M);
  for (int64_t j = 0; j < M; ++j) order[j] = j;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return rp[a] < rp[b]; });
  std::vector<int64_t> class_label;
  idx.col_class.resize(M);
  idx.cols_by_class = order;
  for (int64_t k = 0; k < M; ++k) {
    const int64_t j = order[k];
    if (class_label.empty() || class_label.back() != rp[j]) {
      class_label.push_back(rp[j]);
      idx.class_start.push_back(k);
    }
    idx.col_class[j] = int32_t(class_label.size() - 1);
  }
  idx.class_start.push_back(M);
  idx.row_class.resize(B);
  for (int64_t i = 0; i < B; ++i) {
    auto it = std::lower_bound(class_label.begin(), class_label.end(), lp[i]);
    idx.row_class[i] = (it != class_label.end() && *it == lp[i]) ? int32_t(it - class_label.begin()) : -1;
  }
  return idx;
}

}  // namespace cpu
}  // namespace flashdml
