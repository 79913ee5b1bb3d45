"""The checkpoint contract (reid.save_checkpoint / read_checkpoint / load_model): every file carries a kind and a
format version, is read with torch's weights_only unpickler, and a stage given the wrong kind of file refuses it
by name. Files written the way earlier versions of this toolkit wrote them (LEGACY layouts below, copied from
the stage scripts of commit 00d8092) still load."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import postprocess  # noqa: E402
import reid  # noqa: E402
import sda  # noqa: E402


@pytest.fixture(scope="module")
def network() -> reid.ReIDModel:
    """A resnet18 re-ID model with 5 classes and non-default weights and statistics."""
    torch.manual_seed(0)
    model = reid.build_model("resnet18", num_classes=5)
    with torch.no_grad():
        for tensor in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
            tensor.add_(torch.rand_like(tensor))
    return model


def _legacy_rng() -> dict:
    # what reid.rng_state() saved before: numpy's state tuple holds a numpy array
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _legacy_args(**overrides) -> dict:
    return {"arch": "resnet18", "height": 64, "width": 32, "seed": 1, **overrides}


def _optimizer_state(model: torch.nn.Module) -> dict:
    return torch.optim.Adam(model.parameters(), lr=1e-3).state_dict()


def _legacy_classifier_model(model: reid.ReIDModel) -> dict:
    """The fields pretrain.py and camera.py files had: the whole network (5-class head) and its input size."""
    fields = {"arch": "resnet18", "num_classes": 5, "feature_dim": 512, "height": 64, "width": 32}
    return {"state_dict": model.state_dict(), **fields}


def legacy_pretrain(model: reid.ReIDModel, resume: bool) -> dict:
    """pretrain.py checkpoint_state() (checkpoint.pth); model_best.pth drops optimizer, scheduler and rng."""
    state = {
        **_legacy_classifier_model(model),
        "epoch": 2,
        "iteration": 0,
        "best_mAP": 0.25,
        "best_epoch": 2,
        "args": _legacy_args(),
    }
    if resume:
        state.update(
            optimizer=_optimizer_state(model), scheduler={"base_lrs": [1e-3], "last_epoch": 2}, rng=_legacy_rng()
        )
    return state


def _legacy_mmt_model(model: reid.ReIDModel) -> dict:
    """The fields both mmt_plus.py files had: the mean teacher as a plain model without its head."""
    plain = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    return {"state_dict": plain, "arch": "resnet18", "feature_dim": 512, "height": 64, "width": 32, "mode": "mmt+"}


def legacy_mmt_best(model: reid.ReIDModel) -> dict:
    return {
        **_legacy_mmt_model(model),
        "epoch": 1,
        "mAP": 0.3,
        "teacher": 2,
        "kind": "mmt",
        "args": _legacy_args(mode="mmt+"),
    }


def legacy_mmt_resume(model: reid.ReIDModel) -> dict:
    return {
        **_legacy_mmt_model(model),
        "kind": "mmt-resume",
        "epoch": 0,
        "global_step": 20,
        "best_mAP": 0.3,
        "best_epoch": 1,
        "students": [model.state_dict()] * 2,
        "teachers": [model.state_dict()] * 2,
        "moco_queues": [{"keys": torch.randn(8, 512), "pointer": torch.zeros((), dtype=torch.long)}] * 2,
        "optimizer": _optimizer_state(model),
        "rng": _legacy_rng(),
        "args": _legacy_args(mode="mmt+"),
    }


def legacy_camera(model: reid.ReIDModel) -> dict:
    return {
        **_legacy_classifier_model(model),
        "epoch": 3,
        "best_accuracy": 0.8,
        "best_epoch": 4,
        "kind": "camera",
        "args": _legacy_args(),
        "optimizer": _optimizer_state(model),
        "rng": _legacy_rng(),
    }


def legacy_sda(generators: torch.nn.Module) -> dict:
    return {
        "kind": "sda",
        "architecture": {"ngf": 4, "n_blocks": 1, "ndf": 4, "height": 32, "width": 16},
        "args": {"ngf": 4, "n_blocks": 1},
        "epoch": 1,
        "iteration": 0,
        "global_step": 3,
        "generators": generators.state_dict(),
        "discriminators": {},
        "optimizer_g": _optimizer_state(generators),
        "optimizer_d": {},
        "pool_target": {"size": 2, "images": [torch.zeros(3, 4, 4)], "rng": random.Random(1).getstate()},
        "pool_source": {"size": 2, "images": [], "rng": random.Random(2).getstate()},
        "rng": _legacy_rng(),
    }


def _save_legacy(state: dict, path: Path, ddp: bool = False) -> Path:
    """As the old reid.save_checkpoint: a plain torch.save of the dict (the DDP variant prefixes 'module.')."""
    if ddp:
        state = {**state, "state_dict": {f"module.{k}": v for k, v in state["state_dict"].items()}}
    torch.save(state, path)
    return path


def _assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module, skip_classifier: bool = True) -> None:
    expected = reference.state_dict()
    for key, value in model.state_dict().items():
        if skip_classifier and key.startswith("classifier."):
            continue
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("ddp", [False, True])
def test_legacy_reid_models_load(network, tmp_path, ddp):
    files = {
        "pretrain": _save_legacy(legacy_pretrain(network, resume=False), tmp_path / "best.pth", ddp),
        "pretrain-resume": _save_legacy(legacy_pretrain(network, resume=True), tmp_path / "checkpoint.pth", ddp),
        "mmt": _save_legacy(legacy_mmt_best(network), tmp_path / "mmt_best.pth", ddp),
        "mmt-resume": _save_legacy(legacy_mmt_resume(network), tmp_path / "mmt_checkpoint.pth", ddp),
    }
    expected_kinds = {
        "pretrain": "pretrain",
        "pretrain-resume": "pretrain",
        "mmt": "mmt_plus",
        "mmt-resume": "mmt_plus",
    }
    for name, path in files.items():
        model, checkpoint = reid.load_model(path)
        assert checkpoint["kind"] == expected_kinds[name] and checkpoint["format_version"] == 0
        assert model.arch == "resnet18" and model.classifier is None
        _assert_same_weights(model, network)
        inference, info = postprocess.load_model_for_inference(str(path))
        assert (info["height"], info["width"]) == (64, 32)
        _assert_same_weights(inference, network)
    # the source classifier comes back when its size is asked for (pretrain.py -> mmt_plus.py --init)
    model, _ = reid.load_model(files["pretrain"], num_classes=5)
    _assert_same_weights(model, network, skip_classifier=False)
    # as a trunk initialisation (pretrain.py --pretrained)
    trunk_init = reid.build_model("resnet18", num_classes=3, pretrained=str(files["pretrain-resume"]))
    for key, value in network.backbone.state_dict().items():
        assert torch.equal(trunk_init.backbone.state_dict()[key], value)


def test_legacy_rng_state_restores_exactly(network, tmp_path):
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    np.random.normal()  # numpy keeps a cached gaussian: part of the state
    path = _save_legacy(legacy_pretrain(network, resume=True), tmp_path / "checkpoint.pth")
    expected = (random.random(), np.random.normal(), np.random.random(), float(torch.rand(1)))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    reid.set_rng_state(reid.read_checkpoint(path)["rng"])
    assert (random.random(), np.random.normal(), np.random.random(), float(torch.rand(1))) == expected


def test_new_rng_state_is_plain_data_and_round_trips(tmp_path):
    np.random.seed(3)
    np.random.normal()
    state = reid.rng_state()
    path = tmp_path / "rng.pth"
    reid.save_checkpoint({"rng": state}, path, "pretrain")
    loaded = torch.load(path, weights_only=True)  # no allow-listed globals needed: tensors and plain data only
    expected = (random.random(), np.random.normal(), np.random.random(), float(torch.rand(1)))
    reid.set_rng_state(loaded["rng"])
    assert (random.random(), np.random.normal(), np.random.random(), float(torch.rand(1))) == expected


def test_legacy_camera_and_sda_files(network, tmp_path):
    camera_path = _save_legacy(legacy_camera(network), tmp_path / "camera.pth")
    model, info = postprocess.load_model_for_inference(str(camera_path), None, ("camera",), "--camera-checkpoint")
    _assert_same_weights(model, network)
    generators = sda.Generators(4, 1)
    for name in ("checkpoint.pt", "checkpoint.pth"):  # sda.py wrote .pt before
        path = _save_legacy(legacy_sda(generators), tmp_path / name)
        generator, architecture = sda.load_generator(path)
        assert architecture["ngf"] == 4
        expected = generators.source_to_target.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in generator.state_dict().items())


def test_a_stage_refuses_the_wrong_kind_of_file_by_name(network, tmp_path):
    reid_model = _save_legacy(legacy_pretrain(network, resume=False), tmp_path / "reid_model.pth")
    camera_model = tmp_path / "camera_model.pth"
    reid.save_checkpoint(legacy_camera(network), camera_model, "camera")
    with pytest.raises(ValueError, match=r"--camera-checkpoint .*reid_model\.pth: holds a pretrain\.py re-ID model"):
        postprocess.load_model_for_inference(str(reid_model), None, ("camera",), "--camera-checkpoint")
    with pytest.raises(ValueError, match=r"--checkpoints .*camera_model\.pth: holds a camera\.py camera classifier"):
        postprocess.load_model_for_inference(str(camera_model))
    with pytest.raises(ValueError, match=r"--pretrained .*camera_model\.pth: holds a camera\.py"):
        reid.build_model("resnet18", 3, pretrained=str(camera_model))
    with pytest.raises(ValueError, match=r"--checkpoint .*reid_model\.pth: holds a pretrain\.py re-ID model"):
        sda.load_generator(reid_model)


def test_saved_files_carry_kind_and_version_and_refuse_what_they_cannot_read(network, tmp_path):
    path = tmp_path / "model.pth"
    reid.save_checkpoint({"state_dict": network.state_dict(), "arch": "resnet18"}, path, "mmt_plus")
    raw = torch.load(path, weights_only=True)
    assert raw["kind"] == "mmt_plus" and raw["format_version"] == reid.CHECKPOINT_FORMAT
    assert not [p.name for p in tmp_path.iterdir() if p.name != "model.pth"]  # no temporary left
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        reid.save_checkpoint({}, tmp_path / "x.pth", "resnet")
    with pytest.raises(ValueError, match=r"\.pth files"):
        reid.save_checkpoint({}, tmp_path / "x.pt", "pretrain")
    newer = tmp_path / "newer.pth"
    torch.save({**raw, "format_version": reid.CHECKPOINT_FORMAT + 1}, newer)
    with pytest.raises(ValueError, match=r"newer\.pth: checkpoint format .* is newer"):
        reid.read_checkpoint(newer)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth: holds a list"):
        reid.read_checkpoint(tmp_path / "list.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth: cannot be read"):
        reid.read_checkpoint(tmp_path / "garbage.pth")
    with pytest.raises(FileNotFoundError, match=r"absent\.pth: no such file"):
        reid.read_checkpoint(tmp_path / "absent.pth")


class _Payload:
    """A pickle whose loading would run code (creates a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_code_is_refused_everywhere(network, tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": network.state_dict(), "arch": "resnet18", "args": _Payload(marker)}, evil)
    loaders = [
        lambda: reid.read_checkpoint(evil),
        lambda: reid.load_model(evil),
        lambda: reid.build_model("resnet18", 3, pretrained=str(evil)),
        lambda: postprocess.load_model_for_inference(str(evil)),
        lambda: sda.load_generator(evil),
    ]
    for load in loaders:
        with pytest.raises(ValueError, match=r"evil\.pth: refused"):
            load()
    assert not marker.exists()
