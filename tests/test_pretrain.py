"""Tests of pretrain.py: backbones, GeM, sampler, readers, weights loading, losses, resume and DDP.

References are written here from the definitions (IBN-Net placement, the release's sampler rule in
docs/differences.md#p-x-k-sampler, the loss formulas of docs/differences.md#losses), not from pretrain.py.
"""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pretrain  # noqa: E402
import reid  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# backbones


def _ibn_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.InstanceNorm2d)}


@pytest.mark.parametrize(
    "arch, dim, stride",
    [
        ("resnet18", 512, 16),
        ("resnet18_ibn", 512, 16),
        ("resnet50", 2048, 16),
        ("resnet50_ibn", 2048, 16),
        ("densenet169_ibn", 1664, 32),
        ("resnest50", 2048, 32),
    ],
)
def test_backbone_forward_backward_dim_and_stride(arch, dim, stride):
    torch.manual_seed(0)
    model = reid.build_model(arch, num_classes=7)
    model.train()
    x = torch.randn(2, 3, 64, 32)
    f_pool, f_bn, logits = model(x)
    assert f_pool.shape == (2, dim) and f_bn.shape == (2, dim) and logits.shape == (2, 7)
    assert model.feature_dim == dim
    feature_map = model.backbone(x)
    assert feature_map.shape[1:] == (dim, 64 // stride, 32 // stride)
    (logits.square().sum() + f_pool.sum()).backward()
    assert model.pool.p.grad is not None and torch.isfinite(model.pool.p.grad).all() and model.pool.p.grad.abs() > 0
    assert model.bnneck.bias.grad is None  # BNNeck bias frozen
    model.eval()
    assert model(x).shape == (2, dim)


@pytest.mark.parametrize("arch, blocks", [("resnet101_ibn", [3, 4, 23, 3]), ("resnext101_ibn", [3, 4, 23, 3])])
def test_deep_ibn_resnets_structure(arch, blocks):
    model = reid.build_model(arch, num_classes=0)
    trunk = model.backbone
    assert [len(getattr(trunk, f"layer{i}")) for i in range(1, 5)] == blocks
    # IBN-a: bn1 of every block of stages 1-3 holds IN on the first half of the channels; none in stage 4
    for stage in (1, 2, 3):
        for block in getattr(trunk, f"layer{stage}"):
            planes = block.conv1.out_channels
            assert isinstance(block.bn1.IN, torch.nn.InstanceNorm2d) and block.bn1.IN.affine
            assert block.bn1.IN.num_features == planes // 2 and block.bn1.BN.num_features == planes - planes // 2
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in trunk.layer4.modules())
    assert len(_ibn_modules(model)) == sum(blocks[:3])
    # last stride 1
    assert trunk.layer4[0].conv2.stride == (1, 1) and trunk.layer4[0].downsample[0].stride == (1, 1)
    if arch == "resnext101_ibn":
        assert trunk.layer1[0].conv2.groups == 32 and trunk.layer1[0].conv2.out_channels == 128  # 32x4d
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 32)).shape == (1, 2048)


def test_resnet18_ibn_placement():
    """IBN-a on basic blocks (IBN-Net's resnet18_ibn_a): bn1 of both blocks of stages 1-3 is IN (affine) on the
    first half of the channels and BN on the rest; stage 4, the stem and every bn2 stay BatchNorm; same
    parameter shapes as resnet18 elsewhere, so only the bn1 of stages 1-3 differ from a resnet18 state dict."""
    model = reid.build_model("resnet18_ibn", num_classes=0)
    trunk = model.backbone
    expected = sorted(f"backbone.layer{s}.{b}.bn1.IN" for s in (1, 2, 3) for b in (0, 1))
    assert sorted(_ibn_modules(model)) == expected
    for stage, planes in ((1, 64), (2, 128), (3, 256)):
        for block in getattr(trunk, f"layer{stage}"):
            assert block.bn1.IN.num_features == planes // 2 and block.bn1.IN.affine
            assert block.bn1.BN.num_features == planes - planes // 2
            assert isinstance(block.bn2, torch.nn.BatchNorm2d)
    assert isinstance(trunk.bn1, torch.nn.BatchNorm2d)
    assert all(isinstance(block.bn1, torch.nn.BatchNorm2d) for block in trunk.layer4)
    assert trunk.layer4[0].conv1.stride == (1, 1)  # last stride 1, as every re-ID trunk here
    plain = reid.build_model("resnet18", num_classes=0).state_dict()
    ibn = model.state_dict()
    differing = (set(plain) ^ set(ibn)) | {k for k in set(plain) & set(ibn) if plain[k].shape != ibn[k].shape}
    assert differing and all(k.split(".")[1] in ("layer1", "layer2", "layer3") and ".bn1." in k for k in differing)
    # the IN half normalises each image on its own: scaling one image of a batch does not change the IN output
    block = trunk.layer1[0].bn1.eval()
    x = torch.randn(2, 64, 8, 4)
    scaled = x.clone()
    scaled[1] *= 3.0
    torch.testing.assert_close(block(x)[:, :32], block(scaled)[:, :32], rtol=1e-4, atol=1e-4)


def test_resnet50_ibn_placement_and_stem():
    model = reid.build_model("resnet50_ibn", num_classes=0)
    names = sorted(_ibn_modules(model))
    expected = sorted(f"backbone.layer{s}.{b}.bn1.IN" for s, n in ((1, 3), (2, 4), (3, 6)) for b in range(n))
    assert names == expected
    assert isinstance(model.backbone.bn1, torch.nn.BatchNorm2d)


def test_densenet_ibn_placement():
    model = reid.build_model("densenet169_ibn", num_classes=0)
    features = model.backbone.features
    for block_index, size in ((1, 6), (2, 12), (3, 32), (4, 32)):
        layers = list(getattr(features, f"denseblock{block_index}").children())
        assert len(layers) == size
        for index, layer in enumerate(layers):
            has_ibn = hasattr(layer.norm1, "IN")
            assert has_ibn == (block_index <= 3 and index % 3 == 0), (block_index, index)
            if has_ibn:  # BN on the first 60 %, IN (affine) on the remaining 40 %
                channels = layer.conv1.in_channels
                assert layer.norm1.BN.num_features == int(channels * 0.6)
                assert layer.norm1.IN.num_features == channels - int(channels * 0.6)


def test_resnest_split_attention_shapes_and_radix_softmax():
    torch.manual_seed(0)
    conv = reid.SplitAttentionConv(16, 8, radix=2)
    conv.eval()
    x = torch.randn(3, 16, 6, 4)
    out = conv(x)
    assert out.shape == (3, 8, 6, 4)
    # reference: attention over the two branches from the pooled sum, softmax across radix
    branches = torch.relu(conv.bn0(conv.conv(x)))
    a, b = branches[:, :8], branches[:, 8:]
    gap = (a + b).mean((2, 3), keepdim=True)
    logits = conv.fc2(torch.relu(conv.bn1(conv.fc1(gap))))
    weights = torch.softmax(torch.stack([logits[:, :8], logits[:, 8:]], 0), 0)
    torch.testing.assert_close(out, weights[0] * a + weights[1] * b)


def test_unknown_arch_names_choices():
    with pytest.raises(ValueError, match="unknown --arch 'resnet9'"):
        reid.build_model("resnet9", 2)


# ---------------------------------------------------------------------------------------------
# ImageNet weights


def test_pretrained_loads_torchvision_format_and_rejects_mismatch(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-test.pth"
    torch.save(reference.state_dict(), path)
    model = reid.build_model("resnet18", num_classes=3, pretrained=str(path))
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            torch.testing.assert_close(model.backbone.state_dict()[key], value)
    # a ResNet-50 file into a ResNet-18 trunk: refused with the shapes named
    other = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), other)
    with pytest.raises(ValueError, match="shapes do not match resnet18"):
        reid.build_model("resnet18", num_classes=3, pretrained=str(other))
    with pytest.raises(FileNotFoundError, match="no such file"):
        reid.build_model("resnet18", num_classes=3, pretrained=str(tmp_path / "absent.pth"))


def test_pretrained_from_a_pretrain_checkpoint_loads_only_the_trunk(tmp_path):
    torch.manual_seed(0)
    trained = reid.build_model("resnet18", num_classes=5)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(torch.randn_like(parameter))
        for buffer in trained.buffers():
            if buffer.is_floating_point():
                buffer.add_(torch.rand_like(buffer))
    path = tmp_path / "model_best.pth"
    reid.save_checkpoint({"state_dict": trained.state_dict(), "arch": "resnet18", "num_classes": 5}, path, "pretrain")
    fresh = reid.ReIDModel("resnet18", num_classes=7)
    model = reid.build_model("resnet18", num_classes=7, pretrained=str(path))
    for key, value in trained.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)  # trunk: the checkpoint's
    # GeM exponent, BNNeck and the (differently sized) classifier start afresh, as after ImageNet weights
    torch.testing.assert_close(model.pool.p, fresh.pool.p)
    torch.testing.assert_close(model.bnneck.running_var, fresh.bnneck.running_var)
    assert model.classifier.weight.shape == (7, trained.feature_dim)
    # a DDP-saved state dict ("module." prefix) works too; another architecture is refused by name
    ddp = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, ddp)
    torch.testing.assert_close(
        reid.build_model("resnet18", 3, pretrained=str(ddp)).backbone.conv1.weight, trained.backbone.conv1.weight
    )
    with pytest.raises(ValueError, match="a resnet18 checkpoint, not resnet50"):
        reid.build_model("resnet50", num_classes=3, pretrained=str(path))


def test_pretrained_imagenet_needs_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        reid.build_model("resnet50_ibn", num_classes=0, pretrained="imagenet")
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), cache / "resnet18-f37072fd.pth")
    reid.build_model("resnet18", num_classes=0, pretrained="imagenet")


def test_densenet_old_torchvision_key_names_are_converted():
    state = {"features.denseblock1.denselayer1.norm.1.weight": torch.ones(1), "classifier.weight": torch.ones(1)}
    converted = reid._convert_release_keys(state)
    assert list(converted) == ["features.denseblock1.denselayer1.norm1.weight"]


# ---------------------------------------------------------------------------------------------
# sampler


def _sampler_items(rng: np.random.Generator) -> list[tuple[str, int, int]]:
    items = []
    for pid in range(12):
        n = int(rng.integers(1, 9))
        cams = rng.integers(0, 1 if pid == 3 else 4, n)  # pid 3: a single camera
        items += [(f"img_{pid}_{i}.jpg", pid, int(c)) for i, c in enumerate(cams)]
    return items


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identity_sampler_pk_and_camera_rule(seed):
    rng = np.random.default_rng(seed)
    items = _sampler_items(rng)
    k = 4
    sampler = reid.RandomIdentitySampler(items, num_instances=k, seed=seed)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 12 * k
    by_pid = defaultdict(list)
    for index, (_, pid, cam) in enumerate(items):
        by_pid[pid].append((index, cam))
    seen = set()
    for start in range(0, len(indices), k):
        group = indices[start : start + k]
        pids = {items[i][1] for i in group}
        assert len(pids) == 1, "each group of K holds one identity"
        pid = pids.pop()
        seen.add(pid)
        anchor_cam = items[group[0]][2]
        other_cam = [i for i, c in by_pid[pid] if c != anchor_cam]
        rest = group[1:]
        if other_cam:
            assert all(items[i][2] != anchor_cam for i in rest), "rest must come from other cameras"
            if len(other_cam) >= k:
                assert len(set(rest)) == len(rest), "without replacement when at least K candidates"
        elif len(by_pid[pid]) > 1:
            assert group[0] not in rest or len(by_pid[pid]) - 1 < k - 1
    assert seen == set(range(12))
    # deterministic per (seed, epoch), different across epochs
    assert list(sampler) == indices
    sampler.set_epoch(1)
    assert list(sampler) != indices


def test_identity_sampler_shards_whole_groups_and_resumes(monkeypatch):
    items = [(f"{p}_{i}.jpg", p, i % 3) for p in range(10) for i in range(6)]
    full = reid.RandomIdentitySampler(items, 4, seed=5, num_samples=None)
    monkeypatch.setattr(reid, "rank_and_world_size", lambda: (1, 2))
    shard = reid.RandomIdentitySampler(items, 4, seed=5)
    shard_indices = list(shard)
    groups = [list(full)[i : i + 4] for i in range(0, 40, 4)]
    assert shard_indices == [i for g in groups[1::2] for i in g]
    # a stream of fixed length that skips its first samples continues exactly where it stopped
    stream = reid.RandomIdentitySampler(items, 4, seed=5, num_samples=100, seed_samples=True)
    stream.set_epoch(3)
    whole = list(stream)
    stream.set_epoch(3, skip=36)
    assert list(stream) == whole[36:]
    assert len(whole) == 100 and all(isinstance(k, tuple) for k in whole)


# ---------------------------------------------------------------------------------------------
# readers


def _jpeg(path: Path, color=(120, 30, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), color).save(path)


def _visda_tree(root: Path) -> None:
    for name in ("0005_c1s1_000010_00.jpg", "0005_c3s1_000020_00.jpg", "0002_c6s1_000030_00.jpg"):
        _jpeg(root / "personX" / "image_train" / name)
    (root / "target_training" / "image_train").mkdir(parents=True)
    lines = []
    for i, cam in enumerate([1, 2, 4, 5, 6, 6]):
        _jpeg(root / "target_training" / "image_train" / f"{i:05d}.jpg")
        lines.append(f"{i:05d}.jpg {cam}")
    (root / "target_training" / "label_target_training.txt").write_text("\n".join(lines) + "\n")
    _jpeg(root / "target_validation" / "image_query" / "0077_c5s1_003471_01.jpg")
    _jpeg(root / "target_validation" / "image_gallery" / "0000_c1s1_000001_01.jpg")
    _jpeg(root / "target_validation" / "image_gallery" / "0077_c2s1_000002_01.jpg")
    (root / "index_validation_query.txt").write_text("0077_c5s1_003471_01.jpg 5 077 0000\n")
    (root / "index_validation_gallery.txt").write_text(
        "0077_c2s1_000002_01.jpg 2 077 0000\n0000_c1s1_000001_01.jpg 1 000 0001\n"
    )
    _jpeg(root / "target_test" / "image_query" / "0000.jpg")
    _jpeg(root / "target_test" / "image_gallery" / "0000.jpg")
    (root / "index_test_query.txt").write_text("0000.jpg  0000\n")
    (root / "index_test_gallery.txt").write_text("0000.jpg  0000\n")


def test_visda_readers(tmp_path):
    root = tmp_path / "x2_c9"  # a parent folder that looks like a re-ID name must not matter
    _visda_tree(root)
    source = reid.read_dataset("personx", root)
    assert [Path(p).name for p, _, _ in source.train][0] == "0002_c6s1_000030_00.jpg"
    assert [(pid, cam) for _, pid, cam in source.train] == [(0, 5), (1, 0), (1, 2)]
    assert source.num_train_pids == 2 and all(Path(p).is_absolute() for p, _, _ in source.train)
    target = reid.read_dataset("target_train", root)
    assert [cam for _, _, cam in target.train] == [0, 1, 2, 3, 4, 4] and {p for _, p, _ in target.train} == {0}
    val = reid.read_dataset("target_val", root)
    assert [(pid, cam) for _, pid, cam in val.query] == [(77, 3)]
    assert [(pid, cam) for _, pid, cam in val.gallery] == [(77, 1), (0, 0)]  # index-file order
    test = reid.read_dataset("target_test", root)
    assert len(test.query) == 1 and len(test.gallery) == 1


def test_visda_reader_errors(tmp_path):
    root = tmp_path / "data"
    _visda_tree(root)
    with pytest.raises(FileNotFoundError, match="personX_sda/image_train"):
        reid.read_dataset("personx_sda", root)
    (root / "index_validation_query.txt").unlink()
    with pytest.raises(FileNotFoundError, match="index_validation_query.txt"):
        reid.read_dataset("target_val", root)
    label_file = root / "target_training" / "label_target_training.txt"
    label_file.write_text("00000.jpg 3\n")
    with pytest.raises(ValueError, match="label_target_training.txt:1"):
        reid.read_dataset("target_train", root)
    _jpeg(root / "personX" / "image_train" / "badname.jpg")
    with pytest.raises(ValueError, match="badname.jpg"):
        reid.read_dataset("personx", root)
    with pytest.raises(ValueError, match="unknown dataset 'visda'"):
        reid.read_dataset("visda", root)
    with pytest.raises(FileNotFoundError, match="missing folder"):
        reid.read_dataset("personx", tmp_path / "nowhere")


def test_market_msmt_and_folder_readers(tmp_path):
    market = tmp_path / "market"
    for name in ("0002_c1s1_000451_03.jpg", "0007_c2s3_070952_01.jpg", "-1_c1s1_000001_00.jpg"):
        _jpeg(market / "bounding_box_train" / name)
    _jpeg(market / "query" / "0003_c1s1_000001_00.jpg")
    for name in ("0003_c2s1_000002_00.jpg", "0000_c3s1_000003_00.jpg", "-1_c1s1_000004_00.jpg"):
        _jpeg(market / "bounding_box_test" / name)
    data = reid.read_dataset("market1501", market)
    assert [(pid, cam) for _, pid, cam in data.train] == [(0, 0), (1, 1)]  # junk (-1) dropped
    assert sorted((pid, cam) for _, pid, cam in data.gallery) == [(0, 2), (3, 1)]
    msmt = tmp_path / "msmt"
    _jpeg(msmt / "train" / "0000" / "0000_000_01_0303morning_0015_0.jpg")
    _jpeg(msmt / "train" / "0009" / "0009_000_07_0303morning_0016_0.jpg")
    _jpeg(msmt / "test" / "0100" / "0100_000_03_0303morning_0017_0.jpg")
    (msmt / "list_train.txt").write_text(
        "0000/0000_000_01_0303morning_0015_0.jpg 0\n0009/0009_000_07_0303morning_0016_0.jpg 9\n"
    )
    (msmt / "list_query.txt").write_text("0100/0100_000_03_0303morning_0017_0.jpg 100\n")
    (msmt / "list_gallery.txt").write_text("0100/0100_000_03_0303morning_0017_0.jpg 100\n")
    data = reid.read_dataset("msmt17", msmt)
    assert [(pid, cam) for _, pid, cam in data.train] == [(0, 0), (1, 6)]
    assert [(pid, cam) for _, pid, cam in data.query] == [(100, 2)]
    folder = reid.read_dataset("folder", market)
    assert len(folder.train) == 7


def test_corrupt_image_error_names_it_and_skip_option(tmp_path):
    good, bad = tmp_path / "0001_c1s1_0_0.jpg", tmp_path / "0001_c2s1_0_0.jpg"
    _jpeg(good)
    bad.write_bytes(b"not a jpeg at all")
    items = [(str(bad), 0, 1), (str(good), 0, 0)]
    dataset = reid.ImageDataset(items, reid.build_test_transform(16, 8))
    with pytest.raises(RuntimeError, match=str(bad)):
        dataset[0]
    skipping = reid.ImageDataset(items, reid.build_test_transform(16, 8), skip_bad_images=True)
    image, pid, cam, index = skipping[0]
    assert image.shape == (3, 16, 8) and index == 1 and skipping.bad_images == [str(bad)]


def test_seeded_samples_make_augmentation_repeatable(tmp_path):
    path = tmp_path / "0001_c1s1_0_0.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 16, 3), dtype=np.uint8)).save(path)
    dataset = reid.ImageDataset([(str(path), 0, 0)], reid.build_train_transform(32, 16, True, True))
    a, b, c = (reid.finish_images(dataset[key][0]) for key in [(0, 123), (0, 123), (0, 124)])
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def torchvision_train_chain(height, width, autoaugment, random_erasing):
    """The training augmentation as torchvision's transforms, one image at a time (the reference for TrainTransform)."""
    steps = [T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)] if autoaugment else []
    steps += [
        T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.Pad(reid.release_padding(width)),
        T.RandomCrop((height, width)),
        T.ToTensor(),
        T.Normalize(reid.IMAGENET_MEAN, reid.IMAGENET_STD),
    ]
    if random_erasing:
        steps.append(T.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=reid.IMAGENET_MEAN))
    return T.Compose(steps)


@pytest.mark.parametrize(
    "autoaugment, random_erasing, image_size, size",
    [
        (True, True, (40, 20), (32, 16)),
        (False, True, (40, 20), (32, 16)),
        (True, False, (40, 20), (32, 16)),
        (False, False, (128, 64), (96, 48)),  # the demo's sizes: 5 px of padding
        (True, True, (90, 47), (96, 48)),  # enlarged, odd sizes
        (False, False, (96, 48), (96, 48)),  # already the input size: no resampling
    ],
)
def test_batched_augmentation_equals_torchvision_per_image(autoaugment, random_erasing, image_size, size):
    """TrainTransform draws the same random numbers as torchvision's chain and finishes a whole batch at once: the
    batch must equal the chain applied image by image, bit for bit, erased boxes included."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,))))
    images = [Image.fromarray(rng.integers(0, 256, (*image_size, 3), dtype=np.uint8)) for _ in range(24)]
    ours = reid.build_train_transform(*size, autoaugment, random_erasing)
    reference = torchvision_train_chain(*size, autoaugment, random_erasing)
    prepared, expected, own_generator = [], [], []
    for n, image in enumerate(images):
        torch.manual_seed(n)
        random.seed(n)
        prepared.append(ours(image))
        torch.manual_seed(n)
        random.seed(n)
        expected.append(reference(image))
        state = torch.get_rng_state()
        own_generator.append(ours(image, torch.Generator().manual_seed(n)))  # ImageDataset's seeded samples
        assert torch.equal(torch.get_rng_state(), state)  # the global generator is not touched
    for a, b in zip(prepared, own_generator, strict=True):
        assert torch.equal(a.pixels, b.pixels) and torch.equal(a.erase_box, b.erase_box)
    batch = reid.collate_training_batch([(p, n) for n, p in enumerate(prepared)])
    assert torch.equal(batch[0], torch.stack(expected)) and batch[1].tolist() == list(range(24))
    assert torch.equal(reid.finish_images(prepared[3]), expected[3])  # a single sample too
    erased = sum(int(p.erase_box[2] > 0) for p in prepared)
    assert (0 < erased < 24) if random_erasing else erased == 0  # both kinds of sample in the batch


def write_images(folder, count: int, size=(40, 20)) -> list:
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,))))
    items = []
    for n in range(count):
        items.append((str(folder / f"{n // 4:04d}_c{1 + n % 2}s1_{n}_0.png"), n // 4, 1 + n % 2))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(items[-1][0])
    return items


def test_seeded_loader_batches_leave_global_rngs_as_a_plain_loader_does(tmp_path):
    """Seeded TrainTransform samples draw from generators of their own: two epochs of make_loader batches advance
    the global generators exactly as a DataLoader that only draws its base seed does, and repeat exactly."""
    items = write_images(tmp_path, 12)
    dataset = reid.ImageDataset(items, reid.build_train_transform(32, 16, True, True), cache=reid.DecodedImageCache(1))
    sampler = reid.SeededRandomSampler(len(items), 7, 20, True)
    loader = reid.make_loader(dataset, sampler, 4, 0)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        torch_state, python_state = torch.get_rng_state(), random.getstate()
        first = list(loader)
        assert random.getstate() == python_state
        after = torch.get_rng_state()
        torch.set_rng_state(torch_state)
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed
        assert torch.equal(torch.get_rng_state(), after)
        again = list(loader)
        assert len(first) == len(again) == 5
        for a, b in zip(first, again, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_test_loader_batches_equal_the_per_image_test_transform(tmp_path):
    """make_test_loader finishes whole batches (and may read decoded images from a cache): the same tensors as
    build_test_transform applied to each image, in item order."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,))))
    items = []
    for n in range(7):
        items.append((str(tmp_path / f"{n:04d}_c1s1_0_0.png"), n, 1))
        Image.fromarray(rng.integers(0, 256, (37, 19, 3), dtype=np.uint8)).save(items[-1][0])
    reference = reid.build_test_transform(32, 16)
    expected = []
    for path, _, _ in items:
        with Image.open(path) as image:
            expected.append(reference(image.convert("RGB")))
    cache = reid.DecodedImageCache(1)
    for _ in range(2):  # the second pass reads the cache
        batches = list(reid.make_test_loader(items, 32, 16, batch_size=3, workers=0, cache=cache))
        assert torch.equal(torch.cat([b[0] for b in batches]), torch.stack(expected))
        assert torch.cat([b[1] for b in batches]).tolist() == list(range(7))
    assert len(cache.images) == 7


def test_seeded_samples_leave_accelerator_generators_alone(tmp_path, monkeypatch):
    """A per-sample seed seeds the CPU generator only: reseeding CUDA's on every sample would change a GPU run's
    random stream (dropout, erasing on the device) whenever loading runs in the training process."""
    path = tmp_path / "0001_c1s1_0_0.jpg"
    Image.fromarray(np.zeros((32, 16, 3), dtype=np.uint8)).save(path)
    dataset = reid.ImageDataset([(str(path), 0, 0)], reid.build_train_transform(32, 16, True, True))

    def refuse(*_):
        raise AssertionError("an accelerator generator was seeded")

    for module in (torch.cuda, torch.xpu, torch.mtia):
        monkeypatch.setattr(module, "manual_seed_all", refuse)
    dataset[(0, 5)]


def test_decoded_image_cache_keeps_images_up_to_its_capacity(tmp_path):
    paths = []
    for n in range(3):
        paths.append(tmp_path / f"000{n}_c1s1_0_0.png")
        Image.fromarray(np.full((8, 4, 3), 40 * n, dtype=np.uint8)).save(paths[-1])
    items = [(str(p), 0, 0) for p in paths]
    cache = reid.DecodedImageCache(2 * 8 * 4 * 3 / 2**20)  # room for exactly two of the images
    dataset = reid.ImageDataset(items, reid.build_test_transform(8, 4), cache=cache)
    first = [dataset[n][0] for n in range(3)]
    assert sorted(cache.images) == [str(paths[0]), str(paths[1])] and cache.used == 2 * 8 * 4 * 3
    for path in paths:
        path.unlink()
    for n in range(2):  # served from memory, and the same pixels
        assert torch.equal(dataset[n][0], first[n])
    with pytest.raises(RuntimeError, match="cannot read image"):  # the third did not fit: read again, and gone
        dataset[2]


@pytest.mark.parametrize("width, pad", [(128, 10), (64, 5), (32, 2), (8, 1)])
def test_crop_padding_scales_with_width_and_bounds_the_black_band(width, pad):
    assert reid.release_padding(width) == pad
    height = 2 * width
    white = Image.new("RGB", (width, height), (255, 255, 255))
    transform = reid.build_train_transform(height, width, autoaugment=False, random_erasing=False)
    black = -torch.tensor(reid.IMAGENET_MEAN) / torch.tensor(reid.IMAGENET_STD)  # a padded pixel, normalised
    widest = 0
    for seed in range(60):
        torch.manual_seed(seed)
        tensor = reid.finish_images(transform(white))
        column_is_black = torch.isclose(tensor, black[:, None, None], atol=1e-4).all(dim=0).all(dim=0)
        left = int(column_is_black.int().cumprod(0).sum())
        right = int(column_is_black.flip(0).int().cumprod(0).sum())
        widest = max(widest, left, right)
    assert widest == pad  # the crop may shift by up to `pad` on either side, never more


# ---------------------------------------------------------------------------------------------
# losses


def test_label_smoothed_ce_formula():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    q = torch.full((5, 7), 0.1 / 7)
    q[torch.arange(5), targets] += 0.9
    expected = -(q * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(reid.label_smoothed_ce(logits, targets, 0.1), expected)


def test_softmax_triplet_and_soft_triplet_against_loops():
    torch.manual_seed(1)
    features, reference = torch.randn(8, 5), torch.randn(8, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    d = torch.cdist(features.double(), features.double())
    dr = torch.cdist(reference.double(), reference.double())
    hard, soft = [], []
    for i in range(8):
        pos = [j for j in range(8) if labels[j] == labels[i]]
        neg = [j for j in range(8) if labels[j] != labels[i]]
        p = max(pos, key=lambda j: d[i, j])
        n = min(neg, key=lambda j: d[i, j])
        hard.append(-torch.log(torch.exp(d[i, n]) / (torch.exp(d[i, p]) + torch.exp(d[i, n]))))
        target = torch.softmax(torch.stack([dr[i, p], dr[i, n]]), 0)
        soft.append(-(target * torch.log_softmax(torch.stack([d[i, p], d[i, n]]), 0)).sum())
    torch.testing.assert_close(
        reid.softmax_triplet_loss(features, labels).double(), torch.stack(hard).mean(), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        reid.soft_triplet_loss(features, labels, reference).double(), torch.stack(soft).mean(), atol=1e-4, rtol=1e-4
    )


def test_lr_schedule_matches_release_table():
    factors = [reid.lr_factor(e, 10, [40, 70]) for e in (0, 1, 9, 10, 39, 40, 69, 70, 119)]
    np.testing.assert_allclose(factors, [0.01, 0.109, 0.901, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# training runs on the tiny generated benchmark


def _train_args(data_root: Path, logs: Path, *extra: str) -> list[str]:
    return [
        "--data-root", str(data_root), "--source", "personx", "--logs-dir", str(logs), "--arch", "resnet18",
        "--height", "32", "--width", "16", "--batch-size", "8", "--num-instances", "4", "--epochs", "2",
        "--iters", "3", "--eval-every", "2", "--warmup-epochs", "1", "--milestones", "1", "--workers", "0",
        "--threads", "1", "--seed", "3", *extra,
    ]  # fmt: skip


def _losses(log: Path) -> list[tuple[int, int, float]]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [(r["epoch"], r["iteration"], r["loss"]) for r in records if "iteration" in r and "loss" in r]


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tiny_data_root, tmp_path):
    straight = tmp_path / "straight"
    finished = pretrain.main(_train_args(tiny_data_root, straight))
    interrupted = tmp_path / "interrupted"
    stopped = pretrain.main(_train_args(tiny_data_root, interrupted, "--max-iters", "4"))  # mid-epoch 2
    assert stopped["stopped"] and (interrupted / "checkpoint.pth").is_file()
    pretrain.main(_train_args(tiny_data_root, interrupted, "--resume"))
    reference, resumed = _losses(straight / "log.jsonl"), _losses(interrupted / "log.jsonl")
    assert [r[:2] for r in resumed] == [r[:2] for r in reference] == [(e, i) for e in range(2) for i in range(3)]
    np.testing.assert_allclose([r[2] for r in resumed], [r[2] for r in reference], rtol=1e-5)
    # a worker process (persistent across epochs) loads the same augmented images as the main process
    with_worker = tmp_path / "with_worker"
    pretrain.main(_train_args(tiny_data_root, with_worker, "--workers", "1"))
    np.testing.assert_allclose([r[2] for r in _losses(with_worker / "log.jsonl")], [r[2] for r in reference], rtol=1e-5)
    # resuming a finished run (e.g. its calibration job was killed after the last epoch) trains nothing and reports
    # the same last evaluation as the run that finished, in its return value and its "done" record
    again = pretrain.main(_train_args(tiny_data_root, straight, "--resume"))
    assert finished["last"] is not None and again["last"] == finished["last"]
    done = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines() if '"done"' in line]
    assert done[-1]["last"] == finished["last"] and _losses(straight / "log.jsonl") == reference
    num_classes = reid.read_checkpoint(straight / "model_best.pth")["num_classes"]
    model, best = reid.load_model(straight / "model_best.pth", kinds=("pretrain",), num_classes=num_classes)
    assert best["kind"] == "pretrain" and best["arch"] == "resnet18" and best["feature_dim"] == 512
    assert torch.equal(model.classifier.weight, best["state_dict"]["classifier.weight"])


def test_target_labels_upper_bound_reads_diagnostics(tiny_data_root, tmp_path):
    summary = pretrain.main(
        _train_args(
            tiny_data_root, tmp_path / "ub", "--target-labels-upper-bound", "--epochs", "1", "--eval-every", "1"
        )
    )
    assert summary["best_epoch"] == 1
    start = json.loads((tmp_path / "ub" / "log.jsonl").read_text().splitlines()[0])
    assert start["target_images"] == 0
    truth = reid.read_diagnostic_identities(tiny_data_root)
    counts = collections.Counter(truth.values())
    several = [name for name, pid in truth.items() if counts[pid] > 1]
    assert min(counts.values()) == 1, "the tiny benchmark has one-image passers-by"
    assert start["num_classes"] == len({truth[name] for name in several}) > 1
    assert start["source_images"] == len(several)


def test_batch_size_is_global_and_split_into_whole_identities(monkeypatch):
    monkeypatch.setattr(reid, "rank_and_world_size", lambda: (1, 2))
    assert reid.split_global_batch(16, 4) == 8
    with pytest.raises(SystemExit, match="--batch-size 12 is not divisible by 4 instances x 2 processes"):
        reid.split_global_batch(12, 4)  # 6 images per process: not whole identities of 4
    assert reid.split_global_batch(6) == 3
    with pytest.raises(SystemExit, match="--batch-size 7 is not divisible by 2 processes"):
        reid.split_global_batch(7)
    monkeypatch.setattr(reid, "rank_and_world_size", lambda: (0, 1))
    assert reid.split_global_batch(12, 4) == 12


def test_torchrun_two_processes(tiny_data_root, tmp_path):
    logs = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",  # a free port: a fixed one can collide with other runs
        str(ROOT / "pretrain.py"),
        *_train_args(tiny_data_root, logs, "--epochs", "1", "--eval-every", "1", "--batch-size", "16"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    start = json.loads((logs / "log.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["bn_batch_source"] == 8  # --batch-size 16: all processes together
    assert (logs / "model_best.pth").is_file()


def test_seeded_samples_leave_the_global_random_state_alone(tiny_data_root):
    """With 0 workers the dataset runs in the training process: a per-sample seed must not reseed its generators."""
    items = reid.read_dataset("personx", tiny_data_root).train[:3]
    transform = reid.build_train_transform(32, 16, autoaugment=True, random_erasing=True)
    dataset = reid.ImageDataset(items, transform)
    random.seed(11)
    torch.manual_seed(12)
    expected = (random.random(), torch.rand(4))
    random.seed(11)
    torch.manual_seed(12)
    image = reid.finish_images(dataset[(1, 1234)][0])
    after = (random.random(), torch.rand(4))
    assert after[0] == expected[0] and torch.equal(after[1], expected[1])
    # the sample is what the definition says: the transform drawn after seeding both generators with the seed
    random.seed(1234)
    torch.manual_seed(1234)
    with Image.open(items[1][0]) as original:
        reference = reid.finish_images(transform(original.convert("RGB")))
    assert torch.equal(image, reference)
    assert not torch.equal(reid.finish_images(dataset[(1, 1235)][0]), reference)  # another seed, another augmentation


def test_partial_imagenet_weights_are_refused_unless_allowed(tmp_path):
    """Plain ResNet-50 weights into resnet50_ibn leave the IBN InstanceNorm tensors at their defaults: an error that
    lists them, unless --allow-partial-weights."""
    path = tmp_path / "resnet50-plain.pth"
    reference = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(reference, path)
    expected_missing = sorted(set(reid.ReIDModel("resnet50_ibn", 0).backbone.state_dict()) - set(reference))
    expected_missing = [k for k in expected_missing if not k.endswith("num_batches_tracked")]
    assert expected_missing  # the IBN layers
    with pytest.raises(ValueError, match=f"{len(expected_missing)} of .* trunk tensors") as refused:
        reid.build_model("resnet50_ibn", num_classes=0, pretrained=str(path))
    assert expected_missing[0] in str(refused.value) and "--allow-partial-weights" in str(refused.value)
    model = reid.build_model("resnet50_ibn", num_classes=0, pretrained=str(path), allow_partial_weights=True)
    torch.testing.assert_close(model.backbone.state_dict()["conv1.weight"], reference["conv1.weight"])


def test_cached_autoaugment_equals_torchvision_for_every_image_size():
    """CachedAutoAugment keeps the magnitude bins per image size (TranslateX/Y depend on it) and may draw from a
    generator: on images of several sizes, seeded alike, its output equals torchvision's AutoAugment bit for bit."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,))))
    ours, reference = reid.CachedAutoAugment(), T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)
    sizes = [(40, 20), (64, 32), (37, 91), (40, 20), (128, 64), (23, 17)]
    for n in range(60):
        height, width = sizes[n % len(sizes)]
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        torch.manual_seed(n)
        expected = np.asarray(reference(image))
        torch.manual_seed(n)
        assert np.array_equal(np.asarray(ours(image)), expected)
        assert np.array_equal(np.asarray(ours(image, torch.Generator().manual_seed(n))), expected)
    assert len(ours._spaces) == len(set(sizes))
