// Blocked k-nearest-neighbour search on the CPU, shared by knn and re-ranking.
//
// Distances of a block of rows against a block of columns come from one GEMM (x.y^T) into a
// fixed-size buffer; a bounded heap per row keeps the best k + kRescoreMargin candidates, which
// are then rescored with the exact difference formula and re-sorted. Memory: the outputs, the
// heaps and one block, never M x N.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../common/distance_math.h"
#include "../common/topk_math.h"

namespace reid_ops {

constexpr int64_t kRowBlock = 1024;
constexpr int64_t kColBlock = 4096;

inline std::vector<float> row_factors(const at::Tensor& x, int64_t metric) {
  const auto squared = x.mul(x).sum(1).contiguous();  // float32 contiguous input
  const float* s = squared.data_ptr<float>();
  std::vector<float> out(x.size(0));
  for (int64_t i = 0; i < x.size(0); ++i) out[i] = row_factor(s[i], metric);
  return out;
}

struct KnnExtras {
  float* row_max = nullptr;     // optional: max expanded distance of each row over all columns
  float* dense_out = nullptr;   // optional: copy of columns [dense_col0, N) of every row < dense_rows
  int64_t dense_col0 = 0;
  int64_t dense_rows = 0;
};

// Turns one row of GEMM dot products into clamped distances, in place (a vectorisable loop), and
// returns the row's maximum.
inline float dots_to_distances(float* row, int64_t cols, float factor_i, const float* factors_j, int64_t metric) {
  float maximum = 0.0f;
  for (int64_t c = 0; c < cols; ++c) {
    float d = expanded_distance(row[c], factor_i, factors_j[c], metric);
    d = d > 0.0f ? d : 0.0f;
    row[c] = d;
    maximum = d > maximum ? d : maximum;
  }
  return maximum;
}

// Offers (distances[c], first_index + c) to a heap; most values fail the first comparison with
// the current worst candidate, so the heap is rarely touched.
inline void offer_row(const float* distances, int64_t cols, int64_t first_index, float* hd, int64_t* hi,
                      int64_t candidates) {
  for (int64_t c = 0; c < cols; ++c) {
    const float d = distances[c];
    if (d <= hd[0]) heap_offer(hd, hi, candidates, d, first_index + c);
  }
}

// All-vs-all kNN of the rows of x (x against itself): the distance matrix is symmetric, so only
// blocks on or above the diagonal are computed and each feeds the heaps of its rows and of its
// columns. Half the GEMM work of the general case.
inline void knn_self_blocked_cpu(const at::Tensor& x, int64_t k, int64_t metric, float* out_dist, int64_t* out_idx,
                                 const KnnExtras& extras) {
  constexpr int64_t kBlock = 4096;  // 64 MB per buffer; smaller blocks lose GEMM efficiency
  const int64_t N = x.size(0), D = x.size(1);
  const int64_t candidates = std::min(N, k + kRescoreMargin);
  const auto f = row_factors(x, metric);
  const float* xp = x.data_ptr<float>();
  const int64_t block = std::min(N, kBlock);
  auto buffer = at::empty({block, block}, x.options());
  auto buffer_t = at::empty({block, block}, x.options());
  std::vector<float> heap_d(N * candidates);
  std::vector<int64_t> heap_i(N * candidates);
  std::vector<float> row_max(N, 0.0f);
  for (int64_t i = 0; i < N; ++i) heap_init(&heap_d[i * candidates], &heap_i[i * candidates], candidates);
  for (int64_t r0 = 0; r0 < N; r0 += block) {
    const int64_t rows = std::min(block, N - r0);
    for (int64_t c0 = r0; c0 < N; c0 += block) {
      const int64_t cols = std::min(block, N - c0);
      auto tile = buffer.narrow(0, 0, rows).narrow(1, 0, cols);
      at::mm_out(tile, x.narrow(0, r0, rows), x.narrow(0, c0, cols).t());
      float* bp = tile.data_ptr<float>();
      const int64_t ld = tile.stride(0);
      // rows of the block: distances in place, then offers (i = r0 + r, j = c0 + c)
      at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t i = r0 + r;
          float* row = bp + r * ld;
          row_max[i] = std::max(row_max[i], dots_to_distances(row, cols, f[i], f.data() + c0, metric));
          if (extras.dense_out != nullptr && i < extras.dense_rows) {
            const int64_t width = N - extras.dense_col0;
            for (int64_t c = std::max<int64_t>(0, extras.dense_col0 - c0); c < cols; ++c) {
              extras.dense_out[i * width + (c0 + c - extras.dense_col0)] = row[c];
            }
          }
          offer_row(row, cols, c0, &heap_d[i * candidates], &heap_i[i * candidates], candidates);
        }
      });
      if (c0 == r0) continue;
      // columns of the block (j = c0 + c) see the rows (i = r0 + r) as their neighbours: read them
      // from a transposed copy (a strided column walk thrashes the TLB). A column j > every row i
      // here, so no dense copy is needed: the caller's dense block has query rows and gallery
      // columns, and queries come first.
      auto tile_t = buffer_t.narrow(0, 0, cols).narrow(1, 0, rows);
      tile_t.copy_(tile.t());
      const float* tp = tile_t.data_ptr<float>();
      const int64_t ld_t = tile_t.stride(0);
      at::parallel_for(0, cols, 8, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const int64_t j = c0 + c;
          const float* column = tp + c * ld_t;
          float maximum = row_max[j];
          for (int64_t r = 0; r < rows; ++r) maximum = column[r] > maximum ? column[r] : maximum;
          row_max[j] = maximum;
          offer_row(column, rows, r0, &heap_d[j * candidates], &heap_i[j * candidates], candidates);
        }
      });
    }
  }
  if (extras.row_max != nullptr) std::copy(row_max.begin(), row_max.end(), extras.row_max);
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      rescore_candidates(xp + i * D, xp, D, f[i], f.data(), metric, &heap_d[i * candidates], &heap_i[i * candidates],
                         candidates, k, out_dist + i * k, out_idx + i * k);
    }
  });
}

// x (M, D) and y (N, D) float32 contiguous. Writes k ascending (distance, index) pairs per row;
// distances are squared Euclidean / cosine (the caller takes roots for the Euclidean metric).
inline void knn_blocked_cpu(const at::Tensor& x, const at::Tensor& y, int64_t k, int64_t metric, float* out_dist,
                            int64_t* out_idx, const KnnExtras& extras = KnnExtras()) {
  if (x.is_same(y)) {
    knn_self_blocked_cpu(x, k, metric, out_dist, out_idx, extras);
    return;
  }
  TORCH_CHECK(extras.row_max == nullptr && extras.dense_out == nullptr,
              "knn_blocked_cpu: row maxima and dense copies are only produced for self-kNN");
  const int64_t M = x.size(0), N = y.size(0), D = x.size(1);
  const int64_t candidates = std::min(N, k + kRescoreMargin);
  const auto fx = row_factors(x, metric);
  const auto fy = row_factors(y, metric);
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const int64_t col_block = std::min(N, kColBlock);
  auto buffer = at::empty({std::min(M, kRowBlock), col_block}, x.options());
  std::vector<float> heap_d(std::min(M, kRowBlock) * candidates);
  std::vector<int64_t> heap_i(heap_d.size());

  for (int64_t r0 = 0; r0 < M; r0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, M - r0);
    for (int64_t r = 0; r < rows; ++r) heap_init(&heap_d[r * candidates], &heap_i[r * candidates], candidates);
    for (int64_t c0 = 0; c0 < N; c0 += col_block) {
      const int64_t cols = std::min(col_block, N - c0);
      auto block = buffer.narrow(0, 0, rows).narrow(1, 0, cols);
      at::mm_out(block, x.narrow(0, r0, rows), y.narrow(0, c0, cols).t());
      float* bp = block.data_ptr<float>();
      const int64_t ld = block.stride(0);
      at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          float* row = bp + r * ld;
          dots_to_distances(row, cols, fx[r0 + r], fy.data() + c0, metric);
          offer_row(row, cols, c0, &heap_d[r * candidates], &heap_i[r * candidates], candidates);
        }
      });
    }
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = r0 + r;
        rescore_candidates(xp + i * D, yp, D, fx[i], fy.data(), metric, &heap_d[r * candidates],
                           &heap_i[r * candidates], candidates, k, out_dist + i * k, out_idx + i * k);
      }
    });
  }
}

}  // namespace reid_ops
