"""Importing and exporting backbone weights through PyTorch state-dict names.

Each backbone lists its explicit name map (:meth:`Backbone.torch_names`): PyTorch key,
NNX state path and layout (convolution kernels are OIHW in PyTorch and HWIO here, linear
weights transposed). :func:`load_torch_weights` checks a whole state dict against that map
first and raises one :class:`WeightsMismatchError` listing every missing, unexpected and
wrong-shaped tensor by name; only a state dict that fits entirely is copied in.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from magnet_jax.backbones.common import Backbone, to_flax_layout, to_torch_layout
from magnet_jax.backbones.state_dict import WeightsFileError, read_state_dict

__all__ = ["WeightsMismatchError", "export_torch_state_dict", "load_torch_weights"]

_LIST_AT_MOST = 40


class WeightsMismatchError(WeightsFileError):
    """A state dict whose tensors do not fit the backbone (nothing was loaded)."""

    def __init__(self, message: str, missing, unexpected, wrong_shape):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.wrong_shape = list(wrong_shape)


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_LIST_AT_MOST]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in shown) + more


def _flat_state(module: nnx.Module) -> dict[tuple, nnx.Variable]:
    return dict(nnx.to_flat_state(nnx.state(module)))


def load_torch_weights(
    module: Backbone, state_dict: dict[str, np.ndarray] | str | os.PathLike
) -> Backbone:
    """Copies a PyTorch state dict (or the ``.pth`` / ``.safetensors`` file at that path)
    into ``module`` in place, by the module's explicit name map; returns ``module``.

    Keys ending in ``num_batches_tracked`` are accepted and ignored.

    Raises:
        FileNotFoundError: no file at the path.
        WeightsFileError: the file is not a state dict.
        WeightsMismatchError: missing, unexpected or wrong-shaped (or non-floating) tensors,
            all listed by name; the module is left unchanged.
    """
    source = "the state dict"
    if isinstance(state_dict, (str, os.PathLike)):
        source = os.fspath(state_dict)
        state_dict = read_state_dict(source)
    entries = module.torch_names()
    flat = _flat_state(module)
    mapped_paths = {entry.path for entry in entries}
    unmapped = sorted(str(p) for p in flat if p not in mapped_paths)
    if unmapped:  # a bug in a name map, not in the user's file
        raise AssertionError(f"{module.name}: state without a PyTorch name: {unmapped}")
    expected = {entry.name: entry for entry in entries}
    missing = [name for name in expected if name not in state_dict]
    unexpected = [
        name
        for name in state_dict
        if name not in expected and not name.endswith(module.ignored_suffixes)
    ]
    wrong_shape = []
    values = {}
    for name, entry in expected.items():
        if name not in state_dict:
            continue
        array = np.asarray(state_dict[name])
        target = flat[entry.path]
        torch_shape = to_torch_layout(np.empty(target.shape, np.bool_), entry.kind).shape
        if array.shape != torch_shape:
            wrong_shape.append(f"{name}: {tuple(array.shape)} in the file, {torch_shape} expected")
        elif not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
            wrong_shape.append(f"{name}: dtype {array.dtype} in the file, a float expected")
        else:
            values[entry.path] = to_flax_layout(array, entry.kind).astype(target.dtype)
    if missing or unexpected or wrong_shape:
        parts = [
            _listing(title, items)
            for title, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape or dtype", wrong_shape),
            )
            if items
        ]
        raise WeightsMismatchError(
            f"the weights in {source} do not fit {module.name} (nothing was loaded):\n"
            + "\n".join(parts),
            missing,
            unexpected,
            wrong_shape,
        )
    state = nnx.state(module)
    flat = nnx.to_flat_state(state)
    arrays = jax.device_put([values[path] for path, _ in flat])
    for (_, variable), array in zip(flat, arrays):
        variable.set_value(array)
    nnx.update(module, state)
    return module


def export_torch_state_dict(module: Backbone) -> dict[str, np.ndarray]:
    """The module's weights as a PyTorch-named state dict of NumPy arrays (PyTorch layouts),
    the inverse of :func:`load_torch_weights`."""
    flat = _flat_state(module)
    return {
        entry.name: np.ascontiguousarray(
            to_torch_layout(np.asarray(flat[entry.path].get_value()), entry.kind)
        )
        for entry in module.torch_names()
    }
