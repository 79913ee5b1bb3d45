"""Checkpoints that run code when unpickled: every command-line option that loads a file (and every --resume,
which loads the run's own checkpoint) gets a file written with torch.save whose pickle creates a marker file when
loaded. The stage must refuse it without running that code, and name the file in its error. Also: unreadable weight
files are named, in one line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safety_helpers import (
    assert_one_line_error,
    camera_argv,
    mmt_argv,
    pretrain_argv,
    run_stage,
    sda_argv,
)

import camera  # noqa: E402
import mmt_plus  # noqa: E402
import postprocess  # noqa: E402
import pretrain  # noqa: E402
import sda  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------------------------
# Malicious checkpoints


class CodeOnLoad:
    """Unpickles as `open(marker, "w")`: loading it with full pickle creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint-shaped dict whose weights are a code-running pickle object."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    torch.save({"state_dict": {"weight": CodeOnLoad(marker)}, "arch": "resnet18", "kind": "pretrain"}, path)
    return path


def assert_refused_without_running(main: Callable, argv: list[str], planted: Path, marker: Path, capsys) -> None:
    with pytest.raises((Exception, SystemExit)) as info:
        main(argv)
    assert not marker.exists(), f"loading {planted} ran the code in its pickle"
    message = f"{info.value}\n{capsys.readouterr().err}"
    assert planted.name in message and str(planted.parent) in message, f"error does not name {planted}: {message}"


@pytest.mark.parametrize("option", ["--pretrained", "--resume"])
def test_pretrain_refuses_code_in_checkpoints(option, tmp_path, tiny_data_root, pretrained_run, capsys):
    marker = tmp_path / "marker"
    if option == "--pretrained":
        planted = plant_malicious_checkpoint(tmp_path / "weights.pth", marker)
        argv = pretrain_argv(tiny_data_root, tmp_path / "logs", "--pretrained", str(planted))
    else:
        logs_dir = tmp_path / "logs"
        pretrain.main(pretrain_argv(tiny_data_root, logs_dir))  # a real run, so only its checkpoint is wrong
        planted = plant_malicious_checkpoint(logs_dir / "checkpoint.pth", marker)
        argv = pretrain_argv(tiny_data_root, logs_dir, "--resume")
    assert_refused_without_running(pretrain.main, argv, planted, marker, capsys)


@pytest.mark.parametrize("option", ["--init-1", "--init-2", "--resume"])
def test_mmt_plus_refuses_code_in_checkpoints(option, tmp_path, tiny_data_root, pretrained_run, capsys):
    marker = tmp_path / "marker"
    good = pretrained_run / "model_best.pth"
    logs_dir = tmp_path / "logs"
    if option == "--resume":
        mmt_plus.main(mmt_argv(tiny_data_root, logs_dir, good, good))
        planted = plant_malicious_checkpoint(logs_dir / "checkpoint.pth", marker)
        argv = mmt_argv(tiny_data_root, logs_dir, good, good, "--resume")
    else:
        planted = plant_malicious_checkpoint(tmp_path / "init.pth", marker)
        inits = (planted, good) if option == "--init-1" else (good, planted)
        argv = mmt_argv(tiny_data_root, logs_dir, *inits)
    assert_refused_without_running(mmt_plus.main, argv, planted, marker, capsys)


@pytest.mark.parametrize("option", ["--pretrained", "--resume"])
def test_camera_refuses_code_in_checkpoints(option, tmp_path, tiny_data_root, capsys):
    marker = tmp_path / "marker"
    logs_dir = tmp_path / "logs"
    if option == "--pretrained":
        planted = plant_malicious_checkpoint(tmp_path / "weights.pth", marker)
        argv = camera_argv(tiny_data_root, logs_dir, "--pretrained", str(planted))
    else:
        camera.main(camera_argv(tiny_data_root, logs_dir))
        planted = plant_malicious_checkpoint(logs_dir / "checkpoint.pth", marker)
        argv = camera_argv(tiny_data_root, logs_dir, "--resume")
    assert_refused_without_running(camera.main, argv, planted, marker, capsys)


@pytest.mark.parametrize("option", ["--checkpoints", "--camera-checkpoint"])
def test_postprocess_refuses_code_in_checkpoints(option, tmp_path, tiny_data_root, pretrained_run, capsys):
    marker = tmp_path / "marker"
    planted = plant_malicious_checkpoint(tmp_path / "model.pth", marker)
    good = pretrained_run / "model_best.pth"
    argv = ["--dataset", "target_val", "--data-root", str(tiny_data_root), "--out", str(tmp_path / "post"),
            "--k1", "4", "--k2", "2", "--workers", "0", "--num-figures", "0"]  # fmt: skip
    if option == "--checkpoints":
        argv += ["--checkpoints", str(good), str(planted)]
    else:
        argv += ["--checkpoints", str(good), "--camera-checkpoint", str(planted)]
    assert_refused_without_running(postprocess.main, argv, planted, marker, capsys)


@pytest.mark.parametrize("option", ["--source-encoder", "--target-encoder", "--resume"])
def test_sda_train_refuses_code_in_checkpoints(option, tmp_path, tiny_data_root, pretrained_run, capsys):
    marker = tmp_path / "marker"
    good = pretrained_run / "model_best.pth"
    out = tmp_path / "sda"
    if option == "--source-encoder":
        planted = plant_malicious_checkpoint(tmp_path / "encoder.pth", marker)
        argv = sda_argv(tiny_data_root, out, planted)
    elif option == "--target-encoder":
        planted = plant_malicious_checkpoint(tmp_path / "encoder.pth", marker)
        argv = sda_argv(tiny_data_root, out, good, "--target-encoder", str(planted))
    else:
        sda.main(sda_argv(tiny_data_root, out, good))
        planted = plant_malicious_checkpoint(out / sda.CHECKPOINT_NAME, marker)
        argv = sda_argv(tiny_data_root, out, good, "--resume")
    assert_refused_without_running(sda.main, argv, planted, marker, capsys)


def test_sda_translate_refuses_code_in_checkpoint(tmp_path, tiny_data_root, capsys):
    marker = tmp_path / "marker"
    planted = plant_malicious_checkpoint(tmp_path / "checkpoint.pt", marker)
    argv = ["translate", "--checkpoint", str(planted), "--data-root", str(tiny_data_root), "--out", str(tmp_path)]
    assert_refused_without_running(sda.main, argv, planted, marker, capsys)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated"])
def test_unreadable_pretrained_file_is_named(content, tmp_path, tiny_data_root, pretrained_run):
    weights = tmp_path / "weights.pth"
    if content == "truncated":
        whole = (pretrained_run / "model_best.pth").read_bytes()
        content = whole[: len(whole) // 2]
    weights.write_bytes(content)
    for main, argv in (
        (pretrain.main, pretrain_argv(tiny_data_root, tmp_path / "pretrain", "--pretrained", str(weights))),
        (camera.main, camera_argv(tiny_data_root, tmp_path / "camera", "--pretrained", str(weights))),
    ):
        with pytest.raises((ValueError, RuntimeError, OSError, SystemExit)) as info:
            main(argv)
        assert str(weights) in str(info.value) and "\n" not in str(info.value).strip()


def test_unreadable_checkpoints_are_one_line_errors(tmp_path, tiny_data_root):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    argv = pretrain_argv(tiny_data_root, tmp_path / "logs", "--pretrained", str(weights))
    assert_one_line_error(run_stage("pretrain.py", *argv), str(weights))
    argv = ["translate", "--checkpoint", str(weights), "--data-root", str(tiny_data_root), "--out", str(tmp_path)]
    assert_one_line_error(run_stage("sda.py", *argv), str(weights))
