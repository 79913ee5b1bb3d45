"""The re-ID code every stage shares: data (readers, transforms, samplers), model (backbones, GeM, BNNeck),
losses, evaluation (of re-ID features and of sda.py's translations), checkpoints, random state, logging and run set-up.

This is the one module the stage scripts (`sda.py`, `pretrain.py`, `mmt_plus.py`, `camera.py`, `postprocess.py`)
import; they never import each other. Read top to bottom: data, model, losses, evaluation and checkpoints, run set-up.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torchvision.transforms.autoaugment import _apply_op as _apply_autoaugment_op
from tqdm import tqdm

try:
    import reid_ops
except ImportError:  # models still load and run without the extension (GeM falls back to plain PyTorch)
    reid_ops = None

Item = tuple[str, int, int]  # (absolute image path, pid, camid)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

# ================================================================================================
# Datasets
# ================================================================================================


class DatasetError(ValueError):
    """A dataset that cannot be read as named: the message names the file (and line) or the folder expected."""


@dataclass
class ReIDData:
    """The splits of one dataset. Lists may be empty (e.g. personx has no query/gallery). `indexed`: the order of
    query and gallery is defined by index files (VisDA-2020) and numbers the submission, so no image may be left out."""

    name: str
    train: list[Item] = field(default_factory=list)
    query: list[Item] = field(default_factory=list)
    gallery: list[Item] = field(default_factory=list)
    root: str = ""
    indexed: bool = False

    @property
    def num_train_pids(self) -> int:
        return len({pid for _, pid, _ in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({cam for _, _, cam in self.train})


# VisDA-2020 target cameras are {1, 2, 4, 5, 6} (there is no camera 3): mapped to 0..4.
VISDA_TARGET_CAMERAS = {1: 0, 2: 1, 4: 2, 5: 3, 6: 4}
PID_CAM_PATTERN = re.compile(r"^(-?\d+)_c(\d+)")  # <pid>_c<cam>..., matched on the basename only
VISDA_DATASETS = ("personx", "personx_sda", "personx_spgan", "target_train", "target_val", "target_test")
STANDARD_DATASETS = ("market1501", "dukemtmc", "msmt17")
DATASET_NAMES = (*VISDA_DATASETS, *STANDARD_DATASETS, "list", "folder")
# Other spellings, as torchreid and fast-reid name the datasets (matched case-insensitively).
DATASET_ALIASES = {
    "market": "market1501",
    "market-1501": "market1501",
    "duke": "dukemtmc",
    "dukemtmcreid": "dukemtmc",
    "dukemtmc-reid": "dukemtmc",
    "msmt": "msmt17",
    "msmt17_v1": "msmt17",
    "msmt17_v2": "msmt17",
}


@dataclass(frozen=True)
class _FolderLayout:
    """Market-1501 and DukeMTMC-reID: bounding_box_train/, query/, bounding_box_test/, the identity and the camera
    in each file name. Both use the same folder names, so the file-name convention is what tells them apart."""

    title: str
    folder_names: tuple[str, ...]  # the dataset's own folder, searched below a parent root
    name_pattern: re.Pattern
    example: str
    max_camera: int


FOLDER_LAYOUTS = {
    "market1501": _FolderLayout(
        "Market-1501",
        ("Market-1501-v15.09.15", "Market-1501", "market1501/Market-1501-v15.09.15"),
        re.compile(r"^(-1|\d{4})_c(\d)s\d_\d{6}_\d{2}\.[A-Za-z]+$"),
        "0002_c1s1_000451_03.jpg",
        6,
    ),
    "dukemtmc": _FolderLayout(
        "DukeMTMC-reID",
        ("DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID", "dukemtmcreid/DukeMTMC-reID"),
        re.compile(r"^(\d{4})_c(\d)_f\d{7}\.[A-Za-z]+$"),
        "0005_c2_f0046985.jpg",
        8,
    ),
}
FOLDER_SPLITS = ("bounding_box_train", "query", "bounding_box_test")
# MSMT17: V1 has train/ and test/, V2 mask_train_v2/ and mask_test_v2/; list files of `<path> <pid>` lines.
MSMT_FOLDERS = ("MSMT17_V1", "MSMT17_V2", "MSMT17", "msmt17/MSMT17_V1", "msmt17/MSMT17_V2")
MSMT_IMAGE_DIRS = (("train", "test"), ("mask_train_v2", "mask_test_v2"))
MSMT_MAX_CAMERA = 15


def canonical_dataset_name(name: str) -> str:
    """The reader's name of a dataset: its own name or an alias (torchreid, fast-reid), case-insensitive."""
    key = name.strip().lower()
    key = DATASET_ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        aliases = ", ".join(sorted(DATASET_ALIASES))
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)} (or {aliases})")
    return key


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: missing folder ({what})")
    return path


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing file ({what})")
    return path


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _parse_pid_cam(path: Path) -> tuple[int, int]:
    match = PID_CAM_PATTERN.match(path.name)
    if match is None:
        raise DatasetError(f"{path}: file name does not start with '<pid>_c<camera>' (e.g. 0001_c3s1_000024_00.jpg)")
    return int(match.group(1)), int(match.group(2))


def relabel_pids(items: list[Item]) -> list[Item]:
    """Training pids -> 0..P-1 in ascending order of the raw pid."""
    mapping = {pid: label for label, pid in enumerate(sorted({pid for _, pid, _ in items}))}
    return [(path, mapping[pid], cam) for path, pid, cam in items]


def resolve_inside(base: Path, relative: str, where: str) -> Path:
    """`base / relative` for a path read from an index, list or label file (`where` = "file:line"). Refused: an
    absolute path, a `..` component, and a path whose symbolic links lead outside `base` (itself resolved, so a
    data root made of links to the real folders, as run_pipeline.sh builds, still works)."""
    if not relative or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative):
        raise DatasetError(f"{where}: {relative!r} is an absolute path; paths must be relative to {base}")
    if ".." in re.split(r"[/\\]", relative):
        raise DatasetError(f"{where}: {relative!r} contains '..'; paths must stay inside {base}")
    path = base / relative
    real_base = Path(os.path.realpath(base))
    if not Path(os.path.realpath(path)).is_relative_to(real_base):
        raise DatasetError(f"{where}: {relative!r} leads outside {base} (through a symbolic link)")
    return path


def _read_lines(path: Path, what: str, min_fields: int, form: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of the non-empty lines; a line with too few fields or a path listed twice is an error
    naming the file and both lines."""
    rows, first_line = [], {}
    for line_number, line in enumerate(_require_file(path, what).read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < min_fields:
            raise DatasetError(f"{path}:{line_number}: expected '{form}', got {line!r}")
        key = os.path.normpath(fields[0])
        if key in first_line:
            raise DatasetError(
                f"{path}:{line_number}: {fields[0]!r} is listed twice (lines {first_line[key]} and {line_number})"
            )
        first_line[key] = line_number
        rows.append((line_number, fields))
    return rows


def _read_labelled_folder(
    folder: Path,
    relabel: bool,
    camera_map: dict[int, int] | None = None,
    layout: _FolderLayout | None = None,
) -> list[Item]:
    items = []
    for path in _list_images(folder):
        if layout is not None and not layout.name_pattern.match(path.name):
            raise DatasetError(
                f"{path}: not a {layout.title} file name (expected names like {layout.example}); "
                "other data can be read as the 'list' dataset"
            )
        pid, cam = _parse_pid_cam(path)
        if pid < 0:  # Market/Duke junk images
            continue
        if camera_map is not None:
            if cam not in camera_map:
                raise DatasetError(f"{path}: camera {cam} is not one of {sorted(camera_map)}")
            camid = camera_map[cam]
        else:
            if layout is not None and not 1 <= cam <= layout.max_camera:
                raise DatasetError(f"{path}: camera {cam} is outside {layout.title}'s 1..{layout.max_camera}")
            camid = cam - 1
        items.append((str(path), pid, camid))
    if not items:
        example = layout.example if layout is not None else "0001_c1s1_000024_00.jpg"
        raise DatasetError(f"{folder}: no images found (expected files like {example})")
    return relabel_pids(items) if relabel else items


def _read_index_file(index: Path, image_dir: Path, labelled: bool) -> list[Item]:
    """VisDA index files: `image-name camera-index person-identity image-index` (validation) or
    `image-name  image-index` (test). The order of lines defines the submission indices."""
    items = []
    for line_number, fields in _read_lines(index, "VisDA-2020 index file", 1, "<image> ..."):
        path = resolve_inside(image_dir, fields[0], f"{index}:{line_number}")
        if labelled:
            try:
                pid, cam = _parse_pid_cam(path)
            except ValueError as error:
                raise DatasetError(f"{index}:{line_number}: {error}") from None
            if cam not in VISDA_TARGET_CAMERAS:
                raise DatasetError(f"{index}:{line_number}: camera {cam} not in {sorted(VISDA_TARGET_CAMERAS)}")
            items.append((str(path), pid, VISDA_TARGET_CAMERAS[cam]))
        else:
            items.append((str(path), 0, 0))
    if not items:
        raise DatasetError(f"{index}: lists no images (empty index file)")
    return items


def _read_msmt_lists(
    list_files: Sequence[Path], image_dir: Path, root: Path, relabel: bool, max_camera: int = MSMT_MAX_CAMERA
) -> list[Item]:
    """MSMT17 list files: `<path> <pid>` with the path relative to the image folder (train/ or test/), or to the
    dataset root when it starts with that folder's name; the camera is the third field of the file name. Several
    files (list_train + list_val) are read as one list: a path listed twice is an error naming both lines."""
    items, seen = [], {}
    for list_file in list_files:
        for line_number, fields in _read_lines(list_file, "MSMT17 list file", 2, "<path> <pid>"):
            where = f"{list_file}:{line_number}"
            relative = fields[0]
            base = root if re.split(r"[/\\]", relative)[0] == image_dir.name else image_dir
            path = resolve_inside(base, relative, where)
            if str(path) in seen:
                raise DatasetError(f"{where}: {relative!r} is listed twice (also {seen[str(path)]})")
            seen[str(path)] = where
            name_fields = path.name.split("_")
            if len(name_fields) < 3 or not name_fields[2].isdigit():
                raise DatasetError(
                    f"{where}: cannot read the camera from {relative!r} (expected names like "
                    "0000_000_01_0303morning_0015_0.jpg)"
                )
            if not fields[1].lstrip("-").isdigit():
                raise DatasetError(f"{where}: identity {fields[1]!r} is not an integer")
            camera = int(name_fields[2])
            if not 1 <= camera <= max_camera:
                raise DatasetError(f"{where}: camera {camera} is outside MSMT17's 1..{max_camera}")
            items.append((str(path), int(fields[1]), camera - 1))
    return relabel_pids(items) if relabel else items


def _read_generic_list(list_file: Path, root: Path, relabel: bool) -> list[Item]:
    """The 'list' dataset: `relative/path pid camid` per line, paths relative to the dataset root, camid an integer
    >= 0 used as is; a negative pid marks a junk image (left out, as Market-1501's -1)."""
    items = []
    for line_number, fields in _read_lines(list_file, "list file", 3, "relative/path pid camid"):
        where = f"{list_file}:{line_number}"
        path = resolve_inside(root, fields[0], where)
        try:
            pid, camid = int(fields[1]), int(fields[2])
        except ValueError:
            raise DatasetError(f"{where}: pid {fields[1]!r} and camid {fields[2]!r} must be integers") from None
        if camid < 0:
            raise DatasetError(f"{where}: camid {camid} must be >= 0")
        if pid >= 0:
            items.append((str(path), pid, camid))
    return relabel_pids(items) if relabel else items


def _guess_layout(root: Path) -> str:
    """A few words on what is under `root`, for error messages ("" when nothing recognisable)."""
    if not root.is_dir():
        return ""
    if (root / "personX").is_dir() or (root / "target_training").is_dir():
        return "the VisDA-2020 layout (personX/, target_training/, ...)"
    if (root / "bounding_box_train").is_dir():
        names = [p.name for p in itertools.islice((root / "bounding_box_train").iterdir(), 50)]
        for layout in FOLDER_LAYOUTS.values():
            if names and all(layout.name_pattern.match(name) for name in names if Path(name).suffix):
                return f"{layout.title} (bounding_box_train/ with names like {layout.example})"
        return "bounding_box_train/ with names of neither Market-1501 nor DukeMTMC-reID"
    if any((root / train).is_dir() for train, _ in MSMT_IMAGE_DIRS) and (root / "list_train.txt").is_file():
        return "MSMT17 (list_train.txt and its image folders)"
    if any((root / f"list_{split}.txt").is_file() for split in ("train", "query", "gallery")):
        return "list files (list_train.txt, ...): the 'list' dataset"
    folders = [f"{folder}/" for layout in FOLDER_LAYOUTS.values() for folder in layout.folder_names]
    found = [name for name in [*folders, *(f"{f}/" for f in MSMT_FOLDERS)] if (root / name.rstrip("/")).is_dir()]
    return f"a parent folder holding {', '.join(found)}" if found else ""


def _found(root: Path) -> str:
    guess = _guess_layout(root)
    return f"; found {guess} there" if guess else ""


def locate_dataset(name: str, data_root: str | Path) -> Path:
    """The folder of a standard dataset below `data_root`: the root itself or, when the root is a parent folder,
    its Market-1501-v15.09.15/, DukeMTMC-reID/ or MSMT17_V1|V2/ (also as torchreid nests them). Other datasets:
    the root. A Market-1501 name given Duke's folder (or the reverse) is refused: the file names tell them apart."""
    name = canonical_dataset_name(name)
    root = Path(data_root).expanduser().resolve()
    _require_dir(root, f"data root of dataset {name!r}")
    if name in FOLDER_LAYOUTS:
        layout = FOLDER_LAYOUTS[name]
        for candidate in (root, *(root / folder for folder in layout.folder_names)):
            if all((candidate / split).is_dir() for split in FOLDER_SPLITS):
                names = [p.name for p in itertools.islice((candidate / "bounding_box_train").iterdir(), 50)]
                for other_name, other in FOLDER_LAYOUTS.items():
                    matches = [n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES]
                    if other is not layout and matches and all(other.name_pattern.match(n) for n in matches):
                        raise DatasetError(
                            f"{candidate} holds {other.title} images (names like {other.example}), not {layout.title} "
                            f"ones (names like {layout.example}): name it {other_name}, or give the folder "
                            f"{layout.folder_names[0]}/ (or its parent)"
                        )
                return candidate
        raise DatasetError(
            f"no {layout.title} layout under {root}: expected {root}/{layout.folder_names[0]}/ (or the root itself) "
            f"holding {', '.join(s + '/' for s in FOLDER_SPLITS)}{_found(root)}"
        )
    if name == "msmt17":
        for candidate in (root, *(root / folder for folder in MSMT_FOLDERS)):
            if (candidate / "list_train.txt").is_file() and any(
                (candidate / train).is_dir() for train, _ in MSMT_IMAGE_DIRS
            ):
                return candidate
        raise DatasetError(
            f"no MSMT17 layout under {root}: expected {root}/MSMT17_V1/ or MSMT17_V2/ (or the root itself) holding "
            f"list_train.txt, list_query.txt, list_gallery.txt and train/, test/ (V2: mask_train_v2/, mask_test_v2/)"
            f"{_found(root)}"
        )
    return root


def read_diagnostic_identities(data_root: str | Path) -> dict[str, int]:
    """Ground-truth identities of target_training in the embedded benchmark (DIAGNOSTICS ONLY: pseudo-label
    quality, and the clearly-flagged upper-bound run `--target-labels-upper-bound`)."""
    path = Path(data_root) / "diagnostics" / "target_training_identities.txt"
    form = "<image name> <identity>"
    return {fields[0]: int(fields[1]) for _, fields in _read_lines(path, "diagnostic identities", 2, form)}


def read_dataset(name: str, data_root: str | Path, msmt_trainval: bool = False) -> ReIDData:
    """Reads a dataset by name (or a torchreid/fast-reid alias); every item is (absolute path, pid, camid).

    VisDA-2020 layout (one `data_root`): personx, personx_sda, personx_spgan (labelled source, pids
    relabelled 0..P-1), target_train (pid 0, cameras {1,2,4,5,6} -> 0..4), target_val and target_test
    (query/gallery in index-file order). Standard datasets (their own folder, or a parent folder holding it, see
    `locate_dataset`): market1501, dukemtmc (bounding_box_train / query / bounding_box_test; junk pid -1 left
    out, distractors 0000 kept), msmt17 (list_*.txt; `msmt_trainval` adds list_val.txt to the training set, the
    32,621-image convention of MMT/SpCL). `list`: list_train.txt, list_query.txt, list_gallery.txt (any of them)
    of `relative/path pid camid` lines. `folder`: every image below the root, pid 0, camid 0 (feature extraction).
    """
    name = canonical_dataset_name(name)
    root = locate_dataset(name, data_root)
    if name in ("personx", "personx_sda", "personx_spgan"):
        folder = {"personx": "personX", "personx_sda": "personX_sda", "personx_spgan": "personX_spgan"}[name]
        if not (root / folder / "image_train").is_dir():
            raise FileNotFoundError(
                f"{root / folder / 'image_train'}: missing folder ({name} training images of the VisDA-2020 layout)"
                f"{_found(root)}"
            )
        return ReIDData(name, train=_read_labelled_folder(root / folder / "image_train", relabel=True), root=str(root))
    if name == "target_train":
        image_dir = root / "target_training" / "image_train"
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{image_dir}: missing folder (target training images){_found(root)}")
        label_file = root / "target_training" / "label_target_training.txt"
        items = []
        form = "<image> <camera in 1,2,4,5,6>"
        for line_number, fields in _read_lines(label_file, "target camera labels", 2, form):
            where = f"{label_file}:{line_number}"
            if not fields[1].isdigit() or int(fields[1]) not in VISDA_TARGET_CAMERAS:
                raise DatasetError(f"{where}: expected '{form}', got {' '.join(fields)!r}")
            path = resolve_inside(image_dir, fields[0], where)
            items.append((str(path), 0, VISDA_TARGET_CAMERAS[int(fields[1])]))
        if not items:
            raise DatasetError(f"{label_file}: lists no images (empty label file)")
        return ReIDData(name, train=items, root=str(root))
    if name in ("target_val", "target_test"):
        split = "validation" if name == "target_val" else "test"
        folder = "target_validation" if name == "target_val" else "target_test"
        if not (root / folder).is_dir():
            raise FileNotFoundError(f"{root / folder}: missing folder ({name} of the VisDA-2020 layout){_found(root)}")
        query_dir = _require_dir(root / folder / "image_query", f"{split} queries")
        gallery_dir = _require_dir(root / folder / "image_gallery", f"{split} gallery")
        labelled = name == "target_val"
        return ReIDData(
            name,
            query=_read_index_file(root / f"index_{split}_query.txt", query_dir, labelled=labelled),
            gallery=_read_index_file(root / f"index_{split}_gallery.txt", gallery_dir, labelled=labelled),
            root=str(root),
            indexed=True,
        )
    if name in FOLDER_LAYOUTS:
        layout = FOLDER_LAYOUTS[name]
        train, query, gallery = (
            _read_labelled_folder(root / split, relabel=split == "bounding_box_train", layout=layout)
            for split in FOLDER_SPLITS
        )
        return ReIDData(name, train=train, query=query, gallery=gallery, root=str(root))
    if name == "msmt17":
        train_dir, test_dir = next(
            (root / train, root / test) for train, test in MSMT_IMAGE_DIRS if (root / train).is_dir()
        )
        _require_dir(test_dir, "MSMT17 test images")
        train_lists = [root / "list_train.txt"] + ([root / "list_val.txt"] if msmt_trainval else [])
        return ReIDData(
            name,
            train=_read_msmt_lists(train_lists, train_dir, root, relabel=True),
            query=_read_msmt_lists([root / "list_query.txt"], test_dir, root, relabel=False),
            gallery=_read_msmt_lists([root / "list_gallery.txt"], test_dir, root, relabel=False),
            root=str(root),
        )
    if name == "list":
        files = {split: root / f"list_{split}.txt" for split in ("train", "query", "gallery")}
        if not any(path.is_file() for path in files.values()):
            raise FileNotFoundError(
                f"{root}: no list_train.txt, list_query.txt or list_gallery.txt (the 'list' dataset: "
                f"'relative/path pid camid' lines){_found(root)}"
            )
        splits = {
            split: _read_generic_list(path, root, relabel=split == "train") if path.is_file() else []
            for split, path in files.items()
        }
        return ReIDData(name, **splits, root=str(root))
    # folder
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return ReIDData(name, train=[(str(p), 0, 0) for p in paths], root=str(root))


def validation_split(name: str, data_root: str | Path) -> tuple[list[Item], list[Item]]:
    """(query, gallery) used for model selection: target_val for the VisDA layout, else the dataset's own."""
    data = read_dataset(name, data_root)
    if not data.query or not data.gallery:
        raise DatasetError(f"dataset {name!r} has no query/gallery split to validate on")
    return data.query, data.gallery


def check_images(items: Sequence[Item], what: str, skip_bad_images: bool, allow_skip: bool = True) -> list[Item]:
    """Decodes every image before any training (JPEG at 1/8 scale: cheap, yet a truncated or corrupt file fails),
    with a progress bar. Unreadable images are an error naming them, or with `skip_bad_images` are left out with a
    warning. `allow_skip` False: sets whose order numbers a submission (VisDA index files) cannot lose an image."""

    good, bad = [], []
    for item in progress(items, desc=f"checking {what}", unit="img", disable=len(items) < 2000):
        try:
            with Image.open(item[0]) as image:
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
            good.append(item)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            bad.append(f"{item[0]} ({type(error).__name__}: {error})")
    if bad and (not skip_bad_images or not allow_skip):
        remedy = (
            "pass --skip-bad-images to leave them out"
            if allow_skip
            else "its index files number the images, so none may be left out"
        )
        raise DatasetError(f"{len(bad)} unreadable image(s) in {what}: {'; '.join(bad[:3])} ({remedy})")
    for message in bad:
        print(f"[data] skipping unreadable image {message}", file=sys.stderr)
    return good


# ------------------------------------------------------------------------------------------------
# The dataset arguments of every stage: --source/--target/--val NAME with their --*-root DIR


DATASET_ROLES = ("source", "target", "val")
_ROLE_HELP = {
    "source": "labelled source training set",
    "target": "unlabelled target training set (identity labels, if the dataset has them, are never used for "
    "training; 'none': no target)",
    "val": "labelled query/gallery set for model selection and evaluation",
}


def add_dataset_arguments(
    parser: argparse.ArgumentParser,
    used: Sequence[str],
    source: str = "personx",
    target: str = "target_train",
    val: str = "target_val",
) -> None:
    """The same dataset arguments in every stage (`used`: the roles this stage reads; the others are accepted so
    that one set of flags can be passed to every stage). The old spellings --val-dataset, --dataset and
    --train-dataset are still accepted (not shown)."""
    names = ", ".join(DATASET_NAMES)
    group = parser.add_argument_group(
        "datasets",
        f"Every stage takes the same dataset arguments; this one reads {', '.join('--' + r for r in used)}. Names: "
        f"{names} (aliases: {', '.join(sorted(DATASET_ALIASES))}). A root may be the dataset's own folder or its "
        "parent (holding Market-1501-v15.09.15/, DukeMTMC-reID/, MSMT17_V1|V2/). The 'list' dataset reads "
        "list_train.txt, list_query.txt, list_gallery.txt of 'relative/path pid camid' lines under its root. "
        "A labelled source sharing folders or image files with the target or the validation set is refused.",
    )
    group.add_argument(
        "--data-root", metavar="DIR", help="VisDA-2020 layout root; the default of every --*-root below%(default).0s"
    )
    defaults = {"source": source, "target": target, "val": val}
    for role in DATASET_ROLES:
        group.add_argument(
            f"--{role}", default=defaults[role], metavar="NAME", help=f"{_ROLE_HELP[role]} (default: %(default)s)"
        )
        fallback = "--target-root, else --data-root" if role == "val" else "--data-root"
        group.add_argument(
            f"--{role}-root", metavar="DIR", help=f"root of --{role} (default: {fallback})%(default).0s"
        )  # .0s: no "(default: None)" added
    group.add_argument(
        "--msmt17-trainval",
        action="store_true",
        help="MSMT17: train on list_train.txt + list_val.txt (32,621 images, the MMT/SpCL convention) instead "
        "of list_train.txt alone (30,248)",
    )
    group.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="every image is decoded before the stage starts; leave unreadable ones out (with a warning) instead "
        "of stopping",
    )
    for old, role in (("--val-dataset", "val"), ("--dataset", "val"), ("--train-dataset", "target")):
        group.add_argument(old, dest=role, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


@dataclass
class Datasets:
    """What a stage reads. `target` items carry pid 0 (no labels); `target_identities` maps a target image path to
    its true identity where the data has one (a labelled dataset, or the benchmark's diagnostics/): DIAGNOSTICS
    ONLY (pseudo-label quality, flagged upper bounds), never a training input."""

    source: ReIDData | None = None
    target: list[Item] | None = None
    target_identities: dict[str, int] | None = None
    val: ReIDData | None = None
    roots: dict[str, str] = field(default_factory=dict)


def _role_root(args: argparse.Namespace, role: str) -> str:
    """--ROLE-root, else (validation is on the target domain) --target-root for --val, else --data-root."""
    fallback = getattr(args, "target_root", None) if role == "val" else None
    root = getattr(args, f"{role}_root", None) or fallback or getattr(args, "data_root", None)
    if not root:
        raise DatasetError(f"no root: give --{role}-root DIR (or --data-root DIR)")
    return root


def _file_keys(items: Sequence[Item]) -> dict[tuple[int, int] | str, str]:
    """One key per image file: (device, inode), so a path, a symbolic link to it or a hard link are the same."""
    keys = {}
    for path, _, _ in items:
        try:
            stat = os.stat(path)
            keys[(stat.st_dev, stat.st_ino)] = path
        except OSError:
            keys[os.path.realpath(path)] = path
    return keys


def check_no_shared_images(
    labelled: Sequence[Item], other: Sequence[Item], labelled_flag: str, other_flag: str, same_folders_too: bool
) -> None:
    """Refuses a labelled source that reads the same folders as the target, or any image file of the target or the
    validation set: that would train on their labels (Market-1501 and DukeMTMC-reID share folder names, so a
    wrong root goes unnoticed otherwise)."""
    if same_folders_too:
        labelled_dirs = {os.path.realpath(os.path.dirname(p)) for p, _, _ in labelled}
        same = sorted(labelled_dirs & {os.path.realpath(os.path.dirname(p)) for p, _, _ in other})
        if same:
            raise DatasetError(
                f"{labelled_flag} and {other_flag} read the same folder {same[0]}: the labelled source would be the "
                "target's own images; give each its own root"
            )
    labelled_keys, other_keys = _file_keys(labelled), _file_keys(other)
    shared = [key for key in labelled_keys if key in other_keys]
    if shared:
        raise DatasetError(
            f"{labelled_flag} and {other_flag} share {len(shared)} image file(s), e.g. {labelled_keys[shared[0]]} and "
            f"{other_keys[shared[0]]}: training on them would leak {other_flag}'s images into the labelled source"
        )


def resolve_datasets(args: argparse.Namespace, used: Sequence[str]) -> Datasets:
    """Reads the roles a stage uses from the arguments of `add_dataset_arguments`, checks the labelled source
    against the target and the validation set, and decodes every image (`check_images`). Errors become one-line
    exits naming the flag, the root and the file or folder expected."""
    datasets = Datasets()
    current = ""
    try:
        for role in used:
            name = getattr(args, role)
            if role == "target" and name == "none":
                continue
            current = f"--{role} {name}"
            root = _role_root(args, role)
            current = f"--{role} {name} (root {root})"
            data = read_dataset(name, root, msmt_trainval=getattr(args, "msmt17_trainval", False))
            datasets.roots[role] = data.root
            if role == "source":
                if not data.train:
                    raise DatasetError(f"no labelled training images in {data.root}")
                datasets.source = data
            elif role == "target":
                if not data.train:
                    raise DatasetError(f"no training images in {data.root}")
                datasets.target = [(path, 0, camid) for path, _, camid in data.train]
                if canonical_dataset_name(name) == "target_train":
                    truth_file = Path(data.root) / "diagnostics" / "target_training_identities.txt"
                    if truth_file.is_file():
                        by_name = read_diagnostic_identities(data.root)
                        truth = {path: by_name.get(os.path.basename(path), -1) for path, _, _ in data.train}
                        datasets.target_identities = truth if min(truth.values(), default=-1) >= 0 else None
                elif canonical_dataset_name(name) != "folder":  # a labelled dataset used as the target
                    datasets.target_identities = {path: pid for path, pid, _ in data.train}
            else:
                if not data.query or not data.gallery:
                    raise DatasetError(f"no query/gallery split in {data.root}")
                datasets.val = data
        current = ""
        if datasets.source is not None:
            source_flag = f"--source {args.source}"
            if datasets.target is not None:
                check_no_shared_images(
                    datasets.source.train, datasets.target, source_flag, f"--target {args.target}", True
                )
            if datasets.val is not None:
                val_items = datasets.val.query + datasets.val.gallery
                check_no_shared_images(datasets.source.train, val_items, source_flag, f"--val {args.val}", False)
        skip = getattr(args, "skip_bad_images", False)
        if datasets.source is not None:
            current = f"--source {args.source}"
            # relabelled again: a left-out image may take the last image of an identity with it
            datasets.source.train = relabel_pids(
                check_images(datasets.source.train, "the source training images", skip)
            )
        if datasets.target is not None:
            current = f"--target {args.target}"
            kept = {p for p, _, _ in check_images(datasets.target, "the target training images", skip)}
            datasets.target = [item for item in datasets.target if item[0] in kept]
        if datasets.val is not None:
            current = f"--val {args.val}"
            allow = not datasets.val.indexed
            datasets.val.query = check_images(datasets.val.query, "the query images", skip, allow)
            datasets.val.gallery = check_images(datasets.val.gallery, "the gallery images", skip, allow)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {current + ': ' if current else ''}{error}") from None
    return datasets


# The image sets a tool outside training reads (extract.py, export.py): split -> the dataset role it comes from.
DATASET_SPLITS = {"query": "val", "gallery": "val", "source": "source", "target": "target"}


def read_split(args: argparse.Namespace, split: str) -> tuple[list[Item], str]:
    """The images of one split (DATASET_SPLITS) named by the shared dataset arguments (`add_dataset_arguments`), read
    and checked like a stage's (`resolve_datasets`), and the dataset root they lie under. The target's images carry
    pid -1 (unlabelled)."""
    role = DATASET_SPLITS[split]
    datasets = resolve_datasets(args, (role,))
    if role == "source":
        items = datasets.source.train
    elif role == "target":
        if datasets.target is None:
            raise SystemExit("error: --split target: --target is 'none'")
        items = [(path, -1, camid) for path, _, camid in datasets.target]
    else:
        items = getattr(datasets.val, split)
    return items, datasets.roots[role]


class DecodedImageCache:
    """Decoded training images kept in memory, by path, up to `megabytes` of RGB pixels (then later images are decoded
    each time they are read). A training stage reads every image many times, and decoding a JPEG costs about as much
    as the rest of the augmentation without AutoAugment (bench/train_step.py). The transforms never modify an image
    in place, so a cached image is reused as is. With loading processes (--workers > 0) each has its own cache."""

    def __init__(self, megabytes: float):
        self.capacity = int(megabytes * 2**20)
        self.used = 0
        self.images: dict[str, Image.Image] = {}

    def add(self, path: str, image: Image.Image) -> None:
        size = 3 * image.width * image.height
        if self.used + size <= self.capacity:
            self.images[path] = image
            self.used += size


class ImageDataset(torch.utils.data.Dataset):
    """Items -> (transformed image, pid, camid, index).

    A key may be an int or (index, seed): with a seed, the random augmentations of that sample are a pure function
    of the seed (used for exact resumption), and the global random states are left as they were. An unreadable or
    corrupt image raises an error naming the file, unless `skip_bad_images`, which warns and substitutes the next
    image.
    """

    def __init__(
        self,
        items: Sequence[Item],
        transform,
        skip_bad_images: bool = False,
        cache: DecodedImageCache | None = None,
    ):
        self.items = list(items)
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.bad_images: list[str] = []
        self.cache = cache

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int):
        path = self.items[index][0]
        if self.cache is not None and path in self.cache.images:
            return self.cache.images[path]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if self.cache is not None:
                    self.cache.add(path, image)
                return image
        except (OSError, ValueError) as error:
            if not self.skip_bad_images:
                raise RuntimeError(
                    f"cannot read image {path}: {error} (pass --skip-bad-images to skip such files)"
                ) from None
            self.bad_images.append(path)
            print(f"[data] skipping unreadable image {path}: {error}", file=sys.stderr)
            return None

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        for attempt in range(len(self.items)):
            candidate = (index + attempt) % len(self.items)
            image = self._load(candidate)
            if image is not None:
                break
        else:
            raise RuntimeError("no readable image in the dataset")
        _, pid, camid = self.items[candidate]
        if seed is None:
            return self.transform(image), pid, camid, candidate
        if getattr(self.transform, "draws_from_generator", False):
            # a generator of its own: no global state to save, seed and restore
            return self.transform(image, torch.Generator().manual_seed(seed)), pid, camid, candidate
        # The transforms draw from Python's and torch's global CPU generators: seed them for this sample only and put
        # the caller's states back, so that loading in the training process (0 workers) leaves its RNG alone. Only
        # the CPU generator: torch.manual_seed would also reseed every accelerator's generator (and, before CUDA is
        # initialised, record a stack trace per call: 0.3 ms a sample, as long as the rest of the loading).
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            torch.default_generator.manual_seed(seed)
            try:
                return self.transform(image), pid, camid, candidate
            finally:
                random.setstate(python_state)


# ------------------------------------------------------------------------------------------------
# Transforms (torchvision's AutoAugment and RandomErasing; docs/differences.md#image-pipelines)


def release_padding(width: int) -> int:
    """Zero padding before the random crop: the release pads 10 px at width 128 (384x128 images); scaled with the
    width so that smaller images get the same relative shift (5 px at the demo's 64, not a 16 % black band)."""
    return max(1, round(10 * width / 128))


class PreparedImage(NamedTuple):
    """A training sample between its per-image and per-batch steps: uint8 pixels (3, H, W), or a batch of them, and
    the random-erasing box (top, left, height, width; height 0 = not erased)."""

    pixels: torch.Tensor
    erase_box: torch.Tensor


def uint8_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor (what T.ToTensor reads, before its scaling)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class CachedAutoAugment(T.AutoAugment):
    """torchvision's AutoAugment with the ImageNet policy and the same output, two differences: the magnitude bins
    are computed once per image size (torchvision builds ten tensors per image: a fifth of the augmentation's time
    at the demo size) and the three random draws per image come from `generator` when one is given (a seeded
    sample's own generator: no global state to save and restore). The operations are torchvision's."""

    def __init__(self) -> None:
        super().__init__(T.AutoAugmentPolicy.IMAGENET)
        self._spaces: dict[tuple[int, int], dict] = {}

    def forward(self, img: Any, generator: torch.Generator | None = None) -> Any:
        if not isinstance(img, Image.Image):
            return super().forward(img)
        width, height = img.size
        space = self._spaces.get((height, width))
        if space is None:
            if len(self._spaces) >= 4096:  # datasets of detections come in many sizes: keep the cache small
                self._spaces.clear()
            space = self._spaces[(height, width)] = self._augmentation_space(10, (height, width))
        # the draws of T.AutoAugment.get_params, in its order
        policy = int(torch.randint(len(self.policies), (1,), generator=generator).item())
        probs = torch.rand((2,), generator=generator)
        signs = torch.randint(2, (2,), generator=generator)
        for i, (name, p, magnitude_id) in enumerate(self.policies[policy]):
            if probs[i] <= p:
                magnitudes, signed = space[name]
                magnitude = float(magnitudes[magnitude_id].item()) if magnitude_id is not None else 0.0
                if signed and signs[i] == 0:
                    magnitude *= -1.0
                img = _apply_autoaugment_op(img, name, magnitude, interpolation=self.interpolation, fill=self.fill)
        return img


class TrainTransform:
    """The training augmentation, in the release's order: [AutoAugment] -> resize -> flip -> pad -> crop -> to
    [0, 1] -> ImageNet normalisation -> [random erasing].

    Called on a PIL image it runs the PIL steps and draws the erasing box and returns a PreparedImage;
    `finish_images` does the tensor steps on a whole batch at once, which the training loaders' collate function
    calls (make_loader). Its random draws are those of torchvision's transforms applied one after another (same
    calls, same order), taken from `generator` when given, else from the global generator, so the result is
    bit-identical to torchvision's per-image chain (tests/test_pretrain.py) at a fraction of the per-image cost."""

    draws_from_generator = True  # ImageDataset passes a per-sample generator instead of seeding the global one

    def __init__(self, height: int, width: int, autoaugment: bool, random_erasing: bool):
        # The release applies its ImageNet policy to ~all images (its fade-out schedule is inert,
        # docs/differences.md#image-pipelines).
        self.autoaugment = CachedAutoAugment() if autoaugment else None
        self.size = (height, width)
        self.padding = release_padding(width)
        # as the release: the ImageNet means written into the normalised tensor, p 0.5, area [0.02, 0.4]
        self.erasing = T.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3)) if random_erasing else None

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> PreparedImage:
        if self.autoaugment is not None:
            image = self.autoaugment(image, generator)
        height, width = self.size
        # T.Resize with T.InterpolationMode.BICUBIC on a PIL image is this Pillow call
        pixels = np.asarray(image.resize((width, height), Image.BICUBIC))
        if torch.rand(1, generator=generator) < 0.5:  # T.RandomHorizontalFlip
            pixels = pixels[:, ::-1]
        # zero padding, then T.RandomCrop.get_params (the padded image is always larger than the crop) and the crop,
        # as one copy of the window's overlap with the image into zeros: the same pixels, neither image built
        pad = self.padding
        top = int(torch.randint(0, 2 * pad + 1, size=(1,), generator=generator).item())
        left = int(torch.randint(0, 2 * pad + 1, size=(1,), generator=generator).item())
        window = torch.zeros(3, height, width, dtype=torch.uint8)
        row0, col0 = max(pad - top, 0), max(pad - left, 0)  # first window row / column on the image
        row1, col1 = min(pad - top + height, height), min(pad - left + width, width)
        window.numpy()[:, row0:row1, col0:col1] = pixels[
            row0 + top - pad : row1 + top - pad, col0 + left - pad : col1 + left - pad
        ].transpose(2, 0, 1)
        box = torch.zeros(4, dtype=torch.int64)
        if self.erasing is not None and torch.rand(1, generator=generator) < self.erasing.p:
            box = erasing_box(height, width, self.erasing.scale, self.erasing.ratio, generator)
        return PreparedImage(window, box)


def erasing_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator | None
) -> torch.Tensor:
    """T.RandomErasing.get_params with a fixed fill, its draws from `generator`: up to ten tries of an area fraction
    in `scale` and a log-uniform aspect ratio in `ratio`; (top, left, height, width), or zeros when none fitted."""
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        area = height * width * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        box_height, box_width = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if not (box_height < height and box_width < width):
            continue
        top = int(torch.randint(0, height - box_height + 1, size=(1,), generator=generator).item())
        left = int(torch.randint(0, width - box_width + 1, size=(1,), generator=generator).item())
        return torch.tensor([top, left, box_height, box_width])
    return torch.zeros(4, dtype=torch.int64)


def finish_images(batch: Any) -> Any:
    """The per-batch steps of TrainTransform: every PreparedImage in `batch` (a collated batch, a single sample, or
    tuples/lists of them) -> normalised float images with the erasing boxes filled with the ImageNet means."""
    if isinstance(batch, PreparedImage):
        single = batch.pixels.dim() == 3
        pixels, boxes = (batch.pixels[None], batch.erase_box[None]) if single else batch
        images = pixels.to(torch.float32).div(255)  # as T.ToTensor
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        images.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))  # as T.Normalize
        fill = mean.view(3, 1, 1)
        for n in torch.nonzero(boxes[:, 2]).flatten().tolist():
            top, left, height, width = boxes[n].tolist()
            images[n, :, top : top + height, left : left + width] = fill
        return images[0] if single else images
    if isinstance(batch, (tuple, list)):
        return type(batch)(finish_images(part) for part in batch)
    return batch


def collate_training_batch(samples: list) -> Any:
    """The collate function of the training and test loaders: torch's default stacking, then the batch steps of
    TrainTransform (or PreparedTestTransform)."""
    return finish_images(torch.utils.data.default_collate(samples))


def build_train_transform(height: int, width: int, autoaugment: bool, random_erasing: bool) -> TrainTransform:
    return TrainTransform(height, width, autoaugment, random_erasing)


def build_test_transform(height: int, width: int) -> T.Compose:
    return T.Compose(
        [
            T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class PreparedTestTransform:
    """build_test_transform split as TrainTransform: the resize per image, to [0, 1] and normalisation per batch
    (finish_images), bit-identical to the per-image chain."""

    def __init__(self, height: int, width: int):
        self.resize = T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC)

    def __call__(self, image: Image.Image) -> PreparedImage:
        return PreparedImage(uint8_pixels(self.resize(image)), torch.zeros(4, dtype=torch.int64))


def make_test_loader(
    items: Sequence[Item],
    height: int,
    width: int,
    batch_size: int,
    workers: int,
    cache: DecodedImageCache | None = None,
):
    """Batches (images, pids, camids, indices) of `items` in order through the test transform (decoded images
    kept in and read from `cache` if given: a stage that extracts features of the same images every epoch)."""
    dataset = ImageDataset(items, PreparedTestTransform(height, width), cache=cache)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_training_batch
    )


def load_test_images(items: Sequence[Item], height: int, width: int) -> torch.Tensor:
    """(N, 3, height, width) images of `items` in order through the test transform (un-augmented, normalised)."""
    dataset = ImageDataset(items, build_test_transform(height, width))
    return torch.stack([dataset[i][0] for i in range(len(items))])


def normalise_imagenet(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (N,3,H,W) -> ImageNet-normalised images."""
    mean = images01.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images01.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images01 - mean) / std


def denormalise_imagenet(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images -> [0, 1] images (clamped)."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Samplers


def rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _EpochStream(torch.utils.data.Sampler):
    """Common machinery: a deterministic stream per (seed, epoch), sharded across DDP ranks in whole
    groups, optionally `num_samples` long per rank (repeating passes), optionally yielding
    (index, per-sample seed) keys, and able to skip its first samples (mid-epoch resumption)."""

    group = 1

    def __init__(self, seed: int, num_samples: int | None, seed_samples: bool):
        self.seed = seed
        self.epoch = 0
        self.skip = 0
        self.num_samples = num_samples
        self.seed_samples = seed_samples
        self.rank, self.world_size = rank_and_world_size()

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _one_pass(self, rng: random.Random) -> list[int]:
        raise NotImplementedError

    def _shard(self, indices: list[int]) -> list[int]:
        groups = [indices[i : i + self.group] for i in range(0, len(indices) - self.group + 1, self.group)]
        groups = groups[: len(groups) - len(groups) % self.world_size]
        return [i for g in groups[self.rank :: self.world_size] for i in g]

    def __len__(self) -> int:
        if self.num_samples is not None:
            return self.num_samples
        return len(self._shard(self._one_pass(random.Random(0))))

    def __iter__(self) -> Iterator:
        rng = random.Random(f"{self.seed}-{self.epoch}")
        stream: list[int] = []
        target = self.num_samples
        while True:
            stream += self._shard(self._one_pass(rng))
            if target is None or len(stream) >= target:
                break
        if target is not None:
            stream = stream[:target]
        for position in range(self.skip, len(stream)):
            index = stream[position]
            if self.seed_samples:
                yield (index, hash((self.seed, self.epoch, self.rank, position)) & 0x7FFFFFFF)
            else:
                yield index


class RandomIdentitySampler(_EpochStream):
    """P x K identity sampler with the release's camera rule (docs/differences.md#p-x-k-sampler): per identity,
    an anchor, then K - 1 images from *other* cameras (without replacement if at least K exist, else with
    replacement), falling back to the identity's other images. Unlike the release, an identity with a
    single image contributes K copies of it, so batches stay aligned to whole identities."""

    def __init__(
        self,
        items: Sequence[Item],
        num_instances: int = 4,
        seed: int = 0,
        num_samples: int | None = None,
        seed_samples: bool = False,
    ):
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        super().__init__(seed, num_samples, seed_samples)
        self.group = num_instances
        self.by_pid: dict[int, list[int]] = defaultdict(list)
        self.cams: dict[int, list[int]] = defaultdict(list)
        for index, (_, pid, cam) in enumerate(items):
            self.by_pid[pid].append(index)
            self.cams[pid].append(cam)
        self.pids = sorted(self.by_pid)
        if not self.pids:
            raise ValueError("RandomIdentitySampler: no items")

    def _one_pass(self, rng: random.Random) -> list[int]:
        k = self.group
        out: list[int] = []
        order = list(self.pids)
        rng.shuffle(order)
        for pid in order:
            indices, cams = self.by_pid[pid], self.cams[pid]
            anchor = rng.randrange(len(indices))
            out.append(indices[anchor])
            other_cam = [indices[i] for i in range(len(indices)) if cams[i] != cams[anchor]]
            pool = other_cam or [indices[i] for i in range(len(indices)) if i != anchor] or [indices[anchor]]
            if len(pool) >= k:
                out += rng.sample(pool, k - 1)
            else:
                out += [rng.choice(pool) for _ in range(k - 1)]
        return out


class SeededRandomSampler(_EpochStream):
    """Random permutations of range(n), sharded and resumable like RandomIdentitySampler."""

    def __init__(self, n: int, seed: int = 0, num_samples: int | None = None, seed_samples: bool = False):
        if n < 1:
            raise ValueError("SeededRandomSampler: empty dataset")
        super().__init__(seed, num_samples, seed_samples)
        self.n = n

    def _one_pass(self, rng: random.Random) -> list[int]:
        order = list(range(self.n))
        rng.shuffle(order)
        return order


class IterLoader:
    """A DataLoader with a fixed number of iterations per epoch; `next()` restarts it when exhausted."""

    def __init__(self, loader: torch.utils.data.DataLoader, iters: int):
        self.loader, self.iters, self._iterator = loader, iters, None

    def __len__(self) -> int:
        return self.iters

    def new_epoch(self) -> None:
        self._iterator = iter(self.loader)

    def next(self):
        if self._iterator is None:
            self.new_epoch()
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.loader)
            return next(self._iterator)


# ================================================================================================
# Model: backbones -> GeM -> BNNeck -> classifier
# ================================================================================================


class IBN(nn.Module):
    """Instance-Batch Normalisation (IBN-Net, Pan et al. ECCV 2018): InstanceNorm (affine) on part of the
    channels, BatchNorm on the rest. ResNet-IBN-a: IN on the first half; DenseNet-IBN-a: BN on the first
    60 % and IN on the remaining 40 % (docs/differences.md#backbones)."""

    def __init__(self, channels: int, in_channels: int, in_first: bool = True):
        super().__init__()
        self.in_first = in_first
        self.split = in_channels if in_first else channels - in_channels
        self.IN = nn.InstanceNorm2d(in_channels, affine=True)
        self.BN = nn.BatchNorm2d(channels - in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = x[:, : self.split], x[:, self.split :]
        if self.in_first:
            return torch.cat([self.IN(first.contiguous()), self.BN(second.contiguous())], 1)
        return torch.cat([self.BN(first.contiguous()), self.IN(second.contiguous())], 1)


class ResNetTrunk(nn.Module):
    """torchvision ResNet/ResNeXt without avgpool/fc; keys match torchvision's (plus 'backbone.')."""

    def __init__(self, net: torchvision.models.ResNet):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _last_stride_one(trunk: ResNetTrunk) -> None:
    block = trunk.layer4[0]
    (block.conv2 if hasattr(block, "conv3") else block.conv1).stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


def _resnet_trunk(net: torchvision.models.ResNet, ibn: bool) -> ResNetTrunk:
    trunk = ResNetTrunk(net)
    if ibn:  # IBN-a: bn1 of every block (bottleneck or basic) of stages 1-3 (not stage 4)
        for layer in (trunk.layer1, trunk.layer2, trunk.layer3):
            for block in layer:
                planes = block.bn1.num_features
                block.bn1 = IBN(planes, planes // 2, in_first=True)
    _last_stride_one(trunk)
    return trunk


class DenseNetTrunk(nn.Module):
    """torchvision DenseNet `features` followed by the ReLU that DenseNet applies in forward."""

    def __init__(self, net: torchvision.models.DenseNet, ibn: bool):
        super().__init__()
        self.features = net.features
        if ibn:  # IBN-a: norm1 of dense layers 0, 3, 6, ... of blocks 1-3 (BN 60 % first, IN 40 %)
            for block_name in ("denseblock1", "denseblock2", "denseblock3"):
                for index, layer in enumerate(getattr(self.features, block_name).children()):
                    if index % 3 == 0:
                        channels = layer.norm1.num_features
                        layer.norm1 = IBN(channels, channels - int(channels * 0.6), in_first=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))


class SplitAttentionConv(nn.Module):
    """Split-attention convolution of ResNeSt (Zhang et al., 2020), radix r, cardinality 1: the r
    branches of a grouped conv are re-weighted by an r-softmax attention computed from their pooled sum.
    Attribute names follow the ResNeSt release so its ImageNet weights load."""

    def __init__(self, in_channels: int, channels: int, radix: int = 2, reduction: int = 4):
        super().__init__()
        self.radix, self.channels = radix, channels
        inter = max(in_channels * radix // reduction, 32)
        self.conv = nn.Conv2d(in_channels, channels * radix, 3, 1, 1, groups=radix, bias=False)
        self.bn0 = nn.BatchNorm2d(channels * radix)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, inter, 1)
        self.bn1 = nn.BatchNorm2d(inter)
        self.fc2 = nn.Conv2d(inter, channels * radix, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.conv(x)))
        splits = torch.split(x, self.channels, dim=1)
        gap = F.adaptive_avg_pool2d(sum(splits), 1)
        attention = self.fc2(self.relu(self.bn1(self.fc1(gap))))
        batch = x.shape[0]
        attention = attention.view(batch, 1, self.radix, -1).transpose(1, 2).softmax(dim=1)
        attention = attention.reshape(batch, -1, 1, 1)
        return sum(a * s for a, s in zip(torch.split(attention, self.channels, dim=1), splits, strict=True))


class ResNeStBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, avd: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.avd_layer = nn.AvgPool2d(3, stride, padding=1) if avd else None  # "avd": pooling after conv2
        self.conv2 = SplitAttentionConv(planes, planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        if self.avd_layer is not None:
            out = self.avd_layer(out)
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNeStTrunk(nn.Module):
    """ResNeSt-50/101: deep stem, radix-2 split attention, average-pool downsampling ("avg down") and
    avd; stride 32 kept as in the release (docs/differences.md#backbones)."""

    def __init__(self, layers: Sequence[int], stem_width: int):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, 2, 1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width * 2, 3, 1, 1, bias=False),
        )
        self.bn1 = nn.BatchNorm2d(stem_width * 2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = stem_width * 2
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(self.inplanes, planes * 4, 1, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
        layers = [ResNeStBottleneck(self.inplanes, planes, stride, downsample, avd=stride > 1 or blocks > 0)]
        self.inplanes = planes * 4
        layers += [ResNeStBottleneck(self.inplanes, planes, 1, None, avd=False) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def build_trunk(arch: str) -> tuple[nn.Module, int]:
    """(trunk, feature dimension). Never downloads: every torchvision constructor gets weights=None."""
    models = torchvision.models
    bottleneck = models.resnet.Bottleneck
    if arch == "resnet18":
        return _resnet_trunk(models.resnet18(weights=None), ibn=False), 512
    if arch == "resnet18_ibn":  # IBN-Net's resnet18_ibn_a: IN on half of bn1 in every basic block of stages 1-3
        return _resnet_trunk(models.resnet18(weights=None), ibn=True), 512
    if arch == "resnet50":
        return _resnet_trunk(models.resnet50(weights=None), ibn=False), 2048
    if arch == "resnet50_ibn":
        return _resnet_trunk(models.resnet50(weights=None), ibn=True), 2048
    if arch == "resnet101_ibn":
        return _resnet_trunk(models.resnet101(weights=None), ibn=True), 2048
    if arch == "resnext101_ibn":  # ResNeXt-101 32x4d, as IBN-Net's resnext101_ibn_a
        net = models.ResNet(bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)
        return _resnet_trunk(net, ibn=True), 2048
    if arch == "densenet169_ibn":
        return DenseNetTrunk(models.densenet169(weights=None), ibn=True), 1664
    if arch == "resnest50":
        return ResNeStTrunk([3, 4, 6, 3], stem_width=32), 2048
    if arch == "resnest101":
        return ResNeStTrunk([3, 4, 23, 3], stem_width=64), 2048
    raise ValueError(f"unknown --arch {arch!r}; expected one of {', '.join(ARCHS)}")


ARCHS = (
    "resnet18",
    "resnet18_ibn",
    "resnet50",
    "resnet50_ibn",
    "resnet101_ibn",
    "resnext101_ibn",
    "densenet169_ibn",
    "resnest50",
    "resnest101",
)

# File names of the ImageNet weights looked up in the torch hub cache by `--pretrained imagenet`.
IMAGENET_FILES = {
    "resnet18": "resnet18-f37072fd.pth (torchvision)",
    "resnet18_ibn": "resnet18_ibn_a-2f571257.pth (IBN-Net release)",
    "resnet50": "resnet50-0676ba61.pth or resnet50-11ad3fa6.pth (torchvision)",
    "resnet50_ibn": "resnet50_ibn_a-d9d0bb7b.pth (IBN-Net release)",
    "resnet101_ibn": "resnet101_ibn_a-59ea0ac6.pth (IBN-Net release)",
    "resnext101_ibn": "resnext101_ibn_a-6ace051d.pth (IBN-Net release)",
    "densenet169_ibn": "densenet169_ibn_a-9f32c161.pth (IBN-Net release)",
    "resnest50": "resnest50-528c19ca.pth (ResNeSt release)",
    "resnest101": "resnest101-22405ba7.pth (ResNeSt release)",
}


def require_reid_ops():
    """The compiled extension, or a one-line error saying how to build it."""
    if reid_ops is None:
        raise RuntimeError("the reid_ops extension is not importable: build it with `bash setup_env.sh`")
    return reid_ops


def gem_pytorch(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GeM in plain PyTorch, (mean_hw max(x, eps)^p)^(1/p) -> (N, C) float32: the portable twin of reid_ops.gem
    (same result up to rounding, NaN and Inf included), used when the extension is absent and when a model is traced
    or exported. Computed in float32 (float64 for float64 inputs)."""
    values = (x if x.dtype == torch.float64 else x.float()).clamp(min=eps)
    largest = values.detach().amax(dim=(-2, -1), keepdim=True)
    finite = torch.isfinite(largest)  # False for a plane holding NaN or +Inf
    # Finite planes: in the log domain and divided by their largest value M (GeM is homogeneous, y(x) = M y(x / M)),
    # so x^p neither overflows (1e30^3 in float32) nor underflows (an all-zero plane's eps^6.5), as in reid_ops.
    # Autograd's intermediates stay below about |dL/dy| * y * HW / p.
    log_largest = torch.where(finite, largest, 1.0).log()
    log_scaled = torch.where(finite, values, 1.0).log() - log_largest
    log_mean = (p * log_scaled).exp().mean(dim=(-2, -1)).log()
    from_logs = (log_largest.flatten(-3) + log_mean / p).exp()
    # Planes holding NaN or +Inf: the plain expression, whose NaN / Inf (and autograd's gradients) are the rule. Each
    # branch sees the value 1 where it is not selected, so no NaN leaks through torch.where's backward.
    plain = torch.where(finite, 1.0, values).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
    return torch.where(finite.flatten(-3), from_logs, plain).float()


def _exporting() -> bool:
    """True while torch.jit.trace, torch.export or torch.onnx.export runs the model (custom ops do not export)."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


class GeM(nn.Module):
    """Generalized-mean pooling with a learnable exponent p (init 3): fused in reid_ops for training and inference
    inside the toolkit, plain PyTorch (`gem_pytorch`) without the extension or when exporting."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if reid_ops is None or _exporting():
            return gem_pytorch(x, self.p, self.eps)
        return reid_ops.gem(x, self.p, self.eps).float()


class ReIDModel(nn.Module):
    """trunk -> GeM -> BNNeck (bias frozen) -> linear classifier (no bias).

    eval mode: returns the BNNeck feature f_bn. train mode: (f_pool, f_bn, logits); `labels` are passed
    to the classifier when given, so a margin head (mmt_plus.py) can replace `.classifier`.
    """

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        self.arch = arch
        self.backbone, self.feature_dim = build_trunk(arch)
        self.pool = GeM()
        self.bnneck = nn.BatchNorm1d(self.feature_dim)
        nn.init.ones_(self.bnneck.weight)
        nn.init.zeros_(self.bnneck.bias)
        self.bnneck.bias.requires_grad_(False)
        self.classifier = None
        if num_classes > 0:
            self.classifier = nn.Linear(self.feature_dim, num_classes, bias=False)
            nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        f_pool = self.pool(self.backbone(x))
        f_bn = self.bnneck(f_pool)
        if not self.training:
            return f_bn
        if self.classifier is None:
            return f_pool, f_bn, None
        logits = self.classifier(f_bn) if labels is None else self.classifier(f_bn, labels)
        return f_pool, f_bn, logits


def build_model(
    arch: str, num_classes: int, pretrained: str | None = None, allow_partial_weights: bool = False
) -> ReIDModel:
    """The re-ID network; `pretrained` is None, a local weights file, or "imagenet" (local torch hub cache).
    A weights file that leaves trunk tensors at their defaults is refused unless `allow_partial_weights`."""
    model = ReIDModel(arch, num_classes)
    if pretrained:
        load_imagenet_weights(model.backbone, arch, pretrained, allow_partial=allow_partial_weights)
    return model


def _convert_release_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release formats -> our trunk keys: drop heads, rename old torchvision DenseNet keys."""
    out = {}
    for key, value in state.items():
        if key.startswith(("fc.", "classifier.")):
            continue
        key = re.sub(
            r"(denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))",
            lambda m: m.group(1) + m.group(2),
            key,
        )
        out[key] = value
    return out


def load_imagenet_weights(trunk: nn.Module, arch: str, source: str, allow_partial: bool = False) -> None:
    """Loads ImageNet weights into a trunk from a local file (torchvision, IBN-Net-release or ResNeSt-
    release key format), or the trunk of a pretrain.py checkpoint (its GeM, BNNeck and classifier are not
    loaded: they start afresh, as after ImageNet). Unexpected keys are reported; shape mismatches, a checkpoint of
    another architecture and (unless `allow_partial`) a file that leaves trunk tensors at their defaults, e.g. plain
    ResNet-50 weights for resnet50_ibn (its IBN tensors), are refused with the missing tensors listed."""
    if source == "imagenet":
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        prefix = IMAGENET_FILES[arch].split("-")[0]
        candidates = sorted(glob.glob(str(cache / f"{prefix}-*.pth")))
        if not candidates:
            raise FileNotFoundError(
                f"--pretrained imagenet: no ImageNet weights for {arch} in {cache}. Nothing is downloaded: place "
                f"{IMAGENET_FILES[arch]} there, or pass --pretrained /path/to/weights.pth"
            )
        source = candidates[0]
    path = Path(source)
    checkpoint = read_checkpoint(path, kinds=("weights", *REID_MODEL_KINDS), what="--pretrained")
    saved_arch = checkpoint_setting(checkpoint, "arch")
    if isinstance(saved_arch, str) and saved_arch != arch:
        raise ValueError(f"--pretrained {path}: a {saved_arch} checkpoint, not {arch}")
    weights = checkpoint["state_dict"]
    trunk_prefix = "backbone."  # a ReIDModel state dict (pretrain.py checkpoint): keep only its trunk
    if any(key.startswith(trunk_prefix) for key in weights):
        weights = {
            key.removeprefix(trunk_prefix): value for key, value in weights.items() if key.startswith(trunk_prefix)
        }
    state = _convert_release_keys(weights)
    own = trunk.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise ValueError(f"--pretrained {path}: {len(mismatched)} shapes do not match {arch}: {mismatched[:5]}")
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    if missing and not allow_partial:
        raise ValueError(
            f"--pretrained {path}: {len(missing)} of {len(own)} {arch} trunk tensors are not in the file and would "
            f"keep their random initialisation: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}. "
            "Wrong weights for this architecture? --allow-partial-weights loads them anyway"
        )
    trunk.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    print(
        f"[pretrained] {path}: loaded {len(state) - len(unexpected)} tensors into {arch}; "
        f"missing {len(missing)} {missing[:5]}; unexpected {len(unexpected)} {unexpected[:5]}"
    )
    if len(missing) > len(own) // 2:
        raise ValueError(
            f"--pretrained {path}: most {arch} weights are missing ({len(missing)}/{len(own)}): "
            "wrong architecture for this file?"
        )


# ================================================================================================
# Losses (docs/differences.md#losses)
# ================================================================================================


def label_smoothed_ce(logits: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """Cross-entropy with targets (1 - eps) onehot + eps / K (Szegedy et al. 2016)."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    smooth = torch.full_like(log_probs, epsilon / logits.shape[1])
    smooth.scatter_(1, targets.view(-1, 1), 1 - epsilon + epsilon / logits.shape[1])
    return -(smooth * log_probs).sum(1).mean()


def _euclidean(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    squared = x.pow(2).sum(1)
    return (squared[:, None] + squared[None] - 2 * x @ x.t()).clamp_min(1e-12).sqrt()


def _hardest(distances: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-hard mining: the farthest positive (self included) and the closest negative per anchor."""
    same = labels[:, None] == labels[None]
    positive = distances.masked_fill(~same, float("-inf")).argmax(1)
    negative = distances.masked_fill(same, float("inf")).argmin(1)
    return positive, negative


def softmax_triplet_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax-triplet with margin 0: mean softplus(d_ap - d_an) = -log(e^d_an / (e^d_ap + e^d_an))."""
    distances = _euclidean(features)
    positive, negative = _hardest(distances, labels)
    rows = torch.arange(len(labels), device=features.device)
    if bool((labels[:, None] != labels[None]).any(1).logical_not().any()):
        raise ValueError("softmax_triplet_loss: some anchor has no negative in the batch (one identity only?)")
    return F.softplus(distances[rows, positive] - distances[rows, negative]).mean()


def soft_triplet_loss(features: torch.Tensor, labels: torch.Tensor, reference_features: torch.Tensor) -> torch.Tensor:
    """Soft softmax-triplet (MMT): triples mined on `features`; targets softmax(d_ap, d_an) of the detached
    `reference_features` at the same index pairs."""
    distances = _euclidean(features)
    positive, negative = _hardest(distances, labels)
    rows = torch.arange(len(labels), device=features.device)
    log_probs = F.log_softmax(torch.stack([distances[rows, positive], distances[rows, negative]], 1), 1)
    with torch.no_grad():
        reference = _euclidean(reference_features.detach())
        targets = F.softmax(torch.stack([reference[rows, positive], reference[rows, negative]], 1), 1)
    return -(targets * log_probs).sum(1).mean()


# ================================================================================================
# Features, evaluation, checkpoints, run helpers (shared by every stage)
# ================================================================================================


@torch.no_grad()
def extract_features(
    model: nn.Module,
    items: Sequence[Item],
    height: int,
    width: int,
    batch_size: int = 128,
    flip: bool = False,
    workers: int = 2,
    device: torch.device | str | None = None,
    cache: DecodedImageCache | None = None,
) -> torch.Tensor:
    """(N, D) float32 eval-mode BNNeck features on the CPU, in item order; averaged with the horizontally
    flipped image when `flip`. Not normalised. `cache`: see make_test_loader."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = make_test_loader(items, height, width, batch_size, workers, cache)
    chunks = []
    for images, *_ in progress(loader, desc="features", unit="batch", disable=len(items) < 2 * batch_size):
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        features = model(images).float()
        if flip:
            features = (features + model(torch.flip(images, dims=[3])).float()) / 2
        chunks.append(features.cpu())
    model.train(was_training)
    if not chunks:
        return torch.zeros(0, getattr(model, "feature_dim", 0))
    return torch.cat(chunks)


def evaluate(
    model: nn.Module,
    query: Sequence[Item],
    gallery: Sequence[Item],
    height: int,
    width: int,
    batch_size: int = 128,
    flip: bool = False,
    workers: int = 2,
    device: torch.device | str | None = None,
    ap_topk: int | None = None,
    cache: DecodedImageCache | None = None,
) -> dict[str, Any]:
    """mAP / CMC of L2-normalised features under squared Euclidean distance (docs/differences.md#validation-metric)."""
    images = list(query) + list(gallery)
    features = extract_features(model, images, height, width, batch_size, flip, workers, device, cache)
    features = F.normalize(features, dim=1)
    q, g = features[: len(query)], features[len(query) :]
    distances = require_reid_ops().pairwise_distance(q, g)
    result = require_reid_ops().evaluate_rank(
        distances,
        np.array([pid for _, pid, _ in query]),
        np.array([pid for _, pid, _ in gallery]),
        np.array([cam for _, _, cam in query]),
        np.array([cam for _, _, cam in gallery]),
        max_rank=min(50, len(gallery)),
        ap_topk=ap_topk,
    )
    result["top1"], result["top5"] = float(result["cmc"][0]), float(result["cmc"][min(4, len(result["cmc"]) - 1)])
    return result


# ------------------------------------------------------------------------------------------------
# Evaluation of an image translation (sda.py train and fidelity): does it keep each person's colours
# (identity_fidelity), how much of the source's look does it leave (style_gap)?

# Body bands as fractions of the person's height (top of the head = 0, soles = 1), following the proportions
# of a standing pedestrian: head and hair (or cap), upper torso (clothing, backpack, straps), lower torso and
# waist (two-tone tops, shoulder bags, handbags), legs (trousers, skirt, shorts).
BODY_BANDS = {"head": (0.0, 0.13), "upper": (0.17, 0.35), "middle": (0.35, 0.53), "legs": (0.56, 0.92)}
MIN_REGION_PIXELS = 4


def person_masks(images01: torch.Tensor, tolerance: float = 0.12) -> torch.Tensor:
    """(N,H,W) foreground of source crops on flat backgrounds: in every row the background is the colour of the
    row's two outermost pixels on each side, and a pixel belongs to the person when some channel differs by
    more than `tolerance` (in [0, 1]) from both the left and the right background colour."""
    left = images01[..., :2].mean(-1, keepdim=True)
    right = images01[..., -2:].mean(-1, keepdim=True)
    return torch.minimum((images01 - left).abs().amax(1), (images01 - right).abs().amax(1)) > tolerance


def body_region_weights(masks: torch.Tensor) -> torch.Tensor:
    """(N,R,H,W) 0/1 weights of the BODY_BANDS regions: the person's pixels in each band of rows between the
    first and the last row holding at least two person pixels."""
    n, height, _ = masks.shape
    rows = masks.sum(-1) >= 2  # (N,H)
    row_index = torch.arange(height, device=masks.device).expand(n, height)
    top = torch.where(rows, row_index, height).amin(1, keepdim=True)
    bottom = torch.where(rows, row_index, -1).amax(1, keepdim=True)
    fraction = (row_index - top + 0.5) / (bottom - top + 1).clamp(min=1)  # (N,H), centre of each row
    bands = torch.stack([(fraction >= f0) & (fraction < f1) & rows for f0, f1 in BODY_BANDS.values()], 1)
    return (bands[..., None] & masks[:, None]).float()


def region_colours(images01: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean colour (N,R,3) of each region and whether it has at least MIN_REGION_PIXELS pixels (N,R)."""
    counts = weights.sum((2, 3))
    sums = torch.einsum("nchw,nrhw->nrc", images01.double(), weights.double())
    return sums / counts.clamp(min=1)[..., None].double(), counts >= MIN_REGION_PIXELS


def fidelity_from_region_colours(
    source: torch.Tensor, translated: torch.Tensor, valid: torch.Tensor, pids: torch.Tensor
) -> dict[str, float]:
    """How far a translation moves each identity's region colours, relative to the spread between identities.

    source/translated: (N,R,3) region colours of N images, valid (N,R), pids (N). Per identity i and region r,
    S[i,r] and T[i,r] average the images of i where r is valid. A translation may change the style of the whole
    domain, so the translated colours are first mapped back by the best camera-like correction, one gain and
    offset per channel fitted over all (i, r) by least squares (S ~ a T + b); a global colour cast, exposure or
    contrast change is undone exactly, a change that differs between identities (a red top turning yellow while
    a blue one stays blue) is not. Then
        z[i,r]   = |a T[i,r] + b - S[i,r]| / spread[r],  spread[r] = RMS over identities of |S[i,r] - mean_i S[i,r]|
        drift[i] = sqrt(mean_r z[i,r]^2)        (0: colours kept; about 1: as far as another person's colours)
    Returns identity_drift = mean_i drift[i], identity_kept = the share of identities whose corrected translated
    colours are closest to their own source colours (mean over shared regions of z-scaled squared distances),
    drift_<region> = RMS over identities of z[:, r], and the number of identities."""
    identities = torch.unique(pids)
    weights = (pids[None, :] == identities[:, None]).double()[:, :, None] * valid.double()[None]  # (I,N,R)
    count = weights.sum(1)  # (I,R)
    present = count > 0
    mean_source = torch.einsum("inr,nrc->irc", weights, source.double()) / count.clamp(min=1)[..., None]
    mean_translated = torch.einsum("inr,nrc->irc", weights, translated.double()) / count.clamp(min=1)[..., None]
    s, t = mean_source[present], mean_translated[present]  # (M,3)
    t_centred, s_centred = t - t.mean(0), s - s.mean(0)
    gain = (t_centred * s_centred).sum(0) / (t_centred**2).sum(0).clamp(min=1e-12)
    offset = s.mean(0) - gain * t.mean(0)
    corrected = gain * mean_translated + offset  # (I,R,3)
    region_mean = (mean_source * present[..., None]).sum(0) / present.sum(0).clamp(min=1)[:, None]  # (R,3)
    spread = (((mean_source - region_mean) ** 2).sum(-1) * present).sum(0) / present.sum(0).clamp(min=1)
    spread = spread.sqrt().clamp(min=1e-6)  # (R,)
    z2 = ((corrected - mean_source) ** 2).sum(-1) / spread**2  # (I,R)
    drift = ((z2 * present).sum(1) / present.sum(1).clamp(min=1)).sqrt()
    # identification: corrected translation of i against the source colours of every j, over shared regions
    shared = present[:, None, :] & present[None, :, :]
    pair = ((corrected[:, None] - mean_source[None]) ** 2).sum(-1) / spread**2  # (I,J,R)
    distance = (pair * shared).sum(-1) / shared.sum(-1).clamp(min=1)
    distance = torch.where(shared.any(-1), distance, torch.inf)
    kept = (distance.argmin(1) == torch.arange(len(identities))).double()
    result = {"identity_drift": drift.mean().item(), "identity_kept": kept.mean().item()}
    for r, name in enumerate(BODY_BANDS):
        rows = present[:, r]
        result[f"drift_{name}"] = z2[rows, r].mean().sqrt().item() if rows.any() else float("nan")
    result["identities"] = len(identities)
    return result


def identity_fidelity(source01: torch.Tensor, translated01: torch.Tensor, pids: torch.Tensor) -> dict[str, float]:
    """fidelity_from_region_colours of [0, 1] source crops (flat backgrounds) and their pixel-aligned
    translations (a CycleGAN's are), with the regions found on the source crops (person_masks, BODY_BANDS). A
    translation that moves or re-frames the person (e.g. the benchmark's perfect-translator control) reads other
    pixels and cannot be scored this way."""
    weights = body_region_weights(person_masks(source01.float()))
    source, valid = region_colours(source01, weights)
    translated, _ = region_colours(translated01, weights)
    return fidelity_from_region_colours(source, translated, valid, pids)


def image_statistics(images01: torch.Tensor) -> torch.Tensor:
    """(N,9) low-level statistics of [0, 1] images, what a camera's style changes: per-channel mean and standard
    deviation, mean saturation (max - min channel), and the mean absolute horizontal gradient and Laplacian of
    the grey image (sharpness, blur, noise)."""
    images01 = images01.double()
    grey = images01.mean(1)
    laplacian = (
        4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]
    )
    return torch.cat(
        [
            images01.mean((2, 3)),
            images01.std((2, 3)),
            (images01.amax(1) - images01.amin(1)).mean((1, 2))[:, None],
            (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean((1, 2))[:, None],
            laplacian.abs().mean((1, 2))[:, None],
        ],
        1,
    )


def style_gap(source01: torch.Tensor, translated01: torch.Tensor, target01: torch.Tensor) -> float:
    """How much of the source-target difference in image_statistics the translation leaves: with every
    statistic scaled by its standard deviation over the source and target images, |mean(translated) -
    mean(target)| / |mean(source) - mean(target)|; 1 = the source's look (e.g. the identity map), 0 = the
    target's. Read beside identity_fidelity: the identity map keeps every identity and translates nothing."""
    source, translated, target = (image_statistics(x) for x in (source01, translated01, target01))
    scale = torch.cat([source, target]).std(0).clamp(min=1e-8)
    source_mean, translated_mean, target_mean = (x.mean(0) / scale for x in (source, translated, target))
    return ((translated_mean - target_mean).norm() / (source_mean - target_mean).norm().clamp(min=1e-12)).item()


def fidelity_items(items: Sequence[tuple], per_identity: int = 2, max_images: int = 256) -> list[tuple]:
    """A fixed probe set: the first `per_identity` images (sorted by path) of each identity, at most
    `max_images` in all."""
    by_pid: dict[int, list[tuple]] = {}
    for item in sorted(items):
        by_pid.setdefault(item[1], []).append(item)
    chosen = [item for pid in sorted(by_pid) for item in by_pid[pid][:per_identity]]
    return chosen[:max_images]


def translation_fidelity(
    source01: torch.Tensor, translated01: torch.Tensor, pids: torch.Tensor, target01: torch.Tensor | None = None
) -> dict[str, float]:
    """identity_fidelity of [0, 1] source images and their translations, and the style_gap to [0, 1] target images
    when there are any."""
    result = identity_fidelity(source01, translated01, pids)
    if target01 is not None:
        result["style_gap"] = style_gap(source01, translated01, target01)
    return result


# ------------------------------------------------------------------------------------------------
# Checkpoints: the one file format of every stage
#
# Every file a stage writes with `save_checkpoint` is a dict of tensors and plain data (numbers, strings, lists,
# dicts) carrying `format_version` and `kind`, written atomically under a `.pth` name. `read_checkpoint` loads
# with torch's weights_only unpickler (a file cannot run code), strips DDP's 'module.' prefixes once, recognises
# the files of earlier versions of this toolkit (no `format_version`) and refuses a file of the wrong kind with a
# message naming the file and what it holds. `load_model` builds the re-ID network a checkpoint describes.

CHECKPOINT_FORMAT = 1
CHECKPOINT_SUFFIX = ".pth"
CHECKPOINT_KINDS = {
    "pretrain": "a pretrain.py re-ID model",
    "mmt_plus": "an mmt_plus.py re-ID model (a mean teacher)",
    "camera": "a camera.py camera classifier",
    "sda": "an sda.py CycleGAN (generators, discriminators)",
    "features": "postprocess.py cached features",
    "weights": "a bare state dict (e.g. ImageNet weights)",
}
REID_MODEL_KINDS = ("pretrain", "mmt_plus")  # files that hold a re-ID network (model_best.pth, checkpoint.pth)
# Earlier versions saved numpy's RNG state as an array: these globals only rebuild plain numeric arrays.
_LEGACY_NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def atomic_write(path: str | Path, write) -> None:
    """write(temporary path) in the destination folder, then rename over `path`: never a torn file. The temporary
    name is `.NAME.tmpPID`; `remove_stale_temporaries` deletes those an interrupted run left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, record: Any, indent: int = 2) -> None:
    """`record` as indented JSON text (atomic_write_text)."""
    atomic_write_text(path, json.dumps(record, indent=indent) + "\n")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Deletes the `.NAME.tmpPID` files of `atomic_write` calls that never finished (a killed run)."""
    stale = [p for p in Path(folder).glob(".*.tmp*") if re.fullmatch(r"\..+\.tmp\d+", p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_checkpoint(state: dict, path: str | Path, kind: str) -> None:
    """Atomically writes `state` (tensors and plain data only) as a checkpoint of `kind` (CHECKPOINT_KINDS)."""
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {', '.join(CHECKPOINT_KINDS)}")
    path = Path(path)
    if path.suffix != CHECKPOINT_SUFFIX:
        raise ValueError(f"{path}: checkpoints are written as {CHECKPOINT_SUFFIX} files")
    atomic_write(
        path, lambda temporary: torch.save({**state, "format_version": CHECKPOINT_FORMAT, "kind": kind}, temporary)
    )


def _legacy_kind(checkpoint: dict) -> str:
    """The kind of a file written before checkpoints carried one (this toolkit's earlier layouts)."""
    kind = checkpoint.get("kind")
    if kind in ("mmt", "mmt-resume"):  # mmt_plus.py's model_best.pth / checkpoint.pth
        return "mmt_plus"
    if kind in ("camera", "sda"):
        return kind
    if "features" in checkpoint and "paths" in checkpoint:
        return "features"
    if isinstance(checkpoint.get("state_dict"), dict):  # pretrain.py (no kind) or another tool's {"state_dict"}
        return "pretrain"
    return "weights"


def _torch_load(path: Path, what: str) -> Any:
    """torch.load with the weights_only unpickler: tensors and plain data only, so a file cannot run code."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        globals_named = [line.strip() for line in message.splitlines() if "GLOBAL" in line]
        if not globals_named:  # not a pickle the safe unpickler can parse
            raise ValueError(f"{what} {path}: cannot be read ({message.strip().splitlines()[-1]})") from None
        reason = globals_named[0].split("WeightsUnpickler error:")[-1].strip()
        raise ValueError(
            f"{what} {path}: refused, it holds Python objects that are not tensors or plain data ({reason}); "
            "only files of tensors, numbers, strings, lists and dicts are read"
        ) from None
    except Exception as error:  # noqa: BLE001 - the message names the file and the cause
        raise ValueError(f"{what} {path}: cannot be read ({type(error).__name__}: {error})") from None


def read_checkpoint(path: str | Path, kinds: Sequence[str] | None = None, what: str = "checkpoint") -> dict:
    """The checkpoint at `path` as a dict with `kind`, `format_version` (0: an earlier version's file) and, when it
    holds a network, `state_dict` without DDP 'module.' prefixes. `kinds` lists the kinds the caller accepts;
    `what` (e.g. the command-line flag) starts every error message."""
    path = Path(path)
    checkpoint = _torch_load(path, what)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{what} {path}: holds a {type(checkpoint).__name__}, not a checkpoint dict")
    if "format_version" not in checkpoint:
        kind = _legacy_kind(checkpoint)
        if kind == "weights":
            nested = checkpoint.get("model")  # {"model": state dict}, as some releases save
            checkpoint = {"state_dict": nested if isinstance(nested, dict) else checkpoint}
        checkpoint = {**checkpoint, "format_version": 0, "kind": kind}
    elif not isinstance(checkpoint["format_version"], int) or checkpoint["format_version"] > CHECKPOINT_FORMAT:
        raise ValueError(
            f"{what} {path}: checkpoint format {checkpoint['format_version']!r} is newer than this code's "
            f"({CHECKPOINT_FORMAT}); update the toolkit"
        )
    kind = checkpoint.get("kind")
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"{what} {path}: unknown checkpoint kind {kind!r}")
    if kinds is not None and kind not in kinds:
        wanted = " or ".join(f"{CHECKPOINT_KINDS[k]} ({k})" for k in kinds)
        raise ValueError(f"{what} {path}: holds {CHECKPOINT_KINDS[kind]} ({kind}), but {wanted} is needed here")
    state = checkpoint.get("state_dict")
    if state is not None:
        if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
            raise ValueError(f"{what} {path}: its state_dict is not a dict of named tensors")
        checkpoint["state_dict"] = {key.removeprefix("module."): value for key, value in state.items()}
    return checkpoint


def checkpoint_setting(checkpoint: dict, name: str) -> Any:
    """A setting stored at the top level of a checkpoint or in its saved arguments (`args`)."""
    if checkpoint.get(name) is not None:
        return checkpoint[name]
    args = checkpoint.get("args")
    return args.get(name) if isinstance(args, dict) else None


def load_model(
    path: str | Path,
    kinds: Sequence[str] = REID_MODEL_KINDS,
    arch: str | None = None,
    num_classes: int = 0,
    what: str = "checkpoint",
) -> tuple[ReIDModel, dict]:
    """(network, checkpoint): `build_model(arch, num_classes)` with the checkpoint's weights. The architecture is
    the checkpoint's own; `arch` must agree with it, or name it when the file does not. The saved classifier is
    loaded when `num_classes` matches its rows, else left at its fresh initialisation (num_classes 0: no head).
    A checkpoint missing any weight of the network is refused."""
    checkpoint = read_checkpoint(path, kinds, what)
    saved_arch = checkpoint_setting(checkpoint, "arch")
    if arch and saved_arch and arch != saved_arch:
        raise ValueError(f"{what} {path}: holds a {saved_arch} model, not {arch}")
    arch = arch or saved_arch
    if not arch:
        raise ValueError(f"{what} {path}: the checkpoint names no architecture; pass it explicitly")
    model = build_model(arch, num_classes)
    own = model.state_dict()
    state = {k: v for k, v in checkpoint["state_dict"].items() if k in own and v.shape == own[k].shape}
    wrong_shape = [k for k, v in checkpoint["state_dict"].items() if k in own and v.shape != own[k].shape]
    wrong_shape = [k for k in wrong_shape if not k.startswith("classifier.")]
    if wrong_shape:
        details = [f"{k}: {tuple(checkpoint['state_dict'][k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape]
        raise ValueError(f"{what} {path}: {len(wrong_shape)} weights do not fit a {arch} model: {details[:5]}")
    missing = sorted(
        k for k in set(own) - set(state) if not k.endswith("num_batches_tracked") and not k.startswith("classifier.")
    )
    if missing:
        raise ValueError(
            f"{what} {path}: {len(missing)} weights of a {arch} model are missing (e.g. {missing[:3]}); "
            "a checkpoint of another architecture, or one with domain-specific BN that was not collapsed?"
        )
    model.load_state_dict(state, strict=False)
    return model, checkpoint


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast on the CPU (AMX makes it ~3x faster here), fp16 on CUDA; a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch global RNG states as tensors and plain data (checkpoint-safe)."""
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {
        "algorithm": algorithm,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def restore_training_state(
    checkpoint_path: Path, kind: str, arch: str, num_classes: int, model: nn.Module, optimizer, scheduler
) -> dict:
    """--resume of a single-model training stage: reads `checkpoint_path` (of `kind`), refuses one saved for
    another backbone or class count, restores model, optimizer, scheduler and the random generators, and
    returns the checkpoint for the stage's own counters."""
    state = read_checkpoint(checkpoint_path, kinds=(kind,), what="--resume")
    if state.get("arch") != arch or state.get("num_classes") != num_classes:
        raise ValueError(
            f"--resume: {checkpoint_path} holds a {state.get('arch')} model with {state.get('num_classes')} "
            f"classes, not {arch} with {num_classes}; use another --logs-dir"
        )
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def set_rng_state(state: dict) -> None:
    """Restores `rng_state()`; also reads the numpy array of earlier checkpoints."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        keys = numpy_state["keys"].numpy().astype(np.uint32)
        numpy_state = (
            numpy_state["algorithm"],
            keys,
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])


class PlainProgress:
    """Progress for logs: a plain line (count, rate, ETA, postfix) every `interval` seconds and at the end, instead of
    tqdm's carriage-return stream, which turns a log file into one very long line. Same calls as tqdm's used here."""

    def __init__(
        self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it", interval: float = 30.0
    ):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.interval = desc, unit, interval
        self.count, self.postfix, self.printed = 0, "", None
        self.start = self.last = time.monotonic()

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.count / elapsed
        done = f"{self.count}/{self.total}" if self.total else str(self.count)
        eta = ""
        if self.total and rate > 0 and self.count < self.total:
            eta = f", ETA {format_seconds((self.total - self.count) / rate)}"
        postfix = f", {self.postfix}" if self.postfix else ""
        return f"[{self.desc}] {done} {self.unit} in {format_seconds(elapsed)} ({rate:.3g} {self.unit}/s{eta}){postfix}"

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print()

    def _print(self) -> None:
        self.printed = (self.count, self.postfix)
        print(self._line(), file=sys.stderr, flush=True)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.count and self.printed != (self.count, self.postfix):  # the final state, once
            self._print()
        self.count = 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


PROGRESS_MIN_ITEMS = 2000  # a step over fewer images is quick: callers pass disable=n < PROGRESS_MIN_ITEMS


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False):
    """A progress display for a step that can take more than a few seconds: tqdm (rate, ETA) on a terminal, plain
    periodic lines when stderr is a file or pipe (REID_PROGRESS_SECONDS sets their interval, default 30 s)."""
    if disable:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
    interval = float(os.environ.get("REID_PROGRESS_SECONDS", "30"))
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, interval=interval)


class JsonlLogger:
    """The run's log, twice: `log.jsonl` (one JSON object per record, for programs) and `log.txt` beside it (the
    same records as one line of text each, for people), appended and flushed per record.

    `position()` (the two file sizes) goes into every checkpoint; a resumed run passes it back as
    `resume_position`, which cuts both files back to what they held at that checkpoint, so records written after it
    by the interrupted run (and written again by the resumed one) appear once."""

    def __init__(self, path: str | Path, resume_position: dict | None = None):
        self.path = Path(path)
        self.text_path = self.path.with_suffix(".txt")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_position:
            for file, size in ((self.path, resume_position.get("jsonl")), (self.text_path, resume_position.get("txt"))):
                if size is not None and file.is_file() and file.stat().st_size > size:
                    with file.open("r+b") as handle:
                        handle.truncate(size)

    def position(self) -> dict:
        return {
            "jsonl": self.path.stat().st_size if self.path.is_file() else 0,
            "txt": self.text_path.stat().st_size if self.text_path.is_file() else 0,
        }

    def log(self, record: dict) -> None:
        now = time.time()
        with self.path.open("a") as handle:
            handle.write(json.dumps({"time": round(now, 3), **record}, default=float) + "\n")
        with self.text_path.open("a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}  {_text_fields(record)}\n")


def _text_fields(record: dict) -> str:
    """`key=value` pairs: floats with 4 significant digits, nested records compact, the arguments left out (they
    are in args.json)."""

    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
        if isinstance(value, list | tuple):
            return "[" + ", ".join(show(v) for v in value) + "]"
        return str(value)

    return "  ".join(f"{key}={show(value)}" for key, value in record.items() if key != "args")


# ------------------------------------------------------------------------------------------------
# Training curves: every training stage redraws `curves.png` from its log.jsonl at each evaluation

CURVES_NAME = "curves.png"
# Log fields that are positions, times or counts, not curves.
_NOT_CURVES = {"time", "epoch", "iteration", "step", "global_step", "seconds", "clustering_seconds", "lr", "clusters"}
_DIAGNOSTIC_GROUPS = {"pseudo_labels": "pseudo-label ", "teachers": "teachers "}  # nested records of mmt_plus.py


def read_log_records(path: str | Path) -> list[dict]:
    """The records of a log.jsonl, in order; a torn last line (a run killed while writing it) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def curve_series(records: Sequence[dict], iters_per_epoch: int | None = None) -> dict[str, dict[str, tuple]]:
    """The curves in a stage's log records, as {panel: {name: (x, y)}} with x in epochs and the panels "losses"
    (training losses), "accuracy" (training accuracy and every validation score) and "diagnostics" (MMT+'s
    pseudo-label quality and outlier fraction, SDA's translation fidelity).

    Per-iteration records (an "iteration" field: pretrain.py, sda.py) sit at epoch + (iteration + 1) / iters and give
    the training curves; epoch records (mmt_plus.py, camera.py, pretrain.py's "epoch_end") sit at the number of
    epochs finished and give the training curves only when the log has no per-iteration records."""
    iterations = [int(r["iteration"]) for r in records if "iteration" in r and "epoch" in r]
    if iters_per_epoch is None:
        iters_per_epoch = max(iterations, default=0) + 1
    panels: dict[str, dict[str, tuple[list, list]]] = {"losses": {}, "accuracy": {}, "diagnostics": {}}

    def add(panel: str, name: str, x: float, y: Any) -> None:
        if _number(y):
            xs, ys = panels[panel].setdefault(name, ([], []))
            xs.append(float(x))
            ys.append(float(y))

    def add_training(key: str, value: Any, x: float) -> None:
        if "accuracy" in key or "precision" in key:
            add("accuracy", "train " + key.removeprefix("train_").replace("_", " "), x, value)
        else:
            add("losses", key.replace("_", " "), x, value)

    for record in records:
        if record.get("event") in ("start", "done"):
            continue
        per_iteration = "iteration" in record and "epoch" in record
        if per_iteration:
            x = int(record["epoch"]) + (int(record["iteration"]) + 1) / iters_per_epoch
        elif "epoch" in record:
            # pretrain.py numbers its epoch records from 0 (the epoch just trained); the others count epochs done
            x = int(record["epoch"]) + (record.get("event") == "epoch_end")
        else:
            continue
        for key, value in record.items():
            if key in _NOT_CURVES or key.startswith("best_") or key == "event":
                continue
            if key.startswith("val_"):
                add("accuracy", "val " + key[4:].replace("_", " "), x, value)
            elif key == "val" and isinstance(value, list):  # mmt_plus.py: one result per mean teacher
                for index, result in enumerate(value):
                    for metric, score in result.items():
                        add("accuracy", f"val {metric} (teacher {index + 1})", x, score)
            elif key.startswith("fidelity_"):
                add("diagnostics", key.removeprefix("fidelity_").replace("_", " "), x, value)
            elif key == "outlier_fraction":
                add("diagnostics", "outlier fraction", x, value)
            elif key in _DIAGNOSTIC_GROUPS and isinstance(value, dict):
                for name, number in value.items():
                    add("diagnostics", _DIAGNOSTIC_GROUPS[key] + name.replace("_", " "), x, number)
            elif key == "losses" and isinstance(value, dict):
                for name, number in value.items():
                    add_training(name, number, x)
            elif per_iteration or not iterations:
                add_training(key, value, x)
    return {panel: series for panel, series in panels.items() if series or panel != "diagnostics"}


def _moving_mean(x: list[float], y: list[float], points: int = 60) -> tuple[np.ndarray, np.ndarray, int]:
    """A trailing mean over about len/points values, so that a per-iteration curve is readable."""
    window = max(1, len(y) // points)
    kernel = np.ones(window) / window
    return np.asarray(x[window - 1 :]), np.convolve(np.asarray(y), kernel, mode="valid"), window


def write_curves(
    log_path: str | Path, out_path: str | Path | None = None, title: str = "", iters_per_epoch: int | None = None
) -> Path | None:
    """Draws the run's curves (see `curve_series`) from its log.jsonl into `curves.png` beside it (or `out_path`),
    atomically, and returns the path; a log with no evaluation yet gives a picture saying so. Returns None (after a
    note) when matplotlib is not installed: the curves are an aid, the run goes on without them."""
    log_path = Path(log_path)
    out_path = Path(out_path) if out_path is not None else log_path.with_name(CURVES_NAME)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        print("[curves] matplotlib is not installed: no curves.png (pip install matplotlib)", file=sys.stderr)
        return None
    panels = curve_series(read_log_records(log_path), iters_per_epoch)
    titles = {"losses": "training losses", "accuracy": "accuracy and validation", "diagnostics": "diagnostics"}
    empty = {"losses": "no training records yet", "accuracy": "no evaluation yet"}
    figure = Figure(figsize=(4.6 * len(panels), 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    if "losses" in panels:  # a loss that is switched off (zero throughout) would only force a linear scale
        panels["losses"] = {name: xy for name, xy in panels["losses"].items() if any(xy[1])}
    for axes, (panel, series) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels.items(), strict=True):
        axes.set_title(titles[panel], fontsize=10)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        if not series:
            axes.text(0.5, 0.5, empty[panel], transform=axes.transAxes, ha="center", va="center", color="grey")
            continue
        for name, (x, y) in series.items():
            if len(y) > 120:  # per-iteration values: their moving mean
                x, y, window = _moving_mean(x, y)
                axes.plot(x, y, linewidth=1.2, label=f"{name} (mean of {window})")
            else:
                axes.plot(x, y, marker="o" if len(y) < 40 else None, markersize=3, linewidth=1.2, label=name)
        if panel == "losses" and all(min(y) > 0 for _, y in series.values()):
            axes.set_yscale("log")  # losses of very different sizes (cross-entropy vs triplet) stay readable
            axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.5, not 5x10^-1
            decades = np.log10(max(max(y) for _, y in series.values()) / min(min(y) for _, y in series.values()))
            axes.yaxis.set_minor_formatter(  # within a decade or so, 2, 3 and 5 labelled too
                FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "235" else "")
                if decades < 1.5
                else NullFormatter()
            )
            axes.tick_params(axis="y", which="minor", labelsize=7)
        axes.legend(fontsize=7, loc="best")
    if title:
        figure.suptitle(title, fontsize=11)
    atomic_write(out_path, lambda temporary: figure.savefig(temporary, format="png"))
    return out_path


# ------------------------------------------------------------------------------------------------
# The run directory: a stage never overwrites another run's results, and resumes only the same run

# Settings that may change when a run is resumed: how fast or where it runs, and `epochs`, the length of the run (the
# stages' schedules do not depend on it, so a run extended from 1 to 2 epochs is the 2-epoch run; sda.py's
# schedule flags have other names and stay fixed).
RESUMABLE_CHANGES = ("workers", "threads", "device", "image_cache_mb", "epochs")


def add_run_dir_arguments(parser: argparse.ArgumentParser, folder_flag: str, changeable: Sequence[str] = ()) -> None:
    """--resume and --overwrite, the two ways into a folder that holds a previous run (see `prepare_run_dir`)."""
    names = [name for name in (*RESUMABLE_CHANGES, *changeable) if name != "epochs" or parser.get_default("epochs")]
    allowed = ", ".join("--" + name.replace("_", "-") for name in names)
    parser.add_argument(
        "--resume",
        action="store_true",
        help=f"continue the run in {folder_flag} from its checkpoint.pth if there is one; refused if a setting other "
        f"than {allowed} changed",
    )
    parser.add_argument("--overwrite", action="store_true", help=f"delete the previous run in {folder_flag} first")


def prepare_run_dir(
    logs_dir: str | Path, args: argparse.Namespace, changeable: Sequence[str] = (), write: bool = True
) -> Path:
    """The run-directory contract of every training stage. A folder holding a previous run is refused unless
    `--resume` (continue it) or `--overwrite` (delete it first; only a folder that looks like a run: args.json or
    log.jsonl in it). `--resume` refuses settings that differ from the run's args.json, except RESUMABLE_CHANGES and
    `changeable`. A folder holding only args.json (a run that failed before it began) counts as empty. Leftover
    temporary files of a killed run are removed and `args.json` is (re)written. Every
    process checks; only `write` (the main process) changes the folder."""
    logs_dir = Path(logs_dir)
    settings = json.loads(json.dumps(vars(args), default=str))
    entries = sorted(p.name for p in logs_dir.iterdir()) if logs_dir.is_dir() else []
    args_path = logs_dir / "args.json"
    started = [name for name in entries if name != "args.json"]  # args.json alone: a run that failed to start
    if started and not args.resume:
        if not getattr(args, "overwrite", False):
            raise FileExistsError(
                f"{logs_dir}: holds a previous run ({', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}); "
                "pass --resume to continue it, --overwrite to delete it and start again, or choose another folder"
            )
        if not ({"args.json", "log.jsonl"} & set(entries)):
            raise FileExistsError(f"--overwrite {logs_dir}: not a run folder (no args.json or log.jsonl); not deleted")
        if write:
            shutil.rmtree(logs_dir)
    if args.resume and started and args_path.is_file():
        saved = json.loads(args_path.read_text())
        allowed = {*RESUMABLE_CHANGES, *changeable, "resume", "overwrite"}
        changed = [
            f"--{name.replace('_', '-')} {saved[name]!r} -> {value!r}"
            for name, value in settings.items()
            if name not in allowed and name in saved and saved[name] != value
        ]
        if changed:
            may_change = sorted(allowed & set(settings) - {"resume", "overwrite"})
            raise ValueError(
                f"--resume {logs_dir}: settings differ from the run being resumed ({args_path}): {'; '.join(changed)}. "
                f"Only {', '.join('--' + n.replace('_', '-') for n in may_change)} may change; use another folder for "
                "a different run"
            )
    # every process has checked the folder before the main process writes to it (else another rank can see
    # args.json, or its temporary, and refuse a folder this very run has just started)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if write:
        logs_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(logs_dir)
        # A run of an earlier version has no args.json: it is not written on its resume, so that an attempt the
        # stage then refuses (another architecture than its checkpoint's) cannot leave its settings behind.
        if not (args.resume and started and not args_path.is_file()):
            atomic_write_json(args_path, settings)
    return logs_dir


def setup_distributed() -> bool:
    """Initialises torch.distributed when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return True


def is_main_process() -> bool:
    return rank_and_world_size()[0] == 0


# ================================================================================================
# Run set-up
# ================================================================================================


def run_cli(main: Callable[[], Any]) -> None:
    """Runs a stage's main() as a command: an input error (a missing, unreadable or unwritable file or folder, a
    refused checkpoint, a bad argument or dataset: OSError or ValueError, whose messages name the file) ends it with
    one line on stderr, `error: ...`, and exit status 1 instead of a traceback. REID_TRACEBACK=1 shows the
    traceback; any other exception (a bug) keeps it."""
    try:
        main()
    except (OSError, ValueError) as error:
        if os.environ.get("REID_TRACEBACK") == "1":
            raise
        lines = str(error).strip().splitlines()
        raise SystemExit(f"error: {lines[0] if lines else type(error).__name__}") from None


def lr_factor(epoch: int, warmup_epochs: int, milestones: Sequence[int]) -> float:
    """Warm-up from 0.01 to 1 over `warmup_epochs`, then x0.1 at each milestone
    (docs/differences.md#optimiser-and-schedule)."""
    warm = 0.01 * (1 - epoch / warmup_epochs) + epoch / warmup_epochs if epoch < warmup_epochs else 1.0
    return warm * 0.1 ** sum(epoch >= m for m in milestones)


def default_workers() -> int:
    """Data-loading processes when --workers is not given: none on a machine with at most 2 CPU cores, where loading
    in the training process beats worker processes competing with torch's threads for the cores (measured on 2
    cores, ResNet-18 pre-training at 128x64: 0.97 s per iteration with 2 workers, 0.82 s with none), else 2."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else 2


def make_loader(
    dataset, sampler, batch_size: int, workers: int, persistent: bool = True
) -> torch.utils.data.DataLoader:
    """The training DataLoader of every stage: `batch_size` samples per step and process from `sampler`, incomplete
    last batches dropped. `persistent` keeps the worker processes between epochs (the sampler runs in this process,
    so its set_epoch still applies); a loader rebuilt every epoch passes False."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_training_batch,
        drop_last=True,
        persistent_workers=persistent and workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def split_global_batch(batch_size: int, group: int = 1) -> int:
    """This process's share of --batch-size, which in every stage counts the images of one domain per step over all
    DDP processes together (with one process nothing changes). Each share must hold whole groups (the K images of an
    identity in a P x K batch); otherwise the run ends with a one-line error before any data is read."""
    world_size = rank_and_world_size()[1]
    if batch_size % (group * world_size):
        parts = f"{group} instances x {world_size} processes" if group > 1 else f"{world_size} processes"
        raise SystemExit(f"--batch-size {batch_size} is not divisible by {parts}")
    return batch_size // world_size


def select_device(requested: str | None) -> torch.device:
    """--device if given, else this process's GPU (LOCAL_RANK under torchrun) when CUDA is available, else the CPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def add_runtime_arguments(
    parser: argparse.ArgumentParser,
    amp_help: str = "autocast for training (bf16 on CPU, fp16 on CUDA); evaluation is fp32",
    channels_last: bool | None = True,
) -> None:
    """The run-time flags of every training stage: --seed, --workers, --threads, --device, --amp and --channels-last
    (its default; None: no such flag). They change where and how fast a run goes, not what it computes (but --seed)."""
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="data-loading processes (0 on <= 2 CPU cores, else 2)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--image-cache-mb",
        type=float,
        default=2048,
        help="decoded training images kept in memory per loading process, in MiB (0: decode at every read)",
    )
    parser.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help=amp_help)
    if channels_last is not None:
        parser.add_argument(
            "--channels-last", action=argparse.BooleanOptionalAction, default=channels_last, help="NHWC memory format"
        )


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str]) -> None:
    """parser.error naming the first of the integer settings `names` that is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def start_run(args: argparse.Namespace, seed_per_rank: bool = False) -> tuple[bool, int, int, torch.device]:
    """The opening of every training stage: torch threads (--threads), the process group under torchrun, this
    process's device (--device) and the seed (--seed, plus the rank with `seed_per_rank`). Returns (distributed,
    rank, world size, device)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = setup_distributed()
    rank, world_size = rank_and_world_size()
    device = select_device(args.device)
    set_seed(args.seed + (rank if seed_per_rank else 0))
    return distributed, rank, world_size, device


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` when torch.distributed runs (torchrun), else the model itself.
    Checkpoints always store the unwrapped model (`unwrap_ddp`), so their keys never carry 'module.'."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def add_preset_argument(parser: argparse.ArgumentParser, presets: dict[str, dict]) -> None:
    """--preset NAME: a named set of defaults; the help lists every preset's flags. Explicit flags still win."""
    described = "; ".join(
        f"{name} = " + " ".join(_flag_text(key.replace("_", "-"), value) for key, value in values.items())
        for name, values in presets.items()
    )
    parser.add_argument(
        "--preset", choices=sorted(presets), help=f"defaults for a setting (explicit flags win): {described}"
    )


def _flag_text(flag: str, value: Any) -> str:
    """How a preset value is typed on the command line: --flag VALUE, --flag A B, or --flag / --no-flag."""
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} " + (" ".join(map(str, value)) if isinstance(value, list | tuple) else str(value))


def parse_with_preset(
    parser: argparse.ArgumentParser,
    presets: dict[str, dict],
    argv: Sequence[str] | None,
    target: argparse.ArgumentParser | None = None,
) -> argparse.Namespace:
    """Parses `argv` with the chosen preset's values as the defaults of `target` (default: `parser`; a subcommand's
    parser for sda.py): a first pass finds --preset, the second parses for real, so explicit flags override."""
    chosen = getattr(parser.parse_known_args(argv)[0], "preset", None)
    if chosen:
        (target or parser).set_defaults(**presets[chosen])
    return parser.parse_args(argv)
