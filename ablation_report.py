"""Collects the evaluations of `run_pipeline.sh --ablation` into one table and one JSON file.

Every evaluation is a `postprocess.py --ablation` folder (results.json) of one model, or of an ensemble, for one
seed. Each yields up to four rows, one per post-processing variant: NAME (the model alone), NAME_rerank,
NAME_camera, NAME_camera_rerank. A row holds one value per seed; the table shows mean +- spread, where spread is
half the range (max - min) / 2 of the seeds' values. The seed's claims become paired comparisons (same seeds on
both sides); each says whether both sides started from the same initialisation with the same budget (read from
the training runs' args.json) and whether the spread exceeds the effect (then a third seed is due).

    python ablation_report.py --work runs/pipeline --eval raw_pretrain 1 runs/pipeline/ablation/eval-raw_pretrain-1 ...

Writes WORK/ablation/ablation.md and WORK/ablation/ablation.json:
    {ROW: {"mAP": [percent per seed], "top1": [...], "seeds": [...], "mean": {...}, "spread": {...}, ...},
     ..., "stage_seconds": {STAGE: seconds}, "meta": {"metric": ..., "spread": ..., ...}}
"""

import argparse
import json
import re
import sys
from pathlib import Path

# rows every complete ablation holds (the seed's Tables 2-4); others are added when evaluated
REQUIRED_ROWS = (
    "raw_pretrain",
    "sda_pretrain",
    "mmt",
    "mmt_plus",
    "mmt_plus_camera",
    "mmt_plus_camera_rerank",
    "ensemble_camera_rerank",
)
# keys of ablation.json that are not rows
NON_ROW_KEYS = ("stage_seconds", "meta")

# evaluated model -> (what it is, method or diagnostic); variants append their post-processing to the label
MODEL_LABELS = {
    "encoder": ("pre-trained on raw source images from random weights: SDA's source encoder", "method"),
    "raw_pretrain": ("pre-trained on raw source images", "method"),
    "sda_pretrain": ("pre-trained on SDA-translated images", "method"),
    "mmt": ("original MMT (`mmt_plus.py --mode mmt`)", "method"),
    "mmt_plus": ("MMT+", "method"),
    "ensemble": ("ensemble of the MMT+ backbones", "method"),
    "target_label_bound": ("pre-trained on target_train WITH its identity labels", "diagnostic"),
    "perfect_translator": (
        "pre-trained on perfectly translated source images (generator's target cameras)",
        "diagnostic",
    ),
    "mmt_plus_oracle": ("MMT+ with the TRUE identities as pseudo labels", "diagnostic"),
}
VARIANT_SUFFIXES = {
    (False, False): "",
    (False, True): "_rerank",
    (True, False): "_camera",
    (True, True): "_camera_rerank",
}
VARIANT_LABELS = {
    "": "alone",
    "_rerank": "+ re-ranking",
    "_camera": "+ camera term",
    "_camera_rerank": "+ camera term + re-ranking",
}


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean of the seeds' values and the spread: half their range, (max - min) / 2 (0 for one value)."""
    if not values:
        raise ValueError("mean_and_spread: no values")
    return sum(values) / len(values), (max(values) - min(values)) / 2


def format_mean_spread(values: list[float]) -> str:
    mean, spread = mean_and_spread(values)
    return f"{mean:.1f} ± {spread:.1f}"


def metric_name(ap_topk: int | None) -> str:
    if ap_topk is None:
        return "mAP = full AP (every gallery rank), top-1 = CMC rank 1, both in %"
    return f"mAP = AP truncated to the top-{ap_topk} ranks (the VisDA-2020 server's metric), top-1 = CMC rank 1, in %"


def variant_rows(results: dict) -> dict[str, dict]:
    """suffix -> results row for the variants that use every model of the evaluation (single-model rows of an
    ensemble evaluation are left out: those models have their own evaluations)."""
    every_model = len(results["models"])
    rows = {}
    for row in results["rows"]:
        if len(row["models"]) != every_model or "mAP" not in row:
            continue
        rows[VARIANT_SUFFIXES[(bool(row["camera"]), bool(row["rerank"]))]] = row
    return rows


def run_arguments(model_path: str) -> dict | None:
    """The arguments of the training run that wrote a checkpoint: its folder's args.json, else the arguments
    logged at the start of its log.jsonl (mmt_plus.py)."""
    run = Path(model_path).parent
    if (run / "args.json").is_file():
        return json.loads((run / "args.json").read_text())
    if (run / "log.jsonl").is_file():
        for line in (run / "log.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "start" and isinstance(record.get("args"), dict):
                return record["args"]
    return None


def training_run(model_path: str) -> dict:
    """Initialisation, budget and seed of the training run that wrote a checkpoint."""
    run = Path(model_path).parent
    args = run_arguments(model_path)
    if args is None:
        return {"run": run.name, "init": "?", "budget": "?", "seed": None, "path": model_path}
    if args.get("init_1"):  # mmt_plus.py: its two initialisations
        init = " + ".join(Path(args[key]).parent.name for key in ("init_1", "init_2"))
    else:  # pretrain.py
        init = Path(args["pretrained"]).parent.name if args.get("pretrained") else "random"
    budget = f"{args.get('epochs')} x {args.get('iters')} it."
    budget_and_seed = {"budget": budget, "seed": args.get("seed"), "arch": args.get("arch")}
    return {"run": run.name, "init": init, **budget_and_seed, "path": model_path}


def collect_rows(evaluations: list[tuple[str, int, Path]]) -> tuple[dict, int | None]:
    """(rows, ap_topk) from (model, seed, evaluation folder) triples; refuses evaluations with different metrics
    (a report compares one metric) and a model evaluated twice for one seed."""
    rows: dict[str, dict] = {}
    metrics = set()
    for model, seed, folder in evaluations:
        results_file = folder / "results.json"
        if not results_file.is_file():
            raise FileNotFoundError(f"{results_file}: missing (evaluation of {model}, seed {seed})")
        results = json.loads(results_file.read_text())
        runs = [training_run(info["path"]) for info in results["models"]]
        for suffix, result in variant_rows(results).items():
            metrics.add(result.get("ap_topk"))
            name = model + suffix
            row = rows.setdefault(name, {"mAP": [], "top1": [], "seeds": [], "model": model, "variant": suffix})
            if seed in row["seeds"]:
                raise ValueError(f"{name}: seed {seed} evaluated twice ({folder})")
            row["seeds"].append(seed)
            row["mAP"].append(round(100 * result["mAP"], 2))
            row["top1"].append(round(100 * result["top1"], 2))
            row.setdefault("runs", []).append(runs)
    if len(metrics) > 1:
        raise ValueError(f"evaluations use different metrics (ap_topk {sorted(metrics, key=str)}): one per report")
    for row in rows.values():
        label, kind = MODEL_LABELS.get(row["model"], (row["model"], "method"))
        if row["model"] not in MODEL_LABELS and row["model"].startswith("mmt_plus_"):  # another backbone's MMT+
            label = f"MMT+ {row['model'].removeprefix('mmt_plus_')}"
        archs = [run.get("arch") for run in row["runs"][0]]
        label += f" ({' + '.join(archs)})" if all(archs) else ""
        row["label"] = f"{label}, {VARIANT_LABELS[row['variant']]}"
        row["kind"] = kind
        for metric in ("mAP", "top1"):
            mean, spread = mean_and_spread(row[metric])
            row.setdefault("mean", {})[metric] = round(mean, 2)
            row.setdefault("spread", {})[metric] = round(spread, 2)
    return rows, (metrics.pop() if metrics else None)


def pseudo_label_quality(rows: dict) -> list[str]:
    """Markdown lines: per MMT epoch, the clusters' quality against the benchmark's identities and the better
    teacher's val mAP, mean +- spread over the seeds, for the MMT, MMT+ and true-label MMT+ rows."""
    lines = []
    for name in ("mmt", "mmt_plus", "mmt_plus_oracle"):
        if name not in rows:
            continue
        per_epoch: dict[int, dict[str, list[float]]] = {}
        for runs in rows[name]["runs"]:
            log = Path(runs[0]["path"]).parent / "log.jsonl"
            if not log.is_file():
                continue
            for line in log.read_text().splitlines():
                record = json.loads(line)
                if "epoch" not in record or "val" not in record:
                    continue
                cells = per_epoch.setdefault(record["epoch"], {})
                cells.setdefault("val mAP", []).append(max(100 * t["mAP"] for t in record["val"]))
                if "clusters" in record:
                    cells.setdefault("clusters", []).append(record["clusters"])
                    cells.setdefault("outliers %", []).append(100 * record["outlier_fraction"])
                for key in ("purity", "camera_purity", "true_camera_purity"):
                    if key in record.get("pseudo_labels", {}):
                        cells.setdefault(key.replace("_", " "), []).append(record["pseudo_labels"][key])
        if not per_epoch:
            continue
        columns = ["clusters", "outliers %", "purity", "camera purity", "true camera purity", "val mAP"]
        lines += ["", f"`{name}` (epoch 0: the initial teachers):", "", "| epoch | " + " | ".join(columns) + " |"]
        lines.append("|---" * (len(columns) + 1) + "|")
        for epoch in sorted(per_epoch):
            cells = per_epoch[epoch]
            values = [
                (f"{mean_and_spread(cells[c])[0]:.3g} ± {mean_and_spread(cells[c])[1]:.2g}" if c in cells else "-")
                for c in columns
            ]
            lines.append(f"| {epoch} | " + " | ".join(values) + " |")
    if lines:
        lines = [
            "",
            "### Pseudo labels per MMT epoch (target training set, against the benchmark's identities)",
            "",
            "Purity: share of clustered images in their cluster's most common identity. Camera purity: share in its "
            "most common camera; true camera purity: the same for the true identities of those images (clusters "
            "more camera-pure than that group images by camera look). Val mAP: the better mean teacher, no flip. "
            "Mean ± spread over the seeds.",
            *lines,
        ]
    return lines


def stage_seconds(work: Path) -> dict[str, int]:
    """Seconds of every finished stage, from the DONE markers run_pipeline.sh writes."""
    finished = []
    for marker in [*work.glob("*/DONE"), *work.glob("*/*/DONE")]:
        text = marker.read_text()
        found = re.search(r"^finished (.*) in (\d+) s$", text, re.MULTILINE)
        if not found:
            continue
        stage = re.search(r"^stage:(.+)$", text, re.MULTILINE)
        finished.append((found.group(1), stage.group(1) if stage else marker.parent.name, int(found.group(2))))
    return {stage: seconds for _, stage, seconds in sorted(finished)}  # in the order they finished


def fairness(a: dict, b: dict) -> str:
    """Whether two rows' models come from the same initialisations with the same budgets, seed by seed (for an
    ensemble: whether the other row's model is one of its members)."""

    def settings(row: dict) -> list[list[tuple]]:
        return [sorted((run["init"], run["budget"]) for run in runs) for runs in row["runs"]]

    common = [seed for seed in a["seeds"] if seed in b["seeds"]]
    first = [settings(a)[a["seeds"].index(seed)] for seed in common]
    second = [settings(b)[b["seeds"].index(seed)] for seed in common]
    if first == second:
        return "same init and budget"

    def paths(row: dict, seed: int) -> list[str]:
        return [run["path"] for run in row["runs"][row["seeds"].index(seed)]]

    if all(len(paths(a, seed)) == 1 and paths(a, seed)[0] in paths(b, seed) for seed in common):
        return "a member of the ensemble, same seed"
    return "init or budget differ"


def compare(rows: dict, baseline: str, method: str, claim: str) -> dict | None:
    """Paired comparison of two rows over their common seeds (mAP): effect = mean of the per-seed differences."""
    if baseline not in rows or method not in rows:
        return None
    a, b = rows[baseline], rows[method]
    seeds = [seed for seed in a["seeds"] if seed in b["seeds"]]
    differences = [b["mAP"][b["seeds"].index(s)] - a["mAP"][a["seeds"].index(s)] for s in seeds]
    effect, _ = mean_and_spread(differences)
    spread = max(mean_and_spread(a["mAP"])[1], mean_and_spread(b["mAP"])[1])
    if all(d > 0 for d in differences):
        verdict = "holds in every seed"
    elif all(d < 0 for d in differences):
        verdict = "reversed in every seed"
    else:
        verdict = "mixed across seeds"
    return {
        "claim": claim,
        "baseline": baseline,
        "method": method,
        "seeds": seeds,
        "differences": [round(d, 2) for d in differences],
        "effect": round(effect, 2),
        "spread": round(spread, 2),
        "spread_exceeds_effect": spread > abs(effect),
        "verdict": verdict,
        "setting": fairness(a, b),
    }


def comparisons(rows: dict) -> list[dict]:
    """The seed's claims that the rows can test, each tagged with the group of runs (run_pipeline.sh's
    ablation_seed) that a third seed would repeat."""
    claims = [
        ("raw_pretrain", "sda_pretrain", "SDA translation beats raw source for pre-training (Table 2)", "pretrain"),
        ("mmt", "mmt_plus", "MMT+ beats MMT, each model alone", "mmt"),
        ("mmt_camera_rerank", "mmt_plus_camera_rerank", "MMT+ beats MMT with post-processing (Table 3)", "mmt"),
        ("mmt_plus", "mmt_plus_camera", "the camera term helps", "mmt"),
        ("mmt_plus", "mmt_plus_rerank", "re-ranking helps", "mmt"),
        ("mmt_plus_camera", "mmt_plus_camera_rerank", "re-ranking helps after the camera term", "mmt"),
    ]
    for name, row in rows.items():  # each backbone's MMT+ alone vs the ensemble, all post-processing on
        if row["variant"] == "_camera_rerank" and name.startswith("mmt_plus") and row["kind"] == "method":
            claims.append((name, "ensemble_camera_rerank", f"the ensemble beats `{name}` (Table 4)", "ensemble"))
    found = []
    for baseline, method, claim, group in claims:
        comparison = compare(rows, baseline, method, claim)
        if comparison is not None:
            found.append({**comparison, "group": group})
    return found


def inconclusive_groups(report: dict) -> list[str]:
    """Groups of runs whose claims have a larger spread than effect (they get a third seed)."""
    groups = [c["group"] for c in report["meta"]["comparisons"] if c["spread_exceeds_effect"]]
    return sorted(set(groups))


def markdown(rows: dict, found: list[dict], ap_topk: int | None, seconds: dict, benchmark: str) -> str:
    def cells(row: dict) -> str:
        seeds = ", ".join(f"{m:.1f}" for m in row["mAP"])
        init = "; ".join(sorted({f"{run['init']} ({run['budget']})" for runs in row["runs"] for run in runs}))
        return (
            f"{format_mean_spread(row['mAP'])} | {format_mean_spread(row['top1'])} | {seeds} | "
            f"{', '.join(map(str, row['seeds']))} | {init}"
        )

    header = "| row | model | mAP | top-1 | mAP per seed | seeds | initialised from (budget) |\n" + "|---" * 7 + "|"
    lines = [
        f"## Ablation ({benchmark})",
        "",
        f"Metric: {metric_name(ap_topk)}; target_val. Each cell: mean ± spread over the seeds, spread = half the "
        "range (max − min) / 2. Same seed = same pre-training seed (pre-training rows) or the same MMT training "
        "seed from the same two initialisations (MMT rows).",
        "",
        "### Method rows",
        "",
        header,
    ]
    lines += [f"| `{name}` | {row['label']} | {cells(row)} |" for name, row in rows.items() if row["kind"] == "method"]
    diagnostics = [(name, row) for name, row in rows.items() if row["kind"] == "diagnostic"]
    if diagnostics:
        lines += ["", "### Diagnostics (they read ground truth: comparisons for the method rows, never inputs)", ""]
        lines += [header] + [f"| `{name}` | {row['label']} | {cells(row)} |" for name, row in diagnostics]
    lines += [
        "",
        "### The seed's claims, paired by seed (mAP)",
        "",
        "Effect: mean of the per-seed differences (method − baseline). Inconclusive where the larger spread of "
        "the two rows exceeds the effect: rerun with a third seed (`run_pipeline.sh --ablation --ablation-seeds "
        '"1 2 3"`).',
        "",
        "| claim | baseline → method | per-seed differences | effect | larger spread | verdict | setting |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in found:
        verdict = c["verdict"] + ("; inconclusive: spread > effect" if c["spread_exceeds_effect"] else "")
        differences = ", ".join(f"{d:+.1f}" for d in c["differences"])
        lines.append(
            f"| {c['claim']} | `{c['baseline']}` → `{c['method']}` | {differences} | {c['effect']:+.1f} | "
            f"{c['spread']:.1f} | {verdict} | {c['setting']} |"
        )
    lines += pseudo_label_quality(rows)
    if seconds:
        total = sum(seconds.values())
        lines += ["", f"### Stage times (s, from the DONE markers; total {total} s = {total / 60:.1f} min)", ""]
        lines.append(", ".join(f"{stage} {value}" for stage, value in seconds.items()))
    return "\n".join(lines) + "\n"


def write_report(
    work: Path, evaluations: list[tuple[str, int, Path]], out: Path, benchmark: str, require_all: bool = True
) -> dict:
    """Writes OUT/ablation.json and OUT/ablation.md; returns the JSON object."""
    rows, ap_topk = collect_rows(evaluations)
    missing = [name for name in REQUIRED_ROWS if name not in rows]
    if require_all and missing:
        raise ValueError(f"ablation rows missing: {', '.join(missing)}")
    found = comparisons(rows)
    seconds = stage_seconds(work)
    report = {name: {key: value for key, value in row.items() if key != "runs"} for name, row in rows.items()}
    for name, row in rows.items():
        report[name]["initialised_from"] = [[run["init"] for run in runs] for runs in row["runs"]]
        report[name]["budget"] = [[run["budget"] for run in runs] for runs in row["runs"]]
    report["stage_seconds"] = seconds
    report["meta"] = {
        "metric": metric_name(ap_topk),
        "ap_topk": ap_topk,
        "spread": "half the range of the seeds' values, (max - min) / 2",
        "benchmark": benchmark,
        "comparisons": found,
    }
    # imported here, not at the top: reid imports torch (6.6 s and 0.8 GB measured on the loaded 2-core EPYC, vs
    # 0.08 s for this script), which reading a report (--inconclusive-groups) does not need
    import reid

    reid.atomic_write_text(out / "ablation.json", json.dumps(report, indent=1) + "\n")
    reid.atomic_write_text(out / "ablation.md", markdown(rows, found, ap_topk, seconds, benchmark))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="run_pipeline.sh work folder (stage times from its DONE markers)")
    parser.add_argument("--out", help="output folder (default: WORK/ablation)")
    parser.add_argument(
        "--eval",
        nargs=3,
        action="append",
        default=[],
        metavar=("MODEL", "SEED", "FOLDER"),
        help="a postprocess.py --ablation folder: the model (row prefix), its seed, the folder; repeat",
    )
    parser.add_argument("--benchmark", default="synthetic benchmark", help="data named in the title")
    parser.add_argument("--allow-missing", action="store_true", help="do not require every row of REQUIRED_ROWS")
    parser.add_argument(
        "--inconclusive-groups",
        metavar="ABLATION_JSON",
        help="only print the groups of runs whose claims in ABLATION_JSON have a spread larger than their effect",
    )
    args = parser.parse_args(argv)
    if args.inconclusive_groups:
        print(" ".join(inconclusive_groups(json.loads(Path(args.inconclusive_groups).read_text()))))
        return
    if not args.work:
        parser.error("--work is required")
    evaluations = []
    for model, seed, folder in args.eval:
        if not seed.lstrip("-").isdigit():
            parser.error(f"--eval {model} {seed} {folder}: the seed must be an integer")
        evaluations.append((model, int(seed), Path(folder)))
    work = Path(args.work)
    out = Path(args.out) if args.out else work / "ablation"
    try:
        write_report(work, evaluations, out, args.benchmark, require_all=not args.allow_missing)
    except (OSError, ValueError, KeyError) as error:
        sys.exit(f"ablation_report.py: {error}")
    print((out / "ablation.md").read_text())


if __name__ == "__main__":
    main()
