// CPU kernel of the Market-1501 ranking metrics.
//
// For each query only the gallery items ranked at or before its last true match (or within the
// top `ap_topk`) influence CMC, AP and INP, so instead of sorting all G items we keep those and
// sort them: one pass over the row plus a small sort.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/topk_math.h"

namespace reid_ops {
namespace {

struct Ranked {
  float dist;
  int64_t index;
};

template <typename scalar_t>
void rank_metrics_rows(const scalar_t* dist, int64_t G, const int64_t* qpid, const int64_t* gpid,
                       const int64_t* qcam, const int64_t* gcam, int64_t max_rank, int64_t ap_topk, int64_t begin,
                       int64_t end, float* cmc, double* ap, double* inp, bool* valid) {
  std::vector<Ranked> kept;
  std::vector<Ranked> all;
  for (int64_t q = begin; q < end; ++q) {
    const scalar_t* row = dist + q * G;
    // (distance, index) of the worst-ranked true match: every item ranked after it is irrelevant
    float worst_d = -INFINITY;
    int64_t worst_i = -1;
    int64_t num_matches = 0;
    for (int64_t g = 0; g < G; ++g) {
      if (gpid[g] == qpid[q] && gcam[g] != qcam[q]) {
        ++num_matches;
        const float d = static_cast<float>(row[g]);
        if (!pair_less(d, g, worst_d, worst_i)) {
          worst_d = d;
          worst_i = g;
        }
      }
    }
    float* cmc_row = cmc + q * max_rank;
    if (num_matches == 0) {
      valid[q] = false;
      ap[q] = 0.0;
      inp[q] = 0.0;
      std::fill(cmc_row, cmc_row + max_rank, 0.0f);
      continue;
    }
    valid[q] = true;
    float cut_d = worst_d;
    int64_t cut_i = worst_i;
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
