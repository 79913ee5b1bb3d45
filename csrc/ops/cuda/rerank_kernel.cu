// CUDA kernels of the k-reciprocal re-ranking / Jaccard stages (see ../rerank.cpp; the CPU twins
// live in ../cpu/rerank_kernel.cpp). Per-row work runs one thread per row through the same
// host/device helpers as the CPU (../common/rerank_math.h); sparse bookkeeping (prefix sums,
// the inverted index, extraction of stored pairs) uses ATen ops on the device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/distance_math.h"
#include "../common/rerank_math.h"
#include "../common/topk_math.h"
#include "../common/check_inputs.h"
#include "cuda_helpers.cuh"
#include "knn_blocked.cuh"

namespace reid_ops {
namespace {

constexpr int64_t kChunkRowsCuda = 16384;
constexpr int64_t kDenseBudget = int64_t(1) << 26;  // floats in a dense scratch block (256 MB)

// bf16_search is a CPU option (fp32 search here); the row maxima are always computed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> neighbors_from_features_cuda(const at::Tensor& features_in,
                                                                           int64_t kmax, int64_t num_query,
                                                                           bool /*with_row_max*/,
                                                                           bool /*bf16_search*/) {
  check_features(features_in, "features");
  c10::cuda::CUDAGuard guard(features_in.device());
  const auto features = features_in.to(at::kFloat).contiguous();
  const int64_t n = features.size(0);
  TORCH_CHECK(kmax >= 1 && kmax <= n, "number of neighbours (", kmax, ") must be between 1 and ", n);
  TORCH_CHECK(num_query >= 0 && num_query < n, "num_query must be in [0, ", n, "), got ", num_query);
  auto rank = at::empty({n, kmax}, features.options().dtype(at::kLong));
  auto rank_dist = at::empty({n, kmax}, features.options());
  auto row_max = at::empty({n}, features.options());
  auto qg = at::empty({num_query, n - num_query}, features.options());
  KnnExtrasCuda extras;
  extras.row_max = row_max.data_ptr<float>();
  if (num_query > 0) {
    extras.dense_out = qg.data_ptr<float>();
    extras.dense_col0 = num_query;
    extras.dense_rows = num_query;
  }
  knn_blocked_cuda(features, features, kmax, kSqEuclidean, rank_dist.data_ptr<float>(), rank.data_ptr<int64_t>(),
                   extras);
  return {rank, rank_dist, row_max, qg};
}

__global__ void neighbors_from_distances_kernel(DistanceRows rows, int64_t kmax, float* heap_d, int64_t* rank,
                                                float* row_max) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t n = rows.Q + rows.G;
  if (i >= n) return;
  float maximum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float v = rows.value(i, j);
    maximum = v > maximum ? v : maximum;
  }
  row_max[i] = maximum;
  float* hd = heap_d + i * kmax;
  int64_t* hi = rank + i * kmax;
  heap_init(hd, hi, kmax);
  const float scale = maximum > 0.0f ? maximum : 1.0f;  // an all-zero column normalises to zeros
  for (int64_t j = 0; j < n; ++j) heap_offer(hd, hi, kmax, rows.value(i, j) / scale, j);
  heap_sort_ascending(hd, hi, kmax);
}

std::tuple<at::Tensor, at::Tensor> neighbors_from_distances_cuda(const at::Tensor& qg_in, const at::Tensor& qq_in,
                                                                 const at::Tensor& gg_in, int64_t kmax) {
  c10::cuda::CUDAGuard guard(qg_in.device());
  const auto qg = qg_in.to(at::kFloat).contiguous();
  const auto qq = qq_in.to(at::kFloat).contiguous();
  const auto gg = gg_in.to(at::kFloat).contiguous();
  const int64_t Q = qg.size(0), G = qg.size(1), n = Q + G;
  TORCH_CHECK(kmax >= 1 && kmax <= n, "number of neighbours (", kmax, ") must be between 1 and Q + G = ", n);
  auto rank = at::empty({n, kmax}, qg.options().dtype(at::kLong));
  auto heap_d = at::empty({n, kmax}, qg.options());
  auto row_max = at::empty({n}, qg.options());
  const DistanceRows rows{qg.data_ptr<float>(), qq.data_ptr<float>(), gg.data_ptr<float>(), Q, G};
  neighbors_from_distances_kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      rows, kmax, heap_d.data_ptr<float>(), rank.data_ptr<int64_t>(), row_max.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {rank, row_max};
}

__global__ void expansion_kernel(const int64_t* rank, int64_t ld, int64_t row0, int64_t rows, int64_t list_len,
                                 int64_t half_list_len, int64_t cap, int64_t* padded, int64_t* scratch,
                                 int64_t* counts) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  counts[r] = kreciprocal_expansion(rank, ld, row0 + r, list_len, half_list_len, padded + r * cap,
                                    scratch + r * half_list_len);
}

// Gathers padded rows (rows x cap, counts[r] valid entries each) into a flat array at offsets.
__global__ void compact_kernel(const int64_t* padded, const int64_t* counts, const int64_t* offsets, int64_t rows,
                               int64_t cap, int64_t* out) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  for (int64_t t = 0; t < counts[r]; ++t) out[offsets[r] + t] = padded[r * cap + t];
}

// indptr (n + 1) from per-row counts: [0, cumsum(counts)].
at::Tensor indptr_from_counts(const at::Tensor& counts) {
  auto indptr = at::zeros({counts.numel() + 1}, counts.options());
  if (counts.numel() > 0) indptr.narrow(0, 1, counts.numel()).copy_(counts.cumsum(0));
  return indptr;
}

std::tuple<at::Tensor, at::Tensor> kreciprocal_expansion_cuda(const at::Tensor& rank_in, int64_t list_len,
                                                              int64_t half_list_len) {
  c10::cuda::CUDAGuard guard(rank_in.device());
  const auto rank = rank_in.contiguous();
  const int64_t n = rank.size(0), ld = rank.size(1);
  TORCH_CHECK(list_len >= 1 && list_len <= ld && half_list_len >= 1 && half_list_len <= ld,
              "neighbour list lengths (", list_len, ", ", half_list_len, ") exceed the ", ld, " neighbours computed");
  const int64_t cap = expansion_capacity(list_len, half_list_len);
  const int64_t chunk = std::min(n, kChunkRowsCuda);
  auto opts = rank.options();
  auto padded = at::empty({chunk, cap}, opts);
  auto scratch = at::empty({chunk, half_list_len}, opts);
  auto counts = at::empty({n}, opts);
  std::vector<at::Tensor> pieces;
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    auto chunk_counts = counts.narrow(0, r0, rows);
    expansion_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(rank.data_ptr<int64_t>(), ld, r0, rows, list_len,
                                                                half_list_len, cap, padded.data_ptr<int64_t>(),
                                                                scratch.data_ptr<int64_t>(),
                                                                chunk_counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto offsets = indptr_from_counts(chunk_counts);
    const int64_t total = offsets[rows].item<int64_t>();
    auto piece = at::empty({total}, opts);
    compact_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(padded.data_ptr<int64_t>(),
                                                              chunk_counts.data_ptr<int64_t>(),
                                                              offsets.data_ptr<int64_t>(), rows, cap,
                                                              piece.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pieces.push_back(piece);
  }
  return {indptr_from_counts(counts), at::cat(pieces)};
}

struct ExpFunctor {
  __device__ float operator()(float v) const { return expf(v); }
};

__global__ void weights_from_features_kernel(const float* features, int64_t D, const int64_t* indptr,
                                             const int64_t* indices, const float* row_max, const int64_t* rank,
                                             const float* rank_dist, int64_t k, int64_t n, float* values) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  for (int64_t t = indptr[i]; t < indptr[i + 1]; ++t) {
    const int64_t j = indices[t], u = find_in_list(rank + i * k, k, j);
    const float d = u >= 0 ? rank_dist[i * k + u]
                           : exact_distance(features + i * D, features + j * D, D, 1.0f, 1.0f, kSqEuclidean);
    values[t] = row_max != nullptr ? normalise(d, row_max[i]) : d;
  }
  gaussian_weights(values + indptr[i], indptr[i + 1] - indptr[i], ExpFunctor());
}

at::Tensor weights_from_features_cuda(const at::Tensor& features_in, const at::Tensor& indptr_in,
                                      const at::Tensor& indices_in, const at::Tensor& row_max_in,
                                      const at::Tensor& rank_in, const at::Tensor& rank_dist_in) {
  c10::cuda::CUDAGuard guard(features_in.device());
  const auto features = features_in.to(at::kFloat).contiguous();
  const auto indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const bool normalised = row_max_in.numel() > 0;
  const auto row_max = normalised ? row_max_in.to(at::kFloat).contiguous() : row_max_in;
  const int64_t n = indptr.numel() - 1;
  const auto rank = rank_in.contiguous();
  const auto rank_dist = rank_dist_in.to(at::kFloat).contiguous();
  TORCH_CHECK(rank.dim() == 2 && rank.size(0) == features.size(0) && rank_dist.sizes() == rank.sizes() &&
                  rank.scalar_type() == at::kLong,
              "_weights_from_features: rank must be (", features.size(0), ", k) int64 with rank_dist of the same "
              "shape, got ", rank.sizes(), " and ", rank_dist.sizes());
  auto values = at::empty({indices.numel()}, features.options());
  weights_from_features_kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      features.data_ptr<float>(), features.size(1), indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(),
      normalised ? row_max.data_ptr<float>() : nullptr, rank.data_ptr<int64_t>(), rank_dist.data_ptr<float>(),
      rank.size(1), n, values.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return values;
}

__global__ void weights_from_distances_kernel(DistanceRows rows, const float* row_max, const int64_t* indptr,
                                              const int64_t* indices, int64_t n, float* values) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  for (int64_t t = indptr[i]; t < indptr[i + 1]; ++t) values[t] = normalise(rows.value(i, indices[t]), row_max[i]);
  gaussian_weights(values + indptr[i], indptr[i + 1] - indptr[i], ExpFunctor());
}

at::Tensor weights_from_distances_cuda(const at::Tensor& qg_in, const at::Tensor& qq_in, const at::Tensor& gg_in,
                                       const at::Tensor& row_max_in, const at::Tensor& indptr_in,
                                       const at::Tensor& indices_in) {
  c10::cuda::CUDAGuard guard(qg_in.device());
  const auto qg = qg_in.to(at::kFloat).contiguous();
  const auto qq = qq_in.to(at::kFloat).contiguous();
  const auto gg = gg_in.to(at::kFloat).contiguous();
  const auto row_max = row_max_in.contiguous();
  const auto indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const int64_t n = indptr.numel() - 1;
  auto values = at::empty({indices.numel()}, qg.options());
  const DistanceRows rows{qg.data_ptr<float>(), qq.data_ptr<float>(), gg.data_ptr<float>(), qg.size(0),
                                qg.size(1)};
  weights_from_distances_kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      rows, row_max.data_ptr<float>(), indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), n,
      values.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return values;
}

__global__ void query_expansion_kernel(const int64_t* indptr, const int64_t* indices, const float* values,
                                       const int64_t* rank, int64_t ld, int64_t k2, int64_t n, int64_t* cursor,
                                       const int64_t* out_indptr, int64_t* out_indices, float* out_values,
                                       int64_t* out_counts) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  if (out_indptr == nullptr) {
    out_counts[i] = merge_rows_mean(indptr, indices, values, rank + i * ld, k2, cursor + i * k2, nullptr, nullptr);
  } else {
    merge_rows_mean(indptr, indices, values, rank + i * ld, k2, cursor + i * k2, out_indices + out_indptr[i],
                    out_values + out_indptr[i]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> query_expansion_cuda(const at::Tensor& indptr_in,
                                                                    const at::Tensor& indices_in,
                                                                    const at::Tensor& values_in,
                                                                    const at::Tensor& rank_in, int64_t k2) {
  c10::cuda::CUDAGuard guard(indptr_in.device());
  const auto indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const auto values = values_in.contiguous(), rank = rank_in.contiguous();
  const int64_t n = indptr.numel() - 1, ld = rank.size(1);
  TORCH_CHECK(k2 >= 1 && k2 <= ld, "k2 (", k2, ") exceeds the ", ld, " neighbours computed");
  auto cursor = at::empty({n, k2}, indptr.options());
  auto counts = at::empty({n}, indptr.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  query_expansion_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), values.data_ptr<float>(), rank.data_ptr<int64_t>(), ld,
      k2, n, cursor.data_ptr<int64_t>(), nullptr, nullptr, nullptr, counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto out_indptr = indptr_from_counts(counts);
  const int64_t total = out_indptr[n].item<int64_t>();
  auto out_indices = at::empty({total}, indices.options());
  auto out_values = at::empty({total}, values.options());
  query_expansion_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), values.data_ptr<float>(), rank.data_ptr<int64_t>(), ld,
      k2, n, cursor.data_ptr<int64_t>(), out_indptr.data_ptr<int64_t>(), out_indices.data_ptr<int64_t>(),
      out_values.data_ptr<float>(), nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_indptr, out_indices, out_values};
}

// Inverted index of rows [row_begin, n): for each column, its rows (ascending) and values.
std::tuple<at::Tensor, at::Tensor, at::Tensor> inverted_index_cuda(const at::Tensor& indptr, const at::Tensor& indices,
                                                                   const at::Tensor& values, int64_t row_begin) {
  const int64_t n = indptr.numel() - 1;
  const int64_t start = indptr[row_begin].item<int64_t>();
  const auto cols = indices.narrow(0, start, indices.numel() - start);
  const auto vals = values.narrow(0, start, values.numel() - start);
  const auto row_counts = (indptr.narrow(0, row_begin + 1, n - row_begin) - indptr.narrow(0, row_begin, n - row_begin));
  const auto rows = at::repeat_interleave(at::arange(row_begin, n, indptr.options()), row_counts);
  // stable sort by column keeps rows ascending within a column
  const auto order = std::get<1>(at::sort(cols, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const auto col_counts = at::bincount(cols, /*weights=*/{}, /*minlength=*/n);
  return {indptr_from_counts(col_counts.to(at::kLong)), rows.index_select(0, order), vals.index_select(0, order)};
}

// One block per row: threads split the row's nonzeros; each adds min(V'_ik, V'_xk) for every
// row x holding column k into overlap[row, x - column_offset].
__global__ void overlap_kernel(const int64_t* indptr, const int64_t* indices, const float* values,
                               const int64_t* col_ptr, const int64_t* col_rows, const float* col_vals, int64_t row0,
                               int64_t column_offset, int64_t width, float* overlap) {
  const int64_t r = blockIdx.x;
  const int64_t i = row0 + r;
  for (int64_t t = indptr[i] + threadIdx.x; t < indptr[i + 1]; t += blockDim.x) {
    const int64_t k = indices[t];
    const float v = values[t];
    for (int64_t u = col_ptr[k]; u < col_ptr[k + 1]; ++u) {
      atomicAdd(overlap + r * width + (col_rows[u] - column_offset), fminf(v, col_vals[u]));
    }
  }
}

__global__ void rerank_finish_kernel(const float* overlap, const float* base, const float* row_max, int64_t q0,
                                     int64_t rows, int64_t G, bool square_base, float lambda, float* out) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= rows * G) return;
  const int64_t q = q0 + e / G, g = e % G;
  float b = base[q * G + g];
  b = square_base ? b * b : b;
  out[q * G + g] = jaccard_from_overlap(overlap[e]) * (1.0f - lambda) + normalise(b, row_max[q]) * lambda;
}

void jaccard_rerank_out_cuda(const at::Tensor& indptr_in, const at::Tensor& indices_in, const at::Tensor& values_in,
                             int64_t num_query, const at::Tensor& base_in, const at::Tensor& row_max_in,
                             bool square_base, double lambda_value, const at::Tensor& out) {
  c10::cuda::CUDAGuard guard(indptr_in.device());
  const auto indptr = indptr_in.contiguous(), indices = indices_in.contiguous(), values = values_in.contiguous();
  const auto row_max = row_max_in.contiguous();
  const int64_t n = indptr.numel() - 1, Q = num_query, G = n - Q;
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && out.size(0) == Q && out.size(1) == G,
              "_jaccard_rerank_out: out must be a contiguous float32 (", Q, ", ", G, ") tensor");
  const auto base = base_in.to(at::kFloat).contiguous();
  auto [col_ptr, col_rows, col_vals] = inverted_index_cuda(indptr, indices, values, Q);
  const int64_t chunk = std::max<int64_t>(1, std::min(Q, kDenseBudget / std::max<int64_t>(G, 1)));
  auto overlap = at::empty({chunk, G}, values.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  // The classic ratio (1 - lambda) is evaluated in double then rounded, as on the CPU.
  const float lambda = static_cast<float>(lambda_value);
  for (int64_t q0 = 0; q0 < Q; q0 += chunk) {
    const int64_t rows = std::min(chunk, Q - q0);
    overlap.zero_();
    overlap_kernel<<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), values.data_ptr<float>(), col_ptr.data_ptr<int64_t>(),
        col_rows.data_ptr<int64_t>(), col_vals.data_ptr<float>(), q0, Q, G, overlap.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    rerank_finish_kernel<<<blocks_for(rows * G), kThreads, 0, stream>>>(
        overlap.data_ptr<float>(), base.data_ptr<float>(), row_max.data_ptr<float>(), q0, rows, G, square_base, lambda,
        out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jaccard_graph_cuda(const at::Tensor& indptr_in,
                                                                  const at::Tensor& indices_in,
                                                                  const at::Tensor& values_in, double max_distance) {
  c10::cuda::CUDAGuard guard(indptr_in.device());
  const auto indptr = indptr_in.contiguous(), indices = indices_in.contiguous(), values = values_in.contiguous();
  const int64_t n = indptr.numel() - 1;
  auto [col_ptr, col_rows, col_vals] = inverted_index_cuda(indptr, indices, values, 0);
  const int64_t chunk = std::max<int64_t>(1, std::min(n, kDenseBudget / n));
  auto overlap = at::empty({chunk, n}, values.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> row_ids, col_ids, data;
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    auto block = overlap.narrow(0, 0, rows);
    block.zero_();
    overlap_kernel<<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), values.data_ptr<float>(), col_ptr.data_ptr<int64_t>(),
        col_rows.data_ptr<int64_t>(), col_vals.data_ptr<float>(), r0, 0, n, block.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // d = 1 - s / (2 - s), clamped at 0; stored where s > 0 and d < max_distance, plus the diagonal
    auto distance = (1.0 - block / (2.0 - block)).clamp_min(0.0);
    auto diagonal = at::zeros({rows, n}, block.options().dtype(at::kBool));
    diagonal.diagonal(/*offset=*/r0).fill_(true);
    distance.masked_fill_(diagonal, 0.0);
    const auto keep = ((block > 0) & (distance < max_distance)) | diagonal;
    const auto where = keep.nonzero();  // row-major: columns ascending within a row
    row_ids.push_back(where.select(1, 0) + r0);
    col_ids.push_back(where.select(1, 1));
    data.push_back(at::masked_select(distance, keep));
  }
  const auto all_rows = at::cat(row_ids);
  const auto counts = at::bincount(all_rows, /*weights=*/{}, /*minlength=*/n).to(at::kLong);
  return {indptr_from_counts(counts), at::cat(col_ids), at::cat(data)};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ops, CUDA, m) {
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_neighbors_from_features"), TORCH_FN(neighbors_from_features_cuda));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_neighbors_from_distances"), TORCH_FN(neighbors_from_distances_cuda));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_kreciprocal_expansion"), TORCH_FN(kreciprocal_expansion_cuda));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_weights_from_features"), TORCH_FN(weights_from_features_cuda));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_weights_from_distances"), TORCH_FN(weights_from_distances_cuda));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_query_expansion"), TORCH_FN(query_expansion_cuda));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_jaccard_rerank_out"), TORCH_FN(jaccard_rerank_out_cuda));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_jaccard_graph"), TORCH_FN(jaccard_graph_cuda));
}

}  // namespace reid_ops
