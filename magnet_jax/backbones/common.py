"""What the backbones share: layers with PyTorch's semantics, preprocessing, the stage
interface, and the explicit PyTorch name map used to import and export weights."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# He-normal over fan-out, as torchvision's ResNet and the EfficientNet code initialise
# their convolutions (only matters for backbones built without weights).
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    *,
    padding: str | Sequence[tuple[int, int]],
    groups: int = 1,
    dtype: Any,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A bias-free 2-D convolution with an explicit padding rule.

    ``padding="SAME"`` is TensorFlow's rule, which is also PyTorch EfficientNet's
    ``Conv2dStaticSamePadding`` (total ``max((ceil(i/s)-1)*s + k - i, 0)``, the smaller half
    before); a list of pairs is PyTorch's symmetric ``padding=p`` as ``[(p, p), (p, p)]``.
    """
    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel, kernel),
        strides=stride,
        padding=padding,
        feature_group_count=groups,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        rngs=rngs,
    )


def batch_norm(
    features: int, *, epsilon: float, torch_momentum: float, dtype, rngs
) -> nnx.BatchNorm:
    """Batch norm in inference mode (running statistics) until told otherwise.

    ``torch_momentum`` is PyTorch's (weight of the new batch); Flax's momentum is its
    complement. In training mode Flax keeps the biased batch variance in its running
    average where PyTorch keeps the unbiased one; inference is identical.

    It normalises in float32 whatever the compute dtype (``dtype`` is accepted for symmetry
    and unused): in bfloat16, folding the running variance into the scale loses ~1% per
    layer, and a reduced-precision run keeps its convolutions (the cost) in bfloat16.
    """
    del dtype
    return nnx.BatchNorm(
        features,
        use_running_average=True,
        momentum=1.0 - torch_momentum,
        epsilon=epsilon,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def _use_cpu_formulations() -> bool:
    # XLA:CPU lowers grouped and 1x1 convolutions, and above all their gradients, to slow
    # code (transposed copies of whole activations, a kernel gradient computed as a
    # convolution with a window the size of the image); the equivalent slices and matrix
    # products below are fast there. Other platforms keep the convolutions.
    return jax.default_backend() == "cpu"


def _strides(conv: nnx.Conv) -> tuple[int, int]:
    strides = conv.strides
    return tuple(strides) if isinstance(strides, Sequence) else (strides, strides)


def pointwise(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """``conv(x)`` for a bias-free 1x1 ``nnx.Conv`` without padding (any stride).

    On CPU it is a matrix product over the channels (after subsampling for a stride): the
    same function, whose gradients are matrix products too. Other platforms, and any
    other convolution, use ``conv``.

    Args:
        conv: the 1x1 convolution, kernel ``[1, 1, C_in, C_out]``.
        x: ``[B, H, W, C_in]``.

    Returns:
        ``[B, ceil(H / stride), ceil(W / stride), C_out]``.
    """
    kernel = conv.kernel[...]
    padding = conv.padding
    zero_padding = padding in ("SAME", "VALID") or all(
        tuple(pair) == (0, 0) for pair in (padding if not isinstance(padding, str) else ())
    )
    if (
        not _use_cpu_formulations()
        or kernel.shape[:2] != (1, 1)
        or conv.feature_group_count != 1
        or conv.use_bias
        or not zero_padding
    ):
        return conv(x)
    stride_h, stride_w = _strides(conv)
    if (stride_h, stride_w) != (1, 1):
        x = x[:, ::stride_h, ::stride_w]
    dtype = conv.dtype or jnp.result_type(x, kernel)
    # As a [B*H*W, C_in] @ [C_in, C_out] product: with the 4-D form XLA:CPU transposes a
    # whole activation for the kernel gradient.
    out = jnp.dot(
        x.astype(dtype).reshape(-1, x.shape[-1]),
        kernel[0, 0].astype(dtype),
        precision=conv.precision,
    )
    return out.reshape(*x.shape[:-1], kernel.shape[-1])


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """(output size, padding before, padding after) of TensorFlow's "SAME" rule."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def _windows(padded: jax.Array, kernel_hw, strides, out_hw, offset=(0, 0)):
    """The ``kh * kw`` strided windows ``[B, out_h, out_w, C]`` of ``padded``, row-major."""
    batch, _, _, channels = padded.shape
    (kh, kw), (sh, sw), (out_h, out_w) = kernel_hw, strides, out_hw
    for i in range(kh):
        for j in range(kw):
            start = (0, offset[0] + i, offset[1] + j, 0)
            limit = (batch, start[1] + (out_h - 1) * sh + 1, start[2] + (out_w - 1) * sw + 1)
            yield i, j, jax.lax.slice(padded, start, (*limit, channels), (1, sh, sw, 1))


def _pad_same(x, kernel_hw, strides):
    """``x`` padded by the "SAME" rule, the output size, and the padding before."""
    (out_h, pad_h, pad_h2), (out_w, pad_w, pad_w2) = (
        _same_padding(x.shape[1], kernel_hw[0], strides[0]),
        _same_padding(x.shape[2], kernel_hw[1], strides[1]),
    )
    padded = jnp.pad(x, ((0, 0), (pad_h, pad_h2), (pad_w, pad_w2), (0, 0)))
    return padded, (out_h, out_w), (pad_h, pad_w)


def _depthwise_forward(x, kernel, strides):
    kh, kw, _ = kernel.shape
    padded, out_hw, _ = _pad_same(x, (kh, kw), strides)
    out = None
    for i, j, window in _windows(padded, (kh, kw), strides, out_hw):
        term = window * kernel[i, j]
        out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_slices(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    return _depthwise_forward(x, kernel, strides)


def _depthwise_slices_fwd(x, kernel, strides):
    # Only the input is kept for the backward pass: differentiating the slices directly
    # would store all kh*kw windows (9-25 copies of the activation).
    return _depthwise_forward(x, kernel, strides), (x, kernel)


def _depthwise_slices_bwd(strides, residuals, grad):
    x, kernel = residuals
    kh, kw, _ = kernel.shape
    sh, sw = strides
    _, height, width, _ = x.shape
    padded, (out_h, out_w), (pad_h, pad_w) = _pad_same(x, (kh, kw), strides)
    zero = jnp.zeros((), grad.dtype)

    def grad_at(i, j):
        # The output gradient, dilated by the stride, at the input positions that window
        # (i, j) reads, zero elsewhere: [B, H_padded, W_padded, C]. The kernel gradient
        # reads the whole padded input against it instead of slicing the windows again,
        # which XLA would merge with the forward pass's slices and store, one per window.
        return jax.lax.pad(
            grad,
            zero,
            (
                (0, 0, 0),
                (i, padded.shape[1] - i - (out_h - 1) * sh - 1, sh - 1),
                (j, padded.shape[2] - j - (out_w - 1) * sw - 1, sw - 1),
                (0, 0, 0),
            ),
        )

    kernel_grad = jnp.stack(
        [jnp.sum(padded * grad_at(i, j), axis=(0, 1, 2)) for i in range(kh) for j in range(kw)]
    ).reshape(kernel.shape)
    # The input gradient is the correlation of the output gradient, dilated by the stride
    # and padded by kernel - 1, with the flipped kernel, read over the unpadded input.
    grad_dilated = jax.lax.pad(
        grad,
        zero,
        (
            (0, 0, 0),
            (kh - 1, padded.shape[1] - (out_h - 1) * sh - 1, sh - 1),
            (kw - 1, padded.shape[2] - (out_w - 1) * sw - 1, sw - 1),
            (0, 0, 0),
        ),
    )
    x_grad = None
    for i, j, window in _windows(
        grad_dilated, (kh, kw), (1, 1), (height, width), offset=(pad_h, pad_w)
    ):
        term = window * kernel[kh - 1 - i, kw - 1 - j]
        x_grad = term if x_grad is None else x_grad + term
    return x_grad.astype(x.dtype), kernel_grad.astype(kernel.dtype)


_depthwise_slices.defvjp(_depthwise_slices_fwd, _depthwise_slices_bwd)


def depthwise_same(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """``conv(x)`` for a depthwise ``nnx.Conv`` with "SAME" padding and no bias.

    On CPU it is computed as k*k strided slices times per-channel weights, summed, with a
    hand-written gradient of the same form (the input gradient a correlation of the
    dilated output gradient with the flipped kernel, the kernel gradient k*k reductions):
    the same function (tested against the convolution), but XLA:CPU's grouped
    convolution and its gradient are slow, and automatic differentiation of the slices
    would keep all k*k windows for the backward pass. Other platforms use the
    convolution.

    Args:
        conv: the depthwise convolution, kernel ``[kh, kw, 1, C]``.
        x: ``[B, H, W, C]``.

    Returns:
        ``[B, ceil(H / stride), ceil(W / stride), C]``.
    """
    if not _use_cpu_formulations():
        return conv(x)
    kernel = conv.kernel[...]
    dtype = conv.dtype or jnp.result_type(x, kernel)
    return _depthwise_slices(x.astype(dtype), kernel[:, :, 0].astype(dtype), _strides(conv))


def relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0, 6)


def preprocess_images(
    images: jax.Array, resolution: int, mean: Sequence[float], std: Sequence[float], dtype
) -> jax.Array:
    """``[B, H, W, 3]`` (or 1 channel, repeated) in 0-255 -> ``[B, R, R, 3]`` normalised.

    Images of another size are resized to ``resolution x resolution`` (bilinear, with
    anti-aliasing when shrinking); ``(x / 255 - mean) / std`` per channel.
    """
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"a backbone takes images [B, H, W, 3] (or [B, H, W, 1]) with values in 0-255; "
            f"got an array of shape {x.shape}"
        )
    x = x.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.broadcast_to(x, (*x.shape[:3], 3))
    if x.shape[1:3] != (resolution, resolution):
        x = jax.image.resize(
            x, (x.shape[0], resolution, resolution, 3), method="bilinear", antialias=True
        )
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return ((x / 255.0 - mean) / std).astype(dtype)


@dataclasses.dataclass(frozen=True)
class TorchTensor:
    """One entry of a backbone's PyTorch name map.

    ``name`` is the state-dict key, ``path`` the NNX state path, ``kind`` how the tensor is
    laid out: ``conv`` (OIHW <-> HWIO), ``linear`` (out x in <-> in x out) or ``same``.
    """

    name: str
    path: tuple
    kind: str


def to_flax_layout(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
    if kind == "linear":
        return array.T if array.ndim == 2 else array
    return array


def to_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array
    if kind == "linear":
        return array.T if array.ndim == 2 else array
    return array


def conv_entries(torch_prefix: str, path: tuple, bias: bool = False) -> list[TorchTensor]:
    entries = [TorchTensor(f"{torch_prefix}.weight", (*path, "kernel"), "conv")]
    if bias:
        entries.append(TorchTensor(f"{torch_prefix}.bias", (*path, "bias"), "same"))
    return entries


def bn_entries(torch_prefix: str, path: tuple) -> list[TorchTensor]:
    return [
        TorchTensor(f"{torch_prefix}.weight", (*path, "scale"), "same"),
        TorchTensor(f"{torch_prefix}.bias", (*path, "bias"), "same"),
        TorchTensor(f"{torch_prefix}.running_mean", (*path, "mean"), "same"),
        TorchTensor(f"{torch_prefix}.running_var", (*path, "var"), "same"),
    ]


def linear_entries(torch_prefix: str, path: tuple) -> list[TorchTensor]:
    return [
        TorchTensor(f"{torch_prefix}.weight", (*path, "kernel"), "linear"),
        TorchTensor(f"{torch_prefix}.bias", (*path, "bias"), "same"),
    ]


class Backbone(nnx.Module):
    """The interface of every backbone.

    A backbone is a sequence of ``num_stages`` stages (``stage_names``) followed by global
    average pooling (``num_features`` features) and an ImageNet classifier ``fc``:

    - ``module(images)``: preprocessing, every stage, pooling -> ``[B, num_features]``;
    - ``module.classify(images)``: the 1,000 ImageNet logits;
    - ``module.prefix(images, n)``: preprocessing and the first ``n`` stages (the input of
      stage ``n``); ``module.features_from(x, n)``: stages ``n`` onwards and pooling, so
      ``module(images) == module.features_from(module.prefix(images, n), n)``.
    """

    name: str
    resolution: int
    num_features: int
    stage_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: Any

    def __init__(
        self,
        *,
        resolution: int = 224,
        num_classes: int = 1000,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        """Builds the stages, then the ``num_classes``-way classifier ``fc``.

        Args:
          resolution: the side of the square images the stages see (others are resized).
          num_classes: outputs of the classifier (1,000 for ImageNet weights).
          dtype: the compute dtype; parameters are float32 whatever it is.
          rngs: the initialisation's random streams.
        """
        self.resolution = int(resolution)
        self.dtype = dtype
        self.num_features = self.build_stages(dtype=dtype, rngs=rngs)
        self.fc = nnx.Linear(
            self.num_features, num_classes, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
        )

    @property
    def num_stages(self) -> int:
        return len(self.stage_names)

    # -- subclasses provide these -------------------------------------------------------
    def build_stages(self, *, dtype, rngs: nnx.Rngs) -> int:
        """Creates every stage's layers and sets ``stage_names``; returns ``num_features``
        (the channels the last stage gives)."""
        raise NotImplementedError

    def run_stage(self, index: int, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def stage_modules(self, index: int) -> list[nnx.Module]:
        raise NotImplementedError

    def stage_of_path(self, path: tuple) -> int | None:
        """The stage that the state at ``path`` (relative to the backbone) belongs to;
        None for the classifier."""
        raise NotImplementedError

    def torch_names(self) -> list[TorchTensor]:
        """The explicit map from PyTorch state-dict keys to this module's state."""
        raise NotImplementedError

    # Keys a PyTorch state dict may hold that carry nothing this module uses.
    ignored_suffixes: tuple[str, ...] = (".num_batches_tracked",)

    # -- shared -------------------------------------------------------------------------
    def preprocess(self, images: jax.Array) -> jax.Array:
        return preprocess_images(images, self.resolution, self.mean, self.std, self.dtype)

    def prefix(self, images: jax.Array, num_stages: int) -> jax.Array:
        x = self.preprocess(images)
        for index in range(num_stages):
            x = self.run_stage(index, x)
        return x

    def features_from(self, x: jax.Array, start_stage: int) -> jax.Array:
        for index in range(start_stage, self.num_stages):
            x = self.run_stage(index, x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.features_from(self.preprocess(images), 0)

    def classify(self, images: jax.Array) -> jax.Array:
        return self.fc(self(images).astype(self.dtype)).astype(jnp.float32)

    def batch_norms(self, start_stage: int = 0) -> Iterator[nnx.BatchNorm]:
        for index in range(start_stage, self.num_stages):
            for module in self.stage_modules(index):
                for _, sub in nnx.iter_graph(module):
                    if isinstance(sub, nnx.BatchNorm):
                        yield sub

    def set_batch_norm_training(self, train: bool, start_stage: int = 0) -> None:
        """Batch norm of stages ``start_stage`` onwards: batch statistics (and running
        averages updated) when ``train``, else the frozen running statistics. Stages
        before ``start_stage`` are set to frozen statistics."""
        for bn in self.batch_norms(0):
            bn.use_running_average = True
        if train:
            for bn in self.batch_norms(start_stage):
                bn.use_running_average = False
