"""Export a trained re-ID model so that it runs outside this toolkit: ONNX and a `torch.export` program.

Any stage's re-ID checkpoint works (pretrain.py, mmt_plus.py, camera.py). The exported network maps a batch of
normalised images (N, 3, H, W) to the eval-mode BNNeck features (N, D) - exactly what the toolkit ranks with (before
L2 normalisation and flip averaging, which a caller adds). GeM is exported as its plain PyTorch expression, so
neither file needs the compiled `reid_ops` extension. Each export is checked against the PyTorch model on real
images and the largest absolute difference is written to `export.json`.

    python export.py --checkpoint logs/mmt/model_best.pth --check-images data/demo/target_validation/image_query \
        --out exported/mmt
    # -> exported/mmt/model.onnx, model.pt2, export.json
    # or checked on a dataset's split, named by the dataset arguments every stage takes:
    python export.py --checkpoint logs/mmt/model_best.pth --check-split query --data-root data/demo --out exported/mmt

Loading them elsewhere:
    onnxruntime.InferenceSession("model.onnx").run(None, {"images": batch})[0]
    torch.export.load("model.pt2").module()(batch)
Inputs are RGB images resized to the model's height x width, scaled to [0, 1] and normalised with the ImageNet mean
and standard deviation (export.json records all four).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import reid

FORMATS = ("onnx", "torch_export")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="re-ID checkpoint of pretrain.py, mmt_plus.py or camera.py")
    parser.add_argument("--out", required=True, help="output folder (model.onnx, model.pt2, export.json)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="what to write")
    parser.add_argument(
        "--check-images", help="folder (searched recursively) of real images the exports are compared on"
    )
    parser.add_argument(
        "--check-split",
        choices=reid.DATASET_SPLITS,
        help="instead of --check-images: compare on a dataset's split, named by the dataset arguments below",
    )
    parser.add_argument("--num-check-images", type=int, default=32, help="how many of them (sorted by path)")
    parser.add_argument("--height", type=int, help="input height (default: the checkpoint's)")
    parser.add_argument("--width", type=int, help="input width (default: the checkpoint's)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest accepted |export - PyTorch|")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    reid.add_dataset_arguments(parser, ("source", "target", "val"))
    args = parser.parse_args(argv)
    if args.num_check_images < 2:
        parser.error("--num-check-images must be at least 2 (the exports take a dynamic batch)")
    if (args.check_images is None) == (args.check_split is None):
        parser.error("give --check-images (a folder) or --check-split (a dataset's split), not both")
    return args


def check_batch(args: argparse.Namespace, height: int, width: int) -> torch.Tensor:
    """(count, 3, H, W) normalised real images (the first by path), the way the toolkit feeds its models at test
    time."""
    if args.check_split:
        items = sorted(reid.read_split(args, args.check_split)[0])
    else:
        items = reid.read_dataset("folder", args.check_images).train
    items = items[: args.num_check_images]
    return reid.load_test_images(items, height, width)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    reid.atomic_write(
        path,
        lambda temporary: torch.onnx.export(
            model,
            (example,),
            str(temporary),
            input_names=["images"],
            output_names=["features"],
            dynamic_shapes={"x": {0: batch}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        ),
    )


def run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError:
        raise SystemExit("export.py: onnxruntime is needed to check the ONNX file (pip install onnxruntime)") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def export_program(model: torch.nn.Module, example: torch.Tensor, path: Path) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    reid.atomic_write(path, lambda temporary: torch.export.save(program, str(temporary)))
    return program


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    targets = {"onnx": out / "model.onnx", "torch_export": out / "model.pt2"}
    existing = [str(targets[f]) for f in args.formats if targets[f].exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"export.py: {', '.join(existing)} already exist; pass --overwrite to replace them")

    model, checkpoint = reid.load_model(args.checkpoint, kinds=("pretrain", "mmt_plus", "camera"), what="--checkpoint")
    model = model.float().eval()
    height = args.height or reid.checkpoint_setting(checkpoint, "height")
    width = args.width or reid.checkpoint_setting(checkpoint, "width")
    if not height or not width:
        raise SystemExit(f"export.py: {args.checkpoint} stores no input size; pass --height and --width")
    images = check_batch(args, height, width)
    if len(images) < 2:
        where = f"--check-images {args.check_images}" if args.check_images else f"--check-split {args.check_split}"
        raise SystemExit(f"export.py: {where}: fewer than 2 images found")
    with torch.no_grad():
        expected = model(images)

    report = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "arch": model.arch,
        "height": height,
        "width": width,
        "mean": list(reid.IMAGENET_MEAN),
        "std": list(reid.IMAGENET_STD),
        "feature_dim": int(expected.shape[1]),
        "check_images": len(images),
        "max_abs_difference": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    example = images[:2]
    if "torch_export" in args.formats:
        with torch.no_grad():
            program = export_program(model, example, targets["torch_export"])
            got = torch.export.load(str(targets["torch_export"])).module()(images)
        del program
        report["max_abs_difference"]["torch_export"] = float((got - expected).abs().max())
    if "onnx" in args.formats:
        export_onnx(model, example, targets["onnx"], args.opset)
        got = run_onnx(targets["onnx"], images)
        report["max_abs_difference"]["onnx"] = float((got - expected).abs().max())
    reid.atomic_write_text(out / "export.json", json.dumps(report, indent=2) + "\n")
    for name, difference in report["max_abs_difference"].items():
        print(f"[export] {targets[name]}: max |export - PyTorch| = {difference:.3g} on {len(images)} real images")
    worst = max(report["max_abs_difference"].values())
    if worst > args.tolerance:
        raise SystemExit(f"export.py: the export differs from PyTorch by {worst:.3g} > --tolerance {args.tolerance}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"export.py: {error}")
