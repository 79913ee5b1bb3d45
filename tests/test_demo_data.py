"""Tests of make_demo_data.py: determinism (seeds, worker count), the VisDA-2020 layout and line formats parsed
independently from the format description (reference-implementation.md §2), identity disjointness, no identity
leaking into target training names, distractors and cross-camera matches, argument errors, and the
viewpoint-dependent rendering."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import make_demo_data

TARGET_CAMERAS = {1, 2, 4, 5, 6}


def all_files(root: Path) -> dict[str, bytes]:
    """Every generated file except the run summary (it records wall time and worker count)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "summary.json"
    }


def read_lines(path: Path) -> list[str]:
    text = path.read_text()
    assert text.endswith("\n") and "\r" not in text, path
    return text[:-1].split("\n")


# --- independent readers, written from the format description --------------------------------------------------


def read_personx(root: Path) -> list[tuple[str, int, int]]:
    items = []
    for path in sorted((root / "personX/image_train").iterdir()):
        match = re.fullmatch(r"(\d{4})_c(\d)s(\d+)_(\d{6})_(\d{2})\.jpg", path.name)
        assert match, path.name
        # the release's parser: first match of ([-\d]+)_c(\d*) must agree
        release = re.search(r"([-\d]+)_c(\d*)", path.name)
        assert (int(release.group(1)), int(release.group(2))) == (int(match.group(1)), int(match.group(2)))
        items.append((path.name, int(match.group(1)), int(match.group(2))))
    return items


def read_target_training(root: Path) -> list[tuple[str, int]]:
    rows = []
    for line in read_lines(root / "target_training/label_target_training.txt"):
        tokens = line.split(" ")
        assert len(tokens) == 2, line
        rows.append((tokens[0], int(tokens[1])))
    return rows


def read_val_index(root: Path, part: str) -> list[tuple[str, int, int]]:
    rows = []
    for number, line in enumerate(read_lines(root / f"index_validation_{part}.txt")):
        match = re.fullmatch(r"(\S+\.jpg) (\d) (\d{3}) (\d{4})", line)
        assert match, line
        name, cam, pid, index = match.groups()
        assert int(index) == number
        parsed = re.search(r"([-\d]+)_c(\d)", name)  # how the readers get pid / cam (from the name)
        assert (int(parsed.group(1)), int(parsed.group(2))) == (int(pid), int(cam)), line
        rows.append((name, int(pid), int(cam)))
    return rows


def read_test_index(root: Path, part: str) -> list[str]:
    names = []
    for number, line in enumerate(read_lines(root / f"index_test_{part}.txt")):
        match = re.fullmatch(r"(\d{4,})\.jpg  (\d{4,})", line)
        assert match, line
        assert int(match.group(1)) == number == int(match.group(2))
        names.append(line.split(" ")[0])
    return names


# --- tests -------------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_for_any_worker_count(tmp_path, tiny_data_root):
    # the fixture ran in-process (workers=1); here two spawned worker processes
    make_demo_data.generate(tmp_path / "again", preset="tiny", seed=0, workers=2)
    first, second = all_files(tiny_data_root), all_files(tmp_path / "again")
    assert first.keys() == second.keys()
    different = [name for name in first if first[name] != second[name]]
    assert not different, different[:5]


def test_different_seeds_differ(tmp_path, tiny_data_root):
    make_demo_data.generate(tmp_path / "seed1", preset="tiny", seed=1, workers=1)
    first, second = all_files(tiny_data_root), all_files(tmp_path / "seed1")
    images = [name for name in first if name.endswith(".jpg") and name in second]
    assert images
    assert sum(first[name] == second[name] for name in images) == 0
    assert first["index_validation_gallery.txt"] != second["index_validation_gallery.txt"]


def test_layout_and_line_formats(tiny_data_root):
    root = tiny_data_root
    size = make_demo_data.PRESETS["tiny"]["size"]
    source = read_personx(root)
    assert {cam for _, _, cam in source} == set(range(1, 7))
    assert all(0 <= pid <= 700 for _, pid, _ in source)
    pids = sorted({pid for _, pid, _ in source})
    assert pids == list(range(1, len(pids) + 1)) and len(pids) == make_demo_data.PRESETS["tiny"]["source_ids"]

    training = read_target_training(root)
    names = [name for name, _ in training]
    assert sorted(names) == sorted(p.name for p in (root / "target_training/image_train").iterdir())
    assert {cam for _, cam in training} == TARGET_CAMERAS

    for part, folder in (("query", "image_query"), ("gallery", "image_gallery")):
        rows = read_val_index(root, part)
        assert sorted(r[0] for r in rows) == sorted(p.name for p in (root / "target_validation" / folder).iterdir())
        assert {cam for _, _, cam in rows} <= TARGET_CAMERAS
        names = read_test_index(root, part)
        assert sorted(names) == sorted(p.name for p in (root / "target_test" / folder).iterdir())

    for path in root.rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (size[1], size[0]), path
    # no temp files left behind
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_identities_are_disjoint_between_splits(tiny_data_root):
    records = [json.loads(line) for line in read_lines(tiny_data_root / "diagnostics/identities.jsonl")]
    appearance = [
        json.dumps({k: v for k, v in r.items() if k not in ("split", "pid")}, sort_keys=True) for r in records
    ]
    assert len(set(appearance)) == len(appearance), "two identities share the same appearance"
    splits = {r["split"] for r in records}
    assert {"source", "target_train", "val", "test", "val_distractors", "test_distractors"} <= splits
    # the same pid number in different splits is a different person (independent random streams)
    for pid in (1, 2, 3):
        looks = [
            make_demo_data.identity_attributes(0, split, pid) for split in ("source", "target_train", "val", "test")
        ]
        assert all(a != b for i, a in enumerate(looks) for b in looks[i + 1 :])
    # every identity actually used is recorded
    source_pids = {pid for _, pid, _ in read_personx(tiny_data_root)}
    assert source_pids == {r["pid"] for r in records if r["split"] == "source"}
    val_pids = {pid for part in ("query", "gallery") for _, pid, _ in read_val_index(tiny_data_root, part)} - {0}
    assert val_pids == {r["pid"] for r in records if r["split"] == "val"}


def test_target_training_names_and_labels_carry_no_identity(tiny_data_root):
    training = read_target_training(tiny_data_root)
    numbers = [int(name[: -len(".jpg")]) for name, _ in training]
    assert numbers == list(range(len(training)))  # plain serial numbers, nothing else in the name
    assert all(re.fullmatch(r"\d+\.jpg", name) for name, _ in training)
    truth = dict(line.split(" ") for line in read_lines(tiny_data_root / "diagnostics/target_training_identities.txt"))
    assert set(truth) == {name for name, _ in training}
    ordered = [truth[name] for name, _ in training]
    # shuffled: neighbours in name order are rarely the same person (sorted by identity this would be ~0.9)
    same_neighbours = np.mean([a == b for a, b in zip(ordered, ordered[1:], strict=False)])
    assert same_neighbours < 0.4
    assert len(set(ordered)) >= make_demo_data.PRESETS["tiny"]["target_train_ids"]


@pytest.mark.parametrize("split", ["val", "test"])
def test_distractors_and_cross_camera_matches(tiny_data_root, split):
    if split == "val":
        query = [(pid, cam) for _, pid, cam in read_val_index(tiny_data_root, "query")]
        gallery = [(pid, cam) for _, pid, cam in read_val_index(tiny_data_root, "gallery")]
    else:  # ground truth of the unlabelled test set lives in diagnostics

        def truth(part: str) -> list[tuple[int, int]]:
            lines = read_lines(tiny_data_root / f"diagnostics/target_test_{part}_identities.txt")
            rows = {name: (int(pid), int(cam)) for name, pid, cam in (line.split(" ") for line in lines)}
            return [rows[name] for name in read_test_index(tiny_data_root, part)]

        query, gallery = truth("query"), truth("gallery")
    assert query and all(pid > 0 for pid, _ in query)
    assert any(pid == 0 for pid, _ in gallery), "no distractors in the gallery"
    for pid, cam in query:
        assert any(g_pid == pid and g_cam != cam for g_pid, g_cam in gallery), (pid, cam)


def test_val_and_test_identities_do_not_overlap_training_ones(tiny_data_root):
    records = [json.loads(line) for line in read_lines(tiny_data_root / "diagnostics/identities.jsonl")]
    by_split: dict[str, set] = {}
    for r in records:
        key = json.dumps({k: v for k, v in r.items() if k not in ("split", "pid")}, sort_keys=True)
        by_split.setdefault(r["split"].replace("_distractors", "").replace("_singletons", ""), set()).add(key)
    names = sorted(by_split)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not by_split[a] & by_split[b], (a, b)


@pytest.mark.parametrize("text", ["10x5", "300x100", "128", "axb", "64x128"])
def test_bad_sizes_are_rejected_clearly(text):
    with pytest.raises(ValueError, match="--size"):
        make_demo_data.parse_size(text)


def test_good_sizes_parse():
    assert make_demo_data.parse_size("128x64") == (128, 64)
    assert make_demo_data.parse_size("256X128") == (256, 128)


def test_bad_arguments_fail_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_demo_data.main(["--out", str(tmp_path / "a"), "--preset", "huge"])
    assert "unknown --preset 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_demo_data.main(["--out", str(tmp_path / "a"), "--size", "10x5"])
    assert "--size 10x5 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_demo_data.main(["--out", str(tmp_path / "a"), "--preset", "tiny", "--occlusion-prob", "2"])
    assert "--occlusion-prob must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown generator option"):
        make_demo_data.generate(tmp_path / "b", preset="tiny", colour=3)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written on bad input


def test_refuses_non_empty_output_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        make_demo_data.main(["--out", str(out), "--preset", "tiny", "--no-progress"])
    error = capsys.readouterr().err
    assert "is not empty; refusing to write into it" in error and "Pass --overwrite" in error
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    small = dict(source_ids=1, target_train_ids=1, target_train_singletons=0, val_ids=1, test_ids=1)
    make_demo_data.generate(out, preset="tiny", workers=1, overwrite=True, **small)
    stale = out / "personX/image_train/9999_c1s1_000001_00.jpg"  # a file of an earlier, bigger run
    stale.write_bytes(b"old")
    make_demo_data.generate(out, preset="tiny", workers=1, overwrite=True, **small)
    assert not stale.exists() and (out / "mine.txt").read_text() == "keep me"


def test_largest_size_renders(tmp_path):
    small = dict(source_ids=1, source_images_per_id=(2, 2), target_train_ids=1, target_train_images_per_id=(2, 2))
    small |= dict(target_train_singletons=0, val_ids=1, val_distractors=1, test_ids=1, test_distractors=1)
    make_demo_data.generate(tmp_path, preset="tiny", size=(256, 128), workers=1, **small)
    for path in list(tmp_path.rglob("*.jpg"))[:5]:
        with Image.open(path) as image:
            assert image.size == (128, 256)


def bag_pixels(view: str, bag: str, bag_side: str = "left") -> int:
    """Pixels of a unique bag colour when one person is drawn on a clean scene from the given view."""
    person = make_demo_data.identity_attributes(0, "source", 1)
    person.update(bag=bag, bag_side=bag_side, bag_colour=(255, 0, 255), upper_pattern="plain")
    scene = np.full((128, 192, 3), 200, dtype=np.uint8)
    job = dict(rng_key=(0, 1, 1, 0, 103), view=view)
    image = make_demo_data.render_image(job, person, {"clean": True}, scene, (64, 32))
    pixels = np.asarray(image).astype(int)
    return int((np.abs(pixels - [255, 0, 255]).sum(axis=2) < 40).sum())


def test_appearance_depends_on_viewpoint():
    # a backpack is a big patch from behind, straps from the front
    assert bag_pixels("back", "backpack") > 2 * max(1, bag_pixels("front", "backpack"))
    # a shoulder bag carried on the left is seen in full from the left side only
    assert bag_pixels("side_left", "shoulder_bag", "left") > 2 * max(
        1, bag_pixels("side_right", "shoulder_bag", "left")
    )
    assert bag_pixels("front", "none") == 0


def test_target_style_strength_zero_removes_the_gap():
    config = make_demo_data.build_config("tiny", None, {"target_style_strength": 0.0})
    for camera in make_demo_data.TARGET_CAMERAS:
        assert make_demo_data.camera_style(0, "target", camera, config)["clean"]
    config = make_demo_data.build_config("tiny", None, {})
    styles = [make_demo_data.camera_style(0, "target", camera, config) for camera in make_demo_data.TARGET_CAMERAS]
    assert not any(s["clean"] for s in styles)
    # cameras differ from each other and keep their style for a given seed
    assert len({tuple(s["channel_gains"]) for s in styles}) == len(styles)
    assert styles[0] == make_demo_data.camera_style(0, "target", 1, config)
