// Registration of the distance ops: pairwise_distance and knn.
#include "distance.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace reid_ops {

at::Tensor pairwise_distance(const at::Tensor& x, const at::Tensor& y, int64_t metric) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("reid_ops::pairwise_distance", "")
                       .typed<decltype(pairwise_distance)>();
  return op.call(x, y, metric);
}

std::tuple<at::Tensor, at::Tensor> knn(const at::Tensor& x, const at::Tensor& y, int64_t k, int64_t metric) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("reid_ops::knn", "").typed<decltype(knn)>();
  return op.call(x, y, k, metric);
}

TORCH_LIBRARY_FRAGMENT(reid_ops, m) {
  m.def("pairwise_distance(Tensor x, Tensor y, int metric) -> Tensor");
  m.def("knn(Tensor x, Tensor y, int k, int metric) -> (Tensor, Tensor)");
}

}  // namespace reid_ops
