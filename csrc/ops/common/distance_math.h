// Distance arithmetic shared by the CPU and CUDA kernels of pairwise_distance / knn / re-ranking.
//
// Distances are computed with the GEMM expansion ||x||^2 + ||y||^2 - 2 x.y, which loses all
// accuracy for near-identical rows (catastrophic cancellation). Entries that fall below
// kRefineFraction of the norms are therefore recomputed directly from the difference of the two
// rows; identical rows give exactly 0 for every metric.
#pragma once

#include <cmath>
#include <cstdint>

#include "../../macros.h"

namespace reid_ops {

enum Metric : int64_t { kSqEuclidean = 0, kEuclidean = 1, kCosine = 2 };

constexpr float kRefineFraction = 1e-3f;
constexpr float kMinNorm = 1e-12f;

// Per-row factor used by the expansion: the squared norm (Euclidean metrics) or the inverse norm
// (cosine; zero rows get 1/kMinNorm so that their cosine similarity with anything is 0).
REID_HOST_DEVICE float row_factor(float squared_norm, int64_t metric) {
  if (metric == kCosine) {
    const float norm = sqrtf(squared_norm);
    return 1.0f / (norm > kMinNorm ? norm : kMinNorm);
  }
  return squared_norm;
}

// Squared Euclidean distance (Euclidean metrics) or cosine distance from a dot product.
REID_HOST_DEVICE float expanded_distance(float dot, float factor_x, float factor_y, int64_t metric) {
  if (metric == kCosine) return 1.0f - dot * factor_x * factor_y;
  return factor_x + factor_y - 2.0f * dot;
}

REID_HOST_DEVICE bool needs_exact_distance(float expanded, float factor_x, float factor_y, int64_t metric) {
  if (metric == kCosine) return expanded < 2.0f * kRefineFraction;
  return expanded < kRefineFraction * (factor_x + factor_y);
}

// Direct computation: sum (x - y)^2, or for cosine ||x/|x| - y/|y| ||^2 / 2 (= 1 - cos).
// Accumulates in double over 8 fixed lanes: vectorisable, yet the summation order never depends
// on the rows' addresses, so equal rows always give bit-identical distances (ties stay ties).
REID_HOST_DEVICE float exact_distance(const float* x, const float* y, int64_t dim, float factor_x,
                                      float factor_y, int64_t metric) {
  const bool cosine = metric == kCosine;
  const float sx = cosine ? factor_x : 1.0f;
  const float sy = cosine ? factor_y : 1.0f;
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8) {
    for (int l = 0; l < 8; ++l) {
      const double diff = static_cast<double>(x[d + l] * sx - y[d + l] * sy);
      lanes[l] += diff * diff;
    }
  }
  double tail = 0.0;
  for (; d < dim; ++d) {
    const double diff = static_cast<double>(x[d] * sx - y[d] * sy);
    tail += diff * diff;
  }
  const double total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                       ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) + tail;
  return static_cast<float>(cosine ? 0.5 * total : total);
}

// Final value reported to the user: clamps rounding noise and takes the root for "euclidean".
REID_HOST_DEVICE float finish_distance(float value, int64_t metric) {
  value = value > 0.0f ? value : 0.0f;
  return metric == kEuclidean ? sqrtf(value) : value;
}

}  // namespace reid_ops
