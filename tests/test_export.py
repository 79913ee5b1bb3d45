"""Portable models (GeM without the extension, ONNX and torch.export), the feature-extraction CLI and plain progress
lines. References: GeM from its definition (mean over H x W of max(x, eps)^p, then the 1/p power), onnxruntime for the
ONNX file, reid.extract_features / postprocess.py's feature cache for the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import reid

REPO = Path(__file__).resolve().parents[1]


def gem_from_definition(x: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    n, c = x.shape[:2]
    values = torch.maximum(x.double().reshape(n, c, -1), torch.tensor(eps, dtype=torch.float64))
    return (values**p).mean(dim=2) ** (1.0 / p)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("p", [1.0, 3.0, 4.5])
def test_gem_pytorch_matches_the_definition_and_the_extension(channels_last, p):
    generator = torch.Generator().manual_seed(int(p * 10) + channels_last)
    x = torch.randn(3, 5, 7, 4, generator=generator).abs() + torch.rand(3, 5, 7, 4, generator=generator)
    x[0, 0] = 0.0  # every value below eps: the clamp decides the result
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p_tensor = torch.tensor([p])
    expected = gem_from_definition(x, p, 1e-6)
    got = reid.gem_pytorch(x, p_tensor, 1e-6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    if reid.reid_ops is not None:
        torch.testing.assert_close(reid.reid_ops.gem(x, p_tensor, 1e-6).double(), expected, rtol=1e-5, atol=1e-7)


def test_gem_falls_back_to_pytorch_when_exporting():
    torch.manual_seed(0)
    model = reid.build_model("resnet18", num_classes=0).eval()
    images = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        expected = model(images)
        program = torch.export.export(model, (images,))
        got = program.module()(images)
        traced = torch.jit.trace(model, images)
    # the exported graph holds no custom op: it runs with plain torch
    assert not [n for n in program.graph.nodes if "reid_ops" in str(n.target)]
    assert "reid_ops" not in str(traced.graph)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def reid_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    model = reid.build_model("resnet18", num_classes=4)
    with torch.no_grad():  # non-trivial BN statistics and GeM exponent, as after training
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        model.pool.p.fill_(3.7)
    path = tmp_path_factory.mktemp("ckpt") / "model_best.pth"
    state = {"state_dict": model.state_dict(), "arch": "resnet18", "height": 64, "width": 32}
    reid.save_checkpoint(state, path, kind="pretrain")
    return path


def test_export_writes_onnx_and_torch_export_that_match_pytorch(tmp_path, tiny_data_root, reid_checkpoint):
    onnxruntime = pytest.importorskip("onnxruntime")
    import export

    images = tiny_data_root / "target_validation" / "image_query"
    report = export.main(
        ["--checkpoint", str(reid_checkpoint), "--check-images", str(images), "--num-check-images", "6"]
        + ["--out", str(tmp_path / "exported")]
    )
    assert set(report["max_abs_difference"]) == {"onnx", "torch_export"}
    assert json.loads((tmp_path / "exported" / "export.json").read_text())["feature_dim"] == 512
    # independent check on other images: onnxruntime and the loaded program against the PyTorch model
    model, _ = reid.load_model(reid_checkpoint)
    items = reid.read_dataset("folder", tiny_data_root / "target_validation" / "image_gallery").train[:5]
    dataset = reid.ImageDataset(items, reid.build_test_transform(64, 32))
    batch = torch.stack([dataset[i][0] for i in range(len(items))])
    with torch.no_grad():
        expected = model.eval()(batch).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "exported" / "model.onnx"))
    np.testing.assert_allclose(session.run(None, {"images": batch.numpy()})[0], expected, rtol=1e-3, atol=1e-4)
    program = torch.export.load(str(tmp_path / "exported" / "model.pt2"))
    with torch.no_grad():
        np.testing.assert_allclose(program.module()(batch).numpy(), expected, rtol=1e-3, atol=1e-4)
    with pytest.raises(SystemExit, match="already exist"):
        export.main(
            ["--checkpoint", str(reid_checkpoint), "--check-images", str(images), "--out", str(tmp_path / "exported")]
        )


BLOCKED_RUN = """
import sys
sys.modules["reid_ops"] = None  # `import reid_ops` now raises ImportError, as on a machine without the build
sys.path.insert(0, {repo!r})
import torch, reid
assert reid.reid_ops is None
model, checkpoint = reid.load_model({path!r}, kinds=({kind!r},))
with torch.no_grad():
    features = model.eval()(torch.load({images!r}))
torch.save(features, {out!r})
"""


@pytest.mark.parametrize("kind", ["pretrain", "mmt_plus", "camera"])
def test_a_saved_model_runs_in_a_process_without_reid_ops(tmp_path, kind):
    torch.manual_seed(2)
    model = reid.build_model("resnet18", num_classes=0 if kind == "mmt_plus" else 3)
    with torch.no_grad():
        model.pool.p.fill_(2.5)
    path = tmp_path / "model_best.pth"
    reid.save_checkpoint({"state_dict": model.state_dict(), "arch": "resnet18", "height": 64, "width": 32}, path, kind)
    images = torch.rand(2, 3, 64, 32)
    torch.save(images, tmp_path / "images.pt")
    code = BLOCKED_RUN.format(
        repo=str(REPO), path=str(path), kind=kind, images=str(tmp_path / "images.pt"), out=str(tmp_path / "f.pt")
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        expected = model.eval()(images)
    torch.testing.assert_close(torch.load(tmp_path / "f.pt"), expected, rtol=1e-4, atol=1e-4)


def test_extract_cli_matches_the_toolkit_features(tmp_path, tiny_data_root, reid_checkpoint):
    import extract

    folder = tiny_data_root / "target_validation" / "image_query"
    array = extract.main(
        ["--checkpoint", str(reid_checkpoint), "--images", str(folder), "--out", str(tmp_path / "q"), "--flip"]
    )
    names = (tmp_path / "q.txt").read_text().splitlines()
    assert np.array_equal(np.load(tmp_path / "q.npy"), array)
    items = [(str(folder / name), 0, 0) for name in names]
    assert sorted(names) == sorted(p.name for p in folder.iterdir())
    model, _ = reid.load_model(reid_checkpoint)
    with torch.no_grad():
        expected = reid.extract_features(model, items, 64, 32, flip=True, workers=0)
    np.testing.assert_allclose(array, expected.numpy(), rtol=1e-5, atol=1e-5)

    # a list file: paths relative to --root, pid/camid kept in the index, escapes refused
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"image_query/{name} 7 1\n" for name in names[:3]))
    root = ["--root", str(folder.parent)]
    subset = extract.main(
        ["--checkpoint", str(reid_checkpoint), "--images", str(listing), "--out", str(tmp_path / "l"), *root]
    )
    np.testing.assert_allclose(
        subset,
        extract.main(["--checkpoint", str(reid_checkpoint), "--images", str(folder), "--out", str(tmp_path / "a")])[:3],
        rtol=1e-5,
        atol=1e-5,
    )
    assert (tmp_path / "l.txt").read_text().splitlines()[0].endswith(" 7 1")
    listing.write_text("../outside.jpg 1 1\n")
    with pytest.raises(ValueError, match="list.txt:1"):
        extract.main(
            ["--checkpoint", str(reid_checkpoint), "--images", str(listing), "--out", str(tmp_path / "x"), *root]
        )


def test_plain_progress_lines_have_no_carriage_returns(capsys, monkeypatch):
    monkeypatch.setenv("REID_PROGRESS_SECONDS", "0")
    bar = reid.progress(range(5), desc="extract", unit="img")
    assert isinstance(bar, reid.PlainProgress)  # pytest's captured stderr is not a terminal
    assert list(bar) == [0, 1, 2, 3, 4]
    bar = reid.progress(total=4, desc="train")
    for _ in range(4):
        bar.update()
        bar.set_postfix(loss=0.5)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("[extract] 1/5 img") and "ETA" in lines[0]
    assert lines[-1].startswith("[train] 4/4 it") and lines[-1].endswith("loss=0.5")


def test_extract_and_export_read_a_dataset_through_the_shared_arguments(tmp_path, tiny_data_root, reid_checkpoint):
    import export
    import extract

    # extract.py --split: the same images, features and labels as the dataset reader gives
    data = reid.read_dataset("target_val", tiny_data_root)
    array = extract.main(
        ["--checkpoint", str(reid_checkpoint), "--split", "gallery", "--data-root", str(tiny_data_root)]
        + ["--out", str(tmp_path / "g"), "--workers", "0"]
    )
    lines = [line.split() for line in (tmp_path / "g.txt").read_text().splitlines()]
    assert [(str(Path(data.root) / path), int(pid), int(cam)) for path, pid, cam in lines] == data.gallery
    model, _ = reid.load_model(reid_checkpoint)
    with torch.no_grad():
        expected = reid.extract_features(model, data.gallery, 64, 32, workers=0)
    np.testing.assert_allclose(array, expected.numpy(), rtol=1e-5, atol=1e-5)
    # the unlabelled target: pid -1; --target-root overrides --data-root
    extract.main(
        ["--checkpoint", str(reid_checkpoint), "--split", "target", "--target-root", str(tiny_data_root)]
        + ["--out", str(tmp_path / "t"), "--workers", "0"]
    )
    target = reid.read_dataset("target_train", tiny_data_root).train
    lines = [line.split() for line in (tmp_path / "t.txt").read_text().splitlines()]
    assert len(lines) == len(target) and {pid for _, pid, _ in lines} == {"-1"}
    assert [int(cam) for _, _, cam in lines] == [cam for _, _, cam in target]
    for argv in ([], ["--images", str(tmp_path), "--split", "query"]):  # exactly one of --images / --split
        with pytest.raises(SystemExit):
            extract.main(["--checkpoint", str(reid_checkpoint), "--out", str(tmp_path / "x"), *argv])
    with pytest.raises(SystemExit, match="--val market1501"):  # a dataset that is not there: one line naming it
        extract.main(
            ["--checkpoint", str(reid_checkpoint), "--split", "query", "--val", "market1501"]
            + ["--val-root", str(tmp_path), "--out", str(tmp_path / "x")]
        )

    # export.py --check-split: checked on the first images of the split by path
    args = export.parse_args(
        ["--checkpoint", str(reid_checkpoint), "--check-split", "query", "--data-root", str(tiny_data_root)]
        + ["--num-check-images", "4", "--out", str(tmp_path / "e")]
    )
    batch = export.check_batch(args, 64, 32)
    dataset = reid.ImageDataset(sorted(data.query)[:4], reid.build_test_transform(64, 32))
    torch.testing.assert_close(batch, torch.stack([dataset[i][0] for i in range(4)]), rtol=0, atol=0)
    report = export.main(
        ["--checkpoint", str(reid_checkpoint), "--check-split", "query", "--data-root", str(tiny_data_root)]
        + ["--num-check-images", "4", "--formats", "torch_export", "--out", str(tmp_path / "e")]
    )
    assert report["check_images"] == 4 and report["max_abs_difference"]["torch_export"] < 1e-3
