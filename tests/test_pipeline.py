"""End-to-end test of run_pipeline.sh on a tiny generated dataset (--tiny), including an interruption: the
pipeline is killed after its first training stage, re-run (finished stages are skipped, the rest completes),
and re-run once more (everything skipped, same results)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGE_SCRIPTS = ["make_demo_data.py", "pretrain.py", "sda.py", "mmt_plus.py", "camera.py", "postprocess.py"]

pytestmark = pytest.mark.slow

# stage name printed by run_pipeline.sh -> folder holding its DONE marker (--tiny, default --archs resnet18)
STAGE_FOLDERS = {
    "data": "data_done",
    "encoder": "encoder-personx-resnet18",
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

    # 4. --ablation on the same work folder: the pipeline's stages are reused, only the extra trainings (raw
    #    pre-training seed 2, the original MMT) and the single-model evaluations run; the table's rows are the
    #    evaluations' own numbers
    fourth = subprocess.run([*pipeline_command(work), "--ablation"], cwd=REPO, env=environment(),
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    output = fourth.stdout + fourth.stderr
    assert fourth.returncode == 0, output[-5000:]
    assert output.count("finished before") == len(STAGE_FOLDERS), output[-3000:]
    for stage in ["pretrain-raw-resnet18-1", "pretrain-raw-resnet18-2", "mmt-original-resnet18",
                  "mmt-from-raw-resnet18", "eval-encoder", "eval-raw-1",
                  "eval-sda-2", "eval-mmt", "eval-mmt+-resnet18", "eval-mmt+-from-raw", "ensemble"]:  # fmt: skip
        assert f"[pipeline] {stage}: done in" in output, (stage, output[-3000:])
    ablation = (work / "ablation" / "ablation.md").read_text()
    for name, label in [("eval-mmt", "| MMT (`--mode mmt`) |"), ("eval-mmt+-resnet18", "| MMT+ |"),
                        ("eval-raw-2", "raw source images, seed 2 ("),
                        ("eval-encoder", "SDA's source encoder")]:  # fmt: skip
        final = json.loads((work / "ablation" / name / "results.json").read_text())["final"]
        row = next(line for line in ablation.splitlines() if label in line)
        assert f"| {100 * final['mAP']:.1f} | {100 * final['top1']:.1f} |" in row, (name, row)
    # with the demo preset the pre-trainings after the encoder start from its trunk; the encoder from random weights
    labels = ("SDA's source encoder", "raw source images, seed 1 (", "SDA-translated images, seed 2 (")
    rows = {label: next(line for line in ablation.splitlines() if label in line) for label in labels}
    assert "| random |" in rows["SDA's source encoder"], rows
    assert "| the encoder's trunk |" in rows["raw source images, seed 1 ("], rows
    assert "| the encoder's trunk |" in rows["SDA-translated images, seed 2 ("], rows
    encoder = str(work / "encoder-personx-resnet18" / "model_best.pth")
    assert json.loads((work / "pretrain-personx_sda-resnet18-1" / "args.json").read_text())["pretrained"] == encoder
    epoch_1 = next(line for line in ablation.splitlines() if line.startswith("| 1 |")).split("|")[1:-1]
    assert epoch_1[1].strip().isdigit() and epoch_1[7].strip().isdigit(), epoch_1  # clusters of MMT and MMT+
    assert float(epoch_1[5]) > 0 and float(epoch_1[11]) > 0, epoch_1  # camera purity of MMT and MMT+ clusters
    assert "TRUE_CAMERA_PURITY" not in ablation
    for stage in ["mmt-oracle-resnet18", "pretrain-target-labels-resnet18", "eval-mmt+-oracle", "eval-target-labels"]:
        assert f"[pipeline] {stage}: done in" in output, (stage, output[-3000:])
    assert "TRUE identities as pseudo labels (diagnostics only)" in ablation
    assert "(final)" in ablation and "| ensemble (final) | 2 |" in ablation
