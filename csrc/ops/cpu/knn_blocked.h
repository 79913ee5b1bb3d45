// Exact blocked k-nearest-neighbour search on the CPU, shared by knn and re-ranking.
//
// Candidates come from GEMM tiles x . y^T computed in bfloat16 or float32. Every approximate
// distance d~ carries a rigorous bound e on its error (TileBound below), so the exact distance lies
// in [d~ - e, d~ + e]. A row keeps every column whose lower bound is <= U, the k-th smallest upper
// bound it has seen: whatever the rounding, the true k nearest are among them. The candidates are
// rescored with the exact difference formula (common/distance_math.h) and sorted by (distance,
// index), so the answer is the exact kNN whatever the tile precision: bf16 and fp32 searches give
// identical neighbours and distances, bf16 only keeps more candidates (those within the bound of
// the k-th). A row's maximum distance (re-ranking) is found the same way: columns whose upper bound
// reaches the largest lower bound, rescored exactly.
//
// Error model (u = unit roundoff: 2^-24 fp32, 2^-8 bf16; gamma_n = n u / (1 - n u) in fp32):
//   fp32 tile: products and sums rounded in fp32, any order, with or without FMA:
//     |out - x.y| <= gamma_{D+1} ||x|| ||y||.
//   bf16 tile: x~ = bf16(x) (round to nearest), residual r = x - x~ (exact in fp32); products of
//     two bf16 values are exact in fp32, sums rounded in fp32 in any order, the result rounded once
//     to bf16 (oneDNN, and ATen's fallback kernels, accumulate bf16 GEMMs in fp32). With
//     x.y - x~.y~ = r_x.y + x~.r_y (Cauchy-Schwarz on each term):
//     |out - x.y| <= ||r_x|| ||y|| + ||x~|| ||r_y|| + gamma_D ||x~|| ||y~|| + u_bf16 / (1 - u_bf16) |out|.
//   The distance formula adds the fp32 rounding of the squared norms / inverse norms and of the
//   expression itself (SlackTerms). The bound is evaluated in float and widened by 1e-4 relative.
// Memory: the outputs, the per-row candidate lists and one tile, never M x N.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/distance_math.h"
#include "../common/topk_math.h"

namespace reid_ops {

enum class TilePrecision { kFloat32, kBFloat16 };

constexpr int64_t kRowBlock = 1024;
constexpr int64_t kColBlock = 4096;
constexpr int64_t kSelfBlock = 4096;

// oneDNN's matmul writing into a given output (at::native::mkldnn_matmul), looked up at run time: it
// is an internal symbol of libtorch_cpu, so a PyTorch build without it falls back below instead of
// failing to load the extension.
using MkldnnMatmulFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float, float);

inline MkldnnMatmulFn mkldnn_matmul_fn() {
  static const MkldnnMatmulFn fn = [] {
    void* symbol = dlsym(RTLD_DEFAULT, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff");
    return at::hasMKLDNN() ? reinterpret_cast<MkldnnMatmulFn>(symbol) : nullptr;
  }();
  return fn;
}

// out = a . b^T in a's dtype (float32 or bfloat16), accumulated in fp32. `out` is a contiguous
// (a rows x b rows) view of a buffer reused for every tile: a fresh 64 MB tile per GEMM cost a page
// fault per 4 KB (about a tenth of the search). Through oneDNN when available (MKL's sgemm runs at a
// fraction of the speed on AMD CPUs; oneDNN's bf16 kernels use AVX-512 BF16 or AMX), else at::mm_out.
inline void gemm_nt_into(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  // per tile dtype: oneDNN may refuse bf16 (a CPU without bf16 instructions) and still run fp32
  static std::atomic<bool> onednn_failed[2] = {false, false};
  std::atomic<bool>& failed = onednn_failed[a.scalar_type() == at::kBFloat16 ? 1 : 0];
  if (const MkldnnMatmulFn fn = mkldnn_matmul_fn(); fn != nullptr && !failed.load()) {
    try {
      fn(a, b.t(), out, 0.0f, 1.0f);
      return;
    } catch (const c10::Error&) {
      failed.store(true);
    }
  }
  at::mm_out(out, a, b.t());
}

// One reusable tile buffer: contiguous (rows x cols) views of the first rows * cols elements.
class TileBuffer {
 public:
  at::Tensor view(int64_t rows, int64_t cols, at::ScalarType dtype) {
    const int64_t n = rows * cols;
    if (!storage_.defined() || storage_.scalar_type() != dtype || storage_.numel() < n) {
      storage_ = at::empty({n}, at::TensorOptions().dtype(dtype));
    }
    return storage_.narrow(0, 0, n).view({rows, cols});
  }

 private:
  at::Tensor storage_;
};

// Per-row factors of the expansion (see row_factor), from fp32 squared norms.
inline std::vector<float> row_factors(const at::Tensor& x, int64_t metric) {
  const auto squared = x.mul(x).sum(1).contiguous();  // float32 contiguous input
  const float* s = squared.data_ptr<float>();
  std::vector<float> out(x.size(0));
  for (int64_t i = 0; i < x.size(0); ++i) out[i] = row_factor(s[i], metric);
  return out;
}

// Per-row terms of the error bound of one operand (x or y).
struct RowTerms {
  std::vector<float> factor;    // row_factor: squared norm (Euclidean) or inverse norm (cosine)
  std::vector<float> norm;      // ||x|| (fp32 tiles)
  std::vector<float> residual;  // ||x - bf16(x)|| (bf16 tiles)
  std::vector<float> rounded;   // ||bf16(x)|| (bf16 tiles)
  at::Tensor bf16;              // bf16(x), when bf16 tiles are used
};

inline RowTerms row_terms(const at::Tensor& x, int64_t metric, bool with_bf16) {
  const int64_t n = x.size(0), D = x.size(1);
  RowTerms t;
  const auto squared = x.mul(x).sum(1).contiguous();  // the fp32 squared norms the expansion uses
  const float* s = squared.data_ptr<float>();
  t.factor.resize(n);
  t.norm.resize(n);
  if (with_bf16) {
    t.bf16 = x.to(at::kBFloat16).contiguous();
    t.residual.resize(n);
    t.rounded.resize(n);
  }
  const float* xp = x.data_ptr<float>();
  const at::BFloat16* bp = with_bf16 ? t.bf16.data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      t.factor[i] = row_factor(s[i], metric);
      double norm2 = 0.0, residual2 = 0.0, rounded2 = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double v = xp[i * D + d];
        norm2 += v * v;
        if (bp != nullptr) {
          const double r = static_cast<double>(static_cast<float>(bp[i * D + d]));
          rounded2 += r * r;
          residual2 += (v - r) * (v - r);
        }
      }
      t.norm[i] = static_cast<float>(std::sqrt(norm2));
      if (bp != nullptr) {
        t.residual[i] = static_cast<float>(std::sqrt(residual2));
        t.rounded[i] = static_cast<float>(std::sqrt(rounded2));
      }
    }
  });
  return t;
}

// Constants of the bound for one tile precision and feature dimension.
struct TileBound {
  TilePrecision precision;
  int64_t metric;
  float gamma_sum;    // gamma_{D+1} (fp32 tile) or gamma_D (bf16 tile)
  float output_unit;  // u_bf16 / (1 - u_bf16) for bf16 tiles, 0 for fp32
  float slack;        // fp32 rounding of the norms and of the distance expression (relative)

  TileBound(TilePrecision p, int64_t metric_, int64_t D) : precision(p), metric(metric_) {
    const double u = std::ldexp(1.0, -24);
    const double n = static_cast<double>(D + 1);
    gamma_sum = static_cast<float>(n * u / (1.0 - n * u));
    output_unit = p == TilePrecision::kBFloat16 ? static_cast<float>(std::ldexp(1.0, -8) / (1.0 - std::ldexp(1.0, -8)))
                                                : 0.0f;
    slack = static_cast<float>(n * u / (1.0 - n * u) + 16.0 * u);
  }
};


struct Candidate {
  int64_t index;
  float bound;  // lower bound (nearest lists) or upper bound (farthest lists)
};

// Candidate bookkeeping of every row.
struct KnnState {
  int64_t k = 0;
  bool track_far = false;
  std::vector<float> upper_heap;  // per row: max-heap of the k smallest upper bounds (top = U)
  std::vector<std::vector<Candidate>> near, far;
  std::vector<float> far_floor;   // per row: largest lower bound seen (<= the row maximum)
  std::vector<int64_t> near_prune_at, far_prune_at;

  KnnState(int64_t rows, int64_t k_, bool track_far_)
      : k(k_), track_far(track_far_), upper_heap(rows * k_, std::numeric_limits<float>::infinity()), near(rows),
        far(track_far_ ? rows : 0), far_floor(track_far_ ? rows : 0, -std::numeric_limits<float>::infinity()),
        near_prune_at(rows, 4 * k_ + 256), far_prune_at(track_far_ ? rows : 0, 256) {}
};

inline void float_heap_replace_top(float* heap, int64_t size, float value) {
  int64_t pos = 0;
  while (true) {
    const int64_t left = 2 * pos + 1;
    if (left >= size) break;
    int64_t largest = left;
    if (left + 1 < size && heap[left + 1] > heap[left]) largest = left + 1;
    if (heap[largest] <= value) break;
    heap[pos] = heap[largest];
    pos = largest;
  }
  heap[pos] = value;
}

// Per-thread scratch of one row's bounds.
struct RowScratch {
  std::vector<float> lower, upper;
  void reserve(int64_t n) {
    if (static_cast<int64_t>(lower.size()) < n) {
      lower.resize(n);
      upper.resize(n);
    }
  }
};

// Tile value as float (bf16: its 16 bits are the top half of a float's; written so that the loops vectorise).
inline float tile_value(float v) { return v; }
inline float tile_value(c10::BFloat16 v) { return std::bit_cast<float>(static_cast<uint32_t>(v.x) << 16); }

// Bounds [lo, hi] of the exact distances of row i (terms xt) to columns first_col.. (terms yt), from
// the tile values `dots`; copies the clamped approximate distances to dense_out if not null. Every
// operand is a local or a __restrict pointer so that the loop vectorises (offer_row's AVX-512 build).
template <bool kCosineMetric, bool kBf16Tile, typename T>
inline __attribute__((always_inline)) void row_bounds(const T* __restrict dots, int64_t cols, int64_t i,
                                                      int64_t first_col, const TileBound& b, const RowTerms& xt,
                                                      const RowTerms& yt, float* __restrict lo,
                                                      float* __restrict hi, float* __restrict dense_out) {
  const int64_t metric = kCosineMetric ? kCosine : kSqEuclidean;
  const float fi = xt.factor[i], ni = xt.norm[i];
  const float ri = kBf16Tile ? xt.residual[i] : 0.0f, mi = kBf16Tile ? xt.rounded[i] : 0.0f;
  const float gamma_sum = b.gamma_sum, output_unit = b.output_unit, slack = b.slack;
  const float* __restrict fj = yt.factor.data() + first_col;
  const float* __restrict nj = yt.norm.data() + first_col;
  const float* __restrict rj = kBf16Tile ? yt.residual.data() + first_col : nj;
  const float* __restrict mj = kBf16Tile ? yt.rounded.data() + first_col : nj;
  const bool zero_row_i = kCosineMetric && !(ni > kMinNorm);
  constexpr float kInf = std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < cols; ++c) {
    const float out = tile_value(dots[c]);
    const float d = expanded_distance(out, fi, fj[c], metric);
    const float e_dot = kBf16Tile ? ri * nj[c] + mi * rj[c] + gamma_sum * mi * mj[c] + output_unit * std::fabs(out)
                                  : gamma_sum * ni * nj[c];
    float e;
    if (kCosineMetric) {
      e = e_dot * fi * fj[c] + slack * (2.0f + std::fabs(out) * fi * fj[c]);
      // a zero row's exact cosine distance (0.5 ||y / |y| ||^2) is not the expansion's: no bound
      e = (zero_row_i || !(nj[c] > kMinNorm)) ? kInf : e;
    } else {
      e = 2.0f * e_dot + slack * (fi + fj[c] + 2.0f * std::fabs(out));
    }
    e = e * 1.0001f + 1e-30f;
    const float l = d - e, h = d + e;
    lo[c] = l == l ? (l > 0.0f ? l : 0.0f) : 0.0f;  // exact distances are >= 0; NaN (overflow): no bound
    hi[c] = h == h ? h : kInf;
  }
  if (dense_out != nullptr) {
    for (int64_t c = 0; c < cols; ++c) {
      const float d = expanded_distance(tile_value(dots[c]), fi, fj[c], metric);
      dense_out[c] = d > 0.0f ? d : 0.0f;
    }
  }
}

// Feeds the tile entries of row i (bound terms xt[i]; columns first_col .. first_col + cols, terms
// yt) to row `s` of the state.
template <typename T>
inline __attribute__((always_inline)) void offer_row_body(KnnState& state, int64_t s, int64_t i, const T* dots,
                                                          int64_t cols, int64_t first_col,
                      const TileBound& bound, const RowTerms& xt, const RowTerms& yt, RowScratch& scratch,
                      float* dense_out) {
  scratch.reserve(cols);
  float* lo = scratch.lower.data();
  float* hi = scratch.upper.data();
  const bool cosine = bound.metric == kCosine, bf16 = bound.precision == TilePrecision::kBFloat16;
  if (cosine && bf16) {
    row_bounds<true, true>(dots, cols, i, first_col, bound, xt, yt, lo, hi, dense_out);
  } else if (cosine) {
    row_bounds<true, false>(dots, cols, i, first_col, bound, xt, yt, lo, hi, dense_out);
  } else if (bf16) {
    row_bounds<false, true>(dots, cols, i, first_col, bound, xt, yt, lo, hi, dense_out);
  } else {
    row_bounds<false, false>(dots, cols, i, first_col, bound, xt, yt, lo, hi, dense_out);
  }
  float* heap = state.upper_heap.data() + s * state.k;
  for (int64_t c = 0; c < cols; ++c) {
    if (hi[c] < heap[0]) float_heap_replace_top(heap, state.k, hi[c]);
  }
  const float U = heap[0];
  auto& near = state.near[s];
  for (int64_t c = 0; c < cols; ++c) {
    if (lo[c] <= U) near.push_back({first_col + c, lo[c]});
  }
  if (static_cast<int64_t>(near.size()) >= state.near_prune_at[s]) {
    near.erase(std::remove_if(near.begin(), near.end(), [U](const Candidate& a) { return a.bound > U; }), near.end());
    state.near_prune_at[s] = std::max<int64_t>(state.near_prune_at[s], 2 * static_cast<int64_t>(near.size()));
  }
  if (state.track_far) {
    float floor = state.far_floor[s];
    for (int64_t c = 0; c < cols; ++c) floor = lo[c] > floor ? lo[c] : floor;
    state.far_floor[s] = floor;
    auto& far = state.far[s];
    for (int64_t c = 0; c < cols; ++c) {
      if (hi[c] >= floor) far.push_back({first_col + c, hi[c]});
    }
    if (static_cast<int64_t>(far.size()) >= state.far_prune_at[s]) {
      far.erase(std::remove_if(far.begin(), far.end(), [floor](const Candidate& a) { return a.bound < floor; }),
                far.end());
      state.far_prune_at[s] = std::max<int64_t>(state.far_prune_at[s], 2 * static_cast<int64_t>(far.size()));
    }
  }
}

// offer_row_body compiled twice, for baseline x86-64 and for AVX-512 (its bound loops then run 16 lanes wide),
// chosen at run time. Same operations, no FMA contraction (-ffp-contract=off): identical bounds either way.
template <typename T>
void offer_row_baseline(KnnState& state, int64_t s, int64_t i, const T* dots, int64_t cols, int64_t first_col,
                        const TileBound& bound, const RowTerms& xt, const RowTerms& yt, RowScratch& scratch,
                        float* dense_out) {
  offer_row_body(state, s, i, dots, cols, first_col, bound, xt, yt, scratch, dense_out);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void offer_row_avx512(
    KnnState& state, int64_t s, int64_t i, const T* dots, int64_t cols, int64_t first_col, const TileBound& bound,
    const RowTerms& xt, const RowTerms& yt, RowScratch& scratch, float* dense_out) {
  offer_row_body(state, s, i, dots, cols, first_col, bound, xt, yt, scratch, dense_out);
}
#endif

inline bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

template <typename T>
inline void offer_row(KnnState& state, int64_t s, int64_t i, const T* dots, int64_t cols, int64_t first_col,
                      const TileBound& bound, const RowTerms& xt, const RowTerms& yt, RowScratch& scratch,
                      float* dense_out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx512()) {
    offer_row_avx512(state, s, i, dots, cols, first_col, bound, xt, yt, scratch, dense_out);
    return;
  }
#endif
  offer_row_baseline(state, s, i, dots, cols, first_col, bound, xt, yt, scratch, dense_out);
}

// exact_distance for the rescoring loops, also compiled for AVX-512 and chosen at run time (the
// extension is built for baseline x86-64, where its 8 double lanes take four SSE registers). Both
// builds run the same operations in the same order and never contract to FMA (-ffp-contract=off
// in setup.py), so they return bit-identical distances.
using ExactDistanceFn = float (*)(const float*, const float*, int64_t, float, float, int64_t);

inline float exact_distance_baseline(const float* x, const float* y, int64_t dim, float fx, float fy, int64_t metric) {
  return exact_distance(x, y, dim, fx, fy, metric);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) inline float exact_distance_avx512(const float* x, const float* y, int64_t dim,
                                                                      float fx, float fy, int64_t metric) {
  return exact_distance(x, y, dim, fx, fy, metric);
}
#endif

inline ExactDistanceFn exact_distance_fn() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const ExactDistanceFn fn = __builtin_cpu_supports("avx512f") ? exact_distance_avx512 : exact_distance_baseline;
  return fn;
#else
  return exact_distance_baseline;
#endif
}

// The exact maximum distance of row i (re-ranking's normaliser): its far candidates rescored.
inline void finish_row_maximum(KnnState& state, int64_t i, const float* xi, const float* y, int64_t D, float fxi,
                               const float* fy, int64_t metric, float* row_max) {
  if (!state.track_far) return;
  const ExactDistanceFn distance = exact_distance_fn();
  const float floor = state.far_floor[i];
  float maximum = 0.0f;
  for (const auto& a : state.far[i]) {
    if (a.bound >= floor) maximum = std::max(maximum, distance(xi, y + a.index * D, D, fxi, fy[a.index], metric));
  }
  std::vector<Candidate>().swap(state.far[i]);
  row_max[i] = maximum;
}

// The k nearest of (distance, index) pairs, in (distance, index) order, into out_dist / out_idx.
inline void write_k_nearest(std::vector<std::pair<float, int64_t>>& pairs, int64_t k, float* out_dist,
                            int64_t* out_idx) {
  const auto less = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return pair_less(a.first, a.second, b.first, b.second);
  };
  TORCH_CHECK(static_cast<int64_t>(pairs.size()) >= k, "knn: internal error, ", pairs.size(), " candidates for k=", k);
  std::partial_sort(pairs.begin(), pairs.begin() + k, pairs.end(), less);
  for (int64_t t = 0; t < k; ++t) {
    out_dist[t] = pairs[t].first;
    out_idx[t] = pairs[t].second;
  }
}

// Exact rescoring of row i's candidates: the k nearest in (distance, index) order, and (if
// tracked) the exact row maximum.
inline void finish_row(KnnState& state, int64_t i, const float* xi, const float* y, int64_t D, float fxi,
                       const float* fy, int64_t metric, float* out_dist, int64_t* out_idx, float* row_max,
                       std::vector<std::pair<float, int64_t>>& pairs) {
  const float U = state.upper_heap[i * state.k];
  const ExactDistanceFn distance = exact_distance_fn();
  pairs.clear();
  const auto& near = state.near[i];
  for (size_t t = 0; t < near.size(); ++t) {
    if (near[t].bound > U) continue;
    // the candidates' rows are scattered in memory: fetch the next one while this one is scored
    for (size_t u = t + 1; u < near.size(); ++u) {
      if (near[u].bound <= U) {
        const float* next = y + near[u].index * D;
        for (int64_t line = 0; line < D; line += 16) __builtin_prefetch(next + line);
        break;
      }
    }
    pairs.emplace_back(distance(xi, y + near[t].index * D, D, fxi, fy[near[t].index], metric), near[t].index);
  }
  std::vector<Candidate>().swap(state.near[i]);
  write_k_nearest(pairs, state.k, out_dist, out_idx);
  finish_row_maximum(state, i, xi, y, D, fxi, fy, metric, row_max);
}

// Exact rescoring of every row of a self search, each unordered pair {i, j} once. exact_distance is
// symmetric bit for bit (x - y and y - x are exact negatives, squared alike, summed in the same
// order), and the near pairs of a kNN graph are mostly in both rows' lists: the later row reads the
// earlier row's value instead of fetching an 8 KB row from anywhere in memory again.
inline void finish_rows_self(KnnState& state, const float* x, int64_t N, int64_t D, const float* factor,
                             int64_t metric, float* out_dist, int64_t* out_idx, float* row_max) {
  const int64_t k = state.k;
  std::vector<std::vector<int64_t>> lists(N);  // each row's surviving candidates, ascending index
  std::vector<std::vector<float>> dists(N);     // their exact distances (pairs owned by the other row: unset)
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float U = state.upper_heap[i * k];
      auto& list = lists[i];
      for (const auto& c : state.near[i]) {
        if (c.bound <= U) list.push_back(c.index);
      }
      std::vector<Candidate>().swap(state.near[i]);
      std::sort(list.begin(), list.end());
      dists[i].resize(list.size());
    }
  });
  // pair {i, j} with j < i belongs to row j when row j lists i: i's position in j's list, else -1
  const auto position_in_earlier_row = [&](int64_t i, int64_t j) -> int64_t {
    if (j >= i) return -1;
    const auto& other = lists[j];
    const auto it = std::lower_bound(other.begin(), other.end(), i);
    return it != other.end() && *it == i ? it - other.begin() : -1;
  };
  const ExactDistanceFn distance = exact_distance_fn();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> todo;
    for (int64_t i = begin; i < end; ++i) {
      const auto& list = lists[i];
      todo.clear();
      for (size_t t = 0; t < list.size(); ++t) {
        if (position_in_earlier_row(i, list[t]) < 0) todo.push_back(static_cast<int64_t>(t));
      }
      const float* xi = x + i * D;
      for (size_t u = 0; u < todo.size(); ++u) {
        if (u + 1 < todo.size()) {  // rows are scattered in memory: fetch the next while this one is scored
          const float* next = x + list[todo[u + 1]] * D;
          for (int64_t line = 0; line < D; line += 16) __builtin_prefetch(next + line);
        }
        const int64_t j = list[todo[u]];
        dists[i][todo[u]] = distance(xi, x + j * D, D, factor[i], factor[j], metric);
      }
    }
  });
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<float, int64_t>> pairs;
    for (int64_t i = begin; i < end; ++i) {
      const auto& list = lists[i];
      pairs.clear();
      for (size_t t = 0; t < list.size(); ++t) {
        const int64_t j = list[t], position = position_in_earlier_row(i, j);
        pairs.emplace_back(position < 0 ? dists[i][t] : dists[j][position], j);
      }
      write_k_nearest(pairs, k, out_dist + i * k, out_idx + i * k);
      finish_row_maximum(state, i, x + i * D, x, D, factor[i], factor, metric, row_max);
    }
  });
}

inline at::Tensor tile_operand(const at::Tensor& x, const RowTerms& t, TilePrecision p, int64_t start, int64_t len) {
  return (p == TilePrecision::kBFloat16 ? t.bf16 : x).narrow(0, start, len);
}

template <typename F>
inline void dispatch_tile(const at::Tensor& tile, F&& fn) {
  if (tile.scalar_type() == at::kBFloat16) {
    fn(tile.data_ptr<at::BFloat16>());
  } else {
    fn(tile.data_ptr<float>());
  }
}

struct KnnExtras {
  float* row_max = nullptr;    // optional: exact maximum distance of each row over all columns
  float* dense_out = nullptr;  // optional: fp32 distances of rows < dense_rows to columns >= dense_rows
  int64_t dense_rows = 0;      // these rows (the queries) always use fp32 tiles
};

// All-vs-all kNN of the rows of x (x against itself). The distance matrix is symmetric: only
// tiles on or above the diagonal are computed, each feeding its rows and (transposed) its
// columns. Rows < extras.dense_rows come first, in fp32 tiles (their distances to the other rows are
// an output); the rest use `precision`.
inline void knn_self_blocked_cpu(const at::Tensor& x, int64_t k, int64_t metric, TilePrecision precision,
                                 float* out_dist, int64_t* out_idx, const KnnExtras& extras) {
  const int64_t N = x.size(0), D = x.size(1), Qd = extras.dense_rows;
  const bool any_bf16 = precision == TilePrecision::kBFloat16 && Qd < N;
  const RowTerms t = row_terms(x, metric, any_bf16);
  KnnState state(N, k, extras.row_max != nullptr);
  // row blocks: [0, Qd) in fp32 (split to kSelfBlock), then [Qd, N) in `precision`
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (int64_t r0 = 0; r0 < Qd; r0 += kSelfBlock) blocks.emplace_back(r0, std::min(kSelfBlock, Qd - r0));
  for (int64_t r0 = Qd; r0 < N; r0 += kSelfBlock) blocks.emplace_back(r0, std::min(kSelfBlock, N - r0));
  const TileBound fp32_bound(TilePrecision::kFloat32, metric, D), own_bound(precision, metric, D);
  std::vector<RowScratch> scratch(at::get_num_threads());
  TileBuffer tile_buffer, transposed_buffer;
  for (size_t b = 0; b < blocks.size(); ++b) {
    const int64_t r0 = blocks[b].first, rows = blocks[b].second;
    const bool dense = r0 < Qd;
    const TilePrecision p = dense ? TilePrecision::kFloat32 : precision;
    const TileBound& bound = dense ? fp32_bound : own_bound;
    for (size_t cb = b; cb < blocks.size(); ++cb) {
      const int64_t c0 = blocks[cb].first, cols = blocks[cb].second;
      const auto a = tile_operand(x, t, p, r0, rows);
      auto tile = tile_buffer.view(rows, cols, a.scalar_type());
      gemm_nt_into(a, tile_operand(x, t, p, c0, cols), tile);
      dispatch_tile(tile, [&](auto* tp) {
        const int64_t ld = tile.stride(0);
        at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
          RowScratch& s = scratch[at::get_thread_num()];
          for (int64_t r = begin; r < end; ++r) {
            const int64_t i = r0 + r;
            float* dense_row = nullptr;
            if (extras.dense_out != nullptr && dense && c0 >= Qd) dense_row = extras.dense_out + i * (N - Qd) + (c0 - Qd);
            offer_row(state, i, i, tp + r * ld, cols, c0, bound, t, t, s, dense_row);
          }
        });
        if (cb == b) return;
        // the columns of the tile see its rows as neighbours: read them from a transposed copy
        // (a strided column walk thrashes the TLB)
        auto tile_t = transposed_buffer.view(cols, rows, tile.scalar_type());
        tile_t.copy_(tile.t());
        dispatch_tile(tile_t, [&](auto* tq) {
          const int64_t ld_t = tile_t.stride(0);
          at::parallel_for(0, cols, 8, [&](int64_t begin, int64_t end) {
            RowScratch& s = scratch[at::get_thread_num()];
            for (int64_t c = begin; c < end; ++c) {
              offer_row(state, c0 + c, c0 + c, tq + c * ld_t, rows, r0, bound, t, t, s, nullptr);
            }
          });
        });
      });
    }
  }
  finish_rows_self(state, x.data_ptr<float>(), N, D, t.factor.data(), metric, out_dist, out_idx, extras.row_max);
}

// x (M, D) and y (N, D) float32 contiguous. Writes the exact k nearest (distance, index) pairs per
// row, ascending; distances are squared Euclidean / cosine (the caller takes roots for "euclidean").
inline void knn_blocked_cpu(const at::Tensor& x, const at::Tensor& y, int64_t k, int64_t metric,
                            TilePrecision precision, float* out_dist, int64_t* out_idx,
                            const KnnExtras& extras = KnnExtras()) {
  if (x.is_same(y)) {
    knn_self_blocked_cpu(x, k, metric, precision, out_dist, out_idx, extras);
    return;
  }
  TORCH_CHECK(extras.row_max == nullptr && extras.dense_out == nullptr,
              "knn_blocked_cpu: row maxima and dense copies are only produced for self-kNN");
  const int64_t M = x.size(0), N = y.size(0), D = x.size(1);
  const bool bf16 = precision == TilePrecision::kBFloat16;
  const RowTerms tx = row_terms(x, metric, bf16), ty = row_terms(y, metric, bf16);
  const TileBound bound(precision, metric, D);
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  std::vector<RowScratch> scratch(at::get_num_threads());
  TileBuffer tile_buffer;
  for (int64_t r0 = 0; r0 < M; r0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, M - r0);
    KnnState state(rows, k, false);
    for (int64_t c0 = 0; c0 < N; c0 += kColBlock) {
      const int64_t cols = std::min(kColBlock, N - c0);
      const auto a = tile_operand(x, tx, precision, r0, rows);
      auto tile = tile_buffer.view(rows, cols, a.scalar_type());
      gemm_nt_into(a, tile_operand(y, ty, precision, c0, cols), tile);
      dispatch_tile(tile, [&](auto* tp) {
        const int64_t ld = tile.stride(0);
        at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
          RowScratch& s = scratch[at::get_thread_num()];
          for (int64_t r = begin; r < end; ++r) {
            offer_row(state, r, r0 + r, tp + r * ld, cols, c0, bound, tx, ty, s, nullptr);
          }
        });
      });
    }
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<std::pair<float, int64_t>> pairs;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = r0 + r;
        finish_row(state, r, xp + i * D, yp, D, tx.factor[i], ty.factor.data(), metric, out_dist + i * k,
                   out_idx + i * k, nullptr, pairs);
      }
    });
  }
}

}  // namespace reid_ops
