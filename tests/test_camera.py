"""Tests of camera.py: the learning-rate schedule against the release's formula, a few-iteration run on the
tiny generated dataset, resume, and that its checkpoint is what postprocess.py loads as the camera model."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import camera  # noqa: E402
import reid  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def tiny_args(data_root: Path, logs_dir: Path, epochs: int) -> list[str]:
    return ["--preset", "demo", "--data-root", str(data_root), "--logs-dir", str(logs_dir),
            "--epochs", str(epochs), "--iters", "2", "--batch-size", "8", "--height", "64", "--width", "32",
            "--eval-step", "1", "--warmup-epochs", "1", "--milestones", "1", "--workers", "0"]  # fmt: skip


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_few_iterations_resume_and_postprocess_loading(tmp_path, tiny_data_root):
    # uninterrupted: 2 epochs
    full_dir = tmp_path / "full"
    summary = camera.main(tiny_args(tiny_data_root, full_dir, epochs=2))
    assert 0.0 <= summary["best_val_camera_accuracy"] <= 1.0
    assert (full_dir / "model_best.pth").exists() and (full_dir / "checkpoint.pth").exists()
    assert json.loads((full_dir / "args.json").read_text())["epochs"] == 2  # the run-directory contract
    assert len((full_dir / "log.txt").read_text().splitlines()) == len(read_log(full_dir / "log.jsonl"))
    full_epochs = [r for r in read_log(full_dir / "log.jsonl") if "epoch" in r]
    assert [r["epoch"] for r in full_epochs] == [1, 2]
    for record in full_epochs:
        assert torch.isfinite(torch.tensor(record["loss"])) and 0.0 <= record["val_camera_accuracy"] <= 1.0
    # learning rate follows the schedule: warm-up factor 0.01 at epoch 0, 1.0 * 0.1 (milestone 1) at epoch 1
    assert full_epochs[0]["lr"] == pytest.approx(3.5e-4 * 0.01)
    assert full_epochs[1]["lr"] == pytest.approx(3.5e-4 * 0.1)

    # interrupted after epoch 1, then resumed for the second epoch
    resumed_dir = tmp_path / "resumed"
    camera.main(tiny_args(tiny_data_root, resumed_dir, epochs=1))
    state = reid.read_checkpoint(resumed_dir / "checkpoint.pth")
    assert state["epoch"] == 0 and state["arch"] == "resnet18" and state["num_classes"] == 5
    camera.main(tiny_args(tiny_data_root, resumed_dir, epochs=2) + ["--resume"])
    resumed_log = read_log(resumed_dir / "log.jsonl")
    starts = [r for r in resumed_log if r.get("event") == "start"]
    assert [s["start_epoch"] for s in starts] == [0, 1]
    resumed_epochs = [r for r in resumed_log if "epoch" in r]
    assert [r["epoch"] for r in resumed_epochs] == [1, 2]
    # the resumed second epoch continues the same run: same learning rate and loss as the uninterrupted run
    assert resumed_epochs[1]["lr"] == pytest.approx(full_epochs[1]["lr"])
    assert resumed_epochs[1]["loss"] == pytest.approx(full_epochs[1]["loss"], rel=1e-4)

    # the checkpoint is what postprocess.py loads as camera model (head dropped, architecture read from it)
    import postprocess

    model, info = postprocess.load_model_for_inference(str(full_dir / "model_best.pth"), kinds=("camera",))
    assert info["arch"] == "resnet18" and (info["height"], info["width"]) == (64, 32)
    assert model.classifier is None
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 32)).shape == (2, model.feature_dim)


def test_bad_arguments_fail_clearly(tmp_path, tiny_data_root):
    with pytest.raises(SystemExit):
        camera.parse_args(["--data-root", str(tiny_data_root), "--epochs", "0"])
    with pytest.raises(SystemExit, match="batch"):
        camera.main(tiny_args(tiny_data_root, tmp_path, epochs=1) + ["--batch-size", "100000"])


def test_two_process_torchrun(tmp_path, tiny_data_root):
    import os
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               str(repo / "camera.py"), *tiny_args(tiny_data_root, tmp_path, epochs=1),
               "--batch-size", "16"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = read_log(tmp_path / "log.jsonl")
    assert log[0]["event"] == "start" and log[0]["world_size"] == 2 and log[0]["images_per_batchnorm"] == 8
    assert [r["epoch"] for r in log if "epoch" in r] == [1]  # only rank 0 logs
    assert (tmp_path / "model_best.pth").exists()
