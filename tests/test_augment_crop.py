"""Random resized crop, flip and centre crop against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax import augment


def reference_weights(start, length, size, out_size):
    """The resampling rows of one axis, written out pixel by pixel in float64."""
    weights = np.zeros((out_size, size))
    step = length / out_size
    support = max(step, 1.0)
    for u in range(out_size):
        centre = start + (u + 0.5) * step - 0.5
        for i in range(size):
            weights[u, i] = max(0.0, 1.0 - abs(i - centre) / support)
        if weights[u].sum() > 0:
            weights[u] /= weights[u].sum()
        else:
            weights[u, int(np.clip(np.round(centre), 0, size - 1))] = 1.0
    return weights


def reference_crop(image, box, out_size):
    rows = reference_weights(box[0], box[2], image.shape[0], out_size[0])
    cols = reference_weights(box[1], box[3], image.shape[1], out_size[1])
    out = np.zeros(out_size + image.shape[2:])
    for channel in range(image.shape[2]):
        out[..., channel] = rows @ image[..., channel].astype(np.float64) @ cols.T
    return out


def test_crop_and_resize_matches_numpy():
    rng = np.random.default_rng(0)
    images = rng.random((3, 11, 9, 2)).astype(np.float32)
    boxes = np.array([[0, 0, 11, 9], [2.5, 1.25, 6.0, 4.5], [3, 3, 0.5, 0.7]], np.float32)
    out = jax.jit(augment.crop_and_resize, static_argnums=2)(images, boxes, (7, 5))
    for b in range(3):
        np.testing.assert_allclose(
            out[b], reference_crop(images[b], boxes[b].astype(np.float64), (7, 5)), atol=1e-5
        )


def test_full_box_at_same_size_is_identity():
    images = np.random.default_rng(1).random((2, 8, 8, 3)).astype(np.float32)
    boxes = np.tile(np.array([0, 0, 8, 8], np.float32), (2, 1))
    np.testing.assert_allclose(augment.crop_and_resize(images, boxes), images, atol=1e-6)
    np.testing.assert_allclose(augment.center_crop(images, crop_fraction=1.0), images, atol=1e-6)


def test_center_crop_is_the_centre_box():
    images = np.random.default_rng(2).random((2, 16, 12, 3)).astype(np.float32)
    out = augment.center_crop(images, output_size=(8, 6))
    box = np.array([1.0, 0.75, 14.0, 10.5])
    for b in range(2):
        np.testing.assert_allclose(out[b], reference_crop(images[b], box, (8, 6)), atol=1e-5)


def test_random_boxes_stay_inside_with_the_asked_area_and_ratio():
    boxes = np.asarray(augment.random_crop_boxes(jax.random.key(0), 4000, 32, 48))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32 + 1e-4).all() and (left + w <= 48 + 1e-4).all()
    unclipped = (h < 32) & (w < 48)
    area = h * w / (32 * 48)
    assert area[unclipped].min() >= 0.08 - 1e-4 and area.max() <= 1.0 + 1e-4
    ratio = w[unclipped] / h[unclipped]
    assert ratio.min() >= 0.75 - 1e-3 and ratio.max() <= 4 / 3 + 1e-3
    assert 0.45 < area.mean() < 0.6  # uniform on [0.08, 1], less where clipped


def test_random_resized_crop_flip_is_the_crop_of_its_boxes_then_a_flip():
    images = np.random.default_rng(3).random((64, 10, 10, 1)).astype(np.float32)
    key = jax.random.key(7)
    out = np.asarray(jax.jit(augment.random_resized_crop_flip)(key, images))
    crop_key, flip_key = jax.random.split(key)
    boxes = np.asarray(augment.random_crop_boxes(crop_key, 64, 10, 10), np.float64)
    flips = np.asarray(jax.random.bernoulli(flip_key, 0.5, (64,)))
    assert 10 < flips.sum() < 54
    for b in range(64):
        expected = reference_crop(images[b], boxes[b], (10, 10))
        np.testing.assert_allclose(out[b], expected[:, ::-1] if flips[b] else expected, atol=1e-5)
    again = np.asarray(augment.random_resized_crop_flip(key, images))
    np.testing.assert_allclose(again, out, atol=1e-5)  # eager == jit, same key same crops
    other = np.asarray(augment.random_resized_crop_flip(jax.random.key(8), images))
    assert not np.allclose(other, out)


def test_crop_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"needs images \[B, H, W, C\]"):
        augment.random_resized_crop_flip(jax.random.key(0), jnp.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"crop_fraction must be in \(0, 1\]"):
        augment.center_crop(jnp.zeros((1, 4, 4, 1)), crop_fraction=1.5)


@pytest.mark.slow
def test_trainer_crops_for_training_and_centre_crops_for_embedding(tmp_path):
    from flax import nnx

    from magnet_jax import training
    from magnet_jax.config import TrainConfig
    from magnet_jax.data import Dataset

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4, dtype=np.int32), 8)
    x = rng.random((len(y), 12, 12, 3), dtype=np.float32)
    dataset = Dataset("tiny", x, y, x[:8].copy(), y[:8].copy(), tuple("abcd"))
    config = TrainConfig(augment_crop=True, clusters_per_class=1, clusters_per_batch=4,
                         examples_per_cluster=2, num_devices=1, embedding_dim=4,
                         workdir=str(tmp_path / "run"))  # fmt: skip
    run = training.prepare(config, dataset)
    params = run.initial_state.params
    embedded = np.asarray(run.steps.embed(params, run.x_test))
    model = nnx.merge(run.graphdef, nnx.State(params))
    np.testing.assert_allclose(embedded, model(augment.center_crop(run.x_test)), atol=1e-5)
    index = training.refresh(run, run.initial_state, None, 0)
    state, _, loss = run.steps.train_step(run.initial_state, index, run.data)
    assert np.isfinite(float(loss)) and int(state.step) == 1

    flat = Dataset("flat", x.reshape(len(y), -1), y, x[:8].reshape(8, -1), y[:8], tuple("abcd"))
    with pytest.raises(ValueError, match=r"--augment-crop crops images \[N, H, W, C\]"):
        training.prepare(config, flat)
