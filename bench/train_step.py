"""Images per second of pretrain.py's training step: real (data loading included) vs model-only vs fp32 eager.

    python bench/train_step.py --data-root /path/to/demo/data [--archs resnet18 resnet50] [--blocks 3]

For each architecture, one process measures four variants of the step pretrain.py runs (demo size by default:
96x48 images, batch 64, source + one BN-adaptation target batch per step):

* real: batches come from the same loaders as pretrain.py (reid.make_loader with its default number of worker
  processes, none on 2 CPUs; RandomIdentitySampler for the source and SeededRandomSampler for the target, the
  training transform with AutoAugment, the decoded-image cache of --image-cache-mb, filled by one untimed pass over
  both sets first: the steady state of a run after its first pass), bf16 autocast + channels_last (pretrain.py's
  --amp default);
* real_cold: as real with the cache off (every image decoded at every read: a run's first pass, or
  --image-cache-mb 0);
* model-only: the same step on batches loaded beforehand (no data loading in the timed loop);
* fp32 eager: model-only, without autocast/channels_last (the plain baseline).

The variants take turns in blocks of consecutive steps (a drift of the machine hits them all alike); the first two
steps of a block are not timed (with loading processes, --workers > 0, they prepare batches while the other
variants run).
images/s counts the labelled source images of a step (the target batch is part of the step's cost). Without
--data-root a small benchmark is generated into a temporary folder (make_demo_data.py's "tiny" preset). The step body
mirrors pretrain.py's loop (forward, label-smoothed CE + softmax triplet, target forward without gradients, Adam
step); it is a benchmark and asserts nothing. Results go to bench/results/train_step.json (temp file + rename).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import reid  # noqa: E402  (the shared model/data code of the stage scripts)

sys.path.insert(0, str(REPO / "bench"))
from ops import cpu_description, write_json_atomically  # noqa: E402


def make_step(model, optimizer, amp: bool, device: torch.device):
    """One pretrain.py iteration on given batches: source forward/backward + target BN-adaptation forward."""

    def step(images, labels, target_images):
        if amp:
            images = images.contiguous(memory_format=torch.channels_last)
            target_images = target_images.contiguous(memory_format=torch.channels_last)
        with reid.autocast_context(device, amp):
            f_pool, _, logits = model(images)
            loss = reid.label_smoothed_ce(logits, labels, 0.1) + reid.softmax_triplet_loss(f_pool, labels)
        with torch.no_grad(), reid.autocast_context(device, amp):
            model(target_images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def timed_blocks(fns: dict, blocks: int, steps: int, untimed: int = 2) -> dict[str, list[float]]:
    """Step times of every variant: `blocks` rounds in which each variant runs `untimed` + `steps` consecutive
    steps. Blocks rather than single steps: a variant's loading thread works ahead while the others run, and the
    steps that consume that head start are not timed."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            for step in range(untimed + steps):
                start = time.perf_counter()
                fn()
                if step >= untimed:
                    times[name].append(time.perf_counter() - start)
    return times


def make_variant(real: bool, amp: bool, arch: str, num_classes: int, source_loader, target_loader):
    """One variant's step: a fresh model and optimiser, batches from the loaders (real) or loaded once."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = reid.build_model(arch, num_classes).to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step = make_step(model, optimizer, amp, device)
    source_iter, target_iter = iter(source_loader), iter(target_loader)
    if real:

        def real_step():
            images, labels, _, _ = next(source_iter)
            step(images, labels, next(target_iter)[0])

        return real_step
    images, labels, _, _ = next(source_iter)
    target_images = next(target_iter)[0]
    return lambda: step(images, labels, target_images)


def measure_arch(arch: str, data_root: Path, args: argparse.Namespace) -> dict:
    source = reid.read_dataset(args.source, data_root).train
    target = reid.read_dataset("target_train", data_root).train
    num_classes = len({pid for _, pid, _ in source})
    # pretrain.py's defaults: AutoAugment on, random erasing off (the release's)
    transform = reid.build_train_transform(args.height, args.width, autoaugment=True, random_erasing=False)
    samples = (args.blocks * (args.steps + 2) + 2) * args.batch_size
    source_sampler = reid.RandomIdentitySampler(source, 4, 1, samples, True)
    target_sampler = reid.SeededRandomSampler(len(target), 1001, samples, True)
    workers = reid.default_workers() if args.workers is None else args.workers
    loaders = {}
    for variant, megabytes in (("real", args.image_cache_mb), ("real_cold", 0)):
        cache = reid.DecodedImageCache(megabytes)
        source_set = reid.ImageDataset(source, transform, cache=cache)
        target_set = reid.ImageDataset(target, transform, cache=cache)
        if megabytes:  # fill the cache: one untimed read of every image
            for dataset in (source_set, target_set):
                for index in range(len(dataset)):
                    dataset._load(index)
        pairs = ((source_set, source_sampler), (target_set, target_sampler))
        loaders[variant] = [reid.make_loader(d, s, args.batch_size, workers) for d, s in pairs]
    result = {"arch": arch, "workers": workers, "image_cache_mb": args.image_cache_mb}
    variants = {}
    for variant, amp in (
        ("real", True),
        ("real_cold", True),
        ("model_only", True),
        ("fp32_eager", False),
    ):
        source_loader, target_loader = loaders.get(variant, loaders["real"])
        variants[variant] = make_variant(
            variant.startswith("real"), amp, arch, num_classes, source_loader, target_loader
        )
    for variant, times in timed_blocks(variants, args.blocks, args.steps).items():
        seconds = statistics.median(times)
        result[variant] = {"step_s": seconds, "images_per_s": args.batch_size / seconds, "times_s": times}
        rate = args.batch_size / seconds
        print(f"  {arch:<10} {variant:<11} {seconds:7.3f} s/step  {rate:7.1f} images/s", flush=True)
    result["real_over_model_only"] = result["real"]["images_per_s"] / result["model_only"]["images_per_s"]
    result["real_cold_over_model_only"] = result["real_cold"]["images_per_s"] / result["model_only"]["images_per_s"]
    result["amp_over_fp32"] = result["model_only"]["images_per_s"] / result["fp32_eager"]["images_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, help="VisDA-layout root (default: generate the tiny benchmark)")
    parser.add_argument("--source", default="personx", help="labelled training set")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"], choices=reid.ARCHS)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=3, help="rounds of consecutive steps per variant")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and block (median reported)")
    parser.add_argument("--workers", type=int, help="data-loading processes (default: reid.default_workers())")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--image-cache-mb", type=float, default=2048, help="decoded-image cache of the real variant")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data_root
        if data_root is None:
            import make_demo_data

            data_root = Path(tmp) / "data"
            make_demo_data.generate(data_root, preset="tiny", seed=0, workers=1)
        print(f"bench/train_step.py: {args.threads} threads, {cpu_description()}, data {data_root}", flush=True)
        results = [measure_arch(arch, data_root, args) for arch in args.archs]
    for r in results:
        print(
            f"{r['arch']}: real {r['real']['images_per_s']:.1f} img/s, model-only {r['model_only']['images_per_s']:.1f}"
            f" img/s (real / model-only {r['real_over_model_only']:.2f}; cache off "
            f"{r['real_cold_over_model_only']:.2f}), fp32 eager "
            f"{r['fp32_eager']['images_per_s']:.1f} img/s (bf16 autocast speed-up {r['amp_over_fp32']:.2f}x)"
        )
    payload = {
        "machine": {"cpu": cpu_description(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "platform": platform.platform(),
        "threads": args.threads,
        "size": {"height": args.height, "width": args.width, "batch_size": args.batch_size},
        "source": args.source,
        "data_root": "generated tiny benchmark" if args.data_root is None else str(args.data_root),
        "results": results,
    }
    write_json_atomically(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
