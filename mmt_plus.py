"""Stage III: Improved Mutual Mean-Teaching (MMT+), and the original MMT for the ablation.

Slides ("Improved Mutual Mean-Teaching (MMT+) framework") and docs/differences.md#mmt:

  * two students initialised from two pre-trained checkpoints (--init-1, --init-2: pretrain.py runs with different
    seeds) and their two mean teachers (exponential moving average of the students' parameters, alpha 0.999 with the
    ramp alpha_t = min(1 - 1/(t+1), alpha));
  * every epoch, pseudo labels: the averaged, L2-normalised teacher features of the target training set ->
    sparse k-reciprocal Jaccard graph (reid_ops.jaccard_graph, k1 20, k2 6) -> DBSCAN (eps 0.6, min_samples 4) on
    the sparse graph -> outliers left out for the epoch -> target classes appended after the source identities;
    the target rows of all four heads are set to the L2-normalised cluster centroids;
  * domain-specific BatchNorm: every BatchNorm (BNNeck and the BN half of IBN layers included) becomes a pair
    (BN_S, BN_T); training batches are [source ; target] so each branch sees one domain; BN_T at test time;
  * losses per student i (j = the other pair):  (1 - w) * LSCE(z_i, y) + w * SoftCE(z_i <- teacher_j)
    + optional hard / soft softmax-triplet + 0.1 * MoCo(student_i queries, teacher_i keys, queue_i) on target rows;
  * ArcFace / CosFace heads (or a plain linear one), Adam 3.5e-4, optimiser reset at every re-clustering.

`--mode mmt` trains the original MMT (Ge et al., ICLR 2020) from the same script: target batches only, plain BN,
no MoCo, linear head, the MMT paper's DBSCAN-script weights (soft CE 0.5, hard triplet 0.2, soft triplet 0.8).

Where the slides and the release differ we follow the slides; the release's way is a flag (docs/differences.md#mmt):
  * Adam is reset at every re-clustering (slides); --keep-optimizer-state = the release's fp16 run;
  * the teachers' soft labels are their plain s*cos logits (slides' E[C](E[F](x))); --teacher-margin = release;
  * the pre-trained source classifier seeds the source rows of the head; --no-init-source-rows = release;
  * the BNNeck bias stays frozen after the DSBN conversion (the release's conversion unfreezes it).
Kept as in the release: teachers run in train mode (per-domain batch statistics, see train loop), the MoCo key is
the own teacher's output on the same view, outliers are dropped for the epoch, triplet weights 0 in MMT+.

Checkpoints (LOGS_DIR): checkpoint.pth (resume state of the whole run) and model_best.pth, the better mean teacher
of the best epoch on target validation; both hold under "state_dict" a plain model (target BN branch, no head)
that loads into `reid.build_model(arch, num_classes=0)`, which is what postprocess.py reads.

    python mmt_plus.py --data-root DATA --arch resnet50_ibn --init-1 A/model_best.pth --init-2 B/model_best.pth
    python mmt_plus.py --preset demo --data-root DATA --init-1 ... --init-2 ...      # minutes on 2 CPU cores
    python mmt_plus.py --mode mmt ...                                                 # the original MMT
    torchrun --nproc_per_node=2 mmt_plus.py ...                                       # DDP
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.cluster import DBSCAN
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import nn

import reid_ops
from reid import (
    PROGRESS_MIN_ITEMS,
    DecodedImageCache,
    ImageDataset,
    IterLoader,
    JsonlLogger,
    RandomIdentitySampler,
    add_dataset_arguments,
    add_preset_argument,
    add_run_dir_arguments,
    add_runtime_arguments,
    autocast_context,
    build_train_transform,
    evaluate,
    extract_features,
    is_main_process,
    label_smoothed_ce,
    load_model,
    make_loader,
    parse_with_preset,
    prepare_run_dir,
    progress,
    rank_and_world_size,
    read_checkpoint,
    require_positive,
    resolve_datasets,
    rng_state,
    run_cli,
    save_checkpoint,
    set_rng_state,
    set_seed,
    soft_triplet_loss,
    softmax_triplet_loss,
    split_global_batch,
    start_run,
    unwrap_ddp,
    wrap_ddp,
    write_curves,
)

# --preset demo: the embedded synthetic benchmark on 2 CPU cores in a few minutes. Explicit flags still win.
# 96x48 as pretrain.py's demo preset; 3 short epochs at lr 3.5e-5 (from a from-scratch ResNet-18, the release's 3.5e-4
# wrecked the init in 20-iteration epochs: 49.6 / 47.3 -> 35.7 / 39.2 val mAP). Longer runs learn more with
# --warmup-iters and --ema-alpha (README, "MMT+ from a stronger source model": lr 1e-4, 3 x 60 iterations).
PRESETS = {"demo": dict(arch="resnet18", height=96, width=48, batch_size=32, epochs=3, iters=20, lr=3.5e-5)}

# ---- Domain-specific BatchNorm


class DomainSpecificBatchNorm(nn.Module):
    """A BatchNorm split into a source branch (BN_S) and a target branch (BN_T), both copies of the pre-trained BN.

    Training mode: the batch is [source rows ; target rows]; the first `source_size` rows go through BN_S and the
    rest through BN_T (`source_size` None = equal halves, which needs an even batch). Eval mode: BN_T for everything.
    """

    def __init__(self, batchnorm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.bn_source = copy.deepcopy(batchnorm)
        self.bn_target = copy.deepcopy(batchnorm)
        self.source_size: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.bn_target(x)
        rows = x.shape[0]
        split = self.source_size
        if split is None:
            if rows % 2:
                raise ValueError(
                    f"DomainSpecificBatchNorm: a training batch of {rows} rows cannot be split into equal "
                    "[source ; target] halves; give an even batch or set source_size (set_source_size)"
                )
            split = rows // 2
        if not 0 <= split <= rows:
            raise ValueError(f"DomainSpecificBatchNorm: source_size {split} outside a batch of {rows} rows")
        if split == 0:
            return self.bn_target(x)
        if split == rows:
            return self.bn_source(x)
        return torch.cat([self.bn_source(x[:split]), self.bn_target(x[split:])], dim=0)


def convert_dsbn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d of `model` (in place) by a DomainSpecificBatchNorm initialised from it.

    InstanceNorm (the IN half of IBN layers) is left alone. The BN modules are deep-copied with their
    `requires_grad` flags, so the BNNeck bias frozen by reid.build_model stays frozen (the release's conversion
    makes it trainable as a side effect, docs/differences.md#mmt; we keep the pre-training design)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, DomainSpecificBatchNorm(child))
        elif not isinstance(child, DomainSpecificBatchNorm):
            convert_dsbn(child)
    return model


def set_source_size(model: nn.Module, source_size: int | None) -> None:
    """Number of leading source rows of the next training batches in every DSBN layer (None = equal halves)."""
    for module in model.modules():
        if isinstance(module, DomainSpecificBatchNorm):
            module.source_size = source_size


def collapse_dsbn(model: nn.Module, branch: str = "target") -> nn.Module:
    """A copy of `model` in which every DomainSpecificBatchNorm is replaced by its `branch` BN ("target"/"source"):
    a plain model whose state_dict loads into the architecture it was converted from."""
    if branch not in ("target", "source"):
        raise ValueError(f"collapse_dsbn: branch must be 'target' or 'source', got {branch!r}")
    plain = copy.deepcopy(model)

    def replace(module: nn.Module) -> None:
        for name, child in list(module.named_children()):
            if isinstance(child, DomainSpecificBatchNorm):
                setattr(module, name, child.bn_target if branch == "target" else child.bn_source)
            else:
                replace(child)

    replace(plain)
    return plain


# ---- Classifier heads. forward(features, labels=None); only the first `num_active_classes` rows are used (source ids
# followed by the current epoch's clusters; later rows are the upper bound C_max = #source ids + #target images).


class MarginHead(nn.Module):
    """ArcFace ("arc") or CosFace ("cos") head on the BNNeck feature (docs/differences.md#mmt).

    cos_theta = <f/|f|, W_c/|W_c|>. ArcFace: the labelled class gets s * cos(theta + m), with the usual fallback
    cos_theta - m * sin(pi - m) where theta + m would pass pi (cos_theta <= cos(pi - m)). CosFace: s * (cos_theta - m).
    Without labels (inference, mean-teacher soft labels) the logits are s * cos_theta."""

    def __init__(self, in_features: int, num_classes: int, metric: str = "arc", scale: float = 64.0, margin=0.35):
        super().__init__()
        if metric not in ("arc", "cos"):
            raise ValueError(f"MarginHead: metric must be 'arc' or 'cos', got {metric!r}")
        self.metric, self.scale, self.margin = metric, float(scale), float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.num_active_classes = num_classes

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):  # fp32 cosines: s = 64 magnifies bf16 rounding
            return self._logits(features.float(), self.weight[: self.num_active_classes].float(), labels)

    def _logits(self, features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.metric == "arc":
            cosine = F.normalize(features, dim=1) @ F.normalize(weight, dim=1).t()
        else:
            norms = features.norm(dim=1, keepdim=True) * weight.norm(dim=1)[None, :]
            cosine = (features @ weight.t()) / norms.clamp_min(1e-8)
        if labels is None:
            return self.scale * cosine
        one_hot = F.one_hot(labels, self.num_active_classes).to(cosine.dtype)
        if self.metric == "arc":
            sine = (1.0 - cosine.pow(2)).clamp_min(0.0).sqrt()
            phi = cosine * math.cos(self.margin) - sine * math.sin(self.margin)
            phi = torch.where(
                cosine > math.cos(math.pi - self.margin), phi, cosine - self.margin * math.sin(math.pi - self.margin)
            )
            return self.scale * (one_hot * phi + (1.0 - one_hot) * cosine)
        return self.scale * (cosine - self.margin * one_hot)


class LinearHead(nn.Module):
    """Plain bias-free linear classifier (the original MMT); labels are accepted and ignored."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=0.001)
        self.num_active_classes = num_classes

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return features.float() @ self.weight[: self.num_active_classes].float().t()


def build_head(metric: str, in_features: int, num_classes: int, scale: float, margin: float) -> nn.Module:
    if metric == "linear":
        return LinearHead(in_features, num_classes)
    return MarginHead(in_features, num_classes, metric, scale, margin)


# ---- Losses, MoCo memory, EMA


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """MMT's mutual loss: mean_i sum_k -softmax(teacher)_ik log softmax(student)_ik, teacher detached."""
    targets = F.softmax(teacher_logits.detach().float(), dim=1)
    return -(targets * F.log_softmax(student_logits.float(), dim=1)).sum(dim=1).mean()


class MocoQueue(nn.Module):
    """MoCo memory of one student / mean-teacher pair: K unit-norm keys (rows) and a write pointer, both buffers so
    that they are saved in checkpoints and persist across epochs (re-clustering does not touch them)."""

    def __init__(
        self, feature_dim: int, size: int, temperature: float = 0.07, generator: torch.Generator | None = None
    ):
        super().__init__()
        if size < 1:
            raise ValueError(f"MocoQueue: size must be >= 1, got {size}")
        self.temperature = float(temperature)
        self.register_buffer("keys", F.normalize(torch.randn(size, feature_dim, generator=generator), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    def loss(self, queries: torch.Tensor, keys: torch.Tensor, enqueue_keys: torch.Tensor | None = None) -> torch.Tensor:
        """InfoNCE: logits [q.k+, q.queue] / tau with the positive at index 0 (slides' MoCo loss); then the keys
        (`enqueue_keys`, e.g. gathered from all processes, default `keys`) are written into the queue."""
        queries = F.normalize(queries.float(), dim=1)
        keys = F.normalize(keys.detach().float(), dim=1)
        positive = (queries * keys).sum(dim=1, keepdim=True)
        negative = queries @ self.keys.clone().t()  # copy: the in-place enqueue must not alter saved tensors
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(queries), dtype=torch.long, device=queries.device))
        self.enqueue(keys if enqueue_keys is None else F.normalize(enqueue_keys.detach().float(), dim=1))
        return loss

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        size = self.keys.shape[0]
        keys = keys[-size:]  # more keys than slots: only the newest fit
        start = int(self.pointer)
        positions = (start + torch.arange(len(keys), device=self.keys.device)) % size
        self.keys[positions] = keys.to(self.keys.dtype)
        self.pointer.fill_((start + len(keys)) % size)


def warmup_factor(steps_since_reset: int, warmup_iters: int) -> float:
    """Learning-rate factor of the k-th optimiser step after a fresh Adam (k = steps_since_reset, from 0): linear
    warm-up (k + 1) / W for the first W steps, then 1 (W = 0: none). A fresh Adam's first update is about
    lr * sign(gradient) on every weight, whatever the gradient's size; ramping lr over W steps lets the moment
    estimates settle before the steps reach full size."""
    return 1.0 if warmup_iters <= 0 else min(1.0, (steps_since_reset + 1) / warmup_iters)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float, global_step: int) -> float:
    """Mean teacher: theta_T <- a theta_T + (1 - a) theta_S over parameters only (BN running statistics are the
    teacher's own), with the ramp a = min(1 - 1/(t + 1), alpha) (t = 0 copies the student). Returns a."""
    decay = min(1.0 - 1.0 / (global_step + 1), alpha)
    for teacher_param, student_param in zip(teacher.parameters(), student.parameters(), strict=True):
        teacher_param.mul_(decay).add_(student_param.detach(), alpha=1.0 - decay)
    return decay


# ---- Pseudo labels


def cluster_features(
    features: torch.Tensor | np.ndarray, k1: int = 20, k2: int = 6, eps: float = 0.6, min_samples: int = 4
) -> np.ndarray:
    """DBSCAN labels (-1 = outlier) of L2-normalised features on the sparse k-reciprocal Jaccard graph
    (docs/differences.md#clustering-jaccard-distance).

    The graph stores every pair closer than slightly more than eps (DBSCAN itself applies <= eps), the diagonal as
    explicit zeros; pairs not stored are "not neighbours" for sklearn's sparse precomputed metric. No dense N x N."""
    features = torch.as_tensor(features).float().contiguous()
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"cluster_features: expected an (N, D) feature matrix, got shape {tuple(features.shape)}")
    # two long calls, shown as the two phases of a progress display (plain lines with rate and ETA in a log file)
    bar = progress(total=2, desc="clustering", unit="phase", disable=len(features) < PROGRESS_MIN_ITEMS)
    graph = reid_ops.jaccard_graph(features, k1=k1, k2=k2, max_distance=min(1.0, eps + 1e-4))
    bar.set_postfix(done=f"Jaccard graph of {len(features)} images")
    bar.update()
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(graph)
    bar.set_postfix(done=f"DBSCAN, {int(labels.max()) + 1} clusters")
    bar.update()
    bar.close()
    return labels


def cluster_centroids(features: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """(C, D) L2-normalised mean feature of each cluster 0..C-1 (outliers ignored)."""
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    keep = labels_t >= 0
    num_clusters = int(labels_t.max()) + 1 if keep.any() else 0
    sums = torch.zeros(num_clusters, features.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels_t[keep], features[keep].double())
    return F.normalize(sums, dim=1).float()


def camera_normalize(features: torch.Tensor, camids: np.ndarray | torch.Tensor, scale: bool = False) -> torch.Tensor:
    """Features with each camera's mean feature removed (and, with `scale`, every dimension divided by that camera's
    standard deviation), then L2-normalised: a per-camera offset (a camera's colour cast or scenery shifting all its
    images the same way) no longer pulls same-camera images of different people together before clustering.
    A camera with one image keeps its feature (its mean would be the image itself)."""
    features = torch.as_tensor(features).float()
    cams = torch.as_tensor(np.asarray(camids))
    if len(cams) != len(features):
        raise ValueError(f"camera_normalize: {len(features)} features but {len(cams)} camera ids")
    out = features.clone()
    for cam in torch.unique(cams).tolist():
        rows = cams == cam
        if int(rows.sum()) < 2:
            continue
        centred = features[rows] - features[rows].mean(dim=0, keepdim=True)
        if scale:
            centred = centred / features[rows].std(dim=0, unbiased=False, keepdim=True).clamp_min(1e-6)
        out[rows] = centred
    return F.normalize(out, dim=1)


def soft_target_entropy(teacher_logits: torch.Tensor) -> float:
    """Mean entropy (nats) of the teachers' soft targets softmax(logits) over the batch: near 0 = one-hot targets
    (the mutual loss then adds little beyond a hard label), log(classes) = uniform."""
    log_probs = F.log_softmax(teacher_logits.detach().float(), dim=1)
    return float(-(log_probs.exp() * log_probs).sum(dim=1).mean())


def clustering_agreement(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """NMI between two clusterings of the same images, over the images that neither leaves out (label >= 0); 0 if
    none. Between the two teachers' separate clusterings: near 1 = the teachers see the same structure (mutual
    teaching has little to exchange), lower = complementary views."""
    labels_a, labels_b = np.asarray(labels_a), np.asarray(labels_b)
    keep = (labels_a >= 0) & (labels_b >= 0)
    if not keep.any():
        return 0.0
    return float(normalized_mutual_info_score(labels_a[keep], labels_b[keep]))


def similarity_correlation(features_a: torch.Tensor, features_b: torch.Tensor, max_rows: int = 2000) -> float:
    """Pearson correlation between the two networks' pairwise cosine similarities (all pairs i < j of at most
    `max_rows` evenly spaced rows): 1 = the two embeddings rank every pair alike (near-clones), independent of any
    rotation of the feature space, so it also compares networks whose feature dimensions do not correspond."""
    if len(features_a) != len(features_b):
        raise ValueError(f"similarity_correlation: {len(features_a)} vs {len(features_b)} rows")
    rows = torch.linspace(0, len(features_a) - 1, min(max_rows, len(features_a))).round().long().unique()
    if len(rows) < 3:
        return float("nan")
    a, b = (F.normalize(torch.as_tensor(f)[rows].double(), dim=1) for f in (features_a, features_b))
    upper = torch.triu_indices(len(rows), len(rows), offset=1)
    sim_a, sim_b = (a @ a.t())[upper[0], upper[1]], (b @ b.t())[upper[0], upper[1]]
    sim_a, sim_b = sim_a - sim_a.mean(), sim_b - sim_b.mean()
    return float((sim_a * sim_b).sum() / (sim_a.norm() * sim_b.norm()).clamp_min(1e-12))


def _majority_fraction(groups: np.ndarray, values: np.ndarray) -> float:
    """Fraction of items whose value is the most common value of their group (the usual cluster purity)."""
    best: dict[int, int] = {}
    for (group, _), count in Counter(zip(groups.tolist(), values.tolist(), strict=True)).items():
        best[group] = max(best.get(group, 0), count)
    return sum(best.values()) / len(groups) if len(groups) else 0.0


def pseudo_label_quality(labels: np.ndarray, true_ids: np.ndarray, camids: np.ndarray | None = None) -> dict:
    """NMI / ARI / purity of the clustered (non-outlier) images against the ground-truth identities.

    With `camids`, also the camera purity of the clusters (fraction of clustered images taken by their cluster's
    most common camera) beside the same measure for the true identities of those images: clusters much more
    camera-pure than the identities mean the features group images by camera style rather than by person."""
    keep = labels >= 0
    if not keep.any():
        empty = {"nmi": 0.0, "ari": 0.0, "purity": 0.0}
        return {**empty, "camera_purity": 0.0, "true_camera_purity": 0.0} if camids is not None else empty
    quality = {
        "nmi": float(normalized_mutual_info_score(true_ids[keep], labels[keep])),
        "ari": float(adjusted_rand_score(true_ids[keep], labels[keep])),
        "purity": _majority_fraction(labels[keep], true_ids[keep]),
    }
    if camids is not None:
        quality["camera_purity"] = _majority_fraction(labels[keep], camids[keep])
        quality["true_camera_purity"] = _majority_fraction(true_ids[keep], camids[keep])
    return quality


def oracle_labels(true_ids: np.ndarray) -> np.ndarray:
    """DIAGNOSTICS ONLY (--oracle-pseudo-labels): the ground-truth identities as pseudo labels 0..C-1, identities
    with a single image (the benchmark's passers-by) as outliers (-1), as a perfect clustering would leave them."""
    counts = Counter(true_ids.tolist())
    kept = sorted(pid for pid, count in counts.items() if count > 1)
    mapping = {pid: label for label, pid in enumerate(kept)}
    return np.array([mapping.get(pid, -1) for pid in true_ids.tolist()], dtype=np.int64)


def pseudo_labels(features: torch.Tensor, camids: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """DBSCAN labels of the (averaged teacher) features, after --camera-normalize if asked."""
    if args.camera_normalize != "none":
        features = camera_normalize(features, camids, scale=args.camera_normalize == "meanstd")
    return cluster_features(features, args.k1, args.k2, args.eps, args.min_samples)


def teacher_agreement(teacher_features: Sequence[torch.Tensor], camids: np.ndarray, args) -> dict:
    """How alike the two mean teachers are (diagnostics): the correlation of their pairwise similarities and the NMI
    between their separate clusterings (same clustering settings as the pseudo labels)."""
    separate = [pseudo_labels(f, camids, args) for f in teacher_features]
    return {
        "similarity_correlation": similarity_correlation(teacher_features[0], teacher_features[1]),
        "clustering_nmi": clustering_agreement(separate[0], separate[1]),
        "clusters": [int(labels.max()) + 1 if (labels >= 0).any() else 0 for labels in separate],
    }


# ---- Data and distributed helpers


class TwoViews:
    """Two independent augmentations of the same image (the release's "mutual" preprocessor): view 1 feeds student
    1 and teacher 1, view 2 feeds student 2 and teacher 2."""

    def __init__(self, transform):
        self.transform, self.draws_from_generator = transform, getattr(transform, "draws_from_generator", False)

    def __call__(self, image, *generator):  # generator: given when the transform draws from one (ImageDataset)
        return self.transform(image, *generator), self.transform(image, *generator)


def make_two_view_loader(items, transform, cache, batch_size: int, seed: int, epoch: int, args) -> IterLoader:
    """`args.iters` P x 4 batches of two-view samples, ready to read. The sampler shards identities across DDP
    processes, and its stream and every sample's augmentation seed are functions of (seed, epoch), so a resumed run
    sees the same batches."""
    sampler = RandomIdentitySampler(items, 4, seed, num_samples=args.iters * batch_size, seed_samples=True)
    sampler.set_epoch(epoch)
    dataset = ImageDataset(items, TwoViews(transform), args.skip_bad_images, cache)
    loader = IterLoader(make_loader(dataset, sampler, batch_size, args.workers, persistent=False), args.iters)
    loader.new_epoch()
    return loader


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate (rank order) the rows every process holds; sizes may differ by process."""
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([len(tensor)]))
    longest = int(max(sizes))
    padded = torch.zeros(longest, *tensor.shape[1:], dtype=tensor.dtype)
    padded[: len(tensor)] = tensor.cpu()
    parts = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(size)] for part, size in zip(parts, sizes, strict=True)]).to(tensor.device)


def distributed_features(model: nn.Module, items, args, device, cache=None) -> torch.Tensor:
    """Eval-mode features of `items` (in order), each process extracting every world_size-th item."""
    rank, world_size = rank_and_world_size()
    shard = items[rank::world_size]
    settings = dict(batch_size=args.test_batch_size, workers=args.workers, device=device, cache=cache)
    local = extract_features(model, shard, args.height, args.width, **settings)
    gathered = gather_rows(local.float().cpu())
    if world_size == 1:
        return gathered
    # undo the interleaving: process r held items r, r + W, r + 2W, ...
    counts = [len(items[r::world_size]) for r in range(world_size)]
    ordered = torch.empty(len(items), gathered.shape[1])
    offset = 0
    for r, count in enumerate(counts):
        ordered[r::world_size] = gathered[offset : offset + count]
        offset += count
    return ordered


# ---- Training


def load_init(path: str, arch: str, head_args: dict, num_source_classes: int, use_source_rows: bool) -> nn.Module:
    """A plain pretrain.py network from checkpoint `path` whose classifier is a new head
    `build_head(in_features=D, **head_args)`. The pre-trained source classifier rows are copied into the head's first
    rows when `use_source_rows` (the release cannot load them into its bigger head and restarts the source
    prototypes from Xavier noise, docs/differences.md#mmt)."""
    model, checkpoint = load_model(path, arch=arch, what="--init")
    classifier = checkpoint["state_dict"].get("classifier.weight")
    head = build_head(in_features=model.feature_dim, **head_args)
    if use_source_rows and classifier is not None and num_source_classes > 0:
        if tuple(classifier.shape) != (num_source_classes, model.feature_dim):
            raise ValueError(
                f"{path}: classifier has shape {tuple(classifier.shape)}, expected ({num_source_classes}, "
                f"{model.feature_dim}) for the source identities; pass --no-init-source-rows to start them at random"
            )
        with torch.no_grad():
            head.weight[:num_source_classes] = classifier.float()
    model.classifier = head
    return model


def plain_state(teacher: nn.Module) -> dict:
    """State dict of the teacher as a plain model with the target BN branch and without the head."""
    plain = collapse_dsbn(teacher, "target")
    return {k: v.detach().cpu().clone() for k, v in plain.state_dict().items() if not k.startswith("classifier.")}


def train_one_epoch(
    students, teachers, queues, optimizer, source_loader, target_loader, epoch, global_step, args, device
) -> tuple[dict, int]:
    """`args.iters` iterations of MMT+ (or MMT). Returns the mean losses and the new global step."""
    rank, world_size = rank_and_world_size()
    use_source = args.mode == "mmt+"
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    sums: dict[str, float] = defaultdict(float)
    bar = progress(
        range(args.iters), desc=f"{args.mode} epoch {epoch + 1}/{args.epochs}", disable=not is_main_process()
    )
    for iteration in bar:
        steps_since_reset = global_step if args.keep_optimizer_state else iteration
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup_factor(steps_since_reset, args.warmup_iters)
        (target_1, target_2), target_labels, _, _ = target_loader.next()
        views, labels = [target_1, target_2], target_labels
        source_rows = 0
        if use_source:
            (source_1, source_2), source_labels, _, _ = source_loader.next()
            source_rows = len(source_labels)
            views = [torch.cat([source_1, target_1]), torch.cat([source_2, target_2])]
            labels = torch.cat([source_labels, target_labels])
        views = [v.to(device, memory_format=memory_format, non_blocking=True) for v in views]
        labels = labels.to(device)
        for network in (*students, *teachers):
            set_source_size(network, source_rows if use_source else None)

        with autocast_context(device, args.amp):
            outputs = [students[i](views[i], labels) for i in range(2)]
            with torch.no_grad():
                teacher_labels = labels if args.teacher_margin else None
                teacher_outputs = [teachers[i](views[i], teacher_labels) for i in range(2)]
        terms = {"ce": 0.0, "soft_ce": 0.0, "triplet": 0.0, "soft_triplet": 0.0, "moco": 0.0}
        for i in range(2):
            f_pool, f_bn, logits = outputs[i]
            other_pool, _, other_logits = teacher_outputs[1 - i]
            terms["ce"] = terms["ce"] + label_smoothed_ce(logits.float(), labels, epsilon=args.label_smoothing)
            terms["soft_ce"] = terms["soft_ce"] + soft_cross_entropy(logits, other_logits)
            several_ids = bool((labels != labels[0]).any())  # triplets need a negative for every anchor
            if args.triplet_weight > 0 and several_ids:
                terms["triplet"] = terms["triplet"] + softmax_triplet_loss(f_pool.float(), labels)
            if args.soft_triplet_weight > 0 and several_ids:
                terms["soft_triplet"] = terms["soft_triplet"] + soft_triplet_loss(
                    f_pool.float(), labels, other_pool.float().detach()
                )
            if args.moco_weight > 0:
                # query: student's target rows; key: its OWN teacher on the same view (slides' MoCo loss)
                queries, keys = f_bn[source_rows:], teacher_outputs[i][1][source_rows:].float()
                all_keys = gather_rows(keys.detach()) if world_size > 1 else None
                terms["moco"] = terms["moco"] + queues[i].loss(queries, keys, all_keys)
        loss = (
            (1 - args.soft_ce_weight) * terms["ce"]
            + args.soft_ce_weight * terms["soft_ce"]
            + args.triplet_weight * terms["triplet"]
            + args.soft_triplet_weight * terms["soft_triplet"]
            + args.moco_weight * terms["moco"]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for i in range(2):
            ema_update(teachers[i], unwrap_ddp(students[i]), args.ema_alpha, global_step)
        global_step += 1
        for name, value in [("loss", loss), *terms.items()]:
            sums[name] += float(value.detach() if torch.is_tensor(value) else value)
        sums["soft_target_entropy"] += sum(soft_target_entropy(teacher_outputs[i][2]) / 2 for i in range(2))
        sums["precision"] += float(sum((outputs[i][2].argmax(1) == labels).float().mean() for i in range(2)) / 2)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return {name: value / args.iters for name, value in sums.items()}, global_step


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_preset_argument(parser, PRESETS)
    parser.add_argument(
        "--mode",
        choices=["mmt+", "mmt"],
        default="mmt+",
        help="mmt+: DSBN, joint source batches, MoCo; mmt: the original MMT (target only)",
    )
    # data
    add_dataset_arguments(parser, ("source", "target", "val"), source="personx")  # release: raw personx
    parser.add_argument("--logs-dir", default="logs/mmt", help="output: checkpoint.pth, model_best.pth, log.jsonl")
    parser.add_argument("--height", type=int, default=256, help="input height (release: 384)")
    parser.add_argument("--width", type=int, default=128, help="input width")
    parser.add_argument(
        "--random-erasing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random erasing (release: on, both domains)",
    )
    # model
    parser.add_argument("--arch", default="resnet50_ibn", help="backbone (reid.build_model)")
    parser.add_argument("--init-1", required=True, help="pretrain.py checkpoint of student/teacher 1")
    parser.add_argument("--init-2", required=True, help="pretrain.py checkpoint of student/teacher 2 (other seed)")
    parser.add_argument(
        "--metric",
        choices=["arc", "cos", "linear"],
        help="head: ArcFace, CosFace or bias-free linear (default: arc for mmt+, linear for mmt)",
    )
    parser.add_argument("--scale", type=float, default=64.0, help="s of the margin heads (official script: 64)")
    parser.add_argument("--margin", type=float, default=0.35, help="m of the margin heads (official script: 0.35)")
    parser.add_argument(
        "--init-source-rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="copy the pre-trained source classifier into the head's source rows (release: no, they restart at random)",
    )
    # clustering
    parser.add_argument("--k1", type=int, default=20, help="Jaccard graph: k-reciprocal neighbours")
    parser.add_argument("--k2", type=int, default=6, help="Jaccard graph: query-expansion neighbours")
    parser.add_argument("--eps", type=float, default=0.6, help="DBSCAN eps (Jaccard distance)")
    parser.add_argument("--min-samples", type=int, default=4, help="DBSCAN min_samples (self included)")
    parser.add_argument(
        "--camera-normalize",
        choices=["none", "mean", "meanstd"],
        help="before clustering, remove each target camera's mean feature (mean) and scale (meanstd) from the "
        "teachers' features, so that clusters follow people rather than camera looks (default: mean for mmt+, "
        "none for --mode mmt as published; release: none; README, 'MMT+ from a stronger source model')",
    )
    parser.add_argument(
        "--teacher-diagnostics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log per epoch how alike the two teachers are: correlation of their pairwise similarities and NMI "
        "between their separate clusterings (two extra clusterings per epoch)",
    )
    parser.add_argument(
        "--oracle-pseudo-labels",
        action="store_true",
        help="DIAGNOSTICS ONLY: use the embedded benchmark's ground-truth target identities (diagnostics/) instead "
        "of DBSCAN, to tell pseudo-label noise from the training itself; never a method",
    )
    # losses
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="epsilon of the label-smoothed CE")
    parser.add_argument("--soft-ce-weight", type=float, help="w: (1-w) LSCE + w soft CE (other teacher), default 0.5")
    parser.add_argument(
        "--triplet-weight", type=float, help="hard softmax-triplet weight (default 0 as the release; mmt: 0.2)"
    )
    parser.add_argument(
        "--soft-triplet-weight", type=float, help="soft triplet weight (default 0 as the release; mmt: 0.8)"
    )
    parser.add_argument("--moco-weight", type=float, help="MoCo loss weight (default 0.1; mmt: 0)")
    parser.add_argument(
        "--moco-queue-size", type=int, help="MoCo keys per queue (default: batch-size x iters, release 12,800)"
    )
    parser.add_argument("--moco-temperature", type=float, default=0.07, help="MoCo tau (code 0.07; report typo 0.7)")
    parser.add_argument(
        "--teacher-margin",
        action="store_true",
        help="give the teachers the labels so their soft targets include the margin (release "
        "behaviour, docs/differences.md#mmt); default: plain s*cos logits, the slides' mean classifier output",
    )
    # optimisation
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per domain per iteration, all processes together (P x 4 instances)",
    )
    parser.add_argument("--lr", type=float, default=3.5e-4, help="Adam learning rate (constant)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="coupled L2 weight decay")
    parser.add_argument("--epochs", type=int, default=40, help="epochs (= re-clusterings); release 40")
    parser.add_argument("--iters", type=int, default=200, help="iterations per epoch")
    parser.add_argument("--ema-alpha", type=float, default=0.999, help="mean-teacher EMA alpha")
    parser.add_argument(
        "--warmup-iters",
        type=int,
        default=0,
        help="linear lr warm-up over the first N steps after every optimiser reset (or after the start with "
        "--keep-optimizer-state); 0 = none (release)",
    )
    parser.add_argument(
        "--keep-optimizer-state",
        action="store_true",
        help="keep Adam moments across re-clusterings (the release's fp16 run); default: reset "
        "(slides: 'reset optimizers upon re-clustering')",
    )
    add_runtime_arguments(
        parser, "autocast for training (bf16 on CPU, fp16 on CUDA); evaluation and clustering are fp32"
    )
    parser.add_argument("--test-batch-size", type=int, default=128, help="feature-extraction batch")
    parser.add_argument(
        "--eval-initial",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate the initial teachers (= pre-trained models) before epoch 1",
    )
    add_run_dir_arguments(parser, "LOGS_DIR")
    args = parse_with_preset(parser, PRESETS, argv)
    mmt = args.mode == "mmt"
    defaults = dict(
        metric="linear" if mmt else "arc",
        soft_ce_weight=0.5,
        triplet_weight=0.2 if mmt else 0.0,
        soft_triplet_weight=0.8 if mmt else 0.0,
        moco_weight=0.0 if mmt else 0.1,
        moco_queue_size=args.batch_size * args.iters,
        camera_normalize="none" if mmt else "mean",
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if mmt and args.moco_weight:
        parser.error("--mode mmt has no MoCo loss; drop --moco-weight")
    require_positive(
        parser, args, ("epochs", "iters", "batch_size", "height", "width", "k1", "k2", "min_samples", "moco_queue_size")
    )
    if args.batch_size % 4:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of the 4 instances per identity")
    if not 0 <= args.soft_ce_weight <= 1:
        parser.error(f"--soft-ce-weight must be in [0, 1], got {args.soft_ce_weight}")
    if args.warmup_iters < 0:
        parser.error(f"--warmup-iters must be >= 0, got {args.warmup_iters}")
    if not 0 < args.ema_alpha < 1:
        parser.error(f"--ema-alpha must be in (0, 1), got {args.ema_alpha}")
    for name in ("init_1", "init_2"):
        if not Path(getattr(args, name)).is_file():
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: no such checkpoint file")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    distributed, rank, world_size, device = start_run(args)  # one seed: the same heads and MoCo queues everywhere
    logs_dir = prepare_run_dir(args.logs_dir, args, write=is_main_process())
    checkpoint_path, best_path = logs_dir / "checkpoint.pth", logs_dir / "model_best.pth"
    per_process_batch = split_global_batch(args.batch_size, 4)

    # data: target training set in a fixed (path) order; the source only for MMT+
    datasets = resolve_datasets(args, ("source", "target", "val") if args.mode == "mmt+" else ("target", "val"))
    if datasets.target is None:
        raise SystemExit("--target none: MMT needs a target training set")
    target_items = sorted(datasets.target)
    val_data = datasets.val
    if not args.k2 <= args.k1 <= len(target_items):  # the Jaccard graph's limits, checked before any model is loaded
        raise SystemExit(
            f"--k1 {args.k1} / --k2 {args.k2}: clustering needs k2 <= k1 <= {len(target_items)} (the --target images)"
        )
    source_items, num_source_classes = [], 0
    if args.mode == "mmt+":
        source_items, num_source_classes = list(datasets.source.train), int(datasets.source.num_train_pids)
    # True target identities where the data has them (a labelled target dataset, or the embedded benchmark's
    # diagnostics/), for the pseudo-label DIAGNOSTICS in the log only (never for training).
    identities = datasets.target_identities or {}
    true_ids = np.array([identities.get(path, -1) for path, _, _ in target_items])
    if (true_ids < 0).any():
        true_ids = None  # no or incomplete ground truth: no diagnostics rather than wrong ones
    if args.oracle_pseudo_labels and true_ids is None:
        raise SystemExit(
            f"--oracle-pseudo-labels needs ground-truth identities of every --target {args.target} image (a "
            "labelled dataset, or the embedded benchmark's diagnostics/target_training_identities.txt)"
        )
    target_camids = np.array([camid for _, _, camid in target_items])

    # four networks: students from the two inits, teachers = copies; C_max = #source ids + #target images rows
    max_classes = num_source_classes + len(target_items)
    students, teachers = [], []
    head_args = dict(metric=args.metric, num_classes=max_classes, scale=args.scale, margin=args.margin)
    for init in (args.init_1, args.init_2):
        student = load_init(init, args.arch, head_args, num_source_classes, args.init_source_rows)
        if args.mode == "mmt+":
            convert_dsbn(student)
        student = student.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
        teacher = copy.deepcopy(student)  # the mean teacher starts as the student (EMA at t = 0 copies it anyway)
        teacher.requires_grad_(False)
        students.append(student)
        teachers.append(teacher)
    feature_dim = students[0].feature_dim
    set_seed(args.seed + rank)  # different augmentations per process from here on
    generator = torch.Generator().manual_seed(args.seed)
    queues = [
        MocoQueue(feature_dim, args.moco_queue_size, args.moco_temperature, generator).to(device) for _ in range(2)
    ]

    def trainable_parameters() -> list[nn.Parameter]:
        return [p for s in students for p in s.parameters() if p.requires_grad]

    optimizer = torch.optim.Adam(trainable_parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start_epoch, global_step, best_map, best_epoch, history, log_position = 0, 0, -1.0, -1, [], None
    if args.resume and checkpoint_path.exists():
        state = read_checkpoint(checkpoint_path, kinds=("mmt_plus",), what="--resume")
        if state.get("mode") != args.mode or state.get("arch") != args.arch:
            raise SystemExit(
                f"{checkpoint_path}: a {state.get('mode')}/{state.get('arch')} run, not {args.mode}/{args.arch}"
            )
        for i in range(2):
            students[i].load_state_dict(state["students"][i])
            teachers[i].load_state_dict(state["teachers"][i])
            queues[i].load_state_dict(state["moco_queues"][i])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        best_map, best_epoch = state["best_mAP"], state["best_epoch"]
        if world_size == 1 and "rng" in state:
            set_rng_state(state["rng"])
        log_position = state.get("log_position")
        if is_main_process():
            print(f"[mmt] resumed from {checkpoint_path} at epoch {start_epoch + 1} (global step {global_step})")

    ddp_students = [wrap_ddp(student, device) for student in students]

    transform = build_train_transform(args.height, args.width, autoaugment=False, random_erasing=args.random_erasing)
    image_cache = DecodedImageCache(args.image_cache_mb)  # decoded images, kept across epochs

    logger = JsonlLogger(logs_dir / "log.jsonl", log_position) if is_main_process() else None
    if logger is not None:
        per_bn = {"source": per_process_batch, "target": per_process_batch} if args.mode == "mmt+" else {}
        per_bn["target"] = per_process_batch
        logger.log(
            {
                "event": "start",
                "args": vars(args),
                "num_source_images": len(source_items),
                "num_source_classes": num_source_classes,
                "num_target_images": len(target_items),
                "world_size": world_size,
                "images_per_batchnorm_per_domain": per_bn,
                "pseudo_label_diagnostics": true_ids is not None,
                "oracle_pseudo_labels": args.oracle_pseudo_labels,
                "start_epoch": start_epoch,
            }
        )

    def evaluate_teachers() -> list[dict]:
        settings = dict(batch_size=args.test_batch_size, workers=args.workers, device=device, cache=image_cache)
        results = [evaluate(t, val_data.query, val_data.gallery, args.height, args.width, **settings) for t in teachers]
        return [{"mAP": float(result["mAP"]), "top1": float(result["top1"])} for result in results]

    def teacher_model(index: int) -> dict:
        """Teacher `index` as a plain model (target BN branch, no head) with its settings: what --init, sda.py's
        --target-encoder and postprocess.py read."""
        settings = {key: getattr(args, key) for key in ("arch", "height", "width", "mode")}
        return {"state_dict": plain_state(teachers[index]), "feature_dim": feature_dim, **settings, "args": vars(args)}

    if args.eval_initial and start_epoch == 0 and is_main_process():
        initial = evaluate_teachers()
        logger.log({"epoch": 0, "event": "initial", "val": initial})
        write_curves(logger.path, title=f"mmt_plus: {logs_dir}")
        print("[mmt] initial teachers: " + ", ".join(f"mAP {r['mAP']:.3f} top-1 {r['top1']:.3f}" for r in initial))

    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        # 1. pseudo labels from the averaged mean-teacher features (eval mode: BN_T running statistics)
        if distributed:  # teachers' BN statistics come from each process's own batches: use rank 0's everywhere
            for teacher in teachers:
                for buffer in teacher.buffers():
                    dist.broadcast(buffer, src=0)
        teacher_features = [distributed_features(t, target_items, args, device, image_cache) for t in teachers]
        teacher_features = [F.normalize(features, dim=1) for features in teacher_features]
        features = F.normalize((teacher_features[0] + teacher_features[1]) / 2, dim=1)
        labels = torch.empty(len(target_items), dtype=torch.long)
        if rank == 0:
            oracle = args.oracle_pseudo_labels
            labels = torch.from_numpy(
                oracle_labels(true_ids) if oracle else pseudo_labels(features, target_camids, args)
            )
        if distributed:
            dist.broadcast(labels, src=0)
        labels_np = labels.numpy()
        num_clusters = int(labels_np.max()) + 1 if (labels_np >= 0).any() else 0
        record = {
            "epoch": epoch + 1,
            "clusters": num_clusters,
            "outlier_fraction": float((labels_np < 0).mean()),
            "clustering_seconds": round(time.time() - start, 1),
        }
        if args.teacher_diagnostics and rank == 0:
            record["teachers"] = teacher_agreement(teacher_features, target_camids, args)
        if true_ids is not None:
            record["pseudo_labels"] = pseudo_label_quality(labels_np, true_ids, target_camids)
        if num_clusters < world_size:
            raise SystemExit(
                f"epoch {epoch + 1}: DBSCAN (eps {args.eps}, min_samples {args.min_samples}) found {num_clusters} "
                f"clusters in {len(target_items)} target images; at least one per process ({world_size}) is needed "
                "(a better initialisation or a larger --eps)"
            )
        # 2. target rows of all four heads <- L2-normalised centroids; logits restricted to the active classes
        centroids = cluster_centroids(features, labels_np).to(device)
        for network in (*students, *teachers):
            with torch.no_grad():
                network.classifier.weight[num_source_classes : num_source_classes + num_clusters] = centroids
            network.classifier.num_active_classes = num_source_classes + num_clusters
        if not args.keep_optimizer_state:
            optimizer = torch.optim.Adam(trainable_parameters(), lr=args.lr, weight_decay=args.weight_decay)
        pseudo_items = [
            (path, num_source_classes + int(label), camid)
            for (path, _, camid), label in zip(target_items, labels_np, strict=True)
            if label >= 0
        ]
        views = dict(transform=transform, cache=image_cache, batch_size=per_process_batch, epoch=epoch, args=args)
        target_loader = make_two_view_loader(pseudo_items, seed=args.seed, **views)
        source_loader = None
        if args.mode == "mmt+":
            source_loader = make_two_view_loader(source_items, seed=args.seed + 1, **views)

        # 3. train
        for student in students:
            student.train()
        for teacher in teachers:
            # Teachers run in TRAIN mode, as in the release (docs/differences.md#mmt): their soft labels and MoCo keys
            # are computed with the same per-domain batch statistics as the student's forward on that batch, so teacher
            # and student outputs differ only by the weights (EMA), not by BN statistics. Side effect: each teacher's
            # BN running statistics (used for clustering and testing) are its own estimates of the domain
            # statistics of the EMA weights, rather than an average of the students' stale ones.
            teacher.train()
        losses, global_step = train_one_epoch(
            ddp_students, teachers, queues, optimizer, source_loader, target_loader, epoch, global_step, args, device
        )
        # lr after the warm-up: the epoch's final rate
        record.update(losses=losses, lr=optimizer.param_groups[0]["lr"], global_step=global_step)

        # 4. validate both teachers, keep the best, checkpoint (rank 0)
        if is_main_process():
            results = evaluate_teachers()
            record["val"] = results
            better = 0 if results[0]["mAP"] >= results[1]["mAP"] else 1
            if results[better]["mAP"] > best_map:
                best_map, best_epoch = results[better]["mAP"], epoch + 1
                best = {"epoch": epoch + 1, "mAP": best_map, "teacher": better + 1}
                save_checkpoint({**teacher_model(better), **best}, best_path, "mmt_plus")
            record.update(best_mAP=best_map, best_epoch=best_epoch, seconds=round(time.time() - start, 1))
            logger.log(record)  # before the checkpoint: a run killed in between redoes the epoch
            write_curves(logger.path, title=f"mmt_plus: {logs_dir}")
            save_checkpoint(
                {
                    **teacher_model(0),
                    "epoch": epoch,
                    "global_step": global_step,
                    "best_mAP": best_map,
                    "best_epoch": best_epoch,
                    "students": [s.state_dict() for s in students],
                    "teachers": [t.state_dict() for t in teachers],
                    "moco_queues": [q.state_dict() for q in queues],
                    "optimizer": optimizer.state_dict(),
                    "rng": rng_state(),
                    "log_position": logger.position(),
                },
                checkpoint_path,
                "mmt_plus",
            )
            history.append(record)
            print(
                f"[mmt] epoch {epoch + 1}: {num_clusters} clusters, outliers {record['outlier_fraction']:.2f}, "
                f"teacher mAP {results[0]['mAP']:.3f}/{results[1]['mAP']:.3f} (best {best_map:.3f})"
            )
        if distributed:
            dist.barrier()

    summary = {"best_mAP": best_map, "best_epoch": best_epoch, "model_best": str(best_path), "history": history}
    if logger is not None:
        logger.log({"event": "done", "best_mAP": best_map, "best_epoch": best_epoch})
    if distributed:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    run_cli(main)
