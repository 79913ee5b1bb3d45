"""Stage II of MMT+: source-domain pre-training with BN adaptation to the target domain.

The network is pre-trained on labelled source images (by default the SDA-translated PersonX images,
`personx_sda`) with label-smoothed cross-entropy and the softmax-triplet loss. After each source batch
a batch of unlabelled target images is forwarded without back-propagation, so that every BatchNorm
layer's running statistics adapt to the target domain (the slides' "forward the target-domain images
without backpropagation" trick). The best checkpoint on target validation becomes `--init-1/--init-2`
of mmt_plus.py.

    python pretrain.py --preset demo --data-root data/demo --logs-dir logs/pretrain-demo-1 --seed 1
    torchrun --nproc_per_node=2 pretrain.py --preset demo --data-root data/demo --logs-dir logs/ddp

Read top to bottom: presets and arguments, the set-up steps (`read_training_data`, `build_loaders`,
`build_training`, `resume_position`), then `main`: set-up, the training loop, evaluation, save.
The model, data and checkpoint code it uses is shared with the other stages and lives in `reid.py`.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from reid import (
    ARCHS,
    DecodedImageCache,
    ImageDataset,
    JsonlLogger,
    RandomIdentitySampler,
    ReIDData,
    SeededRandomSampler,
    add_dataset_arguments,
    add_preset_argument,
    add_run_dir_arguments,
    add_runtime_arguments,
    autocast_context,
    build_model,
    build_train_transform,
    evaluate,
    is_main_process,
    label_smoothed_ce,
    lr_factor,
    make_loader,
    parse_with_preset,
    prepare_run_dir,
    progress,
    relabel_pids,
    require_positive,
    resolve_datasets,
    restore_training_state,
    rng_state,
    run_cli,
    save_checkpoint,
    softmax_triplet_loss,
    split_global_batch,
    start_run,
    wrap_ddp,
    write_curves,
)

PRESETS = {
    # a few minutes on 2 CPU cores on the embedded benchmark (make_demo_data.py)
    # From random initialisation (no ImageNet weights offline) Adam at 1e-3 learns much faster than the
    # release's 3.5e-4 (a fine-tuning rate). Measured on the benchmark (ResNet-18, 128x64, batch 64, target_val):
    # 10 x 30 iterations at 3.5e-4 reached 10.5 mAP; 10 x 40 iterations at 1e-3 reached 47.8 mAP.
    # 96x48 instead of 128x64 (the benchmark's images are 128x64): on a 2-core CPU without AMX a step takes 0.39 s
    # instead of 0.58 s and the 10 x 30 run 211 s instead of 346 s, at the same accuracy (raw source, seed 1,
    # target_val: 49.5 mAP vs 45.8). Fewer iterations cost more: 8 x 30 at 96x48 reached 35.7.
    "demo": dict(
        arch="resnet18",
        height=96,
        width=48,
        epochs=10,
        iters=30,
        batch_size=64,
        lr=1e-3,
        warmup_epochs=1,
        milestones=[7, 9],
        eval_every=5,
    ),
    # the release's settings (docs/differences.md#pre-training)
    "visda": dict(
        arch="resnet50_ibn",
        height=384,
        width=128,
        epochs=120,
        iters=200,
        batch_size=64,
        warmup_epochs=10,
        milestones=[40, 70],
        eval_every=10,
        workers=4,
    ),
}

Loader = torch.utils.data.DataLoader

# `--resume` accepts these changes besides reid.RESUMABLE_CHANGES: they change when the run stops or saves, not what
# it computes
CHANGEABLE_ON_RESUME = ("max_iters", "save_every")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_preset_argument(parser, PRESETS)
    add_dataset_arguments(parser, ("source", "target", "val"), source="personx_sda")
    parser.add_argument(
        "--target-labels-upper-bound",
        action="store_true",
        help="DIAGNOSTICS ONLY: train on target_train with its ground-truth identities from "
        "diagnostics/ (embedded benchmark); an upper bound, never a method",
    )
    parser.add_argument("--logs-dir", required=True, help="checkpoints, log.jsonl and args.json go here")
    parser.add_argument("--arch", default="resnet50_ibn", choices=ARCHS)
    parser.add_argument(
        "--allow-partial-weights",
        action="store_true",
        help="accept a --pretrained file that lacks some trunk tensors (they keep their random initialisation)",
    )
    parser.add_argument(
        "--pretrained",
        help="trunk initialisation: ImageNet weights (a local file, or 'imagenet' for the torch hub cache) or a "
        "pretrain.py checkpoint (its trunk only)",
    )
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="source images per step, all processes together (P x K)"
    )
    parser.add_argument("--num-instances", type=int, default=4, help="K images per identity in a batch")
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--iters", type=int, default=200, help="iterations per epoch")
    parser.add_argument("--lr", type=float, default=3.5e-4, help="Adam learning rate")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="coupled L2 decay, as the release")
    parser.add_argument("--warmup-epochs", type=int, default=10, help="linear warm-up from 0.01 x lr")
    parser.add_argument("--milestones", type=int, nargs="*", default=[40, 70], help="epochs where lr x 0.1")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--triplet-weight", type=float, default=1.0, help="softmax-triplet weight (0 disables)")
    parser.add_argument(
        "--no-autoaugment",
        dest="autoaugment",
        action="store_false",
        help="disable AutoAugment (on by default, as the slides recommend for pre-training)",
    )
    parser.add_argument("--random-erasing", action="store_true", help="add random erasing (off in the release)")
    parser.add_argument("--eval-every", type=int, default=10, help="validate every N epochs (and at the end)")
    parser.add_argument("--ap-topk", type=int, help="VisDA truncated AP (100) for model selection")
    parser.add_argument("--save-every", type=int, default=0, help="also checkpoint every N iterations (0: per epoch)")
    add_run_dir_arguments(parser, "--logs-dir", CHANGEABLE_ON_RESUME)
    add_runtime_arguments(parser, "bf16 autocast + channels_last on CPU, fp16 on CUDA", channels_last=None)
    parser.add_argument(
        "--max-iters",
        type=int,
        default=0,
        help="stop after this many iterations in total (testing interruptions; 0: no limit)",
    )
    args = parse_with_preset(parser, PRESETS, argv)
    require_positive(parser, args, ("height", "width", "batch_size", "num_instances", "epochs", "iters", "eval_every"))
    if args.batch_size % args.num_instances:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of --num-instances {args.num_instances}")
    return args


def read_training_data(args: argparse.Namespace) -> tuple[list, list | None, ReIDData]:
    """The labelled training images, the unlabelled target images for BN adaptation (None: no adaptation) and the
    validation set. --target-labels-upper-bound trains on the target's true identities instead (diagnostics)."""
    if not args.target_labels_upper_bound:
        datasets = resolve_datasets(args, ("source", "target", "val"))
        return datasets.source.train, datasets.target, datasets.val
    datasets = resolve_datasets(args, ("target", "val"))
    if datasets.target_identities is None:
        raise SystemExit(f"--target-labels-upper-bound: --target {args.target} has no ground-truth identities")
    target = [(p, datasets.target_identities[p], c) for p, _, c in datasets.target]
    # one-image identities (the benchmark's passers-by) give no positive pair: a labelled re-ID training set
    # would not contain them, and the P x K sampler would fill batches with K copies of one image
    images_per_pid = defaultdict(int)
    for _, pid, _ in target:
        images_per_pid[pid] += 1
    source_items = relabel_pids([item for item in target if images_per_pid[item[1]] > 1])
    print(
        f"[pretrain] DIAGNOSTICS ONLY: training on target identities (upper bound); "
        f"{len(target) - len(source_items)} one-image identities left out"
    )
    return source_items, None, datasets.val


def build_loaders(
    args: argparse.Namespace, source_items: list, target_items: list | None, per_process_batch: int
) -> tuple[RandomIdentitySampler, Loader, SeededRandomSampler | None, Loader | None]:
    """P x K source batches and random target batches, `args.iters` per epoch: samplers seeded per (seed, epoch)
    with per-sample augmentation seeds, so that a resumed run sees the same images (set_epoch(epoch, skip))."""
    train_transform = build_train_transform(args.height, args.width, args.autoaugment, args.random_erasing)
    samples_per_epoch = args.iters * per_process_batch
    source_sampler = RandomIdentitySampler(source_items, args.num_instances, args.seed, samples_per_epoch, True)
    cache = DecodedImageCache(args.image_cache_mb)  # shared by the source and target sets
    source_dataset = ImageDataset(source_items, train_transform, args.skip_bad_images, cache)
    source_loader = make_loader(source_dataset, source_sampler, per_process_batch, args.workers)
    if target_items is None:
        return source_sampler, source_loader, None, None
    target_sampler = SeededRandomSampler(len(target_items), args.seed + 1000, samples_per_epoch, True)
    target_dataset = ImageDataset(target_items, train_transform, args.skip_bad_images, cache)
    target_loader = make_loader(target_dataset, target_sampler, per_process_batch, args.workers)
    return source_sampler, source_loader, target_sampler, target_loader


def build_training(
    args: argparse.Namespace, num_classes: int, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR, torch.amp.GradScaler]:
    """The model (channels_last under --amp), Adam with coupled L2 decay, the warm-up/step schedule per epoch and
    the fp16 gradient scaler (CUDA only)."""
    model = build_model(args.arch, num_classes, args.pretrained, allow_partial_weights=args.allow_partial_weights)
    model = model.to(device)
    if args.amp:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, args.warmup_epochs, args.milestones)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    return model, optimizer, scheduler, scaler


def resume_position(
    args: argparse.Namespace,
    checkpoint_path: Path,
    num_classes: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Where training starts: the beginning, or (--resume with a checkpoint) the saved epoch and iteration, with
    the model, optimiser, scheduler and random generators restored."""
    position = dict(
        epoch=0, iteration=0, best_mAP=-1.0, best_epoch=-1, log_position=None, epoch_sums=None, last_eval=None
    )
    if not args.resume:
        return position
    if not checkpoint_path.is_file():
        print(f"[pretrain] --resume: no {checkpoint_path} yet, starting from scratch")
        return position
    state = restore_training_state(checkpoint_path, "pretrain", args.arch, num_classes, model, optimizer, scheduler)
    position.update({key: state[key] for key in ("epoch", "iteration", "best_mAP", "best_epoch")})
    position.update(
        log_position=state.get("log_position"), epoch_sums=state.get("epoch_sums"), last_eval=state.get("last_eval")
    )
    print(f"[pretrain] resumed from {checkpoint_path}: epoch {position['epoch']}, iteration {position['iteration']}")
    return position


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    distributed, _, world_size, device = start_run(args)
    per_process_batch = split_global_batch(args.batch_size, args.num_instances)
    logs_dir = Path(args.logs_dir)
    checkpoint_path, best_path = logs_dir / "checkpoint.pth", logs_dir / "model_best.pth"
    prepare_run_dir(logs_dir, args, CHANGEABLE_ON_RESUME, write=is_main_process())

    source_items, target_items, val = read_training_data(args)
    num_classes = len({pid for _, pid, _ in source_items})
    use_target = target_items is not None
    source_sampler, source_loader, target_sampler, target_loader = build_loaders(
        args, source_items, target_items, per_process_batch
    )
    model, optimizer, scheduler, scaler = build_training(args, num_classes, device)
    start = resume_position(args, checkpoint_path, num_classes, model, optimizer, scheduler)
    start_epoch, start_iter = start["epoch"], start["iteration"]
    best_map, best_epoch = start["best_mAP"], start["best_epoch"]
    training_model = wrap_ddp(model, device)
    logger = JsonlLogger(logs_dir / "log.jsonl", start["log_position"]) if is_main_process() else None
    if logger and start_epoch == 0 and start_iter == 0:
        # per-BatchNorm batch: each BN layer normalises one process's batch of one domain at a time
        logger.log(
            {
                "event": "start",
                "world_size": world_size,
                "bn_batch_source": per_process_batch,
                "bn_batch_target": per_process_batch if use_target else 0,
                "num_classes": num_classes,
                "source_images": len(source_items),
                "target_images": len(target_items or []),
                "args": vars(args),
            }
        )
        print(
            f"[pretrain] {args.arch}: {len(source_items)} source images / {num_classes} ids, "
            f"{len(target_items or [])} target images; {world_size} process(es), {per_process_batch} images per BN "
            "per domain"
        )

    def checkpoint_state(epoch: int, iteration: int, epoch_sums: dict | None = None) -> dict:
        """Everything a resumed run needs: the log's length (records after it are cut on resume) and the loss
        sums of the unfinished epoch (its epoch_end record averages over the whole epoch)."""
        return {
            "log_position": logger.position() if logger else None,
            "epoch_sums": epoch_sums,
            "state_dict": model.state_dict(),
            "arch": args.arch,
            "num_classes": num_classes,
            "feature_dim": model.feature_dim,
            "height": args.height,
            "width": args.width,
            "epoch": epoch,
            "iteration": iteration,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "best_mAP": best_map,
            "best_epoch": best_epoch,
            # the latest evaluation: a run resumed after its last epoch reports it in its "done" record
            "last_eval": {k: float(result[k]) for k in ("mAP", "top1", "top5")} if result else None,
            "args": vars(args),
        }

    total_done = 0
    result: dict[str, Any] = dict(start["last_eval"] or {})
    for epoch in range(start_epoch, args.epochs):
        skip = start_iter * per_process_batch if epoch == start_epoch else 0
        source_sampler.set_epoch(epoch, skip)
        source_iter = iter(source_loader)
        if use_target:
            target_sampler.set_epoch(epoch, skip)
            target_iter = iter(target_loader)
        model.train()
        first_iter = start_iter if epoch == start_epoch else 0
        bar = progress(
            range(first_iter, args.iters),
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=not is_main_process(),
        )
        sums = defaultdict(float)
        counted = 0  # iterations of this epoch in `sums`
        if start["epoch_sums"] and epoch == start_epoch:
            sums.update(start["epoch_sums"]["sums"])
            counted = start["epoch_sums"]["iterations"]
        for iteration in bar:
            images, labels, _, _ = next(source_iter)
            images = images.to(device, non_blocking=True)
            if args.amp:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device)
            with autocast_context(device, args.amp):
                f_pool, _, logits = training_model(images)
                loss_ce = label_smoothed_ce(logits, labels, args.label_smoothing)
                loss_tri = (
                    softmax_triplet_loss(f_pool, labels) if args.triplet_weight > 0 else torch.zeros((), device=device)
                )
                loss = loss_ce + args.triplet_weight * loss_tri
            if use_target:
                # BN adaptation: forward a target batch without back-propagation; in train mode BN
                # normalises with the batch's own statistics, so only the running statistics change.
                target_images = next(target_iter)[0].to(device, non_blocking=True)
                if args.amp:
                    target_images = target_images.contiguous(memory_format=torch.channels_last)
                with torch.no_grad(), autocast_context(device, args.amp):
                    model(target_images)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                accuracy = (logits.argmax(1) == labels).float().mean()
            for name, value in (("loss", loss), ("ce", loss_ce), ("triplet", loss_tri), ("accuracy", accuracy)):
                sums[name] += float(value.detach())
            counted += 1
            bar.set_postfix(
                loss=f"{sums['loss'] / counted:.3f}",
                acc=f"{sums['accuracy'] / counted:.2f}",
                lr=f"{optimizer.param_groups[0]['lr']:.1e}",
            )
            if logger:
                logger.log(
                    {
                        "epoch": epoch,
                        "iteration": iteration,
                        "loss": float(loss.detach()),
                        "ce": float(loss_ce.detach()),
                        "triplet": float(loss_tri.detach()),
                        "accuracy": float(accuracy),
                    }
                )
            total_done += 1
            partial = {"iterations": counted, "sums": dict(sums)}
            if args.save_every and (iteration + 1) % args.save_every == 0 and iteration + 1 < args.iters:
                if is_main_process():
                    save_checkpoint(checkpoint_state(epoch, iteration + 1, partial), checkpoint_path, "pretrain")
            if args.max_iters and total_done >= args.max_iters:
                if is_main_process():
                    save_checkpoint(checkpoint_state(epoch, iteration + 1, partial), checkpoint_path, "pretrain")
                print(f"[pretrain] stopping after {total_done} iterations (--max-iters)")
                return {"stopped": True, "epoch": epoch, "iteration": iteration + 1}
        start_iter = 0
        scheduler.step()
        record = {
            "epoch": epoch,
            "event": "epoch_end",
            **{k: v / max(1, counted) for k, v in sums.items()},
        }
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            if is_main_process():
                result = evaluate(
                    model,
                    val.query,
                    val.gallery,
                    args.height,
                    args.width,
                    workers=args.workers,
                    device=device,
                    ap_topk=args.ap_topk,
                )
                record.update(val_mAP=result["mAP"], val_top1=result["top1"], val_top5=result["top5"])
                print(f"[pretrain] epoch {epoch + 1}: val mAP {result['mAP']:.4f} top-1 {result['top1']:.4f}")
                if result["mAP"] > best_map:
                    best_map, best_epoch = result["mAP"], epoch + 1
                    best = checkpoint_state(epoch + 1, 0)
                    for key in ("optimizer", "scheduler", "rng", "log_position", "epoch_sums"):
                        best.pop(key)
                    save_checkpoint(best, best_path, "pretrain")
        if is_main_process():
            if logger:
                logger.log(record)  # before the checkpoint: a run killed in between redoes the epoch's end
                if "val_mAP" in record:
                    write_curves(logger.path, title=f"pretrain: {logs_dir}", iters_per_epoch=args.iters)
            save_checkpoint(checkpoint_state(epoch + 1, 0), checkpoint_path, "pretrain")
        if distributed:
            dist.barrier()
    summary = {
        "best_mAP": best_map,
        "best_epoch": best_epoch,
        "best_checkpoint": str(best_path),
        "last": {k: result[k] for k in ("mAP", "top1", "top5")} if result else None,
    }
    if logger:
        logger.log({"event": "done", **summary})
    if is_main_process():
        print(f"[pretrain] done: best val mAP {best_map:.4f} at epoch {best_epoch} -> {best_path}")
    if distributed:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    run_cli(main)
