"""reid_ops: the hot operations of person re-identification, as a C++/CUDA PyTorch extension.

Every function accepts torch tensors (CPU, or CUDA when the CUDA kernels were built) or numpy
arrays, and returns numpy when given numpy, torch otherwise. No function allocates an N x N
matrix unless N x N is its output.

    pairwise_distance(x, y, metric="sqeuclidean")            -> (M, N) float32
    knn(x, y, k, metric="sqeuclidean")                        -> (distances, indices), (M, k)
    re_ranking(query_features, gallery_features, k1, k2, lambda_value)         -> (Q, G)
    re_ranking_from_distances(q_g, q_q, g_g, k1, k2, lambda_value)             -> (Q, G)
    jaccard_graph(features, k1=20, k2=6, max_distance=1.0)   -> scipy.sparse.csr_matrix (N, N)
    gem(x, p, eps=1e-6)                                       -> (N, C), differentiable in x and p
    evaluate_rank(distmat, query_pids, gallery_pids, query_camids, gallery_camids, max_rank=50, ap_topk=None)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse
import torch

from . import _C  # noqa: F401  (loads the library: registers torch.ops.reid_ops.*)

__all__ = [
    "pairwise_distance",
    "knn",
    "re_ranking",
    "re_ranking_from_distances",
    "jaccard_graph",
    "gem",
    "evaluate_rank",
    "compiled_with_cuda",
]

_ops = torch.ops.reid_ops
_METRICS = {"sqeuclidean": 0, "euclidean": 1, "cosine": 2}


def compiled_with_cuda() -> bool:
    """Whether the CUDA kernels were compiled into this build."""
    return bool(_ops._compiled_with_cuda())


# ----------------------------------------------------------------------------------------------
# input handling


def _as_tensor(value: Any, name: str) -> tuple[torch.Tensor, bool]:
    """Returns (float32 tensor, came_from_numpy); rejects non-numeric input with a clear message."""
    was_numpy = isinstance(value, np.ndarray)
    if was_numpy:
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
    if not (tensor.is_floating_point()):
        raise TypeError(f"{name} must hold floating-point values, got dtype {tensor.dtype}")
    return tensor, was_numpy


def _all_finite(tensor: torch.Tensor) -> bool:
    """NaN/Inf check in slices of 4M elements, so no input-sized temporary is allocated."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(1 << 22))


# The kernels compute in float32 with the expansion ||x||^2 + ||y||^2 - 2 x.y, whose terms are bounded by
# (max ||x|| + max ||y||)^2; a quarter of float32's maximum leaves room for rounding in the sums.
_MAX_SQUARED_DISTANCE = float(torch.finfo(torch.float32).max) / 4


def _max_row_norm(tensor: torch.Tensor) -> float:
    """Largest row norm, computed in float64 in slices of about 4M elements (no input-sized temporary)."""
    rows = max(1, (1 << 22) // tensor.shape[1])
    return max(float(torch.linalg.vector_norm(part.double(), dim=1).max()) for part in tensor.split(rows))


def _check_features(tensor: torch.Tensor, name: str) -> float:
    """Validates a (num_samples, dim) feature matrix; returns its largest row norm."""
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D (num_samples, dim), got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    if tensor.shape[1] == 0:
        raise ValueError(f"{name} has 0 feature dimensions")
    if not _all_finite(tensor):
        raise ValueError(f"{name} contains NaN or Inf values")
    return _max_row_norm(tensor)


def _check_no_overflow(max_norm_x: float, max_norm_y: float, names: str) -> None:
    """Refuses finite features whose squared distances could overflow float32: they would come out as Inf or NaN
    distances, or as a constant re-ranking matrix, without any error."""
    bound = (max_norm_x + max_norm_y) * (max_norm_x + max_norm_y)  # a float: inf rather than OverflowError
    if not bound <= _MAX_SQUARED_DISTANCE:
        raise ValueError(
            f"{names}: squared distances up to {bound:.3g} would overflow float32, in which they are computed "
            f"(largest accepted {_MAX_SQUARED_DISTANCE:.3g}); scale the features down (e.g. L2-normalise them)"
        )


def _check_pair(x: torch.Tensor, y: torch.Tensor, xn: str, yn: str) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {xn} has {x.shape[1]}, {yn} has {y.shape[1]}")
    if x.device != y.device:
        raise ValueError(f"{xn} is on {x.device} but {yn} is on {y.device}")


def _metric_code(metric: str) -> int:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
    return _METRICS[metric]


def _check_int(value: Any, name: str, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be between {low} and {high} ({what}), got {name}={value}")
    return int(value)


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32).contiguous()


def _out(tensor: torch.Tensor, to_numpy: bool) -> Any:
    return tensor.cpu().numpy() if to_numpy else tensor


_SEARCH_PRECISIONS = ("auto", "bf16", "fp32")


_BF16_MIN_COLUMNS = 8192


def _bf16_search(candidate_precision: str, columns: int = 0) -> bool:
    """Whether the kNN candidate search uses bfloat16 GEMM tiles (the answer is the same either way).

    "auto" picks bf16 when the CPU has bf16 GEMM instructions (AVX-512 BF16 or AMX, as oneDNN reports them) and the
    search has at least 8,192 columns. The bf16 bound is wider, so about twice as many candidates are rescored
    exactly; that costs a fixed amount per row, while the GEMM's saving grows with the columns. Measured on an AMD
    EPYC with AVX-512 BF16 (2 threads, clustered D = 2,048 features, re-ranking with k1 = 30): at 12,000 rows bf16
    and fp32 are level within the machine's noise (4.3-4.6 against 4.7-5.2 CPU seconds), at 40,000 rows bf16 takes
    15.1 s against 16.9 s. "bf16" / "fp32" force either search.
    """
    if candidate_precision not in _SEARCH_PRECISIONS:
        raise ValueError(f"candidate_precision must be one of {_SEARCH_PRECISIONS}, got {candidate_precision!r}")
    if candidate_precision == "auto":
        return columns >= _BF16_MIN_COLUMNS and _cpu_has_bf16_gemm()
    return candidate_precision == "bf16"


def _cpu_has_bf16_gemm() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ----------------------------------------------------------------------------------------------
# distances


def pairwise_distance(x: Any, y: Any, metric: str = "sqeuclidean") -> Any:
    """(M, N) float32 distances between the rows of x and y.

    metric: "sqeuclidean" ||x - y||^2, "euclidean" ||x - y||, "cosine" 1 - cos(x, y).
    Computed by GEMM into the output; entries of near-identical rows are recomputed from the
    difference, so identical rows give exactly 0 and no entry is negative.
    """
    xt, x_np = _as_tensor(x, "x")
    yt, _ = _as_tensor(y, "y")
    norm_x = _check_features(xt, "x")
    norm_y = _check_features(yt, "y")
    _check_pair(xt, yt, "x", "y")
    _check_no_overflow(norm_x, norm_y, "x and y")
    out = _ops.pairwise_distance(_float32(xt), _float32(yt), _metric_code(metric))
    return _out(out, x_np)


def knn(x: Any, y: Any, k: int, metric: str = "sqeuclidean", candidate_precision: str = "auto") -> tuple[Any, Any]:
    """The exact k nearest rows of y for every row of x: (distances, indices), both (M, k), ascending.

    Ties are broken by the smaller index. Works in blocks: M x N is never materialised. Candidates come from GEMM
    tiles in bf16 or fp32 (candidate_precision "auto" | "bf16" | "fp32"), each with a rigorous rounding-error bound,
    and are rescored exactly: both give the same neighbours and distances (CUDA tensors always search in fp32).
    """
    xt, x_np = _as_tensor(x, "x")
    yt, _ = _as_tensor(y, "y")
    norm_x = _check_features(xt, "x")
    norm_y = _check_features(yt, "y")
    _check_pair(xt, yt, "x", "y")
    _check_no_overflow(norm_x, norm_y, "x and y")
    k = _check_int(k, "k", 1, yt.shape[0], f"y has {yt.shape[0]} rows")
    metric_code = _metric_code(metric)
    bf16_search = _bf16_search(candidate_precision, yt.shape[0]) and xt.device.type == "cpu"
    dist, idx = _ops.knn(_float32(xt), _float32(yt), k, metric_code, bf16_search)
    return _out(dist, x_np), _out(idx, x_np)


# ----------------------------------------------------------------------------------------------
# k-reciprocal re-ranking (Zhong et al., CVPR 2017) and the clustering Jaccard graph


def _half(k1: int) -> int:
    # numpy's around(k1 / 2): round half to even, as the classic implementation
    return int(np.around(k1 / 2.0))


def _check_rerank_params(k1: Any, k2: Any, lambda_value: Any, n: int) -> tuple[int, int, float]:
    k1 = _check_int(k1, "k1", 1, n - 1, f"the k1 + 1 nearest neighbours must exist among Q + G = {n} points")
    k2 = _check_int(k2, "k2", 1, n, f"Q + G = {n} points")
    if not isinstance(lambda_value, (int, float, np.floating)) or not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}")
    return k1, k2, float(lambda_value)


def _expanded_jaccard_rows(rank: torch.Tensor, weights_fn, list_len: int, half_len: int, k2: int):
    """Shared middle of both Jaccard variants: R*(i) -> Gaussian weights V -> query expansion V'."""
    indptr, indices = _ops._kreciprocal_expansion(rank, list_len, half_len)
    values = weights_fn(indptr, indices)
    if k2 != 1:  # the classic code skips expansion for k2 == 1 (rank[i, 0] need not be i)
        indptr, indices, values = _ops._query_expansion(indptr, indices, values, rank, k2)
    return indptr, indices, values


def re_ranking(
    query_features: Any,
    gallery_features: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    candidate_precision: str = "auto",
) -> Any:
    """k-reciprocal re-ranking of the Euclidean distances between query and gallery features.

    Equals re_ranking_from_distances(euclidean q-g, q-q, g-g) (the classic algorithm), but the
    distances are computed in blocks: peak memory O((Q + G) * k1 * k2 + Q * G), never (Q + G)^2.
    Neighbour lists and row maxima are exact (see knn; candidate_precision only changes how candidates
    are found, never the result); the query x gallery distances come from an fp32 GEMM.
    Returns the (Q, G) float32 final distance.
    """
    qt, q_np = _as_tensor(query_features, "query_features")
    gt, _ = _as_tensor(gallery_features, "gallery_features")
    norm_q = _check_features(qt, "query_features")
    norm_g = _check_features(gt, "gallery_features")
    _check_pair(qt, gt, "query_features", "gallery_features")
    _check_no_overflow(norm_q, norm_g, "query_features and gallery_features")
    num_query = qt.shape[0]
    n = num_query + gt.shape[0]
    k1, k2, lambda_value = _check_rerank_params(k1, k2, lambda_value, n)
    bf16_search = _bf16_search(candidate_precision, n)
    features = torch.cat([_float32(qt), _float32(gt)], 0)
    kmax = max(k1 + 1, k2)
    rank, rank_dist, row_max, q_g = _ops._neighbors_from_features(features, kmax, num_query, True, bf16_search)
    indptr, indices, values = _expanded_jaccard_rows(
        rank,
        lambda ip, ix: _ops._weights_from_features(features, ip, ix, row_max, rank, rank_dist),
        k1 + 1,
        _half(k1) + 1,
        k2,
    )
    # q_g holds squared distances; the final distance overwrites it in place
    _ops._jaccard_rerank_out(indptr, indices, values, num_query, q_g, row_max, False, lambda_value, q_g)
    return _out(q_g, q_np)


def re_ranking_from_distances(
    q_g_dist: Any, q_q_dist: Any, g_g_dist: Any, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> Any:
    """Drop-in replacement of the classic numpy re_ranking(q_g_dist, q_q_dist, g_g_dist, ...).

    Same semantics: the inputs are squared, each row of the (Q + G) x (Q + G) matrix is
    normalised by its maximum, k1 + 1 forward neighbours (self included), round(k1 / 2)
    reciprocal expansion under the 2/3 rule, Gaussian weights, k2 query expansion, Jaccard
    distance and lambda fusion. Ties in the ranking are broken by index (a stable sort). Memory:
    the inputs, the (Q, G) output and O((Q + G) * k1 * k2).
    """
    qg, q_np = _as_tensor(q_g_dist, "q_g_dist")
    qq, _ = _as_tensor(q_q_dist, "q_q_dist")
    gg, _ = _as_tensor(g_g_dist, "g_g_dist")
    for tensor, name in ((qg, "q_g_dist"), (qq, "q_q_dist"), (gg, "g_g_dist")):
        if tensor.dim() != 2 or tensor.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 2-D matrix, got shape {tuple(tensor.shape)}")
        if not _all_finite(tensor):
            raise ValueError(f"{name} contains NaN or Inf values")
        # the classic algorithm squares the distances
        largest = max(float(part.abs().max()) for part in tensor.reshape(-1).split(1 << 22))
        if not largest * largest <= _MAX_SQUARED_DISTANCE:
            raise ValueError(
                f"{name}: distances up to {largest:.3g} overflow float32 when squared (largest accepted "
                f"{math.sqrt(_MAX_SQUARED_DISTANCE):.3g}); scale the distances down"
            )
    num_query, num_gallery = qg.shape
    if tuple(qq.shape) != (num_query, num_query):
        raise ValueError(f"q_q_dist must be ({num_query}, {num_query}) to match q_g_dist, got {tuple(qq.shape)}")
    if tuple(gg.shape) != (num_gallery, num_gallery):
        raise ValueError(f"g_g_dist must be ({num_gallery}, {num_gallery}) to match q_g_dist, got {tuple(gg.shape)}")
    if not (qg.device == qq.device == gg.device):
        raise ValueError("q_g_dist, q_q_dist and g_g_dist must be on the same device")
    n = num_query + num_gallery
    k1, k2, lambda_value = _check_rerank_params(k1, k2, lambda_value, n)
    qg, qq, gg = _float32(qg), _float32(qq), _float32(gg)
    kmax = max(k1 + 1, k2)
    # (the kernels follow the classic code exactly, including its column-wise normalisation, so
    # non-symmetric q_q / g_g give the same result as the numpy version)
    rank, row_max = _ops._neighbors_from_distances(qg, qq, gg, kmax)
    indptr, indices, values = _expanded_jaccard_rows(
        rank,
        lambda ip, ix: _ops._weights_from_distances(qg, qq, gg, row_max, ip, ix),
        k1 + 1,
        _half(k1) + 1,
        k2,
    )
    out = torch.empty_like(qg)
    _ops._jaccard_rerank_out(indptr, indices, values, num_query, qg, row_max, True, lambda_value, out)
    return _out(out, q_np)


def jaccard_graph(
    features: Any, k1: int = 20, k2: int = 6, max_distance: float = 1.0, candidate_precision: str = "auto"
) -> scipy.sparse.csr_matrix:
    """Sparse k-reciprocal Jaccard distances for clustering (the SpCL / MMT+ variant).

    k1 nearest neighbours (self included) by squared Euclidean distance, k-reciprocal sets with
    round(k1 / 2) expansion under the 2/3 rule, weights softmax(-||f_i - f_j||^2) over R*(i)
    (features are expected to be L2-normalised by the caller), k2 query expansion, Jaccard
    distance clamped at 0; no lambda fusion. Returns an (N, N) CSR matrix holding every pair with
    distance < max_distance plus the diagonal as explicit zeros; with max_distance=1 every pair
    not stored has distance exactly 1. Pass it to sklearn's DBSCAN(metric="precomputed"). The neighbour lists are
    exact whatever candidate_precision (see knn).
    """
    ft, _ = _as_tensor(features, "features")
    norm = _check_features(ft, "features")
    _check_no_overflow(norm, norm, "features")
    n = ft.shape[0]
    k1 = _check_int(k1, "k1", 1, n, f"features has {n} rows")
    k2 = _check_int(k2, "k2", 1, k1, "query expansion uses the first k2 of the k1 neighbours")
    if not isinstance(max_distance, (int, float, np.floating)) or not 0.0 < float(max_distance) <= 1.0:
        raise ValueError(f"max_distance must be in (0, 1], got {max_distance!r}")
    bf16_search = _bf16_search(candidate_precision, n)
    features32 = _float32(ft)
    rank, rank_dist, _, _ = _ops._neighbors_from_features(features32, k1, 0, False, bf16_search)
    empty = torch.empty(0, device=features32.device)
    indptr, indices, values = _expanded_jaccard_rows(
        rank,
        lambda ip, ix: _ops._weights_from_features(features32, ip, ix, empty, rank, rank_dist),
        k1,
        min(_half(k1) + 1, k1),
        k2,
    )
    g_indptr, g_indices, g_data = _ops._jaccard_graph(indptr, indices, values, float(max_distance))
    return scipy.sparse.csr_matrix(
        (g_data.cpu().numpy(), g_indices.cpu().numpy(), g_indptr.cpu().numpy()), shape=(n, n)
    )


# ----------------------------------------------------------------------------------------------
# GeM pooling


_FLOAT32_SMALLEST_NORMAL = float(torch.finfo(torch.float32).tiny)


def gem(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Generalized-mean pooling (Radenovic et al.): (mean_hw max(x, eps)^p)^(1/p) -> (N, C).

    x: (N, C, H, W), contiguous or channels_last; p: a one-element tensor (learnable). Fused
    forward and backward kernels; gradients flow to x and p. The output has x's dtype.
    Finite inputs give the definition's value even where x^p overflows or underflows the accumulation type (such
    planes are recomputed in float64, scaled by their largest value); a plane holding NaN or +Inf gives what
    x.clamp(min=eps).pow(p).mean((-2, -1)).pow(1 / p) gives (NaN, +Inf), with autograd's gradients for it.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(p, torch.Tensor):
        raise TypeError("gem expects torch tensors for x and p")
    if x.dim() != 4:
        raise ValueError(f"gem: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if p.numel() != 1:
        raise ValueError(f"gem: p must hold exactly one value, got shape {tuple(p.shape)}")
    if not eps >= _FLOAT32_SMALLEST_NORMAL:  # the kernels' float log2 expects normal numbers after the clamp
        raise ValueError(f"gem: eps must be >= {_FLOAT32_SMALLEST_NORMAL:.3g} (float32's smallest normal), got {eps}")
    return _ops.gem(x, p, float(eps))


# ----------------------------------------------------------------------------------------------
# ranking metrics


def evaluate_rank(
    distmat: Any,
    query_pids: Any,
    gallery_pids: Any,
    query_camids: Any,
    gallery_camids: Any,
    max_rank: int = 50,
    ap_topk: int | None = None,
) -> dict[str, Any]:
    """CMC, mAP and mINP under the Market-1501 protocol.

    Gallery items with the query's identity *and* camera are removed from its ranking; queries
    without any remaining true match are excluded (reported in num_valid_queries). Ties in
    distance are ranked by gallery index. ap_topk=100 gives the VisDA-2020 truncated AP: the
    junk-free part of the first 100 ranks, normalised by the hits inside it. Returns
    {"cmc": (max_rank,) array, "mAP", "mINP", "num_valid_queries", "all_ap", "all_inp", "valid"}.
    """
    dist, _ = _as_tensor(distmat, "distmat")
    if dist.dim() != 2 or dist.numel() == 0:
        raise ValueError(f"distmat must be a non-empty 2-D (num_query, num_gallery) matrix, got {tuple(dist.shape)}")
    if any(bool(torch.isnan(part).any()) for part in dist.reshape(-1).split(1 << 22)):
        raise ValueError("distmat contains NaN values")
    num_query, num_gallery = dist.shape
    ids = {}
    for value, name, expected in (
        (query_pids, "query_pids", num_query),
        (gallery_pids, "gallery_pids", num_gallery),
        (query_camids, "query_camids", num_query),
        (gallery_camids, "gallery_camids", num_gallery),
    ):
        # contiguous copy: numpy views with negative strides (e.g. pids[::-1]) cannot become tensors directly
        array = torch.as_tensor(np.ascontiguousarray(value.cpu() if isinstance(value, torch.Tensor) else value))
        if array.dim() != 1 or array.numel() != expected:
            axis = "row" if name.startswith("query") else "column"
            raise ValueError(f"{name} must have {expected} entries (one per distmat {axis}), got {tuple(array.shape)}")
        if array.is_floating_point() or array.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
        ids[name] = array.to(torch.int64)
    max_rank = _check_int(max_rank, "max_rank", 1, 1 << 30, "ranks reported in the CMC")
    topk = 0 if ap_topk is None else _check_int(ap_topk, "ap_topk", 1, 1 << 30, "truncated AP")
    cmc, ap, inp, valid = _ops._rank_metrics(
        dist.cpu(), ids["query_pids"], ids["gallery_pids"], ids["query_camids"], ids["gallery_camids"], max_rank, topk
    )
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("no query has a valid match in the gallery (same identity seen by another camera)")
    valid_np = valid.numpy()
    return {
        "cmc": cmc.numpy()[valid_np].astype(np.float64).mean(0),
        "mAP": float(ap.numpy()[valid_np].mean()),
        "mINP": float(inp.numpy()[valid_np].mean()),
        "num_valid_queries": num_valid,
        "all_ap": ap.numpy(),
        "all_inp": inp.numpy(),
        "valid": valid_np,
    }
