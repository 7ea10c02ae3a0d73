"""On-device augmentation: random_shift against a NumPy reference, and the trainer's checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax import augment, training
from magnet_jax.config import TrainConfig


def _numpy_shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(image)
    height, width = image.shape[:2]
    for i in range(height):
        for j in range(width):
            if 0 <= i - dy < height and 0 <= j - dx < width:
                out[i, j] = image[i - dy, j - dx]
    return out


@pytest.mark.parametrize("max_shift", [1, 2])
def test_random_shift_matches_numpy_translation(max_shift):
    images = np.random.default_rng(0).random((64, 6, 5, 2)).astype(np.float32)
    shifted = np.asarray(
        jax.jit(augment.random_shift, static_argnums=2)(jax.random.PRNGKey(3), images, max_shift)
    )
    seen = set()
    for image, result in zip(images, shifted):
        # Recover the offset: exactly one translation in range reproduces the result.
        matches = [
            (dy, dx)
            for dy in range(-max_shift, max_shift + 1)
            for dx in range(-max_shift, max_shift + 1)
            if np.array_equal(_numpy_shift(image, dy, dx), result)
        ]
        assert len(matches) == 1, matches
        seen.add(matches[0])
    assert len(seen) > (2 * max_shift + 1) ** 2 // 2  # offsets vary between examples


def test_random_shift_zero_is_identity_and_key_determines_result():
    images = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    assert augment.random_shift(jax.random.PRNGKey(0), images, 0) is images
    a = augment.random_shift(jax.random.PRNGKey(1), images, 1)
    b = augment.random_shift(jax.random.PRNGKey(1), images, 1)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "shape, max_shift, message", [((4, 16), 1, "images"), ((2, 4, 4, 1), -1, "max_shift")]
)
def test_random_shift_bad_input(shape, max_shift, message):
    with pytest.raises(ValueError, match=message):
        augment.random_shift(jax.random.PRNGKey(0), jnp.zeros(shape), max_shift)


def test_trainer_refuses_shift_on_flat_features(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "features.npz"
    np.savez(path, x=rng.random((60, 5), dtype=np.float32), y=np.repeat(np.arange(3), 20))
    with pytest.raises(ValueError, match="augment-shift 1 translates images"):
        training.prepare(
            TrainConfig(
                dataset=f"npz:{path}",
                augment_shift=1,
                clusters_per_class=2,
                clusters_per_batch=4,
                examples_per_cluster=4,
            )
        )
    with pytest.raises(ValueError, match="--augment-shift must be >= 0"):
        TrainConfig(augment_shift=-1).validate()
