// Registration of GeM pooling: the public op `gem` (autograd: autograd/gem_kernel.cpp) and its
// internal forward/backward ops (kernels: cpu/gem_kernel.cpp, cuda/gem_kernel.cu), with the C++
// dispatch wrappers of the internal ops that the autograd function calls.
#include "gem.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace reid_ops {
namespace detail {

std::tuple<at::Tensor, at::Tensor> _gem_forward(const at::Tensor& x, const at::Tensor& p, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("reid_ops::_gem_forward", "")
                       .typed<decltype(_gem_forward)>();
  return op.call(x, p, eps);
}

std::tuple<at::Tensor, at::Tensor> _gem_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& p,
                                                 const at::Tensor& y, const at::Tensor& sum_pow, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("reid_ops::_gem_backward", "")
                       .typed<decltype(_gem_backward)>();
  return op.call(grad, x, p, y, sum_pow, eps);
}

}  // namespace detail

TORCH_LIBRARY_FRAGMENT(reid_ops, m) {
  // Generalized-mean pooling over H x W of an (N, C, H, W) tensor with a learnable scalar p.
  m.def("gem(Tensor x, Tensor p, float eps) -> Tensor");
  // Returns (y, sum_pow), sum_pow[n, c] = sum_hw max(x, eps)^p (saved for the backward pass).
  m.def("_gem_forward(Tensor x, Tensor p, float eps) -> (Tensor, Tensor)");
  // Returns (grad_x, grad_p).
  m.def("_gem_backward(Tensor grad, Tensor x, Tensor p, Tensor y, Tensor sum_pow, float eps) -> (Tensor, Tensor)");
}

}  // namespace reid_ops
