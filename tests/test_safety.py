"""Safety of the stages and of reid_ops against bad inputs: distances that would overflow float32 are refused, the
feature cache follows the images' content and survives a damaged cache file, errors name the file at fault and come
early (before models are loaded or features extracted), and a command's input error is one line, not a traceback.
Checkpoints that run code: test_safety_checkpoints.py; GeM with NaN/Inf: test_safety_gem.py."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safety_helpers import (
    assert_one_line_error,
    camera_argv,
    mmt_argv,
    postprocess_argv,
    pretrain_argv,
    run_stage,
)

import mmt_plus  # noqa: E402
import postprocess  # noqa: E402
import pretrain  # noqa: E402
import reid  # noqa: E402
import reid_ops  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------------------------
# reid_ops: refusal of inputs whose distances overflow float32


def random_features(seed: int, rows: int, dim: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, dim, generator=generator, dtype=torch.float64) * scale).to(dtype)


OVERFLOWING = [(torch.float32, 1e20), (torch.float64, 1e300), (torch.float64, 1e25), (torch.float32, 1e19)]


def distance_ops(x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable]:
    return {
        "sqeuclidean": lambda: reid_ops.pairwise_distance(x, y),
        "euclidean": lambda: reid_ops.pairwise_distance(x, y, "euclidean"),
        "cosine": lambda: reid_ops.pairwise_distance(x, y, "cosine"),
        "knn": lambda: reid_ops.knn(x, y, 3),
        "re_ranking": lambda: reid_ops.re_ranking(x, y, 4, 2),
        "jaccard_graph": lambda: reid_ops.jaccard_graph(torch.cat([x, y]), 4, 2),
    }


@pytest.mark.parametrize("op", ["sqeuclidean", "euclidean", "cosine", "knn", "re_ranking", "jaccard_graph"])
@pytest.mark.parametrize("dtype, scale", OVERFLOWING, ids=str)
def test_distance_ops_refuse_features_whose_distances_overflow(op, dtype, scale):
    x = random_features(1, 7, 5, scale, dtype)
    y = random_features(2, 6, 5, scale, dtype)
    with pytest.raises(ValueError, match="overflow"):
        distance_ops(x, y)[op]()
    # also when only one row of one side is huge
    y = random_features(2, 6, 5, 1.0, dtype)
    x = random_features(1, 7, 5, 1.0, dtype)
    x[3] *= scale
    with pytest.raises(ValueError, match="overflow"):
        distance_ops(x, y)[op]()


@pytest.mark.parametrize("seed", [0, 1])
def test_distance_ops_accept_large_features_below_the_limit(seed):
    """Norms just inside float32's range: finite results equal to a float64 reference (the limit is not too tight)."""
    scale = 5e17  # squared distances up to ~1e37, float32 max 3.4e38
    x = random_features(seed, 9, 4, scale, torch.float32)
    y = random_features(seed + 10, 8, 4, scale, torch.float32)
    reference = ((x.double()[:, None] - y.double()[None]) ** 2).sum(-1)
    norm_scale = float((x.double().norm(dim=1).max() + y.double().norm(dim=1).max()) ** 2)
    distances = reid_ops.pairwise_distance(x, y)
    assert torch.isfinite(distances).all()
    torch.testing.assert_close(distances.double(), reference, rtol=1e-4, atol=1e-5 * norm_scale)
    knn_distances, knn_indices = reid_ops.knn(x, y, 3)
    torch.testing.assert_close(
        knn_distances.double(), reference.sort(dim=1).values[:, :3], rtol=1e-4, atol=1e-5 * norm_scale
    )
    cosine = reid_ops.pairwise_distance(x, y, "cosine")
    reference_cosine = 1 - torch.nn.functional.normalize(x.double()) @ torch.nn.functional.normalize(y.double()).T
    torch.testing.assert_close(cosine.double(), reference_cosine, rtol=1e-4, atol=1e-4)
    # re-ranking is invariant to scaling the features (each row is divided by its maximum distance)
    unit = 1.0 / scale
    torch.testing.assert_close(
        reid_ops.re_ranking(x, y, 4, 2), reid_ops.re_ranking(x * unit, y * unit, 4, 2), rtol=1e-3, atol=1e-4
    )
    graph = reid_ops.jaccard_graph(torch.cat([x, y]), 4, 2)
    assert np.isfinite(graph.data).all()


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e20), (torch.float64, 1e200)], ids=str)
def test_re_ranking_from_distances_refuses_distances_whose_squares_overflow(dtype, scale):
    generator = torch.Generator().manual_seed(3)
    q_g, q_q, g_g = (torch.rand(*shape, generator=generator, dtype=torch.float64) for shape in ((4, 5), (4, 4), (5, 5)))
    q_g[1, 2] = scale  # one huge entry is enough to break the classic algorithm (it squares its inputs)
    with pytest.raises(ValueError, match="overflow"):
        reid_ops.re_ranking_from_distances(q_g.to(dtype), q_q.to(dtype), g_g.to(dtype), 2, 1)
    # scaled into range, the same matrices are accepted and give the result of the unscaled ones
    q_g[1, 2] = 3.0
    big = 1e18
    torch.testing.assert_close(
        reid_ops.re_ranking_from_distances(q_g * big, q_q * big, g_g * big, 2, 1),
        reid_ops.re_ranking_from_distances(q_g, q_q, g_g, 2, 1),
        rtol=1e-4,
        atol=1e-5,
    )


# ---------------------------------------------------------------------------------------------------------------
# postprocess.py feature cache: keyed by the images' content, rebuilt when unreadable


@pytest.fixture
def copied_data_root(tmp_path, tiny_data_root) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_data_root, root)
    return root


def test_feature_cache_follows_image_content(tmp_path, copied_data_root, pretrained_run):
    checkpoint = pretrained_run / "model_best.pth"
    out = tmp_path / "post"
    first = postprocess.main(postprocess_argv(checkpoint, copied_data_root, out))
    assert not first["models"][0]["cached"]
    again = postprocess.main(postprocess_argv(checkpoint, copied_data_root, out))
    assert again["models"][0]["cached"]  # unchanged images: the cache is used
    # rewrite the gallery images under the same names: each gets the pixels of the next one
    gallery = sorted((copied_data_root / "target_validation" / "image_gallery").iterdir())
    contents = [path.read_bytes() for path in gallery]
    for path, content in zip(gallery, contents[1:] + contents[:1], strict=True):
        before = path.stat().st_mtime_ns
        path.write_bytes(content)
        if path.stat().st_mtime_ns == before:  # a coarse file-system clock: make the rewrite visible
            os.utime(path, ns=(before + 10**9, before + 10**9))
    changed = postprocess.main(postprocess_argv(checkpoint, copied_data_root, out))
    assert not changed["models"][0]["cached"]
    fresh = postprocess.main(postprocess_argv(checkpoint, copied_data_root, tmp_path / "fresh", "--no-cache"))
    assert (out / "result.txt").read_text() == (tmp_path / "fresh" / "result.txt").read_text()
    new_features = torch.load(changed["models"][0]["cache"], weights_only=True)["features"]
    old_features = torch.load(first["models"][0]["cache"], weights_only=True)["features"]
    assert changed["models"][0]["cache"] != first["models"][0]["cache"]
    assert not torch.equal(new_features, old_features)
    assert changed["final"]["mAP"] == fresh["final"]["mAP"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "not_features"])
def test_unreadable_feature_cache_is_rebuilt_with_a_warning(damage, tmp_path, tiny_data_root, pretrained_run, capsys):
    checkpoint = pretrained_run / "model_best.pth"
    out = tmp_path / "post"
    first = postprocess.main(postprocess_argv(checkpoint, tiny_data_root, out))
    cache = Path(first["models"][0]["cache"])
    good_features = torch.load(cache, weights_only=True)["features"]
    expected_result = (out / "result.txt").read_text()
    content = cache.read_bytes()
    damaged = {
        "garbage": b"not a torch file",
        "truncated": content[: len(content) // 2],
        "empty": b"",
        "not_features": None,
    }[damage]
    if damaged is None:
        torch.save({"features": torch.zeros(3, 2), "paths": ["x"]}, cache)
    else:
        cache.write_bytes(damaged)
    capsys.readouterr()
    rebuilt = postprocess.main(postprocess_argv(checkpoint, tiny_data_root, out))
    assert not rebuilt["models"][0]["cached"]
    assert "warning" in capsys.readouterr().out and str(cache) in rebuilt["models"][0]["cache"]
    torch.testing.assert_close(torch.load(cache, weights_only=True)["features"], good_features)
    assert (out / "result.txt").read_text() == expected_result


# ---------------------------------------------------------------------------------------------------------------
# Clear, early errors


def test_evaluate_rank_accepts_numpy_views_with_negative_strides():
    rng = np.random.default_rng(5)
    distances = rng.random((6, 9)).astype(np.float32)
    ids = [
        rng.integers(0, 3, 6)[::-1],
        rng.integers(0, 3, 9)[::-1],
        rng.integers(0, 2, 6)[::-1],
        rng.integers(0, 2, 9)[::-1],
    ]
    ids[3][0] = 1 - ids[2][0]  # at least one valid query: same identity, another camera
    ids[1][0] = ids[0][0]
    assert all(array.strides[0] < 0 for array in ids)
    result = reid_ops.evaluate_rank(distances, *ids)
    expected = reid_ops.evaluate_rank(distances, *[array.copy() for array in ids])
    np.testing.assert_array_equal(result["all_ap"], expected["all_ap"])
    np.testing.assert_array_equal(result["cmc"], expected["cmc"])


@pytest.mark.parametrize("split", ["target_train", "target_val_query", "target_val_gallery"])
def test_empty_label_or_index_file_is_named(split, copied_data_root):
    file = {
        "target_train": copied_data_root / "target_training" / "label_target_training.txt",
        "target_val_query": copied_data_root / "index_validation_query.txt",
        "target_val_gallery": copied_data_root / "index_validation_gallery.txt",
    }[split]
    file.write_text("\n")
    with pytest.raises(ValueError, match=f"{file}.*no images"):
        reid.read_dataset(split.removesuffix("_query").removesuffix("_gallery"), copied_data_root)


def test_pretrain_with_an_empty_target_label_file_names_it(tmp_path, copied_data_root):
    label_file = copied_data_root / "target_training" / "label_target_training.txt"
    label_file.write_text("")
    with pytest.raises((ValueError, SystemExit), match=str(label_file)):
        pretrain.main(pretrain_argv(copied_data_root, tmp_path / "logs"))


def test_postprocess_checks_k1_before_loading_any_model(tmp_path, tiny_data_root):
    unreadable = tmp_path / "model.pth"
    unreadable.write_bytes(b"never loaded")  # loading it would fail with another error
    data = reid.read_dataset("target_val", tiny_data_root)
    images = len(data.query) + len(data.gallery)
    argv = postprocess_argv(unreadable, tiny_data_root, tmp_path / "post")
    argv[argv.index("--k1") + 1] = str(images)  # one more than the k1 + 1 <= Q + G neighbours that exist
    with pytest.raises(SystemExit, match="--k1"):
        postprocess.main(argv)
    assert not (tmp_path / "post" / "feature_cache").exists()


def test_postprocess_loads_every_checkpoint_before_extracting_features(tmp_path, tiny_data_root, pretrained_run):
    unreadable = tmp_path / "camera.pth"
    unreadable.write_bytes(b"not a checkpoint")
    argv = postprocess_argv(pretrained_run / "model_best.pth", tiny_data_root, tmp_path / "post")
    with pytest.raises((ValueError, RuntimeError, SystemExit), match="camera.pth"):
        postprocess.main(argv + ["--camera-checkpoint", str(unreadable)])
    assert not list((tmp_path / "post").rglob("*.pt"))  # no features were extracted (and cached) first


def test_mmt_plus_checks_k1_before_loading_models(tmp_path, tiny_data_root):
    unreadable = tmp_path / "init.pth"
    unreadable.write_bytes(b"never loaded")
    targets = len(reid.read_dataset("target_train", tiny_data_root).train)
    argv = mmt_argv(tiny_data_root, tmp_path / "logs", unreadable, unreadable, "--k1", str(targets + 1))
    with pytest.raises(SystemExit, match="--k1"):
        mmt_plus.main(argv)


def test_cli_input_errors_are_one_line(tmp_path, tiny_data_root):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    # output folder below a file
    argv = pretrain_argv(tiny_data_root, a_file / "logs")
    assert_one_line_error(run_stage("pretrain.py", *argv), str(a_file / "logs"))
    # a missing data root
    argv = camera_argv(tmp_path / "missing", tmp_path / "camera")
    assert_one_line_error(run_stage("camera.py", *argv), str(tmp_path / "missing"))
    # k1 beyond the images of the split
    argv = postprocess_argv(weights, tiny_data_root, tmp_path / "post")
    argv[argv.index("--k1") + 1] = "100000"
    assert_one_line_error(run_stage("postprocess.py", *argv), "--k1")
    # mmt_plus.py with an --out folder below a file
    argv = mmt_argv(tiny_data_root, a_file / "mmt", weights, weights)
    assert_one_line_error(run_stage("mmt_plus.py", *argv), str(a_file / "mmt"))
