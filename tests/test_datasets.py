"""Datasets beyond the VisDA-2020 layout: Market-1501, DukeMTMC-reID and MSMT17 trees built from the embedded
benchmark's images (renamed to each dataset's convention), the generic list dataset, the --source/--target/--val
arguments every stage shares, the refusals (label leaks, wrong layouts, paths escaping their root, duplicate
lines, unreadable images) and the Market -> Duke chain pretrain.py -> mmt_plus.py -> postprocess.py.

Expected counts are computed here from the files the builders write, not by the readers under test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import camera  # noqa: E402
import mmt_plus  # noqa: E402
import postprocess  # noqa: E402
import pretrain  # noqa: E402
import reid  # noqa: E402
import sda  # noqa: E402

torch.set_num_threads(1)
MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d)s\d_\d{6}_\d{2}\.jpg$")


# ---------------------------------------------------------------------------------------------------------------
# Builders: the benchmark's images under each dataset's own names


def _source_images(data_root: Path) -> dict[int, list[tuple[Path, int]]]:
    """personX images of the benchmark by identity: [(file, camera 1..6)]."""
    by_pid: dict[int, list[tuple[Path, int]]] = {}
    for path in sorted((data_root / "personX" / "image_train").iterdir()):
        pid, cam = re.match(r"^(\d+)_c(\d)", path.name).groups()
        by_pid.setdefault(int(pid), []).append((path, int(cam)))
    return by_pid


def _split_stats(entries: list[tuple[int, int]]) -> dict:
    return {"images": len(entries), "pids": len({p for p, _ in entries}), "cams": len({c for _, c in entries})}


def build_market(data_root: Path, parent: Path) -> dict:
    """parent/Market-1501-v15.09.15/ from personX: 5 identities train, 3 test (first image a query), 2 distractors
    (0000) in the gallery, junk (-1) in train and gallery. Returns the expected (pid, camera) lists per split."""
    root = parent / "Market-1501-v15.09.15"
    by_pid = _source_images(data_root)
    pids = sorted(by_pid)
    expected = {"train": [], "query": [], "gallery": []}
    frame = 0

    def put(split: str, pid: int, cam: int, image: Path, folder: str) -> None:
        nonlocal frame
        frame += 1
        name = f"{pid:04d}_c{cam}s1_{frame:06d}_01.jpg" if pid >= 0 else f"-1_c{cam}s1_{frame:06d}_01.jpg"
        assert MARKET_NAME.match(name)
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, root / folder / name)
        if pid >= 0:
            expected[split].append((pid, cam))

    for pid in pids[:5]:  # Market pids from 0002 (0000 are distractors)
        for image, cam in by_pid[pid]:
            put("train", pid + 1, cam, image, "bounding_box_train")
    for pid in pids[5:]:
        (query_image, query_cam), *rest = by_pid[pid]
        put("query", pid + 1, query_cam, query_image, "query")
        for image, cam in rest:
            put("gallery", pid + 1, cam, image, "bounding_box_test")
    some_image = by_pid[pids[0]][0][0]
    put("gallery", 0, 1, some_image, "bounding_box_test")  # distractors
    put("gallery", 0, 3, some_image, "bounding_box_test")
    put("gallery", -1, 2, some_image, "bounding_box_test")  # junk: left out
    put("train", -1, 2, some_image, "bounding_box_train")
    return {split: _split_stats(entries) for split, entries in expected.items()} | {"root": root}


def build_duke(data_root: Path, parent: Path) -> dict:
    """parent/DukeMTMC-reID/ from the benchmark's target domain: target_training (true identities from
    diagnostics/, cameras from its label file) as bounding_box_train, target_validation as query/gallery."""
    root = parent / "DukeMTMC-reID"
    truth = dict(
        line.split() for line in (data_root / "diagnostics/target_training_identities.txt").read_text().splitlines()
    )
    cams = dict(
        line.split() for line in (data_root / "target_training/label_target_training.txt").read_text().splitlines()
    )
    expected = {"train": [], "query": [], "gallery": []}
    frame = 0

    def put(split: str, pid: int, cam: int, image: Path, folder: str) -> None:
        nonlocal frame
        frame += 1
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, root / folder / f"{pid:04d}_c{cam}_f{frame:07d}.jpg")
        expected[split].append((pid, cam))

    for name in sorted(truth):
        put(
            "train",
            int(truth[name]) + 1,
            int(cams[name]),
            data_root / "target_training/image_train" / name,
            "bounding_box_train",
        )
    for part, split, folder in (("query", "query", "query"), ("gallery", "gallery", "bounding_box_test")):
        for image in sorted((data_root / "target_validation" / f"image_{part}").iterdir()):
            pid, cam = re.match(r"^(\d+)_c(\d)", image.name).groups()
            put(split, int(pid) + 1000, int(cam), image, folder)
    return {split: _split_stats(entries) for split, entries in expected.items()} | {"root": root}


def build_msmt(data_root: Path, parent: Path, version: str = "MSMT17_V1") -> dict:
    """parent/MSMT17_V1|V2/ from personX: identities 1-5 train (last image of each in list_val.txt), 6-8 test.
    list_train.txt names paths from the dataset root (train/0001/...), the other lists from their image folder."""
    train_dir, test_dir = ("train", "test") if version == "MSMT17_V1" else ("mask_train_v2", "mask_test_v2")
    root = parent / version
    by_pid = _source_images(data_root)
    pids = sorted(by_pid)
    lists = {"train": [], "val": [], "query": [], "gallery": []}
    expected = {"train": [], "val": [], "query": [], "gallery": []}
    for pid in pids:
        test = pid in pids[5:]
        for index, (image, cam) in enumerate(by_pid[pid]):
            relative = f"{pid:04d}/{pid:04d}_{index:03d}_{cam:02d}_0303morning_{index:04d}_0.jpg"
            (root / (test_dir if test else train_dir) / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, root / (test_dir if test else train_dir) / relative)
            if test:
                split = "query" if index == 0 else "gallery"
            else:
                split = "val" if index == len(by_pid[pid]) - 1 else "train"
            line = f"{train_dir}/{relative}" if split == "train" else relative
            lists[split].append(f"{line} {pid}")
            expected[split].append((pid, cam))
    for split, lines in lists.items():
        (root / f"list_{split}.txt").write_text("\n".join(lines) + "\n")
    stats = {split: _split_stats(entries) for split, entries in expected.items()}
    stats["trainval"] = _split_stats(expected["train"] + expected["val"])
    return stats | {"root": root}


@pytest.fixture(scope="module")
def trees(tmp_path_factory, tiny_data_root) -> dict:
    parent = tmp_path_factory.mktemp("reid_datasets")
    return {
        "parent": parent,
        "market": build_market(tiny_data_root, parent),
        "duke": build_duke(tiny_data_root, parent),
        "msmt": build_msmt(tiny_data_root, parent),
    }


def _stats(items) -> dict:
    return {"images": len(items), "pids": len({p for _, p, _ in items}), "cams": len({c for _, _, c in items})}


# ---------------------------------------------------------------------------------------------------------------
# Readers


@pytest.mark.parametrize("name, key", [("market1501", "market"), ("dukemtmc", "duke"), ("msmt17", "msmt")])
def test_counts_per_split_from_the_parent_folder_and_the_dataset_folder(trees, name, key):
    expected = trees[key]
    for root in (trees["parent"], expected["root"]):
        data = reid.read_dataset(name, root)
        assert Path(data.root) == expected["root"].resolve()
        for split in ("train", "query", "gallery"):
            assert _stats(getattr(data, split)) == expected[split], split
        assert sorted({p for _, p, _ in data.train}) == list(range(expected["train"]["pids"]))  # relabelled
        assert all(Path(p).is_file() for p, _, _ in data.train + data.query + data.gallery)


def test_market_junk_is_left_out_and_distractors_kept(trees):
    data = reid.read_dataset("market1501", trees["parent"])
    assert not any(Path(p).name.startswith("-1_") for p, _, _ in data.train + data.gallery)
    assert sum(pid == 0 for _, pid, _ in data.gallery) == 2
    assert {cam for _, _, cam in data.train} <= set(range(6))


@pytest.mark.parametrize("alias, name", [("market", "market1501"), ("Market1501", "market1501"), ("duke", "dukemtmc"),
                                         ("dukemtmcreid", "dukemtmc"), ("DukeMTMC", "dukemtmc"), ("msmt", "msmt17"),
                                         ("MSMT17", "msmt17")])  # fmt: skip
def test_torchreid_and_fastreid_names_are_aliases(trees, alias, name):
    assert reid.canonical_dataset_name(alias) == name
    assert len(reid.read_dataset(alias, trees["parent"]).train) == len(reid.read_dataset(name, trees["parent"]).train)


def test_msmt_trainval_and_v2_layout(trees, tmp_path, tiny_data_root):
    expected = trees["msmt"]
    merged = reid.read_dataset("msmt17", trees["parent"], msmt_trainval=True)
    assert _stats(merged.train) == expected["trainval"]
    v2 = build_msmt(tiny_data_root, tmp_path, "MSMT17_V2")
    data = reid.read_dataset("msmt", tmp_path)
    assert Path(data.root) == v2["root"].resolve() and "mask_train_v2" in data.train[0][0]
    assert _stats(data.train) == v2["train"] and _stats(data.gallery) == v2["gallery"]
    # a path of list_val.txt also in list_train.txt: both places named
    lines = (v2["root"] / "list_train.txt").read_text().splitlines()
    first = lines[0].split()[0].removeprefix("mask_train_v2/")
    with open(v2["root"] / "list_val.txt", "a") as handle:
        handle.write(f"{first} 1\n")
    with pytest.raises(ValueError, match=r"listed twice \(also .*list_train.txt:1\)"):
        reid.read_dataset("msmt17", tmp_path, msmt_trainval=True)


def test_generic_list_dataset(tmp_path, tiny_data_root):
    images = sorted((tiny_data_root / "personX" / "image_train").iterdir())[:6]
    (tmp_path / "pictures" / "a").mkdir(parents=True)
    lines = []
    for index, image in enumerate(images):
        shutil.copy(image, tmp_path / "pictures" / "a" / f"{index}.jpg")
        lines.append(f"pictures/a/{index}.jpg {10 + index // 2} {index % 3}")
    (tmp_path / "list_train.txt").write_text("\n".join(lines[:4] + ["pictures/a/4.jpg -1 0"]) + "\n")
    (tmp_path / "list_query.txt").write_text(lines[4] + "\n")
    (tmp_path / "list_gallery.txt").write_text(lines[5] + "\n")
    data = reid.read_dataset("list", tmp_path)
    assert [(pid, cam) for _, pid, cam in data.train] == [(0, 0), (0, 1), (1, 2), (1, 0)]  # junk -1 left out
    assert [(pid, cam) for _, pid, cam in data.query] == [(12, 1)] and len(data.gallery) == 1
    (tmp_path / "list_query.txt").write_text("pictures/a/0.jpg 10\n")
    with pytest.raises(ValueError, match=r"list_query.txt:1: expected 'relative/path pid camid'"):
        reid.read_dataset("list", tmp_path)


def test_a_name_that_does_not_match_the_layout_is_refused(trees, tmp_path):
    duke = trees["duke"]["root"]
    with pytest.raises(ValueError, match=r"holds DukeMTMC-reID images .*not Market-1501 ones.*Market-1501-v15.09.15/"):
        reid.read_dataset("market1501", duke)
    only_duke = tmp_path / "only_duke"
    only_duke.mkdir()
    (only_duke / "DukeMTMC-reID").symlink_to(duke)
    with pytest.raises(ValueError, match=r"no Market-1501 layout .*expected .*/Market-1501-v15.09.15/.*DukeMTMC-reID/"):
        reid.read_dataset("market1501", only_duke)
    with pytest.raises(ValueError, match=r"no MSMT17 layout .*MSMT17_V1/"):
        reid.read_dataset("msmt17", duke)
    with pytest.raises(FileNotFoundError, match=r"personX/image_train.*found DukeMTMC-reID"):
        reid.read_dataset("personx", duke)
    with pytest.raises(ValueError, match="unknown dataset 'cuhk03'"):
        reid.read_dataset("cuhk03", duke)


# ---------------------------------------------------------------------------------------------------------------
# Paths read from files stay inside their root; duplicate lines are errors


def _visda_copy(tiny_data_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "visda"
    shutil.copytree(tiny_data_root, root)
    return root


@pytest.mark.parametrize("bad", ["../personX/image_train/{name}", "/etc/hostname", "./../../x.jpg", "sub/../../x.jpg"])
def test_index_and_label_paths_cannot_leave_their_folder(tiny_data_root, tmp_path, bad):
    root = _visda_copy(tiny_data_root, tmp_path)
    name = sorted((root / "personX" / "image_train").iterdir())[0].name
    label_file = root / "target_training" / "label_target_training.txt"
    lines = label_file.read_text().splitlines()
    label_file.write_text("\n".join([f"{bad.format(name=name)} 1", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"label_target_training.txt:1: .*(absolute path|contains '..')"):
        reid.read_dataset("target_train", root)
    index = root / "index_validation_query.txt"
    lines = index.read_text().splitlines()
    index.write_text("\n".join([*lines[:-1], f"{bad.format(name=name)} 1 0001 0000"]) + "\n")
    with pytest.raises(ValueError, match=rf"index_validation_query.txt:{len(lines)}: "):
        reid.read_dataset("target_val", root)


def test_symbolic_links_cannot_escape_and_duplicates_name_both_lines(tiny_data_root, tmp_path):
    root = _visda_copy(tiny_data_root, tmp_path)
    outside = tmp_path / "secret.jpg"
    shutil.copy(next((root / "personX" / "image_train").iterdir()), outside)
    (root / "target_test" / "image_gallery" / "link.jpg").symlink_to(outside)
    index = root / "index_test_gallery.txt"
    original = index.read_text()
    index.write_text(original + "link.jpg  9999\n")
    with pytest.raises(ValueError, match=r"index_test_gallery.txt:\d+: 'link.jpg' leads outside"):
        reid.read_dataset("target_test", root)
    first = original.splitlines()[0]
    index.write_text(original + first + "\n")
    count = len(original.splitlines()) + 1
    with pytest.raises(ValueError, match=rf"index_test_gallery.txt:{count}: .* listed twice \(lines 1 and {count}\)"):
        reid.read_dataset("target_test", root)
    # a data root whose folders are links to the real ones (run_pipeline.sh builds such a root) is fine
    linked = tmp_path / "linked"
    linked.mkdir()
    for entry in tiny_data_root.iterdir():
        (linked / entry.name).symlink_to(entry)
    assert len(reid.read_dataset("target_test", linked).gallery) == len(
        reid.read_dataset("target_test", tiny_data_root).gallery
    )


def test_msmt_list_paths_cannot_escape(trees, tmp_path):
    root = tmp_path / "MSMT17_V1"
    shutil.copytree(trees["msmt"]["root"], root)
    (root / "list_query.txt").write_text("../train/0001/x.jpg 1\n")
    with pytest.raises(ValueError, match=r"list_query.txt:1: .*contains '..'"):
        reid.read_dataset("msmt17", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# The dataset arguments of every stage; leaks and unreadable images refused before anything trains


def _dataset_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    reid.add_dataset_arguments(parser, ("source", "target", "val"))
    return parser


def _help(capsys, parse, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_stage_shows_the_same_dataset_arguments(capsys):
    helps = {
        "pretrain.py": _help(capsys, pretrain.parse_args, ["--help"]),
        "mmt_plus.py": _help(capsys, mmt_plus.parse_args, ["--help"]),
        "camera.py": _help(capsys, camera.parse_args, ["--help"]),
        "sda.py train": _help(capsys, sda.parse_args, ["train", "--help"]),
        "sda.py translate": _help(capsys, sda.parse_args, ["translate", "--help"]),
        "sda.py fidelity": _help(capsys, sda.parse_args, ["fidelity", "--help"]),
        "postprocess.py": _help(capsys, postprocess.parse_args, ["--help"]),
    }
    expected = ["--data-root", "--source", "--source-root", "--target", "--target-root", "--val", "--val-root",
                "--msmt17-trainval", "--skip-bad-images"]  # fmt: skip
    for stage, text in helps.items():
        section = re.split(r"\n(?=\S)", text.split("\ndatasets:")[1])[0]  # up to the next group's header
        options = re.findall(r"^  (--[a-z0-9-]+)(?: [A-Z]+)?(?:  |$)", section, flags=re.MULTILINE)
        assert options == expected, stage


def test_old_argument_spellings_still_work():
    args = _dataset_parser().parse_args(["--val-dataset", "market1501", "--train-dataset", "duke"])
    assert args.val == "market1501" and args.target == "duke"
    assert _dataset_parser().parse_args(["--dataset", "msmt17"]).val == "msmt17"


def test_labelled_target_gives_no_labels_but_diagnostic_identities(trees):
    args = _dataset_parser().parse_args(
        ["--data-root", str(trees["parent"]), "--source", "market1501", "--target", "dukemtmc", "--val", "duke"]
    )
    datasets = reid.resolve_datasets(args, ("source", "target", "val"))
    assert {pid for _, pid, _ in datasets.target} == {0}
    assert len(datasets.target) == trees["duke"]["train"]["images"]
    assert len(set(datasets.target_identities.values())) == trees["duke"]["train"]["pids"]
    assert datasets.source.num_train_pids == trees["market"]["train"]["pids"]


def test_same_folders_or_shared_files_are_refused(trees, tmp_path):
    duke = str(trees["duke"]["root"])
    args = _dataset_parser().parse_args(["--data-root", duke, "--source", "duke", "--target", "duke", "--val", "duke"])
    with pytest.raises(SystemExit, match=r"--source duke and --target duke read the same folder .*bounding_box_train"):
        reid.resolve_datasets(args, ("source", "target", "val"))
    # a list dataset whose files are hard links of Duke's query images: the same files under other names
    source = tmp_path / "private"
    (source / "img").mkdir(parents=True)
    lines = []
    for index, image in enumerate(sorted((trees["duke"]["root"] / "query").iterdir())[:4]):
        os.link(image, source / "img" / f"{index}.jpg")
        lines.append(f"img/{index}.jpg {index // 2} 0")
    (source / "list_train.txt").write_text("\n".join(lines) + "\n")
    argv = [
        "--source",
        "list",
        "--source-root",
        str(source),
        "--target",
        "market",
        "--target-root",
        str(trees["parent"]),
    ]
    args = _dataset_parser().parse_args([*argv, "--val", "duke", "--val-root", duke])
    with pytest.raises(SystemExit, match=r"--source list and --val duke share 4 image file\(s\)"):
        reid.resolve_datasets(args, ("source", "target", "val"))


def test_unreadable_images_are_found_before_training(trees, tmp_path):
    parent = tmp_path / "data"
    shutil.copytree(trees["market"]["root"], parent / "Market-1501-v15.09.15")
    gallery = sorted((parent / "Market-1501-v15.09.15" / "bounding_box_test").iterdir())
    truncated = gallery[1]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])  # header intact, data cut
    gallery[2].write_bytes(b"not an image")
    argv = ["--data-root", str(parent), "--source", "market", "--target", "none", "--val", "market"]
    with pytest.raises(
        SystemExit,
        match=rf"--val market: 2 unreadable image\(s\) in the gallery images: {truncated}.*--skip-bad-images",
    ):
        reid.resolve_datasets(_dataset_parser().parse_args(argv), ("source", "target", "val"))
    datasets = reid.resolve_datasets(_dataset_parser().parse_args([*argv, "--skip-bad-images"]), ("source", "val"))
    expected = trees["market"]["gallery"]["images"] - 2
    assert len(datasets.val.gallery) == expected and str(truncated) not in {p for p, _, _ in datasets.val.gallery}
    # and a stage stops before its first iteration
    logs = tmp_path / "logs"
    with pytest.raises(SystemExit, match="unreadable"):
        pretrain.main([*argv, "--logs-dir", str(logs), "--arch", "resnet18", "--epochs", "1", "--iters", "1"])
    assert not (logs / "checkpoint.pth").exists()


def test_visda_submission_sets_cannot_lose_an_image(tiny_data_root, tmp_path):
    root = _visda_copy(tiny_data_root, tmp_path)
    next((root / "target_test" / "image_gallery").iterdir()).write_bytes(b"broken")
    args = _dataset_parser().parse_args(["--data-root", str(root), "--val", "target_test", "--skip-bad-images"])
    with pytest.raises(SystemExit, match="index files number the images"):
        reid.resolve_datasets(args, ("val",))


def test_label_leak_command_fails_with_one_line(trees, tmp_path):
    """mmt_plus.py --data-root <Duke> --source market1501 --target dukemtmc --val-dataset dukemtmc used to train its
    'labelled source' on Duke's own training set."""
    init = tmp_path / "init.pth"
    init.write_bytes(b"")  # never read: the data are refused first
    command = [sys.executable, str(REPO / "mmt_plus.py"), "--data-root", str(trees["duke"]["root"]), "--source",
               "market1501", "--target", "dukemtmc", "--val-dataset", "dukemtmc", "--init-1", str(init), "--init-2",
               str(init), "--logs-dir", str(tmp_path / "logs")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--source market1501" in lines[0] and "holds DukeMTMC-reID images" in lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Market -> Duke end to end (tiny sizes)


TINY = ["--height", "64", "--width", "32", "--workers", "0", "--arch", "resnet18"]


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_market_to_duke_chain(trees, tmp_path):
    parent = str(trees["parent"])
    data = ["--source", "market1501", "--source-root", parent, "--target", "dukemtmc", "--target-root", parent,
            "--val", "dukemtmc", "--val-root", str(trees["duke"]["root"])]  # fmt: skip
    inits = []
    for seed in (1, 2):
        logs = tmp_path / f"pretrain-{seed}"
        pretrain.main([*data, *TINY, "--logs-dir", str(logs), "--seed", str(seed), "--epochs", "1", "--iters", "2",
                       "--batch-size", "16", "--eval-every", "1", "--lr", "1e-3"])  # fmt: skip
        start = _log(logs / "log.jsonl")[0]
        assert start["num_classes"] == trees["market"]["train"]["pids"]
        assert start["source_images"] == trees["market"]["train"]["images"]
        assert start["target_images"] == trees["duke"]["train"]["images"]
        inits.append(logs / "model_best.pth")
    mmt_logs = tmp_path / "mmt"
    summary = mmt_plus.main([*data, *TINY, "--preset", "demo", "--logs-dir", str(mmt_logs), "--init-1", str(inits[0]),
                             "--init-2", str(inits[1]), "--epochs", "1", "--iters", "2", "--batch-size", "8",
                             "--test-batch-size", "64", "--no-eval-initial", "--eps", "0.9"])  # fmt: skip
    start = _log(mmt_logs / "log.jsonl")[0]
    assert start["num_source_classes"] == trees["market"]["train"]["pids"]
    assert start["num_target_images"] == trees["duke"]["train"]["images"]
    assert start["pseudo_label_diagnostics"]  # Duke's identities feed the diagnostics, never the training
    assert 0 <= summary["best_mAP"] <= 1
    out = tmp_path / "post"
    results = postprocess.main(["--checkpoints", str(mmt_logs / "model_best.pth"), "--val", "duke", "--val-root",
                                parent, "--out", str(out), "--workers", "0", "--k1", "6", "--k2", "3",
                                "--num-figures", "1"])  # fmt: skip
    assert results["num_query"] == trees["duke"]["query"]["images"]
    assert results["num_gallery"] == trees["duke"]["gallery"]["images"]
    assert [row["rerank"] for row in results["rows"]] == [False, True]  # plain metric first, re-ranked extra
    assert results["final"]["rerank"] is False and results["submission"] is None
    assert not (out / "result.txt").exists() and not (out / "result.zip").exists()


def test_translate_any_source_into_a_list_dataset(trees, tmp_path):
    parent = str(trees["parent"])
    out = tmp_path / "sda"
    sda.main(["train", "--source", "market", "--source-root", parent, "--target", "duke", "--target-root", parent,
              "--out", str(out), "--lambda-relation", "0", "--height", "64", "--width", "32", "--ngf", "4", "--ndf",
              "4", "--n-blocks", "1", "--iters", "1", "--batch-size", "8", "--workers", "0", "--no-amp",
              "--epochs-constant", "1", "--epochs-decay", "0"])  # fmt: skip
    translated = tmp_path / "translated"
    sda.main(["translate", "--checkpoint", str(out / "checkpoint.pth"), "--source", "market1501", "--source-root",
              parent, "--target", "duke", "--target-root", parent, "--out", str(translated),
              "--workers", "0"])  # fmt: skip
    data = reid.read_dataset("list", translated / "market1501_sda")
    market = reid.read_dataset("market1501", parent)
    assert [(pid, cam) for _, pid, cam in data.train] == [(pid, cam) for _, pid, cam in market.train]
    assert [Path(p).name for p, _, _ in data.train] == [Path(p).name for p, _, _ in market.train]
