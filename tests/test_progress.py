"""Progress of the long steps that are a few opaque calls (reid.progress over phases): clustering in mmt_plus.py
(Jaccard graph, DBSCAN) and re-ranking in postprocess.py. Plain lines with rate and ETA when stderr is not a
terminal, nothing for small inputs, and the results unchanged (compared with the same calls made directly)."""

import argparse
import subprocess
from pathlib import Path

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


def shell_function(script: str, name: str) -> str:
    """The text of one bash function of a script (from `name() {` to the first line that is `}`)."""
    lines = script.splitlines()
    start = lines.index(f"{name}() {{")
    return "\n".join(lines[start : lines.index("}", start) + 1])


def test_run_pipeline_reads_the_stage_fraction_from_its_epoch_progress_lines(tmp_path):
    """run_pipeline.sh's epoch_fraction (the basis of its 'stage: ~N s left'): thousandths done, from the latest
    '[... epoch E/N] i/T' line at or after the given log line, as the definition ((E - 1) * T + i) / (N * T) gives."""
    function = shell_function((Path(__file__).parents[1] / "run_pipeline.sh").read_text(), "epoch_fraction")
    rng = np.random.default_rng(5)
    lines = ["# 2026-12-02 10:00:00 UTC", "[pretrain] resnet18: 62 source images", "[features] 3/9 batch in 0:01"]
    expected = []
    for _ in range(6):
        epochs, iters = int(rng.integers(1, 50)), int(rng.integers(1, 400))
        epoch, done = int(rng.integers(1, epochs + 1)), int(rng.integers(1, iters + 1))
        desc = rng.choice(["epoch", "mmt+ epoch", "camera epoch", "sda epoch"])
        lines.append(f"[{desc} {epoch}/{epochs}] {done}/{iters} it in 0:03 (2.9 it/s, ETA 0:01), loss=3.2")
        lines.append("[clustering] 2/2 phase in 0:01 (2 phase/s), done=DBSCAN, 4 clusters")
        expected.append(((epoch - 1) * iters + done) * 1000 // (epochs * iters))
    log = tmp_path / "stage.log"
    log.write_text("\n".join(lines) + "\n")

    def fraction(first_line: int) -> str:
        code = f'{function}\nepoch_fraction "{log}" {first_line}'
        return subprocess.run(["bash", "-c", code], capture_output=True, text=True, check=True).stdout.strip()

    assert fraction(1) == str(expected[-1])
    assert fraction(len(lines) - 2) == str(expected[-1])
    assert fraction(len(lines)) == ""  # no epoch line from there on: no estimate
    log.write_text("\n".join(lines[: 3 + 2 * 3]) + "\n")
    assert fraction(1) == str(expected[2])
