"""The training configuration: one frozen dataclass, loadable from JSON, checked up front.

Every check that can be made before touching the work directory is made here or in
:func:`magnet_jax.training.prepare`, so a bad command line fails with one clear message
and leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import re
import typing
from typing import Any, NamedTuple

from magnet_jax.names import (
    CLUSTERINGS,
    LINKAGES,
    LOSSES,
    LR_SCHEDULES,
    MININGS,
    OPTIMIZERS,
    PLM_SIMILARITIES,
)

# The same as magnet_jax.backbones.BACKBONES (not imported: config stays light).
BACKBONES = ("efficientnet_lite0", "resnet50")
DTYPES = ("float32", "bfloat16")
# --input auto streams when memory mode's arrays would take more than this share of a
# device's memory; the rest is for parameters, optimizer state, activations and the
# allocator (magnet_jax.input_choice).
STREAM_SHARE = 0.25


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
    image_size: int | None = None  # tfds and image files: resize to image_size x image_size
    tfds_splits: str | None = None  # tfds only: "train_split,test_split"; None: "train,test"
    manual_dir: str | None = None  # tfds only: TFDS manual download dir
    split: str = "default"  # default (in-class), given (the dataset's own), classes (unseen)
    label_level: str | None = None  # emoji: emoji, subcategory or category
    drop_duplicates: bool = False  # emoji: leave out the images flagged duplicate
    skip_bad_images: bool = False  # image files: leave out missing/unreadable ones
    # memory: training set on every device; stream: read by index on the host; auto: stream
    # when it would not fit comfortably (magnet_jax.input_choice), resolved before training
    input: str = "auto"
    loader_workers: int = 2  # stream: Grain's reading threads (0: read in the training loop)
    sample_ahead: int = 1  # stream: a batch is drawn from the state 1 step old (0: current)
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
    augment_crop: bool = False  # images: random resized crop + flip; evaluation: centre crop
    refresh_every: int | None = None  # None: once per epoch of M·D-example batches
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 50
    max_checkpoints: int = 3
    knn_k: int = 1
    num_nearest_clusters: int = 128  # L in kNC; capped at the number of valid clusters
    kmeans_iterations: int = 50
    kmeans_restarts: int = 1  # best of n k-means++ runs by inertia, per class
    kmeans_warm_start: bool = False  # refreshes start Lloyd from the index's centroids
    embedding_memory: int = 0  # refresh: reuse the steps' embeddings of the last N steps (0: off)
    clustering: str = "kmeans"  # kmeans or agglomerative (magnet_jax.clustering)
    linkage: str = "ward"  # agglomerative: ward, average or single
    distance_threshold: float | None = None  # agglomerative relative cut τ; None: K per class
    cluster_subsample: int = 1000  # agglomerative: points clustered per class
    eval_chunk_size: int = 256  # rows per embedding call (refresh, evaluation)
    seed: int = 0
    workdir: str | None = None  # None: default_workdir(loss, dataset)
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
    # Piecewise-linear manifolds (--loss plm; magnet_jax.methods.plm).
    plm_neighbours: int = 16  # k: neighbour table width, largest piece k + 1 points
    plm_max_rank: int = 4  # largest dimension of a linear piece
    plm_error_threshold: float = 0.2  # τ: relative reconstruction error of a piece
    plm_subset_selection: bool = True  # grow pieces while linear (off: all k + 1 points)
    plm_similarity: str = "continuous"  # continuous, binary or orthogonal_only
    plm_orthogonal_exponent: float = 3.0  # N_α
    plm_inplane_exponent: float = 0.5  # N_β
    plm_proxies: int = 100  # N_ρ learnable proxies (0: no proxy term)
    plm_delta: float = 1.0  # δ: distance of fully dissimilar points
    plm_proxy_weight: float = 1.0
    plm_neighbourhood_weight: float = 1.0
    plm_momentum: float = 0.99  # EMA of the momentum network, per step

    verify: bool = True  # mnist / fashion_mnist: check the files' SHA-256

    def __post_init__(self):
        _check_types(self)
        if self.workdir is None:
            object.__setattr__(self, "workdir", default_workdir(self.loss, self.dataset))

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
        sets beyond ``data_dir`` (empty when every data option has its default)."""
        options: dict[str, Any] = {}
        if self.image_size is not None and _takes_image_size(self.dataset):
            options["image_size"] = (self.image_size, self.image_size)
        if self.tfds_splits is not None:
            options["splits"] = self.tfds_split_pair
        if self.manual_dir is not None:
            options["manual_dir"] = self.manual_dir
        # Only what differs from the default, so older runs reload with the same call.
        if self.split != "default":
            options["split"] = self.split
        if self.label_level is not None:
            options["label_level"] = self.label_level
        if self.drop_duplicates:
            options["drop_duplicates"] = True
        if self.skip_bad_images:
            options["skip_bad_images"] = True
        if self.input == "stream" and _takes_option(self.dataset, "lazy"):
            options["lazy"] = True  # image files stay on disk until the loader reads them
        if not self.verify:
            options["verify"] = False
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
            try:
                values = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"config file {path!r} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(
                f"config file {path!r} must hold a JSON object of field: value, "
                f"got {type(values).__name__}"
            )
        return cls.from_dict(values)

    def validate(self) -> None:
        """Checks that need no data (types are checked on construction). Raises ValueError
        naming the offending flag."""
        for name, info in FIELDS.items():
            value = getattr(self, name, None)
            if info.choices is not None and value is not None and value not in info.choices:
                raise ValueError(
                    f"unknown {flag(name)} {value!r}; choose one of: {', '.join(info.choices)}"
                )
        at_least_one = (
            "embedding_dim",
            "steps",
            "clusters_per_class",
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
            "refresh_every",
            "num_devices",
        )
        for name in at_least_one:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {value}")
        if self.loader_workers < 0:
            raise ValueError(f"{flag('loader_workers')} must be >= 0, got {self.loader_workers}")
        if self.sample_ahead not in (0, 1):
            raise ValueError(f"{flag('sample_ahead')} must be 0 or 1, got {self.sample_ahead}")
        if self.input == "stream" and self.cache_prefix:
            raise ValueError(
                f"{flag('cache_prefix')} keeps the frozen stages' output of the whole training "
                f"set on the devices, which {flag('input')} stream avoids; use one or the other"
            )
        if self.augment_shift < 0:
            raise ValueError(f"{flag('augment_shift')} must be >= 0, got {self.augment_shift}")
        if self.clusters_per_batch < 2:
            raise ValueError(
                f"{flag('clusters_per_batch')} (M) must be >= 2 (a seed cluster and at least one "
                f"impostor or a second class), got {self.clusters_per_batch}"
            )
        if self.alpha < 0:
            raise ValueError(f"{flag('alpha')} must be >= 0, got {self.alpha}")
        self._validate_warm_start()
        self._validate_embedding_memory()
        if not self.lr > 0:
            raise ValueError(f"{flag('lr')} must be > 0, got {self.lr}")
        if self.distance_threshold is not None and not self.distance_threshold > 0:
            raise ValueError(
                f"{flag('distance_threshold')} must be > 0, got {self.distance_threshold}"
            )
        if self.cluster_subsample < 2:
            raise ValueError(
                f"{flag('cluster_subsample')} must be >= 2, got {self.cluster_subsample}"
            )
        if self.init_from is not None and not self.init_from.strip():
            raise ValueError(
                f"{flag('init_from')} must name a run's work directory, got {self.init_from!r}"
            )
        if not self.workdir.strip():
            raise ValueError(f"{flag('workdir')} must name a directory, got {self.workdir!r}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(
                f"{flag('image_size')} must be an integer >= 8 (pixels per side), "
                f"got {self.image_size!r}"
            )
        if self.tfds_splits is not None:
            parts = self.tfds_splits.split(",")
            if len(parts) != 2 or not all(part.strip() for part in parts):
                raise ValueError(
                    f"{flag('tfds_splits')} must be two comma-separated TFDS split names, train "
                    f"then test (e.g. 'train,test' or 'train+validation,test'), "
                    f"got {self.tfds_splits!r}"
                )
        if self.manual_dir is not None and not self.manual_dir.strip():
            raise ValueError(f"{flag('manual_dir')} must name a directory, got {self.manual_dir!r}")
        tfds_only = [
            flag(name) for name in ("tfds_splits", "manual_dir") if getattr(self, name) is not None
        ]
        if tfds_only and not self.dataset.startswith("tfds:"):
            raise ValueError(
                f"{', '.join(tfds_only)} apply to tfds:<name> datasets only, not to --dataset "
                f"{self.dataset!r} (its images are used at their stored size)"
            )
        self._validate_data_options()
        self._validate_backbone()
        self._validate_plm()

    def _validate_warm_start(self) -> None:
        # A warm start is one Lloyd run from given centroids: nothing to restart, and
        # agglomerative clustering has no centroids to start from.
        if not self.kmeans_warm_start:
            return
        if self.clustering != "kmeans":
            raise ValueError(
                f"{flag('kmeans_warm_start')} starts k-means from the previous refresh's "
                f"centroids; it does not apply to {flag('clustering')} {self.clustering}"
            )
        if self.kmeans_restarts != 1:
            raise ValueError(
                f"{flag('kmeans_warm_start')} runs k-means once, from the previous refresh's "
                f"centroids; it cannot be combined with {flag('kmeans_restarts')} "
                f"{self.kmeans_restarts} (independent k-means++ runs)"
            )

    def _validate_embedding_memory(self) -> None:
        # The steps' embeddings stand in for the refresh's only where both embed the same
        # view of an example with the same function.
        if self.embedding_memory < 0:
            raise ValueError(
                f"{flag('embedding_memory')} must be >= 0 (0: embed the whole training set at "
                f"every refresh), got {self.embedding_memory}"
            )
        if not self.embedding_memory:
            return
        for name, why in (
            ("augment_shift", "shifted"),
            ("augment_crop", "randomly cropped"),
            ("train_bn", "batch-normalised with batch statistics"),
        ):
            if getattr(self, name):
                raise ValueError(
                    f"{flag('embedding_memory')} reuses the train steps' embeddings at a "
                    f"refresh, but with {flag(name)} the steps embed {why} images, not what a "
                    f"refresh embeds; use one or the other"
                )

    def _validate_plm(self) -> None:
        for name in ("plm_neighbours", "plm_max_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.plm_max_rank > self.plm_neighbours:
            raise ValueError(
                f"{flag('plm_max_rank')} {self.plm_max_rank} must be <= {flag('plm_neighbours')} "
                f"{self.plm_neighbours} (a piece of rank r needs r + 1 points)"
            )
        if not 0.0 <= self.plm_error_threshold <= 1.0:
            raise ValueError(
                f"{flag('plm_error_threshold')} must be in [0, 1], got {self.plm_error_threshold}"
            )
        for name in ("plm_orthogonal_exponent", "plm_inplane_exponent", "plm_delta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("plm_proxies",):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("plm_proxy_weight", "plm_neighbourhood_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.plm_momentum <= 1.0:
            raise ValueError(f"{flag('plm_momentum')} must be in [0, 1], got {self.plm_momentum}")

    def _validate_backbone(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(
                f"unknown {flag('dtype')} {self.dtype!r}; choose one of {', '.join(DTYPES)}"
            )
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
                    f"{', '.join(flag(n) for n in needing)} apply to --backbone runs only; choose a backbone "
                    f"({', '.join(BACKBONES)})"
                )
            return
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"unknown {flag('backbone')} {self.backbone!r}; choose one of {', '.join(BACKBONES)}"
            )
        if self.architecture is not None:
            raise ValueError(
                f"--architecture {self.architecture!r} and --backbone {self.backbone!r} both name "
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
            raise ValueError(f"{flag('weights')} must name a file, got {self.weights!r}")
        if isinstance(self.freeze_stages, bool) or self.freeze_stages < 0:
            raise ValueError(f"{flag('freeze_stages')} must be >= 0, got {self.freeze_stages!r}")
        if not self.backbone_lr_multiplier >= 0:
            raise ValueError(
                f"{flag('backbone_lr_multiplier')} must be >= 0, got {self.backbone_lr_multiplier}"
            )
        if self.image_size is not None and self.image_size < 32:
            raise ValueError(
                f"{flag('image_size')} must be >= 32 for a backbone, got {self.image_size}"
            )
        if self.cache_prefix:
            if self.freeze_stages < 1:
                raise ValueError(
                    "--cache-prefix caches the frozen stages: set --freeze-stages >= 1"
                )
            if self.augment_shift:
                raise ValueError(
                    "--cache-prefix computes the frozen stages once per image, so it cannot be "
                    "combined with --augment-shift (random translations of every batch)"
                )

    def _validate_data_options(self) -> None:
        from magnet_jax import data

        if self.split not in data.SPLITS:
            raise ValueError(
                f"unknown {flag('split')} {self.split!r}; choose one of {', '.join(data.SPLITS)}"
            )
        levels = data.emoji.LABEL_LEVELS
        if self.label_level is not None and self.label_level not in levels:
            raise ValueError(
                f"unknown {flag('label_level')} {self.label_level!r}; choose one of "
                f"{', '.join(levels)}"
            )
        if (
            self.image_size is not None
            and self.backbone is None  # a backbone's input resolution, for any dataset
            and not data.takes_option(self.dataset, "image_size")
        ):
            image_files = [
                n for n in data.registry.sources_taking("image_size") if n != "tfds:<name>"
            ]
            raise ValueError(
                f"{flag('image_size')} applies to tfds:<name> datasets only and to images read "
                f"from files "
                f"({', '.join(image_files)}), not to dataset {self.dataset!r} (its images are "
                "used at their stored size)"
            )
        given = {
            "label_level": self.label_level is not None,
            "drop_duplicates": self.drop_duplicates,
            "skip_bad_images": self.skip_bad_images,
        }
        for option, is_set in given.items():
            if is_set and not data.takes_option(self.dataset, option):
                takers = ", ".join(data.registry.sources_taking(option))
                raise ValueError(
                    f"{flag(option)} applies to {takers} only, not to --dataset {self.dataset!r}"
                )


def _takes_option(dataset: str, option: str) -> bool:
    from magnet_jax import data

    return data.takes_option(dataset, option)


def _takes_image_size(dataset: str) -> bool:
    """Whether the dataset's loader resizes (a --backbone run of any other dataset resizes on
    the device to the backbone's input size instead)."""
    from magnet_jax import data

    return data.takes_option(dataset, "image_size")


def flag(name: str) -> str:
    """The command-line flag of a config field: ``clusters_per_class`` -> ``--clusters-per-class``."""
    return "--" + name.replace("_", "-")


def default_workdir(loss: str, dataset: str) -> str:
    """``runs/<loss>-<dataset>``, with a path-like dataset (``npz:/data/x.npz``) reduced to a
    safe name (``npz-x``), so runs of different datasets or losses never share a directory."""
    if isinstance(dataset, str) and dataset.startswith("npz:"):
        dataset = "npz-" + os.path.splitext(os.path.basename(dataset[4:]))[0]
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", f"{loss}-{dataset}").strip("-.")
    return os.path.join("runs", name or "run")


class FieldInfo(NamedTuple):
    """How a config field appears on the command line.

    group: the section of ``--help`` it is listed under (one of :data:`GROUPS`).
    help: one line saying what it does.
    choices: the accepted values, when they are a fixed set.
    default: how ``--help`` states the default, when the field's value (often ``None``)
        would not say it.
    """

    group: str
    help: str
    choices: tuple[str, ...] | None = None
    default: str | None = None


# The sections of `magnet-jax train --help`, in order, with their titles.
GROUPS = {
    "data": "data",
    "model": "model",
    "method": "method (loss and batches)",
    "clustering": "clustering (Magnet Loss index)",
    "plm": "piecewise-linear manifolds (--loss plm; label-free)",
    "schedule": "optimisation and schedule",
    "evaluation": "evaluation",
    "output": "output and devices",
}

# One entry per TrainConfig field: a new field adds its line here (tests/test_workdir.py checks
# that every field has one).
FIELDS: dict[str, FieldInfo] = {
    "dataset": FieldInfo(
        "data",
        "digits (bundled), mnist, fashion_mnist, cifar10, cifar100, their coarse variants, "
        "tfds:<name>, npz:<path>",
    ),
    "data_dir": FieldInfo(
        "data",
        "folder with the dataset's files, or its parent; TFDS's data dir for tfds:",
        default="$MAGNET_JAX_DATA, else ~/.magnet_jax/datasets",
    ),
    "image_size": FieldInfo(
        "data",
        "tfds, emoji and image files: resize every image to N x N (image files: shorter side "
        "to N, centre crop; needed when the images differ in size)",
        default="as stored",
    ),
    "tfds_splits": FieldInfo(
        "data",
        "tfds: 'train_split,test_split', e.g. 'train+validation,test'",
        default="train,test",
    ),
    "manual_dir": FieldInfo("data", "tfds: folder with manually downloaded files"),
    "split": FieldInfo(
        "data",
        "default = in-class split (the dataset's own when it is in-class), given = the "
        "dataset's own split, classes = train on the first half of the classes and test "
        "retrieval on the unseen rest (Recall@k, MAP@R, NMI; no kNN/kNC)",
        choices=("default", "given", "classes"),  # magnet_jax.data.SPLITS (config is JAX-free)
    ),
    "label_level": FieldInfo(
        "data",
        "emoji: emoji, subcategory or category; a coarse level keeps the emoji as fine labels",
        default="emoji",
    ),
    "drop_duplicates": FieldInfo("data", "emoji: leave out the images flagged duplicate"),
    "skip_bad_images": FieldInfo(
        "data",
        "image files: leave out missing or unreadable images (says how many) instead of stopping",
    ),
    "input": FieldInfo(
        "data",
        "memory: the training set is copied onto every device and batches are gathered "
        "there; stream: examples are read by index on the host (image files decoded and "
        "augmented when needed, '.[stream]'), for data that does not fit on the devices; "
        f"auto: stream when the training and test sets would take more than "
        f"{STREAM_SHARE * 100:.0f}%% of a device's memory (CPU devices: their share of the "
        "host's available memory), else memory; chosen once, saved with the run and kept "
        "when it resumes",
        choices=("auto", "memory", "stream"),
    ),
    "loader_workers": FieldInfo(
        "data",
        "stream: threads that read, decode and augment images in parallel (0: in the "
        "training loop)",
    ),
    "sample_ahead": FieldInfo(
        "data",
        "stream: 1 draws a batch from the method state one step old, so that its images are "
        "read while the device runs the step before; 0 draws it from the current state (the "
        "in-memory batches exactly; the device waits for every read)",
    ),
    "augment_shift": FieldInfo(
        "data", "images: translate every training image by up to N pixels (zero fill)"
    ),
    "augment_crop": FieldInfo(
        "data",
        "images: train on a random resized crop (8-100%% of the area, aspect 3/4-4/3) flipped "
        "left-right half the time; embed for evaluation and clustering the centre 87.5%% "
        "resized back",
    ),
    "verify": FieldInfo(
        "data", "mnist/fashion_mnist: check the files' SHA-256 (--no-verify skips the check)"
    ),
    "architecture": FieldInfo(
        "model", "mlp, convnet or resnet", default="mlp for flat inputs, convnet for images"
    ),
    "embedding_dim": FieldInfo("model", "dimension d of the embedding"),
    "normalize": FieldInfo("model", "L2-normalise the embeddings"),
    "backbone": FieldInfo(
        "model",
        "an ImageNet-style backbone instead of --architecture (images in, a linear embedding "
        "head on its pooled features; --image-size sets its resolution, default 224)",
        choices=BACKBONES,
    ),
    "pretrained": FieldInfo(
        "model", "backbone: its bundled ImageNet weights (efficientnet_lite0; '.[pretrained]')"
    ),
    "weights": FieldInfo(
        "model", "backbone: a PyTorch state dict file (.pth, read without torch, or .safetensors)"
    ),
    "freeze_stages": FieldInfo("model", "backbone: the first N stages get exactly zero updates"),
    "backbone_lr_multiplier": FieldInfo(
        "model", "backbone: its learning rate is --lr times this (the head's is --lr)"
    ),
    "train_bn": FieldInfo(
        "model", "backbone: batch statistics in the trainable stages (off: frozen ImageNet ones)"
    ),
    "cache_prefix": FieldInfo(
        "model",
        "backbone: compute the frozen stages' output once per dataset, train only the rest "
        "(needs --freeze-stages >= 1; same results, much faster on CPU)",
    ),
    "dtype": FieldInfo(
        "model", "backbone compute dtype (parameters stay float32; for GPUs/TPUs)", choices=DTYPES
    ),
    "init_from": FieldInfo(
        "model",
        "warm start from the latest checkpoint of another run (its --workdir or checkpoints/): "
        "copies every parameter whose path and shape match; ignored when resuming",
    ),
    "loss": FieldInfo("method", "the training loss", choices=LOSSES),
    "clusters_per_batch": FieldInfo(
        "method", "M: clusters per batch (magnet) or classes per batch (pair/triplet losses)"
    ),
    "examples_per_cluster": FieldInfo(
        "method", "D: examples per cluster or class; the batch size is M·D for every loss"
    ),
    "alpha": FieldInfo("method", "magnet: margin α between a cluster and its impostors"),
    "margin": FieldInfo("method", "triplet / contrastive: margin"),
    "mining": FieldInfo("method", "triplet: which triplets count", choices=MININGS),
    "clusters_per_class": FieldInfo(
        "clustering", "K: clusters per class (the most per class for agglomerative)"
    ),
    "refresh_every": FieldInfo(
        "clustering", "re-embed and re-cluster every N steps", default="once per epoch"
    ),
    "clustering": FieldInfo("clustering", "how each class is clustered", choices=CLUSTERINGS),
    "kmeans_iterations": FieldInfo("clustering", "k-means: Lloyd iterations per refresh"),
    "kmeans_restarts": FieldInfo(
        "clustering", "k-means: keep the best of N k-means++ runs by inertia, per class"
    ),
    "kmeans_warm_start": FieldInfo(
        "clustering",
        "k-means: every refresh after the first starts Lloyd from the previous refresh's "
        "centroids instead of k-means++ (one run; not with --kmeans-restarts > 1)",
    ),
    "embedding_memory": FieldInfo(
        "clustering",
        "at a refresh, reuse the embedding each train step computed for its batch's examples "
        "when it is at most N steps old, and embed only the other examples (e.g. N = "
        "--refresh-every: the examples the steps since the last refresh saw); 0: embed the "
        "whole training set",
    ),
    "linkage": FieldInfo("clustering", "agglomerative: merge rule", choices=LINKAGES),
    "distance_threshold": FieldInfo(
        "clustering",
        "agglomerative: relative cut τ (ward: share of the class's sum of squares; "
        "average/single: τ × the median merge height)",
        default="K clusters per class",
    ),
    "cluster_subsample": FieldInfo(
        "clustering", "agglomerative: cluster at most N points per class, assign the rest"
    ),
    "plm_neighbours": FieldInfo(
        "plm",
        "k nearest neighbours per point (momentum embeddings): a piece grows to at most k + 1 "
        "points; the batch's D - 1 neighbours per anchor come from them",
    ),
    "plm_max_rank": FieldInfo("plm", "largest dimension of a linear piece (<= k)"),
    "plm_error_threshold": FieldInfo(
        "plm",
        "τ in [0, 1]: a neighbourhood joins a piece while the piece leaves at most this share "
        "of its variance unexplained; also picks the piece's rank",
    ),
    "plm_subset_selection": FieldInfo(
        "plm",
        "grow each piece while it stays linear (--no-plm-subset-selection: all k + 1 points, "
        "the paper's ablation)",
    ),
    "plm_similarity": FieldInfo(
        "plm",
        "continuous: decays orthogonally (N_α) and in-plane (N_β); binary: 1 within one "
        "length scale of the piece, else 0; orthogonal_only: no in-plane decay (ablations)",
        choices=PLM_SIMILARITIES,
    ),
    "plm_orthogonal_exponent": FieldInfo("plm", "N_α: decay away from a piece"),
    "plm_inplane_exponent": FieldInfo("plm", "N_β: decay along a piece"),
    "plm_proxies": FieldInfo("plm", "N_ρ learnable proxies (0: no proxy term)"),
    "plm_delta": FieldInfo("plm", "δ: the target distance of fully dissimilar points"),
    "plm_proxy_weight": FieldInfo("plm", "weight of the proxy term"),
    "plm_neighbourhood_weight": FieldInfo("plm", "weight of the neighbourhood term"),
    "plm_momentum": FieldInfo(
        "plm", "momentum of the EMA network that the pieces are fitted to, per step"
    ),
    "steps": FieldInfo("schedule", "training steps (the cosine schedule decays to 0 over them)"),
    "optimizer": FieldInfo("schedule", "adam, or sgd with momentum 0.9", choices=OPTIMIZERS),
    "lr": FieldInfo("schedule", "learning rate of the optimizer (its peak with cosine)"),
    "lr_schedule": FieldInfo(
        "schedule",
        "cosine: decay to 0 over --steps; constant: a run can be extended with a larger --steps",
        choices=LR_SCHEDULES,
    ),
    "weight_decay": FieldInfo(
        "schedule", "decoupled weight decay (AdamW; added to SGD's gradient)"
    ),
    "seed": FieldInfo("schedule", "random seed (parameters, batches, clustering)"),
    "eval_every": FieldInfo("evaluation", "evaluate on the test set every N steps, and at the end"),
    "knn_k": FieldInfo("evaluation", "k of the kNN classifier"),
    "num_nearest_clusters": FieldInfo(
        "evaluation", "L of the kNC rule (nearest clusters voting; capped at the valid clusters)"
    ),
    "eval_chunk_size": FieldInfo(
        "evaluation", "rows per embedding call when embedding a whole set (memory vs speed)"
    ),
    "workdir": FieldInfo(
        "output",
        "config.json, history.jsonl, metrics.json, checkpoints/; rerun to resume, "
        "--workdir alone reuses its config.json",
        default="runs/<loss>-<dataset>",
    ),
    "log_every": FieldInfo("output", "log the training loss every N steps"),
    "checkpoint_every": FieldInfo("output", "checkpoint every N steps, and at the end"),
    "max_checkpoints": FieldInfo("output", "keep the N most recent checkpoints"),
    "num_devices": FieldInfo("output", "use the first N devices", default="all"),
}


def _check_types(config: TrainConfig) -> None:
    """Each field has its annotated type: integers are integers (``20.5`` steps is refused),
    a float field accepts an integer (stored as a float), ``None`` only where allowed."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        hint = hints[field.name]
        optional = type(None) in typing.get_args(hint)
        kind = next(k for k in typing.get_args(hint) if k is not type(None)) if optional else hint
        if value is None:
            if optional:
                continue
            raise ValueError(f"{flag(field.name)} must be given, got None")
        if kind is bool:
            ok = isinstance(value, bool)
            wanted = "true or false"
        elif kind is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            wanted, value = "an integer", int(value) if ok else value
        elif kind is float:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            wanted, value = "a number", float(value) if ok else value
        elif kind is str:
            ok = isinstance(value, str | os.PathLike)
            wanted, value = "a string", os.fspath(value) if ok else value
        else:
            continue
        if not ok:
            raise ValueError(
                f"{flag(field.name)} must be {wanted}, got {value!r} ({type(value).__name__})"
            )
        object.__setattr__(config, field.name, value)
