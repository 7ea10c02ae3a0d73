"""Tests for magnet_jax.index: building, refreshing, recording and neighbourhood sampling."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from magnet_jax.index import (
    ClusterIndex,
    NeighbourhoodBatch,
    index_from_assignments,
    recompute_centroids,
    record_batch,
    sample_neighbourhood,
    seed_probabilities,
)

P_VALUE_FLOOR = 1e-3
NUM_CLASSES, CLUSTERS_PER_CLASS, DIM = 4, 3, 5
NUM_IMPOSTORS = 6  # the most any class allows: 9 valid clusters, at most 3 in one class


def _clustering():
    """Labels and assignments with a different number of valid clusters per class.

    Class 0: 3 clusters of 6/7/7. Class 1: 3 clusters of 10, 2 and 1 examples.
    Class 2: slots 0 and 2 (slot 1 empty). Class 3: a single example in slot 0.
    """
    pieces = [
        (0, 0, 6), (0, 1, 7), (0, 2, 7),
        (1, 0, 10), (1, 1, 2), (1, 2, 1),
        (2, 0, 5), (2, 2, 8),
        (3, 0, 1),
    ]  # fmt: skip
    labels = np.concatenate([np.full(n, c) for c, _, n in pieces]).astype(np.int32)
    assignments = np.concatenate([np.full(n, k) for _, k, n in pieces]).astype(np.int32)
    order = np.random.default_rng(0).permutation(labels.size)
    return labels[order], assignments[order]


@pytest.fixture(scope="module")
def data():
    labels, assignments = _clustering()
    # Clusters centred at distinct random points so that centroid distances have no ties.
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=3.0, size=(NUM_CLASSES, CLUSTERS_PER_CLASS, DIM))
    embeddings = centres[labels, assignments] + rng.normal(size=(labels.size, DIM))
    return embeddings.astype(np.float32), labels, assignments


@pytest.fixture(scope="module")
def index(data):
    embeddings, labels, assignments = data
    return index_from_assignments(
        embeddings,
        labels,
        assignments,
        num_classes=NUM_CLASSES,
        clusters_per_class=CLUSTERS_PER_CLASS,
        num_impostors=NUM_IMPOSTORS,
    )


def _numpy_centroids(embeddings, labels, assignments, num_classes, clusters_per_class):
    centroids = np.zeros((num_classes, clusters_per_class, embeddings.shape[1]))
    counts = np.zeros((num_classes, clusters_per_class), np.int64)
    for c in range(num_classes):
        for k in range(clusters_per_class):
            members = (labels == c) & (assignments == k)
            counts[c, k] = members.sum()
            if counts[c, k]:
                centroids[c, k] = embeddings[members].astype(np.float64).mean(axis=0)
    return centroids, counts


def _brute_force_impostor_distances(centroids, valid, num_impostors):
    """For every flat cluster: squared distances to all candidates, sorted, and the ids."""
    num_classes, clusters_per_class = valid.shape
    flat = centroids.reshape(num_classes * clusters_per_class, -1).astype(np.float64)
    cluster_class = np.arange(flat.shape[0]) // clusters_per_class
    squared = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    candidate = valid.reshape(-1)[None, :] & (cluster_class[:, None] != cluster_class[None, :])
    squared = np.where(candidate, squared, np.inf)
    order = np.argsort(squared, axis=1, kind="stable")[:, :num_impostors]
    return squared, order


def _check_impostors(index, centroids, exact=True):
    valid = np.asarray(index.valid)
    squared, expected = _brute_force_impostor_distances(centroids, valid, index.num_impostors)
    impostors = np.asarray(index.impostors)
    assert impostors.shape == expected.shape and impostors.dtype == np.int32
    rows = np.flatnonzero(valid.reshape(-1))  # rows of invalid clusters are never read
    if exact:
        np.testing.assert_array_equal(impostors[rows], expected[rows])
    else:  # float32 ranking of near-ties may differ: compare the distances it found
        found = np.take_along_axis(squared, impostors, axis=1)
        best = np.take_along_axis(squared, expected, axis=1)
        assert np.isfinite(found[rows]).all(), "an impostor is invalid or of the same class"
        np.testing.assert_allclose(found[rows], best[rows], rtol=1e-4)


# ---------------------------------------------------------------------------------------
# Building.


def test_index_from_assignments_matches_numpy(data, index):
    embeddings, labels, assignments = data
    centroids, counts = _numpy_centroids(
        embeddings, labels, assignments, NUM_CLASSES, CLUSTERS_PER_CLASS
    )
    assert isinstance(index, ClusterIndex)
    assert index.centroids.shape == (NUM_CLASSES, CLUSTERS_PER_CLASS, DIM)
    assert index.centroids.dtype == jnp.float32
    np.testing.assert_allclose(index.centroids, centroids, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(index.counts, counts)
    np.testing.assert_array_equal(index.valid, counts > 0)
    # A different number of valid clusters per class, in one static shape.
    np.testing.assert_array_equal(np.asarray(index.valid).sum(axis=1), [3, 3, 2, 1])
    np.testing.assert_array_equal(index.assignments, assignments)
    np.testing.assert_array_equal(index.labels, labels)
    np.testing.assert_array_equal(index.cluster_ids, labels * CLUSTERS_PER_CLASS + assignments)
    # The cluster table lists the members of every flat cluster.
    table = index.cluster_table
    members = np.asarray(table.members)
    for flat_id in range(NUM_CLASSES * CLUSTERS_PER_CLASS):
        start, count = int(table.offsets[flat_id]), int(table.counts[flat_id])
        np.testing.assert_array_equal(
            members[start : start + count],
            np.flatnonzero(labels * CLUSTERS_PER_CLASS + assignments == flat_id),
        )
    # Every valid cluster starts with a positive tracked loss; invalid ones at 0.
    np.testing.assert_array_equal(index.cluster_loss, np.where(counts > 0, 1.0, 0.0))
    # σ² defaults to the training-set σ² of the clustering.
    residuals = embeddings - centroids[labels, assignments]
    np.testing.assert_allclose(index.variance, (residuals**2).sum() / (labels.size - 1), rtol=1e-5)
    assert int(index.num_batches) == 0
    assert index.num_impostors == NUM_IMPOSTORS


def test_impostors_are_the_nearest_valid_other_class_clusters(index):
    _check_impostors(index, np.asarray(index.centroids))
    impostors = np.asarray(index.impostors)
    valid = np.asarray(index.valid).reshape(-1)
    rows = np.flatnonzero(valid)
    assert valid[impostors[rows]].all()
    assert (impostors[rows] // CLUSTERS_PER_CLASS != rows[:, None] // CLUSTERS_PER_CLASS).all()


def test_impostor_search_in_chunks_matches_brute_force():
    # C*K = 1,200 flat clusters searched 128 rows at a time (the last chunk partial),
    # with some empty slots.
    num_classes, clusters_per_class, dim = 40, 30, 8
    rng = np.random.default_rng(2)
    num_examples = 3000
    labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
    assignments = rng.integers(0, clusters_per_class, num_examples).astype(np.int32)
    embeddings = rng.normal(size=(num_examples, dim)).astype(np.float32)
    build = partial(
        index_from_assignments,
        embeddings,
        labels,
        assignments,
        num_classes=num_classes,
        clusters_per_class=clusters_per_class,
        num_impostors=10,
    )
    chunked = build(impostor_chunk_size=128)
    assert not np.asarray(chunked.valid).all(), "the case should have empty slots"
    centroids, _ = _numpy_centroids(
        embeddings, labels, assignments, num_classes, clusters_per_class
    )
    _check_impostors(chunked, centroids, exact=False)
    np.testing.assert_array_equal(chunked.impostors, build().impostors)


def test_index_is_a_pytree(index):
    same = jax.jit(lambda index: index)(index)
    assert isinstance(same, ClusterIndex)
    jax.tree.map(np.testing.assert_array_equal, same, index)
    doubled = jax.tree.map(lambda leaf: leaf * 2, index)
    np.testing.assert_array_equal(doubled.impostors, 2 * np.asarray(index.impostors))
    leaves, treedef = jax.tree.flatten(index)
    assert len(leaves) == 11
    assert isinstance(jax.tree.unflatten(treedef, leaves), ClusterIndex)


def test_index_from_assignments_under_jit(data, index):
    embeddings, labels, assignments = data
    build = jax.jit(
        partial(
            index_from_assignments,
            num_classes=NUM_CLASSES,
            clusters_per_class=CLUSTERS_PER_CLASS,
            num_impostors=NUM_IMPOSTORS,
        )
    )
    jax.tree.map(
        partial(np.testing.assert_allclose, rtol=1e-6),
        build(embeddings, labels, assignments),
        index,
    )


# ---------------------------------------------------------------------------------------
# Sampling.


NUM_DRAWS = 20_000
sample_many = jax.jit(
    jax.vmap(
        partial(sample_neighbourhood, clusters_per_batch=4, examples_per_cluster=5),
        in_axes=(None, 0),
    )
)  # one compilation (the index is traced) shared by the tests below


def _keys(count, seed):
    return jax.random.split(jax.random.key(seed), count)


@pytest.fixture(scope="module")
def batches(index):
    return sample_many(index, _keys(NUM_DRAWS, 3))


def test_neighbourhood_batch_structure(index, batches):
    assert isinstance(batches, NeighbourhoodBatch)
    assert (
        batches.indices.shape
        == batches.labels.shape
        == batches.cluster_ids.shape
        == (NUM_DRAWS, 20)
    )
    indices, labels, cluster_ids = (np.asarray(x) for x in batches)
    # Every example belongs to its cluster and its class.
    np.testing.assert_array_equal(np.asarray(index.labels)[indices], labels)
    np.testing.assert_array_equal(np.asarray(index.cluster_ids)[indices], cluster_ids)
    np.testing.assert_array_equal(labels, cluster_ids // CLUSTERS_PER_CLASS)
    # Empty clusters never appear.
    assert np.asarray(index.valid).reshape(-1)[cluster_ids].all()
    # M clusters of D adjacent examples: the seed, then its 3 nearest other-class clusters.
    per_cluster = cluster_ids.reshape(NUM_DRAWS, 4, 5)
    assert (per_cluster == per_cluster[:, :, :1]).all()
    clusters = per_cluster[:, :, 0]
    _, nearest = _brute_force_impostor_distances(
        np.asarray(index.centroids), np.asarray(index.valid), 3
    )
    np.testing.assert_array_equal(clusters[:, 1:], nearest[clusters[:, 0]])
    # Without replacement when the cluster holds >= D examples, with replacement otherwise.
    counts = np.asarray(index.cluster_table.counts)
    examples = indices.reshape(NUM_DRAWS, 4, 5)
    examples, clusters = examples[:2000], clusters[:2000]
    distinct = np.array([[len(set(row)) for row in batch] for batch in examples])
    big = counts[clusters] >= 5
    assert (distinct[big] == 5).all()
    assert (distinct[~big] <= counts[clusters][~big]).all()
    assert (~big).any(), "the case should draw from clusters smaller than D"
    # Every valid cluster is a seed sometimes, none of the empty ones; the single
    # example of class 3 (flat id 9) fills its D slots by itself.
    seeds = np.asarray(batches.cluster_ids)[:, 0]
    np.testing.assert_array_equal(np.unique(seeds), np.flatnonzero(np.asarray(index.valid)))
    assert (indices[seeds == 9][:, :5] == np.flatnonzero(index.labels == 3)[0]).all()


def test_seed_frequencies_follow_tracked_losses(index):
    rng = np.random.default_rng(4)
    cluster_loss = np.where(index.valid, rng.uniform(0.2, 3.0, index.valid.shape), 0.0)
    cluster_loss[0, 1] = 0.0  # a solved cluster keeps a small chance through the floor
    weighted = index.replace(cluster_loss=jnp.asarray(cluster_loss, jnp.float32))
    num_draws = NUM_DRAWS
    seeds = sample_many(weighted, _keys(num_draws, 5)).cluster_ids[:, 0]
    observed = np.bincount(np.asarray(seeds), minlength=index.num_clusters)
    valid = np.asarray(index.valid).reshape(-1)
    assert observed[~valid].sum() == 0, "an empty cluster was a seed"
    # Expected: ∝ loss, floored at 1% of the mean valid loss.
    loss = cluster_loss.reshape(-1)
    weights = np.where(valid, np.maximum(loss, 0.01 * loss[valid].mean()), 0.0)
    expected = weights / weights.sum()
    np.testing.assert_allclose(seed_probabilities(weighted), expected, rtol=1e-5)
    assert stats.chisquare(observed[valid], num_draws * expected[valid]).pvalue > P_VALUE_FLOOR
    assert observed[1] > 0, "the zero-loss cluster must stay a possible seed"


def test_seed_floor_and_all_zero_losses(index):
    probabilities = np.asarray(
        seed_probabilities(index.replace(cluster_loss=jnp.zeros_like(index.cluster_loss)))
    )
    valid = np.asarray(index.valid).reshape(-1)
    np.testing.assert_allclose(probabilities[valid], 1.0 / valid.sum(), rtol=1e-6)
    assert (probabilities[~valid] == 0).all()
    one_solved = index.cluster_loss.at[0, 0].set(0.0)
    probabilities = np.asarray(
        seed_probabilities(index.replace(cluster_loss=one_solved), seed_floor=0.0)
    )
    assert probabilities[0] == 0.0 and np.isfinite(probabilities).all()


def test_sample_neighbourhood_single_cluster(index):
    single_cluster = sample_neighbourhood(
        index, jax.random.key(0), clusters_per_batch=1, examples_per_cluster=3
    )
    assert single_cluster.indices.shape == (3,)
    assert (
        np.asarray(index.cluster_ids)[single_cluster.indices] == single_cluster.cluster_ids
    ).all()


# ---------------------------------------------------------------------------------------
# Recording losses.


def test_record_batch_running_averages(index):
    cluster_ids = jnp.array([0, 0, 4, 4, 4, 13, -1, 7], jnp.int32)  # 13, -1: ignored
    losses = jnp.array([1.0, 3.0, 0.0, 0.0, 0.0, 5.0, 5.0, 2.0])  # cluster 7 is empty
    updated = record_batch(index, cluster_ids, losses, jnp.float32(2.0), momentum=0.25)
    expected = np.asarray(index.cluster_loss).reshape(-1).copy()
    expected[0] = 0.25 * 1.0 + 0.75 * 2.0
    expected[4] = 0.25 * 1.0 + 0.75 * 0.0  # zero losses count as 0, never NaN
    np.testing.assert_allclose(np.asarray(updated.cluster_loss).reshape(-1), expected, rtol=1e-6)
    assert np.isfinite(np.asarray(updated.cluster_loss)).all()
    # The first σ̂² replaces the clustering's σ²; then mean, then EMA (momentum 0.5).
    assert float(updated.variance) == 2.0 and int(updated.num_batches) == 1
    record = jax.jit(partial(record_batch, momentum=0.25, variance_momentum=0.5))
    for variance, running in [(4.0, 3.0), (1.0, 2.0), (6.0, 4.0)]:
        updated = record(updated, cluster_ids, losses, jnp.float32(variance))
        np.testing.assert_allclose(updated.variance, running, rtol=1e-6)
    # A non-finite σ̂² is ignored.
    unchanged = record(updated, cluster_ids, losses, jnp.float32(np.nan))
    assert float(unchanged.variance) == float(updated.variance)
    assert int(unchanged.num_batches) == int(updated.num_batches) == 4


def test_record_batch_donated_in_a_jitted_step(index):
    @partial(jax.jit, donate_argnums=0)
    def step(index, key):
        batch = sample_neighbourhood(index, key, clusters_per_batch=4, examples_per_cluster=5)
        return record_batch(index, batch.cluster_ids, jnp.zeros(20), jnp.float32(1.0))

    updated = step(jax.tree.map(jnp.copy, index), jax.random.key(7))
    assert isinstance(updated, ClusterIndex)
    assert np.isfinite(np.asarray(updated.cluster_loss)).all()
    assert (np.asarray(updated.cluster_loss) <= np.asarray(index.cluster_loss)).all()


# ---------------------------------------------------------------------------------------
# Recomputing centroids.


def test_recompute_centroids(data, index):
    embeddings, labels, assignments = data
    moved = 2.0 * embeddings[:, ::-1] + 1.0  # reorders the neighbours
    recomputed = recompute_centroids(index, moved)
    centroids, _ = _numpy_centroids(moved, labels, assignments, NUM_CLASSES, CLUSTERS_PER_CLASS)
    np.testing.assert_allclose(recomputed.centroids, centroids, rtol=1e-5, atol=1e-5)
    _check_impostors(recomputed, centroids)
    for field in ("valid", "assignments", "labels", "cluster_loss", "variance", "num_batches"):
        np.testing.assert_array_equal(getattr(recomputed, field), getattr(index, field))
    jax.tree.map(np.testing.assert_array_equal, recomputed.cluster_table, index.cluster_table)


# ---------------------------------------------------------------------------------------
# k-means based building and refreshing.


@pytest.fixture(scope="module")
def kmeans_index(data):
    index_lib = pytest.importorskip("magnet_jax.index")
    pytest.importorskip("magnet_jax.kmeans")
    embeddings, labels, _ = data
    return index_lib.build_index(
        embeddings,
        labels,
        clusters_per_class=CLUSTERS_PER_CLASS,
        num_impostors=5,
        key=jax.random.key(8),
        max_iterations=20,
    )


def test_build_index(data, kmeans_index):
    embeddings, labels, _ = data
    index = kmeans_index
    assert index.num_classes == NUM_CLASSES and index.centroids.shape == (
        NUM_CLASSES,
        CLUSTERS_PER_CLASS,
        DIM,
    )
    assert ((index.assignments >= 0) & (index.assignments < CLUSTERS_PER_CLASS)).all()
    counts = np.bincount(np.asarray(index.cluster_ids), minlength=index.num_clusters)
    np.testing.assert_array_equal(np.asarray(index.counts).reshape(-1), counts)
    np.testing.assert_array_equal(index.valid, index.counts > 0)
    # Class 3 has a single example, so one valid cluster; the others have three.
    np.testing.assert_array_equal(np.asarray(index.valid).sum(axis=1), [3, 3, 3, 1])
    centroids, _ = _numpy_centroids(
        embeddings, labels, np.asarray(index.assignments), NUM_CLASSES, CLUSTERS_PER_CLASS
    )
    np.testing.assert_allclose(index.centroids, centroids, rtol=1e-5, atol=1e-5)
    _check_impostors(index, centroids)


def test_refresh_index_carries_over_variance_and_resets_losses(data, kmeans_index):
    from magnet_jax.index import refresh_index

    embeddings, labels, _ = data
    trained = record_batch(
        kmeans_index, jnp.array([0, 1, 3], jnp.int32), jnp.array([4.0, 4.0, 7.0]), jnp.float32(9.0)
    )
    old_valid = np.asarray(trained.valid)
    old_mean = np.asarray(trained.cluster_loss)[old_valid].mean()
    refreshed = refresh_index(trained, 3.0 * embeddings, key=jax.random.key(9), max_iterations=20)
    assert jax.tree.map(jnp.shape, refreshed) == jax.tree.map(jnp.shape, trained)
    np.testing.assert_array_equal(refreshed.labels, labels)
    assert float(refreshed.variance) == 9.0 and int(refreshed.num_batches) == 1
    np.testing.assert_allclose(
        refreshed.cluster_loss, np.where(refreshed.valid, old_mean, 0.0), rtol=1e-6
    )
    np.testing.assert_array_equal(refreshed.valid, refreshed.counts > 0)
    _check_impostors(refreshed, np.asarray(refreshed.centroids))

    inherited = refresh_index(
        trained,
        3.0 * embeddings,
        key=jax.random.key(9),
        max_iterations=20,
        inherit_cluster_loss=True,
    )
    old_example_loss = np.asarray(trained.cluster_loss).reshape(-1)[np.asarray(trained.cluster_ids)]
    new_ids = np.asarray(inherited.cluster_ids)
    for flat_id in np.flatnonzero(np.asarray(inherited.valid).reshape(-1)):
        np.testing.assert_allclose(
            np.asarray(inherited.cluster_loss).reshape(-1)[flat_id],
            old_example_loss[new_ids == flat_id].mean(),
            rtol=1e-5,
        )


# ---------------------------------------------------------------------------------------
# Errors.


def _build_call(data, **overrides):
    embeddings, labels, assignments = data
    arguments = dict(
        embeddings=embeddings,
        labels=labels,
        assignments=assignments,
        num_classes=NUM_CLASSES,
        clusters_per_class=CLUSTERS_PER_CLASS,
        num_impostors=NUM_IMPOSTORS,
    )
    arguments.update(overrides)
    return lambda: index_from_assignments(
        arguments.pop("embeddings"),
        arguments.pop("labels"),
        arguments.pop("assignments"),
        **arguments,
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(labels=np.zeros(3, np.int32)), r"labels must have shape \[N\] = \(47,\)"),
        (dict(assignments=np.zeros(48, np.int32)), r"assignments must have shape \[N\]"),
        (dict(embeddings=np.zeros(47, np.float32)), r"embeddings must have shape \[N, d\]"),
        (dict(embeddings=np.zeros((47, 2), np.int32)), "floating dtype"),
        (dict(labels=np.zeros(47, np.float32)), "labels must have an integer dtype"),
        (dict(assignments=np.zeros(47, np.float32)), "assignments must have an integer dtype"),
        (dict(labels=np.full(47, 4, np.int32)), r"labels must lie in \[0, num_classes=4\)"),
        (dict(assignments=np.full(47, -1, np.int32)), "assignments must lie in"),
        (dict(clusters_per_class=0), "clusters_per_class must be >= 1"),
        (dict(num_classes=0), "num_classes must be >= 1"),
        (dict(num_impostors=-1), "num_impostors must be >= 0"),
        (
            dict(num_impostors=7),
            r"num_impostors=7 exceeds .* class 0: it has 3 valid clusters and the other "
            r"classes have 6 \(9 valid clusters",
        ),
        (dict(initial_loss=0.0), "initial_loss must be positive"),
        (dict(variance=-1.0), "variance must be non-negative"),
        (dict(impostor_chunk_size=0), "impostor_chunk_size"),
    ],
)
def test_index_from_assignments_errors(data, overrides, message):
    with pytest.raises(ValueError, match=message):
        _build_call(data, **overrides)()


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda index: sample_neighbourhood(
                index, jax.random.key(0), clusters_per_batch=0, examples_per_cluster=2
            ),
            "clusters_per_batch must be >= 1",
        ),
        (
            lambda index: sample_neighbourhood(
                index, jax.random.key(0), clusters_per_batch=8, examples_per_cluster=2
            ),
            r"clusters_per_batch - 1 = 7 exceeds .* \(12, 6\)",
        ),
        (
            lambda index: sample_neighbourhood(
                index, jax.random.key(0), clusters_per_batch=2, examples_per_cluster=0
            ),
            "examples_per_cluster",
        ),
        (
            lambda index: sample_neighbourhood(
                index,
                jax.random.key(0),
                clusters_per_batch=2,
                examples_per_cluster=2,
                seed_floor=-1.0,
            ),
            "seed_floor",
        ),
        (
            lambda index: record_batch(
                index, jnp.zeros(3, jnp.int32), jnp.zeros(4), jnp.float32(1)
            ),
            r"\(3,\) and \(4,\)",
        ),
        (
            lambda index: record_batch(index, jnp.zeros(3), jnp.zeros(3), jnp.float32(1)),
            "cluster_ids must have an integer dtype",
        ),
        (
            lambda index: record_batch(index, jnp.zeros(3, jnp.int32), jnp.zeros(3), jnp.ones(2)),
            "variance must be a scalar",
        ),
        (
            lambda index: record_batch(
                index, jnp.zeros(3, jnp.int32), jnp.zeros(3), jnp.float32(1), momentum=1.0
            ),
            "momentum",
        ),
        (
            lambda index: record_batch(
                index, jnp.zeros(3, jnp.int32), jnp.zeros(3), jnp.float32(1), variance_momentum=-0.1
            ),
            "variance_momentum",
        ),
        (lambda index: recompute_centroids(index, jnp.zeros((46, DIM))), r"N=47"),
    ],
)
def test_index_errors(index, call, message):
    with pytest.raises(ValueError, match=message):
        call(index)


def test_refresh_and_build_errors(index, data):
    pytest.importorskip("magnet_jax.kmeans")
    from magnet_jax.index import build_index, refresh_index

    embeddings, labels, _ = data
    with pytest.raises(ValueError, match="N=47"):
        refresh_index(index, embeddings[:-1], key=jax.random.key(0))
    with pytest.raises(ValueError, match="clusters_per_class must be >= 1"):
        build_index(
            embeddings, labels, clusters_per_class=0, num_impostors=1, key=jax.random.key(0)
        )
    with pytest.raises(ValueError, match=r"num_impostors=9 exceeds"):
        build_index(
            embeddings,
            labels,
            clusters_per_class=3,
            num_impostors=9,
            key=jax.random.key(0),
            max_iterations=20,
        )


def test_warm_refresh_starts_lloyd_from_the_index_centroids():
    from magnet_jax.clustering import Agglomerative, KMeans
    from magnet_jax.index import build_index, refresh_index
    from magnet_jax.kmeans import kmeans_per_class
    from magnet_jax.methods.magnet import Magnet

    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(60, 3)).astype(np.float32)
    labels = np.repeat(np.arange(3), 20).astype(np.int32)
    index = build_index(
        embeddings, labels, clusters_per_class=3, num_impostors=2, key=jax.random.key(0)
    )
    moved = embeddings + 0.1 * rng.normal(size=embeddings.shape).astype(np.float32)
    warm = refresh_index(index, moved, key=jax.random.key(1), max_iterations=20, warm_start=True)
    reference = kmeans_per_class(
        moved,
        labels,
        3,
        key=jax.random.key(1),
        max_iterations=20,
        initial_centroids=index.centroids,
        initial_valid=index.valid,
    )
    np.testing.assert_array_equal(warm.assignments, reference.assignments)
    with pytest.raises(ValueError, match="k-means only"):
        refresh_index(
            index, moved, key=jax.random.key(1), warm_start=True, clusterer=Agglomerative()
        )
    assert Magnet(warm_start=True).warm_starts_kmeans
    assert not Magnet(warm_start=True, clusterer=KMeans(num_restarts=2)).warm_starts_kmeans
