"""run_pipeline.sh and ablation_report.py. End to end on a tiny generated dataset (--tiny), including an
interruption: the pipeline is killed after its first training stage, re-run (finished stages are skipped, the rest
completes, in the seed's order), re-run once more (everything skipped, same results), then --ablation. The
report's mean +- spread and its JSON schema are checked against references written from their definitions."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ablation_report

REPO = Path(__file__).resolve().parents[1]
STAGE_SCRIPTS = ["make_demo_data.py", "pretrain.py", "sda.py", "mmt_plus.py", "camera.py", "postprocess.py"]

# stage name printed by run_pipeline.sh -> folder holding its DONE marker (--tiny, default --archs resnet18)
STAGE_FOLDERS = {
    "data": "data_done",
    "encoder": "encoder-personx-resnet18",
    "baseline": "baseline-mmt-resnet18",
    "sda": "sda",
    "translate": "translate_done",
    "pretrain-resnet18-1": "pretrain-personx_sda-resnet18-1",
    "pretrain-resnet18-2": "pretrain-personx_sda-resnet18-2",
    "mmt-resnet18": "mmt-resnet18",
    "camera": "camera",
    "post-val": "post-val",
    "post-test": "post-test",
}


def pipeline_command(work: Path) -> list[str]:
    return ["bash", str(REPO / "run_pipeline.sh"), "--tiny", "--work-dir", str(work), "--workers", "0"]


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHON"] = sys.executable
    env["OMP_NUM_THREADS"] = "1"  # see the thread note in test_camera.py
    return env


# the seed's order: raw-source pre-training -> clustering baseline -> SDA -> pre-training on translated images ->
# MMT+ -> camera model -> post-processing
STAGE_ORDER = ["encoder", "baseline", "sda", "translate", "pretrain-resnet18-1", "mmt-resnet18", "camera", "post-val"]


@pytest.mark.slow
def test_pipeline_end_to_end_with_interruption(tmp_path):
    missing = [name for name in STAGE_SCRIPTS if not (REPO / name).exists()]
    if missing:
        pytest.skip(f"stage scripts not in the repository yet: {', '.join(missing)}")
    work = tmp_path / "work"

    # 1. start, and interrupt once the first training stage (the SDA encoder) has finished
    process = subprocess.Popen(pipeline_command(work), cwd=REPO, env=environment(), start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if list(work.glob("encoder-*/DONE")):
            break
        time.sleep(0.5)
    interrupted = process.poll() is None
    if interrupted:
        os.killpg(process.pid, signal.SIGTERM)
    first_output = process.communicate(timeout=60)[0]
    assert interrupted, f"the pipeline ended before it could be interrupted:\n{first_output[-3000:]}"
    assert not (work / "post-val" / "DONE").exists()

    finished_before = {marker.parent.name for marker in work.glob("*/DONE")}
    assert "encoder-personx-resnet18" in finished_before and "post-val" not in finished_before

    # 2. re-run: stages finished before the interruption are skipped, the others run to the end
    start = time.time()
    second = subprocess.run(pipeline_command(work), cwd=REPO, env=environment(), capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-5000:]
    for stage, folder in STAGE_FOLDERS.items():
        expected = f"{stage}: finished before" if folder in finished_before else f"{stage}: done in"
        assert f"[pipeline] {expected}" in output, (stage, output[-3000:])
    second_seconds = time.time() - start
    combined = first_output + output
    started = [combined.find(f"[pipeline] {stage}: started") for stage in STAGE_ORDER]
    assert -1 not in started and started == sorted(started), list(zip(STAGE_ORDER, started, strict=True))
    # SDA's relation term gets the raw-source encoder and the clustering baseline's model as its two encoders
    sda_args = json.loads((work / "sda" / "args.json").read_text())
    assert sda_args["source_encoder"] == str(work / "encoder-personx-resnet18" / "model_best.pth")
    assert sda_args["target_encoder"] == str(work / "baseline-mmt-resnet18" / "model_best.pth")
    table = (work / "post-val" / "results.md").read_text()
    assert "(final)" in table and table.strip().split("\n")[-1] in output
    for name in ["encoder.log", "sda.log", "translate.log", "camera.log", "post-val.log", "post-test.log"]:
        assert (work / "stage_logs" / name).stat().st_size > 0, name
    translated = list((work / "data" / "personX_sda" / "image_train").glob("*.jpg"))
    raw = list((work / "data" / "personX" / "image_train").glob("*.jpg"))
    assert len(translated) == len(raw) > 0
    submission = (work / "post-test" / "result.txt").read_text().splitlines()
    test_queries = (work / "data" / "index_test_query.txt").read_text().splitlines()
    assert len(submission) == len([line for line in test_queries if line.strip()])
    assert (work / "post-test" / "result.zip").exists()

    # 3. another re-run skips every stage and prints the same table
    start = time.time()
    third = subprocess.run(pipeline_command(work), cwd=REPO, env=environment(), capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    assert "done in" not in third.stdout.replace("all stages done in", "")
    assert third.stdout.count("finished before") == len(STAGE_FOLDERS)
    assert table.strip().split("\n")[-1] in third.stdout
    assert time.time() - start < max(30.0, 0.5 * second_seconds)

    # 4. --ablation on the same work folder: the pipeline's stages are reused; the extra trainings and one
    #    evaluation per model and seed run; the report's rows are the evaluations' own numbers
    #    (--prune-resume-state: the stages it runs keep model_best.pth and drop their resume state)
    fourth = subprocess.run([*pipeline_command(work), "--ablation", "--prune-resume-state"], cwd=REPO,
                            env=environment(), capture_output=True, text=True, timeout=1800)  # fmt: skip
    output = fourth.stdout + fourth.stderr
    assert fourth.returncode == 0, output[-5000:]
    for folder in ["mmt-original-resnet18-seed1", "pretrain-personx-resnet18-2", "mmt-oracle-resnet18-seed2"]:
        assert (work / folder / "model_best.pth").is_file() and not (work / folder / "checkpoint.pth").exists()
    assert (work / "mmt-resnet18" / "checkpoint.pth").is_file()  # finished before this run: left as it was
    assert (work / "sda" / "checkpoint.pth").is_file()  # the translator is a result, never pruned
    assert output.count("finished before") >= len(STAGE_FOLDERS), output[-3000:]
    for stage in ["pretrain-raw-resnet18-1", "pretrain-raw-resnet18-2", "mmt-original-resnet18-seed1",
                  "mmt-original-resnet18-seed2", "mmt-resnet18-seed2", "encoder-resnet18_ibn",
                  "pretrain-resnet18_ibn-1", "pretrain-resnet18_ibn-2", "mmt-resnet18_ibn",
                  "mmt-resnet18_ibn-seed2", "mmt-oracle-resnet18-seed1", "pretrain-target-labels-resnet18-2",
                  "eval-raw_pretrain-1", "eval-sda_pretrain-2", "eval-mmt-1", "eval-mmt_plus-2",
                  "eval-ensemble-1", "eval-ensemble-2"]:  # fmt: skip
        assert f"[pipeline] {stage}: done in" in output, (stage, output[-3000:])
    report = json.loads((work / "ablation" / "ablation.json").read_text())
    check_report_schema(report, seeds=[1, 2])
    markdown = (work / "ablation" / "ablation.md").read_text()
    assert "mAP = full AP" in markdown and "±" in markdown
    # every row's values are its evaluations' numbers, seed by seed, in percent
    for row, folder, suffix in [("raw_pretrain", "eval-raw_pretrain", ""), ("mmt", "eval-mmt", ""),
                                ("mmt_plus_camera", "eval-mmt_plus", "_camera"),
                                ("ensemble_camera_rerank", "eval-ensemble", "_camera_rerank")]:  # fmt: skip
        for index, seed in enumerate([1, 2]):
            results = json.loads((work / "ablation" / f"{folder}-{seed}" / "results.json").read_text())
            variant = ablation_report.variant_rows(results)[suffix]
            assert report[row]["mAP"][index] == pytest.approx(100 * variant["mAP"], abs=0.006), (row, seed)
            assert report[row]["top1"][index] == pytest.approx(100 * variant["top1"], abs=0.006), (row, seed)
    # fairness: raw and SDA pre-training from the same encoder trunk with the same budget, seed by seed; MMT and
    # MMT+ from the same two SDA pre-trainings; the ensemble of two different backbones
    encoder = str(work / "encoder-personx-resnet18" / "model_best.pth")
    for seed in (1, 2):
        raw = json.loads((work / f"pretrain-personx-resnet18-{seed}" / "args.json").read_text())
        sda = json.loads((work / f"pretrain-personx_sda-resnet18-{seed}" / "args.json").read_text())
        assert raw["pretrained"] == sda["pretrained"] == encoder
        assert (raw["epochs"], raw["iters"], raw["seed"]) == (sda["epochs"], sda["iters"], sda["seed"]) == (1, 2, seed)
        ensemble = json.loads((work / "ablation" / f"eval-ensemble-{seed}" / "results.json").read_text())
        assert [model["arch"] for model in ensemble["models"]] == ["resnet18", "resnet18_ibn"]
    assert report["raw_pretrain"]["initialised_from"] == report["sda_pretrain"]["initialised_from"]
    assert report["mmt"]["initialised_from"] == report["mmt_plus"]["initialised_from"]
    assert report["mmt"]["budget"] == report["mmt_plus"]["budget"]
    claims = {(c["baseline"], c["method"]): c for c in report["meta"]["comparisons"]}
    assert claims[("raw_pretrain", "sda_pretrain")]["setting"] == "same init and budget"
    assert claims[("mmt", "mmt_plus")]["setting"] == "same init and budget"
    for single in ("mmt_plus_camera_rerank", "mmt_plus_resnet18_ibn_camera_rerank"):
        assert claims[(single, "ensemble_camera_rerank")]["setting"] == "a member of the ensemble, same seed"
    assert report["target_label_bound"]["kind"] == report["mmt_plus_oracle"]["kind"] == "diagnostic"
    # the perfect-translator control (where make_demo_data.py writes one): the same pre-training on the source
    # images rendered by the target cameras
    if "--translator-out" in (REPO / "make_demo_data.py").read_text():
        assert report["perfect_translator"]["kind"] == "diagnostic"
        # the first two seeds: a claim group may get a third seed automatically, the diagnostic does not
        assert report["perfect_translator"]["initialised_from"][:2] == report["sda_pretrain"]["initialised_from"][:2]
        args = json.loads((work / "pretrain-perfect-translator-resnet18-1" / "args.json").read_text())
        assert Path(args["data_root"]) == work / "data_translator" and Path(args["target_root"]) == work / "data"
    assert report["stage_seconds"]["eval-ensemble-2"] >= 0 and "baseline" in report["stage_seconds"]
    third = {name for name, row in report.items() if name not in ablation_report.NON_ROW_KEYS and 3 in row["seeds"]}
    groups = ablation_report.inconclusive_groups(json.loads(json.dumps(report)))  # after the third seed
    if "third seed" in output:  # the rows of the repeated groups got a third seed, no others
        assert third and not any(name.startswith(("target_label", "mmt_plus_oracle", "encoder")) for name in third)
    else:
        assert not third and not groups


def check_report_schema(report: dict, seeds: list[int]) -> None:
    """ablation.json: every row a top-level key with one mAP and one top-1 value per seed (percent), mean and
    spread recomputed here from their definitions; the required rows and stage_seconds present; a third seed
    only for the rows of the claims whose spread exceeded their effect."""
    for name in [*ablation_report.REQUIRED_ROWS, "stage_seconds"]:
        assert name in report, name
    assert all(isinstance(v, int) and v >= 0 for v in report["stage_seconds"].values())
    rows = {name: row for name, row in report.items() if name not in ablation_report.NON_ROW_KEYS}
    for name, row in rows.items():
        if name.startswith("encoder"):
            assert row["seeds"] == seeds[:1], name  # one run: the raw-source pre-training SDA starts from
        else:  # every seed, and a third where a claim's spread exceeded its effect
            assert row["seeds"] in (seeds, [*seeds, max(seeds) + 1]), (name, row["seeds"])
        for metric in ("mAP", "top1"):
            values = row[metric]
            assert len(values) == len(row["seeds"]) and all(0 <= v <= 100 for v in values), (name, values)
            mean = sum(values) / len(values)
            assert row["mean"][metric] == pytest.approx(mean, abs=0.006), name
            assert row["spread"][metric] == pytest.approx((max(values) - min(values)) / 2, abs=0.006), name
        assert row["kind"] in ("method", "diagnostic")


# ---------------------------------------------------------------------------------------------------------------
# ablation_report.py on made-up evaluations


def test_mean_and_spread_matches_definition():
    generator = random.Random(16)
    for _ in range(200):
        values = [generator.uniform(-50, 100) for _ in range(generator.randint(1, 6))]
        mean, spread = ablation_report.mean_and_spread(values)
        ordered = sorted(values)
        assert mean == pytest.approx(sum(ordered) / len(ordered), rel=1e-12, abs=1e-12)
        assert spread == pytest.approx((ordered[-1] - ordered[0]) / 2, rel=1e-12, abs=1e-12)
        assert ablation_report.mean_and_spread(list(reversed(values))) == pytest.approx((mean, spread))
    assert ablation_report.mean_and_spread([42.0]) == (42.0, 0.0)
    assert ablation_report.mean_and_spread([40.0, 50.0]) == (45.0, 5.0)
    assert ablation_report.format_mean_spread([40.0, 50.0, 45.0]) == "45.0 ± 5.0"
    with pytest.raises(ValueError):
        ablation_report.mean_and_spread([])


def _write_evaluation(folder: Path, models: list[Path], metrics: dict, ap_topk: int | None = None) -> None:
    """A postprocess.py --ablation results.json: per-model rows first (ensembles), then the four variants of all
    models; metrics maps (camera, rerank) -> (mAP, top1) as fractions."""
    rows = []
    if len(models) > 1:
        for model in models:
            rows.append({"models": [str(model)], "camera": True, "rerank": True, "mAP": 0.99, "top1": 0.99})
    for (camera, rerank), (m_ap, top1) in metrics.items():
        rows.append({"models": [str(m) for m in models], "camera": camera, "rerank": rerank, "mAP": m_ap,
                     "top1": top1, "ap_topk": ap_topk})  # fmt: skip
    folder.mkdir(parents=True)
    results = {"models": [{"path": str(m), "arch": "resnet18"} for m in models], "rows": rows, "final": rows[-1]}
    (folder / "results.json").write_text(json.dumps(results))


def _training_run(folder: Path, **args) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "args.json").write_text(json.dumps({"arch": "resnet18", **args}))
    (folder / "model_best.pth").write_bytes(b"")
    return folder / "model_best.pth"


def test_report_rows_schema_comparisons_and_metric(tmp_path):
    generator = random.Random(3)
    work = tmp_path / "work"
    encoder = _training_run(work / "encoder", epochs=10, iters=30, seed=1)
    evaluations, expected = [], {}
    variants = [(False, False), (False, True), (True, False), (True, True)]
    for seed in (1, 2):
        models = {}
        for kind in ("raw", "sda"):
            models[kind] = _training_run(
                work / f"{kind}-{seed}", pretrained=str(encoder), epochs=5, iters=30, seed=seed
            )
        inits = {"init_1": str(work / "sda-1" / "model_best.pth"), "init_2": str(work / "sda-2" / "model_best.pth")}
        models["mmt"] = _training_run(work / f"mmt-{seed}", epochs=3, iters=20, seed=seed, mode="mmt", **inits)
        models["mmt_plus"] = _training_run(work / f"mmtp-{seed}", epochs=3, iters=20, seed=seed, **inits)
        other = _training_run(work / f"ibn-{seed}", epochs=3, iters=20, seed=seed, **inits)
        for name, model_list in [("raw_pretrain", [models["raw"]]), ("sda_pretrain", [models["sda"]]),
                                 ("mmt", [models["mmt"]]), ("mmt_plus", [models["mmt_plus"]]),
                                 ("ensemble", [models["mmt_plus"], other])]:  # fmt: skip
            metrics = {v: (generator.uniform(0.1, 0.9), generator.uniform(0.1, 0.9)) for v in variants}
            folder = work / "ablation" / f"eval-{name}-{seed}"
            _write_evaluation(folder, model_list, metrics)
            evaluations.append((name, seed, folder))
            for variant, (m_ap, top1) in metrics.items():
                row = name + ablation_report.VARIANT_SUFFIXES[variant]
                expected.setdefault(row, {"mAP": [], "top1": []})
                expected[row]["mAP"].append(100 * m_ap)
                expected[row]["top1"].append(100 * top1)
    marker = work / "mmt-1" / "DONE"
    marker.write_text("finished 2026-01-01 00:00:00 UTC in 42 s\nstage:mmt-resnet18\ncommand: python x\n")
    (work / "raw-1" / "DONE").write_text("finished 2026-01-01 00:00:00 UTC in 7 s\ncommand: python y\n")

    report = ablation_report.write_report(work, evaluations, work / "ablation", "synthetic benchmark")
    assert json.loads((work / "ablation" / "ablation.json").read_text()) == report
    check_report_schema(report, seeds=[1, 2])
    assert set(report) - set(ablation_report.NON_ROW_KEYS) == set(expected)
    for row, values in expected.items():
        assert report[row]["mAP"] == pytest.approx(values["mAP"], abs=0.006), row
        assert report[row]["top1"] == pytest.approx(values["top1"], abs=0.006), row
    assert report["stage_seconds"] == {"mmt-resnet18": 42, "raw-1": 7}
    assert report["raw_pretrain"]["initialised_from"] == [["encoder"], ["encoder"]]

    # paired comparisons: effect = mean of the per-seed differences; verdict from their signs
    claims = {(c["baseline"], c["method"]): c for c in report["meta"]["comparisons"]}
    raw, sda = expected["raw_pretrain"]["mAP"], expected["sda_pretrain"]["mAP"]
    differences = [b - a for a, b in zip(raw, sda, strict=True)]
    claim = claims[("raw_pretrain", "sda_pretrain")]
    assert claim["effect"] == pytest.approx(sum(differences) / 2, abs=0.02)
    assert claim["spread"] == pytest.approx(max(abs(raw[0] - raw[1]), abs(sda[0] - sda[1])) / 2, abs=0.02)
    assert claim["spread_exceeds_effect"] == (claim["spread"] > abs(claim["effect"]))
    signs = {d > 0 for d in differences}
    assert claim["verdict"] == {
        frozenset({True}): "holds in every seed",
        frozenset({False}): "reversed in every seed",
    }.get(frozenset(signs), "mixed across seeds")
    assert claim["setting"] == "same init and budget"
    assert claims[("mmt", "mmt_plus")]["setting"] == "same init and budget"
    ensemble_claim = claims[("mmt_plus_camera_rerank", "ensemble_camera_rerank")]
    assert ensemble_claim["setting"] == "a member of the ensemble, same seed" and ensemble_claim["group"] == "ensemble"
    assert claims[("raw_pretrain", "sda_pretrain")]["group"] == "pretrain"

    markdown = (work / "ablation" / "ablation.md").read_text()
    assert "Metric: mAP = full AP" in markdown
    mean, spread = ablation_report.mean_and_spread(report["mmt_plus"]["mAP"])
    assert re.search(rf"\| `mmt_plus` \|[^\n]*\| {mean:.1f} ± {spread:.1f} \|", markdown)

    # one metric per report; a row without every required name is refused; a seed evaluated twice is refused
    mixed = work / "ablation" / "eval-mmt_plus_top100-1"
    _write_evaluation(mixed, [work / "mmtp-1" / "model_best.pth"], {(False, False): (0.5, 0.5)}, ap_topk=100)
    with pytest.raises(ValueError, match="different metrics"):
        ablation_report.write_report(work, [*evaluations, ("x", 1, mixed)], work / "ablation", "s")
    with pytest.raises(ValueError, match="missing"):
        ablation_report.write_report(work, evaluations[:3], work / "ablation", "s")
    with pytest.raises(ValueError, match="twice"):
        ablation_report.write_report(work, [*evaluations, evaluations[0]], work / "ablation", "s")


def test_inconclusive_groups_name_the_runs_to_repeat(tmp_path, capsys):
    def claim(group: str, effect: float, spread: float) -> dict:
        return {"group": group, "effect": effect, "spread": spread, "spread_exceeds_effect": spread > abs(effect)}

    report = {"meta": {"comparisons": [claim("mmt", 1.0, 2.0), claim("pretrain", -5.0, 1.0), claim("mmt", -3, 4),
                                       claim("ensemble", 0.5, 0.4)]}}  # fmt: skip
    assert ablation_report.inconclusive_groups(report) == ["mmt"]
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps(report))
    ablation_report.main(["--inconclusive-groups", str(path)])
    assert capsys.readouterr().out.strip() == "mmt"
    report["meta"]["comparisons"].append(claim("ensemble", 0.1, 0.3))
    path.write_text(json.dumps(report))
    ablation_report.main(["--inconclusive-groups", str(path)])
    assert capsys.readouterr().out.strip() == "ensemble mmt"
