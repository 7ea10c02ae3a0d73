"""ResNet-50 in Flax NNX, in torchvision's layout (``torchvision.models.resnet50``).

Stem: 7x7 stride-2 convolution (padding 3) to 64 channels, batch norm, ReLU, 3x3 stride-2
max pooling (padding 1). Then ``layer1`` ... ``layer4`` of 3, 4, 6, 3 bottleneck blocks
(widths 64, 128, 256, 512, expansion 4), each: 1x1 convolution, batch norm, ReLU, 3x3
convolution (padding 1) carrying the block's stride ("v1.5": the stride is in the 3x3
convolution, not the first 1x1), batch norm, ReLU, 1x1 convolution, batch norm, plus the
shortcut (a 1x1 strided convolution and batch norm, ``downsample``, in the first block of
each layer), ReLU. Global average pooling, linear classifier. Batch norm: epsilon 1e-5,
PyTorch momentum 0.1. Paddings are PyTorch's: symmetric, as given.

Preprocessing: images in 0-255, ``(x / 255 - mean) / std`` with ImageNet's mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), at 224x224 by default.
"""

from __future__ import annotations

import jax
from flax import nnx

from magnet_jax.backbones.common import (
    Backbone,
    TorchTensor,
    batch_norm,
    bn_entries,
    conv,
    conv_entries,
    linear_entries,
    pointwise,
)

_BN = {"epsilon": 1e-5, "torch_momentum": 0.1}
RESNET50_LAYERS = (3, 4, 6, 3)


def _pad(p: int) -> list[tuple[int, int]]:
    return [(p, p), (p, p)]


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
        out_channels = planes * self.expansion
        self.conv1 = conv(in_channels, planes, 1, padding=_pad(0), dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(planes, **_BN, dtype=dtype, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, stride, padding=_pad(1), dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(planes, **_BN, dtype=dtype, rngs=rngs)
        self.conv3 = conv(planes, out_channels, 1, padding=_pad(0), dtype=dtype, rngs=rngs)
        self.bn3 = batch_norm(out_channels, **_BN, dtype=dtype, rngs=rngs)
        if stride != 1 or in_channels != out_channels:
            self.downsample_conv = conv(
                in_channels, out_channels, 1, stride, padding=_pad(0), dtype=dtype, rngs=rngs
            )
            self.downsample_bn = batch_norm(out_channels, **_BN, dtype=dtype, rngs=rngs)
        else:
            self.downsample_conv = None
            self.downsample_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(pointwise(self.conv1, x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(pointwise(self.conv3, y))
        shortcut = (
            x
            if self.downsample_conv is None
            else self.downsample_bn(pointwise(self.downsample_conv, x))
        )
        return nnx.relu(y + shortcut)


class ResNet50(Backbone):
    """ResNet-50 (25.6 M parameters). Stages: ``stem``, ``layer1`` ... ``layer4``; 2048
    features."""

    name = "resnet50"
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def build_stages(self, *, dtype, rngs: nnx.Rngs) -> int:
        self.conv1 = conv(3, 64, 7, 2, padding=_pad(3), dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(64, **_BN, dtype=dtype, rngs=rngs)
        in_channels = 64
        layers = []
        for index, (blocks, planes) in enumerate(zip(RESNET50_LAYERS, (64, 128, 256, 512))):
            layer = []
            for block in range(blocks):
                stride = 2 if (index > 0 and block == 0) else 1
                layer.append(Bottleneck(in_channels, planes, stride, dtype=dtype, rngs=rngs))
                in_channels = planes * Bottleneck.expansion
            layers.append(nnx.List(layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.stage_names = ("stem", "layer1", "layer2", "layer3", "layer4")
        return in_channels

    def _layer(self, index: int) -> nnx.List:
        return (self.layer1, self.layer2, self.layer3, self.layer4)[index - 1]

    def run_stage(self, index: int, x: jax.Array) -> jax.Array:
        if index == 0:
            x = nnx.relu(self.bn1(self.conv1(x)))
            # PyTorch's MaxPool2d(3, 2, padding=1) pads with -inf.
            return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(1))
        for block in self._layer(index):
            x = block(x)
        return x

    def stage_modules(self, index: int) -> list[nnx.Module]:
        if index == 0:
            return [self.conv1, self.bn1]
        return list(self._layer(index))

    def stage_of_path(self, path: tuple) -> int | None:
        head = path[0]
        if head in ("conv1", "bn1"):
            return 0
        if head in ("layer1", "layer2", "layer3", "layer4"):
            return int(head[-1])
        return None

    def torch_names(self) -> list[TorchTensor]:
        entries = [*conv_entries("conv1", ("conv1",)), *bn_entries("bn1", ("bn1",))]
        for index in range(1, 5):
            for i, block in enumerate(self._layer(index)):
                prefix, path = f"layer{index}.{i}", (f"layer{index}", i)
                for n in (1, 2, 3):
                    entries += conv_entries(f"{prefix}.conv{n}", (*path, f"conv{n}"))
                    entries += bn_entries(f"{prefix}.bn{n}", (*path, f"bn{n}"))
                if block.downsample_conv is not None:
                    entries += conv_entries(f"{prefix}.downsample.0", (*path, "downsample_conv"))
                    entries += bn_entries(f"{prefix}.downsample.1", (*path, "downsample_bn"))
        entries += linear_entries("fc", ("fc",))
        return entries
