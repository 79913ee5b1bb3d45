"""Tests of mmt_plus.py: domain-specific BN, margin heads, MoCo queue, EMA, sparse-graph DBSCAN and pseudo labels
against independent references written here from their definitions (docs/differences.md#mmt and
docs/differences.md#clustering-jaccard-distance), then a short MMT+ run on the tiny generated dataset, resume, and a
2-process torchrun run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.cluster import DBSCAN
from sklearn.metrics import adjusted_rand_score
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mmt_plus  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

# ---------------------------------------------------------------------------------------------------------------
# Domain-specific BatchNorm


class IBNBlock(nn.Module):
    """IBN-a style: InstanceNorm on half of the channels, BatchNorm on the other half."""

    def __init__(self, channels: int):
        super().__init__()
        self.half = channels // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(channels - self.half)

    def forward(self, x):
        return torch.cat([self.IN(x[:, : self.half]), self.BN(x[:, self.half :])], dim=1)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ibn = IBNBlock(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.bnneck = nn.BatchNorm1d(6)
        self.bnneck.bias.requires_grad_(False)

    def forward(self, x):
        x = torch.relu(self.ibn(self.conv(x)))
        x = self.bn2(self.conv2(x)).mean(dim=(2, 3))
        return self.bnneck(x)


def randomised_net(seed: int) -> SmallNet:
    torch.manual_seed(seed)
    net = SmallNet()
    for module in net.modules():  # non-trivial "pre-trained" BN parameters and statistics
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_()
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return net


def test_dsbn_eval_mode_preserves_outputs_and_converts_every_bn():
    net = randomised_net(0).eval()
    converted = mmt_plus.convert_dsbn(randomised_net(0)).eval()
    dsbn = [m for m in converted.modules() if isinstance(m, mmt_plus.DomainSpecificBatchNorm)]
    assert len(dsbn) == 3  # the IBN BN half, bn2 and the BNNeck
    assert not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(p, mmt_plus.DomainSpecificBatchNorm)
        for p in converted.modules()
        for m in p.children()
    )
    assert isinstance(converted.ibn.IN, nn.InstanceNorm2d)  # InstanceNorm untouched
    assert not converted.bnneck.bn_source.bias.requires_grad and not converted.bnneck.bn_target.bias.requires_grad
    x = torch.randn(5, 3, 8, 6)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), net(x), rtol=1e-5, atol=1e-6)


def test_dsbn_routes_each_part_of_a_training_batch_to_its_branch():
    converted = mmt_plus.convert_dsbn(randomised_net(1)).train()
    source_ref, target_ref = randomised_net(1).train(), randomised_net(1).train()  # independent plain BNs
    x_source, x_target = torch.randn(6, 3, 8, 6), torch.randn(6, 3, 8, 6) * 2 + 1
    out = converted(torch.cat([x_source, x_target]))
    torch.testing.assert_close(out[:6], source_ref(x_source), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[6:], target_ref(x_target), rtol=1e-4, atol=1e-5)
    # running statistics: each branch updated from its own domain only
    torch.testing.assert_close(converted.bn2.bn_source.running_mean, source_ref.bn2.running_mean)
    torch.testing.assert_close(converted.bn2.bn_target.running_var, target_ref.bn2.running_var)
    assert converted.bn2.bn_source.num_batches_tracked == 1 == converted.bn2.bn_target.num_batches_tracked

    # unequal split (e.g. the last batches of a small pseudo-labelled set)
    converted = mmt_plus.convert_dsbn(randomised_net(2)).train()
    source_ref, target_ref = randomised_net(2).train(), randomised_net(2).train()
    mmt_plus.set_source_size(converted, 4)
    out = converted(torch.cat([x_source[:4], x_target[:3]]))
    torch.testing.assert_close(out[:4], source_ref(x_source[:4]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[4:], target_ref(x_target[:3]), rtol=1e-4, atol=1e-5)
    mmt_plus.set_source_size(converted, 0)  # target only: the source branch is untouched
    before = converted.bn2.bn_source.running_mean.clone()
    converted(x_target[:3])
    torch.testing.assert_close(converted.bn2.bn_source.running_mean, before)

    mmt_plus.set_source_size(converted, None)
    with pytest.raises(ValueError, match="cannot be split"):
        converted(torch.randn(5, 3, 8, 6))
    mmt_plus.set_source_size(converted, 9)
    with pytest.raises(ValueError, match="source_size 9"):
        converted(torch.randn(4, 3, 8, 6))


def test_collapse_dsbn_gives_the_target_branch_as_a_plain_model():
    converted = mmt_plus.convert_dsbn(randomised_net(3))
    converted.train()
    converted(torch.randn(8, 3, 8, 6))  # the two branches now differ
    assert not torch.equal(converted.bn2.bn_source.running_mean, converted.bn2.bn_target.running_mean)
    for branch in ("target", "source"):
        plain = mmt_plus.collapse_dsbn(converted, branch)
        fresh = SmallNet()
        fresh.load_state_dict(plain.state_dict())  # strict: same keys as the unconverted architecture
        chosen = getattr(converted.bn2, f"bn_{branch}")
        torch.testing.assert_close(fresh.bn2.running_mean, chosen.running_mean)
        torch.testing.assert_close(fresh.bn2.weight, chosen.weight)
    x = torch.randn(3, 3, 8, 6)
    fresh.load_state_dict(mmt_plus.collapse_dsbn(converted, "target").state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), converted.eval()(x))
    with pytest.raises(ValueError, match="branch"):
        mmt_plus.collapse_dsbn(converted, "both")


def test_dsbn_collapse_loads_into_pretrain_build_model():
    reid = pytest.importorskip("reid")
    model = mmt_plus.convert_dsbn(reid.build_model("resnet18", num_classes=0))
    plain_state = mmt_plus.plain_state(model)
    assert not any("bn_source" in key or "bn_target" in key for key in plain_state)
    fresh = reid.build_model("resnet18", num_classes=0)
    fresh.load_state_dict(plain_state)  # strict
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Heads


def arcface_reference(features, weight, labels, s, m):
    """docs/differences.md#mmt (margin heads) in float64 numpy, one element at a time."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    out = np.zeros((len(f), len(w)))
    for i in range(len(f)):
        for c in range(len(w)):
            cos = float(f[i] @ w[c])
            if labels is not None and c == labels[i]:
                if cos > math.cos(math.pi - m):
                    theta = math.acos(min(1.0, max(-1.0, cos)))
                    out[i, c] = s * math.cos(theta + m)
                else:
                    out[i, c] = s * (cos - m * math.sin(math.pi - m))
            else:
                out[i, c] = s * cos
    return out


def test_arcface_and_cosface_logits_equal_their_formulas():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(7, 5))
    head = mmt_plus.MarginHead(5, 9, "arc", scale=30.0, margin=0.5)
    weight = head.weight.detach().detach().double().numpy()
    # rows pointing (almost) against some features hit the fallback branch cos <= cos(pi - m)
    weight[0] = -features[0] * 3 + 1e-3
    weight[1] = -features[1]
    head.weight.data = torch.tensor(weight, dtype=torch.float32)
    labels = np.array([0, 1, 2, 3, 8, 5, 0])
    got = head(torch.tensor(features, dtype=torch.float32), torch.tensor(labels)).detach().double().numpy()
    expected = arcface_reference(features, weight, labels, 30.0, 0.5)
    assert np.cos(np.pi - 0.5) >= (features[0] @ weight[0]) / np.linalg.norm(features[0]) / np.linalg.norm(weight[0])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    no_margin = head(torch.tensor(features, dtype=torch.float32)).detach().double().numpy()
    np.testing.assert_allclose(no_margin, arcface_reference(features, weight, None, 30.0, 0.5), rtol=1e-4, atol=1e-4)

    cos_head = mmt_plus.MarginHead(5, 9, "cos", scale=64.0, margin=0.35)
    w = cos_head.weight.detach().detach().double().numpy()
    cosine = (features @ w.T) / np.maximum(np.linalg.norm(features, axis=1)[:, None] * np.linalg.norm(w, axis=1), 1e-8)
    expected = 64.0 * (cosine - 0.35 * np.eye(9)[labels])
    got = cos_head(torch.tensor(features, dtype=torch.float32), torch.tensor(labels)).detach().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    # only the active rows are used; labels beyond them are an error
    head.num_active_classes = 4
    assert head(torch.tensor(features, dtype=torch.float32)).shape == (7, 4)
    with pytest.raises(RuntimeError):
        head(torch.tensor(features, dtype=torch.float32), torch.tensor(labels))
    with pytest.raises(ValueError, match="metric"):
        mmt_plus.MarginHead(5, 3, "circle")
    linear = mmt_plus.LinearHead(5, 4)
    torch.testing.assert_close(
        linear(torch.ones(2, 5), torch.zeros(2, dtype=torch.long)), linear.weight.sum(1).expand(2, 4)
    )


def test_soft_cross_entropy_matches_definition():
    student, teacher = torch.randn(6, 11), torch.randn(6, 11) * 3
    p_teacher = np.exp(teacher.numpy()) / np.exp(teacher.numpy()).sum(1, keepdims=True)
    log_student = student.numpy() - np.log(np.exp(student.numpy()).sum(1, keepdims=True))
    expected = -(p_teacher * log_student).sum(1).mean()
    assert float(mmt_plus.soft_cross_entropy(student, teacher)) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# MoCo and EMA


def test_moco_loss_equals_direct_computation_and_queue_wraps_around():
    torch.manual_seed(0)
    queue = mmt_plus.MocoQueue(feature_dim=4, size=10, temperature=0.07)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(10))
    tau = 0.07
    for step, start in enumerate([0, 4, 8]):
        q, k = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4)
        memory = queue.keys.clone().detach().double().numpy()
        qn = (q.detach().double() / q.detach().double().norm(dim=1, keepdim=True)).numpy()
        kn = (k.double() / k.double().norm(dim=1, keepdim=True)).numpy()
        expected = 0.0
        for i in range(4):
            positive = math.exp(qn[i] @ kn[i] / tau)
            negatives = sum(math.exp(qn[i] @ memory[j] / tau) for j in range(10))
            expected -= math.log(positive / (positive + negatives)) / 4
        loss = queue.loss(q, k)
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-4), step
        loss.backward()  # gradient flows to the queries only
        assert q.grad is not None and torch.isfinite(q.grad).all()
        positions = [(start + i) % 10 for i in range(4)]  # step 2 writes rows 8, 9, 0, 1
        np.testing.assert_allclose(queue.keys[positions].double().numpy(), kn, rtol=1e-5, atol=1e-6)
        untouched = [j for j in range(10) if j not in positions]
        np.testing.assert_array_equal(queue.keys[untouched].numpy(), memory[untouched].astype(np.float32))
        assert int(queue.pointer) == (start + 4) % 10
    state = queue.state_dict()  # queue and pointer are checkpointed
    assert set(state) == {"keys", "pointer"} and int(state["pointer"]) == 2


def test_ema_update_and_ramp():
    torch.manual_seed(0)
    student, teacher = (
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
    )
    teacher[1].running_mean.fill_(5.0)
    student[1].running_mean.fill_(-1.0)
    decay = mmt_plus.ema_update(teacher, student, alpha=0.999, global_step=0)
    assert decay == 0.0  # t = 0: teacher := student
    for t_param, s_param in zip(teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t_param, s_param)
    assert torch.all(teacher[1].running_mean == 5.0)  # buffers are not averaged
    for step, alpha, expected_decay in [(1, 0.999, 0.5), (9, 0.999, 0.9), (5000, 0.999, 0.999), (3, 0.6, 0.6)]:
        before = [p.clone() for p in teacher.parameters()]
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        decay = mmt_plus.ema_update(teacher, student, alpha=alpha, global_step=step)
        assert decay == pytest.approx(expected_decay)
        for old, t_param, s_param in zip(before, teacher.parameters(), student.parameters(), strict=True):
            torch.testing.assert_close(t_param, expected_decay * old + (1 - expected_decay) * s_param)


# ---------------------------------------------------------------------------------------------------------------
# Jaccard graph + DBSCAN + pseudo labels


def dense_jaccard_reference(features: np.ndarray, k1: int = 20, k2: int = 6) -> np.ndarray:
    """docs/differences.md#clustering-jaccard-distance with dense numpy matrices (float64): k1 list entries
    (self included), k-reciprocal sets, 2/3 expansion with round(k1/2), softmax(-d) weights, k2 query expansion,
    Jaccard 1 - s / (2 - s), clamp at 0."""
    n = len(features)
    d = ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1)
    ranks = np.argsort(d, axis=1, kind="stable")[:, :k1]

    def reciprocal(i, k):
        forward = ranks[i, : k + 1]
        return [j for j in forward if i in ranks[j, : k + 1]]

    v = np.zeros((n, n))
    for i in range(n):
        n1 = reciprocal(i, k1)
        expanded = set(n1)
        for c in n1:
            nh = reciprocal(c, int(round(k1 / 2)))
            if len(set(nh) & set(n1)) > 2 / 3 * len(nh):
                expanded |= set(nh)
        members = sorted(expanded)
        weights = np.exp(-d[i, members])
        v[i, members] = weights / weights.sum()
    v = np.stack([v[ranks[i, :k2]].mean(0) for i in range(n)])
    shared = np.minimum(v[:, None, :], v[None, :, :]).sum(-1)
    jaccard = np.maximum(1 - shared / (2 - shared), 0.0)
    np.fill_diagonal(jaccard, 0.0)
    return jaccard


def clustered_points(rng, num_clusters, per_cluster, dim, spread, num_noise=0):
    centres = rng.normal(size=(num_clusters, dim))
    points = np.concatenate([centres[c] + spread * rng.normal(size=(per_cluster, dim)) for c in range(num_clusters)])
    truth = np.repeat(np.arange(num_clusters), per_cluster)
    if num_noise:
        points = np.concatenate([points, rng.normal(size=(num_noise, dim)) * 2])
        truth = np.concatenate([truth, -1 - np.arange(num_noise)])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), truth


def test_sparse_graph_dbscan_equals_dense_dbscan():
    compared = nontrivial = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        features, _ = clustered_points(rng, num_clusters=6, per_cluster=int(rng.integers(4, 12)), dim=12,
                                       spread=0.6, num_noise=15)  # fmt: skip
        dense = dense_jaccard_reference(features.astype(np.float64))
        import reid_ops

        graph = reid_ops.jaccard_graph(torch.from_numpy(features), k1=20, k2=6, max_distance=1.0)
        rows, cols = graph.nonzero()
        np.testing.assert_allclose(graph.toarray()[rows, cols], dense[rows, cols], atol=2e-5)
        stored = np.zeros_like(dense, dtype=bool)
        stored[graph.tocoo().row, graph.tocoo().col] = True
        assert stored[dense < 1 - 1e-4].all()  # every pair closer than 1 is in the graph
        assert stored[np.arange(len(dense)), np.arange(len(dense))].all()  # explicit zero diagonal
        if np.abs(dense - 0.6).min() < 1e-4:
            continue  # a pair on the eps boundary: float32 vs float64 could legitimately disagree
        expected = DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(dense)
        got = mmt_plus.cluster_features(torch.from_numpy(features))
        np.testing.assert_array_equal(got, expected)
        compared += 1
        nontrivial += bool((expected >= 0).any() and (expected < 0).any() and expected.max() >= 2)
    assert compared >= 2 and nontrivial >= 2  # several clusters and outliers in the compared cases


def test_pseudo_labels_recover_separated_clusters_and_centroids():
    rng = np.random.default_rng(5)
    features, truth = clustered_points(rng, num_clusters=8, per_cluster=12, dim=32, spread=0.05)
    order = rng.permutation(len(features))
    features, truth = features[order], truth[order]
    labels = mmt_plus.cluster_features(torch.from_numpy(features))
    assert (labels >= 0).all()
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    centroids = mmt_plus.cluster_centroids(torch.from_numpy(features), labels)
    assert centroids.shape == (8, 32)
    for c in range(8):
        mean = features[labels == c].astype(np.float64).mean(0)
        np.testing.assert_allclose(centroids[c].numpy(), mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    quality = mmt_plus.pseudo_label_quality(labels, truth)
    assert quality["purity"] == 1.0 and quality["ari"] == pytest.approx(1.0) and quality["nmi"] == pytest.approx(1.0)


def test_pseudo_label_quality_against_hand_count():
    labels = np.array([0, 0, 0, 1, 1, -1, 2, 2])
    truth = np.array([5, 5, 6, 7, 7, 9, 6, 8])
    # clustered: 7 images; majority counts 2 + 2 + 1 = 5
    assert mmt_plus.pseudo_label_quality(labels, truth)["purity"] == pytest.approx(5 / 7)
    assert mmt_plus.pseudo_label_quality(np.full(4, -1), np.arange(4)) == {"nmi": 0.0, "ari": 0.0, "purity": 0.0}


def test_camera_purity_against_hand_count():
    labels = np.array([0, 0, 0, 1, 1, -1, 2, 2])
    truth = np.array([5, 5, 6, 7, 7, 9, 6, 8])
    cams = np.array([1, 1, 2, 0, 3, 4, 2, 2])
    quality = mmt_plus.pseudo_label_quality(labels, truth, cams)
    # clusters {0: cams 1,1,2 -> 2}, {1: 0,3 -> 1}, {2: 2,2 -> 2}: 5 of 7 clustered images
    assert quality["camera_purity"] == pytest.approx(5 / 7)
    # true identities of the clustered images {5: 1,1}, {6: 2,2}, {7: 0,3}, {8: 2}: 2 + 2 + 1 + 1 = 6 of 7
    assert quality["true_camera_purity"] == pytest.approx(6 / 7)
    assert quality["purity"] == pytest.approx(5 / 7)


def test_oracle_labels_keep_identities_with_several_images():
    rng = np.random.default_rng(3)
    truth = np.concatenate([rng.integers(0, 30, size=200), [30, 31]])  # two one-image identities for certain
    labels = mmt_plus.oracle_labels(truth)
    counts = np.bincount(truth, minlength=32)
    assert (labels[-2:] == -1).all()
    for pid in range(32):
        assigned = set(labels[truth == pid].tolist())
        if counts[pid] == 1:
            assert assigned == {-1}
        elif counts[pid] > 1:
            assert len(assigned) == 1 and -1 not in assigned
    kept = labels[labels >= 0]
    assert sorted(set(kept.tolist())) == list(range(int((counts > 1).sum())))
    assert mmt_plus.pseudo_label_quality(labels, truth)["ari"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# End to end on the tiny generated dataset


def make_init_checkpoints(directory: Path, data_root: Path) -> tuple[Path, Path]:
    """Two 'pre-trained' checkpoints: build_model weights of two seeds with the source-sized classifier."""
    reid = pytest.importorskip("reid")
    num_source = reid.read_dataset("personx", str(data_root)).num_train_pids
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = reid.build_model("resnet18", num_classes=num_source)
        path = directory / f"init{seed}.pth"
        reid.save_checkpoint({"state_dict": model.state_dict(), "arch": "resnet18", "epoch": 0}, path, "pretrain")
        paths.append(path)
    return paths[0], paths[1]


def tiny_args(data_root: Path, logs_dir: Path, inits, epochs: int) -> list[str]:
    # eps 0.45: on the tiny benchmark of the new generator the near-random inits put every image within the default
    # 0.6 of the others (one cluster, all losses 0); at 0.45 DBSCAN finds several clusters, so every loss term runs
    return ["--preset", "demo", "--data-root", str(data_root), "--logs-dir", str(logs_dir),
            "--init-1", str(inits[0]), "--init-2", str(inits[1]), "--epochs", str(epochs), "--iters", "2",
            "--batch-size", "8", "--height", "64", "--width", "32", "--workers", "0", "--test-batch-size", "64",
            "--no-eval-initial", "--eps", "0.45"]  # fmt: skip


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def inits(tmp_path_factory, tiny_data_root):
    return make_init_checkpoints(tmp_path_factory.mktemp("inits"), tiny_data_root)


def test_run_resume_and_checkpoint_loading(tmp_path, tiny_data_root, inits):
    reid = pytest.importorskip("reid")
    full = tmp_path / "full"
    summary = mmt_plus.main(tiny_args(tiny_data_root, full, inits, epochs=2) + ["--moco-queue-size", "20"])
    records = [r for r in read_log(full / "log.jsonl") if "losses" in r]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert r["clusters"] >= 1 and 0 <= r["outlier_fraction"] < 1
        assert all(math.isfinite(v) for v in r["losses"].values()) and r["losses"]["moco"] > 0
        assert len(r["val"]) == 2 and all(0 <= v["mAP"] <= 1 for v in r["val"])
        if "pseudo_labels" in r:
            assert 0 <= r["pseudo_labels"]["purity"] <= 1
    assert records[-1]["global_step"] == 4
    assert json.loads((full / "args.json").read_text())["epochs"] == 2  # the run-directory contract
    assert len((full / "log.txt").read_text().splitlines()) == len(read_log(full / "log.jsonl"))
    start = read_log(full / "log.jsonl")[0]
    assert start["images_per_batchnorm_per_domain"] == {"source": 8, "target": 8}

    best = reid.read_checkpoint(full / "model_best.pth")
    assert best["arch"] == "resnet18" and best["mAP"] == pytest.approx(summary["best_mAP"])
    model = reid.build_model("resnet18", num_classes=0)
    model.load_state_dict(best["state_dict"])  # strict: a plain model with the target BN branch
    import postprocess

    loaded, info = postprocess.load_model_for_inference(str(full / "model_best.pth"))
    assert info["arch"] == "resnet18"

    # interrupted after epoch 1, resumed for epoch 2: same result as the uninterrupted run
    resumed = tmp_path / "resumed"
    mmt_plus.main(tiny_args(tiny_data_root, resumed, inits, epochs=1) + ["--moco-queue-size", "20"])
    state = reid.read_checkpoint(resumed / "checkpoint.pth")
    assert state["epoch"] == 0 and state["global_step"] == 2 and len(state["moco_queues"]) == 2
    assert int(state["moco_queues"][0]["pointer"]) == 16  # 2 iterations x 8 target keys (queue of 20)
    mmt_plus.main(tiny_args(tiny_data_root, resumed, inits, epochs=2) + ["--moco-queue-size", "20", "--resume"])
    resumed_records = [r for r in read_log(resumed / "log.jsonl") if "losses" in r]
    assert [r["epoch"] for r in resumed_records] == [1, 2]
    assert resumed_records[1]["clusters"] == records[1]["clusters"]
    assert resumed_records[1]["losses"]["loss"] == pytest.approx(records[1]["losses"]["loss"], rel=1e-3)


def test_original_mmt_mode_runs(tmp_path, tiny_data_root, inits):
    summary = mmt_plus.main(tiny_args(tiny_data_root, tmp_path, inits, epochs=1) + ["--mode", "mmt"])
    record = [r for r in read_log(tmp_path / "log.jsonl") if "losses" in r][0]
    assert record["losses"]["moco"] == 0 and record["losses"]["triplet"] > 0 and record["losses"]["soft_triplet"] > 0
    assert summary["best_epoch"] == 1
    start = read_log(tmp_path / "log.jsonl")[0]
    assert start["images_per_batchnorm_per_domain"] == {"target": 8} and start["args"]["metric"] == "linear"
    assert start["args"]["camera_normalize"] == "none"


def test_camera_normalize_default_depends_on_the_mode(tmp_path, tiny_data_root, inits):
    # on by default for MMT+ (measured on two generator seeds, README), off for the published MMT; a flag wins
    base = tiny_args(tiny_data_root, tmp_path, inits, 1)
    assert mmt_plus.parse_args(base).camera_normalize == "mean"
    assert mmt_plus.parse_args(base + ["--mode", "mmt"]).camera_normalize == "none"
    assert mmt_plus.parse_args(base + ["--camera-normalize", "none"]).camera_normalize == "none"
    assert mmt_plus.parse_args(base + ["--mode", "mmt", "--camera-normalize", "meanstd"]).camera_normalize == "meanstd"


def test_bad_arguments_fail_clearly(tmp_path, tiny_data_root, inits):
    with pytest.raises(SystemExit):
        mmt_plus.parse_args(tiny_args(tiny_data_root, tmp_path, inits, 1) + ["--batch-size", "6"])
    with pytest.raises(SystemExit):
        mmt_plus.parse_args(tiny_args(tiny_data_root, tmp_path, (tmp_path / "missing.pth", inits[1]), 1))
    with pytest.raises(SystemExit):
        mmt_plus.parse_args(tiny_args(tiny_data_root, tmp_path, inits, 1) + ["--mode", "mmt", "--moco-weight", "0.1"])


def test_torchrun_two_processes(tmp_path, tiny_data_root, inits):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "mmt_plus.py"), *tiny_args(tiny_data_root, tmp_path, inits, epochs=1)]  # fmt: skip
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = read_log(tmp_path / "log.jsonl")
    assert log[0]["world_size"] == 2 and log[0]["images_per_batchnorm_per_domain"] == {"source": 4, "target": 4}
    record = [r for r in log if "losses" in r][0]
    assert record["clusters"] >= 1 and math.isfinite(record["losses"]["loss"])
    assert (tmp_path / "model_best.pth").exists()


# ---------------------------------------------------------------------------------------------------------------
# Training-dynamics options and diagnostics (issue #14)


def test_warmup_factor_values():
    assert [mmt_plus.warmup_factor(k, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [mmt_plus.warmup_factor(k, 0) for k in range(3)] == [1.0, 1.0, 1.0]
    assert mmt_plus.warmup_factor(0, 1) == 1.0


def test_camera_normalize_removes_a_planted_camera_offset():
    rng = np.random.default_rng(0)
    people = rng.normal(size=(6, 16))  # 6 identities, each seen by 3 cameras, 4 images per camera
    offsets = 5.0 * rng.normal(size=(3, 16))  # a strong per-camera offset (colour cast) dwarfing identity
    rows, pids, cams = [], [], []
    for pid in range(6):
        for cam in range(3):
            for _ in range(4):
                rows.append(people[pid] + offsets[cam] + 0.05 * rng.normal(size=16))
                pids.append(pid)
                cams.append(cam)
    features = torch.tensor(np.array(rows), dtype=torch.float32)
    pids, cams = np.array(pids), np.array(cams)

    def nearest_same(x):
        x = torch.nn.functional.normalize(x, dim=1)
        sim = x @ x.t()
        sim.fill_diagonal_(-2)
        nearest = sim.argmax(1).numpy()
        return (pids[nearest] == pids).mean(), (cams[nearest] == cams).mean()

    # raw: neighbours share the camera; the same images without the offsets: neighbours share the identity
    assert nearest_same(features)[1] == 1.0
    for scale in (False, True):
        normalized = mmt_plus.camera_normalize(features, cams, scale=scale)
        torch.testing.assert_close(normalized.norm(dim=1), torch.ones(len(features)))
        # reference from the definition: subtract each camera's mean (and divide by its std), then L2-normalise
        expected = np.array(rows)
        for cam in range(3):
            part = expected[cams == cam]
            part = part - part.mean(0)
            if scale:
                part = part / part.std(0)
            expected[cams == cam] = part
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        torch.testing.assert_close(normalized, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-4)
        identity_rate, _ = nearest_same(normalized)
        assert identity_rate == 1.0
    # the offset no longer matters: shifting every camera differently gives the same output
    shifted = features + torch.tensor(rng.normal(size=(3, 16)), dtype=torch.float32)[cams] * 3
    torch.testing.assert_close(
        mmt_plus.camera_normalize(shifted, cams), mmt_plus.camera_normalize(features, cams), atol=1e-5, rtol=1e-4
    )
    # a camera with a single image keeps its (normalised) feature
    lone = mmt_plus.camera_normalize(features[:5], np.array([0, 0, 0, 0, 7]))
    torch.testing.assert_close(lone[4], torch.nn.functional.normalize(features[4], dim=0))


def test_soft_target_entropy_against_hand_values():
    uniform = torch.zeros(3, 5)
    assert mmt_plus.soft_target_entropy(uniform) == pytest.approx(math.log(5))
    two_way = torch.tensor([[0.0, 0.0, -1e4]])  # half / half / 0
    assert mmt_plus.soft_target_entropy(two_way) == pytest.approx(math.log(2), abs=1e-6)
    logits = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)], [0.0, -1e4, -1e4]])
    by_hand = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / 2  # second row: one-hot, 0
    assert mmt_plus.soft_target_entropy(logits) == pytest.approx(by_hand, rel=1e-5)
    assert mmt_plus.soft_target_entropy(logits + 3.0) == pytest.approx(by_hand, rel=1e-5)  # shift-invariant


def nmi_from_definition(a: np.ndarray, b: np.ndarray) -> float:
    """I(A;B) / ((H(A) + H(B)) / 2) from the contingency table (sklearn's default arithmetic normalisation)."""
    n = len(a)
    ua, ub = np.unique(a), np.unique(b)
    joint = np.array([[np.sum((a == x) & (b == y)) for y in ub] for x in ua]) / n
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mutual = (joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum()
    entropy = lambda p: -(p[p > 0] * np.log(p[p > 0])).sum()  # noqa: E731
    denominator = (entropy(pa) + entropy(pb)) / 2
    return 1.0 if denominator == 0 else mutual / denominator


def test_clustering_agreement_against_hand_computed_nmi():
    # identical partitions (renamed) -> 1; the outliers of either side are left out
    assert mmt_plus.clustering_agreement(np.array([0, 0, 1, 1, -1]), np.array([5, 5, 2, 2, 3])) == pytest.approx(1)
    # hand-computed: A = [0 0 1 1], B = [0 1 0 1] are independent -> 0
    assert mmt_plus.clustering_agreement(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == pytest.approx(0, abs=1e-9)
    # A = [0 0 0 1], B = [0 0 1 1]: H(A) = H(.75,.25), H(B) = ln 2, I = H(B) - H(B|A) = ln2 - 3/4 H(2/3, 1/3)
    h = lambda *p: -sum(x * math.log(x) for x in p)  # noqa: E731
    expected = (math.log(2) - 0.75 * h(2 / 3, 1 / 3)) / ((h(0.75, 0.25) + math.log(2)) / 2)
    assert mmt_plus.clustering_agreement(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])) == pytest.approx(expected)
    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = rng.integers(-1, 6, size=80), rng.integers(-1, 4, size=80)
        keep = (a >= 0) & (b >= 0)
        assert mmt_plus.clustering_agreement(a, b) == pytest.approx(nmi_from_definition(a[keep], b[keep]))
    assert mmt_plus.clustering_agreement(np.array([-1, 0]), np.array([0, -1])) == 0.0


def test_similarity_correlation_against_hand_computation():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(30, 8))
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    a_t = torch.tensor(a)
    # a rotated copy ranks every pair alike
    assert mmt_plus.similarity_correlation(a_t, torch.tensor(a @ rotation)) == pytest.approx(1.0)
    b = a + rng.normal(size=(30, 8))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    i, j = np.triu_indices(30, k=1)
    expected = np.corrcoef((unit(a) @ unit(a).T)[i, j], (unit(b) @ unit(b).T)[i, j])[0, 1]
    assert mmt_plus.similarity_correlation(a_t, torch.tensor(b)) == pytest.approx(expected)
    unrelated = mmt_plus.similarity_correlation(a_t, torch.tensor(rng.normal(size=(30, 8))))
    assert abs(unrelated) < 0.3
    # subsampling keeps evenly spaced rows
    rows = np.unique(np.round(np.linspace(0, 29, 10)).astype(int))
    i, j = np.triu_indices(len(rows), k=1)
    sub = np.corrcoef((unit(a[rows]) @ unit(a[rows]).T)[i, j], (unit(b[rows]) @ unit(b[rows]).T)[i, j])[0, 1]
    assert mmt_plus.similarity_correlation(a_t, torch.tensor(b), max_rows=10) == pytest.approx(sub)


def test_warmup_camera_normalization_and_teacher_diagnostics_in_a_run(tmp_path, tiny_data_root, inits):
    extra = ["--warmup-iters", "4", "--camera-normalize", "meanstd", "--lr", "1e-4"]
    mmt_plus.main(tiny_args(tiny_data_root, tmp_path, inits, epochs=1) + extra)
    record = [r for r in read_log(tmp_path / "log.jsonl") if "losses" in r][0]
    assert record["lr"] == pytest.approx(1e-4 * 2 / 4)  # 2 iterations: the second step ran at 2/4 of the rate
    teachers = record["teachers"]
    assert -1 <= teachers["similarity_correlation"] <= 1 and 0 <= teachers["clustering_nmi"] <= 1
    assert len(teachers["clusters"]) == 2
    assert record["losses"]["soft_target_entropy"] >= 0


def test_zero_learning_rate_only_re_estimates_batchnorm(tmp_path, tiny_data_root, inits):
    """The BN-only control (--lr 0): every weight keeps its initial value; only BN running statistics move."""
    reid = pytest.importorskip("reid")
    mmt_plus.main(tiny_args(tiny_data_root, tmp_path, inits, epochs=1) + ["--lr", "0", "--no-teacher-diagnostics"])
    state = reid.read_checkpoint(tmp_path / "checkpoint.pth")
    initial = reid.read_checkpoint(inits[0])["state_dict"]
    student = state["students"][0]
    changed_stats = 0
    for key, value in student.items():
        plain = key.replace(".bn_target", "").replace(".bn_source", "")
        if plain not in initial or key.startswith("classifier."):
            continue
        if key.endswith(("running_mean", "running_var")):
            changed_stats += int(".bn_target" in key and not torch.equal(value, initial[plain]))
        elif not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, initial[plain], rtol=0, atol=0, msg=key)
    assert changed_stats > 0
