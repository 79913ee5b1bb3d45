// Registration of the distance ops: pairwise_distance and knn. Kernels: cpu/distance_kernel.cpp,
// cuda/distance_kernel.cu.
#include <torch/library.h>

namespace reid_ops {

TORCH_LIBRARY_FRAGMENT(reid_ops, m) {
  // metric: 0 squared Euclidean, 1 Euclidean, 2 cosine distance (see common/distance_math.h).
  m.def("pairwise_distance(Tensor x, Tensor y, int metric) -> Tensor");
  // The exact k nearest rows of y for every row of x: (distances, indices), ascending, ties by
  // index. bf16_search: candidates from bfloat16 GEMM tiles (same answer, see cpu/knn_blocked.h).
  m.def("knn(Tensor x, Tensor y, int k, int metric, bool bf16_search) -> (Tensor, Tensor)");
}

}  // namespace reid_ops
