"""Tests of calibrate_benchmark.py without training: the rows' pretrain.py flags, skipping finished runs (a
result.json whose command matches), re-running a changed command, and the JSON/table it writes."""

import json
import subprocess

import pytest

import calibrate_benchmark


def args_for(tmp_path, *extra: str):
    return calibrate_benchmark.parse_args(
        ["--data-root", str(tmp_path / "d"), "--runs-dir", str(tmp_path / "r"), *extra]
    )


def test_rows_use_the_documented_flags(tmp_path):
    data, translator = tmp_path / "d", tmp_path / "t"
    flags = {row: calibrate_benchmark.row_flags(row, data, translator) for row in calibrate_benchmark.ROWS}
    assert flags["source_only"] == ["--data-root", str(data), "--source", "personx"]
    assert flags["source_only_no_bn_adaptation"][-2:] == ["--target", "none"]
    assert flags["source_only_no_autoaugment"][-1] == "--no-autoaugment"
    assert flags["target_label_bound"] == ["--data-root", str(data), "--target-labels-upper-bound"]
    # the control trains on the translator root and is evaluated on the benchmark's target
    assert flags["perfect_translator"] == [
        "--data-root",
        str(translator),
        "--target-root",
        str(data),
        "--source",
        "personx",
    ]


def fake_run(calls: list):
    """Stands in for subprocess.run: records the command and writes the log a finished pretrain.py leaves."""

    def run(command, **_):
        if "--logs-dir" not in command:  # `git rev-parse` for the JSON's meta
            return subprocess.CompletedProcess(command, 0, stdout="0" * 40 + "\n")
        calls.append(command)
        logs = command[command.index("--logs-dir") + 1]
        with open(f"{logs}/log.jsonl", "w") as handle:
            handle.write(json.dumps({"event": "done", "last": {"mAP": 0.25, "top1": 0.5, "top5": 0.7}}) + "\n")
        return subprocess.CompletedProcess(command, 0)

    return run


def test_finished_runs_are_skipped_and_changed_commands_rerun(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(calibrate_benchmark.subprocess, "run", fake_run(calls))
    args = args_for(tmp_path)
    first = calibrate_benchmark.run_one(args, "source_only", 1, tmp_path / "t")
    assert (first["mAP"], first["top1"]) == (25.0, 50.0) and len(calls) == 1
    assert "--resume" in calls[0]  # an interrupted run continues
    again = calibrate_benchmark.run_one(args, "source_only", 1, tmp_path / "t")
    assert again == first and len(calls) == 1  # finished with the same command: not run again
    changed = args_for(tmp_path, "--pretrain-args", "--epochs 2")
    calibrate_benchmark.run_one(changed, "source_only", 1, tmp_path / "t")
    assert len(calls) == 2 and calls[1][-3:-1] == ["--epochs", "2"]


def test_json_rows_and_table(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(calibrate_benchmark.subprocess, "run", fake_run(calls))
    for root in ("d", "d_translator"):
        (tmp_path / root / "diagnostics").mkdir(parents=True)
        (tmp_path / root / "diagnostics" / "summary.json").write_text(json.dumps({"seed": 3, "config": {}}))
    table = calibrate_benchmark.main(
        ["--data-root", str(tmp_path / "d"), "--runs-dir", str(tmp_path / "r"), "--seeds", "1", "2"]
    )
    saved = json.loads((tmp_path / "r" / "benchmark_gap.json").read_text())
    assert saved == table and len(calls) == 10
    for row in calibrate_benchmark.ROWS:
        assert saved[row] == {"mAP": [25.0, 25.0], "top1": [50.0, 50.0]}
    assert saved["meta"]["generator_seed"] == 3
    assert "| `source_only` | 25.0 ± 0.0 | 50.0 ± 0.0 | 25.0 / 25.0 | 1.00 |" in calibrate_benchmark.markdown_table(
        saved
    )


def test_missing_benchmark_is_reported(tmp_path):
    with pytest.raises(SystemExit, match="no finished benchmark"):
        calibrate_benchmark.main(["--data-root", str(tmp_path / "d"), "--runs-dir", str(tmp_path / "r")])


def test_collect_reports_finished_runs_only(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(calibrate_benchmark.subprocess, "run", fake_run(calls))
    for root in ("d", "d_translator"):
        (tmp_path / root / "diagnostics").mkdir(parents=True)
        (tmp_path / root / "diagnostics" / "summary.json").write_text(json.dumps({"seed": 0, "config": {}}))
    calibrate_benchmark.run_one(args_for(tmp_path), "source_only", 1, tmp_path / "d_translator")
    table = calibrate_benchmark.main(
        ["--data-root", str(tmp_path / "d"), "--runs-dir", str(tmp_path / "r"), "--collect"]
    )
    assert len(calls) == 1  # nothing more was run
    assert table["source_only"] == {"mAP": [25.0, None], "top1": [50.0, None]}
    assert table["target_label_bound"] == {"mAP": [None, None], "top1": [None, None]}
    assert "not run yet" in calibrate_benchmark.markdown_table(table)


def test_budget_scale_multiplies_epochs_and_keeps_the_schedule_shape(tmp_path, monkeypatch):
    from pretrain import PRESETS

    demo = PRESETS["demo"]
    assert calibrate_benchmark.budget_flags("demo", 1) == []  # the preset as it is
    for scale in (2, 3, 4):
        flags = calibrate_benchmark.budget_flags("demo", scale)
        epochs = int(flags[flags.index("--epochs") + 1])
        start = flags.index("--milestones") + 1
        milestones = [int(m) for m in flags[start : flags.index("--eval-every")]]
        assert epochs == scale * demo["epochs"]
        # each learning-rate step at the same fraction of the run as in the preset
        assert [m / epochs for m in milestones] == pytest.approx([m / demo["epochs"] for m in demo["milestones"]])
        every = int(flags[flags.index("--eval-every") + 1])
        assert epochs // every in (4, 5)  # about four evaluations in the run (pretrain.py also evaluates the last)
    with pytest.raises(SystemExit, match="--budget-scale"):
        calibrate_benchmark.budget_flags("demo", 0)
    with pytest.raises(SystemExit, match="unknown --preset"):
        calibrate_benchmark.budget_flags("nope", 2)
    # the flags reach the pretrain.py command, before any --pretrain-args (which may override them)
    calls: list = []
    monkeypatch.setattr(calibrate_benchmark.subprocess, "run", fake_run(calls))
    calibrate_benchmark.run_one(args_for(tmp_path, "--budget-scale", "3"), "source_only", 1, tmp_path / "t")
    assert calls[0][calls[0].index("--epochs") + 1] == str(3 * demo["epochs"])


@pytest.mark.parametrize("last_epoch, usable", [(40, True), (30, False)])
def test_a_finished_run_resumed_by_an_older_pretrain_reads_its_final_epoch(tmp_path, monkeypatch, last_epoch, usable):
    """An older pretrain.py resumed after its last epoch wrote "last": null; the final epoch's evaluation stands in,
    but only if it is the budget's last epoch (a run evaluated last at epoch 30 of 40 is not finished)."""

    def run(command, **_):
        if "--logs-dir" not in command:
            return subprocess.CompletedProcess(command, 0, stdout="0" * 40 + "\n")
        logs = command[command.index("--logs-dir") + 1]
        records = [
            {"epoch": last_epoch - 1, "event": "epoch_end", "val_mAP": 0.3622, "val_top1": 0.4899, "val_top5": 0.7},
            {"event": "done", "best_mAP": 0.3622, "last": None},
        ]
        with open(f"{logs}/log.jsonl", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(calibrate_benchmark.subprocess, "run", run)
    args = args_for(tmp_path)  # the calibration budget: 40 epochs
    if usable:
        result = calibrate_benchmark.run_one(args, "source_only", 1, tmp_path / "t")
        assert (result["mAP"], result["top1"]) == (36.22, 48.99)
    else:
        with pytest.raises(RuntimeError, match="no final evaluation"):
            calibrate_benchmark.run_one(args, "source_only", 1, tmp_path / "t")
