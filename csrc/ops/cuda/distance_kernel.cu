// CUDA kernels of pairwise_distance and knn (the CPU twins live in ../cpu/distance_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/distance_math.h"
#include "../common/check_inputs.h"
#include "cuda_helpers.cuh"
#include "knn_blocked.cuh"

namespace reid_ops {
namespace {

__global__ void distance_epilogue_kernel(float* out, const float* x, const float* y, const float* fx,
                                         const float* fy, int64_t M, int64_t N, int64_t D, int64_t metric) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= M * N) return;
  const int64_t i = e / N, j = e % N;
  float d = expanded_distance(out[e], fx[i], fy[j], metric);
  if (needs_exact_distance(d, fx[i], fy[j], metric)) d = exact_distance(x + i * D, y + j * D, D, fx[i], fy[j], metric);
  out[e] = finish_distance(d, metric);
}

at::Tensor pairwise_distance_cuda(const at::Tensor& x_in, const at::Tensor& y_in, int64_t metric) {
  check_features(x_in, "x");
  check_features(y_in, "y");
  check_same_dim(x_in, y_in, "x", "y");
  check_metric(metric);
  TORCH_CHECK(x_in.is_cuda(), "x must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.to(at::kFloat).contiguous();
  const auto y = y_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), N = y.size(0), D = x.size(1);
  const auto fx = row_factors_cuda(x, metric);
  const auto fy = row_factors_cuda(y, metric);
  auto out = at::empty({M, N}, x.options());
  at::mm_out(out, x, y.t());
  distance_epilogue_kernel<<<blocks_for(M * N), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), fx.data_ptr<float>(), fy.data_ptr<float>(), M,
      N, D, metric);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// bf16_search is a CPU option: the CUDA kernels search in fp32 (k + kRescoreMargin candidates).
std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& x_in, const at::Tensor& y_in, int64_t k,
                                            int64_t metric, bool /*bf16_search*/) {
  check_features(x_in, "x");
  check_features(y_in, "y");
  check_same_dim(x_in, y_in, "x", "y");
  check_metric(metric);
  TORCH_CHECK(k >= 1 && k <= y_in.size(0), "k must be between 1 and the number of rows of y (", y_in.size(0),
              "), got k=", k);
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.to(at::kFloat).contiguous();
  const auto y = y_in.to(at::kFloat).contiguous();
  auto dist = at::empty({x.size(0), k}, x.options());
  auto idx = at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  knn_blocked_cuda(x, y, k, metric, dist.data_ptr<float>(), idx.data_ptr<int64_t>());
  if (metric == kEuclidean) dist.sqrt_();
  return {dist, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ops, CUDA, m) {
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::pairwise_distance"), TORCH_FN(pairwise_distance_cuda));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::knn"), TORCH_FN(knn_cuda));
}

}  // namespace reid_ops
