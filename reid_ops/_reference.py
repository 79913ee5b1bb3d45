"""Plain numpy/PyTorch references for the ``reid_ops`` extension (not part of its API; the tests and bench/ops.py
both import them from here).

Each function is written from the published definition (Zhong et al., CVPR 2017, "Re-ranking Person
Re-identification with k-reciprocal Encoding"; the SpCL/MMT+ clustering variant described in
docs/differences.md#clustering-jaccard-distance; the Market-1501 evaluation protocol of
docs/differences.md#validation-metric), never from the
kernels, so that the tests in tests/test_ops.py can fail. They are deliberately simple (loops, float64 where the
definition allows it) and only meant for test-sized inputs, except the ``*_classic`` / ``*_dense`` versions, which
mirror the vectorised dense numpy code shipped in fast-reid/torchreid/SpCL and serve as the baselines of
bench/ops.py.
"""

from __future__ import annotations

import numpy as np
import torch

# --------------------------------------------------------------------------------------------------------------
# Distances and k-nearest neighbours
# --------------------------------------------------------------------------------------------------------------


def pairwise_distance_ref(x: np.ndarray, y: np.ndarray, metric: str = "sqeuclidean") -> np.ndarray:
    """(M, N) float64 distances computed from explicit differences / norms (no GEMM expansion)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if metric in ("sqeuclidean", "euclidean"):
        out = np.empty((x.shape[0], y.shape[0]), dtype=np.float64)
        for i in range(x.shape[0]):  # row by row keeps the (M, N, D) difference tensor out of memory
            out[i] = ((x[i][None, :] - y) ** 2).sum(axis=1)
        return np.sqrt(out) if metric == "euclidean" else out
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        yn = y / np.linalg.norm(y, axis=1, keepdims=True)
        return 1.0 - xn @ yn.T
    raise ValueError(f"unknown metric {metric!r}")


def knn_ref(x: np.ndarray, y: np.ndarray, k: int, metric: str = "sqeuclidean") -> tuple[np.ndarray, np.ndarray]:
    """The k smallest distances per row, ascending, ties broken by the smaller column index."""
    dist = pairwise_distance_ref(x, y, metric)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), order.astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# Test-time k-reciprocal re-ranking (docs/differences.md#re-ranking)
# --------------------------------------------------------------------------------------------------------------


def _normalised_original_distance(q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray) -> np.ndarray:
    """O = transpose(M**2 / column max of M**2) in float32, M = [[q_q, q_g], [q_g^T, g_g]] (classic steps 1-3)."""
    q_g, q_q, g_g = (np.asarray(a, dtype=np.float32) for a in (q_g, q_q, g_g))
    m = np.concatenate([np.concatenate([q_q, q_g], axis=1), np.concatenate([q_g.T, g_g], axis=1)], axis=0)
    m = np.power(m, 2).astype(np.float32)
    return np.transpose(m / np.max(m, axis=0)).astype(np.float32)


def _k_reciprocal(rank: np.ndarray, i: int, list_len: int) -> list[int]:
    """{j in rank[i, :list_len] : i in rank[j, :list_len]}, in the order of rank[i]."""
    return [int(j) for j in rank[i, :list_len] if i in set(rank[j, :list_len].tolist())]


def _expanded_set(rank: np.ndarray, i: int, list_len: int, half_list_len: int) -> list[int]:
    """E(i): the k-reciprocal set of i expanded by the half-size sets of its members under the 2/3 overlap rule."""
    n1 = _k_reciprocal(rank, i, list_len)
    expansion = set(n1)
    for c in n1:
        nh = _k_reciprocal(rank, c, half_list_len)
        if len(set(nh) & set(n1)) > 2.0 / 3.0 * len(nh):
            expansion.update(nh)
    return sorted(expansion)


def _jaccard_from_v(v_rows: np.ndarray, v_all: np.ndarray) -> np.ndarray:
    """d_J(a, b) = 1 - s / (2 - s), s = sum_k min(V[a, k], V[b, k]) (float64)."""
    out = np.empty((v_rows.shape[0], v_all.shape[0]), dtype=np.float64)
    for a in range(v_rows.shape[0]):
        s = np.minimum(v_rows[a][None, :], v_all).sum(axis=1)
        out[a] = 1.0 - s / (2.0 - s)
    return out


def re_ranking_ref(
    q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> np.ndarray:
    """Loop-based k-reciprocal re-ranking, straight from the definition (Zhong et al. 2017, Eq. 7-14;
    docs/differences.md#re-ranking)."""
    num_query = np.asarray(q_g).shape[0]
    o = _normalised_original_distance(q_g, q_q, g_g)
    n = o.shape[0]
    rank = np.argsort(o, axis=1, kind="stable")
    half = int(np.around(k1 / 2.0))  # round half to even, as np.around in the classic code
    v = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        members = _expanded_set(rank, i, k1 + 1, half + 1)
        weights = np.exp(-o[i, members].astype(np.float64))  # Gaussian kernel of the distance (Eq. 7)
        v[i, members] = weights / weights.sum()
    if k2 != 1:  # local query expansion (Eq. 14)
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = _jaccard_from_v(v[:num_query], v)
    final = (1.0 - lambda_value) * jaccard + lambda_value * o[:num_query].astype(np.float64)
    return final[:, num_query:]


def re_ranking_classic(
    q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> np.ndarray:
    """The vectorised-per-row dense numpy re-ranking as shipped in fast-reid/torchreid (dense (Q+G)^2 V, full
    argsort, inverted index for the Jaccard step), written from docs/differences.md#re-ranking. Only change: a
    stable argsort, so that ties are broken by index like the other implementations (the shipped code uses numpy's
    default quicksort)."""
    num_query = q_g.shape[0]
    original_dist = _normalised_original_distance(q_g, q_q, g_g)
    num_all = original_dist.shape[0]
    v = np.zeros_like(original_dist, dtype=np.float32)
    initial_rank = np.argsort(original_dist, axis=1, kind="stable").astype(np.int32)
    half = int(np.around(k1 / 2.0))
    for i in range(num_all):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        reciprocal = forward[np.where(backward == i)[0]]
        expansion = reciprocal
        for candidate in reciprocal:
            cand_forward = initial_rank[candidate, : half + 1]
            cand_backward = initial_rank[cand_forward, : half + 1]
            cand_reciprocal = cand_forward[np.where(cand_backward == candidate)[0]]
            if len(np.intersect1d(cand_reciprocal, reciprocal)) > 2.0 / 3 * len(cand_reciprocal):
                expansion = np.append(expansion, cand_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    original_dist = original_dist[:num_query]
    if k2 != 1:
        v_qe = np.zeros_like(v, dtype=np.float32)
        for i in range(num_all):
            v_qe[i, :] = np.mean(v[initial_rank[i, :k2], :], axis=0)
        v = v_qe
        del v_qe
    del initial_rank
    inv_index = [np.where(v[:, col] != 0)[0] for col in range(num_all)]
    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(num_query):
        temp_min = np.zeros(shape=[1, num_all], dtype=np.float32)
        nonzero = np.where(v[i, :] != 0)[0]
        for col in nonzero:
            rows = inv_index[col]
            temp_min[0, rows] = temp_min[0, rows] + np.minimum(v[i, col], v[rows, col])
        jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:, num_query:]


# --------------------------------------------------------------------------------------------------------------
# Clustering Jaccard distance (SpCL / MMT+ release, docs/differences.md#clustering-jaccard-distance)
# --------------------------------------------------------------------------------------------------------------


def _clustering_v(features: np.ndarray, rank: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """Dense V' of the clustering variant, in float64. rank[i] = all points sorted by squared distance to i."""
    features = np.asarray(features, dtype=np.float64)
    n = features.shape[0]
    half = int(np.around(k1 / 2.0))
    v = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        members = _expanded_set(rank, i, k1, half + 1)  # only k1 columns exist (self + k1 - 1 neighbours)
        d = 2.0 - 2.0 * features[members] @ features[i]  # unnormalised squared distance of unit vectors
        weights = np.exp(-d)
        v[i, members] = weights / weights.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    return v


def jaccard_ref(features: np.ndarray, k1: int = 20, k2: int = 6) -> np.ndarray:
    """Dense (N, N) float64 clustering Jaccard distance; negatives clamped to 0, diagonal 0."""
    rank = np.argsort(pairwise_distance_ref(features, features), axis=1, kind="stable")
    v = _clustering_v(features, rank, k1, k2)
    jaccard = np.maximum(_jaccard_from_v(v, v), 0.0)
    np.fill_diagonal(jaccard, 0.0)
    return jaccard


def jaccard_pairwise_bruteforce(features: np.ndarray, k1: int = 20, k2: int = 6) -> np.ndarray:
    """Same quantity computed pair by pair as sum min / sum max (equal to s / (2 - s) since rows of V' sum to 1).
    Used only to validate jaccard_ref and jaccard_dense against each other."""
    rank = np.argsort(pairwise_distance_ref(features, features), axis=1, kind="stable")
    v = _clustering_v(features, rank, k1, k2)
    n = v.shape[0]
    out = np.zeros((n, n), dtype=np.float64)
    for a in range(n):
        for b in range(n):
            if a != b:
                out[a, b] = max(1.0 - np.minimum(v[a], v[b]).sum() / np.maximum(v[a], v[b]).sum(), 0.0)
    return out


def knn_blocked_torch(features: torch.Tensor, k: int, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact self-kNN by squared Euclidean with fp32 torch.mm in row blocks + topk: the GEMM floor of Jaccard."""
    norms = (features * features).sum(dim=1)
    distances, indices = [], []
    for start in range(0, features.shape[0], block):
        # ||y||^2 - 2 <x, y> in one fused addmm; the row's own ||x||^2 does not change its ranking
        d = torch.addmm(norms[None, :], features[start : start + block], features.T, alpha=-2.0)
        values, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
        distances.append(values + norms[start : start + block, None])
        indices.append(idx)
    return torch.cat(distances), torch.cat(indices)


def jaccard_dense(features: np.ndarray, k1: int = 20, k2: int = 6) -> np.ndarray:
    """The dense numpy clustering Jaccard as in the SpCL / MMT+ release
    (docs/differences.md#clustering-jaccard-distance): kNN lists from an exact search (here a blocked fp32 GEMM + topk
    instead of faiss), dense N x N float32 V and V', inverted index, dense N x N output."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    n = features.shape[0]
    _, idx = knn_blocked_torch(torch.from_numpy(features), k1)
    initial_rank = idx.numpy()
    half = int(np.around(k1 / 2.0))
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        forward = initial_rank[i, :k1]
        backward = initial_rank[forward, :k1]
        reciprocal = forward[np.where(backward == i)[0]]
        expansion = reciprocal
        for candidate in reciprocal:
            cand_forward = initial_rank[candidate, : half + 1]
            cand_backward = initial_rank[cand_forward, : half + 1]
            cand_reciprocal = cand_forward[np.where(cand_backward == candidate)[0]]
            if len(np.intersect1d(cand_reciprocal, reciprocal)) > 2.0 / 3 * len(cand_reciprocal):
                expansion = np.append(expansion, cand_reciprocal)
        expansion = np.unique(expansion)
        dist = 2.0 - 2.0 * features[expansion] @ features[i]
        weight = np.exp(-dist)
        v[i, expansion] = weight / np.sum(weight)
    if k2 != 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i, :] = np.mean(v[initial_rank[i, :k2], :], axis=0)
        v = v_qe
        del v_qe
    inv_index = [np.where(v[:, col] != 0)[0] for col in range(n)]
    jaccard_dist = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        temp_min = np.zeros((1, n), dtype=np.float32)
        for col in np.where(v[i, :] != 0)[0]:
            rows = inv_index[col]
            temp_min[0, rows] = temp_min[0, rows] + np.minimum(v[i, col], v[rows, col])
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
    np.maximum(jaccard_dist, 0, out=jaccard_dist)
    np.fill_diagonal(jaccard_dist, 0)
    return jaccard_dist


# --------------------------------------------------------------------------------------------------------------
# GeM pooling
# --------------------------------------------------------------------------------------------------------------


def gem_ref(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Unfused generalized-mean pooling over H x W: (mean clamp(x, eps)^p)^(1/p) -> (N, C)."""
    return x.clamp(min=eps).pow(p).mean((2, 3)).pow(1.0 / p)


# --------------------------------------------------------------------------------------------------------------
# Rank metrics (Market-1501 protocol; VisDA top-k AP variant of docs/differences.md#validation-metric)
# --------------------------------------------------------------------------------------------------------------


def evaluate_rank_ref(
    distmat: np.ndarray,
    query_pids: np.ndarray,
    gallery_pids: np.ndarray,
    query_camids: np.ndarray,
    gallery_camids: np.ndarray,
    max_rank: int = 50,
    ap_topk: int | None = None,
) -> dict:
    """Per-query numpy loop (torchreid style). Raises ValueError when no query has a valid match."""
    distmat = np.asarray(distmat)
    query_pids, gallery_pids = np.asarray(query_pids), np.asarray(gallery_pids)
    query_camids, gallery_camids = np.asarray(query_camids), np.asarray(gallery_camids)
    all_cmc, all_ap, all_inp = [], [], []
    for q in range(distmat.shape[0]):
        order = np.argsort(distmat[q], kind="stable")
        junk = (gallery_pids[order] == query_pids[q]) & (gallery_camids[order] == query_camids[q])
        matches = (gallery_pids[order] == query_pids[q])[~junk].astype(np.float64)
        if not matches.any():
            continue  # no valid match: the query is excluded
        cmc = np.minimum(matches.cumsum(), 1.0)
        if cmc.shape[0] < max_rank:  # beyond the last kept rank the curve stays at its final value (1)
            cmc = np.concatenate([cmc, np.full(max_rank - cmc.shape[0], cmc[-1])])
        all_cmc.append(cmc[:max_rank])
        positions = np.flatnonzero(matches)
        all_inp.append(len(positions) / (positions[-1] + 1.0))  # INP: hard-positive rank penalty
        if ap_topk is None:
            hits = np.arange(1, len(positions) + 1)
            all_ap.append(np.mean(hits / (positions + 1.0)))
        else:  # first ap_topk ranks of the full ranking, junk dropped without back-filling
            r = (gallery_pids[order[:ap_topk]] == query_pids[q])[~junk[:ap_topk]].astype(np.float64)
            precision = r.cumsum() / np.arange(1, len(r) + 1)
            all_ap.append(float((r * precision).sum() / max(1.0, r.sum())))
    if not all_cmc:
        raise ValueError("no query has a valid match in the gallery")
    return {
        "cmc": np.mean(np.stack(all_cmc), axis=0),
        "mAP": float(np.mean(all_ap)),
        "mINP": float(np.mean(all_inp)),
        "num_valid_queries": len(all_cmc),
    }


def evaluate_rank_torchreid_loop(
    distmat: np.ndarray,
    query_pids: np.ndarray,
    gallery_pids: np.ndarray,
    query_camids: np.ndarray,
    gallery_camids: np.ndarray,
    max_rank: int = 50,
) -> dict:
    """The per-query python/numpy loop of torchreid's Market-1501 evaluation (with fast-reid's mINP), written from
    that protocol: one argsort of the whole matrix, then per query a python list comprehension for precision@k.
    Baseline of bench/ops.py (the field notes' 17.5 s row). Assumes every kept ranking has >= max_rank entries."""
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (gallery_pids[indices] == query_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for q_idx in range(distmat.shape[0]):
        order = indices[q_idx]
        remove = (gallery_pids[order] == query_pids[q_idx]) & (gallery_camids[order] == query_camids[q_idx])
        raw_cmc = matches[q_idx][np.invert(remove)]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        last_positive = np.max(np.where(raw_cmc == 1))
        all_inp.append(cmc[last_positive] / (last_positive + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        precision = [x / (i + 1.0) for i, x in enumerate(raw_cmc.cumsum())]
        all_ap.append((np.asarray(precision) * raw_cmc).sum() / raw_cmc.sum())
    if not all_cmc:
        raise ValueError("no query has a valid match in the gallery")
    return {
        "cmc": np.asarray(all_cmc, dtype=np.float64).mean(axis=0),
        "mAP": float(np.mean(all_ap)),
        "mINP": float(np.mean(all_inp)),
        "num_valid_queries": len(all_cmc),
    }
