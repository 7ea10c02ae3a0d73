"""CIFAR-10 and CIFAR-100 from the python-pickle archives or their extracted folders.

Images ``[N, 32, 32, 3]`` in ``[0, 1]``. CIFAR-100 takes ``label_mode="fine"`` (100
classes) or ``"coarse"`` (20 superclasses; the fine labels then go into ``fine_*``).
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from magnet_jax.data.core import DATA_DIR_ENV_VAR, Dataset, candidate_dirs

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
        for directory in candidate_dirs(root, spec["subdirs"]):
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


def load(key: str, data_dir=None, *, label_mode: str = "fine") -> Dataset:
    """``cifar10`` or ``cifar100`` from ``data_dir`` (the archive's folder or the extracted one)."""
    from magnet_jax.data.core import default_data_dir

    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return _load_cifar(key, root, label_mode)
