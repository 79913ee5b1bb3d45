"""The run-directory contract (reid.prepare_run_dir, reid.JsonlLogger) and how pretrain.py keeps it: a previous run
is never overwritten, --resume refuses changed settings, args.json + log.txt beside log.jsonl, and the log of an
interrupted-then-resumed run equals the uninterrupted run's (no duplicate records, whole-epoch averages)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pretrain  # noqa: E402
import reid  # noqa: E402


def _namespace(**settings) -> argparse.Namespace:
    return argparse.Namespace(**{"lr": 0.1, "workers": 0, "resume": False, "overwrite": False, **settings})


def test_prepare_run_dir_refuses_overwriting_and_changed_settings(tmp_path):
    run = tmp_path / "run"
    reid.prepare_run_dir(run, _namespace())
    assert json.loads((run / "args.json").read_text()) == {"lr": 0.1, "workers": 0, "resume": False, "overwrite": False}
    (run / "log.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match=r"run: holds a previous run \(args.json, log.jsonl\); pass --resume"):
        reid.prepare_run_dir(run, _namespace())
    assert (run / "log.jsonl").read_text() == "{}\n"  # untouched
    with pytest.raises(ValueError, match=r"settings differ .*--lr 0.1 -> 0.2"):
        reid.prepare_run_dir(run, _namespace(lr=0.2, resume=True))
    (run / ".checkpoint.pth.tmp4242").write_bytes(b"torn")  # a killed save
    reid.prepare_run_dir(run, _namespace(workers=2, resume=True))  # workers may change
    assert not (run / ".checkpoint.pth.tmp4242").exists() and (run / "log.jsonl").is_file()
    assert json.loads((run / "args.json").read_text())["workers"] == 2
    reid.prepare_run_dir(run, _namespace(lr=0.3, overwrite=True))  # --overwrite: a new run
    assert sorted(p.name for p in run.iterdir()) == ["args.json"]
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a run folder"):
        reid.prepare_run_dir(other, _namespace(overwrite=True))
    assert (other / "precious.txt").is_file()


def test_logger_writes_text_beside_json_and_cuts_back_to_a_position(tmp_path):
    logger = reid.JsonlLogger(tmp_path / "log.jsonl")
    logger.log({"epoch": 0, "loss": 1.23456789, "val": {"mAP": 0.5}, "args": {"lr": 1}})
    position = logger.position()
    logger.log({"epoch": 1, "loss": 0.5})
    text = (tmp_path / "log.txt").read_text().splitlines()
    assert len(text) == 2 and "epoch=0  loss=1.235  val={mAP: 0.5}" in text[0] and "args" not in text[0]
    resumed = reid.JsonlLogger(tmp_path / "log.jsonl", position)
    assert [json.loads(line)["epoch"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [0]
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 1
    assert resumed.position() == position


def _train_args(data_root: Path, logs: Path, *extra: str) -> list[str]:
    return [
        "--data-root", str(data_root), "--source", "personx", "--logs-dir", str(logs), "--arch", "resnet18",
        "--height", "32", "--width", "16", "--batch-size", "8", "--num-instances", "4", "--epochs", "2",
        "--iters", "3", "--eval-every", "2", "--warmup-epochs", "1", "--milestones", "1", "--workers", "0",
        "--threads", "1", "--seed", "3", "--target", "none", *extra,
    ]  # fmt: skip


def _records(logs: Path) -> list[dict]:
    records = [json.loads(line) for line in (logs / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "args", "best_checkpoint")} for r in records]


def _assert_same_log(resumed: list[dict], reference: list[dict]) -> None:
    assert [(r.get("event"), r.get("epoch"), r.get("iteration")) for r in resumed] == [
        (r.get("event"), r.get("epoch"), r.get("iteration")) for r in reference
    ]
    for got, expected in zip(resumed, reference, strict=True):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key


@pytest.mark.parametrize("crash_at_step", [5, 6])
def test_pretrain_log_after_a_crash_and_resume_equals_the_uninterrupted_log(
    tiny_data_root, tmp_path, monkeypatch, crash_at_step
):
    """Step 5 (epoch 2, iteration 2) crashes after a record written past the last checkpoint (the end of epoch 1):
    the resumed run must not log it twice. Step 6 crashes after the mid-epoch checkpoint of --save-every 2: the
    epoch_end record must still average over all 3 iterations of epoch 2."""
    straight = tmp_path / "straight"
    pretrain.main(_train_args(tiny_data_root, straight, "--save-every", "2"))
    reference = _records(straight)
    assert (straight / "args.json").is_file()
    assert len((straight / "log.txt").read_text().splitlines()) == len(reference)

    crashed = tmp_path / "crashed"
    triplet, steps = pretrain.softmax_triplet_loss, []

    def crashing_triplet(*args, **kwargs):
        steps.append(1)
        if len(steps) == crash_at_step:
            raise KeyboardInterrupt("simulated kill")
        return triplet(*args, **kwargs)

    monkeypatch.setattr(pretrain, "softmax_triplet_loss", crashing_triplet)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(_train_args(tiny_data_root, crashed, "--save-every", "2"))
    monkeypatch.setattr(pretrain, "softmax_triplet_loss", triplet)
    with pytest.raises(FileExistsError, match="--resume"):  # never over a previous run
        pretrain.main(_train_args(tiny_data_root, crashed, "--save-every", "2"))
    with pytest.raises(ValueError, match=r"--lr 0.00035 -> 0.001"):  # nor resumed with other settings
        pretrain.main(_train_args(tiny_data_root, crashed, "--save-every", "2", "--resume", "--lr", "1e-3"))
    pretrain.main(_train_args(tiny_data_root, crashed, "--save-every", "2", "--resume", "--workers", "1"))
    _assert_same_log(_records(crashed), reference)
    assert len((crashed / "log.txt").read_text().splitlines()) == len(reference)


def test_command_line_errors_are_one_line_and_a_run_that_never_started_does_not_block(tiny_data_root, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, str(REPO / "pretrain.py"), "--logs-dir", str(run), "--source", "personx"]
    failed = subprocess.run([*command, "--data-root", str(tmp_path / "absent")], capture_output=True, text=True)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1 and "absent" in failed.stderr
    (run / "log.jsonl").write_text("{}\n")  # now it holds a run: refused in one line naming the folder
    refused = subprocess.run([*command, "--data-root", str(tiny_data_root)], capture_output=True, text=True)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: {run}: holds a previous run (args.json, log.jsonl); pass --resume to continue it, "
        "--overwrite to delete it and start again, or choose another folder"
    ]
