// Input checks of GeM, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

namespace reid_ops {

inline void check_gem_inputs(const at::Tensor& x, const at::Tensor& p, double eps) {
  TORCH_CHECK(x.dim() == 4, "gem: x must be a 4-D (N, C, H, W) tensor, got shape ", x.sizes());
  TORCH_CHECK(x.size(2) * x.size(3) > 0, "gem: x has an empty spatial extent ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gem: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(p.numel() == 1, "gem: p must hold exactly one value, got shape ", p.sizes());
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), "gem: p must be floating point, got ", p.scalar_type());
  TORCH_CHECK(p.device() == x.device(), "gem: p is on ", p.device(), " but x is on ", x.device());
  TORCH_CHECK(eps > 0, "gem: eps must be > 0, got ", eps);
}

}  // namespace reid_ops
