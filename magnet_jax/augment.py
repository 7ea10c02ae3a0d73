"""On-device data augmentation applied to the gathered batch inside the jitted train step.

* :func:`random_shift` -- random integer translations with zero fill (the "nudged" digits
  of scikit-learn's RBM example), for small images.
* :func:`random_resized_crop_flip` for training and :func:`center_crop` for evaluation --
  the standard of ImageNet-pretrained metric learning, for photographs.

Each is a pure function of a PRNG key, so a resumed run draws the same augmentations as
an uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_shift(key: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
    """Translates every image by its own random offset, filling with zeros.

    Args:
      key: PRNG key.
      images: ``[B, H, W, C]`` images.
      max_shift: offsets are drawn uniformly from ``{-max_shift, ..., max_shift}``
        independently for rows and columns; 0 returns ``images`` unchanged.

    Returns:
      ``[B, H, W, C]``: ``out[b, i, j] = images[b, i - dy_b, j - dx_b]`` where that pixel
      exists, else 0.
    """
    if images.ndim != 4:
        raise ValueError(f"random_shift needs images [B, H, W, C], got shape {images.shape}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return images
    batch, height, width, _ = images.shape
    offsets = jax.random.randint(key, (batch, 2), -max_shift, max_shift + 1)
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))

    def crop(image, offset):
        # out[i] = padded[i + max_shift - dy]: the window starts at max_shift - dy.
        start = max_shift - offset
        return jax.lax.dynamic_slice(
            image, (start[0], start[1], 0), (height, width, image.shape[-1])
        )

    return jax.vmap(crop)(padded, offsets)


# --------------------------------------------------------------------------------------
# Random resized crop + horizontal flip (training), resize + centre crop (evaluation): the
# standard of ImageNet-pretrained metric learning, as a resampling of boxes on device.
# --------------------------------------------------------------------------------------

DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
DEFAULT_CROP_FRACTION = 0.875  # resize to S / 0.875, centre crop S (224 of 256)


def _resize_weights(start: jax.Array, length: jax.Array, size: int, out_size: int) -> jax.Array:
    """``[out_size, size]`` rows resampling the window ``[start, start + length)`` of an axis.

    A triangle (bilinear) kernel centred on each output pixel's position in the input,
    widened by the downscaling factor so that shrinking averages rather than aliases
    (Pillow's antialiased bilinear); rows are normalised to sum to 1 over the pixels that
    exist.
    """
    step = length / out_size
    centres = start + (jnp.arange(out_size) + 0.5) * step - 0.5
    support = jnp.maximum(step, 1.0)
    distance = jnp.abs(jnp.arange(size)[None, :] - centres[:, None]) / support
    weights = jnp.maximum(0.0, 1.0 - distance)
    # A window narrower than one pixel can miss every pixel centre: use the nearest then.
    nearest = jax.nn.one_hot(jnp.clip(jnp.round(centres), 0, size - 1).astype(jnp.int32), size)
    total = weights.sum(axis=1, keepdims=True)
    return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), nearest)


def crop_and_resize(
    images: jax.Array, boxes: jax.Array, output_size: tuple[int, int] | None = None
) -> jax.Array:
    """Resamples a box of every image to ``output_size`` (separable, antialiased bilinear).

    Args:
      images: ``[B, H, W, C]``.
      boxes: ``[B, 4]`` float ``(top, left, height, width)`` in pixels; need not be whole.
      output_size: ``(out_h, out_w)``; default ``(H, W)``.

    Returns:
      ``[B, out_h, out_w, C]`` in ``images``' float dtype.
    """
    if images.ndim != 4:
        raise ValueError(f"crop_and_resize needs images [B, H, W, C], got shape {images.shape}")
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes must be [B, 4] = [{images.shape[0]}, 4], got {boxes.shape}")
    _, height, width, _ = images.shape
    out_h, out_w = output_size if output_size is not None else (height, width)
    dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) else jnp.float32

    def one(image, box):
        rows = _resize_weights(box[0], box[2], height, out_h).astype(dtype)
        cols = _resize_weights(box[1], box[3], width, out_w).astype(dtype)
        return jnp.einsum("uh,hwc,vw->uvc", rows, image.astype(dtype), cols)

    return jax.vmap(one)(images, boxes.astype(jnp.float32))


def random_crop_boxes(
    key: jax.Array,
    batch: int,
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> jax.Array:
    """``[batch, 4]`` boxes ``(top, left, h, w)`` of random area and aspect ratio.

    The area is a uniform share ``scale`` of the image and the aspect ratio ``w / h`` is
    log-uniform in ``ratio`` (torchvision's RandomResizedCrop); a box that would not fit
    is clipped to the image instead of being redrawn (torchvision redraws up to 10 times,
    then falls back to the centre), so every draw costs the same on device. The position
    is uniform over the places the box fits.
    """
    area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(area_key, (batch,), minval=scale[0], maxval=scale[1])
    log_ratio = jax.random.uniform(
        ratio_key, (batch,), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1])
    )
    aspect = jnp.exp(log_ratio)
    box_w = jnp.clip(jnp.sqrt(area * aspect), 1.0, width)
    box_h = jnp.clip(jnp.sqrt(area / aspect), 1.0, height)
    top = jax.random.uniform(top_key, (batch,)) * (height - box_h)
    left = jax.random.uniform(left_key, (batch,)) * (width - box_w)
    return jnp.stack([top, left, box_h, box_w], axis=1)


def random_resized_crop_flip(
    key: jax.Array,
    images: jax.Array,
    *,
    output_size: tuple[int, int] | None = None,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> jax.Array:
    """Training augmentation: a random resized crop, then a horizontal flip half the time.

    A pure function of ``key``: a step's key gives the same crops after a resume.

    Args:
      key: PRNG key.
      images: ``[B, H, W, C]``.
      output_size: ``(out_h, out_w)``; default ``(H, W)``.
      scale: range of the crop's share of the image area.
      ratio: range of the crop's aspect ratio ``w / h``.

    Returns:
      ``[B, out_h, out_w, C]``: ``crop_and_resize(images, random_crop_boxes(k1, ...))``,
      mirrored left-right where a Bernoulli(0.5) draw from ``k2`` is true, with
      ``k1, k2 = jax.random.split(key)``.
    """
    if images.ndim != 4:
        raise ValueError(
            f"random_resized_crop_flip needs images [B, H, W, C], got shape {images.shape}"
        )
    crop_key, flip_key = jax.random.split(key)
    batch, height, width, _ = images.shape
    boxes = random_crop_boxes(crop_key, batch, height, width, scale=scale, ratio=ratio)
    cropped = crop_and_resize(images, boxes, output_size)
    flip = jax.random.bernoulli(flip_key, 0.5, (batch,))
    return jnp.where(flip[:, None, None, None], cropped[:, :, ::-1], cropped)


def center_crop(
    images: jax.Array,
    *,
    crop_fraction: float = DEFAULT_CROP_FRACTION,
    output_size: tuple[int, int] | None = None,
) -> jax.Array:
    """Evaluation transform: the centre ``crop_fraction`` of each side, resized to ``output_size``.

    Equivalent to resizing to ``S / crop_fraction`` and cutting the centre ``S`` (the
    usual resize 256, centre crop 224), up to the resampling.

    Args:
      images: ``[B, H, W, C]``.
      crop_fraction: in ``(0, 1]``, the share of the height and width kept.
      output_size: ``(out_h, out_w)``; default ``(H, W)``.

    Returns:
      ``[B, out_h, out_w, C]``.
    """
    if images.ndim != 4:
        raise ValueError(f"center_crop needs images [B, H, W, C], got shape {images.shape}")
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    batch, height, width, _ = images.shape
    box_h, box_w = height * crop_fraction, width * crop_fraction
    box = jnp.array([(height - box_h) / 2, (width - box_w) / 2, box_h, box_w], jnp.float32)
    return crop_and_resize(images, jnp.broadcast_to(box, (batch, 4)), output_size)
