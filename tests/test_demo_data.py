"""Tests of make_demo_data.py: determinism (seeds, worker count), the VisDA-2020 layout and line formats parsed
independently from the format description (docs/differences.md#data-layout), identity disjointness, no identity
leaking into target training names, distractors and cross-camera matches, argument errors, and the
viewpoint-dependent rendering."""

import colorsys
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


# --- the target-domain knobs, measured on rendered pixels ----------------------------------------------------------

SIZE = (128, 64)
SCENE_GREY = 200


def camera_with(seed: int = 0, camera: int = 1, **knobs) -> dict:
    """A target camera's style with every camera effect off except the given knobs."""
    off = {key: 0.0 for key in make_demo_data.CAMERA_KNOBS} | {"jpeg_quality_min": 95}
    config = make_demo_data.build_config("default", None, {**off, **knobs})
    return make_demo_data.camera_style(seed, "target", camera, config)


def plain_person(**colours) -> dict:
    person = make_demo_data.identity_attributes(0, "source", 1)
    person.update(upper_pattern="plain", bag="none", hair_style="bald", long_sleeves=True, lower_type="trousers")
    person.update(upper=(200, 40, 45), lower=(40, 60, 200), height=1.0, build=1.0)
    person.update(colours)
    return person


def render(style: dict, person: dict | None = None, key: int = 0, view: str = "front") -> np.ndarray:
    """One crop on a uniform grey scene (so the person's pixels are the ones that differ from it)."""
    scene = np.full((SIZE[0] * 2, SIZE[1] * 6, 3), SCENE_GREY, dtype=np.uint8)
    job = dict(rng_key=(0, 1, 1, key, 103), view=view)
    image = make_demo_data.render_image(job, person or plain_person(), style, scene, SIZE)
    return np.asarray(image, dtype=np.float64)


def person_mask(pixels: np.ndarray) -> np.ndarray:
    return np.abs(pixels - SCENE_GREY).sum(axis=2) > 30


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def colour_of(pixels: np.ndarray, target: tuple, tolerance: float = 40) -> np.ndarray:
    return np.abs(pixels - np.asarray(target, dtype=np.float64)).sum(axis=2) < tolerance


def torso_colour(pixels: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean colour of the pixels that show the (red) upper garment in the reference rendering."""
    return pixels[colour_of(reference, (200, 40, 45))].mean(axis=0)


def hue_degrees(rgb: np.ndarray) -> float:
    return 360.0 * colorsys.rgb_to_hsv(*(np.asarray(rgb) / 255.0))[0]


def test_hue_rotation_turns_the_hue_of_rendered_clothes():
    reference = render({"clean": False})
    for camera in (1, 2, 4):
        style = camera_with(camera=camera, hue_rotation=60.0)
        turned = torso_colour(render(style), reference)
        change = (hue_degrees(turned) - hue_degrees(torso_colour(reference, reference)) + 180) % 360 - 180
        assert abs(style["hue_rotation_deg"]) >= 0.4 * 60 - 1e-9
        assert abs(change - style["hue_rotation_deg"]) < 8, (camera, change, style["hue_rotation_deg"])
        # greys stay grey: the background has no colour after the rotation
        background = render(style)[:4, :4].reshape(-1, 3).mean(axis=0)
        assert np.ptp(background) < 3


def test_channel_mixing_is_not_a_per_channel_gain():
    red, blue = (200, 40, 45), (40, 60, 200)
    reference = render({"clean": False})
    style = camera_with(channel_mix=1.0)
    mixed = render(style)
    # the ratio output / input per channel: a per-channel gain gives the same ratios for every colour
    red_ratio = mixed[colour_of(reference, red)].mean(axis=0) / reference[colour_of(reference, red)].mean(axis=0)
    blue_ratio = mixed[colour_of(reference, blue)].mean(axis=0) / reference[colour_of(reference, blue)].mean(axis=0)
    assert np.abs(red_ratio - blue_ratio).max() > 0.25, (red_ratio, blue_ratio)
    assert np.ptp(mixed[:4, :4].reshape(-1, 3).mean(axis=0)) < 3  # rows sum to 1: greys stay grey


def test_tone_curve_bends_mid_tones_per_channel():
    style = camera_with(tone_curve=0.6)
    gammas = np.array(style["tone_gammas"])
    assert np.ptp(gammas) > 0.05
    background = render(style)[:8, :8].reshape(-1, 3).mean(axis=0)
    expected = 255.0 * (SCENE_GREY / 255.0) ** gammas  # the definition of a gamma curve
    assert np.abs(background - expected).max() < 2.0, (background, expected)
    # black stays black (0 ** gamma = 0)
    person = plain_person(upper=(0, 0, 0))
    black = render({"clean": False}, person).sum(axis=2) < 2
    assert black.sum() > 100 and render(style, person)[black].max() < 3


def high_frequency_energy(pixels: np.ndarray) -> float:
    grey = pixels.mean(axis=2)
    laplacian = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float((laplacian**2).mean())


def test_lower_resolution_removes_high_frequencies():
    person = plain_person(upper_pattern="hstripes", upper_secondary=(250, 250, 250))
    energies = []
    for downscale in (0.0, 0.3, 0.7):
        style = camera_with(downscale=downscale)
        energies.append(np.mean([high_frequency_energy(render(style, person, key=k)) for k in range(4)]))
    assert energies[0] > 1.5 * energies[1] > 1.5 * 1.5 * energies[2], energies


def test_motion_blur_smears_horizontally_only():
    person = plain_person(upper_pattern="hstripes", upper_secondary=(250, 250, 250))
    sharp, blurred = render(camera_with(), person), render(camera_with(motion_blur=3.0), person)

    def gradients(pixels: np.ndarray) -> tuple[float, float]:
        grey = pixels.mean(axis=2)
        return float((np.diff(grey, axis=1) ** 2).mean()), float((np.diff(grey, axis=0) ** 2).mean())

    (sharp_x, sharp_y), (blur_x, blur_y) = gradients(sharp), gradients(blurred)
    assert blur_x < 0.7 * sharp_x
    assert blur_y > 0.85 * sharp_y


def test_sensor_noise_has_the_documented_sigma():
    style = camera_with(noise=0.04)
    background = render(style)[:, :6]  # columns of the grey scene, far from the person
    measured = background.std()
    assert abs(measured - style["noise_sigma"]) < 0.2 * style["noise_sigma"] + 0.5, (measured, style["noise_sigma"])


def boxes(style: dict, count: int = 24) -> np.ndarray:
    return np.array([bounding_box(person_mask(render(style, key=k))) for k in range(count)], dtype=np.float64)


def test_loose_boxes_make_the_person_smaller_and_lift_the_feet():
    tight, loose = boxes(camera_with()), boxes(camera_with(loose_box=0.5))
    tight_height, loose_height = (tight[:, 1] - tight[:, 0]).mean(), (loose[:, 1] - loose[:, 0]).mean()
    assert loose_height < 0.85 * tight_height
    assert loose[:, 1].mean() < tight[:, 1].mean() - 3  # background below the feet


def test_box_jitter_moves_the_person():
    still, jittered = boxes(camera_with()), boxes(camera_with(box_jitter=0.3))
    centre = lambda b: (b[:, 2] + b[:, 3]) / 2  # noqa: E731
    assert centre(jittered).std() > 2 * centre(still).std()


def test_truncation_cuts_the_person_at_the_box_edge():
    height, width = SIZE
    shoes = plain_person()["shoes"]

    def cut_fraction(truncation: float) -> float:
        style = camera_with(truncation=truncation)
        cut = []
        for k in range(24):
            pixels = render(style, key=k)
            top, _, left, right = bounding_box(person_mask(pixels))
            feet_visible = colour_of(pixels, shoes, 30).any()
            # cut: the head touches the top edge, the body touches a side edge, or the shoes are outside the box
            cut.append(top <= 0 or left <= 0 or right >= width - 1 or not feet_visible)
        return float(np.mean(cut))

    never, always = cut_fraction(0.0), cut_fraction(1.0)
    assert never <= 0.2 and always >= 0.8, (never, always)


def test_elevated_camera_enlarges_the_upper_body():
    def upper_share(style: dict) -> float:
        shares = []
        for k in range(8):
            pixels = render(style, key=k)
            upper_rows = colour_of(pixels, (200, 40, 45), 60).any(axis=1).sum()
            lower_rows = colour_of(pixels, (40, 60, 200), 60).any(axis=1).sum()
            shares.append(upper_rows / (upper_rows + lower_rows))
        return float(np.mean(shares))

    assert upper_share(camera_with(elevation=0.4)) > upper_share(camera_with()) + 0.03


def test_passers_by_appear_at_the_sides_of_the_box():
    def side_pixels(style: dict) -> float:
        fractions = []
        for k in range(16):
            mask = person_mask(render(style, key=k))
            fractions.append(np.concatenate([mask[:, :8], mask[:, -8:]], axis=1).mean())
        return float(np.mean(fractions))

    alone, crowded = side_pixels(camera_with()), side_pixels(camera_with(passerby=1.0))
    assert crowded > alone + 0.05, (alone, crowded)


def test_target_population_dresses_darker_and_plainer_on_rendered_pixels():
    """Torso pixels of 200 rendered people per population (front view, clean camera): the target population's
    clothes are darker and less saturated, so clothing colour separates its people less."""

    def torsos(split: str, shift: float) -> np.ndarray:
        colours = []
        for pid in range(1, 201):
            person = make_demo_data.identity_attributes(3, split, pid, shift)
            person.update(bag="none", hair_style="bald", height=1.0, build=1.0, upper_pattern="plain")
            pixels = render({"clean": True}, person)
            colours.append(pixels[50:62, 28:36].reshape(-1, 3).mean(axis=0))  # the chest, below the neck
        return np.array(colours) / 255.0

    source, target, unshifted = torsos("source", 1.0), torsos("target_train", 1.0), torsos("target_train", 0.0)
    value = lambda c: c.max(axis=1)  # noqa: E731  (HSV value)
    chroma = lambda c: c.max(axis=1) - c.min(axis=1)  # noqa: E731
    spread = lambda c: np.linalg.norm(c[:, None] - c[None], axis=2).mean()  # noqa: E731  (mean pairwise distance)
    assert value(target).mean() < value(source).mean() - 0.12
    assert chroma(target).mean() < chroma(source).mean() - 0.05
    assert spread(target) < 0.75 * spread(source)  # clothing colour separates target people less
    assert np.mean(value(target) < 0.35) > np.mean(value(source) < 0.35) + 0.2  # mostly dark garments
    # with the shift at 0 the target population dresses like the source
    assert abs(value(unshifted).mean() - value(source).mean()) < 0.06


def test_translator_control_re_renders_the_source_jobs_with_target_cameras(tmp_path, tiny_data_root):
    out, translator = tmp_path / "data", tmp_path / "translator"
    make_demo_data.generate(out, preset="tiny", seed=0, workers=1, translator_out=translator)
    source_names = sorted(p.name for p in (out / "personX/image_train").iterdir())
    assert source_names == sorted(p.name for p in (translator / "personX/image_train").iterdir())
    assert not (translator / "target_training").exists()  # only personX: pretrain.py --target-root OUT

    def energy(folder: Path) -> float:
        return float(np.mean([high_frequency_energy(np.asarray(Image.open(p), float)) for p in folder.iterdir()]))

    source = energy(out / "personX/image_train")
    translated = energy(translator / "personX/image_train")
    target = energy(out / "target_training/image_train")
    assert abs(translated - target) < abs(translated - source)  # the target cameras' detail, not the source's
    # the same people and poses: the benchmark itself is unchanged by the option
    assert all_files(out) == all_files(tiny_data_root)
