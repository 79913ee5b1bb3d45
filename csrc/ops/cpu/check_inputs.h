// Input checks shared by the CPU and CUDA kernels of every op.
#pragma once

#include <ATen/ATen.h>

namespace reid_ops {

inline void check_features(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be a 2-D (num_samples, dim) tensor, got shape ", t.sizes());
  TORCH_CHECK(t.size(0) > 0, name, " is empty (0 rows)");
  TORCH_CHECK(t.size(1) > 0, name, " has 0 feature dimensions");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

inline void check_same_dim(const at::Tensor& x, const at::Tensor& y, const char* xn, const char* yn) {
  TORCH_CHECK(x.size(1) == y.size(1), "feature dimensions differ: ", xn, " has ", x.size(1), ", ", yn, " has ",
              y.size(1));
  TORCH_CHECK(x.device() == y.device(), xn, " is on ", x.device(), " but ", yn, " is on ", y.device());
}

inline void check_metric(int64_t metric) {
  TORCH_CHECK(metric >= 0 && metric <= 2, "metric must be 0 (sqeuclidean), 1 (euclidean) or 2 (cosine), got ",
              metric);
}

}  // namespace reid_ops
