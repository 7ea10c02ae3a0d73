"""The dataset container and what every source shares: checks, splits, label remapping.

A source (one module of this package each) returns either a :class:`Dataset`, already
split into train and test, or a :class:`Pool`, every example with the source's own split
as a mask; :func:`magnet_jax.data.protocol.split_pool` turns a pool into a dataset by the
protocol asked for.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

DATA_DIR_ENV_VAR = "MAGNET_JAX_DATA"
DEFAULT_RECALL_KS = (1, 2, 4, 8)

# ---------------------------------------------------------------------------------------
# The dataset container
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled train/test pair held in memory.

    Attributes:
      name: what the dataset is called (``"fashion_mnist"``, ``"npz:feats.npz"``, ...).
      x_train: ``[N, ...]`` float32 inputs. Images (digits too) are NHWC in ``[0, 1]``;
        precomputed features are as given. Image files loaded with ``lazy=True`` are an
        :class:`~magnet_jax.data.lazy.ImageFiles` of that shape, read when streamed.
      y_train: ``[N]`` int32 labels in ``[0, C)``.
      x_test: ``[M, ...]`` float32, same trailing shape as ``x_train``.
      y_test: ``[M]`` int32 labels in ``[0, C)``.
      class_names: ``C`` names; ``class_names[y]`` names label ``y``.
      fine_train: optional ``[N]`` int32 second labelling, the fine labels when ``y`` is a
        coarse one (CIFAR-100 superclasses, :func:`coarsen`).
      fine_test: optional ``[M]`` int32, like ``fine_train``.
      fine_class_names: names of the fine labels, when there are fine labels.
      recall_ks: the ``k`` of the Recall@k that evaluation reports (``(1, 2, 4, 8)``;
        sets with many small classes such as Stanford Online Products add 10 and 100).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    fine_train: np.ndarray | None = None
    fine_test: np.ndarray | None = None
    fine_class_names: tuple[str, ...] | None = None
    recall_ks: tuple[int, ...] = DEFAULT_RECALL_KS

    def __post_init__(self):
        _check_split(self.name, "train", self.x_train, self.y_train, len(self.class_names))
        _check_split(self.name, "test", self.x_test, self.y_test, len(self.class_names))
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"dataset {self.name!r}: train inputs have shape {self.x_train.shape[1:]} "
                f"per example but test inputs {self.x_test.shape[1:]}"
            )
        fine_parts = (self.fine_train, self.fine_test, self.fine_class_names)
        if any(part is not None for part in fine_parts):
            if any(part is None for part in fine_parts):
                raise ValueError(
                    f"dataset {self.name!r}: fine_train, fine_test and fine_class_names "
                    "must be given together"
                )
            num_fine = len(self.fine_class_names)
            _check_labels(self.name, "fine_train", self.fine_train, len(self.y_train), num_fine)
            _check_labels(self.name, "fine_test", self.fine_test, len(self.y_test), num_fine)

    @property
    def num_classes(self) -> int:
        """Number of classes ``C`` (``len(class_names)``)."""
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(28, 28, 1)`` or ``(64,)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        """Number of training examples ``N``."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples ``M``."""
        return int(self.x_test.shape[0])

    @property
    def num_fine_classes(self) -> int | None:
        """Number of fine classes, or None when there is no fine labelling."""
        return None if self.fine_class_names is None else len(self.fine_class_names)

    @property
    def num_train_classes(self) -> int:
        """``1 +`` the largest training label: the classes a classifier head or proxies need
        (``C`` except under ``split="classes"``, where the test classes come last)."""
        return int(self.y_train.max()) + 1 if len(self.y_train) else 0

    @property
    def test_classes_seen(self) -> bool:
        """Whether every test class has training examples.

        False under a class-disjoint protocol (``split="classes"``): then only retrieval
        among the test examples is meaningful, not classifying them by the training set
        (kNN, kNC, a classifier head).
        """
        return bool(np.isin(np.unique(self.y_test), np.unique(self.y_train)).all())


def _check_split(name: str, split: str, x: np.ndarray, y: np.ndarray, num_classes: int):
    from magnet_jax.data.lazy import is_lazy

    if not (isinstance(x, np.ndarray) or is_lazy(x)) or x.dtype != np.float32 or x.ndim < 2:
        raise ValueError(
            f"dataset {name!r}: x_{split} must be a float32 array [N, ...], got "
            f"{type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}"
        )
    _check_labels(name, f"y_{split}", y, len(x), num_classes)


def _check_labels(name: str, field: str, labels: np.ndarray, length: int, num_classes: int):
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int32 or labels.shape != (length,):
        raise ValueError(
            f"dataset {name!r}: {field} must be an int32 array of shape ({length},), got "
            f"{type(labels).__name__} {getattr(labels, 'dtype', '')} {getattr(labels, 'shape', '')}"
        )
    if length and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"dataset {name!r}: {field} has labels in [{labels.min()}, {labels.max()}] but "
            f"there are {num_classes} class names"
        )


def default_data_dir() -> Path:
    """Where dataset files are looked for when no ``data_dir`` is given.

    Returns:
      ``$MAGNET_JAX_DATA`` when set, else ``~/.magnet_jax/datasets``.
    """
    from_env = os.environ.get(DATA_DIR_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".magnet_jax" / "datasets"


# ---------------------------------------------------------------------------------------
# Splits, label remapping, coarsening
# ---------------------------------------------------------------------------------------


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices so that every class sends ``round(fraction * n_c)`` examples to the held-out part.

    A class of ``n_c >= 2`` examples keeps at least one on each side; a class of one stays
    whole in the kept part. Deterministic given ``seed`` (NumPy's PCG64).

    Args:
      labels: ``[N]`` integer labels.
      fraction: in ``(0, 1)``, the share of every class held out.
      seed: random seed.

    Returns:
      ``(kept_indices, held_out_indices)``, each sorted ascending, together a partition of
      ``range(N)``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held_out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = len(members)
        num_held_out = min(max(int(round(fraction * count)), 1), count - 1) if count >= 2 else 0
        held_out.append(rng.permutation(members)[:num_held_out])
    held_out = np.sort(np.concatenate(held_out)) if held_out else np.zeros(0, np.int64)
    kept_mask = np.ones(len(labels), bool)
    kept_mask[held_out] = False
    return np.flatnonzero(kept_mask), held_out


def remap_labels(*label_arrays: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Maps the union of the values to ``0..C-1`` in sorted order.

    Returns:
      ``(remapped int32 arrays, original values [C])``.
    """
    values = np.unique(np.concatenate([np.asarray(a).ravel() for a in label_arrays]))
    remapped = tuple(np.searchsorted(values, np.asarray(a)).astype(np.int32) for a in label_arrays)
    return remapped, values


class ClassGrouping(NamedTuple):
    """Groups of class ids and the group names, for :func:`coarsen` (``coarsen(ds, *g)``)."""

    groups: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]


# Fashion-MNIST ids: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal,
# 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot.
FASHION_MNIST_COARSE = ClassGrouping(
    groups=((0, 2, 3, 4, 6), (5, 7, 9), (1,), (8,)),
    names=("tops", "footwear", "trouser", "bag"),
)
"""Fashion-MNIST in 4 groups: tops {T-shirt/top, Pullover, Dress, Coat, Shirt}, footwear
{Sandal, Sneaker, Ankle boot}, trouser, bag."""

MNIST_PARITY = ClassGrouping(groups=((0, 2, 4, 6, 8), (1, 3, 5, 7, 9)), names=("even", "odd"))
"""MNIST (or digits) in 2 groups by the parity of the digit: even = 0, 2, 4, 6, 8 (group 0),
odd = 1, 3, 5, 7, 9 (group 1)."""


def coarsen(
    dataset: Dataset,
    groups: Sequence[Sequence[int]],
    group_names: Sequence[str],
    *,
    name: str | None = None,
) -> Dataset:
    """Relabels a dataset by groups of its classes, keeping the old labels as fine labels.

    Args:
      dataset: the dataset; its ``y`` becomes ``fine_*`` (any previous ``fine_*`` is dropped).
      groups: ``G`` groups of class ids, together a partition of ``range(C)``.
      group_names: ``G`` names.
      name: name of the result; defaults to ``"<name>/coarse"``.

    Returns:
      A dataset with ``y`` = group id in ``[0, G)`` and the same inputs.
    """
    if len(groups) != len(group_names):
        raise ValueError(f"{len(groups)} groups but {len(group_names)} group names")
    group_of_class = np.full(dataset.num_classes, -1, np.int32)
    for group_id, members in enumerate(groups):
        for class_id in members:
            if not 0 <= class_id < dataset.num_classes:
                raise ValueError(
                    f"group {group_id} has class {class_id}, outside [0, {dataset.num_classes})"
                )
            if group_of_class[class_id] != -1:
                raise ValueError(
                    f"class {class_id} is in group {group_of_class[class_id]} and group {group_id}"
                )
            group_of_class[class_id] = group_id
    missing = np.flatnonzero(group_of_class == -1)
    if missing.size:
        raise ValueError(f"classes {missing.tolist()} of {dataset.name!r} are in no group")
    return Dataset(
        name=name if name is not None else f"{dataset.name}/coarse",
        x_train=dataset.x_train,
        y_train=group_of_class[dataset.y_train],
        x_test=dataset.x_test,
        y_test=group_of_class[dataset.y_test],
        class_names=tuple(group_names),
        fine_train=dataset.y_train,
        fine_test=dataset.y_test,
        fine_class_names=dataset.class_names,
        recall_ks=dataset.recall_ks,
    )


def split_validation(dataset: Dataset, *, fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Carves a stratified validation split out of the training set, for choosing hyperparameters.

    The test set is left out entirely: the result's ``x_train`` is the rest of the training
    set and its ``x_test`` the validation part. Class ids and names are unchanged; fine
    labels are split alongside.

    Args:
      dataset: the dataset.
      fraction: share of every class moved to validation (see :func:`stratified_split`).
      seed: random seed of the split.

    Returns:
      A dataset named ``"<name>/validation"``.
    """
    kept, held_out = stratified_split(dataset.y_train, fraction, seed)
    has_fine = dataset.fine_train is not None
    return Dataset(
        name=f"{dataset.name}/validation",
        x_train=dataset.x_train[kept],
        y_train=dataset.y_train[kept],
        x_test=dataset.x_train[held_out],
        y_test=dataset.y_train[held_out],
        class_names=dataset.class_names,
        fine_train=dataset.fine_train[kept] if has_fine else None,
        fine_test=dataset.fine_train[held_out] if has_fine else None,
        fine_class_names=dataset.fine_class_names,
        recall_ks=dataset.recall_ks,
    )


def candidate_dirs(root: Path, subdirs: Sequence[str]) -> list[Path]:
    """The dataset's own subfolders of ``root`` first, then ``root`` itself."""
    return [root / subdir for subdir in subdirs] + [root]


def check_finite(dataset: Dataset) -> None:
    """Raises unless every input of the dataset is finite, naming the rows that are not.

    Run once when a dataset is loaded: a NaN in the inputs otherwise surfaces far away (a
    non-finite cluster variance, NMI = 0) or not at all.

    Raises:
      ValueError: naming the dataset, the array (``x_train`` / ``x_test``), up to ten of
        its non-finite rows and how many there are.
    """
    for field in ("x_train", "x_test"):
        x = getattr(dataset, field)
        # Image files (streamed) decode to [0, 1]: always finite, and not read here.
        if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating) or not len(x):
            continue
        finite_rows = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if finite_rows.all():
            continue
        bad = np.flatnonzero(~finite_rows)
        shown = ", ".join(str(row) for row in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise ValueError(
            f"dataset {dataset.name!r}: {field} has NaN or inf in {len(bad)} of {len(x)} rows "
            f"(rows {shown}); clean or drop those examples"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Pool:
    """Every example of a source, before it is split into train and test.

    Attributes:
      name: the dataset's name.
      x: ``[N, ...]`` float32 inputs (images NHWC in ``[0, 1]``).
      y: ``[N]`` int32 labels in ``[0, C)``, every class present.
      class_names: ``C`` names.
      given_test: optional ``[N]`` bool, the source's own split (True: test), or None when
        the source has none.
      class_train: optional ``[N]`` bool, the source's own class-disjoint training part
        (the emoji set's ``split`` array); None: the first half of the class ids.
      fine: optional ``[N]`` int32 finer labels (for hierarchy metrics).
      fine_class_names: their names, given with ``fine``.
      recall_ks: as :attr:`Dataset.recall_ks`.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    given_test: np.ndarray | None = None
    class_train: np.ndarray | None = None
    fine: np.ndarray | None = None
    fine_class_names: tuple[str, ...] | None = None
    recall_ks: tuple[int, ...] = DEFAULT_RECALL_KS

    def __post_init__(self):
        _check_labels(self.name, "y", self.y, len(self.x), len(self.class_names))
        for field in ("given_test", "class_train"):
            mask = getattr(self, field)
            if mask is not None and (mask.dtype != bool or mask.shape != self.y.shape):
                raise ValueError(
                    f"dataset {self.name!r}: {field} must be a bool mask of shape "
                    f"{self.y.shape}, got {mask.dtype} {mask.shape}"
                )
