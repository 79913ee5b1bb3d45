#pragma once

#include <ATen/ATen.h>

namespace reid_ops {

// metric: 0 squared Euclidean, 1 Euclidean, 2 cosine distance (see common/distance_math.h).
at::Tensor pairwise_distance(const at::Tensor& x, const at::Tensor& y, int64_t metric);
std::tuple<at::Tensor, at::Tensor> knn(const at::Tensor& x, const at::Tensor& y, int64_t k, int64_t metric);

}  // namespace reid_ops
