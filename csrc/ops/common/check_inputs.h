// Input checks shared by the CPU and CUDA kernels of every op (host code: included by the .cu files' host side).
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

inline void check_gem_inputs(const at::Tensor& x, const at::Tensor& p, double eps) {
  TORCH_CHECK(x.dim() == 4, "gem: x must be a 4-D (N, C, H, W) tensor, got shape ", x.sizes());
  TORCH_CHECK(x.size(2) * x.size(3) > 0, "gem: x has an empty spatial extent ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gem: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(p.numel() == 1, "gem: p must hold exactly one value, got shape ", p.sizes());
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), "gem: p must be floating point, got ", p.scalar_type());
  TORCH_CHECK(p.device() == x.device(), "gem: p is on ", p.device(), " but x is on ", x.device());
  // eps >= float32's smallest normal number: the float kernels' log2 assumes normal numbers after the clamp
  TORCH_CHECK(eps >= 1.1754943508222875e-38, "gem: eps must be >= 1.18e-38 (float32's smallest normal number), got ",
              eps);
}

}  // namespace reid_ops
