"""EfficientNet-Lite0 in Flax NNX, exactly as PyPI ``efficientnet-lite-pytorch`` 0.1.0 builds
``EfficientNet.from_name('efficientnet-lite0')``.

Stem: 3x3 stride-2 convolution to 32 channels, batch norm, ReLU6. Then 16 MBConv blocks
in 7 groups (repeats 1, 2, 2, 3, 3, 4, 1; kernels 3, 3, 5, 3, 5, 5, 3; strides 1, 2, 2, 2,
1, 2, 1; expansion 1 then 6; 16, 24, 40, 80, 112, 192, 320 output channels), each: 1x1
expansion (when the ratio is not 1), batch norm, ReLU6, depthwise kxk convolution, batch
norm, ReLU6, 1x1 projection, batch norm, and the identity added when the stride is 1 and
the channel counts agree. No squeeze-excite (``use_se=False`` in the Lite variants).
Head: 1x1 convolution to 1280 channels, batch norm, ReLU6, global average pooling,
dropout (0.2; identity at inference, not applied here), linear classifier to 1,000 classes.
Batch norm: epsilon 1e-3, PyTorch momentum 0.01.

Padding: the reference pads every convolution with TensorFlow's "SAME" rule computed for
its configured image size (``Conv2dStaticSamePadding``, total ``(ceil(i/s)-1)*s + k - i``,
the smaller half before). Here every convolution uses ``padding="SAME"``, the same rule on
the actual input size; this module always resizes its input to ``resolution`` first, so
its convolutions see exactly the sizes that ``from_name('efficientnet-lite0',
image_size=resolution)`` computed its paddings for (224: ``from_pretrained``'s default).
Drop-connect (stochastic depth, rate 0.2 in the reference's training mode) and dropout are
not applied: the forward pass is deterministic, as the reference's ``eval()`` mode.

Preprocessing: images in 0-255, ``(x / 255 - 0.5) / 0.5``, as the TensorFlow Lite models
were trained.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from magnet_jax.backbones.common import (
    Backbone,
    TorchTensor,
    batch_norm,
    bn_entries,
    conv,
    conv_entries,
    depthwise_same,
    linear_entries,
    pointwise,
    relu6,
)

# (repeats, kernel, stride, expand ratio, input filters, output filters), from the
# reference's efficientnet_lite() block strings 'r1_k3_s11_e1_i32_o16', ... (Lite0: width
# and depth multipliers 1.0, stem and head not scaled).
LITE0_GROUPS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN = {"epsilon": 1e-3, "torch_momentum": 0.01}


class MBConv(nnx.Module):
    """Mobile inverted bottleneck (the reference's ``MBConvBlock`` without squeeze-excite)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        expand_ratio: int,
        kernel: int,
        stride: int,
        dtype,
        rngs: nnx.Rngs,
    ):
        mid = in_features * expand_ratio
        if expand_ratio != 1:
            self.expand_conv = conv(in_features, mid, 1, padding="SAME", dtype=dtype, rngs=rngs)
            self.bn0 = batch_norm(mid, **_BN, dtype=dtype, rngs=rngs)
        else:
            self.expand_conv = None
            self.bn0 = None
        # Depthwise convolutions stay in float32 whatever the compute dtype: they are ~5% of
        # the FLOPs, and in bfloat16 they alone caused 60% of the error (pooled features
        # 3.8% -> 1.6% relative error at 96x96 on the ImageNet weights).
        self.depthwise_conv = conv(
            mid, mid, kernel, stride, padding="SAME", groups=mid, dtype=jnp.float32, rngs=rngs
        )
        self.bn1 = batch_norm(mid, **_BN, dtype=dtype, rngs=rngs)
        self.project_conv = conv(mid, out_features, 1, padding="SAME", dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(out_features, **_BN, dtype=dtype, rngs=rngs)
        self.skip = stride == 1 and in_features == out_features

    def __call__(self, inputs: jax.Array) -> jax.Array:
        x = inputs
        if self.expand_conv is not None:
            x = relu6(self.bn0(pointwise(self.expand_conv, x)))
        x = relu6(self.bn1(depthwise_same(self.depthwise_conv, x)))
        x = self.bn2(pointwise(self.project_conv, x))
        return x + inputs if self.skip else x


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 (4.65 M parameters). Stages: ``stem``, ``group1`` ... ``group7``
    (the MBConv groups), ``head`` (1x1 convolution to 1280 channels); 1280 features."""

    name = "efficientnet_lite0"
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def build_stages(self, *, dtype, rngs: nnx.Rngs) -> int:
        self.conv_stem = conv(3, 32, 3, 2, padding="SAME", dtype=dtype, rngs=rngs)
        self.bn0 = batch_norm(32, **_BN, dtype=dtype, rngs=rngs)
        blocks = []
        group_of_block = []
        for group, (repeats, kernel, stride, expand, in_f, out_f) in enumerate(LITE0_GROUPS):
            for repeat in range(repeats):
                blocks.append(
                    MBConv(
                        in_f if repeat == 0 else out_f,
                        out_f,
                        expand_ratio=expand,
                        kernel=kernel,
                        stride=stride if repeat == 0 else 1,
                        dtype=dtype,
                        rngs=rngs,
                    )
                )
                group_of_block.append(group)
        self.blocks = nnx.List(blocks)
        self.group_of_block = tuple(group_of_block)
        self.conv_head = conv(LITE0_GROUPS[-1][5], 1280, 1, padding="SAME", dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(1280, **_BN, dtype=dtype, rngs=rngs)
        self.stage_names = ("stem", *(f"group{g + 1}" for g in range(len(LITE0_GROUPS))), "head")
        return 1280

    def _blocks_of_stage(self, index: int) -> list[int]:
        return [b for b, g in enumerate(self.group_of_block) if g + 1 == index]

    def run_stage(self, index: int, x: jax.Array) -> jax.Array:
        if index == 0:
            return relu6(self.bn0(self.conv_stem(x)))
        if index == self.num_stages - 1:
            return relu6(self.bn1(pointwise(self.conv_head, x)))
        for block in self._blocks_of_stage(index):
            x = self.blocks[block](x)
        return x

    def stage_modules(self, index: int) -> list[nnx.Module]:
        if index == 0:
            return [self.conv_stem, self.bn0]
        if index == self.num_stages - 1:
            return [self.conv_head, self.bn1]
        return [self.blocks[b] for b in self._blocks_of_stage(index)]

    def stage_of_path(self, path: tuple) -> int | None:
        head = path[0]
        if head in ("conv_stem", "bn0"):
            return 0
        if head == "blocks":
            return self.group_of_block[int(path[1])] + 1
        if head in ("conv_head", "bn1"):
            return self.num_stages - 1
        return None

    def torch_names(self) -> list[TorchTensor]:
        entries = [*conv_entries("_conv_stem", ("conv_stem",)), *bn_entries("_bn0", ("bn0",))]
        for i, block in enumerate(self.blocks):
            prefix, path = f"_blocks.{i}", ("blocks", i)
            if block.expand_conv is not None:
                entries += conv_entries(f"{prefix}._expand_conv", (*path, "expand_conv"))
                entries += bn_entries(f"{prefix}._bn0", (*path, "bn0"))
            entries += conv_entries(f"{prefix}._depthwise_conv", (*path, "depthwise_conv"))
            entries += bn_entries(f"{prefix}._bn1", (*path, "bn1"))
            entries += conv_entries(f"{prefix}._project_conv", (*path, "project_conv"))
            entries += bn_entries(f"{prefix}._bn2", (*path, "bn2"))
        entries += conv_entries("_conv_head", ("conv_head",))
        entries += bn_entries("_bn1", ("bn1",))
        entries += linear_entries("_fc", ("fc",))
        return entries
