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

Read top to bottom: networks, losses, image pool, encoders, one training iteration, the training loop, the
translation command, the command line.

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
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

import reid

CHECKPOINT_NAME = "checkpoint.pth"
LEGACY_CHECKPOINT_NAME = "checkpoint.pt"  # earlier versions; still resumed from
# `train --resume` accepts these changes besides reid.RESUMABLE_CHANGES: they change outputs' timing, not training.
SETTINGS_CHANGEABLE_ON_RESUME = ("checkpoint_every", "sample_every", "sample_count")
# Architecture fields a checkpoint must agree on when resuming or translating.
ARCHITECTURE_KEYS = ("ngf", "ndf", "n_blocks", "input_skip", "d_layers", "height", "width")


# ---- Networks


def normalise_imagenet(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (N,3,H,W) -> ImageNet-normalised images."""
    mean = images01.new_tensor(reid.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images01.new_tensor(reid.IMAGENET_STD).view(1, 3, 1, 1)
    return (images01 - mean) / std


def denormalise_imagenet(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images -> [0, 1] images (clamped)."""
    mean = images.new_tensor(reid.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(reid.IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)


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
    """CycleGAN ResNet generator: c7s1-ngf, two stride-2 downsamplings, n residual blocks at 4*ngf channels,
    two transposed-conv upsamplings, c7s1-3. InstanceNorm without affine parameters or running statistics (so
    the conv biases stay on), reflection padding, no dropout. Input and output are ImageNet-normalised (module
    docstring); H and W must be multiples of 4 for the output to have the input's size.

    input_skip (not in the release): the network predicts a change of the input instead of a whole new image,
    output = sigmoid(logit(input) + net(input)) in [0, 1] pixel space, and start_as_identity() zeroes the last
    convolution so that training starts from the identity map. A translation then has to be learnt as an
    edit of the person's own colours; the release's generator starts from a grey image and, with a budget of a
    few hundred steps, never gets back to the source colours (measured with identity_fidelity)."""

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
            return normalise_imagenet(self.net(x))
        pixels = denormalise_imagenet(x.float()).clamp(1e-3, 1 - 1e-3)
        return normalise_imagenet(torch.sigmoid(torch.logit(pixels) + self.net(x).float()))

    def start_as_identity(self) -> None:
        """With input_skip: zero the last convolution, so the generator starts as the identity map."""
        if self.input_skip:
            last = [m for m in self.net if isinstance(m, nn.Conv2d)][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)


# The release's PatchGAN (3 layers) scores 70x70-pixel patches of 384x128 images: each score sees 55 % of the
# image width, so it judges local texture and colour, not the whole person. At the demo's 96x48 the same
# discriminator would see 146 % of the width and judge whole images, which pushes the generator towards global
# recolouring (identity changes). The depth is therefore scaled with the image: the deepest PatchGAN whose
# receptive field is at most this share of the width (128 -> 3 layers, 70 px; 64 -> 2, 34 px; 48 -> 1, 16 px).
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
    """PatchGAN discriminator ("basic"): C64 (no norm) stride 2, then n_layers - 1 more stride-2 layers and one
    stride-1 layer doubling the width up to 8 x ndf, then a 1-channel stride-1 conv; 4x4 kernels, padding 1,
    InstanceNorm without affine, LeakyReLU 0.2. With the release's 3 layers a 384x128 input gives a 46x14 map of
    real/fake scores, each seeing a 70x70 patch (patch_receptive_field)."""

    def __init__(self, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        channels = ndf
        for n in range(1, n_layers + 1):
            out_channels = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1),
                nn.InstanceNorm2d(out_channels),
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
    """Both generators in one module, so one forward + one backward per step (what DDP wants).

    Every generator call is per sample (convolutions and InstanceNorm never mix samples), so stacking the
    source and target batches into one call gives exactly the outputs of separate calls, only faster."""

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
            result["identity_target"] = identity_target
            result["identity_source"] = identity_source
        return result


class Discriminators(nn.Module):
    """D_target (real target vs translated source) and D_source (real source vs translated target).

    forward() is the discriminator step's objective: 0.5 * [LSGAN(D(real), 1) + LSGAN(D(fake), 0)] for each,
    with real and fake stacked into one call (per-sample InstanceNorm makes that exact)."""

    def __init__(self, ndf: int, n_layers: int = 3):
        super().__init__()
        self.target = PatchDiscriminator(ndf, n_layers)
        self.source = PatchDiscriminator(ndf, n_layers)

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
    """SDA relation consistency (release form, docs/differences.md#sda): for each anchor, mine the hardest positive and
    hardest negative by source identity on the *translated* features, then soft cross-entropy between the
    2-way softmax over (d_ap, d_an) of the source features (target, detached) and of the translated features
    (prediction), at the same index pairs, Euclidean distances on un-normalised features. This is exactly
    reid.soft_triplet_loss(features, labels, reference_features). Its minimum over the translated
    features is the entropy of the source relations (not 0), reached when the translation reproduces the
    source relations."""
    return reid.soft_triplet_loss(translated_features.float(), source_pids, source_features.float().detach())


class ImagePool:
    """History of generated images (Shrivastava et al. 2017, as in CycleGAN), one decision per image: while
    fewer than `size` images are stored, store the new image and return it; afterwards, with probability 0.5
    return a randomly chosen stored image and put the new one in its place, otherwise return the new image.
    size 0 = off."""

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
        self.size = state["size"]
        self.images = list(state["images"])
        self.rng.setstate(state["rng"])


def linear_decay_multiplier(epoch: int, epochs_constant: int, epochs_decay: int) -> float:
    """Learning-rate multiplier for 0-based `epoch`, stepped at the end of each epoch (the release's CycleGAN
    policy): 1 - max(0, epoch + 1 - epochs_constant) / (epochs_decay + 1). With 50 + 50 epochs it is 1 up to
    epoch 49, then decays linearly to 1/51 at epoch 99 (the technical report writes (epoch - 50)/50; we keep
    the code's formula, which is what produced the reported numbers)."""
    return 1.0 - max(0, epoch + 1 - epochs_constant) / float(epochs_decay + 1)


# ---- Re-ID encoders for the relation term


# Encoder files: re-ID models of pretrain.py / mmt_plus.py, or a bare state dict of one (with --arch).
ENCODER_KINDS = ("weights", *reid.REID_MODEL_KINDS)


def classifier_weight(state: dict, shape: torch.Size) -> torch.Tensor | None:
    """The state's `classifier.weight` if it exists with this shape, else None."""
    weight = state.get("classifier.weight")
    return weight if weight is not None and weight.shape == shape else None


def build_relation_encoders(
    source_path: str | Path, target_path: str | Path | None, arch: str | None, online: bool, num_source_pids: int
) -> tuple[nn.Module, nn.Module]:
    """(E_s, E_t) of the relation term. E_s: the source checkpoint, frozen (it measures the relations among the
    raw source images). E_t: the target checkpoint (a model adapted to the target domain without labels, e.g.
    mmt_plus.py's model_best.pth), or E_s's weights when there is none; frozen, or with `online` trainable with
    BatchNorm on its running statistics and a source-identity classifier for its own re-ID loss: the target
    checkpoint's if its shape fits, else the source encoder's (trained on the same identities), else
    reid.build_model's fresh initialisation."""
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
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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


# ---- Identity fidelity: does the translation keep each person's colours?

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


@torch.no_grad()
def translate_images(generator: nn.Module, images: torch.Tensor, autocast=nullcontext, batch: int = 64) -> torch.Tensor:
    """[0, 1] translations of ImageNet-normalised images, in batches."""
    outputs = []
    for start in range(0, len(images), batch):
        with autocast():
            outputs.append(denormalise_imagenet(generator(images[start : start + batch]).float()))
    return torch.cat(outputs)


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
    """PNG grid: top row source images, middle row their translations, bottom row the cycled
    reconstructions."""
    rows = [denormalise_imagenet(t.detach().float().cpu()) for t in (source, translated, cycled)]
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
            "--source-encoder is required for the relation-consistency term "
            "(or pass --lambda-relation 0 for a plain CycleGAN)"
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
    # SDA pipeline (docs/differences.md#image-pipelines): resize, flip, pad (10 px at width 128), crop, normalise;
    # no AutoAugment or erasing.
    transform = reid.build_train_transform(args.height, args.width, autoaugment=False, random_erasing=False)
    # Samplers from reid.py: deterministic per (seed, epoch), sharded across DDP ranks, exactly
    # iters x batch samples per rank and epoch, with per-sample augmentation seeds, so that a resumed run sees
    # the same images as an uninterrupted one. The release shuffles images inside each P x K batch; every op
    # here is per sample and mining uses the labels, so the order inside a batch cannot matter.
    samples_per_epoch = args.iters * per_process_batch
    source_sampler = reid.RandomIdentitySampler(
        source.train, args.num_instances, args.seed, num_samples=samples_per_epoch, seed_samples=True
    )
    target_sampler = reid.SeededRandomSampler(
        len(target.train), args.seed + 1000, num_samples=samples_per_epoch, seed_samples=True
    )
    # not persistent: a new iterator per epoch picks up the sampler's new epoch
    source_dataset = reid.ImageDataset(source.train, transform, args.skip_bad_images)
    target_dataset = reid.ImageDataset(target.train, transform, args.skip_bad_images)
    source_loader = reid.make_loader(source_dataset, source_sampler, per_process_batch, args.workers, persistent=False)
    target_loader = reid.make_loader(target_dataset, target_sampler, per_process_batch, args.workers, persistent=False)
    # Identity-fidelity probe (identity_fidelity): two un-augmented crops of every source identity, translated at
    # every sample grid; the score goes into the log and beside the grid.
    probe = fidelity_items(source.train)
    probe_set = reid.ImageDataset(probe, reid.build_test_transform(args.height, args.width))
    probe_images = torch.stack([probe_set[i][0] for i in range(len(probe))]).to(device)
    probe_pids = torch.tensor([item[1] for item in probe])
    probe01 = denormalise_imagenet(probe_images).cpu()
    target_probe = sorted(target.train)[:: max(1, len(target.train) // len(probe))][: len(probe)]
    target_probe_set = reid.ImageDataset(target_probe, reid.build_test_transform(args.height, args.width))
    probe_target01 = denormalise_imagenet(torch.stack([target_probe_set[i][0] for i in range(len(target_probe))]))

    # ---- networks
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    generators = Generators(args.ngf, args.n_blocks, args.input_skip)
    discriminators = Discriminators(args.ndf, args.d_layers)
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
        saved = state["architecture"]
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
    target_encoder_ddp = target_encoder
    if optimizer_reid is not None:
        target_encoder_ddp = reid.wrap_ddp(target_encoder, device)

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
        lr = args.lr * linear_decay_multiplier(epoch, args.epochs_constant, args.epochs_decay)
        for optimizer in (optimizer_g, optimizer_d):
            for group in optimizer.param_groups:
                group["lr"] = lr
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
                terms.update(
                    epoch=epoch,
                    iteration=iteration,
                    step=global_step,
                    lr=optimizer_g.param_groups[0]["lr"],
                    seconds=time.perf_counter() - tic,
                )
                last_iteration = iteration == args.iters - 1
                if (args.sample_every and global_step % args.sample_every == 0) or last_iteration:
                    n = min(args.sample_count, len(real_source))
                    sample_path = out_dir / "samples" / f"epoch{epoch + 1:03d}_step{global_step:07d}.png"
                    save_sample_grid(
                        sample_path, real_source[:n], images["fake_target"][:n], images["cycled_source"][:n]
                    )
                    generator = reid.unwrap_ddp(generators).source_to_target
                    translated01 = translate_images(generator, probe_images, autocast)
                    fidelity = identity_fidelity(probe01, translated01.cpu(), probe_pids)
                    fidelity["style_gap"] = style_gap(probe01, translated01.cpu(), probe_target01)
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
    architecture = state["architecture"]
    generator = ResnetGenerator(architecture["ngf"], architecture["n_blocks"], architecture.get("input_skip", False))
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
        for leftover in folder.glob(".*.tmp*"):  # temp files of an interrupted run
            leftover.unlink()
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
    loader = DataLoader(
        reid.ImageDataset(todo, reid.build_test_transform(architecture["height"], architecture["width"])),
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.workers,
    )
    autocast = reid.autocast_context(device, args.amp)
    with reid.progress(total=len(todo), desc="translate") as progress:
        for images, _, _, indices in loader:
            with autocast:
                translated = generator(images.to(device))
            pixels = (denormalise_imagenet(translated.float()) * 255).round().to(torch.uint8).cpu()
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
    transform = reid.build_test_transform(args.height, args.width)
    source01, translated01 = [
        denormalise_imagenet(torch.stack([reid.ImageDataset(chosen, transform)[i][0] for i in range(len(chosen))]))
        for chosen in (items, translated_items)
    ]
    result = identity_fidelity(source01, translated01, torch.tensor([pid for _, pid, _ in items]))
    target_items = datasets.target  # the style gap's target images; none with --target none
    if target_items:
        target01 = torch.stack([reid.ImageDataset(target_items, transform)[i][0] for i in range(len(target_items))])
        result["style_gap"] = style_gap(source01, translated01, denormalise_imagenet(target01))
    result = {"translated": str(translated_dir), "images": len(items), **result}
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
        # the discriminator depth follows the width (--d-layers 0): 1 layer, 16-px patches at 48. Measured (seed 1,
        # 300 iterations, identity_fidelity / style_gap on the whole source set): 3 layers 0.41 drift, style gap
        # 1.63; 1 layer 0.42, 1.29.
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
        help="the SDA paper's online variant: E_t is also trained every iteration on the translated images "
        "with the source labels (label-smoothed CE + softmax triplet + lambda-relation * relation term; BN "
        "statistics frozen). Default off = the official release: both encoders frozen, which is what "
        "produced the reported numbers (61.0 -> 71.2 mAP) and costs one encoder backward less per step",
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
        help="generators edit their input (sigmoid(logit(x) + net(x))) and start as the identity map; not in "
        "the release (ResnetGenerator)",
    )
    t.add_argument(
        "--d-layers",
        type=int,
        default=0,
        help="PatchGAN discriminator depth; 0 = scaled to the image: the deepest whose receptive field is at most "
        "55%% of the width, the release's 70 px at 128 (3 layers at width 128, 2 at 64, 1 at 48)",
    )
    t.add_argument("--lambda-cycle", type=float, default=10.0, help="cycle-consistency L1 weight")
    t.add_argument("--lambda-identity", type=float, default=5.0, help="identity L1 weight (CycleGAN's 0.5 x 10)")
    t.add_argument("--pool-size", type=int, default=50, help="image history per discriminator (0 = off)")
    t.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of generators and discriminators")
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
    if args.command == "train":
        train(args)
    elif args.command == "translate":
        translate(args)
    else:
        measure_fidelity(args)


if __name__ == "__main__":
    reid.run_cli(lambda: main(sys.argv[1:]))
