"""Progress of the long steps that are a few opaque calls (reid.progress over phases): clustering in mmt_plus.py
(Jaccard graph, DBSCAN) and re-ranking in postprocess.py. Plain lines with rate and ETA when stderr is not a
terminal, nothing for small inputs, and the results unchanged (compared with the same calls made directly)."""

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import DBSCAN

import mmt_plus
import postprocess
import reid
import reid_ops

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def grouped_features(n: int, dim: int, seed: int) -> torch.Tensor:
    """L2-normalised features of n images around n // 6 identities, so that DBSCAN finds clusters."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n // 6 + 1, dim, generator=generator), dim=1)
    owner = torch.randint(len(centres), (n,), generator=generator)
    return F.normalize(centres[owner] + 0.15 * torch.randn(n, dim, generator=generator), dim=1)


def plain_lines(err: str, prefix: str) -> list[str]:
    assert "\r" not in err
    return [line for line in err.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("seed", [0, 1])
def test_clustering_reports_its_phases_and_labels_are_unchanged(capsys, monkeypatch, seed):
    monkeypatch.setenv("REID_PROGRESS_SECONDS", "0")
    features = grouped_features(reid.PROGRESS_MIN_ITEMS + 100, 16, seed)
    labels = mmt_plus.cluster_features(features, k1=20, k2=6, eps=0.5, min_samples=4)
    lines = plain_lines(capsys.readouterr().err, "[clustering]")
    assert len(lines) == 2, lines
    assert lines[0].startswith("[clustering] 1/2 phase") and "ETA" in lines[0] and "Jaccard graph" in lines[0]
    assert lines[1].startswith("[clustering] 2/2 phase") and f"{labels.max() + 1} clusters" in lines[1]
    graph = reid_ops.jaccard_graph(features, k1=20, k2=6, max_distance=0.5 + 1e-4)
    expected = DBSCAN(eps=0.5, min_samples=4, metric="precomputed").fit_predict(graph)
    np.testing.assert_array_equal(labels, expected)
    assert labels.max() > 10

    mmt_plus.cluster_features(features[: reid.PROGRESS_MIN_ITEMS - 1], k1=20, k2=6, eps=0.5)
    assert plain_lines(capsys.readouterr().err, "[clustering]") == []  # a small input is quick: no lines


def rerank_args() -> argparse.Namespace:
    return argparse.Namespace(camera_weight=0.1, camera_formula="slides", k1=20, k2=6, lambda_value=0.3, flip=False)


def test_rerank_reports_its_phases_and_distances_are_unchanged(capsys, monkeypatch):
    monkeypatch.setenv("REID_PROGRESS_SECONDS", "0")
    num_query, num_images = 150, reid.PROGRESS_MIN_ITEMS + 50
    features = grouped_features(num_images, 12, seed=3)
    camera = grouped_features(num_images, 4, seed=4)
    args = rerank_args()
    row, distance = postprocess.run_variant("model 1", [features], camera, num_query, True, args)
    lines = plain_lines(capsys.readouterr().err, "[re-ranking model 1]")
    assert [line.split(" phase")[0] for line in lines] == [f"[re-ranking model 1] {i}/3" for i in (1, 2, 3)]
    assert "ETA" in lines[0] and f"re-ranking of {num_images} images" in lines[-1]
    assert row["rerank"]

    # the same distances from the functions the variant calls, without the progress display
    ensembled = postprocess.ensemble_features([features]).numpy()
    cam = camera.numpy()
    query, gallery, cam_q, cam_g = ensembled[:num_query], ensembled[num_query:], cam[:num_query], cam[num_query:]

    def corrected(a, b, ca, cb):
        return postprocess.camera_corrected_distance(a, b, ca, cb, args.camera_weight, args.camera_formula)

    expected = postprocess.rerank(
        corrected(query, gallery, cam_q, cam_g),
        corrected(query, query, cam_q, cam_q),
        corrected(gallery, gallery, cam_g, cam_g),
        args.k1,
        args.k2,
        args.lambda_value,
        args.camera_formula,
    )
    np.testing.assert_array_equal(distance, expected)

    small = postprocess.run_variant("model 1", [features[:300]], camera[:300], 100, True, args)[1]
    assert small.shape == (100, 200)
    assert plain_lines(capsys.readouterr().err, "[re-ranking") == []
