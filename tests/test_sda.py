"""Tests of sda.py (stage I): networks, losses against independent references, the image pool, gradient
routing through a frozen encoder, and a tiny train -> resume -> translate run on the `tiny_data_root`
benchmark."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import reid
import sda

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


MEAN = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------------------------
# Independent references, written from the definitions (numpy, float64)
# ------------------------------------------------------------------------------------------------------------


def reference_soft_triplet(translated: np.ndarray, source: np.ndarray, pids: np.ndarray) -> float:
    """Relation consistency from its definition: for each anchor i, the hardest positive (largest distance,
    same pid, self allowed) and hardest negative (smallest distance, other pid) on the translated features;
    target = softmax(d_s(i, p), d_s(i, n)) on the source features, prediction = softmax(d_t(i, p), d_t(i, n));
    loss = mean_i of the cross-entropy."""
    losses = []
    for i in range(len(translated)):
        d_t = np.linalg.norm(translated[i] - translated, axis=1)
        d_s = np.linalg.norm(source[i] - source, axis=1)
        same = pids == pids[i]
        p = np.flatnonzero(same)[np.argmax(d_t[same])]
        n = np.flatnonzero(~same)[np.argmin(d_t[~same])]
        target = np.exp([d_s[p], d_s[n]]) / np.exp([d_s[p], d_s[n]]).sum()
        log_prediction = np.array([d_t[p], d_t[n]]) - np.log(np.exp([d_t[p], d_t[n]]).sum())
        losses.append(-(target * log_prediction).sum())
    return float(np.mean(losses))


def reference_relation_entropy(source: np.ndarray, translated: np.ndarray, pids: np.ndarray) -> float:
    """Entropy of the source relation targets, at the pairs mined on `translated` (the relation loss's
    minimum)."""
    entropies = []
    for i in range(len(source)):
        d_t = np.linalg.norm(translated[i] - translated, axis=1)
        d_s = np.linalg.norm(source[i] - source, axis=1)
        same = pids == pids[i]
        p = np.flatnonzero(same)[np.argmax(d_t[same])]
        n = np.flatnonzero(~same)[np.argmin(d_t[~same])]
        q = np.exp([d_s[p], d_s[n]]) / np.exp([d_s[p], d_s[n]]).sum()
        entropies.append(-(q * np.log(q)).sum())
    return float(np.mean(entropies))


class TinyEncoder(nn.Module):
    """A small deterministic stand-in for a re-ID encoder (conv + BN + pooled features), for loss formulas."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3))


def pk_pids(p: int, k: int) -> torch.Tensor:
    return torch.arange(p).repeat_interleave(k)


# ------------------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(64, 32), (128, 64), (96, 48)])
def test_generator_keeps_shape_and_outputs_normalised_unit_images(height, width):
    torch.manual_seed(0)
    generator = sda.ResnetGenerator(ngf=8, n_blocks=2)
    sda.init_weights_normal(generator)
    x = torch.randn(3, 3, height, width)
    y = generator(x)
    assert y.shape == x.shape
    # Sigmoid then ImageNet normalisation: de-normalised pixels lie in (0, 1) and are not all equal.
    pixels = y.detach().numpy() * STD + MEAN
    assert pixels.min() > 0 and pixels.max() < 1 and pixels.std() > 0
    # InstanceNorm layers carry no affine parameters and no running statistics.
    norms = [m for m in generator.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == 3 + 2 * 2 + 2 and all(not m.affine and not m.track_running_stats for m in norms)
    assert sum(isinstance(m, sda.ResidualBlock) for m in generator.modules()) == 2
    assert any(isinstance(m, nn.ReflectionPad2d) for m in generator.modules())


@pytest.mark.parametrize(("height", "width", "out_h", "out_w"), [(384, 128, 46, 14), (64, 32, 6, 2)])
def test_patch_discriminator_map_size(height, width, out_h, out_w):
    discriminator = sda.PatchDiscriminator(ndf=4)
    assert discriminator(torch.randn(2, 3, height, width)).shape == (2, 1, out_h, out_w)
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1] and convs[-1].out_channels == 1
    assert [c.out_channels for c in convs[:4]] == [4, 8, 16, 32]


@pytest.mark.parametrize("n_layers", [1, 3])
def test_patch_discriminator_without_norm_keeps_the_layout(n_layers):
    """--d-norm none drops the InstanceNorm layers and nothing else: same convolutions, same score map, same
    receptive field; an unknown norm is refused."""
    torch.manual_seed(0)
    plain = sda.PatchDiscriminator(ndf=4, n_layers=n_layers, norm="none")
    normed = sda.PatchDiscriminator(ndf=4, n_layers=n_layers)
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in normed.modules()) == n_layers
    conv_shapes = [[m.weight.shape for m in d.modules() if isinstance(m, nn.Conv2d)] for d in (plain, normed)]
    assert conv_shapes[0] == conv_shapes[1]
    x = torch.randn(2, 3, 96, 48)
    assert plain(x).shape == normed(x).shape
    # without the norm, the same weights compute conv -> LeakyReLU -> ... exactly (a reference built by hand)
    normed.load_state_dict(plain.state_dict())
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    reference = x
    for conv in convs[:-1]:
        reference = torch.nn.functional.leaky_relu(conv(reference), 0.2)
    torch.testing.assert_close(plain(x), convs[-1](reference))
    with pytest.raises(ValueError, match="norm"):
        sda.PatchDiscriminator(ndf=4, norm="batch")


def test_init_is_normal_002_with_zero_bias():
    torch.manual_seed(1)
    generator = sda.ResnetGenerator(ngf=32, n_blocks=3)
    sda.init_weights_normal(generator)
    weights = torch.cat([m.weight.flatten() for m in generator.modules() if isinstance(m, nn.Conv2d)])
    assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001
    assert all(m.bias.abs().max() == 0 for m in generator.modules() if isinstance(m, nn.Conv2d))


def test_bad_image_sizes_are_refused():
    with pytest.raises(ValueError, match="multiples of 4"):
        sda.check_image_size(130, 64)
    with pytest.raises(ValueError, match="24 pixels"):
        sda.check_image_size(64, 16)
    sda.check_image_size(384, 128)


# ------------------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------------------


def test_lsgan_and_discriminator_loss_match_formula():
    torch.manual_seed(2)
    prediction = torch.randn(4, 1, 6, 2)
    p = prediction.double().numpy()
    assert sda.lsgan_loss(prediction, True).item() == pytest.approx(((p - 1) ** 2).mean(), rel=1e-6)
    assert sda.lsgan_loss(prediction, False).item() == pytest.approx((p**2).mean(), rel=1e-6)

    discriminator = sda.PatchDiscriminator(ndf=4)
    sda.init_weights_normal(discriminator)
    real, fake = torch.randn(3, 3, 64, 32), torch.randn(5, 3, 64, 32)
    with torch.no_grad():
        d_real = discriminator(real).double().numpy()  # separate calls: stacking must not change anything
        d_fake = discriminator(fake).double().numpy()
        loss = sda.discriminator_loss(discriminator, real, fake).item()
    assert loss == pytest.approx(0.5 * (((d_real - 1) ** 2).mean() + (d_fake**2).mean()), rel=1e-5)


def test_linear_decay_multiplier_is_the_release_formula():
    values = [sda.linear_decay_multiplier(e, 50, 50) for e in range(100)]
    assert values[:50] == [1.0] * 50
    assert values[50] == pytest.approx(1 - 1 / 51) and values[99] == pytest.approx(1 / 51)
    assert np.allclose(np.diff(values[49:]), -1 / 51)
    assert sda.linear_decay_multiplier(0, 1, 0) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relation_loss_matches_independent_reference(seed):
    rng = np.random.default_rng(seed)
    pids = np.repeat(rng.permutation(5), 4)
    translated = rng.normal(size=(20, 7)).astype(np.float32)
    source = rng.normal(size=(20, 7)).astype(np.float32)
    loss = sda.relation_consistency_loss(torch.from_numpy(translated), torch.from_numpy(source), torch.from_numpy(pids))
    expected = reference_soft_triplet(translated.astype(np.float64), source.astype(np.float64), pids)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # Edge case: identities with a single image in the batch (the hardest positive is the anchor itself).
    pids_single = np.array([0, 1, 1, 2, 2, 2, 3])
    t, s = translated[:7], source[:7]
    loss = sda.relation_consistency_loss(torch.from_numpy(t), torch.from_numpy(s), torch.from_numpy(pids_single))
    assert loss.item() == pytest.approx(reference_soft_triplet(t.astype(float), s.astype(float), pids_single), rel=1e-4)


def test_relation_loss_is_minimal_when_translations_reproduce_source_relations():
    """A soft cross-entropy is not zero at its optimum: it equals the entropy of the target relations. So we
    test the KL form: loss - entropy(source relations) == 0 and the gradient w.r.t. the translated features
    vanishes when the translated features have exactly the source distances (here: a random rotation plus a
    shift of the source features), and the loss is larger than that entropy for features that do not reproduce
    the relations."""
    rng = np.random.default_rng(3)
    pids = torch.from_numpy(np.repeat(np.arange(4), 4))
    source = rng.normal(size=(16, 8))
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    same_relations = torch.tensor(source @ rotation + 3.0, dtype=torch.float64, requires_grad=True)
    loss = sda.relation_consistency_loss(same_relations, torch.from_numpy(source), pids)
    loss.backward()
    entropy = reference_relation_entropy(source, same_relations.detach().numpy(), pids.numpy())
    assert loss.item() - entropy == pytest.approx(0.0, abs=1e-6)
    assert same_relations.grad.abs().max().item() < 1e-6

    other = torch.tensor(rng.normal(size=(16, 8)), requires_grad=True)
    loss_other = sda.relation_consistency_loss(other, torch.from_numpy(source), pids)
    loss_other.backward()
    entropy_other = reference_relation_entropy(source, other.detach().numpy(), pids.numpy())
    assert loss_other.item() - entropy_other > 1e-3
    assert other.grad.abs().max().item() > 1e-4


def test_generator_objective_matches_separate_computation():
    """L_G = adversarial + 10 cycle + 5 identity + 1 relation, recomputed here with separate network calls."""
    torch.manual_seed(4)
    generators = sda.Generators(ngf=4, n_blocks=1)
    discriminators = sda.Discriminators(ndf=4)
    sda.init_weights_normal(generators)
    sda.init_weights_normal(discriminators)
    source_encoder, target_encoder = sda.freeze(TinyEncoder()), sda.freeze(TinyEncoder())
    sda.set_requires_grad(discriminators.parameters(), False)
    real_s, real_t, pids = torch.randn(8, 3, 64, 32), torch.randn(6, 3, 64, 32), pk_pids(2, 4)
    loss, terms, _ = sda.generator_objective(
        generators, discriminators, real_s, real_t, pids, source_encoder, target_encoder, 10.0, 5.0, 1.0
    )
    with torch.no_grad():
        g_st, g_ts = generators.source_to_target, generators.target_to_source
        fake_t, fake_s = g_st(real_s), g_ts(real_t)
        mse1 = lambda x: ((x.double() - 1) ** 2).mean().item()  # noqa: E731
        l1 = lambda x, y: (x.double() - y.double()).abs().mean().item()  # noqa: E731
        adversarial = mse1(discriminators.target(fake_t)) + mse1(discriminators.source(fake_s))
        cycle = l1(g_ts(fake_t), real_s) + l1(g_st(fake_s), real_t)
        identity = l1(g_st(real_t), real_t) + l1(g_ts(real_s), real_s)
        relation = reference_soft_triplet(
            target_encoder(fake_t).double().numpy(), source_encoder(real_s).double().numpy(), pids.numpy()
        )
    assert terms["g_adversarial"] == pytest.approx(adversarial, rel=1e-4)
    assert terms["g_cycle"] == pytest.approx(cycle, rel=1e-4)
    assert terms["g_identity"] == pytest.approx(identity, rel=1e-4)
    assert terms["g_relation"] == pytest.approx(relation, rel=1e-4)
    assert loss.item() == pytest.approx(adversarial + 10 * cycle + 5 * identity + relation, rel=1e-4)
    # Without the identity and relation terms, they are neither computed nor added.
    loss, terms, _ = sda.generator_objective(generators, discriminators, real_s, real_t, pids, None, None, 10, 0, 0)
    assert "g_identity" not in terms and "g_relation" not in terms
    assert loss.item() == pytest.approx(adversarial + 10 * cycle, rel=1e-4)


def test_relation_gradient_reaches_generator_through_frozen_encoder_only():
    torch.manual_seed(5)
    generators = sda.Generators(ngf=4, n_blocks=1)
    discriminators = sda.Discriminators(ndf=4)
    encoder = sda.freeze(reid.build_model("resnet18", num_classes=0))
    bn_before = {k: v.clone() for k, v in encoder.state_dict().items() if "running" in k}
    sda.set_requires_grad(discriminators.parameters(), False)
    real_s, real_t, pids = torch.randn(8, 3, 64, 32), torch.randn(4, 3, 64, 32), pk_pids(2, 4)
    # Relation term alone: only G_s2t may receive a gradient, through the encoder.
    _, images = None, generators(real_s, real_t)
    relation = sda.relation_consistency_loss(encoder(images["fake_target"]), encoder(real_s), pids)
    relation.backward()
    g_st_grads = [p.grad for p in generators.source_to_target.parameters()]
    assert all(g is not None for g in g_st_grads) and sum(g.abs().sum() for g in g_st_grads) > 0
    assert all(p.grad is None for p in generators.target_to_source.parameters())
    assert all(p.grad is None for p in encoder.parameters())
    # Full objective: generators get gradients, discriminators and encoder none, BN statistics untouched.
    generators.zero_grad(set_to_none=True)
    loss, _, _ = sda.generator_objective(
        generators, discriminators, real_s, real_t, pids, encoder, encoder, 10.0, 5.0, 1.0
    )
    loss.backward()
    assert all(p.grad is not None for p in generators.parameters())
    assert all(p.grad is None for p in discriminators.parameters())
    assert all(p.grad is None for p in encoder.parameters())
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in bn_before.items())


# ------------------------------------------------------------------------------------------------------------
# Image pool
# ------------------------------------------------------------------------------------------------------------


def test_image_pool_fills_then_swaps_half_the_time():
    pool = sda.ImagePool(size=50, seed=0)
    # Images are tagged by their constant value so we can track where each went.
    first = torch.arange(30, dtype=torch.float32).view(30, 1, 1, 1).expand(30, 3, 2, 2)
    assert torch.equal(pool.query(first), first)  # filling: the new images come back unchanged
    second = torch.arange(30, 50, dtype=torch.float32).view(20, 1, 1, 1).expand(20, 3, 2, 2)
    assert torch.equal(pool.query(second), second)  # 20 more fill the pool to 50
    assert len(pool.images) == 50
    stored = {int(t[0, 0, 0]) for t in pool.images}
    assert stored == set(range(50))
    swapped = 0
    for step in range(400):  # one image per query, so each decision can be checked on its own
        incoming = torch.full((1, 3, 2, 2), 1000.0 + step)
        before = {int(t[0, 0, 0]) for t in pool.images}
        returned = int(pool.query(incoming)[0, 0, 0, 0])
        after = {int(t[0, 0, 0]) for t in pool.images}
        assert len(pool.images) == 50
        if returned == 1000 + step:
            assert after == before  # the new image came back and the pool is unchanged
        else:
            swapped += 1  # a stored image came back: it left the pool and the new one took its place
            assert returned in before and after == (before - {returned}) | {1000 + step}
    assert 0.4 < swapped / 400 < 0.6  # probability 0.5 (seeded, so deterministic)


def test_image_pool_size_zero_and_state_roundtrip():
    images = torch.randn(4, 3, 2, 2)
    assert sda.ImagePool(size=0).query(images) is images
    pool = sda.ImagePool(size=3, seed=7)
    pool.query(torch.randn(5, 3, 2, 2))
    clone = sda.ImagePool(size=3, seed=123)
    clone.load_state_dict(pool.state_dict())
    batch = torch.randn(6, 3, 2, 2)
    assert torch.equal(pool.query(batch), clone.query(batch))


# ------------------------------------------------------------------------------------------------------------
# End to end on the tiny benchmark: train, resume, translate
# ------------------------------------------------------------------------------------------------------------

TINY = ["--height", "64", "--width", "32", "--ngf", "4", "--ndf", "4", "--n-blocks", "1", "--iters", "2"]
TINY += ["--batch-size", "8", "--num-instances", "4", "--workers", "0", "--arch", "resnet18", "--no-amp"]


@pytest.fixture(scope="module")
def encoder_checkpoint(tmp_path_factory, tiny_data_root) -> Path:
    num_pids = reid.read_dataset("personx", str(tiny_data_root)).num_train_pids
    torch.manual_seed(0)
    model = reid.build_model("resnet18", num_classes=num_pids)
    path = tmp_path_factory.mktemp("encoder") / "encoder.pth"
    reid.save_checkpoint({"state_dict": model.state_dict(), "arch": "resnet18"}, path, "pretrain")
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_data_root, encoder_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("sda_run")
    args = ["train", "--data-root", str(tiny_data_root), "--out", str(out), "--source-encoder"]
    sda.main(args + [str(encoder_checkpoint), "--epochs-constant", "1", "--epochs-decay", "0", *TINY])
    return out


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_writes_checkpoint_log_and_samples(trained_run):
    state = reid.read_checkpoint(trained_run / "checkpoint.pth")
    assert state["epoch"] == 1 and state["iteration"] == 0 and state["global_step"] == 2
    records = read_log(trained_run / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for key in ("g_adversarial", "g_cycle", "g_identity", "g_relation", "d_target", "d_source"):
        assert all(np.isfinite(r[key]) for r in records), key
    samples = sorted((trained_run / "samples").glob("*.png"))
    assert samples
    with Image.open(samples[-1]) as grid:  # 3 rows (source | translated | cycled) of 64-pixel images
        assert grid.height == 3 * 64 + 4 * 2
    assert not list(trained_run.glob("*.tmp*"))


def test_resume_continues_schedule_and_refuses_mismatch(tmp_path, trained_run, tiny_data_root, encoder_checkpoint):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes((trained_run / "checkpoint.pth").read_bytes())
    (out / "log.jsonl").write_text((trained_run / "log.jsonl").read_text())
    saved = reid.read_checkpoint(out / "checkpoint.pth")
    base = [
        "train",
        "--data-root",
        str(tiny_data_root),
        "--out",
        str(out),
        "--source-encoder",
        str(encoder_checkpoint),
    ]
    with pytest.raises(FileExistsError, match="--resume"):
        sda.main(base + ["--epochs-constant", "1", "--epochs-decay", "1", *TINY])
    with pytest.raises(ValueError, match="architecture"):
        sda.main(base + ["--resume", "--epochs-constant", "1", "--epochs-decay", "1", *TINY, "--ngf", "8"])
    with pytest.raises(ValueError, match="architecture"):
        sda.main(base + ["--resume", "--epochs-constant", "1", "--epochs-decay", "1", *TINY, "--d-norm", "none"])
    # a checkpoint written before --input-skip and --d-norm existed resumes as what it was: both off
    older = dict(
        saved, architecture={k: v for k, v in saved["architecture"].items() if k not in sda.ARCHITECTURE_DEFAULTS}
    )
    assert set(sda.ARCHITECTURE_DEFAULTS) <= set(saved["architecture"]) and len(older["architecture"]) >= 6
    torch.save(older, out / "checkpoint.pth")
    sda.main(base + ["--resume", "--epochs-constant", "1", "--epochs-decay", "1", *TINY])
    records = read_log(out / "log.jsonl")
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 1), (0, 2), (1, 3), (1, 4)]
    assert records[2]["lr"] == pytest.approx(2e-4 * (1 - 1 / 2))  # epoch 1 of 1 + 1: decayed
    resumed = reid.read_checkpoint(out / "checkpoint.pth")
    assert resumed["epoch"] == 2 and resumed["global_step"] == 4
    # Training continued from the saved weights: they moved, but far less than a fresh initialisation differs.
    key = "source_to_target.net.1.weight"
    moved = (resumed["generators"][key] - saved["generators"][key]).abs().max().item()
    assert 0 < moved < 0.01
    # Seeded samplers, per-sample augmentation seeds, saved pools and RNG state: the resumed run ends exactly
    # where an uninterrupted run of the same schedule ends.
    straight = tmp_path / "straight"
    base[base.index("--out") + 1] = str(straight)
    sda.main(base + ["--epochs-constant", "1", "--epochs-decay", "1", *TINY])
    uninterrupted = reid.read_checkpoint(straight / "checkpoint.pth")
    for part in ("generators", "discriminators"):
        for name, value in uninterrupted[part].items():
            assert torch.equal(value, resumed[part][name]), (part, name)


def test_translate_keeps_names_counts_sizes_and_resumes(tmp_path, trained_run, tiny_data_root):
    out = tmp_path / "translated"
    args = [
        "translate",
        "--checkpoint",
        str(trained_run / "checkpoint.pth"),
        "--data-root",
        str(tiny_data_root),
    ]
    sda.main(args + ["--out", str(out), "--workers", "0", "--batch-size", "4"])
    source_items = reid.read_dataset("personx", str(tiny_data_root)).train
    written = sorted((out / "personX_sda" / "image_train").iterdir())
    assert sorted(p.name for p in written) == sorted(Path(p).name for p, _, _ in source_items)
    for path, _, _ in source_items:
        with Image.open(path) as a, Image.open(out / "personX_sda" / "image_train" / Path(path).name) as b:
            assert a.size == b.size and b.mode == "RGB"
    # Resumable: a deleted image is rewritten, existing ones are left alone, stale temp files are removed.
    mtimes = {p.name: p.stat().st_mtime_ns for p in written}
    written[0].unlink()
    (written[0].parent / f".{written[1].name}.tmp999").write_bytes(b"partial")
    sda.main(args + ["--out", str(out), "--workers", "0"])
    again = sorted((out / "personX_sda" / "image_train").iterdir())
    assert [p.name for p in again] == [p.name for p in written]
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in again[1:])
    # The translated set reads back as the personx_sda dataset with the source identities.
    translated = reid.read_dataset("personx_sda", str(out)).train
    assert sorted((Path(p).name, pid, cam) for p, pid, cam in translated) == sorted(
        (Path(p).name, pid, cam) for p, pid, cam in source_items
    )


def test_translate_refuses_without_a_trained_generator(tmp_path, tiny_data_root, encoder_checkpoint):
    args = ["translate", "--data-root", str(tiny_data_root), "--out", str(tmp_path)]
    with pytest.raises(FileNotFoundError, match="sda.py train"):
        sda.main(args + ["--checkpoint", str(tmp_path / "missing.pt")])
    with pytest.raises(ValueError, match="holds a pretrain.py re-ID model .* sda.py CycleGAN"):
        sda.main(args + ["--checkpoint", str(encoder_checkpoint)])
    assert not (tmp_path / "personX_sda").exists()


def test_encoder_checkpoint_architecture_is_checked(encoder_checkpoint, tmp_path):
    encoder, checkpoint = reid.load_model(encoder_checkpoint, sda.ENCODER_KINDS)
    state = checkpoint["state_dict"]
    assert encoder.arch == "resnet18" and not any(k.startswith("module.") for k in state)
    with pytest.raises(ValueError, match="holds a resnet18 model, not resnet50"):
        reid.load_model(encoder_checkpoint, sda.ENCODER_KINDS, "resnet50", what="--source-encoder")
    bare = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, bare)
    with pytest.raises(ValueError, match="names no architecture"):
        reid.load_model(bare, sda.ENCODER_KINDS, what="--source-encoder")
    encoder, _ = reid.load_model(bare, sda.ENCODER_KINDS, "resnet18", what="--source-encoder")
    assert encoder.classifier is None and torch.equal(encoder.state_dict()["bnneck.weight"], state["bnneck.weight"])


def test_online_relation_updates_target_encoder_only(tmp_path, tiny_data_root, encoder_checkpoint):
    out = tmp_path / "online"
    args = ["train", "--data-root", str(tiny_data_root), "--out", str(out), "--source-encoder"]
    sda.main(
        args + [str(encoder_checkpoint), "--online-relation", "--epochs-constant", "1", "--epochs-decay", "0"] + TINY
    )
    state = reid.read_checkpoint(out / "checkpoint.pth")
    original = reid.read_checkpoint(encoder_checkpoint)["state_dict"]
    changed = [
        k for k, v in state["target_encoder"].items() if v.is_floating_point() and not torch.equal(v, original[k])
    ]
    assert any(k.startswith("backbone.") for k in changed)
    assert not any("running_" in k for k in changed)  # BN statistics stay frozen
    assert "bnneck.bias" not in changed  # and so does what build_model froze
    records = read_log(out / "log.jsonl")
    assert all(np.isfinite(r["reid_total"]) and np.isfinite(r["reid_relation"]) for r in records)


def test_random_seed_module_is_not_shared():
    """The pool has its own RNG: drawing from the global `random` does not change its decisions."""
    a, b = sda.ImagePool(2, seed=5), sda.ImagePool(2, seed=5)
    batch = torch.randn(8, 3, 1, 1)
    out_a = a.query(batch)
    random.random()
    assert torch.equal(out_a, b.query(batch))


@pytest.mark.slow  # three fresh Python processes: 11-31 s measured on the loaded shared CPU
def test_ddp_with_torchrun_two_processes(tmp_path, tiny_data_root, encoder_checkpoint):
    """Two CPU processes (gloo) with --online-relation: every DDP-wrapped module gets gradients each step."""
    out = tmp_path / "ddp"
    script = Path(sda.__file__).resolve()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    command += ["train", "--data-root", str(tiny_data_root), "--out", str(out), "--source-encoder"]
    command += [str(encoder_checkpoint), "--online-relation", "--epochs-constant", "1", "--epochs-decay", "0"]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    command += TINY + ["--batch-size", "16"]  # all processes together: 8 images (2 identities) per process
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_log(out / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2]  # only rank 0 logs
    assert reid.read_checkpoint(out / "checkpoint.pth")["global_step"] == 2


# ------------------------------------------------------------------------------------------------------------
# Discriminator depth scaled to the image size
# ------------------------------------------------------------------------------------------------------------


def measured_receptive_field(n_layers: int) -> tuple[int, int]:
    """Height and width of the input area that one central score depends on, measured with autograd on a
    PatchDiscriminator whose InstanceNorms are removed (they mix the whole image through their statistics)."""
    torch.manual_seed(n_layers)
    discriminator = sda.PatchDiscriminator(ndf=2, n_layers=n_layers).double()
    discriminator.net = nn.Sequential(
        *[nn.Identity() if isinstance(m, nn.InstanceNorm2d) else m for m in discriminator.net]
    )
    size = 8 * 2**n_layers + 64
    image = torch.randn(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    scores = discriminator(image)
    scores[0, 0, scores.shape[2] // 2, scores.shape[3] // 2].backward()
    touched = image.grad.abs().sum((0, 1)) > 0
    rows, cols = touched.any(1).nonzero(), touched.any(0).nonzero()
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
def test_patch_receptive_field_matches_autograd(n_layers):
    field = sda.patch_receptive_field(n_layers)
    assert measured_receptive_field(n_layers) == (field, field)
    if n_layers == 3:
        assert field == 70  # the PatchGAN of pix2pix / CycleGAN


def test_discriminator_depth_scales_with_image_width():
    assert [sda.discriminator_layers_for(w) for w in (128, 64, 48, 32)] == [3, 2, 1, 1]
    for width in range(24, 400, 4):
        n = sda.discriminator_layers_for(width)
        share = sda.RELEASE_RECEPTIVE_FIELD_SHARE * width
        assert n == 1 or sda.patch_receptive_field(n) <= share
        assert n == 5 or sda.patch_receptive_field(n + 1) > share
    discriminator = sda.PatchDiscriminator(ndf=4, n_layers=1)
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 1, 1]
    assert discriminator(torch.randn(1, 3, 96, 48)).shape == (1, 1, 46, 22)
    with pytest.raises(ValueError, match="3-layer PatchGAN"):
        sda.check_image_size(96, 16, 3)


def test_train_resolves_the_scaled_depth(trained_run):
    state = reid.read_checkpoint(trained_run / "checkpoint.pth")
    assert state["architecture"]["d_layers"] == sda.discriminator_layers_for(32) == 1
    strides = [v.shape for k, v in state["discriminators"].items() if k.startswith("target.") and "weight" in k]
    assert len(strides) == 3  # two convolutions and the score layer


# ------------------------------------------------------------------------------------------------------------
# Identity fidelity
# ------------------------------------------------------------------------------------------------------------


def reference_fidelity(source: np.ndarray, translated: np.ndarray, valid: np.ndarray, pids: np.ndarray) -> dict:
    """From the definition, with loops: identity means over valid images, per-channel least-squares correction
    of the translated means onto the source means, z-scores by the between-identity spread of each region."""
    identities = sorted(set(pids.tolist()))
    regions = source.shape[1]
    S, T, present = {}, {}, {}
    for i in identities:
        for r in range(regions):
            rows = [n for n in range(len(pids)) if pids[n] == i and valid[n, r]]
            present[i, r] = bool(rows)
            if rows:
                S[i, r] = source[rows, r].mean(0)
                T[i, r] = translated[rows, r].mean(0)
    keys = [k for k in S]
    s_all, t_all = np.array([S[k] for k in keys]), np.array([T[k] for k in keys])
    gain, offset = np.zeros(3), np.zeros(3)
    for c in range(3):
        design = np.stack([t_all[:, c], np.ones(len(keys))], 1)
        (gain[c], offset[c]), *_ = np.linalg.lstsq(design, s_all[:, c], rcond=None)
    spread = []
    for r in range(regions):
        colours = np.array([S[i, r] for i in identities if present[i, r]])
        spread.append(np.sqrt(((colours - colours.mean(0)) ** 2).sum(1).mean()))
    z2 = {k: ((gain * T[k] + offset - S[k]) ** 2).sum() / spread[k[1]] ** 2 for k in keys}
    drifts = [np.sqrt(np.mean([z2[i, r] for r in range(regions) if present[i, r]])) for i in identities]
    kept = []
    for i in identities:
        distances = []
        for j in identities:
            shared = [r for r in range(regions) if present[i, r] and present[j, r]]
            d = [((gain * T[i, r] + offset - S[j, r]) ** 2).sum() / spread[r] ** 2 for r in shared]
            distances.append(np.mean(d) if d else np.inf)
        kept.append(identities[int(np.argmin(distances))] == i)
    return {"identity_drift": float(np.mean(drifts)), "identity_kept": float(np.mean(kept))}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fidelity_matches_reference_on_random_colours(seed):
    rng = np.random.default_rng(seed)
    n, regions = 40, len(reid.BODY_BANDS)
    pids = rng.integers(0, 9, size=n)
    source = rng.uniform(0, 1, size=(n, regions, 3))
    translated = np.clip(source * rng.uniform(0.5, 1.2, 3) + rng.normal(0, 0.15, size=source.shape), 0, 1)
    valid = rng.random((n, regions)) < 0.8
    result = reid.fidelity_from_region_colours(
        torch.from_numpy(source), torch.from_numpy(translated), torch.from_numpy(valid), torch.from_numpy(pids)
    )
    expected = reference_fidelity(source, translated, valid, pids)
    assert result["identity_drift"] == pytest.approx(expected["identity_drift"], rel=1e-9)
    assert result["identity_kept"] == pytest.approx(expected["identity_kept"])
    assert result["identities"] == len(set(pids.tolist()))


@pytest.fixture(scope="module")
def tiny_source_images(tiny_data_root) -> tuple[torch.Tensor, torch.Tensor]:
    items = reid.read_dataset("personx", str(tiny_data_root)).train
    images = [
        torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255) for path, _, _ in items
    ]
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor([pid for _, pid, _ in items])


def test_person_regions_are_found_on_source_crops(tiny_source_images):
    images, _ = tiny_source_images
    masks = reid.person_masks(images)
    share = masks.float().mean((1, 2))
    assert (share > 0.05).all() and (share < 0.6).all()  # a pedestrian, not the background
    _, valid = reid.region_colours(images, reid.body_region_weights(masks))
    assert valid.float().mean() > 0.9


def test_fidelity_keeps_identities_under_a_camera_style_and_flags_colour_swaps(tiny_source_images):
    images, pids = tiny_source_images
    identity = reid.identity_fidelity(images, images, pids)
    assert identity["identity_drift"] == pytest.approx(0.0, abs=1e-9) and identity["identity_kept"] == 1.0
    # a camera: colour cast, exposure and contrast (per-channel gain and offset) -> undone by the correction
    camera = (images * torch.tensor([0.8, 0.9, 0.7]).view(1, 3, 1, 1) + 0.1).clamp(0, 1)
    style = reid.identity_fidelity(images, camera, pids)
    assert style["identity_drift"] < 0.05 and style["identity_kept"] == 1.0
    # translators that swap two colours: red <-> green channels, or every hue rotated by 120 degrees
    red_green = reid.identity_fidelity(images, images[:, [1, 0, 2]], pids)
    hue = reid.identity_fidelity(images, images[:, [2, 0, 1]], pids)
    grey = reid.identity_fidelity(images, torch.full_like(images, 0.5), pids)
    for swapped in (red_green, hue, grey):
        assert swapped["identity_drift"] > 0.3 > style["identity_drift"]
        assert swapped["identity_drift"] > identity["identity_drift"]
    assert grey["identity_drift"] == pytest.approx(1.0, abs=0.25)  # as far as an average other person
    assert grey["identity_kept"] < 1.0


def test_train_logs_fidelity_beside_the_samples(trained_run):
    records = read_log(trained_run / "log.jsonl")
    assert 0 <= records[-1]["fidelity_identity_drift"] and 0 <= records[-1]["fidelity_identity_kept"] <= 1
    sample = json.loads(sorted((trained_run / "samples").glob("*.json"))[-1].read_text())
    assert sample["identity_drift"] == records[-1]["fidelity_identity_drift"]
    assert sample["style_gap"] == records[-1]["fidelity_style_gap"] >= 0


# ------------------------------------------------------------------------------------------------------------
# Target encoder of the relation term
# ------------------------------------------------------------------------------------------------------------


def test_target_encoder_is_loaded_from_its_own_checkpoint(tmp_path, tiny_data_root, encoder_checkpoint):
    """An mmt_plus.py model_best.pth (state_dict without classifier, DDP prefixes, 'arch') becomes E_t; E_s stays
    the source checkpoint; without a target checkpoint E_t is a copy of E_s; online E_t gets E_s's classifier."""
    num_pids = reid.read_dataset("personx", str(tiny_data_root)).num_train_pids
    torch.manual_seed(7)
    adapted = reid.build_model("resnet18", num_classes=0)
    target_path = tmp_path / "model_best.pth"
    state = {f"module.{k}": v for k, v in adapted.state_dict().items()}
    reid.save_checkpoint({"state_dict": state, "arch": "resnet18"}, target_path, "mmt_plus")
    source_state = reid.read_checkpoint(encoder_checkpoint)["state_dict"]

    source, target = sda.build_relation_encoders(encoder_checkpoint, target_path, None, False, num_pids)
    for key, value in adapted.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert torch.equal(source.state_dict()["bnneck.weight"], source_state["bnneck.weight"])
    assert not torch.equal(source.state_dict()["backbone.conv1.weight"], target.state_dict()["backbone.conv1.weight"])
    assert not any(p.requires_grad for p in target.parameters()) and not target.training

    _, same = sda.build_relation_encoders(encoder_checkpoint, None, "resnet18", False, num_pids)
    assert torch.equal(same.state_dict()["backbone.conv1.weight"], source_state["backbone.conv1.weight"])

    _, online = sda.build_relation_encoders(encoder_checkpoint, target_path, None, True, num_pids)
    assert torch.equal(online.classifier.weight, source_state["classifier.weight"])
    assert torch.equal(online.state_dict()["backbone.conv1.weight"], adapted.state_dict()["backbone.conv1.weight"])
    assert any(p.requires_grad for p in online.parameters())

    with pytest.raises(ValueError, match="holds a resnet18 model, not resnet50"):
        sda.build_relation_encoders(encoder_checkpoint, target_path, "resnet50", False, num_pids)


def test_fidelity_command_compares_a_translated_copy(tmp_path, tiny_data_root):
    source_dir = tiny_data_root / "personX" / "image_train"
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for path in sorted(source_dir.iterdir()):
        (copy_dir / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "fidelity.json"
    common = ["fidelity", "--data-root", str(tiny_data_root), "--height", "64", "--width", "32", "--threads", "1"]
    result = sda.main(common + ["--translated", str(copy_dir), "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["identity_drift"] == pytest.approx(0.0, abs=1e-9) and written["identity_kept"] == 1.0
    assert written["images"] == len(list(source_dir.iterdir())) and result is None
    assert written["style_gap"] == pytest.approx(1.0)  # the identity map translates nothing
    sorted(copy_dir.iterdir())[0].unlink()
    with pytest.raises(FileNotFoundError, match="have no translation"):
        sda.main(common + ["--translated", str(copy_dir)])


def test_input_skip_generator_starts_as_identity_and_learns_edits():
    torch.manual_seed(0)
    generator = sda.ResnetGenerator(ngf=4, n_blocks=1, input_skip=True)
    sda.init_weights_normal(generator)
    generator.start_as_identity()
    pixels = torch.rand(2, 3, 32, 16).clamp(0.01, 0.99)
    images = reid.normalise_imagenet(pixels)
    assert torch.allclose(reid.denormalise_imagenet(generator(images)), pixels, atol=1e-5)
    generator(images).pow(2).mean().backward()  # the zeroed layer still gets a gradient
    last = [m for m in generator.net if isinstance(m, nn.Conv2d)][-1]
    assert last.weight.grad.abs().sum() > 0
    plain = sda.ResnetGenerator(ngf=4, n_blocks=1)
    plain.start_as_identity()  # a no-op without input_skip
    assert isinstance(plain.net[-1], nn.Sigmoid) and not isinstance(generator.net[-1], nn.Sigmoid)


def reference_style_gap(source: np.ndarray, translated: np.ndarray, target: np.ndarray) -> float:
    """From the definition, numpy float64, images (N,3,H,W) in [0, 1]."""

    def statistics(images):
        grey = images.mean(1)
        lap = 4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]
        rows = []
        for n in range(len(images)):
            rows.append(
                [*images[n].mean((1, 2)), *images[n].std((1, 2), ddof=1), (images[n].max(0) - images[n].min(0)).mean()]
                + [np.abs(np.diff(grey[n], axis=1)).mean(), np.abs(lap[n]).mean()]
            )
        return np.array(rows)

    s, tr, t = statistics(source), statistics(translated), statistics(target)
    scale = np.concatenate([s, t]).std(0, ddof=1)
    return float(np.linalg.norm((tr.mean(0) - t.mean(0)) / scale) / np.linalg.norm((s.mean(0) - t.mean(0)) / scale))


def test_style_gap_matches_reference_and_reads_one_for_the_identity_map():
    rng = np.random.default_rng(3)
    source = rng.uniform(0.2, 0.8, size=(12, 3, 16, 8))
    target = np.clip(source[::-1] * 0.7 + rng.normal(0, 0.1, size=source.shape), 0, 1)
    translated = 0.5 * source + 0.5 * target
    tensors = [torch.from_numpy(x.copy()) for x in (source, translated, target)]
    assert reid.style_gap(*tensors) == pytest.approx(reference_style_gap(source, translated, target), rel=1e-9)
    assert reid.style_gap(tensors[0], tensors[0], tensors[2]) == pytest.approx(1.0)
    assert reid.style_gap(tensors[0], tensors[2], tensors[2]) == pytest.approx(0.0, abs=1e-12)


def test_demo_preset_booleans_are_described_as_flags_and_can_be_overridden(capsys):
    """A boolean preset value reads as the flag a user would type (--input-skip, not '--input-skip True'), and an
    explicit --no-input-skip still wins over the preset."""
    parser = sda.build_parser()
    train_parser = parser.get_default("train_parser")
    preset_help = next(a.help for a in train_parser._actions if "--preset" in a.option_strings)
    assert "--input-skip --d-layers 3" in preset_help and "True" not in preset_help
    chosen = reid.parse_with_preset(parser, sda.PRESETS, ["train", "--preset", "demo"], target=train_parser)
    assert chosen.input_skip is sda.PRESETS["demo"]["input_skip"] is True
    parser = sda.build_parser()
    argv = ["train", "--preset", "demo", "--no-input-skip", "--d-layers", "0"]
    overridden = reid.parse_with_preset(parser, sda.PRESETS, argv, target=parser.get_default("train_parser"))
    assert overridden.input_skip is False and overridden.d_layers == 0 and overridden.lambda_cycle == 3.0
