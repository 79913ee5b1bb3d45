"""Tests of the reid_ops extension against the independent references in reid_ops/_reference.py.

Every op is compared on fresh random inputs (a generator seeded by the test parameters, so each case sees different
data) of several shapes, with structure: clustered features, exact duplicates, exact ties, N = 1, k == N, queries
without a valid match, all-same-camera galleries, large magnitudes; plus the error cases of the contract.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch

import reid_ops
from reid_ops._reference import (
    evaluate_rank_ref,
    evaluate_rank_torchreid_loop,
    gem_ref,
    jaccard_dense,
    jaccard_pairwise_bruteforce,
    jaccard_ref,
    knn_ref,
    pairwise_distance_ref,
    re_ranking_classic,
    re_ranking_ref,
)

REPO = Path(__file__).resolve().parents[1]
BAD_INPUT = (ValueError, RuntimeError)
BAD_DTYPE = (ValueError, RuntimeError, TypeError)


def make_rng(*params: object) -> np.random.Generator:
    """A generator seeded from the test's parameters: varied across cases, reproducible across runs."""
    return np.random.default_rng(zlib.crc32(repr(params).encode()))


def clustered_features(rng: np.random.Generator, n: int, dim: int, num_clusters: int, spread: float = 0.3):
    """L2-normalised float32 features drawn around a few Gaussian centres."""
    centres = rng.normal(size=(num_clusters, dim))
    x = centres[rng.integers(0, num_clusters, n)] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def dense_from_csr(graph: scipy.sparse.csr_matrix) -> np.ndarray:
    """Stored entries at their value (explicit zeros included), every other pair at distance 1."""
    coo = graph.tocoo()
    dense = np.ones(graph.shape, dtype=np.float64)
    dense[coo.row, coo.col] = coo.data
    return dense


# --------------------------------------------------------------------------------------------------------------
# pairwise_distance
# --------------------------------------------------------------------------------------------------------------


def distance_atol(metric: str, x: np.ndarray, y: np.ndarray) -> float:
    """float32 tolerance: the squared distance carries ~1e-7 relative error of the squared norms."""
    scale = float(max((x.astype(np.float64) ** 2).sum(1).max(), (y.astype(np.float64) ** 2).sum(1).max()))
    sq = 4e-6 * scale + 1e-6
    return {"sqeuclidean": sq, "euclidean": float(np.sqrt(sq)), "cosine": 2e-5}[metric]


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 5), (64, 200, 32), (300, 33, 130)])
def test_pairwise_distance_matches_reference(metric, shape):
    m, n, d = shape
    rng = make_rng("pd", metric, shape)
    x = rng.normal(size=(m, d)).astype(np.float32) * rng.uniform(0.1, 3)
    y = rng.normal(size=(n, d)).astype(np.float32)
    expected = pairwise_distance_ref(x, y, metric)
    got = reid_ops.pairwise_distance(x, y, metric)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (m, n)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=distance_atol(metric, x, y))
    assert (got >= 0).all()
    got_torch = reid_ops.pairwise_distance(torch.from_numpy(x), torch.from_numpy(y), metric)
    assert isinstance(got_torch, torch.Tensor) and got_torch.dtype == torch.float32
    np.testing.assert_allclose(got_torch.numpy(), expected, rtol=1e-5, atol=distance_atol(metric, x, y))


def test_pairwise_distance_default_metric_is_sqeuclidean():
    rng = make_rng("pd-default")
    x, y = rng.normal(size=(5, 4)), rng.normal(size=(6, 4))
    np.testing.assert_allclose(reid_ops.pairwise_distance(x, y), pairwise_distance_ref(x, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_pairwise_distance_other_float_dtypes_computed_in_float32(dtype):
    rng = make_rng("pd-dtype", str(dtype))
    x = torch.from_numpy(rng.normal(size=(20, 16))).to(dtype)
    y = torch.from_numpy(rng.normal(size=(30, 16))).to(dtype)
    got = reid_ops.pairwise_distance(x, y, "euclidean")
    assert got.dtype == torch.float32
    # the reference sees exactly the values the op received
    expected = pairwise_distance_ref(x.double().numpy(), y.double().numpy(), "euclidean")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-4)


def test_pairwise_distance_numpy_float64_returns_float32_numpy():
    rng = make_rng("pd-np64")
    got = reid_ops.pairwise_distance(rng.normal(size=(4, 3)), rng.normal(size=(5, 3)), "cosine")
    assert isinstance(got, np.ndarray) and got.dtype == np.float32


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
@pytest.mark.parametrize("magnitude", [1.0, 1e3, 1e5])
def test_identical_rows_give_exactly_zero(metric, magnitude):
    rng = make_rng("pd-zero", metric, magnitude)
    x = (magnitude * (1.0 + rng.normal(size=(40, 64)))).astype(np.float32)  # large norms, large offset
    y = np.concatenate([rng.normal(size=(25, 64)).astype(np.float32) * magnitude, x[::-1]])
    got = reid_ops.pairwise_distance(x, y, metric)
    assert (got >= 0).all()
    for i in range(40):
        assert got[i, 25 + 39 - i] == 0.0, f"row {i}: identical rows gave {got[i, 25 + 39 - i]!r}"
    self_dist = reid_ops.pairwise_distance(x, x, metric)
    assert (np.diag(self_dist) == 0.0).all()
    assert (self_dist >= 0).all()


@pytest.mark.parametrize(
    "x_shape, y_shape, metric, pattern",
    [
        ((5,), (4, 5), "sqeuclidean", r"\bx\b"),
        ((3, 5), (2, 2, 5), "sqeuclidean", r"\by\b"),
        ((3, 5), (4, 6), "euclidean", r"dimension|\bD\b|dim"),
        ((0, 5), (4, 5), "sqeuclidean", r"\bx\b"),
        ((3, 5), (0, 5), "sqeuclidean", r"\by\b"),
        ((3, 5), (4, 5), "manhattan", r"metric"),
    ],
)
def test_pairwise_distance_bad_input(x_shape, y_shape, metric, pattern):
    x, y = np.ones(x_shape, np.float32), np.ones(y_shape, np.float32)
    with pytest.raises(BAD_INPUT, match=pattern):
        reid_ops.pairwise_distance(x, y, metric)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_pairwise_distance_rejects_non_finite(bad):
    x = np.ones((3, 4), np.float32)
    y = np.ones((5, 4), np.float32)
    y[2, 1] = bad
    with pytest.raises(BAD_INPUT, match=r"\by\b"):
        reid_ops.pairwise_distance(x, y)
    with pytest.raises(BAD_INPUT, match=r"\bx\b"):
        reid_ops.pairwise_distance(y, x)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_])
def test_pairwise_distance_rejects_integer_dtype(dtype):
    with pytest.raises(BAD_DTYPE, match=r"\bx\b"):
        reid_ops.pairwise_distance(np.ones((3, 4), dtype), np.ones((3, 4), np.float32))
    with pytest.raises(BAD_DTYPE, match=r"\by\b"):
        reid_ops.pairwise_distance(torch.ones(3, 4), torch.from_numpy(np.ones((3, 4), dtype)))


# --------------------------------------------------------------------------------------------------------------
# knn
# --------------------------------------------------------------------------------------------------------------


def assert_knn_matches(dist, idx, x, y, k, metric):
    """Distances equal the reference's k smallest; each index really has its distance; indices are unique; every
    neighbour that is closer than the k-th by more than the tolerance is present (near-ties may swap)."""
    full = pairwise_distance_ref(x, y, metric)
    ref_dist, _ = knn_ref(x, y, k, metric)
    atol = distance_atol(metric, x, y)
    assert dist.shape == (x.shape[0], k) and idx.shape == (x.shape[0], k)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-5, atol=atol)
    np.testing.assert_allclose(np.take_along_axis(full, idx, axis=1), dist, rtol=1e-5, atol=atol)
    assert (np.diff(dist, axis=1) >= 0).all()
    for row in range(x.shape[0]):
        assert len(set(idx[row].tolist())) == k
        surely_inside = np.flatnonzero(full[row] < ref_dist[row, -1] - 2 * atol - 1e-5 * ref_dist[row, -1])
        assert set(surely_inside.tolist()) <= set(idx[row].tolist())


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
@pytest.mark.parametrize("m, n, d, k", [(1, 1, 4, 1), (10, 50, 8, 1), (33, 70, 16, 70), (120, 257, 24, 9)])
def test_knn_matches_reference(metric, m, n, d, k):
    rng = make_rng("knn", metric, m, n, d, k)
    x = clustered_features(rng, m, d, 4)
    y = clustered_features(rng, n, d, 4)
    dist, idx = reid_ops.knn(x, y, k, metric)
    assert isinstance(dist, np.ndarray) and dist.dtype == np.float32 and idx.dtype == np.int64
    assert_knn_matches(dist, idx, x, y, k, metric)
    dist_t, idx_t = reid_ops.knn(torch.from_numpy(x), torch.from_numpy(y), k, metric)
    assert isinstance(idx_t, torch.Tensor) and idx_t.dtype == torch.int64 and dist_t.dtype == torch.float32
    assert_knn_matches(dist_t.numpy(), idx_t.numpy(), x, y, k, metric)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_knn_ties_broken_by_smaller_index(metric, seed):
    # small integer coordinates: every distance is exact in float32, so ties are exact and the order is defined
    rng = make_rng("knn-ties", metric, seed)
    y = rng.integers(0, 3, size=(200, 6)).astype(np.float32)
    y[150:] = y[:50]  # exact duplicates at larger indices
    x = np.concatenate([rng.integers(0, 3, size=(40, 6)).astype(np.float32), y[:10]])
    dist, idx = reid_ops.knn(x, y, 25, metric)
    ref_dist, ref_idx = knn_ref(x, y, 25, metric)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-6, atol=0)


def test_knn_distances_consistent_with_pairwise_distance():
    rng = make_rng("knn-consistent")
    x = rng.normal(size=(50, 40)).astype(np.float32)
    y = rng.normal(size=(90, 40)).astype(np.float32)
    dist, idx = reid_ops.knn(x, y, 90)
    full = reid_ops.pairwise_distance(x, y)
    np.testing.assert_allclose(np.take_along_axis(full, idx, axis=1), dist, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [0, -1, 11, 100])
def test_knn_bad_k_names_k_and_len_y(k):
    x = np.ones((3, 4), np.float32)
    y = np.random.default_rng(k + 5).normal(size=(10, 4)).astype(np.float32)
    with pytest.raises(BAD_INPUT, match=r"(?s)(\bk\b.*\b10\b|\b10\b.*\bk\b)"):
        reid_ops.knn(x, y, k)


def test_knn_bad_input():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(BAD_INPUT, match=r"\by\b"):
        reid_ops.knn(x, np.full((5, 4), np.nan, np.float32), 2)
    with pytest.raises(BAD_INPUT):
        reid_ops.knn(x, np.ones((5, 3), np.float32), 2)
    with pytest.raises(BAD_INPUT, match=r"\bx\b"):
        reid_ops.knn(np.ones((0, 4), np.float32), np.ones((5, 4), np.float32), 2)
    with pytest.raises(BAD_INPUT, match="metric"):
        reid_ops.knn(x, x, 2, "hamming")


# --------------------------------------------------------------------------------------------------------------
# bf16 candidate search: the answer must be exactly the fp32 search's (and the exact kNN)
# --------------------------------------------------------------------------------------------------------------


def near_tie_features(rng: np.random.Generator, n: int, dim: int, gap: float, offset: float = 0.0) -> np.ndarray:
    """Adversarial near-ties for the first row: row j >= 1 lies at squared distance 1 + gap * j from row 0 along a
    random direction, so consecutive neighbours differ by `gap` (far below bf16's resolution of ~1e-2 on these
    distances), in random index order; a few exact duplicates too. `offset` adds a common vector of that norm to every
    row: the squared distances do not change but the dot products grow, and with them the bf16 error bound."""
    base = rng.normal(size=dim)
    directions = rng.normal(size=(n, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radii = np.sqrt(1.0 + gap * rng.permutation(n))
    rows = base + radii[:, None] * directions
    rows[0] = base
    rows[n // 2 : n // 2 + 5] = rows[1:6]  # exact duplicates: ties broken by index
    if offset:
        shift = rng.normal(size=dim)
        rows += offset * shift / np.linalg.norm(shift)
    return rows.astype(np.float32)


def assert_same_search(x: np.ndarray, y: np.ndarray, k: int, metric: str) -> None:
    """bf16 and fp32 candidate searches give bitwise-identical neighbours and distances, equal to the float64
    reference up to float32 rounding."""
    d16, i16 = reid_ops.knn(x, y, k, metric, candidate_precision="bf16")
    d32, i32 = reid_ops.knn(x, y, k, metric, candidate_precision="fp32")
    np.testing.assert_array_equal(i16, i32)
    np.testing.assert_array_equal(d16, d32)
    assert_knn_matches(d16, i16, x, y, k, metric)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
@pytest.mark.parametrize("gap, offset", [(1e-6, 0.0), (1e-4, 0.0), (1e-5, 30.0)])
def test_bf16_search_equals_fp32_on_adversarial_near_ties(metric, gap, offset):
    rng = make_rng("bf16-ties", metric, gap, offset)
    y = near_tie_features(rng, 400, 48, gap, offset)
    x = np.concatenate([y[:1], y[1:40:7], rng.normal(size=(5, 48)).astype(np.float32)])
    for k in (1, 10, 60, 400):
        assert_same_search(x, y, k, metric)
    # the first row's order is defined by the construction: check it against the float64 reference exactly
    ref_dist, ref_idx = knn_ref(y[:1], y, 60, metric)
    _, idx = reid_ops.knn(y[:1], y, 60, metric, candidate_precision="bf16")
    strict = np.diff(ref_dist[0]) > 1e-5 * ref_dist[0, 1:]  # neighbours separated by more than float32 rounding
    np.testing.assert_array_equal(idx[0][:-1][strict], ref_idx[0][:-1][strict])


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_bf16_search_equals_fp32_self_knn_with_duplicates(metric):
    rng = make_rng("bf16-self", metric)
    x = clustered_features(rng, 700, 40, 9, spread=0.05)
    x[500:560] = x[:60]  # exact duplicates across blocks
    x[600:610] = x[0]  # many copies of one row: ties beyond k
    assert_same_search(x, x, 25, metric)


def test_bf16_search_cosine_zero_rows():
    """A zero row has no usable bound for the cosine metric (it is always a candidate): same answer both ways."""
    rng = make_rng("bf16-zero")
    x = clustered_features(rng, 300, 24, 5)
    x[[7, 150]] = 0.0
    for y in (x, x[::-1].copy()):
        d16, i16 = reid_ops.knn(x, y, 30, "cosine", candidate_precision="bf16")
        d32, i32 = reid_ops.knn(x, y, 30, "cosine", candidate_precision="fp32")
        np.testing.assert_array_equal(i16, i32)
        np.testing.assert_array_equal(d16, d32)


def test_bf16_search_identical_re_ranking_and_jaccard_graph():
    rng = make_rng("bf16-rr")
    features = clustered_features(rng, 500, 32, 12, spread=0.08)
    features[300:320] = features[:20]
    ties = near_tie_features(rng, 120, 32, 1e-6)
    ties /= np.linalg.norm(ties, axis=1, keepdims=True)
    features = np.concatenate([features, ties]).astype(np.float32)
    query, gallery = features[:80], features[80:]
    rr16 = reid_ops.re_ranking(query, gallery, 20, 6, 0.3, candidate_precision="bf16")
    rr32 = reid_ops.re_ranking(query, gallery, 20, 6, 0.3, candidate_precision="fp32")
    np.testing.assert_array_equal(rr16, rr32)
    expected = re_ranking_ref(*split_distances(features, 80), 20, 6, 0.3)
    np.testing.assert_allclose(rr16, expected, rtol=0, atol=1e-5)
    g16 = reid_ops.jaccard_graph(features, 20, 6, candidate_precision="bf16")
    g32 = reid_ops.jaccard_graph(features, 20, 6, candidate_precision="fp32")
    for attribute in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(g16, attribute), getattr(g32, attribute))


def test_candidate_precision_is_checked():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="candidate_precision"):
        reid_ops.knn(x, x, 2, candidate_precision="fp16")


# --------------------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking (test time)
# --------------------------------------------------------------------------------------------------------------


def split_distances(features: np.ndarray, num_query: int):
    """Euclidean q_g, q_q, g_g computed in float64 and cast to float32 (the classic API's inputs)."""
    d = np.sqrt(pairwise_distance_ref(features, features)).astype(np.float32)
    return d[:num_query, num_query:], d[:num_query, :num_query], d[num_query:, num_query:]


def test_reference_re_ranking_loop_equals_classic_vectorised():
    """Validates the two references against each other (they must agree to float32 rounding)."""
    rng = make_rng("rr-refs")
    features = clustered_features(rng, 90, 12, 5)
    features[60:70] = features[:10]  # duplicates between query and gallery
    q_g, q_q, g_g = split_distances(features, 20)
    for k1, k2, lam in [(20, 6, 0.3), (7, 1, 0.0), (5, 3, 1.0)]:
        np.testing.assert_allclose(
            re_ranking_ref(q_g, q_q, g_g, k1, k2, lam), re_ranking_classic(q_g, q_q, g_g, k1, k2, lam), atol=2e-6
        )


@pytest.mark.parametrize(
    "num_query, num_gallery, dim, k1, k2, lam",
    [
        (1, 30, 8, 20, 6, 0.3),  # a single query
        (20, 80, 16, 20, 6, 0.3),  # the function defaults
        (40, 160, 12, 30, 6, 0.3),  # the MMT+ test setting k1 = 30
        (25, 120, 32, 5, 1, 0.5),  # k2 = 1: no query expansion; round(2.5) = 2 (half to even)
        (60, 300, 10, 7, 3, 0.0),  # round(3.5) = 4; lambda 0: pure Jaccard
        (100, 300, 48, 20, 6, 0.3),  # larger and higher-dimensional
        (10, 11, 6, 20, 21, 1.0),  # k1 + 1 == Q + G, k2 == Q + G, lambda 1: pure original distance
    ],
)
def test_re_ranking_from_distances_matches_reference(num_query, num_gallery, dim, k1, k2, lam):
    rng = make_rng("rr", num_query, num_gallery, dim, k1, k2, lam)
    features = clustered_features(rng, num_query + num_gallery, dim, 6)
    q_g, q_q, g_g = split_distances(features, num_query)
    expected = re_ranking_ref(q_g, q_q, g_g, k1, k2, lam)
    got = reid_ops.re_ranking_from_distances(q_g, q_q, g_g, k1, k2, lam)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (num_query, num_gallery)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    got_torch = reid_ops.re_ranking_from_distances(
        torch.from_numpy(q_g), torch.from_numpy(q_q), torch.from_numpy(g_g), k1, k2, lam
    )
    assert isinstance(got_torch, torch.Tensor)
    np.testing.assert_allclose(got_torch.numpy(), expected, rtol=0, atol=1e-5)


def test_re_ranking_from_distances_duplicates_and_ties():
    # exact duplicates (distance 0, identical rows of M) make the ranking depend on the index tie-break
    rng = make_rng("rr-dup")
    base = clustered_features(rng, 50, 8, 4)
    features = np.concatenate([base[:15], base[5:], base[:20], base[30:40]])  # queries reappear in the gallery
    q_g, q_q, g_g = split_distances(features, 15)
    expected = re_ranking_ref(q_g, q_q, g_g, 20, 6, 0.3)
    np.testing.assert_allclose(reid_ops.re_ranking_from_distances(q_g, q_q, g_g, 20, 6, 0.3), expected, atol=1e-5)


def test_re_ranking_from_distances_arbitrary_nonnegative_matrices():
    # the classic API squares and column-normalises whatever it gets; integer-valued entries give many exact ties
    rng = make_rng("rr-ints")
    num_query = 12
    m = rng.integers(1, 6, size=(60, 60)).astype(np.float32)
    m = np.triu(m, 1) + np.triu(m, 1).T  # symmetric, zero diagonal
    q_g, q_q, g_g = m[:num_query, num_query:], m[:num_query, :num_query], m[num_query:, num_query:]
    expected = re_ranking_ref(q_g, q_q, g_g, 10, 4, 0.3)
    np.testing.assert_allclose(reid_ops.re_ranking_from_distances(q_g, q_q, g_g, 10, 4, 0.3), expected, atol=1e-5)


@pytest.mark.parametrize(
    "num_query, num_gallery, dim, k1, k2",
    [(1, 40, 8, 20, 6), (30, 120, 16, 20, 6), (50, 250, 24, 30, 6), (20, 80, 64, 9, 2)],
)
def test_re_ranking_from_features_matches_reference(num_query, num_gallery, dim, k1, k2):
    rng = make_rng("rr-feat", num_query, num_gallery, dim, k1, k2)
    features = clustered_features(rng, num_query + num_gallery, dim, 5)
    expected = re_ranking_ref(*split_distances(features, num_query), k1, k2, 0.3)
    got = reid_ops.re_ranking(features[:num_query], features[num_query:], k1, k2, 0.3)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (num_query, num_gallery)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    got_torch = reid_ops.re_ranking(torch.from_numpy(features[:num_query]), torch.from_numpy(features[num_query:]))
    assert isinstance(got_torch, torch.Tensor) and got_torch.shape == (num_query, num_gallery)


def test_re_ranking_from_features_exact_ties():
    # coordinates on a 1/4 grid: every distance is exact, so tie-breaking by index must agree everywhere
    rng = make_rng("rr-feat-grid")
    features = rng.integers(-2, 3, size=(100, 5)).astype(np.float32) / 4
    features[0] += 0.25  # make sure no row is all zeros for no reason; zeros are legal anyway
    expected = re_ranking_ref(*split_distances(features, 25), 12, 4, 0.3)
    np.testing.assert_allclose(reid_ops.re_ranking(features[:25], features[25:], 12, 4, 0.3), expected, atol=1e-5)


def test_re_ranking_bad_input():
    rng = make_rng("rr-bad")
    features = rng.normal(size=(12, 4)).astype(np.float32)
    q_g, q_q, g_g = split_distances(features, 3)
    call = reid_ops.re_ranking_from_distances
    for k1 in (0, -3, 12, 50):  # Q + G = 12 points: k1 + 1 <= 12
        with pytest.raises(BAD_INPUT, match=rf"\bk1\b.*{k1}"):
            call(q_g, q_q, g_g, k1, 2)
        with pytest.raises(BAD_INPUT, match=rf"\bk1\b.*{k1}"):
            reid_ops.re_ranking(features[:3], features[3:], k1, 2)
    for k2 in (0, 13):
        with pytest.raises(BAD_INPUT, match=rf"\bk2\b.*{k2}"):
            call(q_g, q_q, g_g, 5, k2)
    with pytest.raises(BAD_INPUT, match="q_q"):
        call(q_g, q_q[:2, :2], g_g, 5, 2)
    with pytest.raises(BAD_INPUT, match="g_g"):
        call(q_g, q_q, g_g[:5], 5, 2)
    bad = q_g.copy()
    bad[0, 0] = np.nan
    with pytest.raises(BAD_INPUT, match="q_g"):
        call(bad, q_q, g_g, 5, 2)
    with pytest.raises(BAD_INPUT):
        call(q_g[:0], q_q[:0, :0], g_g, 5, 2)
    with pytest.raises(BAD_INPUT):
        reid_ops.re_ranking(features[:3, :3], features[3:], 5, 2)
    with pytest.raises(BAD_INPUT):
        reid_ops.re_ranking(features[:0], features[3:], 5, 2)
    inf_features = features.copy()
    inf_features[5, 0] = np.inf
    with pytest.raises(BAD_INPUT, match="gallery"):
        reid_ops.re_ranking(features[:3], inf_features[3:], 5, 2)


# --------------------------------------------------------------------------------------------------------------
# Jaccard graph for clustering
# --------------------------------------------------------------------------------------------------------------


def test_reference_jaccard_three_ways_agree():
    """Validates the references: loop (float64), release-style dense float32, and per-pair sum-min / sum-max."""
    rng = make_rng("jac-refs")
    features = clustered_features(rng, 70, 8, 5)
    with_duplicates = features.copy()
    with_duplicates[50:55] = features[:5]
    for k1, k2 in [(20, 6), (9, 1), (6, 6)]:
        # the dense version gets its kNN lists from torch.topk (ties in any order, like faiss): no duplicates there
        np.testing.assert_allclose(jaccard_dense(features, k1, k2), jaccard_ref(features, k1, k2), atol=2e-6)
        np.testing.assert_allclose(
            jaccard_pairwise_bruteforce(with_duplicates, k1, k2), jaccard_ref(with_duplicates, k1, k2), atol=1e-12
        )


def check_jaccard_graph(features: np.ndarray, k1: int, k2: int, max_distance: float) -> None:
    n = features.shape[0]
    ref = jaccard_ref(features, k1, k2)
    graph = reid_ops.jaccard_graph(features, k1, k2, max_distance)
    assert isinstance(graph, scipy.sparse.csr_matrix) and graph.shape == (n, n)
    coo = graph.tocoo()
    stored = np.zeros((n, n), dtype=bool)
    stored[coo.row, coo.col] = True
    assert stored[np.arange(n), np.arange(n)].all(), "the diagonal must be stored explicitly"
    assert (graph.diagonal() == 0.0).all()
    assert len(coo.data) == len(set(zip(coo.row.tolist(), coo.col.tolist(), strict=True))), "duplicate entries"
    np.testing.assert_allclose(coo.data, ref[coo.row, coo.col], atol=1e-5)
    assert (coo.data >= 0).all() and (coo.data < max_distance).all()
    # every pair below max_distance is stored (up to the tolerance at the threshold)
    assert not (~stored & (ref < max_distance - 1e-5)).any()
    if max_distance == 1.0:  # then a missing pair has distance exactly 1
        np.testing.assert_array_equal(ref[~stored], 1.0)
    dense = dense_from_csr(graph)
    if max_distance == 1.0:
        np.testing.assert_allclose(dense, ref, atol=1e-5)
        np.testing.assert_allclose(dense, dense.T, atol=1e-5)


@pytest.mark.parametrize(
    "n, dim, k1, k2, max_distance",
    [
        (60, 8, 20, 6, 1.0),  # the defaults
        (150, 16, 20, 6, 1.0),
        (200, 12, 30, 6, 0.6),  # only pairs within DBSCAN's eps
        (90, 32, 7, 1, 1.0),  # k2 = 1, round(3.5) = 4
        (40, 6, 40, 40, 1.0),  # k1 == N, k2 == k1
        (120, 10, 5, 5, 0.3),  # round(2.5) = 2
        (400, 24, 20, 6, 1.0),  # larger
    ],
)
def test_jaccard_graph_matches_reference(n, dim, k1, k2, max_distance):
    rng = make_rng("jac", n, dim, k1, k2, max_distance)
    check_jaccard_graph(clustered_features(rng, n, dim, 6), k1, k2, max_distance)


def test_jaccard_graph_duplicates_and_single_point():
    rng = make_rng("jac-dup")
    base = clustered_features(rng, 40, 8, 3)
    features = np.concatenate([base, base[:10], base[:10]])  # each of the first 10 points appears three times
    check_jaccard_graph(features, 20, 6, 1.0)
    single = reid_ops.jaccard_graph(base[:1], 1, 1)
    assert single.shape == (1, 1) and single.nnz == 1 and single[0, 0] == 0.0


def test_jaccard_graph_accepts_torch_and_feeds_dbscan():
    from sklearn.cluster import DBSCAN

    rng = make_rng("jac-dbscan")
    features = clustered_features(rng, 120, 16, 4, spread=0.1)
    graph = reid_ops.jaccard_graph(torch.from_numpy(features), 20, 6)
    assert isinstance(graph, scipy.sparse.csr_matrix)
    labels_sparse = DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(graph)
    labels_dense = DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(jaccard_ref(features, 20, 6))
    np.testing.assert_array_equal(labels_sparse, labels_dense)


def test_jaccard_graph_bad_input():
    features = clustered_features(make_rng("jac-bad"), 10, 4, 2)
    for k1 in (0, -1, 11):
        with pytest.raises(BAD_INPUT, match=rf"\bk1\b.*{k1}"):
            reid_ops.jaccard_graph(features, k1, 1)
    for k2 in (0, 6):
        with pytest.raises(BAD_INPUT, match=rf"\bk2\b.*{k2}"):
            reid_ops.jaccard_graph(features, 5, k2)
    for max_distance in (0.0, -0.5, 1.01, 2.0):
        with pytest.raises(BAD_INPUT, match="max_distance"):
            reid_ops.jaccard_graph(features, 5, 2, max_distance)
    bad = features.copy()
    bad[3, 2] = np.nan
    with pytest.raises(BAD_INPUT, match="features"):
        reid_ops.jaccard_graph(bad, 5, 2)
    with pytest.raises(BAD_INPUT, match="features"):
        reid_ops.jaccard_graph(features[0], 1, 1)
    with pytest.raises(BAD_INPUT, match="features"):
        reid_ops.jaccard_graph(features[:0], 1, 1)


# --------------------------------------------------------------------------------------------------------------
# GeM pooling
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, p_value", [((2, 3, 4, 5), 3.0), ((8, 64, 24, 8), 2.2), ((1, 1, 1, 1), 1.0)])
def test_gem_forward_backward_match_reference(dtype, shape, p_value):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("gem", str(dtype), shape, p_value)).encode()))
    x = torch.rand(shape, generator=gen, dtype=dtype) * 3 - 0.5  # includes negatives and values below eps
    weights = torch.randn(shape[:2], generator=gen, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    p1 = torch.tensor([p_value], dtype=dtype, requires_grad=True)
    p2 = torch.tensor([p_value], dtype=dtype, requires_grad=True)
    out = reid_ops.gem(x1, p1)
    expected = gem_ref(x2, p2)
    assert out.shape == shape[:2] and out.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(out, expected, **tol)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=1e-6)


@pytest.mark.parametrize("eps", [1e-6, 0.05])
def test_gem_gradcheck(eps):
    gen = torch.Generator().manual_seed(int(eps * 1e6))
    x = (torch.rand(2, 3, 4, 3, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()  # away from the kink
    p = torch.tensor([2.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: reid_ops.gem(a, b, eps), (x, p))


def test_gem_channels_last_and_non_contiguous():
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(4, 16, 6, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    p = torch.tensor([3.0])
    torch.testing.assert_close(reid_ops.gem(x, p), gem_ref(x, p), rtol=1e-5, atol=1e-6)
    xt = torch.rand(4, 5, 6, 16, generator=gen).permute(0, 3, 2, 1)
    torch.testing.assert_close(reid_ops.gem(xt, p), gem_ref(xt, p), rtol=1e-5, atol=1e-6)


def test_gem_under_cpu_bf16_autocast():
    # Observed: under CPU bf16 autocast a float32 input gives a float32 output, a bfloat16 input a bfloat16 output.
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(4, 32, 8, 4, generator=gen) + 0.05
    p = torch.tensor([3.0], requires_grad=True)
    expected = gem_ref(x, p.detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out32 = reid_ops.gem(x, p)
        out16 = reid_ops.gem(x.bfloat16(), p)
    assert out32.dtype in (torch.float32, torch.bfloat16) and out16.dtype in (torch.float32, torch.bfloat16)
    torch.testing.assert_close(out32.float(), expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out16.float(), expected, rtol=2e-2, atol=2e-2)
    (out32.float().sum() + out16.float().sum()).backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()


def test_gem_bad_input():
    p = torch.tensor([3.0])
    with pytest.raises(BAD_INPUT, match=r"\bx\b"):
        reid_ops.gem(torch.rand(2, 3, 4), p)
    with pytest.raises(BAD_INPUT, match=r"\bp\b"):
        reid_ops.gem(torch.rand(2, 3, 4, 4), torch.tensor([3.0, 2.0]))
    with pytest.raises(BAD_INPUT, match=r"\bp\b"):
        reid_ops.gem(torch.rand(2, 3, 4, 4), torch.tensor([0.0]))


# --------------------------------------------------------------------------------------------------------------
# Rank metrics
# --------------------------------------------------------------------------------------------------------------


def random_ranking_problem(rng: np.random.Generator, num_query: int, num_gallery: int, num_pids: int, num_cams: int):
    query_pids = rng.integers(0, num_pids, num_query)
    gallery_pids = rng.integers(0, num_pids + 3, num_gallery)  # a few gallery-only identities (distractors)
    query_camids = rng.integers(0, num_cams, num_query)
    gallery_camids = rng.integers(0, num_cams, num_gallery)
    distmat = rng.random((num_query, num_gallery)).astype(np.float32)
    distmat -= 0.3 * (query_pids[:, None] == gallery_pids[None, :])  # better than chance, not perfect
    return distmat, query_pids, gallery_pids, query_camids, gallery_camids


def assert_metrics_equal(got: dict, expected: dict, max_rank: int) -> None:
    assert got["num_valid_queries"] == expected["num_valid_queries"]
    assert isinstance(got["cmc"], np.ndarray) and got["cmc"].shape == (max_rank,)
    np.testing.assert_allclose(got["cmc"], expected["cmc"], rtol=0, atol=1e-9)
    assert got["mAP"] == pytest.approx(expected["mAP"], abs=1e-9)
    assert got["mINP"] == pytest.approx(expected["mINP"], abs=1e-9)


@pytest.mark.parametrize("ap_topk", [None, 100, 7])
@pytest.mark.parametrize(
    "num_query, num_gallery, num_pids, num_cams, max_rank",
    [(1, 20, 3, 2, 10), (40, 300, 25, 4, 50), (100, 60, 30, 3, 80), (200, 1000, 80, 6, 50)],
)
def test_evaluate_rank_matches_reference(num_query, num_gallery, num_pids, num_cams, max_rank, ap_topk):
    rng = make_rng("eval", num_query, num_gallery, num_pids, num_cams, max_rank, ap_topk)
    args = random_ranking_problem(rng, num_query, num_gallery, num_pids, num_cams)
    try:
        expected = evaluate_rank_ref(*args, max_rank=max_rank, ap_topk=ap_topk)
    except ValueError:
        pytest.skip("this draw has no valid query")
    got = reid_ops.evaluate_rank(*args, max_rank=max_rank, ap_topk=ap_topk)
    assert_metrics_equal(got, expected, max_rank)
    got_torch = reid_ops.evaluate_rank(*(torch.from_numpy(np.asarray(a)) for a in args), max_rank, ap_topk)
    assert_metrics_equal(got_torch, expected, max_rank)


@pytest.mark.parametrize("ap_topk", [None, 50])
def test_evaluate_rank_many_matches_per_query(ap_topk):
    """Queries with more than 64 true matches take the sorting path, the others the counting path: both must give the
    reference's numbers (one problem mixes them)."""
    rng = make_rng("eval-many", ap_topk)
    distmat, qp, gp, qc, gc = random_ranking_problem(rng, 50, 900, 40, 3)
    gp[:400] = 0  # identity 0: hundreds of gallery images, so its queries have > 64 matches
    qp[:10] = 0
    distmat = np.round(distmat * 50) / 50  # ties as well
    expected = evaluate_rank_ref(distmat, qp, gp, qc, gc, max_rank=30, ap_topk=ap_topk)
    assert_metrics_equal(reid_ops.evaluate_rank(distmat, qp, gp, qc, gc, 30, ap_topk), expected, 30)


def test_reference_metrics_two_loops_agree():
    """Validates the references: the definition-level loop and the torchreid-style loop of the benchmark."""
    rng = make_rng("eval-refs")
    args = random_ranking_problem(rng, 80, 400, 30, 4)
    expected = evaluate_rank_ref(*args, max_rank=50)
    assert_metrics_equal(evaluate_rank_torchreid_loop(*args, max_rank=50), expected, 50)


def test_evaluate_rank_ties_use_stable_order():
    # integer distances: many exact ties, the gallery order decides
    rng = make_rng("eval-ties")
    distmat, qp, gp, qc, gc = random_ranking_problem(rng, 60, 200, 20, 3)
    distmat = np.floor(distmat * 4).astype(np.float32)
    for ap_topk in (None, 10):
        expected = evaluate_rank_ref(distmat, qp, gp, qc, gc, max_rank=20, ap_topk=ap_topk)
        assert_metrics_equal(reid_ops.evaluate_rank(distmat, qp, gp, qc, gc, 20, ap_topk), expected, 20)


def test_evaluate_rank_excludes_queries_without_valid_match_and_pads_cmc():
    qp, qc = np.array([0, 1, 2, 3]), np.array([0, 0, 1, 1])
    gp = np.array([0, 0, 1, 2, 2, 5, 6])
    gc = np.array([0, 1, 0, 1, 0, 1, 0])
    # query 1 (pid 1, cam 0): its only match is junk (same camera) -> excluded; query 3: pid absent -> excluded
    rng = make_rng("eval-excl")
    distmat = rng.random((4, 7)).astype(np.float32)
    got = reid_ops.evaluate_rank(distmat, qp, gp, qc, gc, max_rank=50)
    expected = evaluate_rank_ref(distmat, qp, gp, qc, gc, max_rank=50)
    assert got["num_valid_queries"] == 2
    assert got["cmc"].shape == (50,) and got["cmc"][-1] == 1.0  # kept galleries have 6 or 5 items < 50
    assert_metrics_equal(got, expected, 50)
    # hand-checked: query 0 ranks [junk(0), match(1), ...] -> kept match at rank 1: AP = 1, INP = 1
    distmat[0] = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], np.float32)
    got = reid_ops.evaluate_rank(distmat, qp, gp, qc, gc, max_rank=3)
    assert_metrics_equal(got, evaluate_rank_ref(distmat, qp, gp, qc, gc, max_rank=3), 3)


def test_evaluate_rank_all_same_camera_gallery():
    rng = make_rng("eval-samecam")
    distmat, qp, gp, _, _ = random_ranking_problem(rng, 30, 120, 10, 1)
    gc = np.zeros(120, dtype=np.int64)
    qc_other = np.ones(30, dtype=np.int64)  # queries from another camera: nothing is junk
    expected = evaluate_rank_ref(distmat, qp, gp, qc_other, gc, max_rank=20)
    assert_metrics_equal(reid_ops.evaluate_rank(distmat, qp, gp, qc_other, gc, 20), expected, 20)
    with pytest.raises(ValueError):  # queries from the same camera: every match is junk, no valid query
        reid_ops.evaluate_rank(distmat, qp, gp, np.zeros(30, dtype=np.int64), gc, 20)


def test_evaluate_rank_top_k_ap_definition():
    # one query, hand-built ranking: positions 1..6 = [junk, hit, miss, hit, miss, hit]
    gp = np.array([7, 7, 1, 7, 2, 7, 3, 4])
    gc = np.array([0, 1, 1, 1, 1, 1, 1, 1])
    distmat = np.arange(8, dtype=np.float32)[None, :]
    qp, qc = np.array([7]), np.array([0])
    # ap_topk = 4: ranks 1..4 of the full ranking, junk dropped -> [hit, miss, hit]: AP = (1 + 2/3) / 2
    got = reid_ops.evaluate_rank(distmat, qp, gp, qc, gc, max_rank=5, ap_topk=4)
    assert got["mAP"] == pytest.approx((1 + 2 / 3) / 2)
    assert got["mINP"] == pytest.approx(3 / 5)  # unchanged by ap_topk: 3 positives, last at kept rank 5
    full = reid_ops.evaluate_rank(distmat, qp, gp, qc, gc, max_rank=5)
    assert full["mAP"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    np.testing.assert_array_equal(got["cmc"], full["cmc"])


def test_evaluate_rank_bad_input():
    rng = make_rng("eval-bad")
    distmat, qp, gp, qc, gc = random_ranking_problem(rng, 5, 30, 4, 3)
    for name, position in [("query_pids", 1), ("gallery_pids", 2), ("query_camids", 3), ("gallery_camids", 4)]:
        args = [distmat, qp, gp, qc, gc]
        args[position] = args[position][:-1]
        with pytest.raises(BAD_INPUT, match=name):
            reid_ops.evaluate_rank(*args)
    bad = distmat.copy()
    bad[2, 3] = np.nan
    with pytest.raises(BAD_INPUT, match="distmat"):
        reid_ops.evaluate_rank(bad, qp, gp, qc, gc)
    with pytest.raises(BAD_INPUT, match="distmat"):
        reid_ops.evaluate_rank(distmat[0], qp, gp, qc, gc)
    with pytest.raises(BAD_INPUT, match="distmat"):
        reid_ops.evaluate_rank(distmat[:, :0], qp, gp[:0], qc, gc[:0])
    with pytest.raises(BAD_INPUT, match="max_rank"):
        reid_ops.evaluate_rank(distmat, qp, gp, qc, gc, max_rank=0)
    with pytest.raises(BAD_INPUT, match="ap_topk"):
        reid_ops.evaluate_rank(distmat, qp, gp, qc, gc, ap_topk=0)
    with pytest.raises(ValueError):
        reid_ops.evaluate_rank(distmat, qp + 100, gp, qc, gc)  # no valid query at all


# --------------------------------------------------------------------------------------------------------------
# Benchmark smoke test (a run of bench/ops.py --quick, no timing assertions)
# --------------------------------------------------------------------------------------------------------------


def test_benchmark_quick_runs_and_writes_every_op(tmp_path):
    out = tmp_path / "ops.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ops.py"), "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    ops = {row["op"] for row in report["comparisons"]}
    assert {"re_ranking_from_distances", "re_ranking", "jaccard_graph", "gem", "evaluate_rank"} <= ops
    for row in report["comparisons"]:
        assert row["time_ratio"] > 0 and np.isfinite(row["time_ratio"]), row
    assert "ratio" in result.stdout


def test_re_ranking_from_distances_all_zero_row_does_not_crash():
    """A query whose distances to everything are 0 (its column maximum is 0): the classic code divides 0 by 0;
    reid_ops normalises such a column to zeros instead. Regression test for a segmentation fault."""
    rng = np.random.default_rng(7)
    q_g = rng.uniform(0.1, 1.0, (6, 30)).astype(np.float32)
    q_q = rng.uniform(0.1, 1.0, (6, 6)).astype(np.float32)
    q_q = (q_q + q_q.T) / 2
    np.fill_diagonal(q_q, 0)
    g_g = rng.uniform(0.1, 1.0, (30, 30)).astype(np.float32)
    g_g = (g_g + g_g.T) / 2
    np.fill_diagonal(g_g, 0)
    q_g[0], q_q[0], q_q[:, 0] = 0, 0, 0
    out = reid_ops.re_ranking_from_distances(q_g, q_q, g_g, k1=30, k2=6, lambda_value=0.3)
    # (the classic code returns NaN rows here, so there is no reference to compare values with)
    assert out.shape == (6, 30) and np.isfinite(out).all() and (out >= 0).all()


def test_gaussian_weights_reuse_the_neighbour_search_distances_bit_for_bit():
    """_weights_from_features takes (i, j) distances listed in rank[i] from rank_dist instead of recomputing them.

    Three checks: (1) with the search's own lists the weights equal, bit for bit, those computed with no list entry
    usable (every distance recomputed from the features): the search's rescoring and the weights' recomputation are
    the same exact distance; (2) against a float64 evaluation of eq. 7 from the definition; (3) a corrupted rank_dist
    changes exactly the rows whose lists it corrupts, so the lists are really read.
    """
    from reid_ops import _ops

    rng = make_rng("weights-reuse")
    features = torch.from_numpy(clustered_features(rng, 400, 48, 10, spread=0.1).astype(np.float32))
    features[350:360] = features[:10]  # exact duplicates: ties in the lists
    k1 = 20
    rank, rank_dist, row_max, _ = _ops._neighbors_from_features(features, k1 + 1, 0, True, False)
    indptr, indices = _ops._kreciprocal_expansion(rank, k1 + 1, 11)
    reused = _ops._weights_from_features(features, indptr, indices, row_max, rank, rank_dist)
    unlisted = torch.full_like(rank, -1)
    recomputed = _ops._weights_from_features(features, indptr, indices, row_max, unlisted, rank_dist)
    assert torch.equal(reused, recomputed)

    f64 = features.double()
    expected = torch.empty(indices.numel(), dtype=torch.float64)
    for i in range(features.shape[0]):
        cols = indices[indptr[i] : indptr[i + 1]]
        d = ((f64[i] - f64[cols]) ** 2).sum(1) / row_max[i].double()
        w = torch.exp(-d)
        expected[indptr[i] : indptr[i + 1]] = w / w.sum()
    np.testing.assert_allclose(reused.numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)

    corrupted = rank_dist.clone()
    corrupted[5, 1:] += 0.5  # row 5's listed distances (not its own, which stays 0)
    changed = _ops._weights_from_features(features, indptr, indices, row_max, rank, corrupted)
    rows = [slice(int(indptr[i]), int(indptr[i + 1])) for i in range(400)]
    differs = [bool((changed[r] != reused[r]).any()) for r in rows]
    assert differs[5] and sum(differs) == 1


def test_gaussian_weights_reject_a_mismatched_rank_table():
    from reid_ops import _ops

    features = torch.randn(10, 4)
    rank, rank_dist, row_max, _ = _ops._neighbors_from_features(features, 3, 0, True, False)
    indptr, indices = _ops._kreciprocal_expansion(rank, 3, 2)
    with pytest.raises(RuntimeError, match="rank must be"):
        _ops._weights_from_features(features, indptr, indices, row_max, rank[:5], rank_dist[:5])
    with pytest.raises(RuntimeError, match="rank must be"):
        _ops._weights_from_features(features, indptr, indices, row_max, rank, rank_dist[:, :2])


def test_auto_candidate_precision_uses_bf16_only_for_large_searches_on_bf16_cpus():
    from reid_ops import _bf16_search, _cpu_has_bf16_gemm

    assert not _bf16_search("auto", 8191) and not _bf16_search("fp32", 10**6) and _bf16_search("bf16", 1)
    assert _bf16_search("auto", 8192) == _cpu_has_bf16_gemm()


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("n, k", [(1, 1), (9, 9), (300, 7), (5000, 25)])
def test_self_search_scores_each_pair_once_yet_equals_the_per_row_search(n, k, bf16):
    """The self search (re-ranking, Jaccard graph) rescores a candidate pair {i, j} once and lets the other row read
    the value; the search of x against a copy of x (two operands) rescores every row's own list. Both must give the
    same neighbours and bit-identical distances, including exact duplicates (ties), lists that are not mutual, k = n
    (every pair listed) and more than one row block (5,000 points: blocks of 4,096)."""
    from reid_ops import _ops

    rng = make_rng("self-once", n, k, bf16)
    features = clustered_features(rng, n, 24, max(1, n // 40), spread=0.2).astype(np.float32)
    if n >= 300:
        features[n - 30 :] = features[:30]  # duplicates across blocks
    rank, rank_dist, _, _ = _ops._neighbors_from_features(torch.from_numpy(features), k, 0, False, bf16)
    precision = "bf16" if bf16 else "fp32"
    dist, idx = reid_ops.knn(features, features.copy(), k, "sqeuclidean", candidate_precision=precision)
    np.testing.assert_array_equal(rank.numpy(), idx)
    np.testing.assert_array_equal(rank_dist.numpy(), dist)
    # and with an independent float64 reference (ordering by distance, then index)
    f64 = features.astype(np.float64)
    rows = rng.choice(n, size=min(n, 20), replace=False)
    for row in rows:
        d = ((f64[row] - f64) ** 2).sum(1)
        np.testing.assert_allclose(np.sort(d)[:k], rank_dist[row].numpy(), rtol=1e-5, atol=1e-6)
