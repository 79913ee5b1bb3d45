// Structural steps of k-reciprocal encoding (Zhong et al., "Re-ranking Person Re-identification
// with k-reciprocal Encoding", CVPR 2017), shared by the CPU and CUDA kernels. Everything works
// on a table `rank` of nearest-neighbour lists (row i = neighbours of point i, nearest first,
// leading dimension `ld`), never on an N x N matrix.
#pragma once

#include <cstdint>

#include "../../macros.h"

namespace reid_ops {

// The classic code squares M = [[q_q, q_g], [q_g^T, g_g]], divides each *column* by its maximum
// and transposes, so row i of its normalised matrix is column i of M. value(i, j) = M[j, i]^2.
struct DistanceRows {
  const float* qg;
  const float* qq;
  const float* gg;
  int64_t Q, G;

  REID_HOST_DEVICE float value(int64_t i, int64_t j) const {
    float r;
    if (j < Q) {
      r = i < Q ? qq[j * Q + i] : qg[j * G + (i - Q)];
    } else {
      r = i < Q ? qg[i * G + (j - Q)] : gg[(j - Q) * G + (i - Q)];
    }
    return r * r;
  }
};

// value / row maximum; row_max == 0 only when every distance of the row is 0 (the classic code
// then divides 0 by 0): such rows normalise to 0.
REID_HOST_DEVICE float normalise(float value, float maximum) { return maximum > 0.0f ? value / maximum : 0.0f; }

// R(i, k) of eq. 4: the j among the first `list_len` entries of rank[i] whose own first
// `list_len` entries contain i. Written to `out` in rank order; returns how many.
REID_HOST_DEVICE int64_t k_reciprocal_set(const int64_t* rank, int64_t ld, int64_t i, int64_t list_len,
                                          int64_t* out) {
  int64_t count = 0;
  const int64_t* forward = rank + i * ld;
  for (int64_t t = 0; t < list_len; ++t) {
    const int64_t j = forward[t];
    const int64_t* backward = rank + j * ld;
    for (int64_t u = 0; u < list_len; ++u) {
      if (backward[u] == i) {
        out[count++] = j;
        break;
      }
    }
  }
  return count;
}

// Capacity `out` needs for kreciprocal_expansion.
REID_HOST_DEVICE int64_t expansion_capacity(int64_t list_len, int64_t half_list_len) {
  return list_len * (1 + half_list_len);
}

// R*(i, k) of eq. 6: R(i, k) plus every R(c, k/2), c in R(i, k), that shares more than 2/3 of its
// members with R(i, k). Sorted and de-duplicated into `out` (capacity expansion_capacity(...));
// `scratch` holds half_list_len entries. Returns the size.
REID_HOST_DEVICE int64_t kreciprocal_expansion(const int64_t* rank, int64_t ld, int64_t i, int64_t list_len,
                                               int64_t half_list_len, int64_t* out, int64_t* scratch) {
  const int64_t core = k_reciprocal_set(rank, ld, i, list_len, out);
  int64_t size = core;
  for (int64_t a = 0; a < core; ++a) {
    const int64_t half = k_reciprocal_set(rank, ld, out[a], half_list_len, scratch);
    int64_t overlap = 0;
    for (int64_t s = 0; s < half; ++s) {
      for (int64_t b = 0; b < core; ++b) {
        if (out[b] == scratch[s]) {
          ++overlap;
          break;
        }
      }
    }
    if (3 * overlap > 2 * half) {  // |R(c,k/2) & R(i,k)| > 2/3 |R(c,k/2)|
      for (int64_t s = 0; s < half; ++s) out[size++] = scratch[s];
    }
  }
  // insertion sort + unique (sizes are a few dozen)
  for (int64_t a = 1; a < size; ++a) {
    const int64_t v = out[a];
    int64_t b = a - 1;
    while (b >= 0 && out[b] > v) {
      out[b + 1] = out[b];
      --b;
    }
    out[b + 1] = v;
  }
  int64_t unique = 0;
  for (int64_t a = 0; a < size; ++a) {
    if (unique == 0 || out[unique - 1] != out[a]) out[unique++] = out[a];
  }
  return unique;
}

// Position of j in the neighbour list row[0..len), or -1. Lists are short (k1 + 1 entries): a
// linear scan beats any index structure.
REID_HOST_DEVICE int64_t find_in_list(const int64_t* row, int64_t len, int64_t j) {
  for (int64_t t = 0; t < len; ++t) {
    if (row[t] == j) return t;
  }
  return -1;
}

// Gaussian-kernel weights of eq. 7 for one row: values[t] = exp(-d[t]) / sum exp(-d), in place.
template <typename ExpFn>
REID_HOST_DEVICE void gaussian_weights(float* values, int64_t count, ExpFn exp_fn) {
  float total = 0.0f;
  for (int64_t t = 0; t < count; ++t) {
    values[t] = exp_fn(-values[t]);
    total += values[t];
  }
  for (int64_t t = 0; t < count; ++t) values[t] = values[t] / total;
}

// Local query expansion (eq. 11): the mean of the sparse rows `rows[0..num_rows)` of V (CSR,
// columns sorted). Columns are merged in ascending order and each column sums its values in the
// order of `rows` before dividing, as numpy's mean over axis 0 does. `cursor` holds num_rows
// entries. Writes sorted columns/values to out_*, returns their count. With out_* null it only counts.
REID_HOST_DEVICE int64_t merge_rows_mean(const int64_t* indptr, const int64_t* indices, const float* values,
                                         const int64_t* rows, int64_t num_rows, int64_t* cursor,
                                         int64_t* out_indices, float* out_values) {
  for (int64_t r = 0; r < num_rows; ++r) cursor[r] = indptr[rows[r]];
  int64_t count = 0;
  while (true) {
    int64_t column = INT64_MAX;
    for (int64_t r = 0; r < num_rows; ++r) {
      if (cursor[r] < indptr[rows[r] + 1] && indices[cursor[r]] < column) column = indices[cursor[r]];
    }
    if (column == INT64_MAX) return count;
    float total = 0.0f;
    for (int64_t r = 0; r < num_rows; ++r) {
      if (cursor[r] < indptr[rows[r] + 1] && indices[cursor[r]] == column) {
        total += values[cursor[r]];
        ++cursor[r];
      }
    }
    if (out_indices != nullptr) {
      out_indices[count] = column;
      out_values[count] = total / static_cast<float>(num_rows);
    }
    ++count;
  }
}

// Jaccard distance of eq. 10 from s = sum_k min(V'_ik, V'_jk) (rows of V' sum to 1, so the union
// term sum_k max(...) equals 2 - s).
REID_HOST_DEVICE float jaccard_from_overlap(float overlap) { return 1.0f - overlap / (2.0f - overlap); }

}  // namespace reid_ops
