// Registration of the ranking metrics (CMC, AP, INP per query). CPU only: the work is one pass
// over the distance matrix plus a sort of the few gallery items ranked above the last match.
#include <torch/library.h>

namespace reid_ops {

TORCH_LIBRARY_FRAGMENT(reid_ops, m) {
  // Returns (cmc (Q, max_rank) float32, ap (Q) float64, inp (Q) float64, valid (Q) bool).
  m.def(
      "_rank_metrics(Tensor distmat, Tensor query_pids, Tensor gallery_pids, Tensor query_camids, "
      "Tensor gallery_camids, int max_rank, int ap_topk) -> (Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace reid_ops
