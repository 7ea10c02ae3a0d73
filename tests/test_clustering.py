"""Agglomerative clustering per class, the clustering dispatch, diagnostics, and the index
and trainer running on a varying number of valid clusters per class."""

import json

import jax
import numpy as np
import pytest

from magnet_jax import evaluation, training
from magnet_jax.checkpoint import Checkpointer
from magnet_jax.clustering import (
    agglomerative_per_class,
    cluster_per_class,
    cluster_purity,
    clustering_diagnostics,
)
from magnet_jax.config import TrainConfig
from magnet_jax.data import coarsen, load_dataset
from magnet_jax.index import build_index, refresh_index, sample_neighbourhood
from magnet_jax.kmeans import kmeans_per_class

MODES = {0: 1, 1: 2, 2: 3, 3: 5}  # class -> number of true modes


def _blobs(seed=0, dim=16, per_mode=120, spread=12.0):
    """Classes with a known, different number of well separated Gaussian modes.

    Returns embeddings [N, d], class labels [N], mode labels [N] (global ids)."""
    rng = np.random.default_rng(seed)
    points, labels, modes = [], [], []
    for label, num_modes in MODES.items():
        centres = rng.normal(size=(num_modes, dim)) * spread
        for centre in centres:
            points.append(centre + rng.normal(size=(per_mode, dim)))
            labels += [label] * per_mode
            modes += [len(set(modes))] * per_mode
    order = rng.permutation(len(labels))
    return (
        np.concatenate(points).astype(np.float32)[order],
        np.asarray(labels, np.int32)[order],
        np.asarray(modes, np.int32)[order],
    )


@pytest.mark.parametrize("linkage, threshold", [("ward", 0.08), ("average", 3.0)])
@pytest.mark.parametrize("subsample", [1000, 150])
def test_threshold_recovers_each_class_mode_count(linkage, threshold, subsample):
    embeddings, labels, modes = _blobs()
    result = agglomerative_per_class(
        embeddings,
        labels,
        max_clusters=8,
        key=jax.random.key(0),
        linkage=linkage,
        distance_threshold=threshold,
        max_points_per_class=subsample,
    )
    np.testing.assert_array_equal(
        np.asarray(result.valid).sum(axis=1), [MODES[c] for c in range(4)]
    )
    # ... and the clusters are the modes themselves.
    diagnostics = clustering_diagnostics(
        embeddings,
        labels,
        result.assignments,
        num_classes=4,
        clusters_per_class=8,
        fine_labels=modes,
    )
    assert diagnostics["purity"] == 1.0
    # The threshold is relative: the same setting works on a rescaled embedding.
    scaled = agglomerative_per_class(
        embeddings * 1e3,
        labels,
        max_clusters=8,
        key=jax.random.key(0),
        linkage=linkage,
        distance_threshold=threshold,
        max_points_per_class=subsample,
    )
    np.testing.assert_array_equal(scaled.assignments, result.assignments)


def test_structure_caps_target_count_and_small_classes():
    embeddings, labels, _ = _blobs(per_mode=40)
    # A class with 2 examples, and one with no example at all (class 5).
    embeddings = np.concatenate(
        [embeddings, np.ones((2, embeddings.shape[1]), np.float32) * [[0.0], [1.0]]]
    )
    labels = np.concatenate([labels, [4, 4]]).astype(np.int32)
    # Threshold mode capped at K = 3; target-count mode gives min(K, distinct points).
    for threshold, expected in ((0.15, [1, 2, 3, 3, 2, 0]), (None, [3, 3, 3, 3, 2, 0])):
        result = agglomerative_per_class(
            embeddings,
            labels,
            max_clusters=3,
            key=jax.random.key(1),
            num_classes=6,
            distance_threshold=threshold,
        )
        assignments, valid, counts = map(np.asarray, result)
        assert assignments.dtype == np.int32 and valid.shape == (6, 3)
        np.testing.assert_array_equal(valid.sum(axis=1), expected)
        # Valid slots are the first ones, largest first, and every example is in a valid one.
        assert (np.diff(counts, axis=1) <= 0).all()
        assert valid[labels, assignments].all()
        np.testing.assert_array_equal(
            counts, np.bincount(labels * 3 + assignments, minlength=18).reshape(6, 3)
        )


def test_subsample_is_deterministic_and_neighbour_assignment_keeps_elongated_modes():
    # Two long parallel bars per class: nearest-centroid assignment cuts across the bars'
    # ends less cleanly than nearest-neighbour assignment, and single linkage finds them.
    rng = np.random.default_rng(3)
    along = rng.uniform(-20, 20, size=4000)
    bar = rng.integers(0, 2, size=4000)
    embeddings = np.stack([along, bar * 5.0 + rng.normal(scale=0.2, size=4000)], axis=1).astype(
        np.float32
    )
    labels = np.zeros(4000, np.int32)
    options = dict(
        max_clusters=4,
        linkage="single",
        distance_threshold=8.0,
        max_points_per_class=500,
        min_cluster_size=10,
    )
    first = agglomerative_per_class(embeddings, labels, key=jax.random.key(7), **options)
    again = agglomerative_per_class(embeddings, labels, key=jax.random.key(7), **options)
    np.testing.assert_array_equal(first.assignments, again.assignments)
    purity = clustering_diagnostics(
        embeddings, labels, first.assignments, num_classes=1, clusters_per_class=4, fine_labels=bar
    )
    assert purity["clusters_per_class_max"] == 2 and purity["purity"] == 1.0
    kmeans = kmeans_per_class(embeddings, labels, 2, key=jax.random.key(0))
    kmeans_purity = clustering_diagnostics(
        embeddings, labels, kmeans.assignments, num_classes=1, clusters_per_class=2, fine_labels=bar
    )
    assert kmeans_purity["purity"] < 0.75  # k-means splits the bars across, not along


def test_dispatch_kmeans_with_restarts_is_kmeans_per_class():
    embeddings, labels, _ = _blobs(per_mode=30)
    result = cluster_per_class(
        embeddings, labels, clusters_per_class=4, key=jax.random.key(2), num_restarts=3
    )
    expected = kmeans_per_class(embeddings, labels, 4, key=jax.random.key(2), num_restarts=3)
    np.testing.assert_array_equal(result.assignments, expected.assignments)
    np.testing.assert_array_equal(result.valid, np.asarray(expected.counts) > 0)
    with pytest.raises(ValueError, match="unknown clustering"):
        cluster_per_class(
            embeddings, labels, clusters_per_class=4, key=jax.random.key(2), method="spectral"
        )
    with pytest.raises(ValueError, match="linkage"):
        cluster_per_class(
            embeddings,
            labels,
            clusters_per_class=4,
            key=jax.random.key(2),
            method="agglomerative",
            linkage="centroid",
        )


def test_diagnostics_by_hand():
    embeddings = np.array([[0.0], [2.0], [10.0], [5.0], [7.0]])
    labels = np.array([0, 0, 0, 1, 1])
    assignments = np.array([0, 0, 1, 1, 1])
    fine = np.array([0, 1, 1, 2, 2])
    diagnostics = clustering_diagnostics(
        embeddings, labels, assignments, num_classes=2, clusters_per_class=2, fine_labels=fine
    )
    # Clusters {0, 2}, {10}, {}, {5, 7}: squares 2 + 0 + 2 over 5 examples.
    assert diagnostics["inertia"] == pytest.approx(4.0 / 5.0)
    # Majorities: {0,2} -> one of 2 right, {10} -> 1, {5,7} -> 2: purity 4/5.
    assert diagnostics["purity"] == pytest.approx(4.0 / 5.0)
    assert (diagnostics["clusters_per_class_min"], diagnostics["clusters_per_class_max"]) == (
        1.0,
        2.0,
    )
    assert diagnostics["valid_clusters"] == 3.0


def test_index_never_samples_or_scores_an_invalid_slot():
    embeddings, labels, _ = _blobs()
    index = build_index(
        embeddings,
        labels,
        clusters_per_class=8,
        num_impostors=3,  # with 4 classes, no class needs more than one cluster for this
        key=jax.random.key(0),
        clustering="agglomerative",
        distance_threshold=0.08,
    )
    valid = np.asarray(index.valid)
    np.testing.assert_array_equal(valid.sum(axis=1), [1, 2, 3, 5])
    sample = jax.jit(
        jax.vmap(
            lambda key: sample_neighbourhood(
                index, key, clusters_per_batch=4, examples_per_cluster=4
            )
        )
    )
    batches = sample(jax.random.split(jax.random.key(1), 2000))
    cluster_ids = np.asarray(batches.cluster_ids).reshape(-1)
    assert valid.reshape(-1)[cluster_ids].all()
    assert np.unique(cluster_ids[:: 4 * 4]).size == valid.sum(), (
        "every valid cluster is a seed sometimes"
    )
    # Every example drawn belongs to the cluster it is reported in.
    np.testing.assert_array_equal(
        np.asarray(index.cluster_ids)[np.asarray(batches.indices).reshape(-1)], cluster_ids
    )
    # kNC: an invalid slot's centroid (zeros) sits on the query, yet never wins.
    query = np.zeros((1, embeddings.shape[1]), np.float32)
    centroids = np.asarray(index.centroids).copy()
    centroids[~valid] = 0.0
    nearest_valid_class = np.argmin(
        np.where(valid, np.sum(centroids**2, axis=-1), np.inf).min(axis=1)
    )
    predicted = evaluation.knc_predict(query, index, centroids=centroids, num_nearest_clusters=1)
    assert int(predicted[0]) == nearest_valid_class
    # A refresh keeps the options' effect: still a varying number per class.
    refreshed = refresh_index(
        index,
        embeddings * 2.0,
        key=jax.random.key(3),
        clustering="agglomerative",
        distance_threshold=0.08,
    )
    np.testing.assert_array_equal(np.asarray(refreshed.valid).sum(axis=1), [1, 2, 3, 5])


def _digits_parity():
    digits = load_dataset("digits")
    return coarsen(
        digits, [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]], ["even", "odd"], name="digits_parity"
    )


def _restored(workdir, dataset):
    config = TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    run = training.prepare(config, dataset)
    checkpointer = Checkpointer(workdir / "checkpoints")
    restored = checkpointer.restore(
        checkpointer.latest_step(), run.initial_state, training.method_state_template(run)
    )
    checkpointer.close()
    return restored


@pytest.mark.slow
def test_agglomerative_training_end_to_end_and_exact_resume(tmp_path):
    dataset = _digits_parity()
    options = dict(
        clustering="agglomerative",
        distance_threshold=0.05,
        clusters_per_class=6,
        clusters_per_batch=4,
        examples_per_cluster=8,
        refresh_every=15,
        eval_every=30,
        checkpoint_every=15,
        log_every=15,
        kmeans_iterations=10,
        num_devices=1,
    )
    if "lr_schedule" in TrainConfig.__dataclass_fields__:
        options["lr_schedule"] = "constant"  # a cosine schedule over `steps` cannot be extended
    straight = training.train(
        TrainConfig(**options, steps=60, workdir=str(tmp_path / "straight")),
        progress=False,
        dataset=dataset,
    )
    training.train(
        TrainConfig(**options, steps=30, workdir=str(tmp_path / "split")),
        progress=False,
        dataset=dataset,
    )
    resumed = training.train(
        TrainConfig(**options, steps=60, workdir=str(tmp_path / "split")),
        progress=False,
        dataset=dataset,
    )
    for key, value in straight.items():
        if key != "seconds":
            assert resumed[key] == (
                pytest.approx(value, abs=1e-6) if isinstance(value, float) else value
            ), key
    a, b = _restored(tmp_path / "straight", dataset), _restored(tmp_path / "split", dataset)
    for x, y in zip(
        jax.tree.leaves((a.state.params, a.index)),
        jax.tree.leaves((b.state.params, b.index)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    assert straight["knc_error"] < 0.5 and "fine_error_at_1" in straight

    def refreshes(name):
        lines = (tmp_path / name / "history.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "refresh"]

    records = refreshes("straight")
    assert [r["step"] for r in records] == [0, 15, 30, 45]
    for record in records:
        assert 0.0 < record["purity"] <= 1.0 and record["inertia"] > 0
        assert 1 <= record["clusters_per_class_min"] <= record["clusters_per_class_max"] <= 6
    drop = ("refresh_seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in refreshes("split")] == [
        {k: v for k, v in r.items() if k not in drop} for r in records
    ]


def test_index_gives_every_class_enough_clusters_for_its_impostors():
    # Two classes of one mode each: the threshold alone would give one cluster per class,
    # but batches of 4 clusters need 3 impostors of the other class.
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(400, 8)).astype(np.float32)
    labels = np.repeat([0, 1], 200).astype(np.int32)
    index = build_index(
        embeddings,
        labels,
        clusters_per_class=6,
        num_impostors=3,
        key=jax.random.key(0),
        clustering="agglomerative",
        distance_threshold=0.5,
    )
    np.testing.assert_array_equal(np.asarray(index.valid).sum(axis=1), [3, 3])


def test_cluster_purity_matches_a_per_cluster_count():
    rng = np.random.default_rng(3)
    cluster_ids = rng.integers(0, 12, 300)
    fine = rng.integers(0, 5, 300)
    expected = (
        sum(np.bincount(fine[cluster_ids == c]).max() for c in np.unique(cluster_ids)) / fine.size
    )
    assert cluster_purity(cluster_ids, fine) == pytest.approx(expected)
