"""CUDA path of reid_ops compared with its CPU path (which tests/test_ops.py checks against the references).

Skipped as a whole when no GPU is present: there is nothing to run the CUDA kernels on.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import scipy.sparse
import torch

import reid_ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    ),
]


def make_generator(*params: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def clustered(gen: torch.Generator, n: int, dim: int, num_clusters: int = 6) -> torch.Tensor:
    centres = torch.randn(num_clusters, dim, generator=gen)
    x = centres[torch.randint(0, num_clusters, (n,), generator=gen)] + 0.3 * torch.randn(n, dim, generator=gen)
    return torch.nn.functional.normalize(x, dim=1)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
@pytest.mark.parametrize("m, n, d", [(1, 1, 3), (37, 129, 64), (300, 1000, 256)])
def test_pairwise_distance_cuda_vs_cpu(metric, m, n, d):
    gen = make_generator("pd", metric, m, n, d)
    x, y = torch.randn(m, d, generator=gen), torch.randn(n, d, generator=gen)
    cpu = reid_ops.pairwise_distance(x, y, metric)
    gpu = reid_ops.pairwise_distance(x.cuda(), y.cuda(), metric)
    assert gpu.is_cuda and gpu.dtype == torch.float32
    atol = 1e-5 * d if metric != "cosine" else 1e-5
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=atol)
    assert (torch.diag(reid_ops.pairwise_distance(x.cuda() * 1e3, x.cuda() * 1e3, metric)) == 0).all()


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (50, 400, 20), (200, 333, 333)])
def test_knn_cuda_vs_cpu(metric, m, n, k):
    gen = make_generator("knn", metric, m, n, k)
    x, y = clustered(gen, m, 32), clustered(gen, n, 32)
    cpu_dist, cpu_idx = reid_ops.knn(x, y, k, metric)
    gpu_dist, gpu_idx = reid_ops.knn(x.cuda(), y.cuda(), k, metric)
    assert gpu_idx.is_cuda and gpu_idx.dtype == torch.int64
    torch.testing.assert_close(gpu_dist.cpu(), cpu_dist, rtol=1e-5, atol=1e-5)
    # indices may differ only between neighbours at (numerically) equal distance
    full = reid_ops.pairwise_distance(x, y, metric)
    torch.testing.assert_close(torch.gather(full, 1, gpu_idx.cpu()), cpu_dist, rtol=1e-5, atol=1e-5)


def test_knn_cuda_ties_broken_by_index():
    gen = make_generator("knn-ties")
    y = torch.randint(0, 3, (200, 6), generator=gen).float()
    y[150:] = y[:50]
    x = y[:40]
    cpu = reid_ops.knn(x, y, 25)
    gpu = reid_ops.knn(x.cuda(), y.cuda(), 25)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=0, atol=0)


@pytest.mark.parametrize("num_query, num_gallery, k1, k2", [(1, 40, 20, 6), (50, 300, 20, 6), (80, 400, 30, 1)])
def test_re_ranking_cuda_vs_cpu(num_query, num_gallery, k1, k2):
    gen = make_generator("rr", num_query, num_gallery, k1, k2)
    f = clustered(gen, num_query + num_gallery, 16)
    q, g = f[:num_query], f[num_query:]
    cpu = reid_ops.re_ranking(q, g, k1, k2, 0.3)
    gpu = reid_ops.re_ranking(q.cuda(), g.cuda(), k1, k2, 0.3)
    assert gpu.is_cuda and gpu.shape == (num_query, num_gallery)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)
    d = reid_ops.pairwise_distance(f, f, "euclidean")
    blocks = (d[:num_query, num_query:], d[:num_query, :num_query], d[num_query:, num_query:])
    cpu = reid_ops.re_ranking_from_distances(*blocks, k1, k2, 0.3)
    gpu = reid_ops.re_ranking_from_distances(*(b.cuda() for b in blocks), k1, k2, 0.3)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n, k1, k2, max_distance", [(1, 1, 1, 1.0), (200, 20, 6, 1.0), (500, 30, 6, 0.6)])
def test_jaccard_graph_cuda_vs_cpu(n, k1, k2, max_distance):
    gen = make_generator("jac", n, k1, k2, max_distance)
    f = clustered(gen, n, 16)
    cpu = reid_ops.jaccard_graph(f, k1, k2, max_distance)
    gpu = reid_ops.jaccard_graph(f.cuda(), k1, k2, max_distance)
    assert isinstance(gpu, scipy.sparse.csr_matrix) and gpu.shape == (n, n)
    assert (gpu.diagonal() == 0).all()

    def dense(graph):
        coo = graph.tocoo()
        out = np.full((n, n), 2.0)  # 2 marks "not stored"
        out[coo.row, coo.col] = coo.data
        return out

    a, b = dense(cpu), dense(gpu)
    both = (a <= 1) & (b <= 1)
    np.testing.assert_allclose(a[both], b[both], atol=1e-5)
    only_one = (a <= 1) != (b <= 1)  # stored by one only: must lie at the threshold
    assert np.all(np.minimum(a, b)[only_one] >= max_distance - 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gem_cuda_vs_cpu(dtype):
    gen = make_generator("gem", str(dtype))
    x = torch.rand(8, 64, 24, 8, generator=gen, dtype=dtype) + 0.01
    weights = torch.randn(8, 64, generator=gen, dtype=dtype)
    results = []
    for device in ("cpu", "cuda"):
        xd = x.to(device).requires_grad_()
        p = torch.tensor([3.0], dtype=dtype, device=device, requires_grad=True)
        out = reid_ops.gem(xd, p)
        (out * weights.to(device)).sum().backward()
        results.append((out.detach().cpu(), xd.grad.cpu(), p.grad.cpu()))
    for cpu, gpu in zip(*results, strict=True):
        torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-6)


def test_gem_cuda_gradcheck():
    gen = make_generator("gem-gradcheck")
    x = (torch.rand(2, 3, 4, 3, generator=gen, dtype=torch.float64) + 0.1).cuda().requires_grad_()
    p = torch.tensor([2.5], dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(reid_ops.gem, (x, p))


@pytest.mark.parametrize("ap_topk", [None, 100])
def test_evaluate_rank_cuda_vs_cpu(ap_topk):
    gen = make_generator("eval", ap_topk)
    num_query, num_gallery = 100, 800
    query_pids = torch.randint(0, 60, (num_query,), generator=gen)
    gallery_pids = torch.randint(0, 60, (num_gallery,), generator=gen)
    query_camids = torch.randint(0, 4, (num_query,), generator=gen)
    gallery_camids = torch.randint(0, 4, (num_gallery,), generator=gen)
    distmat = torch.rand(num_query, num_gallery, generator=gen)
    args = (distmat, query_pids, gallery_pids, query_camids, gallery_camids)
    cpu = reid_ops.evaluate_rank(*args, max_rank=50, ap_topk=ap_topk)
    gpu = reid_ops.evaluate_rank(*(a.cuda() for a in args), max_rank=50, ap_topk=ap_topk)
    assert gpu["num_valid_queries"] == cpu["num_valid_queries"]
    np.testing.assert_allclose(gpu["cmc"], cpu["cmc"], atol=1e-9)
    assert gpu["mAP"] == pytest.approx(cpu["mAP"], abs=1e-9)
    assert gpu["mINP"] == pytest.approx(cpu["mINP"], abs=1e-9)


def test_mixed_devices_rejected():
    x = torch.randn(4, 8)
    with pytest.raises((ValueError, RuntimeError)):
        reid_ops.pairwise_distance(x.cuda(), x)
