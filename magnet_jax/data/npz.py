"""Precomputed features: an ``.npz`` with ``x`` and ``y`` (and optionally ``x_test``, ``y_test``)."""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from magnet_jax.data.core import Dataset, remap_labels, stratified_split

NPZ_DEFAULT_TEST_FRACTION = 0.2


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


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive; a clear message for a file that is not one."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            start = f.read(6)
        kind = " (it is a single .npy array)" if start == b"\x93NUMPY" else ""
        raise ValueError(
            f"{path}: not an .npz archive{kind}; write one with numpy.savez(path, x=features "
            "[N, d], y=labels [N]) (optionally x_test, y_test)"
        )
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                try:
                    arrays[key] = archive[key]
                except ValueError as error:
                    raise ValueError(
                        f"{path}: array {key!r} holds Python objects, not numbers; save plain "
                        "numeric arrays (numpy.savez with numeric dtypes)"
                    ) from error
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npz file ({error})") from error
    return arrays


def _integer_labels(path: Path, key: str, labels: np.ndarray) -> np.ndarray:
    """``labels`` as a vector, refusing anything but integer class ids."""
    labels = np.asarray(labels)
    if labels.ndim > 1 and labels.size == len(labels):
        labels = labels.ravel()
    if labels.ndim != 1:
        raise ValueError(
            f"{path}: {key} must be a vector of class ids [N], got shape {labels.shape}"
        )
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        whole = np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0)
        advice = (
            f"they are whole numbers: save {key}.astype(np.int64)"
            if whole
            else "regression targets or scores cannot be used as classes"
        )
        raise ValueError(
            f"{path}: {key} has dtype {labels.dtype}; labels must be integer class ids ({advice})"
        )
    return labels


def _load_npz(
    path_text: str, data_dir: str | os.PathLike | None, test_fraction: float, seed: int
) -> Dataset:
    path = _resolve_npz_path(path_text, data_dir)
    arrays = _read_npz(path)
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise ValueError(f"{path}: missing array(s) {missing}; has {sorted(arrays)} (need x and y)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ValueError(f"{path}: has only one of x_test / y_test; give both or neither")
    x, y = arrays["x"], _integer_labels(path, "y", arrays["y"])
    if len(x) != len(y):
        raise ValueError(f"{path}: x has {len(x)} rows but y has {len(y)} labels")
    if "x_test" in arrays:
        x_test, y_test = arrays["x_test"], _integer_labels(path, "y_test", arrays["y_test"])
        if len(x_test) != len(y_test):
            raise ValueError(
                f"{path}: x_test has {len(x_test)} rows but y_test has {len(y_test)} labels"
            )
    else:
        train, test = stratified_split(y, test_fraction, seed)
        x, y, x_test, y_test = x[train], y[train], x[test], y[test]
    if x.ndim == 1:
        x, x_test = x[:, None], x_test[:, None]
    (y, y_test), values = remap_labels(y, y_test)
    return Dataset(
        name=f"npz:{path_text}",
        x_train=np.asarray(x, np.float32),
        y_train=y,
        x_test=np.asarray(x_test, np.float32),
        y_test=y_test,
        class_names=tuple(str(v) for v in values.tolist()),
    )


def load(
    path_text: str,
    data_dir: str | os.PathLike | None = None,
    *,
    test_fraction: float = NPZ_DEFAULT_TEST_FRACTION,
    seed: int = 0,
) -> Dataset:
    """``npz:<path>``: a relative path is tried against the working directory, then ``data_dir``."""
    return _load_npz(path_text, data_dir, test_fraction, seed)
