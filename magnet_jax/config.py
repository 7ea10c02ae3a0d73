"""The training configuration: one frozen dataclass, loadable from JSON, checked up front.

Every check that can be made before touching the work directory is made here or in
:func:`magnet_jax.training.prepare`, so a bad command line fails with one clear message
and leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

LOSSES = (
    "magnet",
    "triplet",
    "contrastive",
    "multi_similarity",
    "proxy_nca",
    "normalized_softmax",
    "arcface",
    "softmax",
)

# The same as magnet_jax.clustering.METHODS / LINKAGES (not imported: config stays JAX-free).
CLUSTERINGS = ("kmeans", "agglomerative")
# The same as magnet_jax.backbones.BACKBONES (not imported: config stays JAX-free).
BACKBONES = ("efficientnet_lite0", "resnet50")
DTYPES = ("float32", "bfloat16")
LINKAGES = ("ward", "average", "single")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Field names match the command's flags.

    Batches: the Magnet Loss samples ``clusters_per_batch`` (M) clusters of
    ``examples_per_cluster`` (D) examples; the pair and triplet losses sample M classes of
    D examples; the classification losses sample M·D examples uniformly. The batch size is
    M·D for every loss, so the losses are compared at equal cost per step.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None  # tfds: resize at load; --backbone: its input resolution
    tfds_splits: str | None = None  # tfds only: "train_split,test_split"; None: "train,test"
    manual_dir: str | None = None  # tfds only: TFDS manual download dir
    loss: str = "magnet"
    architecture: str | None = None  # None: mlp for flat inputs, convnet for images
    embedding_dim: int = 32
    normalize: bool = False  # L2-normalise embeddings
    steps: int = 3000
    clusters_per_class: int = 4  # K
    clusters_per_batch: int = 8  # M
    examples_per_cluster: int = 8  # D
    alpha: float = 1.0  # Magnet margin
    margin: float = 0.2  # triplet / contrastive margin
    mining: str = "batch_all"  # triplet mining
    optimizer: str = "adam"  # adam, or sgd (momentum 0.9)
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # cosine: decay to 0 over `steps`; or constant
    weight_decay: float = 0.0
    augment_shift: int = 0  # images: random translations of up to this many pixels
    refresh_every: int | None = None  # None: once per epoch of M·D-example batches
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 50
    max_checkpoints: int = 3
    knn_k: int = 1
    num_nearest_clusters: int = 128  # L in kNC; capped at the number of valid clusters
    kmeans_iterations: int = 50
    kmeans_restarts: int = 1  # best of n k-means++ runs by inertia, per class
    clustering: str = "kmeans"  # kmeans or agglomerative (magnet_jax.clustering)
    linkage: str = "ward"  # agglomerative: ward, average or single
    distance_threshold: float | None = None  # agglomerative relative cut τ; None: K per class
    cluster_subsample: int = 1000  # agglomerative: points clustered per class
    eval_chunk_size: int = 256  # rows per embedding call (refresh, evaluation)
    seed: int = 0
    workdir: str = "runs/magnet-digits"
    init_from: str | None = None  # warm start: a previous run's workdir (or its checkpoints/)
    num_devices: int | None = None  # None: all devices
    # Pretrained backbones (magnet_jax.backbones); all but `backbone` need it set.
    backbone: str | None = None  # efficientnet_lite0 or resnet50, instead of architecture
    pretrained: bool = False  # the backbone's bundled ImageNet weights
    weights: str | None = None  # a PyTorch state dict file (.pth or .safetensors)
    freeze_stages: int = 0  # the first N stages get no updates
    backbone_lr_multiplier: float = 1.0  # backbone lr = lr x this (head: lr)
    train_bn: bool = False  # batch statistics in the trainable stages (default: frozen)
    cache_prefix: bool = False  # compute the frozen stages' output once per dataset
    dtype: str = "float32"  # backbone compute dtype; parameters stay float32

    @property
    def batch_size(self) -> int:
        return self.clusters_per_batch * self.examples_per_cluster

    @property
    def tfds_split_pair(self) -> tuple[str, str] | None:
        """``tfds_splits`` as ``(train_split, test_split)``; None when not set."""
        if self.tfds_splits is None:
            return None
        train, test = (part.strip() for part in self.tfds_splits.split(","))
        return train, test

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`magnet_jax.data.load_dataset` that this config
        sets beyond ``data_dir`` (empty when none of the tfds options is given)."""
        options: dict[str, Any] = {}
        if self.image_size is not None and self.dataset.startswith("tfds:"):
            options["image_size"] = (self.image_size, self.image_size)
        if self.tfds_splits is not None:
            options["splits"] = self.tfds_split_pair
        if self.manual_dir is not None:
            options["manual_dir"] = self.manual_dir
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(names)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainConfig:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"config file {path!r} not found (looked in {os.path.abspath(path)})"
            )
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def validate(self) -> None:
        """Checks that need no data. Raises ValueError naming the offending field."""
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        positive = (
            "embedding_dim",
            "steps",
            "clusters_per_class",
            "clusters_per_batch",
            "examples_per_cluster",
            "eval_every",
            "checkpoint_every",
            "log_every",
            "max_checkpoints",
            "knn_k",
            "num_nearest_clusters",
            "kmeans_iterations",
            "kmeans_restarts",
            "eval_chunk_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.augment_shift < 0:
            raise ValueError(f"augment_shift must be >= 0, got {self.augment_shift}")
        if self.refresh_every is not None and self.refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {self.refresh_every}")
        if self.clusters_per_batch < 2:
            raise ValueError(
                f"clusters_per_batch (M) must be >= 2 (a seed cluster and at least one impostor "
                f"or a second class), got {self.clusters_per_batch}"
            )
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose cosine or constant")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose adam or sgd")
        if self.mining not in ("batch_all", "batch_hard", "semi_hard"):
            raise ValueError(
                f"unknown mining {self.mining!r}; choose batch_all, batch_hard or semi_hard"
            )
        if self.clustering not in CLUSTERINGS:
            raise ValueError(
                f"unknown clustering {self.clustering!r}; choose one of {', '.join(CLUSTERINGS)}"
            )
        if self.linkage not in LINKAGES:
            raise ValueError(
                f"unknown linkage {self.linkage!r}; choose one of {', '.join(LINKAGES)}"
            )
        if self.distance_threshold is not None and not self.distance_threshold > 0:
            raise ValueError(f"distance_threshold must be > 0, got {self.distance_threshold}")
        if self.cluster_subsample < 2:
            raise ValueError(f"cluster_subsample must be >= 2, got {self.cluster_subsample}")
        if self.init_from is not None and (
            not isinstance(self.init_from, str) or not self.init_from.strip()
        ):
            raise ValueError(f"init_from must name a run's work directory, got {self.init_from!r}")
        if self.image_size is not None and (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or self.image_size < 8
        ):
            raise ValueError(
                f"image_size must be an integer >= 8 (pixels per side), got {self.image_size!r}"
            )
        if self.tfds_splits is not None:
            parts = self.tfds_splits.split(",") if isinstance(self.tfds_splits, str) else []
            if len(parts) != 2 or not all(part.strip() for part in parts):
                raise ValueError(
                    f"tfds_splits must be two comma-separated TFDS split names, train then test "
                    f"(e.g. 'train,test' or 'train+validation,test'), got {self.tfds_splits!r}"
                )
        if self.manual_dir is not None and (
            not isinstance(self.manual_dir, str) or not self.manual_dir.strip()
        ):
            raise ValueError(f"manual_dir must name a directory, got {self.manual_dir!r}")
        tfds_only = [
            name
            for name in ("image_size", "tfds_splits", "manual_dir")
            if getattr(self, name) is not None and not (name == "image_size" and self.backbone)
        ]
        if tfds_only and not self.dataset.startswith("tfds:"):
            raise ValueError(
                f"{', '.join(tfds_only)} apply to tfds:<name> datasets only, not to dataset {self.dataset!r} "
                f"(its images are used at their stored size)"
            )
        if self.num_devices is not None and self.num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {self.num_devices}")
        self._validate_backbone()

    def _validate_backbone(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.backbone is None:
            defaults = TrainConfig()
            needing = [
                name
                for name in (
                    "pretrained",
                    "weights",
                    "freeze_stages",
                    "backbone_lr_multiplier",
                    "train_bn",
                    "cache_prefix",
                    "dtype",
                )
                if getattr(self, name) != getattr(defaults, name)
            ]
            if needing:
                raise ValueError(
                    f"{', '.join(needing)} apply to --backbone runs only; choose a backbone "
                    f"({', '.join(BACKBONES)})"
                )
            return
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}"
            )
        if self.architecture is not None:
            raise ValueError(
                f"architecture {self.architecture!r} and backbone {self.backbone!r} both name "
                f"the network; give one"
            )
        if self.pretrained and self.weights is not None:
            raise ValueError("give --pretrained or --weights FILE, not both")
        if self.pretrained and self.backbone != "efficientnet_lite0":
            raise ValueError(
                f"--pretrained: only efficientnet_lite0 ships weights; for {self.backbone} "
                f"pass --weights FILE (a PyTorch state dict, e.g. torchvision's)"
            )
        if self.weights is not None and (
            not isinstance(self.weights, str) or not self.weights.strip()
        ):
            raise ValueError(f"weights must name a file, got {self.weights!r}")
        if isinstance(self.freeze_stages, bool) or self.freeze_stages < 0:
            raise ValueError(f"freeze_stages must be >= 0, got {self.freeze_stages!r}")
        if not self.backbone_lr_multiplier >= 0:
            raise ValueError(
                f"backbone_lr_multiplier must be >= 0, got {self.backbone_lr_multiplier}"
            )
        if self.image_size is not None and self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 for a backbone, got {self.image_size}")
        if self.cache_prefix:
            if self.freeze_stages < 1:
                raise ValueError("cache_prefix caches the frozen stages: set freeze_stages >= 1")
            if self.augment_shift:
                raise ValueError(
                    "cache_prefix computes the frozen stages once per image, so it cannot be "
                    "combined with augment_shift (random translations of every batch)"
                )
