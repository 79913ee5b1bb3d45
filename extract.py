"""Features for a folder or a list of images, from any stage's re-ID checkpoint.

The features are the model's eval-mode BNNeck outputs, exactly as postprocess.py computes them (optionally averaged
with the horizontally flipped image), not L2-normalised. Output: `OUT.npy` (N x D float32) and `OUT.txt` (one line per
row: the image path relative to the input root, then pid and camid when a list file gave them).

    python extract.py --checkpoint logs/mmt/model_best.pth --images data/demo/target_test/image_query --out feats/query
    python extract.py --checkpoint model.pth --images my_list.txt --root /data/private --out feats/private --flip --bf16
    python extract.py --checkpoint model.pth --split gallery --val market1501 --val-root data/market --out feats/g

A list file has one image per line, `relative/path [pid camid]`, paths relative to --root (default: the list file's
folder); a path that leaves the root is refused. Instead of --images, --split reads a dataset through the same
dataset arguments as every stage (query/gallery of --val, the training images of --source or --target); the index
then holds the path relative to the dataset root, pid and camid (pid -1 for the unlabelled target).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import reid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="re-ID checkpoint of pretrain.py, mmt_plus.py or camera.py")
    parser.add_argument("--images", help="a folder (searched recursively) or a list file of images")
    parser.add_argument("--root", help="folder the list file's paths are relative to (default: the list's folder)")
    parser.add_argument(
        "--split",
        choices=reid.DATASET_SPLITS,
        help="instead of --images: a dataset's split, named by the dataset arguments below (query/gallery: --val)",
    )
    parser.add_argument("--out", required=True, help="output prefix: OUT.npy and OUT.txt")
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=reid.default_workers(), help="data-loading processes")
    parser.add_argument("--device", help="cpu / cuda[:i] (default: cuda if available)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on CPUs with bf16 units; not exact)")
    parser.add_argument("--height", type=int, help="input height (default: the checkpoint's)")
    parser.add_argument("--width", type=int, help="input width (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing OUT.npy / OUT.txt")
    reid.add_dataset_arguments(parser, ("source", "target", "val"))
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if (args.images is None) == (args.split is None):
        parser.error("give --images (a folder or list file) or --split (a dataset's split), not both")
    return args


def read_list_file(list_file: Path, root: Path) -> tuple[list[reid.Item], list[str]]:
    """Items (absolute path, pid, camid) and the paths as written, from `relative/path [pid camid]` lines."""
    items, names, seen = [], [], {}
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{list_file}:{number}"
        if len(fields) not in (1, 3) or (len(fields) == 3 and not all(f.lstrip("-").isdigit() for f in fields[1:])):
            raise ValueError(f"{where}: expected 'relative/path [pid camid]', got {line!r}")
        if fields[0] in seen:
            raise ValueError(f"{where}: {fields[0]} is listed twice (first on line {seen[fields[0]]})")
        seen[fields[0]] = number
        path = reid.resolve_inside(root, fields[0], where)
        pid, camid = (int(fields[1]), int(fields[2])) if len(fields) == 3 else (-1, -1)
        items.append((str(path), pid, camid))
        names.append(line.strip())
    if not items:
        raise ValueError(f"{list_file}: no images listed")
    return items, names


def main(argv: Sequence[str] | None = None) -> np.ndarray:
    args = parse_args(argv)
    features_path, index_path = Path(f"{args.out}.npy"), Path(f"{args.out}.txt")
    existing = [str(p) for p in (features_path, index_path) if p.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"extract.py: {', '.join(existing)} already exist; pass --overwrite to replace them")
    source = Path(args.images or "")
    if args.split:
        items, root = reid.read_split(args, args.split)
        names = [f"{os.path.relpath(path, root)} {pid} {camid}" for path, pid, camid in items]
    elif source.is_dir():
        root = source.resolve()
        items = reid.read_dataset("folder", root).train
        names = [str(Path(path).relative_to(root)) for path, _, _ in items]
    elif source.is_file():
        root = Path(args.root).resolve() if args.root else source.resolve().parent
        items, names = read_list_file(source, root)
    else:
        raise SystemExit(f"extract.py: --images {source}: no such folder or list file")

    model, checkpoint = reid.load_model(args.checkpoint, kinds=("pretrain", "mmt_plus", "camera"), what="--checkpoint")
    height = args.height or reid.checkpoint_setting(checkpoint, "height")
    width = args.width or reid.checkpoint_setting(checkpoint, "width")
    if not height or not width:
        raise SystemExit(f"extract.py: {args.checkpoint} stores no input size; pass --height and --width")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    if args.bf16:
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad(), reid.autocast_context(device, args.bf16):
        features = reid.extract_features(
            model, items, height, width, batch_size=args.batch_size, flip=args.flip, workers=args.workers, device=device
        )
    array = features.float().numpy()

    def write_features(temporary: Path) -> None:
        with open(temporary, "wb") as handle:  # a handle: np.save would append .npy to the temporary name
            np.save(handle, array)

    reid.atomic_write(features_path, write_features)
    reid.atomic_write_text(index_path, "".join(f"{name}\n" for name in names))
    print(f"[extract] {len(items)} images -> {features_path} ({array.shape[0]} x {array.shape[1]}), {index_path}")
    return array


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"extract.py: {error}")
