"""Shared by the safety tests: the stages' command lines on the tiny benchmark (tests/conftest.py), and running a
stage as a command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pretrain_argv(data_root: Path, logs_dir: Path, *extra: str) -> list[str]:
    return ["--data-root", str(data_root), "--source", "personx", "--logs-dir", str(logs_dir), "--arch", "resnet18",
            "--height", "32", "--width", "16", "--batch-size", "8", "--num-instances", "4", "--epochs", "1",
            "--iters", "1", "--eval-every", "1", "--warmup-epochs", "1", "--milestones", "1", "--workers", "0",
            "--seed", "3", *extra]  # fmt: skip


def mmt_argv(data_root: Path, logs_dir: Path, init_1: Path, init_2: Path, *extra: str) -> list[str]:
    return ["--preset", "demo", "--data-root", str(data_root), "--logs-dir", str(logs_dir), "--init-1", str(init_1),
            "--init-2", str(init_2), "--epochs", "1", "--iters", "1", "--batch-size", "8", "--height", "32",
            "--width", "16", "--workers", "0", "--test-batch-size", "64", "--no-eval-initial", *extra]  # fmt: skip


def camera_argv(data_root: Path, logs_dir: Path, *extra: str) -> list[str]:
    return ["--preset", "demo", "--data-root", str(data_root), "--logs-dir", str(logs_dir), "--epochs", "1",
            "--iters", "1", "--batch-size", "8", "--height", "32", "--width", "16", "--eval-step", "1",
            "--warmup-epochs", "1", "--milestones", "1", "--workers", "0", *extra]  # fmt: skip


SDA_TINY = ["--height", "48", "--width", "24", "--ngf", "4", "--ndf", "4", "--n-blocks", "1", "--iters", "1",
            "--batch-size", "8", "--num-instances", "4", "--workers", "0", "--no-amp", "--epochs-constant", "1",
            "--epochs-decay", "0"]  # fmt: skip


def sda_argv(data_root: Path, out: Path, source_encoder: Path, *extra: str) -> list[str]:
    return ["train", "--data-root", str(data_root), "--out", str(out), "--source-encoder", str(source_encoder),
            *SDA_TINY, *extra]  # fmt: skip


def postprocess_argv(checkpoint: Path, data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoints", str(checkpoint), "--dataset", "target_val", "--data-root", str(data_root),
            "--out", str(out), "--k1", "4", "--k2", "2", "--workers", "0", "--num-figures", "0", *extra]  # fmt: skip


def run_stage(script: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("REID_TRACEBACK", None)
    return subprocess.run(
        [sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert all(text in lines[0] for text in expected), lines[0]
