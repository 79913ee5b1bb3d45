"""The embedded benchmark: a synthetic two-domain person re-ID dataset in the exact VisDA-2020 folder layout.

No re-ID dataset can be downloaded without credentials, so the toolkit ships this generator. It draws
pedestrians procedurally (PIL ImageDraw + numpy) and writes (docs/differences.md#data-layout):

    <out>/personX/image_train/0001_c3s1_000024_00.jpg      labelled source domain, cameras 1..6
    <out>/target_training/image_train/00000.jpg             unlabelled target domain, cameras {1,2,4,5,6}
    <out>/target_training/label_target_training.txt        "image_name cam_id" per line
    <out>/target_validation/image_query|image_gallery/      "0077_c5s1_003471_01.jpg"-style names
    <out>/index_validation_query.txt, index_validation_gallery.txt   "name cam pid index" per line
    <out>/target_test/image_query|image_gallery/0000.jpg    unlabelled
    <out>/index_test_query.txt, index_test_gallery.txt      "0000.jpg  0000" per line (two spaces)
    <out>/diagnostics/                                      ground truth + styles + contact sheet + summary.
                                                            NO TRAINING CODE MAY READ THIS FOLDER.

An identity is a set of attributes (clothing colours and patterns, hair, skin, build, bag and its side, shoes)
drawn from palettes, so identities are distinguishable but confusable. Each image varies viewpoint (front /
back / side: a backpack is seen from behind, a shoulder bag only from its side), stride, scale and position.
The two domains differ the way real ones do, not by a global colour gain that BN adaptation or AutoAugment
would absorb:

* population: target people dress differently (--target-dress-shift): mostly dark, plain, long garments and
  hues or patterns the source never shows, so coarse clothing colour stops separating them;
* colour: each target camera rotates hues, mixes channels and bends a tone curve of its own, so colours do
  not match across target cameras even after normalisation;
* geometry: loose, jittered detection boxes, truncated people, elevated cameras (foreshortening);
* image quality: 0.5-0.72 of the source resolution, motion blur, sensor noise, JPEG;
* clutter: busy scenes, partial passers-by and occluders inside the box.

The source domain is flat-shaded on clean backgrounds with tight boxes. --target-style-strength scales every
camera effect (0 = target cameras look like the source's). --translator-out writes the perfect-translator
control (the source jobs re-rendered by the target cameras). docs/demo_data.md explains each knob and the
calibration (calibrate_benchmark.py).

Determinism: every random draw comes from a numpy Generator keyed by (seed, split, identity, image index), so
the bytes written do not depend on the number of worker processes.

    python make_demo_data.py --out data/demo                    # default benchmark, 128x64, ~8,000 images
    python make_demo_data.py --out data/demo --translator-out data/demo_translator   # + the control
    python make_demo_data.py --preset tiny --out /tmp/tiny      # a few identities in seconds (tests)
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SOURCE_CAMERAS = (1, 2, 3, 4, 5, 6)
TARGET_CAMERAS = (1, 2, 4, 5, 6)  # VisDA-2020: there is no camera 3 in the target domain
MIN_SIZE, MAX_SIZE = (32, 16), (256, 128)  # (height, width)
SUPERSAMPLING = 2  # draw at 2x and downsample with a box filter: anti-aliased edges

# Integer codes of the splits; together with the seed they key every random generator.
SPLIT_CODES = {
    "source": 1,
    "target_train": 2,
    "target_train_singletons": 3,
    "val": 4,
    "val_distractors": 5,
    "test": 6,
    "test_distractors": 7,
}
DOMAIN_CODES = {"source": 11, "target": 12}
STREAM_IDENTITY, STREAM_PLAN, STREAM_IMAGE, STREAM_CAMERA, STREAM_SCENE = 101, 102, 103, 104, 105
STREAM_CAMERA_SIDE, STREAM_PASSERBY, STREAM_TRANSLATOR = 106, 107, 108

# Every entry this script writes at the top level of --out (removed by --overwrite). personX_sda/personX_spgan
# are derived from personX and therefore stale once personX is regenerated.
GENERATED_ENTRIES = (
    "personX",
    "personX_sda",
    "personX_spgan",
    "target_training",
    "target_validation",
    "target_test",
    "index_validation_query.txt",
    "index_validation_gallery.txt",
    "index_test_query.txt",
    "index_test_gallery.txt",
    "diagnostics",
)

# Presets: (min, max) pairs are inclusive ranges drawn per identity. Target-camera knobs are the values at
# --target-style-strength 1 (the default); each target camera draws its own fraction of them (see camera_style).
PRESETS: dict[str, dict] = {
    "default": dict(
        size=(128, 64),
        source_ids=120,
        source_images_per_id=(14, 28),
        source_cameras_per_id=(3, 6),
        target_train_ids=140,
        target_train_images_per_id=(12, 28),
        target_train_singletons=150,
        target_cameras_per_id=(2, 5),
        val_ids=50,
        val_queries_per_id=(2, 4),
        val_gallery_per_id=(12, 20),
        val_distractors=400,
        test_ids=50,
        test_queries_per_id=(2, 4),
        test_gallery_per_id=(12, 20),
        test_distractors=400,
        # who lives in the target domain (not a camera effect, so not scaled by the strength)
        target_dress_shift=1.0,
        # the target cameras (docs/demo_data.md: calibration of these defaults with pretrain.py)
        target_style_strength=1.0,
        hue_rotation=15.0,
        channel_mix=0.125,
        tone_curve=0.125,
        colour_cast=0.075,
        exposure=0.125,
        contrast=0.125,
        shading=0.15,
        texture=0.05,
        downscale=0.5,
        motion_blur=0.75,
        blur=0.15,
        noise=0.015,
        jpeg_quality_min=68,
        loose_box=0.1,
        box_jitter=0.04,
        truncation=0.075,
        elevation=0.1,
        passerby=0.175,
        clutter=0.5,
        occlusion_prob=0.125,
    ),
    "tiny": dict(
        size=(64, 32),
        source_ids=8,
        source_images_per_id=(7, 9),
        source_cameras_per_id=(3, 6),
        target_train_ids=8,
        target_train_images_per_id=(7, 9),
        target_train_singletons=4,
        target_cameras_per_id=(2, 5),
        val_ids=8,
        val_queries_per_id=(1, 2),
        val_gallery_per_id=(3, 4),
        val_distractors=6,
        test_ids=8,
        test_queries_per_id=(1, 2),
        test_gallery_per_id=(3, 4),
        test_distractors=6,
    ),
}
for _name in PRESETS:
    if _name != "default":
        PRESETS[_name] = {**PRESETS["default"], **PRESETS[_name]}

RANGE_KEYS = {k for k, v in PRESETS["default"].items() if isinstance(v, tuple) and k != "size"}
COUNT_KEYS = {"source_ids", "target_train_ids", "target_train_singletons", "val_ids", "val_distractors"}
COUNT_KEYS |= {"test_ids", "test_distractors"}
FRACTION_KEYS = {"target_dress_shift", "channel_mix", "colour_cast", "exposure", "contrast", "shading", "texture"}
FRACTION_KEYS |= {"occlusion_prob"}
CAMERA_KNOBS = ("hue_rotation", "channel_mix", "tone_curve", "colour_cast", "exposure", "contrast", "shading")
CAMERA_KNOBS += ("texture", "downscale", "motion_blur", "blur", "noise", "loose_box", "box_jitter", "truncation")
CAMERA_KNOBS += ("elevation", "passerby", "clutter", "occlusion_prob")  # and jpeg_quality_min (95 = off)
NON_NEGATIVE_KEYS = {"target_style_strength", "hue_rotation", "tone_curve", "motion_blur", "blur", "noise", "clutter"}
NON_NEGATIVE_KEYS |= {"downscale", "loose_box", "box_jitter", "truncation", "elevation", "passerby"}  # clipped

# Palettes (RGB) with a frequency per domain: (colour, source weight, target weight). The source population
# (personX) wears every colour, dark and plain most often. The target population dresses differently: mostly
# dark, plain, long garments, with hues the source never shows (charcoal, olive, burgundy, teal, mustard), so
# coarse clothing colour hardly separates target people; shoes, bags, hair, accents and build must.
UPPER_COLOURS = [
    ((30, 30, 32), 18, 26),
    ((225, 225, 220), 13, 2),
    ((128, 128, 128), 12, 5),
    ((35, 45, 90), 10, 14),
    ((50, 90, 170), 8, 1),
    ((170, 35, 40), 7, 1),
    ((45, 110, 60), 5, 0),
    ((220, 190, 60), 4, 0),
    ((220, 140, 170), 4, 0),
    ((110, 75, 45), 5, 8),
    ((200, 180, 140), 5, 2),
    ((100, 60, 130), 3, 0),
    ((220, 120, 40), 3, 0),
    ((140, 180, 220), 3, 0),
    ((55, 55, 60), 0, 16),  # charcoal: target only
    ((70, 75, 40), 0, 7),  # olive
    ((90, 25, 40), 0, 7),  # burgundy
    ((25, 70, 75), 0, 5),  # dark teal
    ((150, 120, 40), 0, 3),  # mustard
]
LOWER_COLOURS = [
    ((28, 28, 30), 25, 40),
    ((45, 60, 95), 20, 20),
    ((70, 95, 140), 15, 4),
    ((110, 110, 112), 12, 5),
    ((185, 165, 120), 10, 2),
    ((220, 220, 215), 5, 0),
    ((95, 65, 40), 7, 8),
    ((90, 95, 55), 6, 5),
    ((55, 55, 60), 0, 16),  # charcoal: target only
]
# the second colour of a pattern (stripes, logo, print, jacket lining, scarf): bright accents in the target
ACCENT_COLOURS = [(c, s, 0) for c, s, _ in UPPER_COLOURS] + [
    ((230, 230, 225), 0, 14),
    ((200, 40, 45), 0, 12),
    ((240, 200, 50), 0, 12),
    ((60, 110, 200), 0, 12),
    ((60, 160, 90), 0, 10),
    ((240, 130, 40), 0, 10),
    ((230, 140, 180), 0, 10),
    ((140, 200, 230), 0, 10),
]
SHOE_COLOURS = [
    ((235, 235, 235), 30, 28),
    ((25, 25, 25), 35, 24),
    ((100, 70, 40), 15, 12),
    ((120, 120, 120), 10, 8),
    ((180, 40, 40), 5, 10),
    ((40, 70, 150), 5, 10),
    ((230, 210, 40), 0, 8),  # yellow trainers: target only
]
HAIR_COLOURS = [
    ((20, 18, 18), 40, 40),
    ((55, 35, 25), 25, 25),
    ((100, 65, 40), 15, 15),
    ((200, 170, 100), 10, 10),
    ((160, 160, 160), 5, 5),
    ((130, 50, 30), 5, 5),
]
SKIN_TONES = [((245, 215, 190), 1, 1), ((230, 190, 160), 1, 1), ((205, 160, 125), 1, 1)]
SKIN_TONES += [((170, 120, 85), 1, 1), ((130, 90, 60), 1, 1), ((95, 65, 45), 1, 1)]
BAG_COLOURS = [
    ((25, 25, 25), 35, 20),
    ((110, 110, 110), 15, 8),
    ((35, 45, 90), 15, 8),
    ((100, 70, 40), 12, 8),
    ((170, 35, 40), 8, 12),
    ((45, 110, 60), 5, 10),
    ((200, 180, 140), 5, 8),
    ((220, 140, 170), 5, 8),
    ((240, 200, 50), 0, 10),  # target only
    ((60, 110, 200), 0, 10),
    ((230, 230, 225), 0, 8),
]
# categorical attributes: (value, source probability, target probability)
PATTERNS = [
    ("plain", 0.40, 0.42),
    ("hstripes", 0.12, 0.02),
    ("vstripes", 0.05, 0.0),
    ("two_tone", 0.10, 0.04),
    ("front_logo", 0.13, 0.06),
    ("back_print", 0.10, 0.08),
    ("open_jacket", 0.10, 0.14),
    ("checks", 0.0, 0.10),  # target only
    ("scarf", 0.0, 0.14),  # target only
]
LOWER_TYPES = [("trousers", 0.72, 0.94), ("shorts", 0.16, 0.02), ("skirt", 0.12, 0.04)]
HAIR_STYLES = [("short", 0.42, 0.36), ("long", 0.22, 0.22), ("ponytail", 0.12, 0.12), ("bald", 0.08, 0.06)]
HAIR_STYLES += [("cap", 0.16, 0.24)]
BAGS = [("none", 0.40, 0.22), ("backpack", 0.28, 0.36), ("shoulder_bag", 0.20, 0.26), ("handbag", 0.12, 0.16)]
# numeric attributes: (source, target) probability or (low, high) range
LONG_SLEEVES = (0.55, 0.95)
HEIGHT_RANGE = ((0.90, 1.04), (0.86, 1.06))
BUILD_RANGE = ((0.85, 1.2), (0.8, 1.3))
VIEWS = ("front", "back", "side_right", "side_left")  # side_right: facing image-right, the right side visible


# ---------------------------------------------------------------------------------------------------------------
# Configuration and validation


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W), within MIN_SIZE..MAX_SIZE and portrait (H >= W)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--size must look like HxW (e.g. 128x64), got {text!r}")
    return check_size((int(parts[0]), int(parts[1])))


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    height, width = int(size[0]), int(size[1])
    if not (MIN_SIZE[0] <= height <= MAX_SIZE[0] and MIN_SIZE[1] <= width <= MAX_SIZE[1]):
        raise ValueError(
            f"--size {height}x{width} is out of range: height must be in {MIN_SIZE[0]}..{MAX_SIZE[0]} and "
            f"width in {MIN_SIZE[1]}..{MAX_SIZE[1]} (default 128x64)"
        )
    if height < width:
        raise ValueError(f"--size {height}x{width}: pedestrian crops are portrait, height must be >= width")
    return height, width


def build_config(preset: str, size: tuple[int, int] | None, overrides: dict) -> dict:
    """Preset values, then the explicit overrides (None means 'keep the preset'), validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown --preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = dict(PRESETS[preset])
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown generator option(s) {unknown}; known: {sorted(config)}")
    config.update({k: v for k, v in overrides.items() if v is not None})
    if size is not None:
        config["size"] = size
    config["size"] = check_size(config["size"])
    for key in RANGE_KEYS:
        low, high = (int(v) for v in config[key])
        if not 1 <= low <= high:
            raise ValueError(f"--{key.replace('_', '-')} must be MIN-MAX with 1 <= MIN <= MAX, got {low}-{high}")
        config[key] = (low, high)
    for key in COUNT_KEYS:
        config[key] = int(config[key])
        if config[key] < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {config[key]}")
    for key in ("source_ids", "target_train_ids", "val_ids", "test_ids"):
        if config[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    for key in ("source_cameras_per_id", "target_cameras_per_id"):
        cameras = SOURCE_CAMERAS if key.startswith("source") else TARGET_CAMERAS
        if config[key][1] > len(cameras):
            raise ValueError(f"--{key.replace('_', '-')} max is {len(cameras)}, got {config[key][1]}")
    for key in FRACTION_KEYS:
        if not 0.0 <= float(config[key]) <= 1.0:
            raise ValueError(f"--{key.replace('_', '-')} must be in [0, 1], got {config[key]}")
    for key in NON_NEGATIVE_KEYS:
        if float(config[key]) < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {config[key]}")
    if not 5 <= int(config["jpeg_quality_min"]) <= 95:
        raise ValueError(f"--jpeg-quality-min must be in 5..95, got {config['jpeg_quality_min']}")
    return config


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """The one way randomness is obtained: an independent stream per (seed, keys...)."""
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])


def weighted_choice(rng: np.random.Generator, palette: list, target_share: float = 0.0):
    """One entry of a (value, source weight, target weight) palette; target_share in [0, 1] mixes the two
    domains' frequencies (0: the source population, 1: the target population)."""
    source = np.array([entry[1] for entry in palette], dtype=np.float64)
    target = np.array([entry[2] for entry in palette], dtype=np.float64)
    weights = (1.0 - target_share) * source / source.sum() + target_share * target / target.sum()
    return palette[int(rng.choice(len(palette), p=weights / weights.sum()))][0]


def jitter_colour(rng: np.random.Generator, colour, amount: float = 10.0) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.normal(0.0, amount), 0, 255)) for c in colour)


# ---------------------------------------------------------------------------------------------------------------
# Identities, cameras and scenes


def draw_attributes(rng: np.random.Generator, target_share: float) -> dict:
    """A person's appearance drawn from the population priors (target_share 0: source, 1: target)."""

    def lerp(pair: tuple) -> float:
        return (1.0 - target_share) * pair[0] + target_share * pair[1]

    upper = weighted_choice(rng, UPPER_COLOURS, target_share)
    lower = weighted_choice(rng, LOWER_COLOURS, target_share)
    secondary = weighted_choice(rng, ACCENT_COLOURS, target_share)
    while secondary == upper:
        secondary = weighted_choice(rng, ACCENT_COLOURS, target_share)
    height = [lerp((s, t)) for s, t in zip(*HEIGHT_RANGE, strict=True)]
    build = [lerp((s, t)) for s, t in zip(*BUILD_RANGE, strict=True)]
    return dict(
        upper=jitter_colour(rng, upper),
        upper_secondary=jitter_colour(rng, secondary),
        upper_pattern=weighted_choice(rng, PATTERNS, target_share),
        long_sleeves=bool(rng.random() < lerp(LONG_SLEEVES)),
        lower=jitter_colour(rng, lower),
        lower_type=weighted_choice(rng, LOWER_TYPES, target_share),
        shoes=jitter_colour(rng, weighted_choice(rng, SHOE_COLOURS, target_share), 6.0),
        hair=jitter_colour(rng, weighted_choice(rng, HAIR_COLOURS, target_share), 6.0),
        hair_style=weighted_choice(rng, HAIR_STYLES, target_share),
        cap=jitter_colour(rng, weighted_choice(rng, BAG_COLOURS, target_share)),
        skin=jitter_colour(rng, weighted_choice(rng, SKIN_TONES, target_share), 6.0),
        height=float(rng.uniform(*height)),
        build=float(rng.uniform(*build)),
        bag=weighted_choice(rng, BAGS, target_share),
        bag_colour=jitter_colour(rng, weighted_choice(rng, BAG_COLOURS, target_share)),
        bag_side=["left", "right"][int(rng.integers(2))],
    )


def identity_attributes(seed: int, split: str, pid: int, target_dress_shift: float = 1.0) -> dict:
    """The appearance of one person (JSON-serialisable): palette choices plus a small personal colour jitter.
    Source identities follow the source population; every target split follows the target population, mixed
    with the source one by target_dress_shift (0: the target dresses like the source)."""
    rng = rng_for(seed, SPLIT_CODES[split], pid, STREAM_IDENTITY)
    return draw_attributes(rng, 0.0 if split == "source" else float(target_dress_shift))


def hue_rotation_matrix(degrees: float) -> np.ndarray:
    """Rotation of RGB space about the grey axis (1, 1, 1): greys stay, every hue turns by `degrees`."""
    theta = np.deg2rad(degrees)
    k = np.full(3, 1.0 / np.sqrt(3.0))
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.cos(theta) * np.eye(3) + np.sin(theta) * cross + (1.0 - np.cos(theta)) * np.outer(k, k)


def camera_style(seed: int, domain: str, camera: int, config: dict) -> dict:
    """Fixed look of one camera. Source: clean, flat, uniform light, tight boxes. Target: each effect is the knob
    value x --target-style-strength x a per-camera fraction u in [0.4, 1] (signs random), so cameras differ."""
    rng = rng_for(seed, DOMAIN_CODES[domain], camera, STREAM_CAMERA)
    views = rng.dirichlet(np.full(4, 0.8))  # which way people usually walk past this camera
    style = dict(domain=domain, camera=camera, view_probs=[float(v) for v in views])
    fractions = rng.uniform(0.4, 1.0, size=12)
    signs = rng.choice([-1.0, 1.0], size=6)
    cast_direction = rng.normal(0.0, 1.0, size=3)
    cast_direction /= max(np.abs(cast_direction).max(), 1e-6)
    if domain == "source":
        return {**style, "clean": True, "jpeg_quality": 95}
    s = float(config["target_style_strength"])
    more = rng.uniform(0.4, 1.0, size=12)  # fractions of the knobs added for the wider gap (same order always)
    more_signs = rng.choice([-1.0, 1.0], size=4)
    # channel mixing: each output channel takes a share of the others (rows sum to 1: greys stay grey)
    shares = rng.dirichlet(np.ones(3), size=3)
    mix = config["channel_mix"] * s * more[1]
    mixing = (1.0 - mix) * np.eye(3) + mix * shares
    colour_matrix = mixing @ hue_rotation_matrix(config["hue_rotation"] * s * more[0] * more_signs[0])
    gammas = np.exp(config["tone_curve"] * s * more[2] * rng.normal(0.0, 1.0, size=3))
    return {
        **style,
        "clean": s == 0.0,
        "hue_rotation_deg": float(config["hue_rotation"] * s * more[0] * more_signs[0]),
        "colour_matrix": colour_matrix.tolist(),
        "tone_gammas": [float(np.clip(g, 0.4, 2.5)) for g in gammas],
        "channel_gains": [float(1.0 + config["colour_cast"] * s * fractions[0] * c) for c in cast_direction],
        "exposure_gain": float(1.0 + config["exposure"] * s * fractions[1] * signs[0]),
        "exposure_jitter": float(min(0.07, 0.2 * config["exposure"] * s)),
        "contrast": float(max(0.2, 1.0 + config["contrast"] * s * fractions[2] * signs[1])),
        "shading": float(min(0.9, config["shading"] * s * fractions[3])),
        "shading_direction": float(rng.uniform(-1.0, 1.0)),
        "texture": float(config["texture"] * s * fractions[4]),
        # resolution: u in [0.57, 1] for this knob (the default 0.5 gives cameras at 0.5-0.72 of the size)
        "resolution": float(max(0.15, 1.0 - config["downscale"] * s * (0.57 + 0.43 * (more[3] - 0.4) / 0.6))),
        "motion_blur": float(config["motion_blur"] * s * more[4]),
        "blur_sigma": float(config["blur"] * s * fractions[6]),
        "noise_sigma": float(255.0 * config["noise"] * s * fractions[7]),
        "jpeg_quality": int(round(95 - (95 - config["jpeg_quality_min"]) * min(1.0, s) * fractions[8])),
        "person_scale": float(max(0.3, 1.0 - config["loose_box"] * s * more[5])),
        "box_jitter": float(min(0.5, config["box_jitter"] * s)),
        "truncation_prob": float(min(1.0, config["truncation"] * s * (0.5 + more[6]))),
        "elevation": float(min(0.4, config["elevation"] * s * more[7])),
        "passerby_prob": float(min(1.0, config["passerby"] * s * (0.5 + more[8]))),
        "clutter": float(config["clutter"] * s),
        "occlusion_prob": float(min(1.0, config["occlusion_prob"] * s * (0.5 + fractions[9]))),
    }


def make_scene(seed: int, domain: str, camera: int, style: dict, size: tuple[int, int]) -> np.ndarray:
    """The background a camera sees, 3x wider than a crop (each image crops a random window of it)."""
    rng = rng_for(seed, DOMAIN_CODES[domain], camera, STREAM_SCENE)
    height, width = size[0] * SUPERSAMPLING, size[1] * SUPERSAMPLING * 3
    wall = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.55, 0.85))) * 255
    floor = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.45, 0.75))) * 255
    horizon = int(height * rng.uniform(0.55, 0.8))
    image = Image.new("RGB", (width, height), tuple(int(c) for c in wall))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, horizon, width, height], fill=tuple(int(c) for c in floor))
    clutter = 0.0 if style["clean"] else style["clutter"]
    if clutter > 0:

        def muted() -> tuple[int, int, int]:
            hsv = (rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.2, 0.9))
            return tuple(int(c * 255) for c in colorsys.hsv_to_rgb(*hsv))

        for _ in range(int(round(clutter * rng.integers(12, 26)))):  # windows, doors, shop signs
            x0, y0 = rng.uniform(0, width), rng.uniform(0, horizon * 0.95)
            w, h = rng.uniform(0.05, 0.4) * size[1] * SUPERSAMPLING, rng.uniform(0.05, 0.5) * height
            draw.rectangle([x0, y0, x0 + w, min(y0 + h, horizon)], fill=muted())
        for _ in range(int(round(clutter * rng.integers(2, 6)))):  # poles and posts
            x0 = rng.uniform(0, width)
            draw.rectangle([x0, rng.uniform(0, horizon * 0.5), x0 + rng.uniform(2, 6), horizon + 4], fill=muted())
        for _ in range(int(round(clutter * rng.integers(1, 5)))):  # bushes, bins, benches at the horizon
            x0, w = rng.uniform(0, width), rng.uniform(0.1, 0.5) * size[1] * SUPERSAMPLING
            h = rng.uniform(0.05, 0.2) * height
            draw.ellipse([x0, horizon - h, x0 + w, horizon + h * 0.3], fill=muted())
        step = rng.uniform(0.04, 0.1) * height  # paving lines
        line = tuple(int(c * 0.8) for c in floor)
        y = horizon + step
        while y < height:
            draw.line([0, y, width, y], fill=line, width=1)
            y += step
            step *= 1.25
        image = image.filter(ImageFilter.GaussianBlur(0.8))
    return np.asarray(image, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Drawing one pedestrian


def quad(p0, p1, width0: float, width1: float | None = None) -> list[tuple[float, float]]:
    """A limb from p0 to p1 as a quadrilateral with the given widths at its two ends."""
    width1 = width0 if width1 is None else width1
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    length = max(np.hypot(dx, dy), 1e-6)
    nx, ny = -dy / length, dx / length
    return [
        (x0 + nx * width0 / 2, y0 + ny * width0 / 2),
        (x1 + nx * width1 / 2, y1 + ny * width1 / 2),
        (x1 - nx * width1 / 2, y1 - ny * width1 / 2),
        (x0 - nx * width0 / 2, y0 - ny * width0 / 2),
    ]


def shade(colour, factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)


def draw_person(
    draw: ImageDraw.ImageDraw, person: dict, view: str, cx: float, feet: float, h: float, stride: float, swing: float
) -> None:
    """Draw a pedestrian of height h (canvas pixels) standing with feet at y=feet, centred at x=cx."""
    y = lambda f: feet - h + f * h  # noqa: E731  (f = fraction of the body height from the top of the head)
    bw = person["build"]
    side = view.startswith("side")
    facing = 1.0 if view == "side_right" else -1.0  # side views: +1 = facing image-right
    # Which side of the body is on the image right: front view shows the person's left on the right.
    right_on_image_right = view == "back"
    visible_side = "right" if view == "side_right" else "left"
    skin, upper, lower, shoes = person["skin"], person["upper"], person["lower"], person["shoes"]
    limb_colour_lower = skin if person["lower_type"] != "trousers" else lower
    leg_w, arm_w = 0.085 * h * bw, 0.06 * h * bw
    hip_y, knee_y, ankle_y = y(0.50), y(0.72), y(0.95)

    def leg(x_hip: float, angle: float, factor: float) -> None:
        dx, dy = np.sin(angle), np.cos(angle)
        foot = (x_hip + dx * (ankle_y - hip_y), hip_y + dy * (ankle_y - hip_y))
        knee = (x_hip + dx * (knee_y - hip_y), hip_y + dy * (knee_y - hip_y))
        thigh_colour = lower if person["lower_type"] != "skirt" else skin
        draw.polygon(quad((x_hip, hip_y), knee, leg_w, leg_w * 0.9), fill=shade(thigh_colour, factor))
        draw.polygon(quad(knee, foot, leg_w * 0.9, leg_w * 0.8), fill=shade(limb_colour_lower, factor))
        if person["lower_type"] == "shorts":  # shorts cover the upper thigh only
            mid = ((x_hip + knee[0]) / 2 + dx * 0.02 * h, (hip_y + knee[1]) / 2 + 0.03 * h)
            draw.polygon(quad((x_hip, hip_y), mid, leg_w * 1.1), fill=shade(lower, factor))
            draw.polygon(quad(mid, knee, leg_w * 0.9), fill=shade(skin, factor))
        toe = 0.06 * h * (facing if side else 0.0)
        draw.ellipse(
            [
                foot[0] - leg_w * 0.6 + min(toe, 0),
                foot[1] - 0.025 * h,
                foot[0] + leg_w * 0.6 + max(toe, 0),
                foot[1] + 0.03 * h,
            ],
            fill=shade(shoes, factor),
        )

    def arm(x_shoulder: float, angle: float, factor: float) -> None:
        shoulder = (x_shoulder, y(0.18))
        elbow = (x_shoulder + np.sin(angle) * 0.17 * h, y(0.18) + np.cos(angle) * 0.17 * h)
        hand = (elbow[0] + np.sin(angle * 1.3) * 0.17 * h, elbow[1] + np.cos(angle * 1.3) * 0.17 * h)
        draw.polygon(quad(shoulder, elbow, arm_w), fill=shade(upper, factor))
        forearm = upper if person["long_sleeves"] else skin
        draw.polygon(quad(elbow, hand, arm_w * 0.9, arm_w * 0.8), fill=shade(forearm, factor))
        draw.ellipse(
            [hand[0] - arm_w * 0.5, hand[1] - arm_w * 0.5, hand[0] + arm_w * 0.5, hand[1] + arm_w * 0.6],
            fill=shade(skin, factor),
        )
        return hand

    # torso outline: shoulders at 0.16, waist at 0.52
    half_shoulder, half_waist = (0.075 * h * bw, 0.07 * h * bw) if side else (0.13 * h * bw, 0.10 * h * bw)
    torso_top, torso_bottom = y(0.16), y(0.53)
    lean = 0.02 * h * facing if side else 0.0
    torso = [
        (cx - half_shoulder + lean, torso_top),
        (cx + half_shoulder + lean, torso_top),
        (cx + half_waist, torso_bottom),
        (cx - half_waist, torso_bottom),
    ]

    def torso_band(f0: float, f1: float, colour) -> None:
        """Horizontal band of the torso between body fractions f0 and f1 (follows the trapezoid)."""

        def half(fy: float) -> float:
            t = (fy - 0.16) / 0.37
            return half_shoulder + (half_waist - half_shoulder) * t

        def shift(fy: float) -> float:
            return lean * (1 - (fy - 0.16) / 0.37)

        draw.polygon(
            [
                (cx - half(f0) + shift(f0), y(f0)),
                (cx + half(f0) + shift(f0), y(f0)),
                (cx + half(f1) + shift(f1), y(f1)),
                (cx - half(f1) + shift(f1), y(f1)),
            ],
            fill=colour,
        )

    bag_on_right_of_image = (person["bag_side"] == "right") == right_on_image_right
    backpack_box = None
    if person["bag"] == "backpack":
        if side:
            x_back = cx - facing * (half_shoulder + 0.06 * h)
            backpack_box = [
                min(x_back, cx - facing * half_shoulder * 0.6),
                y(0.18),
                max(x_back, cx - facing * half_shoulder * 0.6),
                y(0.42),
            ]
    # far limbs (side view) drawn first and darker
    if side:
        arm(cx - 0.02 * h * facing, -swing * facing, 0.75)
        leg(cx, stride * 0.45 * facing, 0.75)
        leg(cx, -stride * 0.45 * facing, 1.0)
    else:  # from the front or back a stride only spreads the feet a little
        leg(cx - 0.05 * h * bw, -0.04 * abs(stride), 1.0)
        leg(cx + 0.05 * h * bw, 0.04 * abs(stride), 1.0)
    if person["lower_type"] == "skirt":
        draw.polygon(
            [
                (cx - half_waist, y(0.48)),
                (cx + half_waist, y(0.48)),
                (cx + half_waist * 1.5 + 0.01 * h, y(0.70)),
                (cx - half_waist * 1.5 - 0.01 * h, y(0.70)),
            ],
            fill=lower,
        )
    else:
        draw.polygon(
            [
                (cx - half_waist, y(0.48)),
                (cx + half_waist, y(0.48)),
                (cx + half_waist, y(0.56)),
                (cx - half_waist, y(0.56)),
            ],
            fill=lower,
        )
    if person["bag"] == "backpack" and side and backpack_box is not None:
        draw.rounded_rectangle(backpack_box, radius=0.02 * h, fill=person["bag_colour"])
    if person["hair_style"] == "long" and not side and view == "front":
        draw.rectangle([cx - 0.07 * h, y(0.05), cx + 0.07 * h, y(0.22)], fill=person["hair"])
    if not side:
        arm(cx - half_shoulder - arm_w * 0.3, 0.12 + 0.1 * swing, 1.0)
        arm(cx + half_shoulder + arm_w * 0.3, -0.12 - 0.1 * swing, 1.0)
    draw.polygon(torso, fill=upper)

    # clothing pattern, some only visible from one side
    second = person["upper_secondary"]
    pattern = person["upper_pattern"]
    if pattern == "hstripes":
        for k in range(4):
            torso_band(0.20 + k * 0.085, 0.24 + k * 0.085, second)
    elif pattern == "vstripes" and not side:
        for k in (-2, 0, 2):
            x0 = cx + k * 0.04 * h * bw
            draw.rectangle([x0 - 0.012 * h, y(0.17), x0 + 0.012 * h, y(0.52)], fill=second)
    elif pattern == "two_tone":
        torso_band(0.35, 0.53, second)
    elif pattern == "front_logo" and view == "front":
        draw.ellipse([cx - 0.05 * h, y(0.24), cx + 0.05 * h, y(0.33)], fill=second)
    elif pattern == "back_print" and view == "back":
        draw.rectangle([cx - 0.08 * h, y(0.21), cx + 0.08 * h, y(0.38)], fill=second)
    elif pattern == "open_jacket" and view == "front":
        draw.rectangle([cx - 0.035 * h * bw, y(0.16), cx + 0.035 * h * bw, y(0.53)], fill=second)
    elif pattern == "checks":  # a checked shirt: thin bands both ways (target population only by default)
        for k in range(5):
            torso_band(0.19 + k * 0.07, 0.205 + k * 0.07, second)
        if not side:
            for k in (-3, -1, 1, 3):
                x0 = cx + k * 0.03 * h * bw
                draw.rectangle([x0 - 0.006 * h, y(0.17), x0 + 0.006 * h, y(0.52)], fill=second)
    elif pattern == "open_jacket" and side:
        x_front = cx + facing * half_waist * 0.8
        draw.rectangle(
            [min(x_front, x_front + facing * 0.02 * h), y(0.18), max(x_front, x_front + facing * 0.02 * h), y(0.52)],
            fill=second,
        )

    # bags
    bag = person["bag"]
    if bag == "backpack" and view == "back":
        draw.rounded_rectangle(
            [cx - 0.1 * h * bw, y(0.18), cx + 0.1 * h * bw, y(0.44)], radius=0.025 * h, fill=person["bag_colour"]
        )
        draw.rectangle(
            [cx - 0.07 * h * bw, y(0.33), cx + 0.07 * h * bw, y(0.41)], fill=shade(person["bag_colour"], 0.7)
        )
    elif bag == "backpack" and view == "front":  # only the straps
        for sx in (-1, 1):
            x0 = cx + sx * 0.075 * h * bw
            draw.polygon(quad((x0, y(0.165)), (x0 + sx * 0.01 * h, y(0.34)), 0.025 * h), fill=person["bag_colour"])
    elif bag == "shoulder_bag":
        if side:
            if person["bag_side"] == visible_side:
                draw.line(
                    [cx - 0.03 * h * facing, y(0.17), cx + 0.01 * h * facing, y(0.48)],
                    fill=person["bag_colour"],
                    width=max(1, int(0.015 * h)),
                )
                draw.rounded_rectangle(
                    [cx - 0.06 * h, y(0.44), cx + 0.06 * h, y(0.58)], radius=0.015 * h, fill=person["bag_colour"]
                )
        else:
            sx = 1.0 if bag_on_right_of_image else -1.0
            draw.line(
                [cx + sx * 0.09 * h * bw, y(0.17), cx - sx * 0.08 * h * bw, y(0.47)],
                fill=person["bag_colour"],
                width=max(1, int(0.018 * h)),
            )
            x0 = cx - sx * (half_waist + 0.02 * h)
            draw.rounded_rectangle(
                [x0 - 0.055 * h, y(0.44), x0 + 0.055 * h, y(0.57)], radius=0.015 * h, fill=person["bag_colour"]
            )

    # near arm (side view) over the torso
    hand = arm(cx + 0.02 * h * facing, swing * facing, 1.0) if side else None
    if bag == "handbag":
        if side and person["bag_side"] == visible_side and hand is not None:
            hx, hy = hand
        elif not side:
            sx = 1.0 if bag_on_right_of_image else -1.0
            hx, hy = cx + sx * (half_shoulder + arm_w * 0.5), y(0.52)
        else:
            hx = hy = None
        if hx is not None:
            draw.rectangle([hx - 0.045 * h, hy, hx + 0.045 * h, hy + 0.09 * h], fill=person["bag_colour"])

    # neck and head
    draw.rectangle([cx - 0.025 * h, y(0.11), cx + 0.025 * h, y(0.17)], fill=skin)
    head = [cx - 0.052 * h, y(0.0), cx + 0.052 * h, y(0.13)]
    hair, style = person["hair"], person["hair_style"]
    # hair hanging behind the head (over the back when seen from behind)
    if style == "long" and view != "front":
        x_back = cx - facing * 0.03 * h if side else cx
        draw.rectangle([x_back - 0.05 * h, y(0.06), x_back + 0.05 * h, y(0.24)], fill=hair)
    if style == "ponytail" and view != "front":
        x_tail = cx - facing * 0.06 * h if side else cx
        draw.ellipse([x_tail - 0.02 * h, y(0.05), x_tail + 0.02 * h, y(0.17)], fill=hair)
    draw.ellipse(head, fill=skin)
    if pattern == "scarf":  # a scarf around the neck, its ends hanging in front
        draw.rectangle([cx - 0.06 * h, y(0.125), cx + 0.06 * h, y(0.185)], fill=second)
        if view == "front":
            draw.rectangle([cx + 0.01 * h, y(0.18), cx + 0.045 * h, y(0.34)], fill=second)
        elif side:
            x_end = cx + facing * 0.04 * h
            draw.rectangle([min(x_end, cx), y(0.18), max(x_end, cx), y(0.3)], fill=second)
    if style == "cap":
        draw.chord([head[0], head[1] - 0.01 * h, head[2], head[3] - 0.03 * h], 180, 360, fill=person["cap"])
        brim = facing if side else 0.0
        if view == "front" or side:
            draw.rectangle(
                [cx - 0.05 * h + min(brim, 0) * 0.05 * h, y(0.045), cx + 0.05 * h + max(brim, 0) * 0.05 * h, y(0.06)],
                fill=person["cap"],
            )
        elif view == "back":
            draw.ellipse(head, fill=hair)
            draw.chord([head[0], head[1] - 0.01 * h, head[2], head[3] - 0.03 * h], 180, 360, fill=person["cap"])
    elif style != "bald":
        if view == "back":
            draw.ellipse(head, fill=hair)
        elif side:
            draw.pieslice(head, 90 if facing > 0 else -90, 270 if facing > 0 else 90, fill=hair)
            draw.chord([head[0], head[1], head[2], head[3] - 0.06 * h], 180, 360, fill=hair)
        else:
            draw.chord([head[0], head[1], head[2], head[3] - 0.07 * h], 180, 360, fill=hair)
    if view == "front":
        eye = max(1.0, 0.008 * h)
        for sx in (-1, 1):
            ex = cx + sx * 0.02 * h
            draw.ellipse([ex - eye, y(0.065) - eye, ex + eye, y(0.065) + eye], fill=(30, 25, 25))


def draw_occluder(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    """Something between the camera and the person: a pole, a passer-by or an object at the bottom."""
    colour = tuple(int(c) for c in rng.uniform(20, 200, size=3))
    kind = int(rng.integers(3))
    if kind == 0:
        x0 = rng.uniform(0, width)
        draw.rectangle([x0, 0, x0 + rng.uniform(0.06, 0.14) * width, height], fill=colour)
    elif kind == 1:
        from_left = rng.random() < 0.5
        reach = rng.uniform(0.2, 0.4) * width
        x0, x1 = (-0.5 * width, reach) if from_left else (width - reach, 1.5 * width)
        draw.rounded_rectangle([x0, rng.uniform(0.1, 0.3) * height, x1, height * 1.1], radius=width * 0.15, fill=colour)
    else:
        draw.rectangle([-1, height * (1 - rng.uniform(0.15, 0.35)), width + 1, height], fill=colour)


# ---------------------------------------------------------------------------------------------------------------
# Rendering one image (runs in worker processes)


def perspective_coefficients(width: float, height: float, elevation: float) -> tuple[float, ...]:
    """PIL PERSPECTIVE data for an elevated camera looking down: the output's top edge shows a narrower strip
    of the canvas than its bottom edge (the head comes out larger than the feet and the legs foreshortened)."""
    inset = elevation * width / 2
    output = [(0.0, 0.0), (width, 0.0), (width, height), (0.0, height)]
    source = [(inset, 0.0), (width - inset, 0.0), (width, height), (0.0, height)]
    rows, values = [], []
    for (x, y), (u, v) in zip(output, source, strict=True):  # u = (a x + b y + c) / (g x + h y + 1), same for v
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        values += [u, v]
    return tuple(float(c) for c in np.linalg.solve(np.array(rows), np.array(values)))


def camera_colour(pixels: np.ndarray, style: dict, rng: np.random.Generator) -> np.ndarray:
    """A camera's colour rendering, float HxWx3 in 0..255: colour matrix (hue rotation about the grey axis and
    channel mixing), per-channel tone curve, white-balance gains, exposure and contrast."""
    if "colour_matrix" in style:
        pixels = pixels @ np.asarray(style["colour_matrix"], dtype=np.float32).T
    if "tone_gammas" in style:
        pixels = 255.0 * (np.clip(pixels, 0, 255) / 255.0) ** np.asarray(style["tone_gammas"], dtype=np.float32)
    gains = np.asarray(style.get("channel_gains", (1.0, 1.0, 1.0)), dtype=np.float32) * style.get("exposure_gain", 1.0)
    jitter = style.get("exposure_jitter", 0.0)  # the light changes a little from image to image
    gains = gains * rng.uniform(1.0 - jitter, 1.0 + jitter)
    pixels = pixels * gains
    if style.get("contrast", 1.0) != 1.0:
        mean = pixels.mean()
        pixels = (pixels - mean) * style["contrast"] + mean
    return pixels


def motion_blur(pixels: np.ndarray, length: float) -> np.ndarray:
    """Horizontal motion blur: the average over a `length`-pixel horizontal segment (fractional ends)."""
    if length <= 1.0:
        return pixels
    half = (length - 1.0) / 2.0
    reach = int(np.ceil(half))
    weights = np.array([min(1.0, half + 1.0 - abs(k)) for k in range(-reach, reach + 1)], dtype=np.float32)
    weights /= weights.sum()
    padded = np.pad(pixels, ((0, 0), (reach, reach), (0, 0)), mode="edge")
    width = pixels.shape[1]
    return sum(w * padded[:, k : k + width] for k, w in enumerate(weights))


def render_image(
    job: dict, person: dict, style: dict, scene: np.ndarray, size: tuple[int, int], passerby_share: float = 1.0
) -> Image.Image:
    """One crop: background window, pedestrian, passer-by, occluder, then the camera's geometry and imaging.
    The pose (view, stride, framing of the source) comes from the job's own stream and is the same whichever
    camera renders the job (the perfect-translator control); everything the camera adds has a second stream."""
    rng = rng_for(*job["rng_key"])
    camera_rng = rng_for(*job["rng_key"], STREAM_CAMERA_SIDE)
    height, width = size
    ch, cw = height * SUPERSAMPLING, width * SUPERSAMPLING
    x0 = int(rng.integers(0, scene.shape[1] - cw + 1))
    canvas = Image.fromarray(scene[:, x0 : x0 + cw])
    draw = ImageDraw.Draw(canvas)
    view = job["view"]
    h = ch * rng.uniform(0.80, 0.94) * person["height"]
    feet = ch * rng.uniform(0.95, 1.03)
    cx = cw / 2 + rng.uniform(-0.1, 0.1) * cw
    stride, swing = float(rng.uniform(-1, 1)), float(rng.uniform(-0.5, 0.5))
    clean = style.get("clean", False)
    if not clean:
        # detector boxes: looser (the person smaller, not standing on the lower edge), jittered, sometimes cut
        scale = style.get("person_scale", 1.0)
        jitter = style.get("box_jitter", 0.0)
        h *= scale * camera_rng.uniform(1.0 - jitter, 1.0 + jitter)
        feet -= (1.0 - scale) * ch * camera_rng.uniform(0.2, 0.8)
        cx += camera_rng.uniform(-1.0, 1.0) * jitter * cw
        feet += camera_rng.uniform(-1.0, 1.0) * jitter * 0.5 * h
        if camera_rng.random() < style.get("truncation_prob", 0.0):
            cut = int(camera_rng.integers(3))
            if cut == 0:  # feet cut off
                feet = ch + camera_rng.uniform(0.12, 0.3) * h
            elif cut == 1:  # head cut off
                feet = h * (1.0 - camera_rng.uniform(0.08, 0.2))
            else:  # part of the body outside the box
                cx = cw / 2 + (1 if camera_rng.random() < 0.5 else -1) * camera_rng.uniform(0.3, 0.42) * cw
    passerby = None
    if not clean and camera_rng.random() < style.get("passerby_prob", 0.0):
        # another pedestrian of the target population, partly inside the box, behind or in front
        other = draw_attributes(rng_for(*job["rng_key"], STREAM_PASSERBY), passerby_share)
        side = 1.0 if camera_rng.random() < 0.5 else -1.0
        passerby = dict(
            person=other,
            view=VIEWS[int(camera_rng.integers(4))],
            cx=cw / 2 + side * camera_rng.uniform(0.45, 0.7) * cw,
            feet=feet + camera_rng.uniform(-0.05, 0.08) * ch,
            h=h * camera_rng.uniform(0.85, 1.15) * other["height"] / person["height"],
            stride=float(camera_rng.uniform(-1, 1)),
            swing=float(camera_rng.uniform(-0.5, 0.5)),
            in_front=bool(camera_rng.random() < 0.4),
        )

    def draw_passerby() -> None:
        p = passerby
        draw_person(draw, p["person"], p["view"], p["cx"], p["feet"], p["h"], p["stride"], p["swing"])

    if passerby is not None and not passerby["in_front"]:
        draw_passerby()
    draw_person(draw, person, view, cx, feet, h, stride=stride, swing=swing)
    if passerby is not None and passerby["in_front"]:
        draw_passerby()
    if not clean and camera_rng.random() < style.get("occlusion_prob", 0.0):
        draw_occluder(draw, camera_rng, cw, ch)
    if style.get("elevation", 0.0) > 0:
        coefficients = perspective_coefficients(cw, ch, style["elevation"])
        canvas = canvas.transform((cw, ch), Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BILINEAR)
    image = canvas.resize((width, height), Image.Resampling.BOX)
    if clean:
        return image
    pixels = np.asarray(image, dtype=np.float32)
    if style.get("texture", 0.0) > 0:  # low-frequency surface texture (the source is flat)
        noise = camera_rng.normal(0.0, 1.0, size=(max(2, height // 8), max(2, width // 8))).astype(np.float32)
        noise_image = Image.fromarray(noise).resize((width, height), Image.Resampling.BILINEAR)
        pixels *= 1.0 + style["texture"] * np.asarray(noise_image)[..., None]
    if style.get("shading", 0.0) > 0:  # light from one side and from above
        xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
        ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
        light = 1.0 + style["shading"] * (0.5 * style.get("shading_direction", 0.0) * xs - 0.35 * ys)
        pixels *= light[..., None]
    pixels = camera_colour(pixels, style, camera_rng)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    resolution = 1.0 - (1.0 - style.get("resolution", 1.0)) * camera_rng.uniform(0.8, 1.2)  # varies per image
    if resolution < 0.97:  # the person covers few sensor pixels: shrink, then enlarge to the crop size
        small = (max(4, round(width * resolution)), max(8, round(height * resolution)))
        image = image.resize(small, Image.Resampling.BILINEAR).resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    if style.get("motion_blur", 0.0) > 0:  # the person walks during the exposure
        pixels = motion_blur(pixels, 1.0 + style["motion_blur"] * camera_rng.uniform(0.3, 1.0) * width / 64)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if style.get("blur_sigma", 0.0) > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(style["blur_sigma"] * width / 64))
    if style.get("noise_sigma", 0.0) > 0:
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels + camera_rng.normal(0.0, style["noise_sigma"], size=(height, width, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality), optimize=False, subsampling=2)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a hidden temp file in the same folder, then rename: a crash never leaves a half-written file."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as handle:
        handle.write(data)
    os.replace(temp, path)


_WORKER: dict = {}  # per-process read-only state (set by init_worker): styles, scenes, identities, config


def init_worker(state: dict) -> None:
    _WORKER.clear()
    _WORKER.update(state)


def render_jobs(jobs: list[dict]) -> int:
    """Render and write a chunk of jobs using the state given to init_worker."""
    for job in jobs:
        style = _WORKER["styles"][job["camera_key"]]
        image = render_image(
            job,
            _WORKER["identities"][job["identity_key"]],
            style,
            _WORKER["scenes"][job["camera_key"]],
            _WORKER["size"],
            _WORKER["passerby_share"],
        )
        root = Path(job["root"]) if "root" in job else _WORKER["root"]
        write_atomic(root / job["path"], encode_jpeg(image, style["jpeg_quality"]))
    return len(jobs)


# ---------------------------------------------------------------------------------------------------------------
# Planning: which identity is seen by which camera how often (all in the main process, from the seed)


def split_counts(rng: np.random.Generator, total: int, cameras: list[int]) -> dict[int, int]:
    """Distribute total images over cameras, at least one per camera when possible."""
    counts = dict.fromkeys(cameras, 0)
    for camera in cameras[: min(total, len(cameras))]:
        counts[camera] = 1
    for _ in range(total - sum(counts.values())):
        counts[cameras[int(rng.integers(len(cameras)))]] += 1
    return counts


def tracklet_views(rng: np.random.Generator, style: dict, count: int) -> list[str]:
    """A person walks past a camera in one direction: mostly one view, sometimes another."""
    main = VIEWS[int(rng.choice(4, p=style["view_probs"]))]
    return [main if rng.random() < 0.75 else VIEWS[int(rng.integers(4))] for _ in range(count)]


def plan_identity_images(
    seed: int, split: str, pid: int, total: int, cameras_per_id: tuple[int, int], domain: str, styles: dict
) -> list[dict]:
    """The (camera, view) of each image of one identity, with its own random key."""
    rng = rng_for(seed, SPLIT_CODES[split], pid, STREAM_PLAN)
    all_cameras = SOURCE_CAMERAS if domain == "source" else TARGET_CAMERAS
    n_cameras = int(rng.integers(cameras_per_id[0], cameras_per_id[1] + 1))
    cameras = sorted(int(c) for c in rng.choice(all_cameras, size=n_cameras, replace=False))
    counts = split_counts(rng, total, cameras)
    jobs = []
    for camera in cameras:
        for view in tracklet_views(rng, styles[(domain, camera)], counts[camera]):
            index = len(jobs)
            jobs.append(
                dict(
                    split=split,
                    pid=pid,
                    camera=camera,
                    view=view,
                    domain=domain,
                    identity_key=(split, pid),
                    camera_key=(domain, camera),
                    rng_key=(seed, SPLIT_CODES[split], pid, index, STREAM_IMAGE),
                )
            )
    return jobs


def plan(seed: int, config: dict, styles: dict) -> dict[str, list[dict]]:
    """Every image of every split, without file names yet."""

    def count(split: str, pid: int, key: str, extra: int = 0) -> int:
        low, high = config[key]
        return int(rng_for(seed, SPLIT_CODES[split], pid, STREAM_PLAN, 7 + extra).integers(low, high + 1))

    jobs: dict[str, list[dict]] = {}
    jobs["source"] = [
        job
        for pid in range(1, config["source_ids"] + 1)
        for job in plan_identity_images(
            seed,
            "source",
            pid,
            count("source", pid, "source_images_per_id"),
            config["source_cameras_per_id"],
            "source",
            styles,
        )
    ]
    train = [
        job
        for pid in range(1, config["target_train_ids"] + 1)
        for job in plan_identity_images(
            seed,
            "target_train",
            pid,
            count("target_train", pid, "target_train_images_per_id"),
            config["target_cameras_per_id"],
            "target",
            styles,
        )
    ]
    for k in range(config["target_train_singletons"]):  # passers-by seen once (DBSCAN outliers)
        train += plan_identity_images(seed, "target_train_singletons", k + 1, 1, (1, 1), "target", styles)
    jobs["target_train"] = train
    for split in ("val", "test"):
        queries, gallery = [], []
        for pid in range(1, config[f"{split}_ids"] + 1):
            n_query = count(split, pid, f"{split}_queries_per_id")
            n_gallery = count(split, pid, f"{split}_gallery_per_id", extra=1)
            # cameras >= 2 and every camera gets a gallery image first: each query camera has a gallery match
            # in another camera
            cams = (max(2, config["target_cameras_per_id"][0]), max(2, config["target_cameras_per_id"][1]))
            person_jobs = plan_identity_images(seed, split, pid, n_query + n_gallery, cams, "target", styles)
            camera_list = sorted({job["camera"] for job in person_jobs})
            first_per_camera = {camera: next(j for j in person_jobs if j["camera"] == camera) for camera in camera_list}
            rest = [j for j in person_jobs if j not in first_per_camera.values()]
            order = rng_for(seed, SPLIT_CODES[split], pid, STREAM_PLAN, 9).permutation(len(rest))
            rest = [rest[i] for i in order]
            n_query = min(n_query, len(rest)) if len(rest) else 0
            if n_query == 0:  # take a query from the gallery's extra camera images
                n_query = 1
                rest = [first_per_camera.pop(camera_list[0])] + rest
                # the popped camera still needs a gallery image elsewhere: other cameras exist (>= 2)
            queries += rest[:n_query]
            gallery += list(first_per_camera.values()) + rest[n_query:]
        for k in range(config[f"{split}_distractors"]):  # distractors: other people, 1 image each, pid 0
            gallery += plan_identity_images(seed, f"{split}_distractors", k + 1, 1, (1, 1), "target", styles)
        jobs[f"{split}_query"], jobs[f"{split}_gallery"] = queries, gallery
    return jobs


def assign_names(seed: int, jobs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """File names and relative paths in the VisDA-2020 conventions."""
    frames: dict[tuple, int] = {}
    for job in jobs["source"]:  # 0001_c3s1_000124_00.jpg; frames increase within each (pid, camera)
        key = (job["pid"], job["camera"])
        frames[key] = frames.get(key, 0) + 1
        frame = 24 * frames[key] + 100 * job["camera"]
        job["name"] = f"{job['pid']:04d}_c{job['camera']}s1_{frame:06d}_00.jpg"
        job["path"] = f"personX/image_train/{job['name']}"
    # target training: sequential numbers in a shuffled order, no identity in the name
    train = jobs["target_train"]
    order = rng_for(seed, SPLIT_CODES["target_train"], 0, STREAM_PLAN, 11).permutation(len(train))
    jobs["target_train"] = [train[i] for i in order]
    digits = max(5, len(str(len(train) - 1)))
    for number, job in enumerate(jobs["target_train"]):
        job["name"] = f"{number:0{digits}d}.jpg"
        job["path"] = f"target_training/image_train/{job['name']}"
    # validation: <pid>_c<cam>s1_<frame>_<k>.jpg, pid 0 = distractor; frame = serial over query + gallery
    serial = 0
    for part, folder in (("val_query", "image_query"), ("val_gallery", "image_gallery")):
        for job in jobs[part]:
            serial += 1
            pid = 0 if job["split"].endswith("distractors") else job["pid"]
            job["label_pid"] = pid
            job["name"] = f"{pid:04d}_c{job['camera']}s1_{serial * 7:06d}_01.jpg"
            job["path"] = f"target_validation/{folder}/{job['name']}"
        jobs[part].sort(key=lambda j: j["name"])
    # test: shuffled, numbered 0000.jpg
    for part, folder in (("test_query", "image_query"), ("test_gallery", "image_gallery")):
        items = jobs[part]
        order = rng_for(seed, SPLIT_CODES["test"], 0, STREAM_PLAN, 12 if part == "test_query" else 13)
        jobs[part] = [items[i] for i in order.permutation(len(items))]
        digits = max(4, len(str(len(items) - 1)))
        for number, job in enumerate(jobs[part]):
            job["label_pid"] = 0 if job["split"].endswith("distractors") else job["pid"]
            job["name"] = f"{number:0{digits}d}.jpg"
            job["path"] = f"target_test/{folder}/{job['name']}"
    return jobs


# ---------------------------------------------------------------------------------------------------------------
# Text files, contact sheet, driver


def write_text(path: Path, lines: list[str]) -> None:
    write_atomic(path, ("\n".join(lines) + "\n").encode() if lines else b"")


def make_contact_sheet(root: Path, jobs: dict[str, list[dict]], columns: int = 8) -> Image.Image:
    """Rows: each source camera, then each target camera (target training images); label on the left."""
    rows: list[tuple[str, list[Path]]] = []
    for domain, part, cameras in (("source", "source", SOURCE_CAMERAS), ("target", "target_train", TARGET_CAMERAS)):
        for camera in cameras:
            paths = [root / j["path"] for j in jobs[part] if j["camera"] == camera]
            step = max(1, len(paths) // columns)
            rows.append((f"{domain} c{camera}", paths[::step][:columns]))
    first = Image.open(rows[0][1][0])
    width, height = first.size
    label_width = 70
    sheet = Image.new("RGB", (label_width + columns * (width + 2), len(rows) * (height + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, paths) in enumerate(rows):
        draw.text((4, r * (height + 2) + height // 2 - 5), label, fill=(0, 0, 0))
        for c, path in enumerate(paths):
            with Image.open(path) as image:
                sheet.paste(image.convert("RGB"), (label_width + c * (width + 2), r * (height + 2)))
    return sheet


TRANSLATOR_ENTRIES = ("personX", "diagnostics")  # what --translator-out holds (removed there by --overwrite)


def prepare_output(out: Path, overwrite: bool, entries: tuple[str, ...] = GENERATED_ENTRIES) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} is not empty; refusing to write into it. Pass --overwrite to replace the generated "
                f"dataset there (removes {', '.join(entries)})"
            )
        for name in entries:
            entry = out / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
        for entry in out.iterdir():
            print(f"make_demo_data: note: leaving {entry} (not written by this script)", file=sys.stderr)
    folders = ["personX/image_train", "diagnostics"]
    if entries == GENERATED_ENTRIES:
        folders += ["target_training/image_train", "target_validation/image_query", "target_validation/image_gallery"]
        folders += ["target_test/image_query", "target_test/image_gallery"]
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)


def translator_camera_map(seed: int) -> dict[int, int]:
    """Which target camera re-renders each source camera in the perfect-translator control: the same number
    where the target has it, a seeded choice for source camera 3 (the target has no camera 3)."""
    spare = int(rng_for(seed, STREAM_TRANSLATOR).choice(TARGET_CAMERAS))
    return {c: (c if c in TARGET_CAMERAS else spare) for c in SOURCE_CAMERAS}


def translator_jobs(seed: int, source_jobs: list[dict], root: Path) -> list[dict]:
    """The perfect-translator control: every source job (same identity, view, pose, file name) rendered by a
    target camera (its colour, geometry, resolution, clutter and scene) - the camera side of the gap only."""
    camera_map = translator_camera_map(seed)
    return [{**job, "camera_key": ("target", camera_map[job["camera"]]), "root": str(root)} for job in source_jobs]


def generate(
    out: Path,
    preset: str = "default",
    seed: int = 0,
    size: tuple[int, int] | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    translator_out: Path | None = None,
    **overrides,
) -> dict:
    """Write the benchmark under `out`; returns the summary (counts per split, config, seconds). With
    `translator_out`, also write the perfect-translator control there (personX/ re-rendered by the target
    cameras; train on it with pretrain.py --data-root translator_out --target-root out)."""
    start = time.time()
    config = build_config(preset, size, overrides)
    workers = min(2, os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    out = Path(out)
    if translator_out is not None:
        translator_out = Path(translator_out)
        if translator_out.resolve() == out.resolve():
            raise ValueError("--translator-out must be a different folder from --out")
        prepare_output(translator_out, overwrite, TRANSLATOR_ENTRIES)
    prepare_output(out, overwrite)

    styles = {
        (d, c): camera_style(seed, d, c, config)
        for d, cams in (("source", SOURCE_CAMERAS), ("target", TARGET_CAMERAS))
        for c in cams
    }
    scenes = {key: make_scene(seed, key[0], key[1], style, config["size"]) for key, style in styles.items()}
    jobs = assign_names(seed, plan(seed, config, styles))
    all_jobs = [job for part in jobs.values() for job in part]
    shift = float(config["target_dress_shift"])
    identities = {job["identity_key"]: identity_attributes(seed, *job["identity_key"], shift) for job in all_jobs}
    if translator_out is not None:
        all_jobs += translator_jobs(seed, jobs["source"], translator_out)
    state = dict(styles=styles, scenes=scenes, identities=identities, size=config["size"], root=out)
    state["passerby_share"] = shift

    chunk = 64
    chunks = [all_jobs[i : i + chunk] for i in range(0, len(all_jobs), chunk)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(all_jobs), desc="make_demo_data", unit="img")
    if workers <= 1:
        init_worker(state)
        for piece in chunks:
            done = render_jobs(piece)
            if bar is not None:
                bar.update(done)
        _WORKER.clear()
    else:  # spawn: safe even when the caller has threads (torch) running
        with multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(state,)) as pool:
            for done in pool.imap_unordered(render_jobs, chunks):
                if bar is not None:
                    bar.update(done)
    if bar is not None:
        bar.close()

    # index and label files (docs/differences.md#data-layout)
    write_text(
        out / "target_training/label_target_training.txt", [f"{j['name']} {j['camera']}" for j in jobs["target_train"]]
    )
    for part, file in (("val_query", "index_validation_query.txt"), ("val_gallery", "index_validation_gallery.txt")):
        write_text(
            out / file, [f"{j['name']} {j['camera']} {j['label_pid']:03d} {i:04d}" for i, j in enumerate(jobs[part])]
        )
    for part, file in (("test_query", "index_test_query.txt"), ("test_gallery", "index_test_gallery.txt")):
        digits = max(4, len(str(len(jobs[part]) - 1)))
        write_text(out / file, [f"{j['name']}  {i:0{digits}d}" for i, j in enumerate(jobs[part])])

    # diagnostics: ground truth and styles. Never read by training code.
    diag = out / "diagnostics"
    write_text(
        diag / "target_training_identities.txt",
        [
            f"{j['name']} {j['pid'] + (config['target_train_ids'] if j['split'] == 'target_train_singletons' else 0)}"
            for j in jobs["target_train"]
        ],
    )
    for part in ("test_query", "test_gallery"):
        write_text(
            diag / f"target_{part}_identities.txt", [f"{j['name']} {j['label_pid']} {j['camera']}" for j in jobs[part]]
        )
    write_text(
        diag / "identities.jsonl",
        [json.dumps({"split": split, "pid": pid, **identities[(split, pid)]}) for split, pid in identities],
    )
    write_atomic(
        diag / "camera_styles.json",
        json.dumps({f"{d}_c{c}": {k: v for k, v in s.items()} for (d, c), s in styles.items()}, indent=1).encode(),
    )
    sheet = make_contact_sheet(out, jobs)
    buffer = io.BytesIO()
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
    write_atomic(diag / "contact_sheet.png", buffer.getvalue())

    summary = dict(
        preset=preset,
        seed=seed,
        workers=workers,
        config={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        counts={
            "source_images": len(jobs["source"]),
            "source_ids": config["source_ids"],
            "target_train_images": len(jobs["target_train"]),
            "val_query": len(jobs["val_query"]),
            "val_gallery": len(jobs["val_gallery"]),
            "test_query": len(jobs["test_query"]),
            "test_gallery": len(jobs["test_gallery"]),
        },
        seconds=round(time.time() - start, 2),
    )
    if translator_out is not None:
        translator_summary = dict(
            control="perfect translator: the source jobs rendered by the target cameras",
            benchmark=str(out),
            seed=seed,
            camera_map={f"source_c{s}": f"target_c{t}" for s, t in translator_camera_map(seed).items()},
            images=len(jobs["source"]),
        )
        summary["translator_out"] = str(translator_out)
        write_atomic(translator_out / "diagnostics/summary.json", json.dumps(translator_summary, indent=1).encode())
    write_atomic(diag / "summary.json", json.dumps(summary, indent=1).encode())  # written last = complete
    return summary


def parse_range(text: str) -> tuple[int, int]:
    parts = text.split("-")
    if len(parts) == 1 and parts[0].isdigit():
        return int(parts[0]), int(parts[0])
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected MIN-MAX (e.g. 12-20) or N, got {text!r}")
    return int(parts[0]), int(parts[1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output root (the data root of the readers)")
    parser.add_argument("--preset", default="default", help=f"size preset: {', '.join(PRESETS)}")
    parser.add_argument("--seed", type=int, default=0, help="everything (identities, cameras, images) follows from it")
    parser.add_argument("--size", default=None, help="image size HxW (default: 128x64; tiny: 64x32; up to 256x128)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default min(2, cpus)); 0/1 = in-process")
    parser.add_argument("--overwrite", action="store_true", help="replace the generated entries of a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    sizes = parser.add_argument_group("sizes (default: the preset's value)")
    for key in (
        "source_ids",
        "target_train_ids",
        "target_train_singletons",
        "val_ids",
        "val_distractors",
        "test_ids",
        "test_distractors",
    ):
        sizes.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help="number")
    for key in sorted(RANGE_KEYS):
        sizes.add_argument(f"--{key.replace('_', '-')}", type=parse_range, default=None, help="MIN-MAX per identity")
    parser.add_argument(
        "--translator-out",
        type=Path,
        default=None,
        help="also write the perfect-translator control here: personX/ with the source images re-rendered by the "
        "target cameras (pretrain.py --data-root THIS --target-root OUT)",
    )
    population = parser.add_argument_group("target population (see docs/demo_data.md)")
    population.add_argument(
        "--target-dress-shift",
        type=float,
        default=None,
        help="how far the target's clothing priors move from the source's: 0 = same population, 1 = mostly dark, "
        f"plain, long garments with target-only hues and patterns ({PRESETS['default']['target_dress_shift']})",
    )
    style = parser.add_argument_group("target cameras (values at strength 1; see docs/demo_data.md)")
    helps = dict(
        target_style_strength="multiplies every camera effect below; 0 = target cameras look like the source's",
        hue_rotation="max hue rotation of a camera, degrees about the grey axis",
        channel_mix="max share of the other channels mixed into each channel (greys stay grey)",
        tone_curve="spread of a camera's per-channel gamma (log scale)",
        colour_cast="max per-channel gain deviation (white balance)",
        exposure="max exposure change, as a gain 1 +- value",
        contrast="max contrast change, 1 +- value",
        shading="amplitude of the illumination gradient over the crop",
        texture="amplitude of low-frequency surface texture",
        downscale="max fraction of resolution a camera loses (cameras draw 0.57-1 of it)",
        motion_blur="max horizontal motion-blur length in pixels at width 64",
        blur="max Gaussian blur sigma in pixels at width 64",
        noise="max sensor noise sigma as a fraction of 255",
        jpeg_quality_min="lowest JPEG quality of a target camera (source images use 95)",
        loose_box="max fraction of the box height a camera's boxes leave around the person",
        box_jitter="per-image box shift (fraction of the width) and person-size change",
        truncation="typical probability that the box cuts off the feet, the head or one side",
        elevation="max keystone of an elevated camera looking down (head larger, legs foreshortened)",
        passerby="typical probability of another pedestrian partly inside the box",
        clutter="density of background clutter: windows, signs, poles, paving",
        occlusion_prob="typical probability of an occluder: pole, person-sized blob or object",
    )
    for key, text in helps.items():
        kind = int if key == "jpeg_quality_min" else float
        default = PRESETS["default"][key]
        style.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None, help=f"{text} ({default})")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = vars(args).copy()
    for key in ("out", "preset", "seed", "size", "workers", "overwrite", "no_progress", "translator_out"):
        options.pop(key)
    try:
        size = parse_size(args.size) if args.size is not None else None
        summary = generate(
            args.out,
            preset=args.preset,
            seed=args.seed,
            size=size,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            translator_out=args.translator_out,
            **options,
        )
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    print(json.dumps(summary["counts"]), f"in {summary['seconds']} s -> {args.out}")
    return summary


if __name__ == "__main__":
    main()
