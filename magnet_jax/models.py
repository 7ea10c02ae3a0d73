"""Flax NNX embedding networks.

Every model maps inputs ``[B, ...]`` to embeddings ``[B, embedding_dim]``. The models use
GroupNorm/LayerNorm rather than BatchNorm on purpose: the train state is then parameters
only (no mutable batch statistics), a step is a pure function of its inputs, and the
sharded and single-device steps agree exactly because nothing depends on how the batch is
split.

:class:`EmbeddingModel` wraps a trunk and adds what the baselines need as *parameters of
the model*, trained by the same optimizer: a linear classifier on the embedding (softmax
baseline) and learnable class proxies (Proxy-NCA, normalised softmax, ArcFace).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from magnet_jax.losses.distances import l2_normalize


class MLP(nnx.Module):
    """Fully connected trunk for flat inputs ``[B, features]`` (precomputed features; images are flattened)."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        *,
        head_bias: bool = True,
        rngs: nnx.Rngs,
    ):
        sizes = [in_features, *hidden]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.norms = nnx.List([nnx.LayerNorm(b, rngs=rngs) for b in hidden])
        self.head = nnx.Linear(sizes[-1], out_features, use_bias=head_bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer, norm in zip(self.layers, self.norms):
            x = nnx.relu(norm(layer(x)))
        return self.head(x)


def _even(x: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` without its last row and column where H or W is odd."""
    return x[:, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2]


def _pool_windows(x: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` cut to even H and W and split into 2×2 windows,
    ``[B, H/2, 2, W/2, 2, C]``."""
    batch, height, width, channels = x.shape
    return _even(x).reshape(batch, height // 2, 2, width // 2, 2, channels)


@jax.custom_jvp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2×2 max pooling with stride 2 on ``[B, H, W, C]`` (odd H or W: the last row/column is
    dropped, as ``nnx.max_pool`` with VALID padding does).

    The same function and derivatives as ``nnx.max_pool(x, (2, 2), (2, 2))``. The value
    is XLA's windowed reduction, faster on the CPU than a reshape and a max; the
    derivative is that of the reshape and max (the tangent shared equally by the tied
    maxima of a window), whose gradient avoids XLA's select-and-scatter, slow on the CPU.
    """
    return jax.lax.reduce_window(
        _even(x), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
    )


@max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
    # JAX's rule for a max over axes, on the windows: the tangent of every window's maxima,
    # averaged over ties. Reverse mode transposes it.
    (x,), (tangent,) = primals, tangents
    pooled = max_pool_2x2(x)
    at_max = (_pool_windows(x) == pooled[:, :, None, :, None]).astype(tangent.dtype)
    ties = jnp.sum(at_max, axis=(2, 4))
    return pooled, jnp.sum(_pool_windows(tangent) * at_max, axis=(2, 4)) / ties


class ConvNet(nnx.Module):
    """Small convnet for images ``[B, H, W, C]`` (8×8 digits, 28×28, 32×32).

    Two 3×3 conv layers (32 and 64 channels, ReLU, 2×2 max-pool), flatten, a 256-unit dense
    layer, then the embedding. No normalisation layers: two conv layers
    train well without them, and GroupNorm's backward pass tripled the step time on CPU.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        out_features: int,
        *,
        width: int = 32,
        head_bias: bool = True,
        rngs: nnx.Rngs,
    ):
        height, width_pixels, in_channels = input_shape
        self.conv1 = nnx.Conv(in_channels, width, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
        flat_features = (height // 4) * (width_pixels // 4) * 2 * width
        self.dense = nnx.Linear(flat_features, 256, rngs=rngs)
        self.head = nnx.Linear(256, out_features, use_bias=head_bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = max_pool_2x2(nnx.relu(self.conv1(x)))
        x = max_pool_2x2(nnx.relu(self.conv2(x)))
        return self.head(nnx.relu(self.dense(x.reshape(x.shape[0], -1))))


class ResidualBlock(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(
            in_channels, out_channels, (3, 3), strides=stride, use_bias=False, rngs=rngs
        )
        self.norm1 = nnx.GroupNorm(out_channels, num_groups=8, rngs=rngs)
        self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3), use_bias=False, rngs=rngs)
        self.norm2 = nnx.GroupNorm(out_channels, num_groups=8, rngs=rngs)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = (
            nnx.Conv(in_channels, out_channels, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            if needs_projection
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return nnx.relu(y + shortcut)


class ResNet(nnx.Module):
    """ResNet-style net for CIFAR ``[B, 32, 32, 3]``: a stem and three stages of residual
    blocks (widths ``width·(1, 2, 4)``, strides 1, 2, 2), global average pooling, embedding."""

    def __init__(
        self,
        in_channels: int,
        out_features: int,
        *,
        width: int = 32,
        blocks_per_stage: int = 2,
        head_bias: bool = True,
        rngs: nnx.Rngs,
    ):
        self.stem = nnx.Conv(in_channels, width, (3, 3), use_bias=False, rngs=rngs)
        self.stem_norm = nnx.GroupNorm(width, num_groups=8, rngs=rngs)
        blocks = []
        channels = width
        for stage, stage_width in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks_per_stage):
                stride = 2 if (stage > 0 and block == 0) else 1
                blocks.append(ResidualBlock(channels, stage_width, stride, rngs=rngs))
                channels = stage_width
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(channels, out_features, use_bias=head_bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_norm(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


ARCHITECTURES = ("mlp", "convnet", "resnet")


class EmbeddingModel(nnx.Module):
    """A trunk producing embeddings, plus optional classifier weights and class proxies.

    ``model(x)`` returns the embeddings ``[B, embedding_dim]`` (unit-norm when
    ``normalize``); ``model.logits(embeddings)`` the classifier's logits ``[B, C]``.
    """

    def __init__(
        self,
        trunk: nnx.Module,
        *,
        embedding_dim: int,
        normalize: bool = False,
        num_classes: int | None = None,
        classifier: bool = False,
        proxies: bool = False,
        rngs: nnx.Rngs,
    ):
        if (classifier or proxies) and not num_classes:
            raise ValueError("a classifier or proxies need num_classes")
        self.trunk = trunk
        self.normalize = normalize
        self.embedding_dim = embedding_dim
        self.classifier = nnx.Linear(embedding_dim, num_classes, rngs=rngs) if classifier else None
        self.proxies = (
            nnx.Param(
                jax.random.normal(rngs.params(), (num_classes, embedding_dim))
                / jnp.sqrt(embedding_dim)
            )
            if proxies
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        embeddings = self.trunk(x)
        return l2_normalize(embeddings) if self.normalize else embeddings

    def logits(self, embeddings: jax.Array) -> jax.Array:
        if self.classifier is None:
            raise ValueError("this model was built without a classifier head")
        return self.classifier(embeddings)


def default_architecture(input_shape: Sequence[int]) -> str:
    """``mlp`` for flat inputs, ``convnet`` for images."""
    return "mlp" if len(input_shape) == 1 else "convnet"


def create_model(
    architecture: str,
    input_shape: Sequence[int],
    *,
    embedding_dim: int,
    seed: int,
    normalize: bool = False,
    num_classes: int | None = None,
    classifier: bool = False,
    proxies: bool = False,
    hidden: Sequence[int] = (256, 256),
    width: int = 32,
) -> EmbeddingModel:
    """Builds an :class:`EmbeddingModel` for inputs of ``input_shape`` (one example, no batch axis).

    Raises:
        ValueError: unknown architecture, or an input shape the architecture cannot take.
    """
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
    rngs = nnx.Rngs(seed)
    input_shape = tuple(int(s) for s in input_shape)
    # Distance-based losses are invariant to translating every embedding, so a bias on the
    # embedding layer gets an exactly-zero gradient; Adam would turn its rounding noise
    # into ±lr steps (and make runs on 1 and N devices drift apart). It only does
    # something before an L2 normalisation, and before a classifier it is redundant.
    head_bias = normalize
    if architecture == "mlp":
        in_features = int(jnp.prod(jnp.array(input_shape)))
        trunk = MLP(in_features, hidden, embedding_dim, head_bias=head_bias, rngs=rngs)
    elif architecture in ("convnet", "resnet"):
        if len(input_shape) != 3:
            raise ValueError(
                f"architecture {architecture!r} needs images [H, W, C]; got examples of shape {input_shape}"
            )
        if architecture == "convnet":
            trunk = ConvNet(input_shape, embedding_dim, width=width, head_bias=head_bias, rngs=rngs)
        else:
            trunk = ResNet(
                input_shape[-1], embedding_dim, width=width, head_bias=head_bias, rngs=rngs
            )
    else:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")
    return EmbeddingModel(
        trunk,
        embedding_dim=embedding_dim,
        normalize=normalize,
        num_classes=num_classes,
        classifier=classifier,
        proxies=proxies,
        rngs=rngs,
    )
