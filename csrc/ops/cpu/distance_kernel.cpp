// CPU kernels of pairwise_distance and knn.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/distance_math.h"
#include "../common/check_inputs.h"
#include "knn_blocked.h"

namespace reid_ops {
namespace {

at::Tensor pairwise_distance_cpu(const at::Tensor& x_in, const at::Tensor& y_in, int64_t metric) {
  check_features(x_in, "x");
  check_features(y_in, "y");
  check_same_dim(x_in, y_in, "x", "y");
  check_metric(metric);
  const auto x = x_in.to(at::kFloat).contiguous();
  const auto y = y_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), N = y.size(0), D = x.size(1);
  const auto fx = row_factors(x, metric);
  const auto fy = row_factors(y, metric);
  auto out = at::empty({M, N}, x.options());
  // The GEMM writes straight into the output: no memory beyond it.
  at::mm_out(out, x, y.t());
  float* op = out.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < N; ++j) {
        float d = expanded_distance(op[i * N + j], fx[i], fy[j], metric);
        if (needs_exact_distance(d, fx[i], fy[j], metric)) {
          d = exact_distance(xp + i * D, yp + j * D, D, fx[i], fy[j], metric);
        }
        op[i * N + j] = finish_distance(d, metric);
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& x_in, const at::Tensor& y_in, int64_t k,
                                           int64_t metric, bool bf16_search) {
  check_features(x_in, "x");
  check_features(y_in, "y");
  check_same_dim(x_in, y_in, "x", "y");
  check_metric(metric);
  TORCH_CHECK(k >= 1 && k <= y_in.size(0), "k must be between 1 and the number of rows of y (", y_in.size(0),
              "), got k=", k);
  const auto x = x_in.to(at::kFloat).contiguous();
  const auto y = y_in.to(at::kFloat).contiguous();
  auto dist = at::empty({x.size(0), k}, x.options());
  auto idx = at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  knn_blocked_cpu(x, y, k, metric, bf16_search ? TilePrecision::kBFloat16 : TilePrecision::kFloat32,
                  dist.data_ptr<float>(), idx.data_ptr<int64_t>());
  if (metric == kEuclidean) dist.sqrt_();
  return {dist, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ops, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::pairwise_distance"), TORCH_FN(pairwise_distance_cpu));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::knn"), TORCH_FN(knn_cpu));
}

}  // namespace reid_ops
