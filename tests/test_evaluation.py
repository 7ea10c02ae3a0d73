"""Tests of magnet_jax.evaluation against brute-force NumPy references (and pml)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax.evaluation import (
    clustering_scores,
    knc_error,
    knc_predict,
    knn_error,
    knn_predict,
    knn_vote,
    nearest_neighbours,
    retrieval_metrics,
)

KNN_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


# ----------------------------------------------------------------- NumPy references


def np_sq_distances(query, reference):
    query = np.asarray(query, np.float64)
    reference = np.asarray(reference, np.float64)
    return ((query[:, None, :] - reference[None, :, :]) ** 2).sum(-1)


def np_order(query, reference, exclude_self=False):
    """Reference indices of every query sorted by (distance, index)."""
    distances = np_sq_distances(query, reference)
    if exclude_self:
        np.fill_diagonal(distances, np.inf)
    order = np.argsort(distances, axis=1, kind="stable")
    if exclude_self:
        order = order[:, :-1]
    return order, np.take_along_axis(distances, order, axis=1)


def np_retrieval(query, query_labels, reference=None, reference_labels=None, ks=(1, 2, 4, 8)):
    """pml's AccuracyCalculator definitions, one query at a time."""
    self_gallery = reference is None
    if self_gallery:
        reference, reference_labels = query, query_labels
    order, _ = np_order(query, reference, exclude_self=self_gallery)
    rows = []
    for i, label in enumerate(query_labels):
        relevant = int(np.sum(reference_labels == label)) - int(self_gallery)
        if relevant == 0:
            continue  # pml's "lone" query
        same = reference_labels[order[i]] == label
        first = same[:relevant]
        average_precision = (
            sum(np.cumsum(first)[j] / (j + 1) for j in range(relevant) if first[j]) / relevant
        )
        rows.append([same[0], first.mean(), average_precision] + [same[:k].any() for k in ks])
    names = list(KNN_METRICS) + [f"recall_at_{k}" for k in ks]
    if not rows:
        return {name: float("nan") for name in names}
    return dict(zip(names, np.mean(np.asarray(rows, np.float64), axis=0)))


def np_vote(neighbour_labels):
    """Majority vote; ties go to the class appearing first (nearest member)."""
    predictions = []
    for row in neighbour_labels:
        values, first, counts = np.unique(row, return_index=True, return_counts=True)
        best = counts == counts.max()
        predictions.append(values[best][np.argmin(first[best])])
    return np.asarray(predictions)


def np_knc(embeddings, centroids, valid, sigma2, num_nearest):
    num_classes, num_slots, dim = centroids.shape
    flat = centroids.reshape(-1, dim)
    distances = np_sq_distances(embeddings, flat)
    distances[:, ~valid.reshape(-1)] = np.inf
    predictions = []
    for row in distances:
        nearest = np.argsort(row, kind="stable")[: min(num_nearest, int(valid.sum()))]
        scores = np.zeros(num_classes)
        for cluster in nearest:
            scores[cluster // num_slots] += np.exp(-row[cluster] / (2 * sigma2))
        predictions.append(np.argmax(scores))
    return np.asarray(predictions)


def gaussian_classes(rng, num, dim, num_classes, spread=1.0):
    centres = rng.standard_normal((num_classes, dim)) * spread
    labels = rng.integers(0, num_classes, num)
    points = centres[labels] + rng.standard_normal((num, dim))
    return points.astype(np.float32), labels


def assert_metrics_close(actual, expected, atol=1e-6):
    assert set(expected) <= set(actual)
    for name, value in expected.items():
        if np.isnan(value):
            assert np.isnan(actual[name]), name
        else:
            np.testing.assert_allclose(actual[name], value, atol=atol, err_msg=name)


# ----------------------------------------------------------------- nearest_neighbours


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("reference_chunk_size", [None, 5])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_nearest_neighbours_matches_numpy(chunk_size, reference_chunk_size, exclude_self):
    rng = np.random.default_rng(0)
    query = rng.standard_normal((23, 6)).astype(np.float32)
    reference = query if exclude_self else rng.standard_normal((31, 6)).astype(np.float32)
    k = 9
    distances, indices = nearest_neighbours(
        query,
        reference,
        k=k,
        chunk_size=chunk_size,
        reference_chunk_size=reference_chunk_size,
        exclude_self=exclude_self,
    )
    order, expected = np_order(query, reference, exclude_self)
    assert distances.shape == indices.shape == (23, k)
    assert indices.dtype == jnp.int32
    np.testing.assert_array_equal(indices, order[:, :k])
    np.testing.assert_allclose(distances, expected[:, :k], rtol=1e-5, atol=1e-5)
    if exclude_self:
        assert not np.any(np.asarray(indices) == np.arange(23)[:, None])


def test_nearest_neighbours_ties_lower_index_first():
    # Integer coordinates: float32 distances are exact, so these ties are exact ties.
    reference = np.array([[2.0], [1.0], [-1.0], [1.0], [0.0], [-2.0], [1.0]], np.float32)
    query = np.array([[0.0], [1.0]], np.float32)
    for reference_chunk_size in (None, 2, 3):
        distances, indices = nearest_neighbours(
            query, reference, k=7, reference_chunk_size=reference_chunk_size
        )
        np.testing.assert_array_equal(indices, [[4, 1, 2, 3, 6, 0, 5], [1, 3, 6, 0, 4, 2, 5]])
        np.testing.assert_array_equal(distances, [[0, 1, 1, 1, 1, 4, 4], [0, 0, 0, 1, 1, 4, 9]])


def test_nearest_neighbours_exclude_self_with_duplicates():
    # Three identical points: each one's neighbours are the other two, never itself.
    points = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0]], np.float32)
    _, indices = nearest_neighbours(points, points, k=2, exclude_self=True, chunk_size=3)
    np.testing.assert_array_equal(indices, [[1, 2], [0, 2], [0, 1], [0, 1]])


@pytest.mark.parametrize(
    "rows, width, k, bin_size",
    [
        (5, 3000, 10, 32),  # one selection, the last bin mostly padding
        (4, 50000, 144, 32),  # the maxima's top-k selects again
        (3, 5000, 5, 4),  # several levels on both sides
        (3, 100, 100, 8),  # k = width: plain top_k
        (2, 20, 10, 4),  # fewer bins than k: plain top_k
        (2, 4096, 3, 1024),  # candidates almost the whole row
    ],
)
def test_select_top_k_is_lax_top_k(rows, width, k, bin_size):
    # Integer keys with many exact ties, and -inf columns (the padding of a reference).
    from magnet_jax.evaluation import _select_top_k

    rng = np.random.default_rng(width)
    x = rng.integers(0, 40, (rows, width)).astype(np.float32)
    x[:, -3:] = -np.inf
    x[0, :] = 7.0  # a row of nothing but ties
    # A row whose top k lie in k different bins, each a bin's maximum, tied with the
    # maxima of other bins: the k-th key equals the k-th bin maximum.
    x[1, :] = 0.0
    x[1, ::bin_size] = 1.0
    keys, indices = jax.jit(_select_top_k, static_argnums=(1, 2))(x, k, bin_size)
    expected_keys, expected_indices = jax.lax.top_k(x, k)
    assert indices.dtype == expected_indices.dtype
    np.testing.assert_array_equal(keys, expected_keys)
    np.testing.assert_array_equal(indices, expected_indices)


def test_select_top_k_through_every_kernel(monkeypatch):
    """The GPU's top-k (forced here, bins of 2) gives the CPU path's results in
    nearest_neighbours (one block and a scan over reference chunks) and retrieval_metrics."""
    from magnet_jax import evaluation

    rng = np.random.default_rng(3)
    points, labels = gaussian_classes(rng, 90, 5, 30, spread=0.8)
    points = np.round(points * 2) / 2  # exact ties
    calls = dict(
        nn=lambda chunk: nearest_neighbours(
            points, points, k=5, exclude_self=True, reference_chunk_size=chunk
        ),
        metrics=lambda chunk: retrieval_metrics(
            points, labels, ks=(1, 2), reference_chunk_size=chunk, clustering=False
        ),
    )
    expected = {(name, c): call(c) for name, call in calls.items() for c in (None, 32)}
    widths = []

    def select_top_k(x, k):
        widths.append((k, x.shape[1]))
        return evaluation._select_top_k(x, k, 2)

    monkeypatch.setattr(evaluation, "_top_k", select_top_k)
    evaluation._compiled.cache_clear()
    try:
        for (name, chunk), value in expected.items():
            actual = calls[name](chunk)
            if name == "nn":
                np.testing.assert_array_equal(actual[1], value[1])
                np.testing.assert_array_equal(actual[0], value[0])
            else:
                assert actual == value
    finally:
        evaluation._compiled.cache_clear()
    # Every call really selected: more bins than k, fewer candidates than columns.
    assert {width for _, width in widths} == {90, 32}
    assert all(k < -(-width // 2) and k * 2 < width for k, width in widths)


def test_top_k_is_plain_on_cpu():
    from magnet_jax.evaluation import _top_k

    text = jax.jit(lambda x: _top_k(x, 144)).lower(jnp.ones((2, 4096))).as_text()
    assert "gather" not in text and "top_k" in text


def test_non_finite_embeddings_are_named_not_ranked():
    from magnet_jax.finite import NonFiniteError

    x = np.zeros((6, 3), np.float32)
    x[[1, 4], 2] = [np.nan, np.inf]
    labels = np.arange(6) % 2
    centroids = np.zeros((2, 2, 3), np.float32)
    for call in (
        lambda: nearest_neighbours(x, np.zeros((4, 3), np.float32), k=1),
        lambda: nearest_neighbours(np.zeros((4, 3), np.float32), x, k=1),
        lambda: retrieval_metrics(x, labels, clustering=False),
        lambda: knc_predict(x, centroids=centroids, sigma2=1.0),
        lambda: knn_predict(x, x, labels, k=1),
    ):
        with pytest.raises(NonFiniteError, match=r"2 of 6 rows \(rows 1, 4\)"):
            call()


def test_nearest_neighbours_validation():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        nearest_neighbours(x, np.zeros((5, 2)), k=1)
    with pytest.raises(ValueError, match="k must"):
        nearest_neighbours(x, x, k=4, exclude_self=True)
    with pytest.raises(ValueError, match="exclude_self"):
        nearest_neighbours(x, np.zeros((5, 3)), k=1, exclude_self=True)
    with pytest.raises(ValueError, match="query must be"):
        nearest_neighbours(np.zeros(3), x, k=1)
    with pytest.raises(ValueError, match="chunk_size"):
        nearest_neighbours(x, x, k=1, chunk_size=0)


def test_nearest_neighbours_bf16_inputs_use_float32():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((10, 4)), jnp.bfloat16)
    distances, _ = nearest_neighbours(x, x, k=2)
    assert distances.dtype == jnp.float32


# ----------------------------------------------------------------- knn_predict


def test_knn_predict_k1_matches_sklearn():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(2)
    reference, reference_labels = gaussian_classes(rng, 200, 8, 5)
    query, query_labels = gaussian_classes(rng, 77, 8, 5)
    expected = (
        KNeighborsClassifier(n_neighbors=1, algorithm="brute")
        .fit(reference, reference_labels)
        .predict(query)
    )
    predictions = knn_predict(query, reference, reference_labels, k=1, chunk_size=16)
    assert predictions.dtype == jnp.int32
    np.testing.assert_array_equal(predictions, expected)
    error = knn_error(query, query_labels, reference, reference_labels, k=1)
    assert error == pytest.approx(np.mean(expected != query_labels))


@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_predict_k5_majority_vote(exclude_self):
    rng = np.random.default_rng(3)
    reference, reference_labels = gaussian_classes(rng, 150, 4, 6, spread=0.7)
    query = reference if exclude_self else gaussian_classes(rng, 60, 4, 6, spread=0.7)[0]
    order, _ = np_order(query, reference, exclude_self)
    expected = np_vote(reference_labels[order[:, :5]])
    predictions = knn_predict(
        query, reference, reference_labels, k=5, chunk_size=7, exclude_self=exclude_self
    )
    np.testing.assert_array_equal(predictions, expected)


def test_knn_predict_tie_goes_to_nearest_member():
    reference = np.array([[0.0], [1.0], [2.0], [3.0]], np.float32)
    labels = np.array([3, 1, 1, 3])
    # Neighbours of 0.1: 0 (class 3), 1 (class 1), 2 (class 1), 3 (class 3): 2 votes each,
    # class 3 has the nearest member.
    assert knn_predict(np.array([[0.1]]), reference, labels, k=4).tolist() == [3]
    assert knn_predict(np.array([[2.9]]), reference, labels, k=4).tolist() == [3]
    assert knn_predict(np.array([[1.2]]), reference, labels, k=4).tolist() == [1]
    assert knn_predict(np.array([[0.1]]), reference, labels, k=3).tolist() == [1]


def test_knn_predict_validation():
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="reference_labels"):
        knn_predict(x, x, np.zeros(3, int))
    with pytest.raises(ValueError, match="integers"):
        knn_predict(x, x, np.zeros(4))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        knn_predict(x, x, np.array([0, 1, 2, 0]), k=3, num_classes=2)


# ----------------------------------------------------------------- knc_predict


def random_index(rng, num_classes, num_slots, dim, invalid_fraction=0.3):
    centroids = rng.standard_normal((num_classes, num_slots, dim)).astype(np.float32)
    valid = rng.random((num_classes, num_slots)) > invalid_fraction
    valid[:, 0] = True
    return centroids, valid


@pytest.mark.parametrize("num_nearest", [1, 5, 16, 1000])
@pytest.mark.parametrize("chunk_size", [1, 7, 500])
def test_knc_predict_matches_numpy(num_nearest, chunk_size):
    rng = np.random.default_rng(4)
    centroids, valid = random_index(rng, 6, 4, 5)
    embeddings = rng.standard_normal((40, 5)).astype(np.float32)
    sigma2 = 0.8
    expected = np_knc(embeddings, centroids, valid, sigma2, num_nearest)
    predictions = knc_predict(
        embeddings,
        centroids=centroids,
        valid=valid,
        sigma2=sigma2,
        num_nearest_clusters=num_nearest,
        chunk_size=chunk_size,
    )
    assert predictions.dtype == jnp.int32 and predictions.shape == (40,)
    np.testing.assert_array_equal(predictions, expected)


def test_knc_predict_far_queries_do_not_underflow():
    # exp(-d/2σ²) underflows to 0 for every cluster here; subtracting the nearest distance
    # keeps the rule well defined: two class-1 clusters slightly farther than the one
    # class-0 cluster outvote it.
    centroids = np.zeros((2, 2, 2), np.float32)
    centroids[0, 0] = [100.0, 0.0]
    centroids[1] = [[100.0, 0.5], [100.0, -0.5]]
    valid = np.array([[True, False], [True, True]])
    query = np.array([[0.0, 0.0]], np.float32)
    assert knc_predict(query, centroids=centroids, valid=valid, sigma2=1.0).tolist() == [1]


def test_knc_one_cluster_per_class_is_nearest_class_mean():
    rng = np.random.default_rng(5)
    embeddings, labels = gaussian_classes(rng, 300, 6, 7)
    means = np.stack([embeddings[labels == c].mean(0) for c in range(7)])
    nearest_mean = np.argmin(np_sq_distances(embeddings, means), axis=1)
    for num_nearest in (7, 128):
        predictions = knc_predict(
            embeddings,
            centroids=means[:, None, :],
            sigma2=2.5,
            num_nearest_clusters=num_nearest,
            chunk_size=64,
        )
        np.testing.assert_array_equal(predictions, nearest_mean)


def test_knc_invalid_clusters_never_win():
    centroids = np.array([[[0.0, 0.0], [9.0, 9.0]], [[5.0, 5.0], [0.0, 0.1]]], np.float32)
    # Class 1's slot 1 sits on top of the queries but is empty.
    valid = np.array([[True, True], [True, False]])
    queries = np.array([[0.0, 0.1], [0.1, 0.1], [2.4, 2.4]], np.float32)
    for num_nearest in (1, 2, 4):
        predictions = knc_predict(
            queries, centroids=centroids, valid=valid, sigma2=1.0, num_nearest_clusters=num_nearest
        )
        assert predictions.tolist() == [0, 0, 0]
    # Even with stale garbage (NaN) in an invalid slot.
    centroids[1, 1] = np.nan
    predictions = knc_predict(queries, centroids=centroids, valid=valid, sigma2=1.0)
    assert predictions.tolist() == [0, 0, 0]


def test_knc_duck_typed_index_and_overrides():
    rng = np.random.default_rng(6)
    centroids, valid = random_index(rng, 5, 3, 4)
    index = types.SimpleNamespace(
        centroids=jnp.asarray(centroids), valid=jnp.asarray(valid), variance=jnp.float32(0.5)
    )
    embeddings = rng.standard_normal((30, 4)).astype(np.float32)
    expected = np_knc(embeddings, centroids, valid, 0.5, 4)
    np.testing.assert_array_equal(knc_predict(embeddings, index, num_nearest_clusters=4), expected)
    np.testing.assert_array_equal(
        knc_predict(embeddings, index, sigma2=3.0, num_nearest_clusters=4),
        np_knc(embeddings, centroids, valid, 3.0, 4),
    )
    labels = rng.integers(0, 5, 30)
    assert knc_error(embeddings, labels, index, num_nearest_clusters=4) == pytest.approx(
        np.mean(expected != labels)
    )


def test_knc_under_jit_matches_eager():
    rng = np.random.default_rng(7)
    centroids, valid = random_index(rng, 4, 3, 3)
    embeddings = rng.standard_normal((20, 3)).astype(np.float32)

    @jax.jit
    def predict(x, c, v, s):
        return knc_predict(x, centroids=c, valid=v, sigma2=s, num_nearest_clusters=5, chunk_size=8)

    np.testing.assert_array_equal(
        predict(embeddings, centroids, valid, jnp.float32(0.7)),
        knc_predict(
            embeddings,
            centroids=centroids,
            valid=valid,
            sigma2=0.7,
            num_nearest_clusters=5,
            chunk_size=8,
        ),
    )


def test_knc_validation():
    centroids = np.zeros((3, 2, 4), np.float32)
    x = np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match="sigma2"):
        knc_predict(x, centroids=centroids)
    with pytest.raises(ValueError, match="centroids"):
        knc_predict(x, sigma2=1.0)
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        knc_predict(np.zeros((5, 3)), centroids=centroids, sigma2=1.0)
    with pytest.raises(ValueError, match="valid must be"):
        knc_predict(x, centroids=centroids, valid=np.ones((3, 3), bool), sigma2=1.0)
    with pytest.raises(ValueError, match="no True"):
        knc_predict(x, centroids=centroids, valid=np.zeros((3, 2), bool), sigma2=1.0)
    with pytest.raises(ValueError, match="num_nearest_clusters"):
        knc_predict(x, centroids=centroids, sigma2=1.0, num_nearest_clusters=0)
    with pytest.raises(ValueError, match="sigma2 must be > 0"):
        knc_predict(x, centroids=centroids, sigma2=0.0)


# ----------------------------------------------------------------- retrieval_metrics


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_retrieval_self_gallery_matches_numpy(chunk_size):
    rng = np.random.default_rng(8)
    points, labels = gaussian_classes(rng, 90, 5, 6, spread=0.8)
    labels[:2] = [17, 23]  # two singleton classes: R = 0, left out like pml's lone queries
    expected = np_retrieval(points, labels, ks=(1, 3, 200))
    for reference_chunk_size in (None, 11):
        metrics = retrieval_metrics(
            points,
            labels,
            ks=(1, 3, 200),
            chunk_size=chunk_size,
            reference_chunk_size=reference_chunk_size,
            clustering=False,
        )
        assert_metrics_close(metrics, expected)
        assert "nmi" not in metrics


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_retrieval_separate_gallery_matches_numpy(chunk_size):
    rng = np.random.default_rng(9)
    reference, reference_labels = gaussian_classes(rng, 70, 5, 6, spread=0.8)
    query, query_labels = gaussian_classes(rng, 40, 5, 8, spread=0.8)  # 6, 7: absent
    assert np.isin([6, 7], query_labels).all()
    expected = np_retrieval(query, query_labels, reference, reference_labels)
    metrics = retrieval_metrics(
        query, query_labels, reference, reference_labels, chunk_size=chunk_size, clustering=False
    )
    assert_metrics_close(metrics, expected)


def test_retrieval_hand_made_ties_and_lone_queries():
    # 1-D, integer positions: exact distance ties, broken by the lower gallery index.
    gallery = np.array([[1.0], [-1.0], [3.0], [4.0]], np.float32)
    gallery_labels = np.array([5, 7, 7, 5])
    query = np.array([[0.0], [10.0]], np.float32)
    query_labels = np.array([7, 9])  # class 9 is absent from the gallery: left out
    metrics = retrieval_metrics(
        query, query_labels, gallery, gallery_labels, ks=(1, 2), clustering=False
    )
    # Query 0: neighbours by (distance, index): 0 (5), 1 (7), 2 (7), 3 (5); R = 2.
    assert metrics["precision_at_1"] == 0.0
    assert metrics["r_precision"] == 0.5
    assert metrics["mean_average_precision_at_r"] == pytest.approx(0.25)  # (1/2)/2
    assert metrics["recall_at_1"] == 0.0 and metrics["recall_at_2"] == 1.0
    # All queries lone: NaN, like pml.
    nan_metrics = retrieval_metrics(
        query, np.array([8, 9]), gallery, gallery_labels, clustering=False
    )
    assert all(np.isnan(nan_metrics[name]) for name in KNN_METRICS)


def test_retrieval_self_gallery_singletons_and_duplicates():
    points = np.array([[0.0], [0.0], [0.0], [2.0], [5.0]], np.float32)
    labels = np.array([1, 1, 2, 2, 3])  # class 3 is a singleton: left out
    metrics = retrieval_metrics(points, labels, ks=(1,), clustering=False)
    assert_metrics_close(metrics, np_retrieval(points, labels, ks=(1,)))
    # Query 0: others by (distance, index): 1 (1), 2 (2) -> P@1 1, R=1, AP 1.
    # Query 1: 0 (1) -> 1. Query 2: 0 (1), 1 (1), 3 (2); R=1 -> 0. Query 3: 0, 1, 2 -> 0.
    assert metrics["precision_at_1"] == pytest.approx(0.5)
    assert metrics["mean_average_precision_at_r"] == pytest.approx(0.5)


def test_retrieval_validation():
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="together"):
        retrieval_metrics(x, np.zeros(4, int), reference=x)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        retrieval_metrics(x, np.zeros(3, int))
    with pytest.raises(ValueError, match="integers"):
        retrieval_metrics(x, np.zeros(4))
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(x, np.zeros(4, int), ks=(0,))


def test_clustering_scores_separated_classes():
    rng = np.random.default_rng(10)
    points, labels = gaussian_classes(rng, 120, 4, 4, spread=30.0)
    scores = clustering_scores(points, labels * 3 + 1)
    assert scores["nmi"] == pytest.approx(1.0) and scores["ami"] == pytest.approx(1.0)
    metrics = retrieval_metrics(points, labels, key=jax.random.key(3))
    assert metrics["nmi"] == pytest.approx(1.0) and metrics["ami"] == pytest.approx(1.0)


# ----------------------------------------------------------------- against pml


def pml_accuracy(query, query_labels, reference=None, reference_labels=None, include=KNN_METRICS):
    pytest.importorskip("faiss")
    torch = pytest.importorskip("torch")
    accuracy = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    calculator = accuracy.AccuracyCalculator(
        include=include, k="max_bin_count", device=torch.device("cpu")
    )
    return calculator.get_accuracy(query, query_labels, reference, reference_labels)


def test_matches_pml_self_gallery():
    rng = np.random.default_rng(11)
    points, labels = gaussian_classes(rng, 400, 16, 12, spread=0.5)
    labels[:3] = [50, 51, 52]  # singleton classes
    expected = pml_accuracy(points, labels)
    metrics = retrieval_metrics(points, labels, clustering=False, chunk_size=64)
    assert_metrics_close(metrics, {n: expected[n] for n in KNN_METRICS}, atol=1e-6)


def test_matches_pml_separate_gallery():
    rng = np.random.default_rng(12)
    reference, reference_labels = gaussian_classes(rng, 300, 16, 10, spread=0.5)
    query, query_labels = gaussian_classes(rng, 150, 16, 12, spread=0.5)  # 10, 11 absent
    expected = pml_accuracy(query, query_labels, reference, reference_labels)
    metrics = retrieval_metrics(
        query, query_labels, reference, reference_labels, clustering=False, chunk_size=64
    )
    assert_metrics_close(metrics, {n: expected[n] for n in KNN_METRICS}, atol=1e-6)


def test_clustering_matches_pml_on_unambiguous_data():
    # Two far-apart blobs: both k-means (ours; pml's faiss, random init with its fixed
    # seed) find the classes exactly. With more blobs faiss' random init can put two
    # centres in one blob, so its NMI is not a fixed target.
    rng = np.random.default_rng(13)
    points, labels = gaussian_classes(rng, 300, 8, 2, spread=20.0)
    expected = pml_accuracy(points, labels, include=("NMI", "AMI"))
    scores = clustering_scores(points, labels)
    np.testing.assert_allclose(scores["nmi"], expected["NMI"], atol=1e-6)
    np.testing.assert_allclose(scores["ami"], expected["AMI"], atol=1e-6)


def test_knn_vote_of_given_neighbour_labels_matches_numpy():
    # The vote the benchmarks apply to the first k columns of one neighbour search.
    rng = np.random.default_rng(21)
    neighbour_labels = rng.integers(0, 4, size=(200, 6)).astype(np.int32)
    for k in (1, 2, 5, 6):
        np.testing.assert_array_equal(
            knn_vote(neighbour_labels[:, :k], num_classes=4), np_vote(neighbour_labels[:, :k])
        )
