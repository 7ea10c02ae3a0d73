"""Tests of the Magnet Loss (paper eqs. 4 and 5) against an independent float64 NumPy reference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from magnet_jax.losses import distances as distances_module
from magnet_jax.losses import magnet as magnet_module
from magnet_jax.losses.magnet import (
    MagnetTerms,
    magnet_full_objective,
    magnet_loss,
    magnet_terms,
    validate_cluster_labels,
)


@pytest.fixture
def float64():
    with jax.enable_x64(True):
        yield


# --------------------------------------------------------------------------------------
# Independent NumPy reference: explicit loops over examples and clusters, float64.
# --------------------------------------------------------------------------------------


def _logsumexp(values):
    largest = max(values)
    return largest + math.log(sum(math.exp(value - largest) for value in values))


def _squared_distance(a, b):
    return float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def reference_magnet_terms(embeddings, labels, cluster_ids, alpha=1.0):
    """Returns (per-example losses [B], σ̂²) of paper eq. 5, by loops in float64."""
    embeddings = np.asarray(embeddings, np.float64)
    batch_size = len(embeddings)
    means, classes = {}, {}
    for cluster_id in dict.fromkeys(cluster_ids.tolist()):
        members = [i for i in range(batch_size) if cluster_ids[i] == cluster_id]
        means[cluster_id] = embeddings[members].mean(axis=0)
        classes[cluster_id] = labels[members[0]]
    own = [_squared_distance(embeddings[i], means[cluster_ids[i]]) for i in range(batch_size)]
    variance = sum(own) / (batch_size - 1)
    losses = []
    for i in range(batch_size):
        exponents = [
            -_squared_distance(embeddings[i], means[m]) / (2 * variance)
            for m in means
            if classes[m] != labels[i]
        ]
        if not exponents:
            losses.append(0.0)
            continue
        losses.append(max(0.0, own[i] / (2 * variance) + alpha + _logsumexp(exponents)))
    return np.array(losses), variance


def reference_full_objective(
    embeddings, labels, assignments, centroids, valid, variance, alpha=1.0
):
    """Per-example losses of paper eq. 4, by loops in float64; invalid slots never read."""
    embeddings = np.asarray(embeddings, np.float64)
    num_classes, clusters_per_class, _ = centroids.shape
    losses = []
    for n, embedding in enumerate(embeddings):
        own = _squared_distance(embedding, centroids[labels[n], assignments[n]])
        exponents = [
            -_squared_distance(embedding, centroids[c, k]) / (2 * variance)
            for c in range(num_classes)
            for k in range(clusters_per_class)
            if valid[c, k] and c != labels[n]
        ]
        if not exponents:
            losses.append(0.0)
            continue
        losses.append(max(0.0, own / (2 * variance) + alpha + _logsumexp(exponents)))
    return np.array(losses)


def random_batch(rng, num_clusters, *, max_cluster_size=5, num_classes=None, dim=6):
    """Unequal cluster sizes, several clusters per class, arbitrary shuffled ids."""
    num_classes = num_classes or max(1, num_clusters // 2 + 1)
    cluster_classes = rng.integers(0, num_classes, size=num_clusters)
    cluster_sizes = rng.integers(1, max_cluster_size + 1, size=num_clusters)
    if cluster_sizes.sum() < 2:
        cluster_sizes[0] = 2
    distinct_ids = rng.choice(np.arange(-1000, 10**6), size=num_clusters, replace=False)
    cluster_ids = np.repeat(distinct_ids, cluster_sizes)
    labels = np.repeat(cluster_classes, cluster_sizes)
    order = rng.permutation(len(labels))
    centres = rng.normal(size=(num_clusters, dim)) * 2
    embeddings = np.repeat(centres, cluster_sizes, axis=0) + rng.normal(size=(len(labels), dim))
    return embeddings[order], labels[order].astype(np.int32), cluster_ids[order].astype(np.int32)


def pumpikano_batch():
    rand = np.random.RandomState(42)
    embeddings = rand.random_sample([24, 8])
    cluster_ids = np.repeat(np.arange(6), 4).astype(np.int32)
    return embeddings, cluster_ids


jitted_loss = jax.jit(magnet_loss, static_argnames=("reduction", "stop_gradient_variance"))
# Jitted gradients compile faster than eager ones dispatch, which keeps the tests quick.
loss_and_grad = jax.jit(
    jax.value_and_grad(magnet_loss), static_argnames=("reduction", "stop_gradient_variance")
)
full_objective_and_grad = jax.jit(
    jax.value_and_grad(magnet_full_objective), static_argnames="reduction"
)


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cluster_classes, alpha, expected",
    [
        ([0, 1, 2, 3, 4, 5], 1.0, 2.3396316),
        ([0, 1, 2, 3, 4, 5], 10.0, 11.3396316),
        ([0, 1, 1, 3, 4, 5], 1.0, 2.2603454),
    ],
)
def test_regression_values(float64, cluster_classes, alpha, expected):
    embeddings, cluster_ids = pumpikano_batch()
    labels = np.asarray(cluster_classes, np.int32)[cluster_ids]
    reference_losses, reference_variance = reference_magnet_terms(
        embeddings, labels, cluster_ids, alpha
    )
    np.testing.assert_allclose(reference_losses.mean(), expected, atol=1e-6)

    terms = magnet_terms(embeddings, labels, cluster_ids, alpha=alpha)
    assert terms.losses.dtype == jnp.float64
    np.testing.assert_allclose(terms.variance, 0.54973, atol=1e-5)
    np.testing.assert_allclose(terms.variance, reference_variance, rtol=1e-12)
    np.testing.assert_allclose(
        magnet_loss(embeddings, labels, cluster_ids, alpha=alpha), expected, atol=1e-6
    )
    np.testing.assert_allclose(terms.losses, reference_losses, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_clusters", [1, 2, 3, 7, 16, 64])
def test_matches_reference_on_random_batches(float64, num_clusters):
    rng = np.random.default_rng(num_clusters)
    embeddings, labels, cluster_ids = random_batch(rng, num_clusters)
    alpha = float(rng.uniform(0, 3))
    reference_losses, reference_variance = reference_magnet_terms(
        embeddings, labels, cluster_ids, alpha
    )

    terms = magnet_terms(embeddings, labels, cluster_ids, alpha=alpha)
    np.testing.assert_allclose(terms.variance, reference_variance, rtol=1e-12)
    np.testing.assert_allclose(terms.losses, reference_losses, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        magnet_loss(embeddings, labels, cluster_ids, alpha=alpha, reduction="none"),
        reference_losses,
        rtol=1e-10,
        atol=1e-12,
    )
    np.testing.assert_allclose(
        magnet_loss(embeddings, labels, cluster_ids, alpha=alpha),
        reference_losses.mean(),
        rtol=1e-10,
    )
    np.testing.assert_allclose(
        magnet_loss(embeddings, labels, cluster_ids, alpha=alpha, reduction="sum"),
        reference_losses.sum(),
        rtol=1e-10,
    )


def test_invariant_to_batch_order_and_id_values(float64):
    rng = np.random.default_rng(0)
    embeddings, labels, cluster_ids = random_batch(rng, 9)
    losses = magnet_loss(embeddings, labels, cluster_ids, reduction="none")
    order = rng.permutation(len(labels))
    permuted = magnet_loss(embeddings[order], labels[order], cluster_ids[order], reduction="none")
    np.testing.assert_allclose(permuted, np.asarray(losses)[order], rtol=1e-12)
    _, contiguous_ids = np.unique(cluster_ids, return_inverse=True)
    relabelled = magnet_loss(
        embeddings, labels, (contiguous_ids * 7 - 3).astype(np.int32), reduction="none"
    )
    np.testing.assert_allclose(relabelled, losses, rtol=1e-12)


def test_same_class_clusters_never_in_denominator(float64):
    rng = np.random.default_rng(1)
    # Clusters: A and B of class 0, C of class 1, D of class 2; four examples each.
    labels = np.repeat(np.array([0, 0, 1, 2], np.int32), 4)
    cluster_ids = np.repeat(np.array([10, 20, 30, 40], np.int32), 4)
    embeddings = rng.normal(size=(16, 3)) + np.repeat(rng.normal(size=(4, 3)), 4, axis=0)
    in_cluster_a, in_cluster_b = cluster_ids == 10, cluster_ids == 20
    alpha = 4.0  # keeps the hinge active, so the denominators show in the losses
    before = np.asarray(magnet_loss(embeddings, labels, cluster_ids, alpha=alpha, reduction="none"))
    assert np.all(before > 0)
    for shift in ([0.0, 0.0, 0.0], [100.0, -50.0, 3.0], None):
        moved = embeddings.copy()
        # Translating B keeps σ̂² unchanged; moving it onto A is the strongest test.
        offset = (
            embeddings[in_cluster_a].mean(0) - embeddings[in_cluster_b].mean(0)
            if shift is None
            else shift
        )
        moved[in_cluster_b] += offset
        after = np.asarray(magnet_loss(moved, labels, cluster_ids, alpha=alpha, reduction="none"))
        np.testing.assert_allclose(after[in_cluster_a], before[in_cluster_a], rtol=1e-12)
        np.testing.assert_allclose(
            after, reference_magnet_terms(moved, labels, cluster_ids, alpha)[0], rtol=1e-10
        )
    # Sanity check that the test is sensitive: if B were of another class, A's losses would move.
    other_labels = np.where(in_cluster_b, 3, labels).astype(np.int32)
    with_b_as_impostor = np.asarray(
        magnet_loss(embeddings, other_labels, cluster_ids, alpha=alpha, reduction="none")
    )
    assert np.all(with_b_as_impostor[in_cluster_a] > before[in_cluster_a])


# --------------------------------------------------------------------------------------
# Transformations and gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "order, modes",
    [
        (1, ("fwd", "rev")),
        (2, ("rev",)),
        pytest.param(2, ("fwd", "rev"), marks=pytest.mark.slow),  # ~7 s of compilation
    ],
)
def test_check_grads(float64, order, modes):
    embeddings, cluster_ids = pumpikano_batch()
    embeddings, cluster_ids = embeddings[:12], cluster_ids[:12]
    labels = np.array([0, 1, 1], np.int32)[cluster_ids]
    # α = 2 keeps every hinge active, away from its kink.
    assert np.all(reference_magnet_terms(embeddings, labels, cluster_ids, 2.0)[0] > 0.1)
    loss_fn = jax.jit(lambda x: magnet_loss(x, labels, cluster_ids, alpha=2.0))
    check_grads(loss_fn, (embeddings,), order=order, modes=modes)


def test_jit_equals_eager():
    rng = np.random.default_rng(2)
    embeddings, labels, cluster_ids = random_batch(rng, 8)
    embeddings = embeddings.astype(np.float32)
    for reduction in ("mean", "none"):
        eager = magnet_loss(embeddings, labels, cluster_ids, reduction=reduction)
        jitted = jitted_loss(embeddings, labels, cluster_ids, reduction=reduction)
        np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)


def test_vmap_over_batches_equals_loop():
    rng = np.random.default_rng(3)
    batches = [random_batch(rng, 6, max_cluster_size=3, dim=4) for _ in range(40)]
    batches = [batch for batch in batches if len(batch[1]) == 12][:3]
    assert len(batches) == 3
    embeddings, labels, cluster_ids = (np.stack(parts) for parts in zip(*batches))
    embeddings = embeddings.astype(np.float32)

    vmapped = jax.jit(jax.vmap(lambda x, y, c: magnet_terms(x, y, c, alpha=0.5)))(
        embeddings, labels, cluster_ids
    )
    for b in range(3):
        single = magnet_terms(embeddings[b], labels[b], cluster_ids[b], alpha=0.5)
        np.testing.assert_allclose(vmapped.losses[b], single.losses, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(vmapped.variance[b], single.variance, rtol=1e-6)
    vmapped_grads = jax.jit(jax.vmap(jax.grad(magnet_loss)))(embeddings, labels, cluster_ids)
    for b in range(3):
        np.testing.assert_allclose(
            vmapped_grads[b],
            loss_and_grad(embeddings[b], labels[b], cluster_ids[b])[1],
            rtol=1e-5,
            atol=1e-7,
        )


def batch_means_as_index(embeddings, cluster_ids, num_classes, clusters_per_class):
    """Centroids [C, K, d] (a differentiable function of embeddings) and valid [C, K] for flat ids."""
    num_slots = num_classes * clusters_per_class
    one_hot = jax.nn.one_hot(cluster_ids, num_slots, dtype=embeddings.dtype)
    sizes = one_hot.sum(0)
    centroids = (one_hot.T @ embeddings) / jnp.maximum(sizes, 1)[:, None]
    valid = np.isin(np.arange(num_slots), cluster_ids)
    shape = (num_classes, clusters_per_class)
    return centroids.reshape(*shape, -1), valid.reshape(shape)


def flat_id_batch(rng, num_classes=5, clusters_per_class=3, num_clusters=8, dim=4):
    """A batch whose cluster ids are the trainer's flat ids c * K + k; some slots unused."""
    slots = rng.choice(num_classes * clusters_per_class, size=num_clusters, replace=False)
    sizes = rng.integers(1, 5, size=num_clusters)
    sizes[0] = 3
    cluster_ids = np.repeat(slots, sizes).astype(np.int32)
    labels = (cluster_ids // clusters_per_class).astype(np.int32)
    assignments = (cluster_ids % clusters_per_class).astype(np.int32)
    centres = rng.normal(size=(num_clusters, dim)) * 2
    embeddings = rng.normal(size=(len(labels), dim)) + np.repeat(centres, sizes, axis=0)
    return embeddings, labels, cluster_ids, assignments


def test_stop_gradient_variance_changes_gradients_not_value(float64):
    rng = np.random.default_rng(4)
    embeddings, labels, cluster_ids, assignments = flat_id_batch(rng)
    flowing = loss_and_grad(embeddings, labels, cluster_ids)
    stopped = loss_and_grad(embeddings, labels, cluster_ids, stop_gradient_variance=True)
    np.testing.assert_allclose(stopped[0], flowing[0], rtol=1e-14)
    assert not np.allclose(stopped[1], flowing[1], rtol=1e-3)

    # Independent check of both gradients: eq. 4 against the batch means (computed here,
    # differentiably) with σ² either a function of x or a constant.
    def via_full_objective(x, freeze_variance):
        centroids, valid = batch_means_as_index(x, cluster_ids, 5, 3)
        offsets = x - centroids[labels, assignments]
        variance = jnp.sum(offsets**2) / (len(x) - 1)
        if freeze_variance:
            variance = jax.lax.stop_gradient(variance)
        return magnet_full_objective(x, labels, assignments, centroids, valid, variance)

    for (value, grad), freeze in ((flowing, False), (stopped, True)):
        expected_value, expected_grad = jax.jit(
            jax.value_and_grad(via_full_objective), static_argnums=1
        )(embeddings, freeze)
        np.testing.assert_allclose(value, expected_value, rtol=1e-12)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------


def test_single_class_batch_is_exactly_zero_with_zero_gradients():
    rng = np.random.default_rng(5)
    embeddings = rng.normal(size=(8, 3)).astype(np.float32)
    labels = np.zeros(8, np.int32)
    cluster_ids = np.array([0, 0, 1, 1, 2, 2, 2, 5], np.int32)
    terms = magnet_terms(embeddings, labels, cluster_ids)
    assert not np.any(terms.has_impostor)
    np.testing.assert_array_equal(terms.losses, 0.0)
    value, grad = loss_and_grad(embeddings, labels, cluster_ids)
    assert value == 0.0
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad, 0.0)

    @jax.jit
    def hessian_vector_product(x, tangent):
        return jax.jvp(lambda y: jax.grad(magnet_loss)(y, labels, cluster_ids), (x,), (tangent,))[1]

    np.testing.assert_array_equal(hessian_vector_product(embeddings, np.ones_like(embeddings)), 0.0)


def test_singleton_clusters_zero_variance_is_finite():
    embeddings = np.arange(12, dtype=np.float32).reshape(6, 2)
    labels = np.array([0, 0, 1, 1, 2, 2], np.int32)
    cluster_ids = np.arange(6, dtype=np.int32)
    terms = magnet_terms(embeddings, labels, cluster_ids)
    assert float(terms.variance) == 0.0
    np.testing.assert_array_equal(terms.losses, 0.0)
    np.testing.assert_array_equal(loss_and_grad(embeddings, labels, cluster_ids)[1], 0.0)
    # Far-away data overflow the scaled distances; still finite.
    value, grad = loss_and_grad(embeddings * 1e12, labels, cluster_ids)
    assert value == 0.0 and np.all(np.isfinite(grad))


def test_variance_guard_does_not_touch_normal_values():
    # A tight but non-degenerate batch: σ̂² ~ 1e-12, far above the guard (~1e-19).
    embeddings, cluster_ids = pumpikano_batch()
    labels = cluster_ids
    small = (embeddings * 1e-6).astype(np.float32)
    terms = magnet_terms(small, labels, cluster_ids)
    reference_losses, reference_variance = reference_magnet_terms(small, labels, cluster_ids)
    np.testing.assert_allclose(terms.variance, reference_variance, rtol=1e-5)
    np.testing.assert_allclose(terms.losses, reference_losses, rtol=1e-4)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_float32_matches_float64_reference_across_scales(scale):
    rng = np.random.default_rng(6)
    embeddings, labels, cluster_ids = random_batch(rng, 10)
    embeddings = (embeddings * scale + 5 * scale).astype(np.float32)
    reference_losses, reference_variance = reference_magnet_terms(embeddings, labels, cluster_ids)
    terms = magnet_terms(embeddings, labels, cluster_ids)
    assert terms.losses.dtype == jnp.float32
    np.testing.assert_allclose(terms.variance, reference_variance, rtol=1e-5)
    np.testing.assert_allclose(terms.losses, reference_losses, rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(loss_and_grad(embeddings, labels, cluster_ids)[1]))


@pytest.mark.parametrize("use_differences", [True, False])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_pairwise_squared_distances_both_paths(use_differences, scale):
    rng = np.random.default_rng(7)
    points = (rng.normal(size=(9, 5)) + 3) * scale
    centres = (rng.normal(size=(7, 5)) + 3) * scale
    expected = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    computed = distances_module.squared_distances(
        jnp.asarray(points, jnp.float32),
        jnp.asarray(centres, jnp.float32),
        use_differences=use_differences,
    )
    assert np.all(np.asarray(computed) >= 0)
    np.testing.assert_allclose(computed, expected, rtol=1e-4 if use_differences else 1e-3)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_expansion_path_matches_reference(monkeypatch, scale):
    # Large batches use the centred expansion; force it on a small one.
    monkeypatch.setattr(distances_module, "_MAX_DIFFERENCE_ELEMENTS", 0)
    magnet_module._magnet_terms.clear_cache()
    try:
        rng = np.random.default_rng(12)
        embeddings, labels, cluster_ids = random_batch(rng, 10)
        embeddings = (embeddings * scale + 5 * scale).astype(np.float32)
        reference_losses, _ = reference_magnet_terms(embeddings, labels, cluster_ids)
        terms = magnet_terms(embeddings, labels, cluster_ids)
        np.testing.assert_allclose(terms.losses, reference_losses, rtol=1e-3, atol=1e-4)
    finally:
        magnet_module._magnet_terms.clear_cache()


def test_bfloat16_input():
    rng = np.random.default_rng(8)
    embeddings, labels, cluster_ids = random_batch(rng, 8)
    embeddings_bf16 = jnp.asarray(embeddings, jnp.bfloat16)
    loss = magnet_loss(embeddings_bf16, labels, cluster_ids)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    rounded = np.asarray(embeddings_bf16.astype(jnp.float32))
    np.testing.assert_allclose(loss, magnet_loss(rounded, labels, cluster_ids), rtol=1e-6)
    np.testing.assert_allclose(
        loss, magnet_loss(embeddings.astype(np.float32), labels, cluster_ids), rtol=5e-2
    )
    grad = loss_and_grad(embeddings_bf16, labels, cluster_ids)[1]
    assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


# --------------------------------------------------------------------------------------
# Full objective (eq. 4)
# --------------------------------------------------------------------------------------


def random_index(rng, num_classes=4, clusters_per_class=3, dim=5, num_examples=20):
    centroids = rng.normal(size=(num_classes, clusters_per_class, dim)) * 2
    valid = rng.random((num_classes, clusters_per_class)) < 0.7
    valid[:, 0] = True
    labels = rng.integers(0, num_classes, size=num_examples).astype(np.int32)
    assignments = np.array([rng.choice(np.flatnonzero(valid[c])) for c in labels], np.int32)
    embeddings = centroids[labels, assignments] + rng.normal(size=(num_examples, dim))
    return embeddings, labels, assignments, centroids, valid


def test_full_objective_matches_reference_and_ignores_invalid_slots(float64):
    rng = np.random.default_rng(9)
    embeddings, labels, assignments, centroids, valid = random_index(rng)
    assert not valid.all()
    variance = 1.7
    expected = reference_full_objective(
        embeddings, labels, assignments, centroids, valid, variance, alpha=0.7
    )
    computed = magnet_full_objective(
        embeddings, labels, assignments, centroids, valid, variance, alpha=0.7, reduction="none"
    )
    np.testing.assert_allclose(computed, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        magnet_full_objective(
            embeddings, labels, assignments, centroids, valid, variance, alpha=0.7
        ),
        expected.mean(),
        rtol=1e-10,
    )

    garbage = centroids.copy()
    garbage[~valid] = [np.nan, np.inf, -np.inf, 1e30, 0.0]
    value, grad = full_objective_and_grad(
        embeddings, labels, assignments, garbage, valid, variance, alpha=0.7
    )
    np.testing.assert_allclose(value, expected.mean(), rtol=1e-10)
    assert np.all(np.isfinite(grad))


def test_full_objective_example_without_impostor_is_zero(float64):
    rng = np.random.default_rng(10)
    embeddings, labels, assignments, centroids, valid = random_index(rng, num_classes=2)
    labels = np.array([0] * 10 + [1] * 10, np.int32)
    assignments = np.zeros(20, np.int32)
    valid[1] = False  # class 0 sees no valid slot of another class
    valid[1, 0] = False
    losses = magnet_full_objective(
        embeddings, labels, assignments, centroids, valid, 1.0, reduction="none"
    )
    np.testing.assert_array_equal(losses[:10], 0.0)
    np.testing.assert_allclose(
        losses,
        reference_full_objective(embeddings, labels, assignments, centroids, valid, 1.0),
        rtol=1e-10,
    )
    _, grad = full_objective_and_grad(embeddings, labels, assignments, centroids, valid, 1.0)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[:10], 0.0)


def test_full_objective_with_batch_means_equals_magnet_loss(float64):
    rng = np.random.default_rng(11)
    embeddings, labels, cluster_ids, assignments = flat_id_batch(rng)
    centroids, valid = batch_means_as_index(jnp.asarray(embeddings), cluster_ids, 5, 3)
    centroids = np.where(valid[:, :, None], centroids, np.nan)
    terms = magnet_terms(embeddings, labels, cluster_ids, alpha=1.3)
    full = magnet_full_objective(
        embeddings,
        labels,
        assignments,
        centroids,
        valid,
        terms.variance,
        alpha=1.3,
        reduction="none",
    )
    np.testing.assert_allclose(full, terms.losses, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def test_magnet_terms_returns_named_tuple():
    embeddings, cluster_ids = pumpikano_batch()
    terms = magnet_terms(embeddings.astype(np.float32), cluster_ids, cluster_ids)
    assert isinstance(terms, MagnetTerms)
    assert (
        terms.losses.shape == (24,)
        and terms.variance.shape == ()
        and terms.has_impostor.shape == (24,)
    )
    assert magnet_loss(embeddings, cluster_ids, cluster_ids, reduction="none").shape == (24,)


@pytest.mark.parametrize(
    "embeddings_shape, labels, cluster_ids, kwargs, match",
    [
        (
            (4, 2, 1),
            [0, 0, 1, 1],
            [0, 0, 1, 1],
            {},
            r"embeddings must have shape \[batch, dim\].*\(4, 2, 1\)",
        ),
        ((4,), [0, 0, 1, 1], [0, 0, 1, 1], {}, r"\(4,\)"),
        ((4, 2), [[0, 0, 1, 1]], [0, 0, 1, 1], {}, r"labels must have shape \[batch\].*\(1, 4\)"),
        ((4, 2), [0, 0, 1], [0, 0, 1, 1], {}, r"labels.*\(3,\)"),
        ((4, 2), [0, 0, 1, 1], [0, 0, 1], {}, r"cluster_ids.*\(3,\)"),
        (
            (4, 2),
            [0.0, 0.0, 1.0, 1.0],
            [0, 0, 1, 1],
            {},
            r"labels must have an integer dtype.*float32",
        ),
        ((4, 2), [0, 0, 1, 1], [0.0, 0, 1, 1], {}, r"cluster_ids must have an integer dtype"),
        (
            (4, 2),
            [0, 0, 1, 1],
            [True, True, False, False],
            {},
            r"cluster_ids must have an integer dtype.*bool",
        ),
        ((1, 2), [0], [0], {}, r"at least 2 examples.*\(1, 2\)"),
        ((4, 2), [0, 0, 1, 1], [0, 0, 1, 1], {"alpha": -0.5}, r"alpha must be >= 0, got -0.5"),
        ((4, 2), [0, 0, 1, 1], [0, 0, 1, 1], {"alpha": float("nan")}, r"alpha must be >= 0"),
        (
            (4, 2),
            [0, 0, 1, 1],
            [0, 0, 1, 1],
            {"reduction": "max"},
            r"reduction must be one of.*'max'",
        ),
    ],
)
def test_magnet_loss_validation(embeddings_shape, labels, cluster_ids, kwargs, match):
    embeddings = np.ones(embeddings_shape, np.float32)
    with pytest.raises(ValueError, match=match):
        magnet_loss(embeddings, np.asarray(labels), np.asarray(cluster_ids), **kwargs)
    # Shape checks are static, so they fire under jit as well.
    if "alpha" not in kwargs and "reduction" not in kwargs:
        with pytest.raises(ValueError, match=match):
            jax.jit(magnet_loss)(embeddings, np.asarray(labels), np.asarray(cluster_ids))


def test_integer_embeddings_rejected():
    with pytest.raises(ValueError, match="embeddings must have a floating dtype.*int32"):
        magnet_loss(np.ones((4, 2), np.int32), np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]))


def test_full_objective_validation():
    embeddings = np.ones((4, 3), np.float32)
    labels = np.array([0, 0, 1, 1], np.int32)
    assignments = np.zeros(4, np.int32)
    centroids = np.zeros((2, 2, 3), np.float32)
    valid = np.ones((2, 2), bool)
    ok = dict(
        embeddings=embeddings,
        labels=labels,
        assignments=assignments,
        centroids=centroids,
        valid=valid,
        variance=1.0,
    )
    cases = [
        ({"embeddings": np.ones((4,), np.float32)}, r"embeddings must have shape"),
        ({"labels": labels[:3]}, r"labels.*\(3,\)"),
        (
            {"assignments": assignments.astype(np.float32)},
            r"assignments must have an integer dtype",
        ),
        ({"centroids": np.zeros((4, 3), np.float32)}, r"centroids must have shape.*\(4, 3\)"),
        ({"centroids": np.zeros((2, 2, 5), np.float32)}, r"centroids.*dim = 3.*\(2, 2, 5\)"),
        ({"valid": np.ones((2, 3), bool)}, r"valid must have shape \(2, 2\).*\(2, 3\)"),
        ({"valid": np.ones((2, 2), np.int32)}, r"valid must be a bool mask.*int32"),
        ({"variance": np.ones((1,))}, r"variance must be a scalar.*\(1,\)"),
        ({"variance": -1.0}, r"variance must be >= 0"),
    ]
    for override, match in cases:
        with pytest.raises(ValueError, match=match):
            magnet_full_objective(**{**ok, **override})
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        magnet_full_objective(**ok, alpha=-1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        magnet_full_objective(**ok, reduction="average")


def test_validate_cluster_labels():
    validate_cluster_labels([0, 0, 1, 1], [5, 5, 9, 9])
    with pytest.raises(ValueError, match=r"cluster 9 holds examples of several labels: \[1, 2\]"):
        validate_cluster_labels([0, 0, 1, 2], [5, 5, 9, 9])
    with pytest.raises(ValueError, match="must both have shape"):
        validate_cluster_labels([0, 0, 1], [5, 5, 9, 9])


def test_traced_alpha_is_not_checked_and_used_as_given():
    # Concrete alphas are checked (above); a traced one has no value at trace time, so
    # a negative margin goes through as documented and enters the hinge unchanged.
    embeddings, cluster_ids = pumpikano_batch()
    labels = (cluster_ids % 3).astype(np.int32)
    reference_losses, _ = reference_magnet_terms(embeddings, labels, cluster_ids, alpha=-0.5)
    traced = jax.jit(lambda alpha: magnet_terms(embeddings, labels, cluster_ids, alpha=alpha))
    np.testing.assert_allclose(
        traced(jnp.asarray(-0.5, jnp.float32)).losses, reference_losses, rtol=1e-5, atol=1e-6
    )
