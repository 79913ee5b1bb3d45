// Registration of the k-reciprocal re-ranking / Jaccard stages. The public functions
// re_ranking, re_ranking_from_distances and jaccard_graph (python package reid_ops) chain them:
//   neighbours -> k-reciprocal expansion -> Gaussian weights -> query expansion -> Jaccard.
// Every stage works on neighbour lists or sparse rows; none allocates an N x N matrix.
#include <torch/library.h>

namespace reid_ops {

TORCH_LIBRARY_FRAGMENT(reid_ops, m) {
  // Exact kNN lists (squared Euclidean) of all rows against all rows with their exact distances,
  // each row's exact maximum squared distance (if with_row_max; else zeros), and (if num_query > 0)
  // the query x gallery squared distances (fp32 GEMM). bf16_search: candidates of the other rows
  // from bfloat16 tiles. Returns (rank, rank_dist, row_max, q_g).
  m.def(
      "_neighbors_from_features(Tensor features, int kmax, int num_query, bool with_row_max, bool bf16_search) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  // kNN lists of the columns of M = [[q_q, q_g], [q_g^T, g_g]], ordered by M^2 / colmax(M^2) (the
  // classic code normalises columns and transposes), and each column's maximum of M^2.
  m.def("_neighbors_from_distances(Tensor q_g, Tensor q_q, Tensor g_g, int kmax) -> (Tensor, Tensor)");
  // CSR (indptr, indices) of the expanded k-reciprocal sets R*(i).
  m.def("_kreciprocal_expansion(Tensor rank, int list_len, int half_list_len) -> (Tensor, Tensor)");
  // Gaussian weights on the CSR pattern; row_max empty: exp(-||fi-fj||^2) (clustering variant),
  // otherwise exp(-||fi-fj||^2 / row_max[i]). Pairs (i, j) listed in rank[i] take their distance
  // from rank_dist[i] (the same exact value, computed once by the neighbour search); the others
  // are computed from the features.
  m.def(
      "_weights_from_features(Tensor features, Tensor indptr, Tensor indices, Tensor row_max, Tensor rank, "
      "Tensor rank_dist) -> Tensor");
  m.def(
      "_weights_from_distances(Tensor q_g, Tensor q_q, Tensor g_g, Tensor row_max, Tensor indptr, "
      "Tensor indices) -> Tensor");
  // V'[i] = mean of V over rows rank[i, :k2].
  m.def("_query_expansion(Tensor indptr, Tensor indices, Tensor values, Tensor rank, int k2) -> (Tensor, Tensor, Tensor)");
  // out[q, g] = (1 - lambda) * jaccard(q, Q + g) + lambda * base'[q, g] / row_max[q], where
  // base' = base^2 if square_base else base. `out` may alias `base`.
  m.def(
      "_jaccard_rerank_out(Tensor indptr, Tensor indices, Tensor values, int num_query, Tensor base, "
      "Tensor row_max, bool square_base, float lambda_value, Tensor(a!) out) -> ()");
  // All pairs with Jaccard distance < max_distance as CSR (indptr, indices, data); diagonal = 0.
  m.def("_jaccard_graph(Tensor indptr, Tensor indices, Tensor values, float max_distance) -> (Tensor, Tensor, Tensor)");
}

}  // namespace reid_ops
