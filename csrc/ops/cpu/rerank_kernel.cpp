// CPU kernels of the k-reciprocal re-ranking / Jaccard stages (see ../rerank.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/distance_math.h"
#include "../common/rerank_math.h"
#include "../common/topk_math.h"
#include "../common/check_inputs.h"
#include "knn_blocked.h"

namespace reid_ops {
namespace {

constexpr int64_t kChunkRows = 4096;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> neighbors_from_features_cpu(const at::Tensor& features_in,
                                                                          int64_t kmax, int64_t num_query,
                                                                          bool with_row_max, bool bf16_search) {
  check_features(features_in, "features");
  const auto features = features_in.to(at::kFloat).contiguous();
  const int64_t n = features.size(0);
  TORCH_CHECK(kmax >= 1 && kmax <= n, "number of neighbours (", kmax, ") must be between 1 and ", n);
  TORCH_CHECK(num_query >= 0 && num_query < n, "num_query must be in [0, ", n, "), got ", num_query);
  auto rank = at::empty({n, kmax}, features.options().dtype(at::kLong));
  auto rank_dist = at::empty({n, kmax}, features.options());
  auto row_max = at::zeros({n}, features.options());
  auto qg = at::empty({num_query, n - num_query}, features.options());
  KnnExtras extras;
  if (with_row_max) extras.row_max = row_max.data_ptr<float>();
  if (num_query > 0) {
    extras.dense_out = qg.data_ptr<float>();
    extras.dense_rows = num_query;
  }
  knn_blocked_cpu(features, features, kmax, kSqEuclidean,
                  bf16_search ? TilePrecision::kBFloat16 : TilePrecision::kFloat32, rank_dist.data_ptr<float>(),
                  rank.data_ptr<int64_t>(), extras);
  return {rank, rank_dist, row_max, qg};
}

std::tuple<at::Tensor, at::Tensor> neighbors_from_distances_cpu(const at::Tensor& qg_in, const at::Tensor& qq_in,
                                                                const at::Tensor& gg_in, int64_t kmax) {
  const auto qg = qg_in.to(at::kFloat).contiguous();
  const auto qq = qq_in.to(at::kFloat).contiguous();
  const auto gg = gg_in.to(at::kFloat).contiguous();
  const int64_t Q = qg.size(0), G = qg.size(1), n = Q + G;
  TORCH_CHECK(kmax >= 1 && kmax <= n, "number of neighbours (", kmax, ") must be between 1 and Q + G = ", n);
  auto rank = at::empty({n, kmax}, qg.options().dtype(at::kLong));
  auto row_max = at::empty({n}, qg.options());
  const DistanceRows rows{qg.data_ptr<float>(), qq.data_ptr<float>(), gg.data_ptr<float>(), Q, G};
  int64_t* rp = rank.data_ptr<int64_t>();
  float* mp = row_max.data_ptr<float>();
  // Rows are columns of M: visit them in tiles of 16 so that every cache line read is used fully.
  constexpr int64_t kTile = 16;
  const int64_t num_tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> values(kTile * n);
    std::vector<float> heap_d(kmax);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first = tile * kTile;
      const int64_t count = std::min(kTile, n - first);
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t r = 0; r < count; ++r) values[r * n + j] = rows.value(first + r, j);
      }
      for (int64_t r = 0; r < count; ++r) {
        const int64_t i = first + r;
        float* v = &values[r * n];
        float maximum = 0.0f;
        for (int64_t j = 0; j < n; ++j) maximum = v[j] > maximum ? v[j] : maximum;
        mp[i] = maximum;
        int64_t* hi = rp + i * kmax;
        heap_init(heap_d.data(), hi, kmax);
        // an all-zero column (maximum 0) normalises to all zeros, as normalise() does for the weights
        const float scale = maximum > 0.0f ? maximum : 1.0f;
        for (int64_t j = 0; j < n; ++j) heap_offer(heap_d.data(), hi, kmax, v[j] / scale, j);
        heap_sort_ascending(heap_d.data(), hi, kmax);
      }
    }
  });
  return {rank, row_max};
}

std::tuple<at::Tensor, at::Tensor> kreciprocal_expansion_cpu(const at::Tensor& rank_in, int64_t list_len,
                                                             int64_t half_list_len) {
  const auto rank = rank_in.contiguous();
  const int64_t n = rank.size(0), ld = rank.size(1);
  TORCH_CHECK(list_len >= 1 && list_len <= ld && half_list_len >= 1 && half_list_len <= ld,
              "neighbour list lengths (", list_len, ", ", half_list_len, ") exceed the ", ld, " neighbours computed");
  const int64_t cap = expansion_capacity(list_len, half_list_len);
  const int64_t* rp = rank.const_data_ptr<int64_t>();
  std::vector<int64_t> indptr(n + 1, 0);
  std::vector<int64_t> indices;
  std::vector<int64_t> padded(std::min(n, kChunkRows) * cap);
  std::vector<int64_t> counts(std::min(n, kChunkRows));
  for (int64_t c0 = 0; c0 < n; c0 += kChunkRows) {
    const int64_t rows = std::min(kChunkRows, n - c0);
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> scratch(half_list_len);
      for (int64_t r = begin; r < end; ++r) {
        counts[r] = kreciprocal_expansion(rp, ld, c0 + r, list_len, half_list_len, &padded[r * cap], scratch.data());
      }
    });
    for (int64_t r = 0; r < rows; ++r) {
      indices.insert(indices.end(), padded.begin() + r * cap, padded.begin() + r * cap + counts[r]);
      indptr[c0 + r + 1] = indptr[c0 + r] + counts[r];
    }
  }
  auto opts = rank.options().dtype(at::kLong);
  auto indptr_t = at::empty({n + 1}, opts);
  std::copy(indptr.begin(), indptr.end(), indptr_t.data_ptr<int64_t>());
  auto indices_t = at::empty({static_cast<int64_t>(indices.size())}, opts);
  std::copy(indices.begin(), indices.end(), indices_t.data_ptr<int64_t>());
  return {indptr_t, indices_t};
}

template <typename DistanceFn>
at::Tensor gaussian_weights_cpu(const at::Tensor& indptr, const at::Tensor& indices, DistanceFn distance) {
  const int64_t n = indptr.numel() - 1;
  auto values = at::empty({indices.numel()}, indptr.options().dtype(at::kFloat));
  const int64_t* ip = indptr.const_data_ptr<int64_t>();
  const int64_t* jp = indices.const_data_ptr<int64_t>();
  float* vp = values.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t t = ip[i]; t < ip[i + 1]; ++t) vp[t] = distance(i, jp[t]);
      gaussian_weights(vp + ip[i], ip[i + 1] - ip[i], [](float v) { return std::exp(v); });
    }
  });
  return values;
}

at::Tensor weights_from_features_cpu(const at::Tensor& features_in, const at::Tensor& indptr_in,
                                     const at::Tensor& indices_in, const at::Tensor& row_max_in,
                                     const at::Tensor& rank_in, const at::Tensor& rank_dist_in) {
  const auto features = features_in.to(at::kFloat).contiguous();
  const auto indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const int64_t n = features.size(0), D = features.size(1);
  const auto rank = rank_in.contiguous();
  const auto rank_dist = rank_dist_in.to(at::kFloat).contiguous();
  TORCH_CHECK(rank.dim() == 2 && rank.size(0) == n && rank_dist.sizes() == rank.sizes() && rank.scalar_type() == at::kLong,
              "_weights_from_features: rank must be (", n, ", k) int64 with rank_dist of the same shape, got ",
              rank.sizes(), " and ", rank_dist.sizes());
  const int64_t k = rank.size(1);
  const int64_t* rp = rank.const_data_ptr<int64_t>();
  const float* rdp = rank_dist.const_data_ptr<float>();
  const float* fp = features.const_data_ptr<float>();
  const bool normalised = row_max_in.numel() > 0;
  const auto row_max = normalised ? row_max_in.to(at::kFloat).contiguous() : row_max_in;
  const float* mp = normalised ? row_max.const_data_ptr<float>() : nullptr;
  return gaussian_weights_cpu(indptr, indices, [&](int64_t i, int64_t j) {
    const int64_t t = find_in_list(rp + i * k, k, j);
    const float d = t >= 0 ? rdp[i * k + t] : exact_distance(fp + i * D, fp + j * D, D, 1.0f, 1.0f, kSqEuclidean);
    return normalised ? normalise(d, mp[i]) : d;
  });
}

at::Tensor weights_from_distances_cpu(const at::Tensor& qg_in, const at::Tensor& qq_in, const at::Tensor& gg_in,
                                      const at::Tensor& row_max_in, const at::Tensor& indptr_in,
                                      const at::Tensor& indices_in) {
  const auto qg = qg_in.to(at::kFloat).contiguous();
  const auto qq = qq_in.to(at::kFloat).contiguous();
  const auto gg = gg_in.to(at::kFloat).contiguous();
  const auto row_max = row_max_in.contiguous();
  const DistanceRows rows{qg.data_ptr<float>(), qq.data_ptr<float>(), gg.data_ptr<float>(), qg.size(0),
                          qg.size(1)};
  const float* mp = row_max.const_data_ptr<float>();
  return gaussian_weights_cpu(indptr_in.contiguous(), indices_in.contiguous(),
                              [&](int64_t i, int64_t j) { return normalise(rows.value(i, j), mp[i]); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> query_expansion_cpu(const at::Tensor& indptr_in,
                                                                   const at::Tensor& indices_in,
                                                                   const at::Tensor& values_in,
                                                                   const at::Tensor& rank_in, int64_t k2) {
  const auto indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const auto values = values_in.contiguous(), rank = rank_in.contiguous();
  const int64_t n = indptr.numel() - 1, ld = rank.size(1);
  TORCH_CHECK(k2 >= 1 && k2 <= ld, "k2 (", k2, ") exceeds the ", ld, " neighbours computed");
  const int64_t* ip = indptr.const_data_ptr<int64_t>();
  const int64_t* jp = indices.const_data_ptr<int64_t>();
  const float* vp = values.const_data_ptr<float>();
  const int64_t* rp = rank.const_data_ptr<int64_t>();
  // pass 1: sizes
  auto out_indptr = at::zeros({n + 1}, indptr.options());
  int64_t* oip = out_indptr.data_ptr<int64_t>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> cursor(k2);
    for (int64_t i = begin; i < end; ++i) {
      oip[i + 1] = merge_rows_mean(ip, jp, vp, rp + i * ld, k2, cursor.data(), nullptr, nullptr);
    }
  });
  for (int64_t i = 0; i < n; ++i) oip[i + 1] += oip[i];
  // pass 2: values
  auto out_indices = at::empty({oip[n]}, indices.options());
  auto out_values = at::empty({oip[n]}, values.options());
  int64_t* ojp = out_indices.data_ptr<int64_t>();
  float* ovp = out_values.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> cursor(k2);
    for (int64_t i = begin; i < end; ++i) {
      merge_rows_mean(ip, jp, vp, rp + i * ld, k2, cursor.data(), ojp + oip[i], ovp + oip[i]);
    }
  });
  return {out_indptr, out_indices, out_values};
}

// Column-major copy (inverted index) of the rows [row_begin, n) of a CSR matrix: for every
// column k, the rows holding it (ascending) and their values.
void inverted_index(const int64_t* ip, const int64_t* jp, const float* vp, int64_t n, int64_t row_begin,
                    std::vector<int64_t>& col_ptr, std::vector<int64_t>& col_rows, std::vector<float>& col_vals) {
  col_ptr.assign(n + 1, 0);
  for (int64_t t = ip[row_begin]; t < ip[n]; ++t) ++col_ptr[jp[t] + 1];
  for (int64_t k = 0; k < n; ++k) col_ptr[k + 1] += col_ptr[k];
  col_rows.resize(col_ptr[n]);
  col_vals.resize(col_ptr[n]);
  std::vector<int64_t> fill(col_ptr.begin(), col_ptr.end() - 1);
  for (int64_t r = row_begin; r < n; ++r) {
    for (int64_t t = ip[r]; t < ip[r + 1]; ++t) {
      const int64_t pos = fill[jp[t]]++;
      col_rows[pos] = r;
      col_vals[pos] = vp[t];
    }
  }
}

void jaccard_rerank_out_cpu(const at::Tensor& indptr_in, const at::Tensor& indices_in, const at::Tensor& values_in,
                            int64_t num_query, const at::Tensor& base_in, const at::Tensor& row_max_in,
                            bool square_base, double lambda_value, const at::Tensor& out) {
  const auto indptr = indptr_in.contiguous(), indices = indices_in.contiguous(), values = values_in.contiguous();
  const auto row_max = row_max_in.contiguous();
  const int64_t n = indptr.numel() - 1, Q = num_query, G = n - Q;
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && out.size(0) == Q && out.size(1) == G,
              "_jaccard_rerank_out: out must be a contiguous float32 (", Q, ", ", G, ") tensor");
  const auto base = base_in.to(at::kFloat).contiguous();
  const int64_t* ip = indptr.const_data_ptr<int64_t>();
  const int64_t* jp = indices.const_data_ptr<int64_t>();
  const float* vp = values.const_data_ptr<float>();
  std::vector<int64_t> col_ptr, col_rows;
  std::vector<float> col_vals;
  inverted_index(ip, jp, vp, n, Q, col_ptr, col_rows, col_vals);  // gallery rows only
  const float* bp = base.const_data_ptr<float>();
  const float* mp = row_max.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float lambda = static_cast<float>(lambda_value);
  const float one_minus_lambda = static_cast<float>(1.0 - lambda_value);
  at::parallel_for(0, Q, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> overlap(G);
    for (int64_t q = begin; q < end; ++q) {
      std::fill(overlap.begin(), overlap.end(), 0.0f);
      for (int64_t t = ip[q]; t < ip[q + 1]; ++t) {  // ascending k, as the classic loop
        const int64_t k = jp[t];
        const float vq = vp[t];
        for (int64_t u = col_ptr[k]; u < col_ptr[k + 1]; ++u) {
          overlap[col_rows[u] - Q] += std::min(vq, col_vals[u]);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float b = bp[q * G + g];
        b = square_base ? b * b : b;
        op[q * G + g] = jaccard_from_overlap(overlap[g]) * one_minus_lambda + normalise(b, mp[q]) * lambda;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jaccard_graph_cpu(const at::Tensor& indptr_in,
                                                                 const at::Tensor& indices_in,
                                                                 const at::Tensor& values_in, double max_distance) {
  const auto indptr = indptr_in.contiguous(), indices = indices_in.contiguous(), values = values_in.contiguous();
  const int64_t n = indptr.numel() - 1;
  const int64_t* ip = indptr.const_data_ptr<int64_t>();
  const int64_t* jp = indices.const_data_ptr<int64_t>();
  const float* vp = values.const_data_ptr<float>();
  std::vector<int64_t> col_ptr, col_rows;
  std::vector<float> col_vals;
  inverted_index(ip, jp, vp, n, 0, col_ptr, col_rows, col_vals);
  const float limit = static_cast<float>(max_distance);
  std::vector<std::vector<int64_t>> row_cols(n);
  std::vector<std::vector<float>> row_vals(n);
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> overlap(n, 0.0f);
    std::vector<char> seen(n, 0);
    std::vector<int64_t> touched;
    for (int64_t i = begin; i < end; ++i) {
      touched.clear();
      for (int64_t t = ip[i]; t < ip[i + 1]; ++t) {
        const int64_t k = jp[t];
        const float vi = vp[t];
        for (int64_t u = col_ptr[k]; u < col_ptr[k + 1]; ++u) {
          const int64_t x = col_rows[u];
          if (!seen[x]) {
            seen[x] = 1;
            touched.push_back(x);
          }
          overlap[x] += std::min(vi, col_vals[u]);
        }
      }
      if (!seen[i]) touched.push_back(i);  // the diagonal is always stored
      std::sort(touched.begin(), touched.end());
      auto& cols = row_cols[i];
      auto& vals = row_vals[i];
      for (int64_t x : touched) {
        float d = x == i ? 0.0f : jaccard_from_overlap(overlap[x]);
        d = d > 0.0f ? d : 0.0f;
        if (x == i || d < limit) {
          cols.push_back(x);
          vals.push_back(d);
        }
        overlap[x] = 0.0f;
        seen[x] = 0;
      }
    }
  });
  auto opts = indptr.options();
  auto out_indptr = at::empty({n + 1}, opts);
  int64_t* oip = out_indptr.data_ptr<int64_t>();
  oip[0] = 0;
  for (int64_t i = 0; i < n; ++i) oip[i + 1] = oip[i] + static_cast<int64_t>(row_cols[i].size());
  auto out_indices = at::empty({oip[n]}, opts);
  auto out_data = at::empty({oip[n]}, opts.dtype(at::kFloat));
  int64_t* ojp = out_indices.data_ptr<int64_t>();
  float* odp = out_data.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::copy(row_cols[i].begin(), row_cols[i].end(), ojp + oip[i]);
      std::copy(row_vals[i].begin(), row_vals[i].end(), odp + oip[i]);
      std::vector<int64_t>().swap(row_cols[i]);
      std::vector<float>().swap(row_vals[i]);
    }
  });
  return {out_indptr, out_indices, out_data};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ops, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_neighbors_from_features"), TORCH_FN(neighbors_from_features_cpu));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_neighbors_from_distances"), TORCH_FN(neighbors_from_distances_cpu));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_kreciprocal_expansion"), TORCH_FN(kreciprocal_expansion_cpu));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_weights_from_features"), TORCH_FN(weights_from_features_cpu));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_weights_from_distances"), TORCH_FN(weights_from_distances_cpu));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_query_expansion"), TORCH_FN(query_expansion_cpu));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_jaccard_rerank_out"), TORCH_FN(jaccard_rerank_out_cpu));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_jaccard_graph"), TORCH_FN(jaccard_graph_cpu));
}

}  // namespace reid_ops
