"""Shared fixtures. `tiny_data_root`: the embedded benchmark's tiny preset (seed 0), generated once per test
session in-process (make_demo_data.generate), as a pathlib.Path to the data root (VisDA-2020 layout)."""

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
