// Blocked k-nearest-neighbour search on the CPU, shared by knn and re-ranking.
//
// Distances of a block of rows against a block of columns come from one GEMM (x.y^T) into a
// fixed-size buffer; a bounded heap per row keeps the best k + kRescoreMargin candidates, which
// are then rescored with the exact difference formula and re-sorted. Memory: the outputs plus one
// block, never M x N.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../common/distance_math.h"
#include "../common/topk_math.h"

namespace reid_ops {

constexpr int64_t kRescoreMargin = 8;
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

// x (M, D) and y (N, D) float32 contiguous. Writes k ascending (distance, index) pairs per row;
// distances are squared Euclidean / cosine (the caller takes roots for the Euclidean metric).
inline void knn_blocked_cpu(const at::Tensor& x, const at::Tensor& y, int64_t k, int64_t metric, float* out_dist,
                            int64_t* out_idx, const KnnExtras& extras = KnnExtras()) {
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
    if (extras.row_max != nullptr) std::fill(extras.row_max + r0, extras.row_max + r0 + rows, 0.0f);
    for (int64_t c0 = 0; c0 < N; c0 += col_block) {
      const int64_t cols = std::min(col_block, N - c0);
      auto block = buffer.narrow(0, 0, rows).narrow(1, 0, cols);
      at::mm_out(block, x.narrow(0, r0, rows), y.narrow(0, c0, cols).t());
      const float* bp = block.data_ptr<float>();
      const int64_t ld = block.stride(0);
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t i = r0 + r;
          float* hd = &heap_d[r * candidates];
          int64_t* hi = &heap_i[r * candidates];
          float local_max = extras.row_max != nullptr ? extras.row_max[i] : 0.0f;
          const bool copy_dense = extras.dense_out != nullptr && i < extras.dense_rows;
          for (int64_t c = 0; c < cols; ++c) {
            const int64_t j = c0 + c;
            float d = expanded_distance(bp[r * ld + c], fx[i], fy[j], metric);
            d = d > 0.0f ? d : 0.0f;
            local_max = d > local_max ? d : local_max;
            if (copy_dense && j >= extras.dense_col0) {
              extras.dense_out[i * (N - extras.dense_col0) + (j - extras.dense_col0)] = d;
            }
            heap_offer(hd, hi, candidates, d, j);
          }
          if (extras.row_max != nullptr) extras.row_max[i] = local_max;
        }
      });
    }
    // exact rescoring of the candidates, then keep the best k
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = r0 + r;
        float* hd = &heap_d[r * candidates];
        int64_t* hi = &heap_i[r * candidates];
        for (int64_t t = 0; t < candidates; ++t) {
          hd[t] = exact_distance(xp + i * D, yp + hi[t] * D, D, fx[i], fy[hi[t]], metric);
        }
        // insertion sort by (distance, index)
        for (int64_t a = 1; a < candidates; ++a) {
          const float vd = hd[a];
          const int64_t vi = hi[a];
          int64_t b = a - 1;
          while (b >= 0 && pair_less(vd, vi, hd[b], hi[b])) {
            hd[b + 1] = hd[b];
            hi[b + 1] = hi[b];
            --b;
          }
          hd[b + 1] = vd;
          hi[b + 1] = vi;
        }
        std::copy(hd, hd + k, out_dist + i * k);
        std::copy(hi, hi + k, out_idx + i * k);
      }
    });
  }
}

}  // namespace reid_ops
