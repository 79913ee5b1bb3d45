"""Training curves (reid.curve_series / reid.write_curves): every training stage redraws curves.png from its
log.jsonl at each evaluation. The series are checked against the records they were built from; the picture is
checked to be a real PNG of the figure's size, also for a run with no evaluation yet, an empty log and a torn last
line."""

import json
import random

import numpy as np
import pytest
from PIL import Image

import reid

pytest.importorskip("matplotlib")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def write_log(path, records, torn_tail: bool = False):
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        if torn_tail:
            handle.write('{"epoch": 3, "iteration": 1, "loss": 0.')  # a run killed while writing


def pretrain_records(rng: random.Random, epochs: int, iters: int, evaluated: bool = True) -> list[dict]:
    """Records as pretrain.py writes them: start, one per iteration (epoch from 0), one 'epoch_end' per epoch."""
    records = [{"event": "start", "num_classes": 12, "args": {"iters": iters}}]
    for epoch in range(epochs):
        for iteration in range(iters):
            records.append(
                {
                    "epoch": epoch,
                    "iteration": iteration,
                    "loss": rng.uniform(1, 5),
                    "ce": rng.uniform(1, 4),
                    "triplet": rng.uniform(0.01, 1),
                    "accuracy": rng.random(),
                }
            )
        end = {"epoch": epoch, "event": "epoch_end", "loss": 2.0, "ce": 1.5, "triplet": 0.5, "accuracy": 0.5}
        if evaluated:
            end.update(val_mAP=rng.random(), val_top1=rng.random(), val_top5=rng.random())
        records.append(end)
    return records


def check_png(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 300 and height >= 200
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 1  # something is drawn


def test_pretrain_series_follow_the_records(tmp_path):
    rng = random.Random(7)
    epochs, iters = 3, 5
    records = pretrain_records(rng, epochs, iters)
    series = reid.curve_series(records, iters_per_epoch=iters)
    # training curves from the per-iteration records only, at epoch + (iteration + 1) / iters
    iteration_records = [r for r in records if "iteration" in r]
    x, y = series["losses"]["triplet"]
    assert x == [r["epoch"] + (r["iteration"] + 1) / iters for r in iteration_records]
    assert y == [r["triplet"] for r in iteration_records]
    assert series["accuracy"]["train accuracy"][1] == [r["accuracy"] for r in iteration_records]
    # validation at the number of epochs finished (pretrain.py's epoch_end counts from 0)
    ends = [r for r in records if r.get("event") == "epoch_end"]
    assert series["accuracy"]["val mAP"] == ([1.0, 2.0, 3.0], [r["val_mAP"] for r in ends])
    assert series["accuracy"]["val top1"][1] == [r["val_top1"] for r in ends]
    assert "diagnostics" not in series
    assert not any("num classes" in name for panel in series.values() for name in panel)
    # iters guessed from the log when not given
    assert reid.curve_series(records)["losses"]["loss"][0][-1] == pytest.approx(epochs)


def test_mmt_and_camera_epoch_records():
    rng = random.Random(3)
    mmt = [{"event": "start", "args": {}, "num_target_images": 40}, {"epoch": 0, "event": "initial", "val": []}]
    mmt[1]["val"] = [{"mAP": rng.random(), "top1": rng.random()} for _ in range(2)]
    for epoch in (1, 2):
        mmt.append(
            {
                "epoch": epoch,
                "clusters": 9,
                "outlier_fraction": rng.random(),
                "pseudo_labels": {"nmi": rng.random(), "purity": rng.random()},
                "losses": {"ce": rng.uniform(1, 3), "soft_triplet": rng.random(), "precision": rng.random()},
                "lr": 3.5e-4,
                "val": [{"mAP": rng.random(), "top1": rng.random()} for _ in range(2)],
                "best_mAP": 0.5,
                "seconds": 3.0,
            }
        )
    series = reid.curve_series(mmt)
    assert series["accuracy"]["val mAP (teacher 2)"] == ([0.0, 1.0, 2.0], [r["val"][1]["mAP"] for r in mmt[1:]])
    assert series["losses"]["soft triplet"] == ([1.0, 2.0], [r["losses"]["soft_triplet"] for r in mmt[2:]])
    assert series["accuracy"]["train precision"][1] == [r["losses"]["precision"] for r in mmt[2:]]
    assert series["diagnostics"]["pseudo-label nmi"][1] == [r["pseudo_labels"]["nmi"] for r in mmt[2:]]
    assert series["diagnostics"]["outlier fraction"][1] == [r["outlier_fraction"] for r in mmt[2:]]
    names = {name for panel in series.values() for name in panel}
    assert not names & {"lr", "clusters", "seconds", "best mAP", "num target images"}

    camera = [{"epoch": e, "lr": 1e-3, "loss": 1.0 / e, "train_accuracy": 0.1 * e} for e in (1, 2, 3)]
    camera[-1].update(val_camera_accuracy=0.7, best_val_camera_accuracy=0.7)
    series = reid.curve_series(camera)
    assert series["losses"] == {"loss": ([1.0, 2.0, 3.0], [1.0, 0.5, 1.0 / 3])}
    assert series["accuracy"]["val camera accuracy"] == ([3.0], [0.7])
    assert series["accuracy"]["train accuracy"][1] == pytest.approx([0.1, 0.2, 0.3])


def test_curves_png_is_written_atomically_and_redrawn(tmp_path):
    log = tmp_path / "log.jsonl"
    write_log(log, pretrain_records(random.Random(1), 2, 150), torn_tail=True)
    path = reid.write_curves(log, title="pretrain", iters_per_epoch=150)
    assert path == tmp_path / reid.CURVES_NAME
    check_png(path)
    first = path.read_bytes()
    write_log(log, pretrain_records(random.Random(2), 3, 150))  # the next evaluation redraws it
    reid.write_curves(log, iters_per_epoch=150)
    check_png(path)
    assert path.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "log.jsonl"]  # no temporary left


@pytest.mark.parametrize("case", ["no_evaluation", "empty_log", "no_log", "sda_fidelity"])
def test_curves_without_evaluation_or_records(tmp_path, case):
    log = tmp_path / "log.jsonl"
    if case == "no_evaluation":
        write_log(log, pretrain_records(random.Random(4), 1, 6, evaluated=False))
    elif case == "empty_log":
        log.write_text("")
    elif case == "sda_fidelity":
        write_log(
            log,
            [
                {"g_total": 3.0, "d_target": 0.3, "epoch": 0, "iteration": i, "step": i + 1, "lr": 2e-4}
                | ({"fidelity_identity_drift": 0.2, "fidelity_style_gap": 0.8} if i % 4 == 3 else {})
                for i in range(8)
            ],
        )
        series = reid.curve_series(reid.read_log_records(log))
        assert series["diagnostics"]["style gap"] == ([0.5, 1.0], [0.8, 0.8])
        assert set(series["losses"]) == {"g total", "d target"}
    out = tmp_path / "figures" / "curves.png"
    assert reid.write_curves(log, out_path=out) == out
    check_png(out)


def test_every_training_stage_draws_its_curves(tmp_path, tiny_data_root, pretrained_run):
    """One-iteration runs of each training stage on the tiny benchmark leave a curves.png drawn from their log."""
    import safety_helpers

    import camera
    import mmt_plus
    import sda

    check_png(pretrained_run / "curves.png")
    init = pretrained_run / "model_best.pth"
    runs = {
        "camera": (camera, safety_helpers.camera_argv(tiny_data_root, tmp_path / "camera")),
        "mmt_plus": (
            mmt_plus,
            safety_helpers.mmt_argv(tiny_data_root, tmp_path / "mmt_plus", init, init, "--eps", "0.45"),
        ),
        "sda": (sda, safety_helpers.sda_argv(tiny_data_root, tmp_path / "sda", init)),
    }
    for name, (stage, argv) in runs.items():
        stage.main(argv)
        check_png(tmp_path / name / "curves.png")
