"""Datasets as in-memory arrays: digits, MNIST, Fashion-MNIST, CIFAR, TFDS and .npz features.

Every loader returns a :class:`Dataset`: NumPy arrays that the sampler indexes at random,
labels remapped to contiguous ``int32`` ids in ``[0, C)`` and, where the dataset defines
them, class names.

Names accepted by :func:`load_dataset`:

* ``digits`` -- scikit-learn's bundled 8x8 digits (no files needed). A fixed stratified
  split (25% of every class to test, seed 0): 1,347 train / 450 test examples, images
  ``[N, 8, 8, 1]`` scaled ``/16`` to ``[0, 1]``.
* ``mnist``, ``fashion_mnist`` -- the standard idx files (``.gz`` or uncompressed). The
  decompressed content of the canonical files is checked against embedded SHA-256 sums.
  Images ``[N, 28, 28, 1]`` in ``[0, 1]``.
* ``cifar10``, ``cifar100`` -- the python-pickle archives (``cifar-10-python.tar.gz``,
  ``cifar-100-python.tar.gz``) or their extracted folders. Images ``[N, 32, 32, 3]`` in
  ``[0, 1]``. CIFAR-100 takes ``label_mode="fine"`` (100 classes) or ``"coarse"`` (20
  superclasses; the fine labels then go into ``fine_train`` / ``fine_test``).
* ``tfds:<name>`` -- any TensorFlow Datasets builder (needs ``pip install
  'magnet-jax[tfds]'``).
* ``npz:<path>`` -- precomputed features: an ``.npz`` with ``x`` and ``y`` and optionally
  ``x_test`` and ``y_test``.

Where files are looked for: ``data_dir`` when given, else the environment variable
``MAGNET_JAX_DATA``, else ``~/.magnet_jax/datasets`` (see :func:`default_data_dir`). The
directory may be the dataset's own folder or its parent: for Fashion-MNIST the loader looks
in ``<dir>``, ``<dir>/fashion-mnist``, ``<dir>/fashion_mnist``, ``<dir>/FashionMNIST/raw``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Dataset",
    "ClassGrouping",
    "load_dataset",
    "coarsen",
    "split_validation",
    "stratified_split",
    "parse_idx",
    "default_data_dir",
    "KNOWN_DATASETS",
    "FASHION_MNIST_CLASS_NAMES",
    "FASHION_MNIST_COARSE",
    "MNIST_PARITY",
    "DIGITS_TEST_FRACTION",
    "DIGITS_SPLIT_SEED",
]

KNOWN_DATASETS = (
    "digits",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "mnist_parity",
    "fashion_mnist_coarse",
    "cifar100_coarse",
    "tfds:<name>",
    "npz:<path>",
)
# Coarse-label datasets for hierarchy experiments: y is the coarse class, fine_* the original.
_COARSE_VARIANTS = {
    "mnist_parity": ("mnist", "MNIST_PARITY"),
    "fashion_mnist_coarse": ("fashion_mnist", "FASHION_MNIST_COARSE"),
    "cifar100_coarse": ("cifar100", None),
}

DATA_DIR_ENV_VAR = "MAGNET_JAX_DATA"
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
NPZ_DEFAULT_TEST_FRACTION = 0.2

MNIST_CLASS_NAMES = tuple(str(digit) for digit in range(10))
FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


# ---------------------------------------------------------------------------------------
# The dataset container
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled train/test pair held in memory.

    Attributes:
      name: what the dataset is called (``"fashion_mnist"``, ``"npz:feats.npz"``, ...).
      x_train: ``[N, ...]`` float32 inputs. Images (digits too) are NHWC in ``[0, 1]``;
        precomputed features are as given.
      y_train: ``[N]`` int32 labels in ``[0, C)``.
      x_test: ``[M, ...]`` float32, same trailing shape as ``x_train``.
      y_test: ``[M]`` int32 labels in ``[0, C)``.
      class_names: ``C`` names; ``class_names[y]`` names label ``y``.
      fine_train: optional ``[N]`` int32 second labelling, the fine labels when ``y`` is a
        coarse one (CIFAR-100 superclasses, :func:`coarsen`).
      fine_test: optional ``[M]`` int32, like ``fine_train``.
      fine_class_names: names of the fine labels, when there are fine labels.
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


def _check_split(name: str, split: str, x: np.ndarray, y: np.ndarray, num_classes: int):
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 2:
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


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """Where dataset files are looked for when no ``data_dir`` is given.

    Returns:
      ``$MAGNET_JAX_DATA`` when set, else ``~/.magnet_jax/datasets``.
    """
    from_env = os.environ.get(DATA_DIR_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".magnet_jax" / "datasets"


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    label_mode: str = "fine",
    test_fraction: float = NPZ_DEFAULT_TEST_FRACTION,
    seed: int = 0,
    manual_dir: str | os.PathLike | None = None,
    splits: tuple[str, str] = ("train", "test"),
    image_size: tuple[int, int] | None = None,
) -> Dataset:
    """Loads a dataset by name into memory.

    Args:
      name: ``digits``, ``mnist``, ``fashion_mnist`` (``fashion-mnist`` too), ``cifar10``,
        ``cifar100``, ``tfds:<builder name>`` or ``npz:<path>``; or a coarse-label variant
        for hierarchy experiments: ``mnist_parity`` (even/odd), ``fashion_mnist_coarse``
        (tops, footwear, trouser, bag), ``cifar100_coarse`` (20 superclasses); their
        original labels are kept as ``fine_*``.
      data_dir: where the files are (the dataset's folder or its parent); defaults to
        :func:`default_data_dir`. For ``tfds:`` it is TFDS's data dir (TFDS's default when
        None). For ``npz:`` a relative path is tried against the working directory, then
        against ``data_dir``. Unused by ``digits``.
      verify: check the SHA-256 of the decompressed MNIST / Fashion-MNIST files whose names
        are the canonical ones. ``False`` skips the check.
      label_mode: CIFAR-100 only: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses,
        fine labels kept in ``fine_*``).
      test_fraction: ``npz:`` only, when the file has no ``x_test``: the fraction of every
        class held out for test.
      seed: ``npz:`` only: seed of that held-out split.
      manual_dir: ``tfds:`` only: local raw files, passed as
        ``tfds.download.DownloadConfig(manual_dir=...)``.
      splits: ``tfds:`` only: the TFDS split names used as train and test.
      image_size: ``tfds:`` only: ``(height, width)`` to resize every image to; needed for
        datasets whose images differ in size.

    Returns:
      The :class:`Dataset`.

    Raises:
      ValueError: unknown name or option, or corrupt data.
      FileNotFoundError: the files are not where they were looked for.
      ImportError: ``tfds:`` without tensorflow-datasets installed.
    """
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    if name.startswith("tfds:"):
        return _load_tfds(name[len("tfds:") :], data_dir, manual_dir, splits, image_size)
    if name.startswith("npz:"):
        return _load_npz(name[len("npz:") :], data_dir, test_fraction, seed)
    key = name.lower().replace("-", "_")
    if label_mode == "coarse" and key != "cifar100":
        raise ValueError(f"label_mode='coarse' applies to cifar100 only, not to {name!r}")
    if key in _COARSE_VARIANTS:
        base, grouping = _COARSE_VARIANTS[key]
        if base == "cifar100":
            return load_dataset(base, data_dir, label_mode="coarse")
        fine = load_dataset(base, data_dir, verify=verify)
        return coarsen(fine, *globals()[grouping], name=key)
    if key == "digits":
        return _load_digits()
    if key in _IDX_DATASETS:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        return _load_idx_dataset(key, root, verify)
    if key in _CIFAR_SPECS:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        return _load_cifar(key, root, label_mode)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}")


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


def _remap_labels(*label_arrays: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
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
    )


# ---------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images[..., None] / 16.0).astype(np.float32)  # [1797, 8, 8, 1]
    y = bunch.target.astype(np.int32)
    train, test = stratified_split(y, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    return Dataset(
        name="digits",
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        class_names=MNIST_CLASS_NAMES,
    )


# ---------------------------------------------------------------------------------------
# idx files: MNIST, Fashion-MNIST
# ---------------------------------------------------------------------------------------

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# SHA-256 of the decompressed canonical files (RAW_CONTENT of ../shared/datasets/*).
_IDX_RAW_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

_IDX_DATASETS = {
    "mnist": {
        "title": "MNIST",
        "subdirs": ("mnist", "MNIST", "MNIST/raw"),
        "class_names": MNIST_CLASS_NAMES,
        "source": "https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of yann.lecun.com/exdb/mnist)",
    },
    "fashion_mnist": {
        "title": "Fashion-MNIST",
        "subdirs": ("fashion-mnist", "fashion_mnist", "FashionMNIST", "FashionMNIST/raw"),
        "class_names": FASHION_MNIST_CLASS_NAMES,
        "source": "https://github.com/zalandoresearch/fashion-mnist",
    },
}

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_GZIP_MAGIC = b"\x1f\x8b"


def _candidate_dirs(root: Path, subdirs: Sequence[str]) -> list[Path]:
    """The dataset's own subfolders of ``root`` first, then ``root`` itself."""
    return [root / subdir for subdir in subdirs] + [root]


def _find_idx_file(title: str, file_name: str, dirs: Sequence[Path], source: str) -> Path:
    """The first ``<dir>/<file_name>.gz`` or ``<dir>/<file_name>`` over ``dirs`` (the last is the root)."""
    for directory in dirs:
        for candidate in (directory / f"{file_name}.gz", directory / file_name):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{title} file '{file_name}.gz' not found in {dirs[-1]} (looked for {file_name}.gz or "
        f"{file_name} in {', '.join(str(d) for d in dirs)}). Download it from {source} or pass "
        "--data-dir (data_dir=) pointing at a folder that holds it."
    )


def _read_maybe_gzipped(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip (detected by its magic bytes)."""
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError as error:
        raise ValueError(f"{path}: gzip stream is truncated ({error})") from error
    except (gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path}: corrupt gzip data ({error})") from error


def parse_idx(content: bytes, source: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Parses an idx file of unsigned bytes.

    Args:
      content: the decompressed bytes.
      source: the file, for error messages.
      expected_magic: 2051 for images (3 dimensions), 2049 for labels (1 dimension).

    Returns:
      ``uint8`` array of the shape in the header (a read-only view of ``content``).
    """
    if len(content) < 4:
        raise ValueError(f"{source}: truncated idx file ({len(content)} bytes, no header)")
    magic = int.from_bytes(content[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{source}: wrong idx magic number {magic} (0x{magic:08x}), expected {expected_magic} "
            f"(0x{expected_magic:08x}); not an idx {'images' if expected_magic == _IDX_IMAGES_MAGIC else 'labels'} file"
        )
    num_dims = content[3]
    header_size = 4 + 4 * num_dims
    if len(content) < header_size:
        raise ValueError(f"{source}: truncated idx header ({len(content)} of {header_size} bytes)")
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims))
    expected_size = header_size + int(np.prod(shape))
    if len(content) != expected_size:
        problem = "truncated" if len(content) < expected_size else "has trailing bytes"
        raise ValueError(
            f"{source}: idx file {problem}: header says shape {shape} = {expected_size} bytes, "
            f"file has {len(content)}"
        )
    return np.frombuffer(content, np.uint8, offset=header_size).reshape(shape)


def _verify_sha256(content: bytes, path: Path, expected: str, title: str):
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected:
        raise ValueError(
            f"{path}: checksum mismatch for the {title} file: SHA-256 of the decompressed content "
            f"is {actual}, expected {expected}. The file is corrupt or not the canonical one; "
            "download it again, or pass verify=False to skip the check."
        )


def _read_idx_file(key: str, part: str, dirs: Sequence[Path], verify: bool) -> np.ndarray:
    spec = _IDX_DATASETS[key]
    file_name = _IDX_FILES[part]
    path = _find_idx_file(spec["title"], file_name, dirs, spec["source"])
    content = _read_maybe_gzipped(path)
    magic = _IDX_IMAGES_MAGIC if part.endswith("images") else _IDX_LABELS_MAGIC
    array = parse_idx(content, path, magic)
    if verify:
        _verify_sha256(content, path, _IDX_RAW_SHA256[key][file_name], spec["title"])
    return array


def _idx_split(
    key: str, split: str, dirs: Sequence[Path], verify: bool
) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx_file(key, f"{split}_images", dirs, verify)
    labels = _read_idx_file(key, f"{split}_labels", dirs, verify)
    if len(images) != len(labels):
        raise ValueError(
            f"{_IDX_DATASETS[key]['title']} {split} split: {len(images)} images but {len(labels)} labels "
            f"(files {_IDX_FILES[split + '_images']}, {_IDX_FILES[split + '_labels']} in {dirs[-1]})"
        )
    num_classes = len(_IDX_DATASETS[key]["class_names"])
    if len(labels) and labels.max() >= num_classes:
        raise ValueError(
            f"{_IDX_DATASETS[key]['title']} {split} labels: found label {labels.max()}, expected < {num_classes}"
        )
    x = images[..., None].astype(np.float32)
    x /= np.float32(255.0)
    return x, labels.astype(np.int32)


def _load_idx_dataset(key: str, root: Path, verify: bool) -> Dataset:
    spec = _IDX_DATASETS[key]
    if not root.is_dir():
        raise FileNotFoundError(
            f"{spec['title']} data directory {root} does not exist. Pass --data-dir (data_dir=) "
            f"pointing at the folder holding the idx files (or its parent), or set ${DATA_DIR_ENV_VAR}; "
            f"download the files from {spec['source']}."
        )
    dirs = _candidate_dirs(root, spec["subdirs"])
    # All four files come from the folder that holds the training images.
    first = _find_idx_file(spec["title"], _IDX_FILES["train_images"], dirs, spec["source"])
    dirs = [first.parent]
    x_train, y_train = _idx_split(key, "train", dirs, verify)
    x_test, y_test = _idx_split(key, "test", dirs, verify)
    return Dataset(
        name=key,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=spec["class_names"],
    )


# ---------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------

_CIFAR_SPECS = {
    "cifar10": {
        "title": "CIFAR-10",
        "archive": "cifar-10-python.tar.gz",
        "folder": "cifar-10-batches-py",
        "subdirs": ("cifar10", "cifar-10", "CIFAR10"),
        "train_files": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_files": ("test_batch",),
        "meta_file": "batches.meta",
    },
    "cifar100": {
        "title": "CIFAR-100",
        "archive": "cifar-100-python.tar.gz",
        "folder": "cifar-100-python",
        "subdirs": ("cifar100", "cifar-100", "CIFAR100"),
        "train_files": ("train",),
        "test_files": ("test",),
        "meta_file": "meta",
    },
}
_CIFAR_SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html"

# Globals a CIFAR pickle may name: numpy arrays (and the bytes codec of protocol-2 pickles).
_ALLOWED_PICKLE_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and NumPy arrays only, so a file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def _unpickle(content: bytes, source: str) -> dict:
    try:
        loaded = _ArrayOnlyUnpickler(io.BytesIO(content), encoding="bytes").load()
    except Exception as error:  # noqa: BLE001 -- any failure means a corrupt file
        raise ValueError(
            f"{source}: not a readable CIFAR python pickle ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{source}: expected a pickled dict, got {type(loaded).__name__}")
    return loaded


class _CifarFiles:
    """Reads CIFAR member files from an extracted folder or from the .tar.gz archive."""

    def __init__(self, spec: dict, root: Path):
        self.spec = spec
        self.folder, self.archive = self._locate(root)

    def _locate(self, root: Path) -> tuple[Path | None, Path | None]:
        spec = self.spec
        first_file = spec["train_files"][0]
        looked = []
        for directory in _candidate_dirs(root, spec["subdirs"]):
            for folder in (directory / spec["folder"], directory):
                looked.append(str(folder / first_file))
                if (folder / first_file).is_file():
                    return folder, None
            looked.append(str(directory / spec["archive"]))
            if (directory / spec["archive"]).is_file():
                return None, directory / spec["archive"]
        raise FileNotFoundError(
            f"{spec['title']} not found in {root}: need the archive '{spec['archive']}' or its extracted "
            f"folder '{spec['folder']}/' (looked for {', '.join(looked)}). Download "
            f"{spec['archive']} from {_CIFAR_SOURCE} or pass --data-dir (data_dir=) pointing at a folder "
            "that holds it."
        )

    def read_all(self, names: Sequence[str]) -> dict[str, dict]:
        if self.folder is not None:
            result = {}
            for name in names:
                path = self.folder / name
                if not path.is_file():
                    raise FileNotFoundError(
                        f"{self.spec['title']} file '{name}' not found in {self.folder} (an extracted "
                        f"'{self.spec['folder']}/' needs {', '.join(names)}). Re-extract {self.spec['archive']} "
                        f"from {_CIFAR_SOURCE}."
                    )
                result[name] = _unpickle(path.read_bytes(), str(path))
            return result
        return self._read_from_archive(names)

    def _read_from_archive(self, names: Sequence[str]) -> dict[str, dict]:
        wanted = {f"{self.spec['folder']}/{name}": name for name in names}
        found = {}
        try:
            with tarfile.open(self.archive, "r:gz") as archive:
                for member in archive:
                    member_name = member.name.removeprefix("./")
                    if member_name in wanted and member.isfile():
                        content = archive.extractfile(member).read()
                        found[wanted[member_name]] = _unpickle(
                            content, f"{self.archive}:{member_name}"
                        )
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            problem = f"{type(error).__name__}: {error}"
            raise ValueError(f"{self.archive}: corrupt or truncated archive ({problem})") from error
        missing = [f"{self.spec['folder']}/{name}" for name in names if name not in found]
        if missing:
            raise ValueError(
                f"{self.archive}: archive lacks {', '.join(missing)}; not the standard {self.spec['archive']}"
            )
        return found


def _cifar_field(batch: dict, key: bytes, source: str) -> Any:
    if key not in batch:
        raise ValueError(f"{source}: missing key {key!r} (has {sorted(batch)})")
    return batch[key]


def _cifar_images(batches: Sequence[tuple[str, dict]]) -> np.ndarray:
    """``[n, 3072]`` uint8 rows (R, G, B planes of 32x32) of every batch -> ``[N, 32, 32, 3]`` float32 in [0, 1]."""
    parts = []
    for source, batch in batches:
        data = np.asarray(_cifar_field(batch, b"data", source))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{source}: b'data' must be uint8 [n, 3072], got {data.dtype} {data.shape}"
            )
        parts.append(data)
    data = np.concatenate(parts)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32)
    images /= np.float32(255.0)
    return images


def _cifar_labels(batches: Sequence[tuple[str, dict]], key: bytes, num_classes: int) -> np.ndarray:
    parts = []
    for source, batch in batches:
        labels = np.asarray(_cifar_field(batch, key, source), dtype=np.int64).ravel()
        num_rows = len(_cifar_field(batch, b"data", source))
        if labels.shape != (num_rows,):
            raise ValueError(f"{source}: {len(labels)} labels under {key!r} for {num_rows} images")
        if num_rows and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{source}: labels under {key!r} outside [0, {num_classes})")
        parts.append(labels)
    return np.concatenate(parts).astype(np.int32)


def _cifar_names(meta: dict, key: bytes, source: str) -> tuple[str, ...]:
    names = _cifar_field(meta, key, source)
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _load_cifar(key: str, root: Path, label_mode: str) -> Dataset:
    spec = _CIFAR_SPECS[key]
    if not root.is_dir():
        raise FileNotFoundError(
            f"{spec['title']} data directory {root} does not exist. Pass --data-dir (data_dir=) pointing at "
            f"the folder holding {spec['archive']} or {spec['folder']}/ (or set ${DATA_DIR_ENV_VAR}); "
            f"download it from {_CIFAR_SOURCE}."
        )
    files = _CifarFiles(spec, root)
    where = files.folder if files.folder is not None else files.archive
    contents = files.read_all(spec["train_files"] + spec["test_files"] + (spec["meta_file"],))
    train = [(f"{where}/{n}", contents[n]) for n in spec["train_files"]]
    test = [(f"{where}/{n}", contents[n]) for n in spec["test_files"]]
    meta_source, meta = f"{where}/{spec['meta_file']}", contents[spec["meta_file"]]
    x_train, x_test = _cifar_images(train), _cifar_images(test)
    if key == "cifar10":
        names = _cifar_names(meta, b"label_names", meta_source)
        return Dataset(
            name=key,
            x_train=x_train,
            y_train=_cifar_labels(train, b"labels", len(names)),
            x_test=x_test,
            y_test=_cifar_labels(test, b"labels", len(names)),
            class_names=names,
        )
    fine_names = _cifar_names(meta, b"fine_label_names", meta_source)
    coarse_names = _cifar_names(meta, b"coarse_label_names", meta_source)
    fine_train = _cifar_labels(train, b"fine_labels", len(fine_names))
    fine_test = _cifar_labels(test, b"fine_labels", len(fine_names))
    if label_mode == "fine":
        return Dataset(key, x_train, fine_train, x_test, fine_test, fine_names)
    return Dataset(
        name=f"{key}/coarse",
        x_train=x_train,
        y_train=_cifar_labels(train, b"coarse_labels", len(coarse_names)),
        x_test=x_test,
        y_test=_cifar_labels(test, b"coarse_labels", len(coarse_names)),
        class_names=coarse_names,
        fine_train=fine_train,
        fine_test=fine_test,
        fine_class_names=fine_names,
    )


# ---------------------------------------------------------------------------------------
# .npz features
# ---------------------------------------------------------------------------------------


def _resolve_npz_path(path_text: str, data_dir: str | os.PathLike | None) -> Path:
    path = Path(path_text).expanduser()
    candidates = [path]
    if not path.is_absolute() and data_dir is not None:
        candidates.append(Path(data_dir).expanduser() / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"features file '{path_text}' not found (looked for {', '.join(str(c.resolve()) for c in candidates)}). "
        "Write it with numpy.savez(path, x=features [N, d], y=labels [N]) (optionally x_test, y_test)."
    )


def _load_npz(
    path_text: str, data_dir: str | os.PathLike | None, test_fraction: float, seed: int
) -> Dataset:
    path = _resolve_npz_path(path_text, data_dir)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError, zlib.error, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npz file ({error})") from error
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise ValueError(f"{path}: missing array(s) {missing}; has {sorted(arrays)} (need x and y)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ValueError(f"{path}: has only one of x_test / y_test; give both or neither")
    x, y = arrays["x"], arrays["y"].ravel()
    if len(x) != len(y):
        raise ValueError(f"{path}: x has {len(x)} rows but y has {len(y)} labels")
    if "x_test" in arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"].ravel()
        if len(x_test) != len(y_test):
            raise ValueError(
                f"{path}: x_test has {len(x_test)} rows but y_test has {len(y_test)} labels"
            )
    else:
        train, test = stratified_split(y, test_fraction, seed)
        x, y, x_test, y_test = x[train], y[train], x[test], y[test]
    if x.ndim == 1:
        x, x_test = x[:, None], x_test[:, None]
    (y, y_test), values = _remap_labels(y, y_test)
    return Dataset(
        name=f"npz:{path_text}",
        x_train=np.asarray(x, np.float32),
        y_train=y,
        x_test=np.asarray(x_test, np.float32),
        y_test=y_test,
        class_names=tuple(str(v) for v in values.tolist()),
    )


# ---------------------------------------------------------------------------------------
# TensorFlow Datasets
# ---------------------------------------------------------------------------------------


def _import_tfds(builder_name: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            f"tfds:{builder_name} needs tensorflow-datasets: pip install 'magnet-jax[tfds]'"
        ) from error
    return tfds


def _tfds_split_arrays(
    builder, split: str, image_size: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """One split as ``(x [N, ...] float32, y [N] int64)``; images scaled to [0, 1]."""
    import tensorflow as tf

    dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    if image_size is not None:
        dataset = dataset.map(lambda image, label: (tf.image.resize(image, image_size), label))
    xs, ys = [], []
    for x, y in dataset.batch(1024).as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys).ravel()
    image_feature = builder.info.features[builder.info.supervised_keys[0]]
    is_image = type(image_feature).__name__ == "Image"
    if is_image:
        x = x.astype(np.float32) / np.float32(255.0)
        if x.ndim == 3:
            x = x[..., None]
    return np.asarray(x, np.float32), y


def _load_tfds(
    builder_name: str,
    data_dir: str | os.PathLike | None,
    manual_dir: str | os.PathLike | None,
    splits: tuple[str, str],
    image_size: tuple[int, int] | None,
) -> Dataset:
    tfds = _import_tfds(builder_name)
    builder = tfds.builder(builder_name, data_dir=None if data_dir is None else os.fspath(data_dir))
    download_config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(manual_dir)
    )
    builder.download_and_prepare(download_config=download_config)
    if builder.info.supervised_keys is None:
        raise ValueError(f"tfds:{builder_name} has no supervised (input, label) keys")
    train_split, test_split = splits
    x_train, y_train = _tfds_split_arrays(builder, train_split, image_size)
    x_test, y_test = _tfds_split_arrays(builder, test_split, image_size)
    label_feature = builder.info.features[builder.info.supervised_keys[1]]
    names = getattr(label_feature, "names", None)
    if names:
        return Dataset(
            f"tfds:{builder_name}",
            x_train,
            y_train.astype(np.int32),
            x_test,
            y_test.astype(np.int32),
            tuple(names),
        )
    (y_train, y_test), values = _remap_labels(y_train, y_test)
    return Dataset(
        f"tfds:{builder_name}",
        x_train,
        y_train,
        x_test,
        y_test,
        tuple(str(v) for v in values.tolist()),
    )
