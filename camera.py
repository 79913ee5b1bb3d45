"""Camera classifier for the "negative camera similarity" step of the MMT+ post-processing.

Slides ("Post-processing for Inference"): train a camera classification network (ResNeSt-50 backbone) on the
target domain; at test time the distance between camera embeddings, weighted by 0.1, is subtracted from the
re-ID distance (postprocess.py). Following the release (docs/differences.md#camera-model):

  * task: 5-way classification of the target training images' camera (ids {1,2,4,5,6} -> 0..4); the identity
    labels are not used (there are none);
  * data: plain random batches (no P x K sampling), the MMT+ augmentation (resize, flip, pad + crop, random
    erasing; no AutoAugment);
  * model: the shared re-ID wrapper of pretrain.py (backbone -> GeM -> BNNeck -> Linear(D, cameras, no bias));
  * loss: plain cross-entropy on the BNNeck logits (no label smoothing, no triplet);
  * optimiser: Adam 3.5e-4, weight decay 5e-4, warm-up 10 epochs from factor 0.01, x0.1 at epochs 40 and 70,
    120 epochs x 200 iterations;
  * selection: camera top-1 accuracy on target validation (query and gallery images, their camera labels);
    the best epoch is saved as model_best.pth.

At test time postprocess.py rebuilds the network without its head and uses the L2-normalised eval-mode BNNeck
feature as the camera embedding.

    python camera.py --data-root DATA --logs-dir logs/camera                  # release settings (resnest50)
    python camera.py --preset demo --data-root DATA --logs-dir logs/camera    # minutes on 2 CPU cores
    torchrun --nproc_per_node=2 camera.py ...                                 # DDP
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from reid import (
    DecodedImageCache,
    ImageDataset,
    JsonlLogger,
    SeededRandomSampler,
    add_dataset_arguments,
    add_preset_argument,
    add_run_dir_arguments,
    add_runtime_arguments,
    autocast_context,
    build_model,
    build_train_transform,
    extract_features,
    is_main_process,
    lr_factor,
    make_loader,
    parse_with_preset,
    prepare_run_dir,
    progress,
    require_positive,
    resolve_datasets,
    restore_training_state,
    rng_state,
    run_cli,
    save_checkpoint,
    split_global_batch,
    start_run,
    wrap_ddp,
    write_curves,
)

# --preset demo: the embedded synthetic benchmark on 2 CPU cores in minutes. Explicit flags still win.
PRESETS = {
    "demo": dict(
        arch="resnet18",
        height=96,  # as pretrain.py's demo preset
        width=48,
        batch_size=32,
        epochs=8,
        iters=20,
        warmup_epochs=2,
        milestones=[6],
        eval_step=2,
    )
}


def camera_accuracy(
    model: torch.nn.Module,
    items: Sequence[tuple[str, int, int]],
    height: int,
    width: int,
    batch_size: int,
    workers: int,
    device: torch.device,
) -> float:
    """Top-1 camera accuracy: eval-mode BNNeck features (reid.extract_features) -> linear head."""
    features = extract_features(
        model, list(items), height, width, batch_size=batch_size, workers=workers, device=device
    )
    with torch.no_grad():
        logits = model.classifier(features.to(device=device, dtype=model.classifier.weight.dtype))
    predictions = logits.argmax(dim=1).cpu()
    labels = torch.tensor([camid for _, _, camid in items])
    return float((predictions == labels).float().mean())


def train_one_epoch(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    args: argparse.Namespace,
) -> dict:
    """One epoch (`args.iters` batches from the seeded random sampler) of plain cross-entropy on cameras."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = progress(
        loader, total=args.iters, desc=f"camera epoch {epoch + 1}/{args.epochs}", disable=not is_main_process()
    )
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    for images, _, camids, _ in bar:
        images = images.to(device, memory_format=memory_format, non_blocking=True)
        camids = camids.to(device)
        with autocast_context(device, args.amp):
            _, _, logits = model(images)
        loss = F.cross_entropy(logits.float(), camids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(camids)
        correct += int((logits.argmax(dim=1) == camids).sum())
        seen += len(camids)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_preset_argument(parser, PRESETS)
    # data
    add_dataset_arguments(parser, ("target", "val"))  # cameras of --target's training images; --val selects
    parser.add_argument(
        "--logs-dir", default="logs/camera", help="output folder: checkpoint.pth, model_best.pth, log.jsonl"
    )
    parser.add_argument("--height", type=int, default=256, help="input height (release: 384)")
    parser.add_argument("--width", type=int, default=128, help="input width")
    parser.add_argument(
        "--random-erasing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random erasing (the MMT+ transform the release uses for the camera model)",
    )
    # model
    parser.add_argument("--arch", default="resnest50", help="backbone (reid.build_model); slides: resnest50")
    parser.add_argument(
        "--allow-partial-weights",
        action="store_true",
        help="accept a --pretrained file that lacks some trunk tensors (they keep their random initialisation)",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="ImageNet weights for the backbone: a local file, or 'imagenet' (local torch cache "
        "only); default: random init",
    )
    # optimisation
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (all processes together)")
    parser.add_argument("--lr", type=float, default=3.5e-4, help="Adam learning rate")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="coupled L2 weight decay (Adam)")
    parser.add_argument("--epochs", type=int, default=120, help="epochs")
    parser.add_argument("--iters", type=int, default=200, help="iterations per epoch")
    parser.add_argument("--warmup-epochs", type=int, default=10, help="linear warm-up from 0.01 x lr (epochs)")
    parser.add_argument("--milestones", type=int, nargs="*", default=[40, 70], help="x0.1 at these epochs")
    parser.add_argument("--eval-step", type=int, default=10, help="validate every N epochs (and the last)")
    add_runtime_arguments(parser)
    add_run_dir_arguments(parser, "LOGS_DIR")
    args = parse_with_preset(parser, PRESETS, argv)
    require_positive(parser, args, ("epochs", "iters", "eval_step", "batch_size", "height", "width"))
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    distributed, _, world_size, device = start_run(args)
    logs_dir = prepare_run_dir(args.logs_dir, args, write=is_main_process())
    checkpoint_path, best_path = logs_dir / "checkpoint.pth", logs_dir / "model_best.pth"

    datasets = resolve_datasets(args, ("target", "val"))
    if datasets.target is None:
        raise SystemExit("--target none: the camera model trains on the target training images' cameras")
    train_items = datasets.target
    val_items = list(datasets.val.query) + list(datasets.val.gallery)
    num_cameras = max(camid for _, _, camid in train_items) + 1
    bad = sorted({camid for _, _, camid in val_items if not 0 <= camid < num_cameras})
    if bad:
        raise SystemExit(f"--val {args.val}: camera ids {bad} unseen in --target {args.target}")
    per_process_batch = split_global_batch(args.batch_size)
    if len(train_items) < per_process_batch * world_size:
        raise SystemExit(f"{len(train_items)} training images < one batch of {args.batch_size}")

    # Plain random batches (the release builds the camera loader without P x K sampling). The sampler is seeded
    # per (seed, epoch), sharded across DDP processes and seeds each sample's augmentation: a resumed run sees
    # the same images and augmentations as an uninterrupted one.
    transform = build_train_transform(args.height, args.width, autoaugment=False, random_erasing=args.random_erasing)
    dataset = ImageDataset(train_items, transform, args.skip_bad_images, DecodedImageCache(args.image_cache_mb))
    sampler = SeededRandomSampler(len(train_items), args.seed, args.iters * per_process_batch, seed_samples=True)
    loader = make_loader(dataset, sampler, per_process_batch, args.workers)

    model = build_model(
        args.arch, num_classes=num_cameras, pretrained=args.pretrained, allow_partial_weights=args.allow_partial_weights
    ).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_factor(epoch, args.warmup_epochs, args.milestones)
    )
    start_epoch, best_accuracy, best_epoch, log_position = 0, -1.0, -1, None
    if args.resume and checkpoint_path.exists():
        state = restore_training_state(checkpoint_path, "camera", args.arch, num_cameras, model, optimizer, scheduler)
        start_epoch, best_accuracy, best_epoch = (state["epoch"] + 1, state["best_accuracy"], state["best_epoch"])
        log_position = state.get("log_position")
        if is_main_process():
            print(f"[camera] resumed from {checkpoint_path} at epoch {start_epoch}")
    training_model = wrap_ddp(model, device)

    logger = JsonlLogger(logs_dir / "log.jsonl", log_position) if is_main_process() else None
    if logger is not None:
        logger.log(
            {
                "event": "start",
                "args": vars(args),
                "num_train": len(train_items),
                "num_val": len(val_items),
                "num_cameras": num_cameras,
                "world_size": world_size,
                "images_per_batchnorm": per_process_batch,
                "start_epoch": start_epoch,
            }
        )

    def model_state(epoch: int) -> dict:
        return {
            "state_dict": model.state_dict(),
            "arch": args.arch,
            "num_classes": num_cameras,
            "feature_dim": model.feature_dim,
            "height": args.height,
            "width": args.width,
            "epoch": epoch,
            "best_accuracy": best_accuracy,
            "best_epoch": best_epoch,
            "args": vars(args),
        }

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        start = time.time()
        stats = train_one_epoch(training_model, loader, optimizer, device, epoch, args)
        learning_rate = optimizer.param_groups[0]["lr"]
        scheduler.step()
        record = {"epoch": epoch + 1, "lr": learning_rate, "seconds": round(time.time() - start, 1), **stats}
        if is_main_process():
            if (epoch + 1) % args.eval_step == 0 or epoch + 1 == args.epochs:
                accuracy = camera_accuracy(
                    model, val_items, args.height, args.width, 2 * per_process_batch, args.workers, device
                )
                record["val_camera_accuracy"] = accuracy
                if accuracy > best_accuracy:
                    best_accuracy, best_epoch = accuracy, epoch + 1
                    save_checkpoint(model_state(epoch), best_path, "camera")
                record["best_val_camera_accuracy"] = best_accuracy
                print(f"[camera] epoch {epoch + 1}: val camera accuracy {accuracy:.3f} (best {best_accuracy:.3f})")
            logger.log(record)  # before the checkpoint: a run killed in between redoes the epoch
            if "val_camera_accuracy" in record:
                write_curves(logger.path, title=f"camera: {logs_dir}")
            state = model_state(epoch)
            state.update(
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                rng=rng_state(),
                log_position=logger.position(),
            )
            save_checkpoint(state, checkpoint_path, "camera")
        if distributed:
            torch.distributed.barrier()

    summary = {"best_val_camera_accuracy": best_accuracy, "best_epoch": best_epoch, "model_best": str(best_path)}
    if logger is not None:
        logger.log({"event": "done", **summary})
        print(f"[camera] done: best val camera accuracy {best_accuracy:.3f} at epoch {best_epoch} -> {best_path}")
    if distributed:
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    run_cli(main)
