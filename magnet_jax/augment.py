"""On-device data augmentation applied to the gathered batch inside the jitted train step.

Only one transformation so far, the one small image datasets need most: random integer
translations with zero fill (the "nudged" digits of scikit-learn's RBM example). It is a
pure function of a PRNG key, so a resumed run draws the same augmentations as an
uninterrupted one.
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
