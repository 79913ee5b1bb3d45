// CPU kernel of the Market-1501 ranking metrics.
//
// CMC, AP and INP only need the rank of each true match among the non-junk gallery items, never a
// sorted gallery. With the m matches sorted by (distance, index), match s (1-based) has
//   full rank  = #{g : (d_g, g) < (d_s, s)}                 (all items, junk included)
//   clean rank = full rank - #{junk g before it}             (junk: same identity, same camera)
// so a query costs one pass to find its matches and junk plus m vectorised counting passes over its
// row (few matches per query in re-ID: a handful of images per identity). Queries with many matches
// (> kMaxCountingMatches) keep the items ranked up to the last match and sort them instead. Both
// paths give the same numbers (the same precision terms summed in the same order).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/topk_math.h"

namespace reid_ops {
namespace {

constexpr int64_t kMaxCountingMatches = 64;

// #{g : (row[g], g) < (d, index)} over a row of floats (distances compared as float).
template <typename scalar_t>
int64_t count_before(const scalar_t* row, int64_t G, float d, int64_t index) {
  int64_t count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t g = 0; g < G; ++g) {
    const float v = static_cast<float>(row[g]);
    count += (v < d) | ((v == d) & (g < index));
  }
  return count;
}

struct Ranked {
  float dist;
  int64_t index;
};

template <typename scalar_t>
void rank_metrics_rows(const scalar_t* dist, int64_t G, const int64_t* qpid, const int64_t* gpid,
                       const int64_t* qcam, const int64_t* gcam, int64_t max_rank, int64_t ap_topk, int64_t begin,
                       int64_t end, float* cmc, double* ap, double* inp, bool* valid) {
  std::vector<Ranked> kept, all, matches, junk;
  for (int64_t q = begin; q < end; ++q) {
    const scalar_t* row = dist + q * G;
    // the true matches (same identity, other camera) and the junk (same identity, same camera)
    matches.clear();
    junk.clear();
    for (int64_t g = 0; g < G; ++g) {
      if (gpid[g] != qpid[q]) continue;
      (gcam[g] != qcam[q] ? matches : junk).push_back({static_cast<float>(row[g]), g});
    }
    const int64_t num_matches = static_cast<int64_t>(matches.size());
    float* cmc_row = cmc + q * max_rank;
    if (num_matches == 0) {
      valid[q] = false;
      ap[q] = 0.0;
      inp[q] = 0.0;
      std::fill(cmc_row, cmc_row + max_rank, 0.0f);
      continue;
    }
    valid[q] = true;
    const auto less = [](const Ranked& a, const Ranked& b) { return pair_less(a.dist, a.index, b.dist, b.index); };
    if (num_matches <= kMaxCountingMatches) {
      std::sort(matches.begin(), matches.end(), less);
      std::sort(junk.begin(), junk.end(), less);
      int64_t junk_before = 0, hits_topk = 0, first_hit = -1, last_hit = -1;
      double precision_sum = 0.0, precision_sum_topk = 0.0;
      for (int64_t s = 0; s < num_matches; ++s) {
        const Ranked& match = matches[s];
        const int64_t full_rank = count_before(row, G, match.dist, match.index);
        while (junk_before < static_cast<int64_t>(junk.size()) &&
               pair_less(junk[junk_before].dist, junk[junk_before].index, match.dist, match.index)) {
          ++junk_before;
        }
        const int64_t clean_rank = full_rank - junk_before;
        precision_sum += static_cast<double>(s + 1) / static_cast<double>(clean_rank + 1);
        if (first_hit < 0) first_hit = clean_rank;
        last_hit = clean_rank;
        if (ap_topk > 0 && full_rank < ap_topk) {
          ++hits_topk;
          precision_sum_topk += static_cast<double>(hits_topk) / static_cast<double>(clean_rank + 1);
        }
      }
      ap[q] = ap_topk > 0 ? precision_sum_topk / static_cast<double>(std::max<int64_t>(1, hits_topk))
                          : precision_sum / static_cast<double>(num_matches);
      inp[q] = static_cast<double>(num_matches) / static_cast<double>(last_hit + 1);
      for (int64_t r = 0; r < max_rank; ++r) cmc_row[r] = r >= first_hit ? 1.0f : 0.0f;
      continue;
    }
    // every item ranked after the worst-ranked true match is irrelevant
    const Ranked worst = *std::max_element(matches.begin(), matches.end(), less);
    float cut_d = worst.dist;
    int64_t cut_i = worst.index;
    if (ap_topk > 0 && ap_topk < G) {  // the ap_topk-th item of the full ranking (junk included)
      all.resize(G);
      for (int64_t g = 0; g < G; ++g) all[g] = {static_cast<float>(row[g]), g};
      std::nth_element(all.begin(), all.begin() + (ap_topk - 1), all.end(), [](const Ranked& a, const Ranked& b) {
        return pair_less(a.dist, a.index, b.dist, b.index);
      });
      const Ranked& t = all[ap_topk - 1];
      if (pair_less(cut_d, cut_i, t.dist, t.index)) {
        cut_d = t.dist;
        cut_i = t.index;
      }
    } else if (ap_topk >= G) {
      cut_d = INFINITY;
      cut_i = INT64_MAX;
    }
    kept.clear();
    for (int64_t g = 0; g < G; ++g) {
      const float d = static_cast<float>(row[g]);
      if (!pair_less(cut_d, cut_i, d, g)) kept.push_back({d, g});
    }
    std::sort(kept.begin(), kept.end(), [](const Ranked& a, const Ranked& b) {
      return pair_less(a.dist, a.index, b.dist, b.index);
    });
    int64_t kept_rank = 0;  // position among non-junk items
    int64_t hits = 0, hits_topk = 0, first_hit = -1, last_hit = -1;
    double precision_sum = 0.0, precision_sum_topk = 0.0;
    for (int64_t full_rank = 0; full_rank < static_cast<int64_t>(kept.size()); ++full_rank) {
      const int64_t g = kept[full_rank].index;
      const bool same_id = gpid[g] == qpid[q];
      if (same_id && gcam[g] == qcam[q]) continue;  // junk: same identity seen by the same camera
      if (same_id) {
        ++hits;
        precision_sum += static_cast<double>(hits) / static_cast<double>(kept_rank + 1);
        if (first_hit < 0) first_hit = kept_rank;
        last_hit = kept_rank;
        if (ap_topk > 0 && full_rank < ap_topk) {
          ++hits_topk;
          precision_sum_topk += static_cast<double>(hits_topk) / static_cast<double>(kept_rank + 1);
        }
      }
      ++kept_rank;
    }
    ap[q] = ap_topk > 0 ? precision_sum_topk / static_cast<double>(std::max<int64_t>(1, hits_topk))
                        : precision_sum / static_cast<double>(num_matches);
    inp[q] = static_cast<double>(num_matches) / static_cast<double>(last_hit + 1);
    for (int64_t r = 0; r < max_rank; ++r) cmc_row[r] = r >= first_hit ? 1.0f : 0.0f;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rank_metrics_cpu(
    const at::Tensor& distmat_in, const at::Tensor& qpid_in, const at::Tensor& gpid_in, const at::Tensor& qcam_in,
    const at::Tensor& gcam_in, int64_t max_rank, int64_t ap_topk) {
  TORCH_CHECK(distmat_in.dim() == 2, "distmat must be 2-D (num_query, num_gallery), got shape ", distmat_in.sizes());
  const int64_t Q = distmat_in.size(0), G = distmat_in.size(1);
  TORCH_CHECK(Q > 0 && G > 0, "distmat is empty: shape ", distmat_in.sizes());
  TORCH_CHECK(max_rank >= 1, "max_rank must be >= 1, got ", max_rank);
  TORCH_CHECK(ap_topk >= 0, "ap_topk must be >= 1 (or None), got ", ap_topk);
  TORCH_CHECK(qpid_in.numel() == Q, "query_pids has ", qpid_in.numel(), " entries but distmat has ", Q, " rows");
  TORCH_CHECK(qcam_in.numel() == Q, "query_camids has ", qcam_in.numel(), " entries but distmat has ", Q, " rows");
  TORCH_CHECK(gpid_in.numel() == G, "gallery_pids has ", gpid_in.numel(), " entries but distmat has ", G,
              " columns");
  TORCH_CHECK(gcam_in.numel() == G, "gallery_camids has ", gcam_in.numel(), " entries but distmat has ", G,
              " columns");
  const auto distmat = distmat_in.scalar_type() == at::kDouble ? distmat_in.contiguous()
                                                                  : distmat_in.to(at::kFloat).contiguous();
  const auto qpid = qpid_in.to(at::kLong).contiguous(), gpid = gpid_in.to(at::kLong).contiguous();
  const auto qcam = qcam_in.to(at::kLong).contiguous(), gcam = gcam_in.to(at::kLong).contiguous();
  auto cmc = at::empty({Q, max_rank}, distmat.options().dtype(at::kFloat));
  auto ap = at::empty({Q}, distmat.options().dtype(at::kDouble));
  auto inp = at::empty({Q}, distmat.options().dtype(at::kDouble));
  auto valid = at::empty({Q}, distmat.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(distmat.scalar_type(), "rank_metrics_cpu", [&] {
    const scalar_t* dp = distmat.const_data_ptr<scalar_t>();
    at::parallel_for(0, Q, 8, [&](int64_t begin, int64_t end) {
      rank_metrics_rows<scalar_t>(dp, G, qpid.const_data_ptr<int64_t>(), gpid.const_data_ptr<int64_t>(),
                                  qcam.const_data_ptr<int64_t>(), gcam.const_data_ptr<int64_t>(), max_rank, ap_topk,
                                  begin, end, cmc.data_ptr<float>(), ap.data_ptr<double>(), inp.data_ptr<double>(),
                                  valid.data_ptr<bool>());
    });
  });
  return {cmc, ap, inp, valid};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ops, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_rank_metrics"), TORCH_FN(rank_metrics_cpu));
}

}  // namespace reid_ops
