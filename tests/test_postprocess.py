"""Tests of postprocess.py: each step against a direct numpy formula written here, the submission format,
the calls into reid_ops, and an end-to-end run on the tiny generated dataset with randomly initialised
checkpoints."""

import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import postprocess  # noqa: E402
import reid_ops  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def unit_rows(rng: np.random.Generator, n: int, d: int, scale: float = 1.0) -> np.ndarray:
    x = rng.normal(size=(n, d)) * scale
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def squared_euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Direct definition sum_k (a_ik - b_jk)^2 in float64 (no GEMM expansion)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Ensembling and camera-distance correction
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ensemble_is_per_model_normalise_concatenate_normalise(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    # different widths and very different scales per model (BNNeck outputs are not normalised)
    feats = [rng.normal(size=(n, d)) * s for d, s in [(16, 1.0), (8, 50.0), (5, 0.01)]]
    got = postprocess.ensemble_features([torch.from_numpy(f) for f in feats]).numpy()
    parts = [f / np.sqrt((f**2).sum(1, keepdims=True)) for f in feats]
    joined = np.concatenate(parts, axis=1)
    expected = joined / np.sqrt((joined**2).sum(1, keepdims=True))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.dtype == np.float32 and got.shape == (n, 29)
    # each model contributes equally: every block of a row has squared norm 1/3
    np.testing.assert_allclose((got[:, 16:24] ** 2).sum(1), 1.0 / 3.0, atol=1e-5)


def test_ensemble_single_model_and_errors():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(4, 6)).astype(np.float32)
    np.testing.assert_allclose(
        postprocess.ensemble_features([f]).numpy(), f / np.linalg.norm(f, axis=1, keepdims=True), atol=1e-6
    )
    with pytest.raises(ValueError, match="number of images"):
        postprocess.ensemble_features([f, f[:3]])
    with pytest.raises(ValueError, match="no feature"):
        postprocess.ensemble_features([])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weight", [0.1, 0.0, 0.7])
def test_camera_correction_matches_formulas(seed, weight):
    rng = np.random.default_rng(seed)
    qa, ga = unit_rows(rng, 7, 12), unit_rows(rng, 11, 12)
    qc, gc = unit_rows(rng, 7, 5), unit_rows(rng, 11, 5)
    # release / default: squared distances for both terms (docs/differences.md#camera-model)
    expected_sq = squared_euclidean(qa, ga) - weight * squared_euclidean(qc, gc)
    for formula in ("squared", "release"):
        got = postprocess.camera_corrected_distance(qa, ga, qc, gc, weight, formula)
        np.testing.assert_allclose(got, expected_sq, atol=2e-5)
    # slides: Euclidean norms for both terms
    expected_slides = np.sqrt(squared_euclidean(qa, ga)) - weight * np.sqrt(squared_euclidean(qc, gc))
    got = postprocess.camera_corrected_distance(qa, ga, qc, gc, weight, "slides")
    np.testing.assert_allclose(got, expected_slides, atol=2e-5)
    # without camera embeddings: the plain re-ID distance
    got = postprocess.camera_corrected_distance(qa, ga, None, None, weight, "squared")
    np.testing.assert_allclose(got, squared_euclidean(qa, ga), atol=2e-5)


def test_camera_correction_self_distance_and_bad_formula():
    rng = np.random.default_rng(5)
    x, c = unit_rows(rng, 9, 8), unit_rows(rng, 9, 4)
    d = postprocess.camera_corrected_distance(x, x, c, c, 0.1, "squared")
    np.testing.assert_allclose(np.diag(d), 0.0, atol=1e-5)  # self: both terms vanish
    np.testing.assert_allclose(d, d.T, atol=1e-5)
    with pytest.raises(ValueError, match="camera formula"):
        postprocess.camera_corrected_distance(x, x, c, c, 0.1, "cosine")


# ----------------------------------------------------------------------------------------------------------
# Re-ranking and evaluation go through reid_ops with the documented inputs
# ----------------------------------------------------------------------------------------------------------


def corrected_blocks(rng, nq=12, ng=40, weight=0.1, formula="squared"):
    centres = unit_rows(rng, 5, 16)
    q = centres[rng.integers(0, 5, nq)] + 0.3 * rng.normal(size=(nq, 16))
    g = centres[rng.integers(0, 5, ng)] + 0.3 * rng.normal(size=(ng, 16))
    q, g = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    q, g = q.astype(np.float32), g.astype(np.float32)
    qc, gc = unit_rows(rng, nq, 5), unit_rows(rng, ng, 5)
    qg = postprocess.camera_corrected_distance(q, g, qc, gc, weight, formula)
    qq = postprocess.camera_corrected_distance(q, q, qc, qc, weight, formula)
    gg = postprocess.camera_corrected_distance(g, g, gc, gc, weight, formula)
    return qg, qq, gg


def test_rerank_calls_reid_ops_with_documented_inputs():
    rng = np.random.default_rng(11)
    qg, qq, gg = corrected_blocks(rng, weight=0.5)  # large weight: some entries are negative
    assert (qg < 0).any(), "the test needs negative corrected distances"
    cases = {
        "squared": lambda d: np.sqrt(np.maximum(d, 0.0)),
        "slides": lambda d: np.maximum(d, 0.0),
        "release": lambda d: d,
    }
    for formula, transform in cases.items():
        got = postprocess.rerank(qg, qq, gg, k1=8, k2=3, lambda_value=0.3, formula=formula)
        direct = reid_ops.re_ranking_from_distances(
            transform(qg).astype(np.float32),
            transform(qq).astype(np.float32),
            transform(gg).astype(np.float32),
            k1=8,
            k2=3,
            lambda_value=0.3,
        )
        np.testing.assert_allclose(got, direct, atol=1e-6)
        assert got.shape == qg.shape


def test_clamped_formulas_avoid_the_release_rank_inversion():
    """With lambda 1 the re-ranked distance is the original-distance term alone: the squared input divided by
    its row maximum over [q_q | q_g]. 'slides' (default) and 'squared' keep the order of the corrected distances
    (a negative entry is clamped to the best value 0); the release's double squaring puts it behind smaller
    positive entries (docs/differences.md#camera-model)."""
    rng = np.random.default_rng(12)
    qg = np.array([[-0.3, 0.1, 0.5, 0.8, 1.2, 1.5], [0.4, 0.2, 0.9, 1.1, 0.05, 1.3]], dtype=np.float32)
    qq = np.array([[0.0, 0.7], [0.7, 0.0]], dtype=np.float32)
    gg = rng.uniform(0.2, 1.6, size=(6, 6)).astype(np.float32)
    gg = np.triu(gg, 1) + np.triu(gg, 1).T
    options = dict(k1=3, k2=2, lambda_value=1.0)
    for formula, power in (("squared", 1), ("slides", 2)):
        got = postprocess.rerank(qg, qq, gg, formula=formula, **options)
        for row in range(2):
            full_row = np.maximum(np.concatenate([qq[row], qg[row]]), 0.0) ** power
            expected = np.maximum(qg[row], 0.0) ** power / full_row.max()
            np.testing.assert_allclose(got[row], expected, atol=1e-5)
        assert np.argmin(got[0]) == 0  # the negative (closest) entry stays first
    release = postprocess.rerank(qg, qq, gg, formula="release", **options)
    assert release[0, 0] > release[0, 1]  # (-0.3)^2 > 0.1^2: the closest pair drops behind (the release's bug)


def test_rerank_refuses_rows_without_positive_distance():
    qg = np.array([[-0.1, -0.2, -0.05], [0.3, 0.2, 0.4]], dtype=np.float32)
    qq = np.array([[0.0, -0.1], [-0.1, 0.0]], dtype=np.float32)
    gg = np.array([[0.0, 0.5, 0.6], [0.5, 0.0, 0.7], [0.6, 0.7, 0.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="1 images have no positive distance"):
        postprocess.rerank(qg, qq, gg, k1=2, k2=1, formula="slides")


def independent_map_top1(distance, q_pids, g_pids, q_cams, g_cams):
    """Market protocol written from its definition: drop same-pid-same-camera items, AP over the rest."""
    aps, top1 = [], []
    for i in range(distance.shape[0]):
        order = np.lexsort((np.arange(distance.shape[1]), distance[i]))
        valid = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
        hits = g_pids[order][valid] == q_pids[i]
        if not hits.any():
            continue
        positions = np.flatnonzero(hits) + 1
        aps.append(np.mean(np.arange(1, len(positions) + 1) / positions))
        top1.append(float(hits[0]))
    return float(np.mean(aps)), float(np.mean(top1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_distances_matches_reid_ops_and_definition(seed):
    rng = np.random.default_rng(seed)
    nq, ng = 15, 60
    q_pids, g_pids = rng.integers(1, 6, nq), rng.integers(0, 6, ng)  # pid 0 = distractors
    q_cams, g_cams = rng.integers(0, 5, nq), rng.integers(0, 5, ng)
    distance = rng.random((nq, ng)).astype(np.float32)
    distance[q_pids[:, None] == g_pids[None, :]] -= 0.3  # make matches likelier to rank high
    query = [(f"q{i}.jpg", int(p), int(c)) for i, (p, c) in enumerate(zip(q_pids, q_cams, strict=True))]
    gallery = [(f"g{i}.jpg", int(p), int(c)) for i, (p, c) in enumerate(zip(g_pids, g_cams, strict=True))]
    for ap_topk in (None, 20):
        got = postprocess.evaluate_distances(distance, query, gallery, max_rank=50, ap_topk=ap_topk)
        direct = reid_ops.evaluate_rank(distance, q_pids, g_pids, q_cams, g_cams, max_rank=50, ap_topk=ap_topk)
        assert got["mAP"] == pytest.approx(float(direct["mAP"]), abs=1e-9)
        assert got["mINP"] == pytest.approx(float(direct["mINP"]), abs=1e-9)
        assert got["top1"] == pytest.approx(float(direct["cmc"][0]), abs=1e-9)
        assert got["top50"] == pytest.approx(float(direct["cmc"][49]), abs=1e-9)
        assert got["num_valid_queries"] == int(direct["num_valid_queries"])
    mean_ap, top1 = independent_map_top1(distance, q_pids, g_pids, q_cams, g_cams)
    got = postprocess.evaluate_distances(distance, query, gallery)
    assert got["mAP"] == pytest.approx(mean_ap, abs=1e-5)
    assert got["top1"] == pytest.approx(top1, abs=1e-9)


# ----------------------------------------------------------------------------------------------------------
# Submission file, pictures, table
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("digits", [5, 4])
def test_submission_format_and_ranking(tmp_path, digits):
    rng = np.random.default_rng(digits)
    nq, ng = 9, 237
    distance = rng.random((nq, ng)).astype(np.float32)
    # each query's nearest gallery image is known, so a line/query mix-up is detected
    nearest = rng.permutation(ng)[:nq]
    distance[np.arange(nq), nearest] = -1.0
    path = postprocess.write_submission(distance, tmp_path, topk=100, index_digits=digits)
    text = path.read_text()
    assert text.endswith("\n") and "\r" not in text
    lines = text.split("\n")[:-1]
    assert len(lines) == nq
    for i, line in enumerate(lines):
        tokens = line.split(" ")  # single spaces: no empty tokens
        assert len(tokens) == 100
        assert all(re.fullmatch(rf"\d{{{digits}}}", t) for t in tokens), line[:60]
        indices = np.array([int(t) for t in tokens])
        assert indices[0] == nearest[i]
        assert len(set(indices.tolist())) == 100 and indices.max() < ng
        # ranking follows the distance row: the 100 smallest, ascending
        expected = np.lexsort((np.arange(ng), distance[i]))[:100]
        np.testing.assert_array_equal(indices, expected)
        assert np.all(np.diff(distance[i, indices]) >= 0)
    with zipfile.ZipFile(tmp_path / "result.zip") as archive:
        assert archive.namelist() == ["result.txt"]
        assert archive.read("result.txt").decode() == text
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_submission_small_gallery_and_bad_input(tmp_path):
    distance = np.array([[0.3, 0.1, 0.2], [0.0, 0.5, 0.4]], dtype=np.float32)
    text = postprocess.write_submission(distance, tmp_path, topk=100, index_digits=5).read_text()
    assert text == "00001 00002 00000\n00000 00002 00001\n"
    with pytest.raises(ValueError, match="non-empty"):
        postprocess.write_submission(np.zeros((0, 3), np.float32), tmp_path)


def test_ranked_list_pictures(tmp_path):
    colours = {}
    paths = []
    for i, (pid, cam) in enumerate([(1, 0), (1, 1), (2, 1), (0, 2), (1, 0)]):
        path = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (32, 64), (40 * i, 90, 160)).save(path)
        paths.append((str(path), pid, cam))
        colours[i] = (pid, cam)
    query, gallery = [paths[0]], paths[1:]
    distance = np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32)  # order: match, wrong, distractor, junk
    written = postprocess.draw_ranked_lists(distance, query, gallery, tmp_path / "out", num_queries=3, topk=10)
    assert len(written) == 1
    image = np.asarray(Image.open(written[0]).convert("RGB"))
    thumb_w, gap = 64, 4

    def border_pixel(rank):  # top-left border pixel of the thumbnail at that rank (0 = query)
        left = gap if rank == 0 else 4 * gap + rank * (thumb_w + gap)
        return tuple(int(v) for v in image[gap + 1, left + 1])

    assert border_pixel(0) == (0, 90, 220)  # query: blue
    assert border_pixel(1) == (0, 170, 0)  # same pid, other camera: green
    assert border_pixel(2) == (220, 0, 0)  # wrong pid: red
    assert border_pixel(3) == (220, 0, 0)  # distractor: red (plus a 'D')
    assert border_pixel(4) == (230, 190, 0)  # same pid and camera: yellow (ignored by the metric)


def test_markdown_table_lists_every_row():
    rows = [
        dict(name="a", models=["x"], flip=True, camera=False, camera_weight=0.1, camera_formula="squared",
             rerank=False, mAP=0.5, mINP=0.25, top1=0.75, top5=0.8, top10=0.9),
        dict(name="b", models=["x", "y"], flip=False, camera=True, camera_weight=0.1, camera_formula="slides",
             rerank=True),
    ]  # fmt: skip
    table = postprocess.markdown_table(rows).strip().split("\n")
    assert len(table) == 4
    assert "| a | 1 | on | off | off | 50.0 | 25.0 | 75.0 | 80.0 | 90.0 |" == table[2]
    assert table[3].startswith("| b | 2 | off | w=0.1 (slides) | on | - |")


def test_feature_cache_key_changes_with_inputs(tmp_path):
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(b"abc")
    images = [tmp_path / f"{i}.jpg" for i in range(3)]
    for image in images:
        image.write_bytes(b"pixels")
    base = dict(dataset="target_val", data_root=str(tmp_path), flip=True, height=64, width=32, arch="resnet18",
                image_paths=[str(image) for image in images])  # fmt: skip
    key = postprocess.feature_cache_key(str(checkpoint), **base)
    assert key == postprocess.feature_cache_key(str(checkpoint), **base)
    for change in [dict(flip=False), dict(height=128), dict(dataset="target_test"), dict(arch="resnet50"),
                   dict(image_paths=base["image_paths"][:2]), dict(image_paths=base["image_paths"][::-1])]:  # fmt: skip
        assert postprocess.feature_cache_key(str(checkpoint), **{**base, **change}) != key
    images[1].write_bytes(b"other pixels")  # an image rewritten under the same name (size and mtime change)
    assert postprocess.feature_cache_key(str(checkpoint), **base) != key
    key = postprocess.feature_cache_key(str(checkpoint), **base)
    checkpoint.write_bytes(b"abcd")  # rewritten checkpoint (size and mtime change)
    assert postprocess.feature_cache_key(str(checkpoint), **base) != key


# ----------------------------------------------------------------------------------------------------------
# End to end on the tiny generated dataset
# ----------------------------------------------------------------------------------------------------------


def save_random_checkpoint(path: Path, arch: str, num_classes: int, seed: int, kind: str = "pretrain") -> Path:
    import reid

    torch.manual_seed(seed)
    model = reid.build_model(arch, num_classes=num_classes)
    reid.save_checkpoint({"state_dict": model.state_dict(), "arch": arch, "height": 64, "width": 32}, path, kind)
    return path


def test_end_to_end_on_tiny_data(tmp_path, tiny_data_root):
    first = save_random_checkpoint(tmp_path / "a.pth", "resnet18", 10, seed=0)
    second = save_random_checkpoint(tmp_path / "b.pth", "resnet18", 10, seed=1)
    camera = save_random_checkpoint(tmp_path / "camera.pth", "resnet18", 5, seed=2, kind="camera")
    out = tmp_path / "post"
    argv = ["--checkpoints", str(first), str(second), "--camera-checkpoint", str(camera),
            "--dataset", "target_val", "--data-root", str(tiny_data_root), "--out", str(out),
            "--k1", "6", "--k2", "3", "--workers", "0", "--batch-size", "64", "--num-figures", "2",
            "--ablation"]  # fmt: skip
    results = postprocess.main(argv)
    import reid

    data = reid.read_dataset("target_val", str(tiny_data_root))
    lines = (out / "result.txt").read_text().splitlines()
    assert len(lines) == len(data.query)
    assert all(len(line.split(" ")) == min(100, len(data.gallery)) for line in lines)
    saved = json.loads((out / "results.json").read_text())
    assert saved["final"]["rerank"] and saved["final"]["camera"]
    # ablation: 2 single models + ensemble with camera/re-ranking off/on (4 combinations)
    assert len(saved["rows"]) == 6
    for row in saved["rows"]:
        assert 0.0 <= row["mAP"] <= 1.0 and 0.0 <= row["top1"] <= 1.0
    assert (out / "results.md").read_text().count("\n| ") == 7  # header + 6 rows
    assert len(list((out / "ranked_lists").glob("*.png"))) == 2
    assert not any(info["cached"] for info in results["models"])

    # the submission follows the final distance matrix: rebuild it from the cached features independently
    features = [torch.load(info["cache"], weights_only=True)["features"].numpy() for info in results["models"]]
    normed = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in features]
    joined = np.concatenate(normed, axis=1)
    joined /= np.linalg.norm(joined, axis=1, keepdims=True)
    assert joined.shape[0] == len(data.query) + len(data.gallery)

    # second run with other post-processing settings: features come from the cache, submission changes
    argv2 = [a for a in argv if a != "--ablation"] + ["--no-rerank", "--camera-weight", "0"]
    results2 = postprocess.main(argv2)
    assert all(info["cached"] for info in results2["models"]) and results2["camera_model"]["cached"]
    nq = len(data.query)
    distance = squared_euclidean(joined[:nq], joined[nq:])
    expected_first = np.argsort(distance, axis=1, kind="stable")[:, 0]
    got_first = [int(line.split(" ")[0]) for line in (out / "result.txt").read_text().splitlines()]
    # allow float ties between GEMM and direct distances: the chosen image must be (near-)closest
    for i, g in enumerate(got_first):
        assert distance[i, g] <= distance[i, expected_first[i]] + 1e-5


def test_checkpoint_without_arch_or_with_missing_weights_fails_clearly(tmp_path):
    import reid

    model = reid.build_model("resnet18", num_classes=0)
    no_arch = tmp_path / "no_arch.pth"
    reid.save_checkpoint({"state_dict": model.state_dict()}, no_arch, "pretrain")
    with pytest.raises(ValueError, match="no_arch.pth.*architecture"):
        postprocess.load_model_for_inference(str(no_arch))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("bnneck")}
    partial = tmp_path / "partial.pth"
    reid.save_checkpoint({"state_dict": state, "arch": "resnet18"}, partial, "pretrain")
    with pytest.raises(ValueError, match="partial.pth.*missing"):
        postprocess.load_model_for_inference(str(partial))
