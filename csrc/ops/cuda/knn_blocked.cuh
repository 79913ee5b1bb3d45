// Blocked k-nearest-neighbour search on the GPU: the CUDA twin of ../cpu/knn_blocked.h.
// A cuBLAS GEMM per block of rows x columns, a bounded heap per row (one thread per row, the
// heap lives in global memory), then exact rescoring of the k + kRescoreMargin candidates with
// the same host/device helpers the CPU uses.
#pragma once

#include <ATen/ATen.h>

#include "../common/distance_math.h"
#include "../common/topk_math.h"
#include "cuda_helpers.cuh"

namespace reid_ops {
// Internal linkage: each .cu including this header gets its own copy of the kernels.
namespace {

constexpr int64_t kRowBlockCuda = 4096;
constexpr int64_t kColBlockCuda = 8192;

__global__ void row_factors_kernel(const float* squared, float* factors, int64_t n, int64_t metric) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) factors[i] = row_factor(squared[i], metric);
}

inline at::Tensor row_factors_cuda(const at::Tensor& x, int64_t metric) {
  const auto squared = x.mul(x).sum(1).contiguous();
  auto factors = at::empty_like(squared);
  const int64_t n = x.size(0);
  row_factors_kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      squared.data_ptr<float>(), factors.data_ptr<float>(), n, metric);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return factors;
}

__global__ void knn_scan_kernel(const float* block, int64_t ld, int64_t rows, int64_t cols, int64_t r0, int64_t c0,
                                const float* fx, const float* fy, int64_t metric, float* heap_d, int64_t* heap_i,
                                int64_t candidates, float* row_max, float* dense_out, int64_t dense_col0,
                                int64_t dense_rows, int64_t N) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const int64_t i = r0 + r;
  float* hd = heap_d + r * candidates;
  int64_t* hi = heap_i + r * candidates;
  float local_max = row_max != nullptr ? row_max[i] : 0.0f;
  const bool copy_dense = dense_out != nullptr && i < dense_rows;
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t j = c0 + c;
    float d = expanded_distance(block[r * ld + c], fx[i], fy[j], metric);
    d = d > 0.0f ? d : 0.0f;
    local_max = d > local_max ? d : local_max;
    if (copy_dense && j >= dense_col0) dense_out[i * (N - dense_col0) + (j - dense_col0)] = d;
    heap_offer(hd, hi, candidates, d, j);
  }
  if (row_max != nullptr) row_max[i] = local_max;
}

__global__ void heap_init_kernel(float* heap_d, int64_t* heap_i, int64_t rows, int64_t candidates) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r < rows) heap_init(heap_d + r * candidates, heap_i + r * candidates, candidates);
}

__global__ void knn_rescore_kernel(const float* x, const float* y, int64_t D, const float* fx, const float* fy,
                                   int64_t metric, float* heap_d, int64_t* heap_i, int64_t rows, int64_t r0,
                                   int64_t candidates, int64_t k, float* out_dist, int64_t* out_idx) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const int64_t i = r0 + r;
  rescore_candidates(x + i * D, y, D, fx[i], fy, metric, heap_d + r * candidates, heap_i + r * candidates, candidates,
                     k, out_dist + i * k, out_idx + i * k);
}

struct KnnExtrasCuda {
  float* row_max = nullptr;
  float* dense_out = nullptr;
  int64_t dense_col0 = 0;
  int64_t dense_rows = 0;
};

inline void knn_blocked_cuda(const at::Tensor& x, const at::Tensor& y, int64_t k, int64_t metric, float* out_dist,
                             int64_t* out_idx, const KnnExtrasCuda& extras = KnnExtrasCuda()) {
  const int64_t M = x.size(0), N = y.size(0), D = x.size(1);
  const int64_t candidates = std::min(N, k + kRescoreMargin);
  const auto fx = row_factors_cuda(x, metric);
  const auto fy = row_factors_cuda(y, metric);
  const int64_t row_block = std::min(M, kRowBlockCuda), col_block = std::min(N, kColBlockCuda);
  auto buffer = at::empty({row_block, col_block}, x.options());
  auto heap_d = at::empty({row_block, candidates}, x.options());
  auto heap_i = at::empty({row_block, candidates}, x.options().dtype(at::kLong));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (extras.row_max != nullptr) C10_CUDA_CHECK(cudaMemsetAsync(extras.row_max, 0, M * sizeof(float), stream));
  for (int64_t r0 = 0; r0 < M; r0 += row_block) {
    const int64_t rows = std::min(row_block, M - r0);
    heap_init_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(heap_d.data_ptr<float>(), heap_i.data_ptr<int64_t>(),
                                                                rows, candidates);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int64_t c0 = 0; c0 < N; c0 += col_block) {
      const int64_t cols = std::min(col_block, N - c0);
      auto block = buffer.narrow(0, 0, rows).narrow(1, 0, cols);
      at::mm_out(block, x.narrow(0, r0, rows), y.narrow(0, c0, cols).t());
      knn_scan_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(
          block.data_ptr<float>(), block.stride(0), rows, cols, r0, c0, fx.data_ptr<float>(), fy.data_ptr<float>(),
          metric, heap_d.data_ptr<float>(), heap_i.data_ptr<int64_t>(), candidates, extras.row_max, extras.dense_out,
          extras.dense_col0, extras.dense_rows, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    knn_rescore_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(
        x.data_ptr<float>(), y.data_ptr<float>(), D, fx.data_ptr<float>(), fy.data_ptr<float>(), metric,
        heap_d.data_ptr<float>(), heap_i.data_ptr<int64_t>(), rows, r0, candidates, k, out_dist, out_idx);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace reid_ops
