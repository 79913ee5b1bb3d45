// C++ entry points of GeM's internal ops (dispatched; defined in gem.cpp), called by the autograd
// function in autograd/gem_kernel.cpp.
#pragma once

#include <ATen/ATen.h>

namespace reid_ops {
namespace detail {
// Returns (y, sum_pow) where sum_pow[n, c] = sum_hw max(x, eps)^p (saved for the backward pass).
std::tuple<at::Tensor, at::Tensor> _gem_forward(const at::Tensor& x, const at::Tensor& p, double eps);
// Returns (grad_x, grad_p).
std::tuple<at::Tensor, at::Tensor> _gem_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& p,
                                                 const at::Tensor& y, const at::Tensor& sum_pow, double eps);
}  // namespace detail
}  // namespace reid_ops
