// Registration of GeM pooling: the public op `gem` and its internal forward/backward ops.
#include "gem.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace reid_ops {

at::Tensor gem(const at::Tensor& x, const at::Tensor& p, double eps) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("reid_ops::gem", "").typed<decltype(gem)>();
  return op.call(x, p, eps);
}

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
  m.def("gem(Tensor x, Tensor p, float eps) -> Tensor");
  m.def("_gem_forward(Tensor x, Tensor p, float eps) -> (Tensor, Tensor)");
  m.def("_gem_backward(Tensor grad, Tensor x, Tensor p, Tensor y, Tensor sum_pow, float eps) -> (Tensor, Tensor)");
}

}  // namespace reid_ops
