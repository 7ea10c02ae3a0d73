"""MNIST and Fashion-MNIST from the standard idx files (``.gz`` or uncompressed).

The decompressed content of the canonical files is checked against embedded SHA-256 sums.
Images ``[N, 28, 28, 1]`` in ``[0, 1]``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from magnet_jax.data.core import DATA_DIR_ENV_VAR, Dataset, candidate_dirs
from magnet_jax.data.digits import MNIST_CLASS_NAMES

FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

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
            "download it again, or pass --no-verify (verify=False) to skip the check."
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
    dirs = candidate_dirs(root, spec["subdirs"])
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


def load(key: str, data_dir: str | os.PathLike | None = None, *, verify: bool = True) -> Dataset:
    """``mnist`` or ``fashion_mnist`` from ``data_dir`` (the dataset's folder or its parent)."""
    from magnet_jax.data.core import default_data_dir

    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return _load_idx_dataset(key, root, verify)
