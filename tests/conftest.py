"""Shared fixtures. `tiny_data_root`: the embedded benchmark's tiny preset (seed 0), generated once per test
session in-process (make_demo_data.generate), as a pathlib.Path to the data root (VisDA-2020 layout).
`pretrained_run`: the logs folder of a one-iteration pretrain.py run on it (genuine checkpoints).
`one_torch_thread`: one torch thread for the modules that ask for it."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import make_demo_data  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on
    the shared 2-core CPU, OpenMP spin-waiting makes small runs many times slower with 2 threads (measured: 17 s vs
    133 s for test_camera.py and test_postprocess.py, 6.6 s vs 68 s for test_sda.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
