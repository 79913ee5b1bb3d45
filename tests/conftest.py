"""Shared fixtures. `tiny_data_root`: the embedded benchmark's tiny preset (seed 0), generated once per test
session in-process (make_demo_data.generate), as a pathlib.Path to the data root (VisDA-2020 layout).
`pretrained_run`: the logs folder of a one-iteration pretrain.py run on it (genuine checkpoints)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import make_demo_data  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_data") / "data"
    make_demo_data.generate(root, preset="tiny", seed=0, workers=1)
    return root


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory, tiny_data_root) -> Path:
    """A real (one-iteration) pretrain.py run: its model_best.pth is a genuine checkpoint for the options that
    need one besides the malicious file."""
    import safety_helpers

    import pretrain

    logs_dir = tmp_path_factory.mktemp("pretrain_run")
    pretrain.main(safety_helpers.pretrain_argv(tiny_data_root, logs_dir))
    assert (logs_dir / "model_best.pth").is_file() and (logs_dir / "checkpoint.pth").is_file()
    return logs_dir
