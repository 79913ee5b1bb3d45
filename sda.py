"""Stage I: Structured Domain Adaptation (SDA), source-to-target image translation.

A CycleGAN between the labelled synthetic source domain (raw PersonX) and the unlabelled target training
images, plus a *relation-consistency* term: the relations among a batch of source images, measured by a source
re-ID encoder on the raw images, must survive the translation, measured by a target re-ID encoder on the
translated images (Ge et al., "Structured Domain Adaptation with Online Relation Regularization", arXiv
2003.06650; used as stage I of MMT+, VisDA-2020). The translated source set (``personX_sda/image_train``) is
what stage II (``pretrain.py -ds personx_sda``) trains on.

    python pretrain.py --data-root DATA --source personx --arch resnet50_ibn --logs-dir logs/pretrain-personx
    python sda.py train --data-root DATA --out logs/sda \
        --source-encoder logs/pretrain-personx/model_best.pth [--target-encoder logs/mmt/model_best.pth]
    python sda.py translate --checkpoint logs/sda/checkpoint.pth --data-root DATA --out DATA
    python sda.py train --preset demo ...       # small generator and images: minutes on 2 CPU cores

Read top to bottom: networks, losses, image pool, encoders, one training iteration, the training loop (its
translations scored by reid.translation_fidelity), the translate and fidelity commands, the command line.

Image space (as in the official release): every image tensor here is ImageNet-normalised, what the re-ID encoders
consume. The generators end with Sigmoid (a [0, 1] image) followed by that normalisation, so their outputs feed the
discriminators, the other generator and the encoders directly, and the cycle/identity L1 losses are measured in
normalised space (about 4.4x pixel space), the scale the release's weights 10 and 5 were tuned for.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid, save_image

import reid

CHECKPOINT_NAME = "checkpoint.pth"
LEGACY_CHECKPOINT_NAME = "checkpoint.pt"  # earlier versions; still resumed from
# `train --resume` accepts these changes besides reid.RESUMABLE_CHANGES: they change outputs' timing, not training.
SETTINGS_CHANGEABLE_ON_RESUME = ("checkpoint_every", "sample_every", "sample_count")
# Architecture fields a checkpoint must agree on when resuming or translating.
ARCHITECTURE_KEYS = ("ngf", "ndf", "n_blocks", "input_skip", "d_layers", "d_norm", "height", "width")
# what a checkpoint written before a key existed was trained with
ARCHITECTURE_DEFAULTS = {"input_skip": False, "d_norm": "instance"}


# ---- Networks


class ResidualBlock(nn.Module):
    """reflect-pad 1, conv 3x3, IN, ReLU, reflect-pad 1, conv 3x3, IN, plus the identity skip."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN ResNet generator: c7s1-ngf, two stride-2 downsamplings, n residual blocks at 4*ngf channels, two
    transposed-conv upsamplings, c7s1-3. InstanceNorm without affine parameters or running statistics (so the conv
    biases stay on), reflection padding, no dropout. Input and output are ImageNet-normalised (module docstring); H
    and W must be multiples of 4 for the output to have the input's size.

    input_skip (not in the release): the network predicts a change of the input, output = sigmoid(logit(input) +
    net(input)) in [0, 1] pixel space, and start_as_identity() zeroes the last convolution so that training starts
    from the identity map: a translation is learnt as an edit of the person's own colours. The release's generator
    starts from a grey image and, in a few hundred steps, never gets back to the source colours (identity_fidelity)."""

    def __init__(self, ngf: int = 64, n_blocks: int = 9, input_skip: bool = False):
        super().__init__()
        self.input_skip = input_skip
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(3, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(inplace=True),
        ]
        for i in range(2):  # downsampling: ngf -> 2 ngf -> 4 ngf
            c = ngf * 2**i
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * c), nn.ReLU(inplace=True)]
        layers += [ResidualBlock(4 * ngf) for _ in range(n_blocks)]
        for i in range(2):  # upsampling: 4 ngf -> 2 ngf -> ngf
            c = ngf * 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(c // 2),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7)]
        if not input_skip:
            layers += [nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_skip:
            return reid.normalise_imagenet(self.net(x))
        pixels = reid.denormalise_imagenet(x.float()).clamp(1e-3, 1 - 1e-3)
        return reid.normalise_imagenet(torch.sigmoid(torch.logit(pixels) + self.net(x).float()))

    def start_as_identity(self) -> None:
        """With input_skip: zero the last convolution, so the generator starts as the identity map."""
        if self.input_skip:
            last = [m for m in self.net if isinstance(m, nn.Conv2d)][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)


# The release's PatchGAN (3 layers) scores 70x70-pixel patches of 384x128 images: each score sees 55 % of the image
# width, so it judges local texture and colour, not the whole person. At the demo's 96x48 it would see 146 % of the
# width and judge whole images, pushing the generator towards global recolouring (identity changes). So the depth
# follows the image: the deepest PatchGAN seeing at most this share of the width (128 -> 3 layers, 70 px; 48 -> 1, 16).
RELEASE_RECEPTIVE_FIELD_SHARE = 70 / 128


def patch_receptive_field(n_layers: int) -> int:
    """Receptive field (pixels) of one score of PatchDiscriminator(n_layers): 4x4 convolutions, n_layers of
    stride 2 (the first one included), then two of stride 1; r <- (r - 1) * stride + 4 from the output back."""
    field = 1
    for stride in reversed([2] * n_layers + [1, 1]):
        field = (field - 1) * stride + 4
    return field


def discriminator_layers_for(width: int, max_layers: int = 5) -> int:
    """The deepest PatchGAN (1..max_layers layers) whose receptive field is at most
    RELEASE_RECEPTIVE_FIELD_SHARE of the image width (1 if even that is wider)."""
    fitting = [n for n in range(1, max_layers + 1) if patch_receptive_field(n) <= RELEASE_RECEPTIVE_FIELD_SHARE * width]
    return max(fitting, default=1)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator ("basic"): C64 (no norm) stride 2, then n_layers - 1 more stride-2 layers and one stride-1
    layer doubling the width up to 8 x ndf, then a 1-channel stride-1 conv; 4x4 kernels, padding 1, InstanceNorm
    without affine, LeakyReLU 0.2. With 3 layers a 384x128 input gives 46x14 scores, each seeing a 70x70 patch."""

    def __init__(self, ndf: int = 64, n_layers: int = 3, norm: str = "instance"):
        super().__init__()
        if norm not in ("instance", "none"):
            raise ValueError(f"discriminator norm {norm!r}: expected 'instance' or 'none'")
        layers: list[nn.Module] = [nn.Conv2d(3, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        channels = ndf
        for n in range(1, n_layers + 1):
            out_channels = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1),
                nn.InstanceNorm2d(out_channels) if norm == "instance" else nn.Identity(),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out_channels
        layers += [nn.Conv2d(channels, 1, 4, stride=1, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def init_weights_normal(module: nn.Module, std: float = 0.02) -> None:
    """CycleGAN initialisation: conv / transposed-conv / linear weights ~ N(0, std^2), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Generators(nn.Module):
    """Both generators in one module, so one forward + one backward per step (what DDP wants). Every generator call
    is per sample (convolutions and InstanceNorm never mix samples): stacking the source and target batches into one
    call gives exactly the outputs of separate calls, only faster."""

    def __init__(self, ngf: int, n_blocks: int, input_skip: bool = False):
        super().__init__()
        self.source_to_target = ResnetGenerator(ngf, n_blocks, input_skip)
        self.target_to_source = ResnetGenerator(ngf, n_blocks, input_skip)

    def forward(
        self, real_source: torch.Tensor, real_target: torch.Tensor, with_identity: bool = True
    ) -> dict[str, torch.Tensor]:
        n_s, n_t = len(real_source), len(real_target)
        if with_identity:  # identity images: G_s2t(real target) and G_t2s(real source)
            out = self.source_to_target(torch.cat([real_source, real_target]))
            fake_target, identity_target = out[:n_s], out[n_s:]
            out = self.target_to_source(torch.cat([real_target, real_source]))
            fake_source, identity_source = out[:n_t], out[n_t:]
        else:
            fake_target = self.source_to_target(real_source)
            fake_source = self.target_to_source(real_target)
            identity_target = identity_source = None
        result = {
            "fake_target": fake_target,  # source image translated to the target style
            "fake_source": fake_source,
            "cycled_source": self.target_to_source(fake_target),
            "cycled_target": self.source_to_target(fake_source),
        }
        if with_identity:
            result.update(identity_target=identity_target, identity_source=identity_source)
        return result


class Discriminators(nn.Module):
    """D_target (real target vs translated source) and D_source (real source vs translated target). forward() is the
    discriminator step's objective: 0.5 * [LSGAN(D(real), 1) + LSGAN(D(fake), 0)] for each, with real and fake
    stacked into one call (per-sample InstanceNorm makes that exact)."""

    def __init__(self, ndf: int, n_layers: int = 3, norm: str = "instance"):
        super().__init__()
        self.target = PatchDiscriminator(ndf, n_layers, norm)
        self.source = PatchDiscriminator(ndf, n_layers, norm)

    def forward(
        self, real_target: torch.Tensor, fake_target: torch.Tensor, real_source: torch.Tensor, fake_source: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            discriminator_loss(self.target, real_target, fake_target),
            discriminator_loss(self.source, real_source, fake_source),
        )


# ---- Losses


def lsgan_loss(prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Least-squares GAN loss (Mao et al. 2017): mean over the patch map of (D(x) - label)^2, label 1 or 0."""
    label = 1.0 if target_is_real else 0.0
    return (prediction.float() - label).pow(2).mean()


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """0.5 * [LSGAN(D(real), real) + LSGAN(D(fake), fake)]; `fake` must already be detached (and pooled)."""
    scores = discriminator(torch.cat([real, fake]))
    return 0.5 * (lsgan_loss(scores[: len(real)], True) + lsgan_loss(scores[len(real) :], False))


def relation_consistency_loss(
    translated_features: torch.Tensor, source_features: torch.Tensor, source_pids: torch.Tensor
) -> torch.Tensor:
    """SDA relation consistency (release form, docs/differences.md#sda): per anchor, the hardest positive and negative
    by source identity, mined on the *translated* features; soft cross-entropy between the 2-way softmax over (d_ap,
    d_an) of the source features (target, detached) and of the translated features at the same pairs, Euclidean
    distances on un-normalised features: reid.soft_triplet_loss(features, labels, reference_features). Its minimum is
    the entropy of the source relations (not 0), reached when the translation reproduces them."""
    return reid.soft_triplet_loss(translated_features.float(), source_pids, source_features.float().detach())


class ImagePool:
    """History of generated images (Shrivastava et al. 2017, as in CycleGAN), one decision per image: while fewer than
    `size` images are stored, store the new image and return it; afterwards, with probability 0.5 return a randomly
    chosen stored image and put the new one in its place, otherwise return the new image. size 0 = off."""

    def __init__(self, size: int = 50, seed: int = 0):
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = random.Random(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        returned = []
        for image in images.detach():
            image = image.clone()
            if len(self.images) < self.size:
                self.images.append(image)
                returned.append(image)
            elif self.rng.random() < 0.5:
                slot = self.rng.randrange(self.size)
                returned.append(self.images[slot])
                self.images[slot] = image
            else:
                returned.append(image)
        return torch.stack(returned)

    def state_dict(self) -> dict:
        return {"size": self.size, "images": [t.cpu() for t in self.images], "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.images = state["size"], list(state["images"])
        self.rng.setstate(state["rng"])


def linear_decay_multiplier(epoch: int, epochs_constant: int, epochs_decay: int) -> float:
    """Learning-rate multiplier for 0-based `epoch`, stepped at the end of each epoch (the release's CycleGAN policy):
    1 - max(0, epoch + 1 - epochs_constant) / (epochs_decay + 1), with 50 + 50 epochs 1 up to epoch 49, then down to
    1/51 at epoch 99 (the technical report writes (epoch - 50)/50; the code's formula produced the reported numbers)."""
    return 1.0 - max(0, epoch + 1 - epochs_constant) / float(epochs_decay + 1)


# ---- Re-ID encoders for the relation term


ENCODER_KINDS = ("weights", *reid.REID_MODEL_KINDS)  # pretrain.py / mmt_plus.py models, or a bare state dict (--arch)


def classifier_weight(state: dict, shape: torch.Size) -> torch.Tensor | None:
    """The state's `classifier.weight` if it exists with this shape, else None."""
    weight = state.get("classifier.weight")
    return weight if weight is not None and weight.shape == shape else None


def build_relation_encoders(
    source_path: str | Path, target_path: str | Path | None, arch: str | None, online: bool, num_source_pids: int
) -> tuple[nn.Module, nn.Module]:
    """(E_s, E_t) of the relation term. E_s: the source checkpoint, frozen (it measures the relations among the raw
    source images). E_t: the target checkpoint (a model adapted to the target domain without labels, e.g. mmt_plus.py's
    model_best.pth), or E_s's weights when there is none; frozen, or with `online` trainable with BatchNorm on its
    running statistics and a source-identity classifier for its own re-ID loss: the target checkpoint's if its shape
    fits, else the source encoder's (trained on the same identities), else reid.build_model's fresh initialisation."""
    source_encoder, source_checkpoint = reid.load_model(source_path, ENCODER_KINDS, arch, what="--source-encoder")
    source_encoder = freeze(source_encoder)
    target_flag = "--target-encoder" if target_path else "--source-encoder"
    target_path = target_path or source_path
    if not online:
        return source_encoder, freeze(reid.load_model(target_path, ENCODER_KINDS, arch, what=target_flag)[0])
    target_encoder, target_checkpoint = reid.load_model(
        target_path, ENCODER_KINDS, arch, num_source_pids, what=target_flag
    )
    shape = target_encoder.classifier.weight.shape
    target_state, source_state = target_checkpoint["state_dict"], source_checkpoint["state_dict"]
    if classifier_weight(target_state, shape) is None and classifier_weight(source_state, shape) is not None:
        target_encoder.classifier.weight.data.copy_(classifier_weight(source_state, shape))
    set_batchnorm_eval(target_encoder)
    return source_encoder, target_encoder


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (BN running statistics) and no parameter gradients; inputs can still receive gradients."""
    return model.eval().requires_grad_(False)


def set_batchnorm_eval(model: nn.Module) -> None:
    """Keep BatchNorm layers on their running statistics while the rest of the model trains."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# ---- One training iteration


def generator_objective(
    generators: nn.Module,
    discriminators: Discriminators,
    real_source: torch.Tensor,
    real_target: torch.Tensor,
    source_pids: torch.Tensor,
    source_encoder: nn.Module | None,
    target_encoder: nn.Module | None,
    lambda_cycle: float,
    lambda_identity: float,
    lambda_relation: float,
    autocast=nullcontext,
) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """L_G = LSGAN(D_t(G_s2t(s)), 1) + LSGAN(D_s(G_t2s(t)), 1)
           + lambda_cycle * [L1(G_t2s(G_s2t(s)), s) + L1(G_s2t(G_t2s(t)), t)]
           + lambda_identity * [L1(G_s2t(t), t) + L1(G_t2s(s), s)]
           + lambda_relation * L_rc(E_t(G_s2t(s)), E_s(s)),
    all images ImageNet-normalised. The discriminators and encoders must be frozen by the caller (their
    parameters get no gradient; the relation gradient flows *through* E_t into G_s2t).
    Returns (loss, logged terms, images)."""
    with autocast():
        images = generators(real_source, real_target, with_identity=lambda_identity > 0)
        adversarial = lsgan_loss(discriminators.target(images["fake_target"]), True) + lsgan_loss(
            discriminators.source(images["fake_source"]), True
        )
    # The L1 terms in float32 (the images may be bf16 under autocast).
    cycle = F.l1_loss(images["cycled_source"].float(), real_source.float()) + F.l1_loss(
        images["cycled_target"].float(), real_target.float()
    )
    loss = adversarial + lambda_cycle * cycle
    terms = {"g_adversarial": adversarial.item(), "g_cycle": cycle.item()}
    if lambda_identity > 0:
        identity = F.l1_loss(images["identity_target"].float(), real_target.float()) + F.l1_loss(
            images["identity_source"].float(), real_source.float()
        )
        loss = loss + lambda_identity * identity
        terms["g_identity"] = identity.item()
    if lambda_relation > 0:
        with autocast():
            with torch.no_grad():
                source_features = source_encoder(real_source)
            translated_features = target_encoder(images["fake_target"])
        relation = relation_consistency_loss(translated_features, source_features, source_pids)
        loss = loss + lambda_relation * relation
        terms["g_relation"] = relation.item()
        images["source_features"] = source_features.float()
    terms["g_total"] = loss.item()
    return loss, terms, images


def set_requires_grad(parameters: Iterable[nn.Parameter], flag: bool) -> None:
    for p in parameters:
        p.requires_grad_(flag)


@torch.no_grad()
def translate_images(generator: nn.Module, images: torch.Tensor, autocast=nullcontext, batch: int = 64) -> torch.Tensor:
    """[0, 1] translations of ImageNet-normalised images, in batches."""
    outputs = []
    for start in range(0, len(images), batch):
        with autocast():
            outputs.append(reid.denormalise_imagenet(generator(images[start : start + batch]).float()))
    return torch.cat(outputs)


# ---- Training


def check_image_size(height: int, width: int, d_layers: int = 3) -> None:
    if height % 4 or width % 4:
        raise ValueError(f"--height {height} / --width {width}: both must be multiples of 4 (two 2x downsamplings)")
    smallest = 3 * 2**d_layers  # d_layers halvings, then two 4x4 stride-1 convolutions: at least one score
    if min(height, width) < smallest:
        raise ValueError(
            f"--height {height} / --width {width}: a {d_layers}-layer PatchGAN discriminator needs at least "
            f"{smallest} pixels (fewer --d-layers)"
        )


def save_sample_grid(path: Path, source: torch.Tensor, translated: torch.Tensor, cycled: torch.Tensor) -> None:
    """PNG grid: top row source images, middle row their translations, bottom row the cycled reconstructions."""
    rows = [reid.denormalise_imagenet(t.detach().float().cpu()) for t in (source, translated, cycled)]
    grid = make_grid(torch.cat(rows), nrow=len(source), padding=2, pad_value=1.0)
    reid.atomic_write(path, lambda temporary: save_image(grid, temporary, format="png"))


def architecture_of(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ARCHITECTURE_KEYS}


def train(args: argparse.Namespace) -> None:
    if not args.d_layers:  # 0 = scaled to the image width (RELEASE_RECEPTIVE_FIELD_SHARE)
        args.d_layers = discriminator_layers_for(args.width)
    check_image_size(args.height, args.width, args.d_layers)
    if args.batch_size % args.num_instances:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --num-instances {args.num_instances}")
    if args.lambda_relation > 0 and not args.source_encoder:
        raise ValueError(
            "--source-encoder is required for the relation-consistency term (--lambda-relation 0: CycleGAN)"
        )
    for flag, path in (("--source-encoder", args.source_encoder), ("--target-encoder", args.target_encoder)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag}: no such checkpoint file: {path}")

    distributed, rank, _, device = reid.start_run(args, seed_per_rank=True)
    main_process = reid.is_main_process()
    per_process_batch = reid.split_global_batch(args.batch_size, args.num_instances)
    out_dir = Path(args.out)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if args.resume and not checkpoint_path.exists() and (out_dir / LEGACY_CHECKPOINT_NAME).exists():
        checkpoint_path = out_dir / LEGACY_CHECKPOINT_NAME  # resumed from; saved as checkpoint.pth
    if args.resume and not checkpoint_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
    reid.prepare_run_dir(out_dir, args, changeable=SETTINGS_CHANGEABLE_ON_RESUME, write=main_process)

    # ---- data: P x K source batches (identity structure needed for relation mining), random target batches
    datasets = reid.resolve_datasets(args, ("source", "target"))
    if datasets.target is None:
        raise SystemExit("--target none: SDA translates the source into the target's style; name a target")
    source, target = datasets.source, reid.ReIDData(args.target, train=datasets.target)
    if len(target.train) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(target.train)} target training images")
    # SDA pipeline (docs/differences.md#image-pipelines): resize, flip, pad, crop, normalise; no AutoAugment or erasing
    transform = reid.build_train_transform(args.height, args.width, autoaugment=False, random_erasing=False)
    # reid.py's samplers: a resumed run sees the same images and augmentations as an uninterrupted one. The release
    # shuffles images inside each P x K batch; every op here is per sample and mining uses the labels, so the order
    # inside a batch cannot matter.
    stream = dict(num_samples=args.iters * per_process_batch, seed_samples=True)  # per process and epoch
    source_sampler = reid.RandomIdentitySampler(source.train, args.num_instances, args.seed, **stream)
    target_sampler = reid.SeededRandomSampler(len(target.train), args.seed + 1000, **stream)
    # not persistent: a new iterator per epoch picks up the sampler's new epoch
    cache = reid.DecodedImageCache(args.image_cache_mb)  # decoded images, kept across epochs
    source_dataset = reid.ImageDataset(source.train, transform, args.skip_bad_images, cache)
    target_dataset = reid.ImageDataset(target.train, transform, args.skip_bad_images, cache)
    source_loader = reid.make_loader(source_dataset, source_sampler, per_process_batch, args.workers, persistent=False)
    target_loader = reid.make_loader(target_dataset, target_sampler, per_process_batch, args.workers, persistent=False)
    # fidelity probe: two un-augmented crops of every source identity, scored at every sample grid (log, JSON beside)
    probe = reid.fidelity_items(source.train)
    probe_images = reid.load_test_images(probe, args.height, args.width).to(device)
    probe_pids = torch.tensor([item[1] for item in probe])
    probe01 = reid.denormalise_imagenet(probe_images).cpu()
    target_probe = sorted(target.train)[:: max(1, len(target.train) // len(probe))][: len(probe)]
    probe_target01 = reid.denormalise_imagenet(reid.load_test_images(target_probe, args.height, args.width))

    # ---- networks
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    generators = Generators(args.ngf, args.n_blocks, args.input_skip)
    discriminators = Discriminators(args.ndf, args.d_layers, args.d_norm)
    init_weights_normal(generators)
    init_weights_normal(discriminators)
    generators.source_to_target.start_as_identity()  # (no-ops without --input-skip)
    generators.target_to_source.start_as_identity()
    generators.to(device, memory_format=memory_format)
    discriminators.to(device, memory_format=memory_format)

    source_encoder = target_encoder = None
    if args.lambda_relation > 0:
        if not args.target_encoder and main_process:
            print(f"no --target-encoder: {args.source_encoder} also measures the translations")
        source_encoder, target_encoder = build_relation_encoders(
            args.source_encoder, args.target_encoder, args.arch, args.online_relation, source.num_train_pids
        )
        source_encoder.to(device, memory_format=memory_format)
        target_encoder.to(device, memory_format=memory_format)

    optimizer_g = torch.optim.Adam(generators.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    optimizer_d = torch.optim.Adam(discriminators.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    optimizer_reid = None
    # Only what build_model made trainable (its BNNeck bias stays frozen), toggled off during the G step.
    reid_parameters = [p for p in target_encoder.parameters() if p.requires_grad] if target_encoder is not None else []
    if args.online_relation and target_encoder is not None:
        optimizer_reid = torch.optim.Adam(reid_parameters, lr=args.lr_reid, weight_decay=args.weight_decay_reid)
    pool_target = ImagePool(args.pool_size, seed=args.seed + rank)  # translated source images for D_target
    pool_source = ImagePool(args.pool_size, seed=args.seed + 500 + rank)  # translated target images for D_source

    # what a checkpoint holds of the run besides its position, by name
    parts = {
        "generators": generators,
        "discriminators": discriminators,
        "optimizer_g": optimizer_g,
        "optimizer_d": optimizer_d,
        "pool_target": pool_target,
        "pool_source": pool_source,
    }
    if optimizer_reid is not None:
        parts.update(target_encoder=target_encoder, optimizer_reid=optimizer_reid)
    start_epoch, start_iteration, global_step, log_position = 0, 0, 0, None
    if args.resume:
        state = reid.read_checkpoint(checkpoint_path, kinds=("sda",), what="--resume")
        saved = {**ARCHITECTURE_DEFAULTS, **state["architecture"]}  # older checkpoints lack the newer keys
        if saved != architecture_of(args):
            raise ValueError(
                f"{checkpoint_path}: architecture {saved} differs from the arguments {architecture_of(args)}"
            )
        if optimizer_reid is not None and "target_encoder" not in state:
            raise ValueError(f"{checkpoint_path}: was trained without --online-relation")
        for name, part in parts.items():
            part.load_state_dict(state[name])
        reid.set_rng_state(state["rng"])
        log_position = state.get("log_position")
        start_epoch, start_iteration, global_step = state["epoch"], state["iteration"], state["global_step"]
        if start_iteration >= args.iters:
            start_epoch, start_iteration = start_epoch + 1, 0
        if main_process:
            print(f"resumed {checkpoint_path} at epoch {start_epoch} iteration {start_iteration}")

    generators_ddp, discriminators_ddp = reid.wrap_ddp(generators, device), reid.wrap_ddp(discriminators, device)
    target_encoder_ddp = reid.wrap_ddp(target_encoder, device) if optimizer_reid is not None else target_encoder

    def save(epoch: int, iteration: int) -> None:
        state = {
            "architecture": architecture_of(args),
            "args": vars(args),
            "epoch": epoch,
            "iteration": iteration,  # iterations of `epoch` already done
            "global_step": global_step,
            **{name: part.state_dict() for name, part in parts.items()},
            "rng": reid.rng_state(),
            "log_position": logger.position() if logger else None,
        }
        reid.save_checkpoint(state, out_dir / CHECKPOINT_NAME, "sda")

    logger = reid.JsonlLogger(out_dir / "log.jsonl", log_position) if main_process else None
    autocast = lambda: reid.autocast_context(device, args.amp)  # noqa: E731
    epochs = args.epochs_constant + args.epochs_decay
    encoders = (source_encoder, target_encoder)
    weights = (args.lambda_cycle, args.lambda_identity, args.lambda_relation)  # of the cycle, identity, relation terms
    for epoch in range(start_epoch, epochs):
        # Learning rate set from the epoch alone (no scheduler state), so a resumed run with a changed
        # schedule gets the right rate immediately.
        decay = linear_decay_multiplier(epoch, args.epochs_constant, args.epochs_decay)
        lr = args.lr * decay
        for group in optimizer_g.param_groups:
            group["lr"] = lr
        for group in optimizer_d.param_groups:
            group["lr"] = (args.lr_discriminator or args.lr) * decay
        skip = start_iteration * per_process_batch
        source_sampler.set_epoch(epoch, skip)
        target_sampler.set_epoch(epoch, skip)
        source_batches, target_batches = iter(source_loader), iter(target_loader)
        generators.train()
        discriminators.train()
        progress = reid.progress(
            range(start_iteration, args.iters), desc=f"sda epoch {epoch + 1}/{epochs}", disable=not main_process
        )
        for iteration in progress:
            tic = time.perf_counter()
            real_source, source_pids, _, _ = next(source_batches)
            real_target, _, _, _ = next(target_batches)
            real_source = real_source.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            real_target = real_target.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            source_pids = source_pids.to(device)

            # (1) generators; discriminators frozen (called unwrapped, so DDP does not expect their gradients)
            set_requires_grad(discriminators.parameters(), False)
            if optimizer_reid is not None:
                target_encoder.eval()
                set_requires_grad(reid_parameters, False)
            loss_g, terms, images = generator_objective(
                generators_ddp, discriminators, real_source, real_target, source_pids, *encoders, *weights, autocast
            )
            optimizer_g.zero_grad(set_to_none=True)
            loss_g.backward()
            optimizer_g.step()

            # (2) discriminators on real images vs pooled (history) translations
            set_requires_grad(discriminators.parameters(), True)
            fake_target = pool_target.query(images["fake_target"].detach().float())
            fake_source = pool_source.query(images["fake_source"].detach().float())
            with autocast():
                loss_d_target, loss_d_source = discriminators_ddp(
                    real_target, fake_target.to(memory_format=memory_format),
                    real_source, fake_source.to(memory_format=memory_format),
                )  # fmt: skip
            loss_d = loss_d_target + loss_d_source
            optimizer_d.zero_grad(set_to_none=True)
            loss_d.backward()
            optimizer_d.step()
            terms.update(d_target=loss_d_target.item(), d_source=loss_d_source.item())

            # (3) --online-relation: the target encoder learns on the translations with the source labels
            if optimizer_reid is not None:
                set_requires_grad(reid_parameters, True)
                target_encoder.train()
                set_batchnorm_eval(target_encoder)
                with autocast():
                    f_pool, f_bn, logits = target_encoder_ddp(images["fake_target"].detach())
                loss_reid = reid.label_smoothed_ce(logits.float(), source_pids) + reid.softmax_triplet_loss(
                    f_pool.float(), source_pids
                )
                relation_reid = relation_consistency_loss(f_bn, images["source_features"], source_pids)
                loss_reid = loss_reid + args.lambda_relation * relation_reid
                optimizer_reid.zero_grad(set_to_none=True)
                loss_reid.backward()
                optimizer_reid.step()
                terms.update(reid_total=loss_reid.item(), reid_relation=relation_reid.item())

            global_step += 1
            if main_process:
                terms.update(epoch=epoch, iteration=iteration, step=global_step, lr=optimizer_g.param_groups[0]["lr"])
                terms["seconds"] = time.perf_counter() - tic
                last_iteration = iteration == args.iters - 1
                if (args.sample_every and global_step % args.sample_every == 0) or last_iteration:
                    n = min(args.sample_count, len(real_source))
                    sample_path = out_dir / "samples" / f"epoch{epoch + 1:03d}_step{global_step:07d}.png"
                    save_sample_grid(
                        sample_path, real_source[:n], images["fake_target"][:n], images["cycled_source"][:n]
                    )
                    generator = reid.unwrap_ddp(generators).source_to_target
                    translated01 = translate_images(generator, probe_images, autocast)
                    fidelity = reid.translation_fidelity(probe01, translated01.cpu(), probe_pids, probe_target01)
                    terms.update({f"fidelity_{k}": v for k, v in fidelity.items()})
                    reid.atomic_write_json(
                        sample_path.with_suffix(".json"), {"step": global_step, **fidelity}, indent=1
                    )
                logger.log(terms)
                if "fidelity_style_gap" in terms:  # the translation was evaluated at this step
                    reid.write_curves(logger.path, title=f"sda: {out_dir}", iters_per_epoch=args.iters)
                progress.set_postfix(
                    g=f"{terms['g_total']:.3f}",
                    d=f"{loss_d.item():.3f}",
                    rel=f"{terms.get('g_relation', 0):.3f}",
                    drift=f"{terms.get('fidelity_identity_drift', float('nan')):.2f}",
                )
                if args.checkpoint_every and global_step % args.checkpoint_every == 0 and not last_iteration:
                    save(epoch, iteration + 1)
        start_iteration = 0
        if main_process:
            save(epoch + 1, 0)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


# ---- Translation of the source training set


def load_generator(path: str | Path) -> tuple[ResnetGenerator, dict]:
    """The source-to-target generator of a `sda.py train` checkpoint, refusing anything that is not a trained
    one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: no such file: {path} (run `sda.py train` first)")
    state = reid.read_checkpoint(path, kinds=("sda",), what="--checkpoint")
    if "generators" not in state:
        raise ValueError(f"--checkpoint {path}: not an sda.py training checkpoint (no trained generator in it)")
    if state.get("global_step", 0) <= 0:
        raise ValueError(f"--checkpoint {path}: the generator was saved before any training step")
    architecture = {**ARCHITECTURE_DEFAULTS, **state["architecture"]}
    generator = ResnetGenerator(architecture["ngf"], architecture["n_blocks"], architecture["input_skip"])
    prefix = "source_to_target."
    generator.load_state_dict({k[len(prefix) :]: v for k, v in state["generators"].items() if k.startswith(prefix)})
    return generator.eval(), architecture


def translation_layout(source_name: str, items: Sequence[reid.Item], out_root: Path) -> tuple[Path, list[Path]]:
    """Where the translations go: raw PersonX -> OUT/personX_sda/image_train/<name> (read as `personx_sda`); any
    other source -> OUT/<source>_sda/images/<path below the source images' common folder>, with a list_train.txt
    (read as `--source list --source-root OUT/<source>_sda`)."""
    name = reid.canonical_dataset_name(source_name)
    if name == "personx":
        return out_root / "personX_sda", [out_root / "personX_sda" / "image_train" / Path(p).name for p, _, _ in items]
    common = os.path.commonpath([os.path.dirname(p) for p, _, _ in items])
    folder = out_root / f"{name}_sda"
    return folder, [folder / "images" / os.path.relpath(p, common) for p, _, _ in items]


@torch.no_grad()
def translate(args: argparse.Namespace) -> None:
    generator, architecture = load_generator(args.checkpoint)
    device = torch.device(args.device) if args.device else torch.device("cpu")
    generator.to(device)
    datasets = reid.resolve_datasets(args, ("source", "target"))
    items = datasets.source.train
    out_root = Path(args.out)
    out_dir, destinations = translation_layout(args.source, items, out_root)
    for (source_path, _, _), destination in zip(items, destinations, strict=True):
        if os.path.realpath(destination) == os.path.realpath(source_path):
            raise SystemExit(f"error: --out {out_root}: would overwrite the source image {source_path}")
    destination_of = {item[0]: destination for item, destination in zip(items, destinations, strict=True)}
    for folder in sorted({d.parent for d in destinations}):
        folder.mkdir(parents=True, exist_ok=True)
        reid.remove_stale_temporaries(folder)  # of an interrupted run
    # Resumable: every output file is complete (temp name, then rename), so existing ones are simply skipped.
    todo = [item for item in items if not destination_of[item[0]].exists()]
    print(f"translate: {len(items)} source images, {len(items) - len(todo)} already done, writing to {out_dir}")
    if todo:
        write_translations(generator, architecture, todo, destination_of, device, args)
    if out_dir.name != "personX_sda":  # written last: the list names only finished images
        lines = [
            f"{destination.relative_to(out_dir).as_posix()} {pid} {camid}\n"
            for (_, pid, camid), destination in zip(items, destinations, strict=True)
        ]
        reid.atomic_write_text(out_dir / "list_train.txt", "".join(lines))
        print(f"translate: {out_dir / 'list_train.txt'} lists them (--source list --source-root {out_dir})")


def write_translations(generator, architecture: dict, todo, destination_of: dict, device, args) -> None:
    # The generator runs at its training resolution; the result is resized back to the source image's own
    # size.
    loader = reid.make_test_loader(todo, architecture["height"], architecture["width"], args.batch_size, args.workers)
    autocast = reid.autocast_context(device, args.amp)
    with reid.progress(total=len(todo), desc="translate") as progress:
        for images, _, _, indices in loader:
            with autocast:
                translated = generator(images.to(device))
            pixels = (reid.denormalise_imagenet(translated.float()) * 255).round().to(torch.uint8).cpu()
            for image, index in zip(pixels, indices.tolist(), strict=True):
                source_path = todo[index][0]
                with Image.open(source_path) as original:
                    size = original.size
                result = Image.fromarray(image.permute(1, 2, 0).numpy())
                if result.size != size:
                    result = result.resize(size, Image.BICUBIC)
                destination = destination_of[source_path]
                image_format = Image.registered_extensions().get(destination.suffix.lower(), "PNG")
                save_options = {"quality": args.jpeg_quality} if image_format == "JPEG" else {}
                reid.atomic_write(destination, functools.partial(result.save, format=image_format, **save_options))
            progress.update(len(indices))


@torch.no_grad()
def measure_fidelity(args: argparse.Namespace) -> dict:
    """identity_fidelity of a translated copy of personX/image_train (same file names, e.g. personX_sda or the
    embedded benchmark's perfect-translator control) against the source images, on every source image."""
    datasets = reid.resolve_datasets(args, ("source", "target"))
    items = datasets.source.train
    translated_dir = Path(args.translated)
    if not translated_dir.is_dir():
        raise FileNotFoundError(f"--translated {translated_dir}: no such folder")
    missing = [path for path, _, _ in items if not (translated_dir / Path(path).name).is_file()]
    if missing:
        raise FileNotFoundError(f"--translated {translated_dir}: {len(missing)} source images have no translation, "
                                f"e.g. {Path(missing[0]).name}")  # fmt: skip
    translated_items = [(str(translated_dir / Path(path).name), pid, cam) for path, pid, cam in items]
    # [0, 1] images at one size; the style gap's target images: none with --target none
    source01, translated01, target01 = [
        reid.denormalise_imagenet(reid.load_test_images(chosen, args.height, args.width)) if chosen else None
        for chosen in (items, translated_items, datasets.target)
    ]
    pids = torch.tensor([pid for _, pid, _ in items])
    result = {"translated": str(translated_dir), "images": len(items)}
    result.update(reid.translation_fidelity(source01, translated01, pids, target01))
    print(json.dumps(result, indent=1))
    if args.out:
        reid.atomic_write_json(Path(args.out), result, indent=1)
    return result


# ---- Command line

# --preset demo: the embedded synthetic benchmark on 2 CPU cores in minutes. Explicit flags still override.
PRESETS = {
    "demo": dict(
        height=96,  # as pretrain.py's demo preset; 0.7 s per step on 2 cores instead of 1.3 s at 128x64
        width=48,
        ngf=16,
        ndf=16,
        n_blocks=4,
        # A translator that keeps identity at 300 iterations (README, "Table 2 from a neutral initialisation"):
        # the generators edit their input from the identity map, and only the cycle term (weight 3, no identity
        # term) holds them there, since the release's L1 weights (10 + 5) pin an identity-map start exactly where it
        # is. The discriminator sees the whole 96x48 image (3 layers): a 1-layer PatchGAN's 16-pixel patches of
        # source and target images are too alike to tell apart (its LSGAN loss stays near chance), so it gives the
        # generator no signal. Pre-training from random weights on these translations (40 x 30 iterations, seeds
        # 1, 2): 44.4 / 44.8 mAP against 41.7 / 40.8 on raw images; the release's losses with the scaled 1-layer
        # discriminator: 27.1 / 25.6.
        input_skip=True,
        d_layers=3,
        lambda_cycle=3.0,
        lambda_identity=0.0,
        batch_size=16,
        num_instances=4,
        iters=50,
        epochs_constant=3,
        epochs_decay=3,
        sample_every=50,
    )
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_command = functools.partial(commands.add_parser, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    t = add_command("train", help="train the source<->target CycleGAN with relation consistency")
    reid.add_preset_argument(t, PRESETS)
    reid.add_dataset_arguments(t, ("source", "target"))
    t.add_argument("--out", default="logs/sda", help="output folder: checkpoint.pth, log.jsonl, samples/")
    reid.add_run_dir_arguments(t, "--out", SETTINGS_CHANGEABLE_ON_RESUME)
    # relation consistency
    t.add_argument("--arch", help="architecture of the re-ID encoders (default: the one their checkpoints name)")
    t.add_argument("--source-encoder", help="pretrain.py checkpoint trained on raw source images (E_s)")
    t.add_argument(
        "--target-encoder",
        help="checkpoint of the target-domain encoder E_t (mmt_plus.py model, or any reid.build_model "
        "checkpoint); defaults to --source-encoder",
    )
    t.add_argument("--lambda-relation", type=float, default=1.0, help="relation-consistency weight (0 = CycleGAN)")
    t.add_argument(
        "--online-relation",
        action="store_true",
        help="the SDA paper's online variant: E_t is also trained every iteration on the translated images with the "
        "source labels (label-smoothed CE + softmax triplet + lambda-relation * relation term; BN statistics frozen). "
        "Default off = the official release: both encoders frozen (its reported 61.0 -> 71.2 mAP; one backward less)",
    )
    t.add_argument("--lr-reid", type=float, default=3.5e-5, help="Adam lr of E_t with --online-relation")
    t.add_argument("--weight-decay-reid", type=float, default=5e-4, help="weight decay of E_t (--online-relation)")
    # CycleGAN
    t.add_argument("--height", type=int, default=384, help="training image height (multiple of 4)")
    t.add_argument("--width", type=int, default=128, help="training image width (multiple of 4)")
    t.add_argument("--ngf", type=int, default=64, help="generator width (channels of the first conv)")
    t.add_argument("--ndf", type=int, default=64, help="discriminator width")
    t.add_argument("--n-blocks", type=int, default=9, help="residual blocks per generator")
    t.add_argument(
        "--input-skip",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="generators edit their input, sigmoid(logit(x) + net(x)), from the identity map; not in the release",
    )
    t.add_argument(
        "--d-layers",
        type=int,
        default=0,
        help="PatchGAN discriminator depth; 0 = scaled to the image: the deepest whose receptive field is at most "
        "55%% of the width, the release's 70 px at 128 (3 layers at width 128, 2 at 64, 1 at 48)",
    )
    t.add_argument(
        "--d-norm",
        choices=("instance", "none"),
        default="instance",
        help="normalisation inside the discriminator: instance (the release) normalises each image's features per "
        "channel; none keeps their mean and scale (measured: no better at telling the domains apart with 1 layer)",
    )
    t.add_argument("--lambda-cycle", type=float, default=10.0, help="cycle-consistency L1 weight")
    t.add_argument("--lambda-identity", type=float, default=5.0, help="identity L1 weight (CycleGAN's 0.5 x 10)")
    t.add_argument("--pool-size", type=int, default=50, help="image history per discriminator (0 = off)")
    t.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of the generators (and discriminators)")
    t.add_argument(
        "--lr-discriminator",
        type=float,
        default=0.0,
        help="Adam learning rate of the discriminators (0 = --lr, as the release); a two time-scale option, "
        "measured not to rescue the 1-layer discriminator at the demo's size (README)",
    )
    t.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (beta2 = 0.999)")
    t.add_argument("--epochs-constant", type=int, default=50, help="epochs at the initial learning rate")
    t.add_argument("--epochs-decay", type=int, default=50, help="epochs of linear learning-rate decay")
    t.add_argument("--iters", type=int, default=200, help="iterations per epoch")
    t.add_argument(
        "--batch-size", type=int, default=32, help="source and target images per step each, all processes together"
    )
    t.add_argument("--num-instances", type=int, default=4, help="images per identity in a source batch (K of PxK)")
    # the seed is offset by the DDP rank; NHWC is off by default (measured ~10 % slower for these GAN nets on CPU)
    reid.add_runtime_arguments(t, "bf16/fp16 autocast", channels_last=False)
    t.add_argument("--sample-every", type=int, default=400, help="save a sample grid every N steps (and each epoch)")
    t.add_argument("--sample-count", type=int, default=8, help="images per sample grid")
    t.add_argument("--checkpoint-every", type=int, default=0, help="extra checkpoint every N steps (0: per epoch)")

    s = add_command("translate", help="write the source images translated by the trained source-to-target generator")
    s.add_argument("--checkpoint", required=True, help="checkpoint.pth (or an earlier .pt) written by `sda.py train`")
    reid.add_dataset_arguments(s, ("source",))
    s.add_argument(
        "--out",
        required=True,
        help="where to write: OUT/personX_sda/image_train/ for --source personx (usually OUT = --data-root), else "
        "OUT/<source>_sda/ with images/ and list_train.txt (then: --source list --source-root OUT/<source>_sda)",
    )
    s.add_argument("--batch-size", type=int, default=32, help="images per translation batch (one process)")
    s.add_argument("--workers", type=int, default=reid.default_workers(), help="data-loading processes")
    s.add_argument("--device", help="torch device (default cpu)")
    s.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    s.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="autocast (default fp32)")
    s.add_argument("--jpeg-quality", type=int, default=95, help="quality of JPEG outputs")

    f = add_command("fidelity", help="identity fidelity of a translated copy of the source images (identity_fidelity)")
    reid.add_dataset_arguments(f, ("source", "target"))
    f.add_argument("--translated", required=True, help="folder of translated images named as the source ones")
    f.add_argument("--height", type=int, default=128, help="images are compared at this size")
    f.add_argument("--width", type=int, default=64)
    f.add_argument("--out", help="also write the result to this JSON file")
    f.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.set_defaults(train_parser=t)  # where parse_args puts a --preset's defaults
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = reid.parse_with_preset(parser, PRESETS, argv, target=parser.get_default("train_parser"))
    del args.train_parser
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"train": train, "translate": translate, "fidelity": measure_fidelity}[args.command](args)


if __name__ == "__main__":
    reid.run_cli(lambda: main(sys.argv[1:]))
