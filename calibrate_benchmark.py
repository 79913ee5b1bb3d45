"""Calibrate the embedded benchmark's domain gap with the project's own pre-training (pretrain.py).

Runs one pretrain.py job per (row, seed) as a subprocess, all from scratch with the same budget (--budget-scale
times the preset's epochs, 4 by default), and prints the table that docs/demo_data.md reports (synthetic
benchmark, target_val, mAP / top-1 at the last epoch):

    source_only                    labelled personX, BN adaptation on target_training, AutoAugment (the default)
    source_only_no_bn_adaptation   the same with --target none (no target images forwarded)
    source_only_no_autoaugment     the same with --no-autoaugment
    target_label_bound             DIAGNOSTICS ONLY: target_training with its true identities
                                   (pretrain.py --target-labels-upper-bound)
    perfect_translator             DIAGNOSTICS ONLY: the source jobs re-rendered by the target cameras
                                   (make_demo_data.py --translator-out), the ceiling of an image translator like SDA

Finished runs (a result.json whose command matches) are skipped, an interrupted one continues with --resume, and
the JSON is written to a temporary file and renamed, so the command can be repeated until it has every number:

    python calibrate_benchmark.py --data-root data/demo --generate --generator-seed 0 --runs-dir runs/calibration
    python calibrate_benchmark.py ... --launcher /work/bin/cpujob --parallel 2   # two jobs at a time
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent
# The stated calibration budget: 4x the demo pre-training (40 x 30 iterations of 64 images). See docs/demo_data.md
# for the ratio of source-only to the bound at 1x, 2x and 4x.
CALIBRATION_BUDGET_SCALE = 4
ROWS = (
    "source_only",
    "target_label_bound",
    "perfect_translator",
    "source_only_no_bn_adaptation",
    "source_only_no_autoaugment",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, required=True, help="the benchmark (make_demo_data.py --out)")
    parser.add_argument(
        "--translator-root",
        type=Path,
        help="the perfect-translator control (make_demo_data.py --translator-out); default: DATA_ROOT_translator",
    )
    parser.add_argument(
        "--generate",
        action="store_true",
        help="first generate the benchmark and its translator control with --generator-seed (skipped when both "
        "exist from that seed)",
    )
    parser.add_argument("--generator-seed", type=int, default=0, help="make_demo_data.py --seed")
    parser.add_argument("--generator-args", default="", help="extra make_demo_data.py flags (quoted string)")
    parser.add_argument("--runs-dir", type=Path, required=True, help="one pretrain.py logs dir per row and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="pretrain.py seeds (initialisations)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="rows to run")
    parser.add_argument("--preset", default="demo", help="pretrain.py --preset (the budget at --budget-scale 1)")
    parser.add_argument(
        "--budget-scale",
        type=int,
        default=CALIBRATION_BUDGET_SCALE,
        help="train every row for this many times the preset's epochs (milestones scaled alike, an evaluation every "
        "quarter): the calibration budget. At the demo preset's own budget (1) the target-label bound is limited by "
        "its 300 iterations, not by the data (docs/demo_data.md)",
    )
    parser.add_argument("--pretrain-args", default="", help="extra pretrain.py flags for every run (quoted string)")
    parser.add_argument("--launcher", default="", help="command prefix for each job (e.g. /work/bin/cpujob)")
    parser.add_argument("--parallel", type=int, default=1, help="jobs at a time")
    parser.add_argument("--out-json", type=Path, help="default: RUNS_DIR/benchmark_gap.json")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: write the JSON and table from the runs finished so far (null for the others)",
    )
    return parser.parse_args(argv)


def budget_flags(preset: str, scale: int) -> list[str]:
    """pretrain.py flags that train `scale` times the preset's epochs, its learning-rate milestones at the same
    fractions of the run, with an evaluation every quarter of it (none at scale 1: the preset as it is)."""
    if scale < 1:
        raise SystemExit(f"calibrate_benchmark.py: --budget-scale must be >= 1, got {scale}")
    if scale == 1:
        return []
    from pretrain import PRESETS  # the preset's budget, read from the one place that defines it

    if preset not in PRESETS:
        raise SystemExit(f"calibrate_benchmark.py: unknown --preset {preset!r} (pretrain.py has {sorted(PRESETS)})")
    epochs = PRESETS[preset]["epochs"] * scale
    milestones = [str(m * scale) for m in PRESETS[preset]["milestones"]]
    return ["--epochs", str(epochs), "--milestones", *milestones, "--eval-every", str(max(1, epochs // 4))]


def row_flags(row: str, data_root: Path, translator_root: Path) -> list[str]:
    """pretrain.py flags that define one row (everything else is shared)."""
    if row == "source_only":
        return ["--data-root", str(data_root), "--source", "personx"]
    if row == "source_only_no_bn_adaptation":
        return ["--data-root", str(data_root), "--source", "personx", "--target", "none"]
    if row == "source_only_no_autoaugment":
        return ["--data-root", str(data_root), "--source", "personx", "--no-autoaugment"]
    if row == "target_label_bound":
        return ["--data-root", str(data_root), "--target-labels-upper-bound"]
    if row == "perfect_translator":
        return ["--data-root", str(translator_root), "--target-root", str(data_root), "--source", "personx"]
    raise ValueError(f"unknown row {row!r}")


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(temp, path)


def generated_with_seed(root: Path, seed: int) -> bool:
    summary = root / "diagnostics" / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("seed") == seed


def generate(args: argparse.Namespace, translator_root: Path) -> None:
    if generated_with_seed(args.data_root, args.generator_seed) and (translator_root / "diagnostics").is_dir():
        print(f"[calibrate] benchmark in {args.data_root} (seed {args.generator_seed}) exists, not regenerated")
        return
    command = [sys.executable, str(REPO / "make_demo_data.py"), "--out", str(args.data_root)]
    command += ["--translator-out", str(translator_root), "--seed", str(args.generator_seed), "--overwrite"]
    command += ["--no-progress", *shlex.split(args.generator_args)]
    print("[calibrate]", shlex.join(command), flush=True)
    subprocess.run(shlex.split(args.launcher) + command, check=True)


def run_one(args: argparse.Namespace, row: str, seed: int, translator_root: Path) -> dict:
    """One pretrain.py job; returns its last-epoch target_val result (percent). With --collect: the finished
    result or, if there is none, {"row", "seed"} without numbers."""
    logs_dir = args.runs_dir / f"{row}-seed{seed}"
    command = [sys.executable, str(REPO / "pretrain.py"), "--preset", args.preset, "--seed", str(seed)]
    command += [*row_flags(row, args.data_root, translator_root), "--logs-dir", str(logs_dir)]
    command += budget_flags(args.preset, args.budget_scale) + shlex.split(args.pretrain_args)
    result_file = logs_dir / "result.json"
    if result_file.is_file():
        saved = json.loads(result_file.read_text())
        if saved.get("command") == command:
            return saved
        if not args.collect:
            print(f"[calibrate] {row} seed {seed}: finished with a different command, running again", flush=True)
    if args.collect:
        return {"row": row, "seed": seed}
    logs_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(logs_dir / "stdout.log", "a") as log:
        print(f"[calibrate] {row} seed {seed}: running (log {logs_dir / 'stdout.log'})", flush=True)
        subprocess.run(
            shlex.split(args.launcher) + command + ["--resume"], stdout=log, stderr=subprocess.STDOUT, check=True
        )
    records = [json.loads(line) for line in (logs_dir / "log.jsonl").read_text().splitlines()]
    done = [r for r in records if r.get("event") == "done"]
    # runs of older pretrain.py versions resumed after their last epoch wrote "last": null; their last evaluation is
    # the final epoch's record (every run evaluates its last epoch)
    evaluated = [r for r in records if r.get("event") == "epoch_end" and "val_mAP" in r]
    epochs = int(command[command.index("--epochs") + 1]) if "--epochs" in command else -1
    if done and not done[-1].get("last") and evaluated and evaluated[-1]["epoch"] + 1 == epochs:
        done[-1]["last"] = {"mAP": evaluated[-1]["val_mAP"], "top1": evaluated[-1]["val_top1"]}
    if not done or not done[-1].get("last"):
        raise RuntimeError(f"{logs_dir}/log.jsonl has no final evaluation")
    last = done[-1]["last"]
    saved = dict(
        row=row,
        seed=seed,
        mAP=round(100 * last["mAP"], 2),
        top1=round(100 * last["top1"], 2),
        seconds=round(time.time() - start, 1),
        command=command,
    )
    write_json_atomic(result_file, saved)
    print(f"[calibrate] {row} seed {seed}: mAP {saved['mAP']:.1f} top-1 {saved['top1']:.1f}", flush=True)
    return saved


def mean_spread(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "not run yet"
    if len(values) == 1:
        return f"{values[0]:.1f} (one seed)"
    mean = sum(values) / len(values)
    return f"{mean:.1f} ± {(max(values) - min(values)) / 2:.1f}"


def markdown_table(table: dict) -> str:
    """The calibration as a Markdown table: mean ± half the range over seeds, per-seed values, ratio to the bound."""
    rows = [key for key in ROWS if key in table]
    bound = table.get("target_label_bound")
    lines = [
        "| row | mAP (mean ± half-range) | top-1 | mAP per seed | mAP / bound |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        maps, top1 = table[row]["mAP"], table[row]["top1"]
        ratio = "-"
        pairs = [(v, b) for v, b in zip(maps, bound["mAP"], strict=True) if v is not None and b] if bound else []
        if pairs:  # over the seeds where both are finished
            ratio = f"{sum(v for v, _ in pairs) / sum(b for _, b in pairs):.2f}"
        per_seed = " / ".join("–" if v is None else f"{v:.1f}" for v in maps)
        lines.append(f"| `{row}` | {mean_spread(maps)} | {mean_spread(top1)} | {per_seed} | {ratio} |")
    return "\n".join(lines)


def code_commit() -> str:
    """The commit of the pretrain.py that ran (a COMMIT file beside a copied tree, else git)."""
    if (REPO / "COMMIT").is_file():
        return (REPO / "COMMIT").read_text().strip()
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    translator_root = args.translator_root or args.data_root.with_name(args.data_root.name + "_translator")
    if args.generate:
        generate(args, translator_root)
    for root, what in ((args.data_root, "benchmark"), (translator_root, "translator control")):
        if not (root / "diagnostics" / "summary.json").is_file():
            raise SystemExit(f"calibrate_benchmark.py: no finished {what} in {root} (use --generate)")
    # seed by seed, the source-only run and the bound first: the first results are the quick check of the gap
    jobs = [(row, seed) for seed in args.seeds for row in args.rows]
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        results = list(pool.map(lambda job: run_one(args, *job, translator_root), jobs))

    benchmark = json.loads((args.data_root / "diagnostics" / "summary.json").read_text())
    table: dict = {
        "meta": dict(
            benchmark="embedded synthetic benchmark (make_demo_data.py)",
            generator_seed=benchmark.get("seed"),
            generator_config=benchmark.get("config"),
            metric="target_val mAP and top-1 (percent) of the last epoch, Market protocol, pretrain.py evaluation",
            budget=shlex.join(
                ["pretrain.py", "--preset", args.preset, *budget_flags(args.preset, args.budget_scale)]
                + shlex.split(args.pretrain_args)
            ),
            budget_scale=args.budget_scale,
            initialisation="from scratch (random weights, the pretrain.py --seed), the same for every row",
            seeds=args.seeds,
            cpu=cpu_name(),
            code_commit=code_commit(),
        )
    }
    for row in args.rows:
        by_seed = {r["seed"]: r for r in results if r["row"] == row}
        table[row] = {
            "mAP": [by_seed[s].get("mAP") for s in args.seeds],
            "top1": [by_seed[s].get("top1") for s in args.seeds],
        }
    out_json = args.out_json or args.runs_dir / "benchmark_gap.json"
    write_json_atomic(out_json, table)

    print(f"\nsynthetic benchmark, target_val, {table['meta']['budget']}, seeds {args.seeds}\n")
    print(markdown_table(table))
    print(f"\n-> {out_json}")
    return table


if __name__ == "__main__":
    main()
