"""The cluster index of the Magnet loss: clusters, impostors, tracked losses, σ².

A :class:`ClusterIndex` is a pytree holding everything the neighbourhood sampler needs
(paper §3.2): the centroids of up to K clusters inside each of C classes with a valid
mask (a class with fewer than K examples, or a clustering that leaves slots empty, has
invalid slots; the number of valid clusters may differ per class and change between
refreshes), the within-class cluster of every training example, a
:class:`~magnet_jax.sampling.GroupTable` over the flat cluster ids ``c * K + k`` for
O(D²) example draws, the precomputed impostor table (each cluster's nearest valid
clusters of other classes), the tracked loss of every cluster and the running σ².

Functions:

- :func:`index_from_assignments` builds an index from any clustering (k-means,
  agglomerative, oracle labels); :func:`build_index` clusters every class first
  (k-means, or agglomerative via :mod:`magnet_jax.clustering`).
- :func:`refresh_index` re-clusters new embeddings; :func:`recompute_centroids` keeps
  the assignments and moves the centroids (evaluation does this: stale centroids err
  more).
- :func:`record_batch` folds a batch's per-example losses and σ̂² into the index.
- :func:`sample_neighbourhood` draws a batch of M clusters × D examples: a seed cluster
  ∝ its tracked loss, its M − 1 impostors, D examples of each.

Every function is a pure function of explicit inputs. :func:`index_from_assignments`,
:func:`recompute_centroids`, :func:`record_batch` and :func:`sample_neighbourhood` run
under ``jax.jit`` (shapes, K, I, M and D static; value checks need concrete inputs and
are skipped under tracing), and the index can be donated.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax._checks import check_integer_dtype, check_integer_vector, concrete
from magnet_jax.sampling import GroupTable, group_table, sample_from_groups

__all__ = [
    "ClusterIndex",
    "NeighbourhoodBatch",
    "index_from_assignments",
    "build_index",
    "refresh_index",
    "recompute_centroids",
    "record_batch",
    "seed_probabilities",
    "sample_neighbourhood",
]

# A chunk of the impostor search holds at most this many squared distances (64 MiB of
# float32), so that the search never materialises the [C*K, C*K] distance matrix.
_IMPOSTOR_CHUNK_ELEMENTS = 2**24


@flax.struct.dataclass
class ClusterIndex:
    """Clusters of the training set inside each class, for neighbourhood sampling.

    C classes, K cluster slots per class, N training examples, d embedding dimensions,
    I impostors per cluster. A cluster is addressed by its flat id ``c * K + k``.

    Attributes:
        centroids: [C, K, d] float32, the mean embedding of each cluster's members at
            build time (or at the last :func:`recompute_centroids`); 0 for invalid slots.
        valid: [C, K] bool, True for non-empty clusters. Invalid clusters are never
            seeds, never impostors, and no example is ever drawn from them.
        assignments: [N] int32, the within-class cluster in ``[0, K)`` of every example.
        labels: [N] int32, the class of every example.
        cluster_table: a :class:`~magnet_jax.sampling.GroupTable` over the flat cluster
            ids, ``members`` [N], ``offsets`` [C*K], ``counts`` [C*K].
        impostors: [C*K, I] int32, for every cluster the flat ids of its I nearest valid
            clusters of other classes by squared centroid distance, nearest first. The
            rows of invalid clusters are filled the same way and never read.
        cluster_loss: [C, K] float32, the tracked loss of every cluster (positive at
            build for every valid cluster, 0 for invalid ones).
        variance: [] float32, the running σ²: the average of the batch σ̂² recorded by
            :func:`record_batch` (the training-set σ² of the clustering before any).
        num_batches: [] int32, the number of batches recorded into ``variance`` (carried
            over by :func:`refresh_index`).
    """

    centroids: jax.Array
    valid: jax.Array
    assignments: jax.Array
    labels: jax.Array
    cluster_table: GroupTable
    impostors: jax.Array
    cluster_loss: jax.Array
    variance: jax.Array
    num_batches: jax.Array

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return self.centroids.shape[0]

    @property
    def clusters_per_class(self) -> int:
        """K, the number of cluster slots per class."""
        return self.centroids.shape[1]

    @property
    def num_clusters(self) -> int:
        """C * K, the number of flat cluster ids."""
        return self.centroids.shape[0] * self.centroids.shape[1]

    @property
    def num_examples(self) -> int:
        """N, the number of training examples."""
        return self.assignments.shape[0]

    @property
    def num_impostors(self) -> int:
        """I, the number of impostors stored per cluster."""
        return self.impostors.shape[1]

    @property
    def counts(self) -> jax.Array:
        """[C, K] int32, the number of examples in each cluster (0 = empty)."""
        return self.cluster_table.counts.reshape(self.valid.shape)

    @property
    def cluster_ids(self) -> jax.Array:
        """[N] int32, the flat cluster id ``label * K + assignment`` of every example."""
        return self.labels * self.clusters_per_class + self.assignments


class NeighbourhoodBatch(NamedTuple):
    """A Magnet-loss batch: M clusters × D examples (the D of a cluster are adjacent).

    Attributes:
        indices: [M * D] int32, training-example indices.
        labels: [M * D] int32, the class of each example.
        cluster_ids: [M * D] int32, the flat cluster id ``c * K + k`` of each example;
            the first D belong to the seed cluster.
    """

    indices: jax.Array
    labels: jax.Array
    cluster_ids: jax.Array


# ---------------------------------------------------------------------------------------
# Input checks (eager, on concrete values; skipped for tracers).


def _check_embeddings(embeddings, num_examples: int | None = None) -> None:
    shape = np.shape(embeddings)
    if len(shape) != 2:
        raise ValueError(f"embeddings must have shape [N, d], got {shape}")
    if num_examples is not None and shape[0] != num_examples:
        raise ValueError(
            f"embeddings must have one row per training example of the index "
            f"(N={num_examples}), got shape {shape}"
        )
    if shape[0] < 1:
        raise ValueError(f"embeddings must hold at least one example, got shape {shape}")
    dtype = jnp.result_type(embeddings)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"embeddings must have a floating dtype, got {dtype}")


def _check_in_range(name: str, values: np.ndarray, upper: int, upper_name: str) -> None:
    if values.size and (values.min() < 0 or values.max() >= upper):
        raise ValueError(
            f"{name} must lie in [0, {upper_name}={upper}), got values in "
            f"[{values.min()}, {values.max()}]"
        )


def _check_impostors_available(
    flat_ids: np.ndarray, num_classes: int, clusters_per_class: int, num_impostors: int
) -> None:
    """Raises unless every class with a valid cluster has enough other-class clusters."""
    counts = np.bincount(flat_ids, minlength=num_classes * clusters_per_class)
    valid_per_class = (counts.reshape(num_classes, clusters_per_class) > 0).sum(axis=1)
    total_valid = int(valid_per_class.sum())
    available = np.where(valid_per_class > 0, total_valid - valid_per_class, np.iinfo(int).max)
    worst_class = int(np.argmin(available))
    if num_impostors > available[worst_class]:
        raise ValueError(
            f"num_impostors={num_impostors} exceeds the valid clusters of other classes "
            f"available to the clusters of class {worst_class}: it has "
            f"{valid_per_class[worst_class]} valid clusters and the other classes have "
            f"{available[worst_class]} ({total_valid} valid clusters in total over "
            f"{int((valid_per_class > 0).sum())} non-empty classes)"
        )


def _check_scalar(name: str, value, *, allow_zero: bool = False) -> None:
    scalar = concrete(value)
    if scalar is None:
        return
    if scalar.shape != ():
        raise ValueError(f"{name} must be a scalar, got shape {scalar.shape}")
    if not (np.isfinite(scalar) and (scalar > 0 or (allow_zero and scalar == 0))):
        requirement = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be {requirement} and finite, got {scalar}")


def _default_chunk_size(num_clusters: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, min(num_clusters, _IMPOSTOR_CHUNK_ELEMENTS // num_clusters))
    if chunk_size < 1:
        raise ValueError(f"impostor_chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


# ---------------------------------------------------------------------------------------
# Numerics (all jittable).


def _centroids_and_counts(
    embeddings: jax.Array, flat_ids: jax.Array, num_clusters: int
) -> tuple[jax.Array, jax.Array]:
    """[CK, d] float32 means of the members of each flat cluster (0 if empty), [CK] counts."""
    embeddings = embeddings.astype(jnp.float32)
    sums = jax.ops.segment_sum(embeddings, flat_ids, num_segments=num_clusters)
    counts = jax.ops.segment_sum(
        jnp.ones_like(flat_ids, jnp.int32), flat_ids, num_segments=num_clusters
    )
    centroids = sums / jnp.maximum(counts, 1)[:, None].astype(jnp.float32)
    return centroids, counts


def _nearest_other_class_clusters(
    centroids: jax.Array,
    valid: jax.Array,
    *,
    clusters_per_class: int,
    num_impostors: int,
    chunk_size: int,
) -> jax.Array:
    """[CK, I] int32 flat ids of each cluster's I nearest valid other-class clusters.

    Rows are processed ``chunk_size`` at a time (``lax.map`` with ``batch_size``), so the
    peak memory is a [chunk_size, CK] block of distances, never [CK, CK]. Where fewer
    than I candidates exist (only possible when the eager check was skipped under
    tracing) the missing entries are -1.
    """
    num_clusters = centroids.shape[0]
    if num_impostors == 0:
        return jnp.zeros((num_clusters, 0), jnp.int32)
    squared_norms = jnp.sum(centroids * centroids, axis=1)
    cluster_class = jnp.arange(num_clusters) // clusters_per_class

    def nearest(row):
        cross = jnp.dot(centroids, centroids[row], precision=jax.lax.Precision.HIGHEST)
        squared_distances = jnp.maximum(squared_norms[row] + squared_norms - 2.0 * cross, 0.0)
        candidate = valid & (cluster_class != cluster_class[row])
        scores = jnp.where(candidate, -squared_distances, -jnp.inf)
        best_scores, best_ids = jax.lax.top_k(scores, num_impostors)
        return jnp.where(best_scores > -jnp.inf, best_ids, -1).astype(jnp.int32)

    return jax.lax.map(nearest, jnp.arange(num_clusters), batch_size=chunk_size)


def _impostor_table(index: ClusterIndex, centroids: jax.Array, chunk_size: int) -> jax.Array:
    return _nearest_other_class_clusters(
        centroids.reshape(index.num_clusters, -1),
        index.valid.reshape(-1),
        clusters_per_class=index.clusters_per_class,
        num_impostors=index.num_impostors,
        chunk_size=chunk_size,
    )


def _build(
    embeddings: jax.Array,
    labels: jax.Array,
    assignments: jax.Array,
    initial_loss: jax.Array,
    variance: jax.Array | None,
    *,
    num_classes: int,
    clusters_per_class: int,
    num_impostors: int,
    chunk_size: int,
) -> ClusterIndex:
    num_clusters = num_classes * clusters_per_class
    labels = labels.astype(jnp.int32)
    assignments = assignments.astype(jnp.int32)
    flat_ids = labels * clusters_per_class + assignments
    cluster_table = group_table(flat_ids, num_groups=num_clusters)
    centroids, counts = _centroids_and_counts(embeddings, flat_ids, num_clusters)
    valid = counts > 0
    impostors = _nearest_other_class_clusters(
        centroids,
        valid,
        clusters_per_class=clusters_per_class,
        num_impostors=num_impostors,
        chunk_size=chunk_size,
    )
    if variance is None:
        # The training-set σ² of this clustering (eq. 4 with the index centroids), the
        # best estimate until a batch σ̂² is recorded.
        residuals = embeddings.astype(jnp.float32) - centroids[flat_ids]
        num_examples = embeddings.shape[0]
        variance = jnp.sum(residuals * residuals) / max(num_examples - 1, 1)
    cluster_loss = jnp.where(valid, jnp.asarray(initial_loss, jnp.float32), 0.0)
    return ClusterIndex(
        centroids=centroids.reshape(num_classes, clusters_per_class, -1),
        valid=valid.reshape(num_classes, clusters_per_class),
        assignments=assignments,
        labels=labels,
        cluster_table=cluster_table,
        impostors=impostors,
        cluster_loss=cluster_loss.reshape(num_classes, clusters_per_class),
        variance=jnp.asarray(variance, jnp.float32),
        num_batches=jnp.zeros((), jnp.int32),
    )


_build_jit = jax.jit(
    _build, static_argnames=("num_classes", "clusters_per_class", "num_impostors", "chunk_size")
)


# ---------------------------------------------------------------------------------------
# Public API.


def index_from_assignments(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    assignments: jax.typing.ArrayLike,
    *,
    num_classes: int,
    clusters_per_class: int,
    num_impostors: int,
    initial_loss: float | jax.typing.ArrayLike = 1.0,
    variance: float | jax.typing.ArrayLike | None = None,
    impostor_chunk_size: int | None = None,
) -> ClusterIndex:
    """Builds a :class:`ClusterIndex` from a given clustering inside each class.

    The clustering may come from anything (k-means, agglomerative, fixed "oracle" modes);
    cluster ``(c, k)`` is valid iff some example has label c and assignment k, so the
    number of valid clusters may differ per class. Centroids are the means of the
    members' embeddings; the impostor table is searched in row chunks.

    Args:
        embeddings: [N, d] float, the embeddings of the training set.
        labels: [N] int, the class of every example, in ``[0, num_classes)``.
        assignments: [N] int, the within-class cluster of every example, in
            ``[0, clusters_per_class)``.
        num_classes: C >= 1 (static).
        clusters_per_class: K >= 1, cluster slots per class (static).
        num_impostors: I >= 0, impostors stored per cluster (static); a batch of M
            clusters needs ``I >= M - 1``.
        initial_loss: the tracked loss every valid cluster starts with (> 0, so that every
            cluster can be a seed before it has been seen; its scale does not matter).
        variance: the initial σ² ([] >= 0); None computes the training-set σ² of this
            clustering, ``Σ ‖r_i − μ(r_i)‖² / (N − 1)``.
        impostor_chunk_size: rows of the impostor search done at once; None picks the
            largest chunk whose [chunk, C*K] distance block has at most 2**24 entries.

    Returns:
        The :class:`ClusterIndex`, with ``num_batches == 0``.

    Raises:
        ValueError: if shapes or dtypes disagree, labels or assignments are out of
            range, ``clusters_per_class < 1``, ``num_impostors < 0``, ``initial_loss`` is not
            positive, ``variance`` is negative, or ``num_impostors`` exceeds the number of
            valid other-class clusters available to some class (the message names it).
            Value checks run on concrete inputs only; under ``jax.jit`` impostors that do
            not exist are -1.

    Example:
        >>> index = index_from_assignments(
        ...     embeddings, labels, assignments,
        ...     num_classes=10, clusters_per_class=4, num_impostors=11)
        >>> batch = sample_neighbourhood(
        ...     index, key, clusters_per_batch=12, examples_per_cluster=4)
    """
    _check_embeddings(embeddings)
    num_examples = np.shape(embeddings)[0]
    check_integer_vector("labels", labels, num_examples)
    check_integer_vector("assignments", assignments, num_examples)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if clusters_per_class < 1:
        raise ValueError(f"clusters_per_class must be >= 1, got {clusters_per_class}")
    if num_impostors < 0:
        raise ValueError(f"num_impostors must be >= 0, got {num_impostors}")
    _check_scalar("initial_loss", initial_loss)
    if variance is not None:
        # σ² = 0 happens (every cluster a single point); it only needs to be a number.
        _check_scalar("variance", variance, allow_zero=True)
    concrete_labels = concrete(labels)
    concrete_assignments = concrete(assignments)
    if concrete_labels is not None:
        _check_in_range("labels", concrete_labels, num_classes, "num_classes")
    if concrete_assignments is not None:
        _check_in_range(
            "assignments", concrete_assignments, clusters_per_class, "clusters_per_class"
        )
    if concrete_labels is not None and concrete_assignments is not None:
        flat_ids = concrete_labels.astype(np.int64) * clusters_per_class + concrete_assignments
        _check_impostors_available(flat_ids, num_classes, clusters_per_class, num_impostors)
    chunk_size = _default_chunk_size(num_classes * clusters_per_class, impostor_chunk_size)
    return _build_jit(
        jnp.asarray(embeddings),
        jnp.asarray(labels),
        jnp.asarray(assignments),
        jnp.asarray(initial_loss, jnp.float32),
        None if variance is None else jnp.asarray(variance, jnp.float32),
        num_classes=num_classes,
        clusters_per_class=clusters_per_class,
        num_impostors=num_impostors,
        chunk_size=chunk_size,
    )


def build_index(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    clusters_per_class: int,
    num_impostors: int,
    key: jax.Array,
    num_classes: int | None = None,
    max_iterations: int = 100,
    tolerance: float = 1e-4,
    num_restarts: int = 1,
    initial_loss: float | jax.typing.ArrayLike = 1.0,
    variance: float | jax.typing.ArrayLike | None = None,
    impostor_chunk_size: int | None = None,
    clustering: str = "kmeans",
    linkage: str = "ward",
    distance_threshold: float | None = None,
    max_points_per_class: int = 1000,
    clusterer=None,
    initial_centroids: jax.typing.ArrayLike | None = None,
    initial_valid: jax.typing.ArrayLike | None = None,
) -> ClusterIndex:
    """Runs k-means (k-means++ init) inside every class and builds the index from it.

    With ``clustering="agglomerative"`` the clusters come from
    :func:`magnet_jax.clustering.agglomerative_per_class` instead (at most K per class,
    the number may differ per class; ``linkage``, ``distance_threshold`` and
    ``max_points_per_class`` are its options and are ignored by k-means). A threshold
    cut then gives every class at least ``ceil(num_impostors / (C' - 1))`` clusters (C'
    the classes with examples), so that every cluster has its impostors.

    Centroids are the means of the final assignments (what k-means converges to), so
    the index is exactly :func:`index_from_assignments` of the k-means assignments.

    Args:
        embeddings: [N, d] float, the embeddings of the whole training set.
        labels: [N] int, class labels in ``[0, num_classes)``.
        clusters_per_class: K >= 1 (static).
        num_impostors: I >= 0 impostors per cluster (static), ``>= M - 1`` for batches
            of M clusters.
        key: PRNG key for the k-means++ initialisation.
        num_classes: C (static); None takes ``max(labels) + 1`` (needs concrete labels).
        max_iterations, tolerance, num_restarts: passed to
            :func:`magnet_jax.kmeans.kmeans_per_class`.
        initial_loss, variance, impostor_chunk_size: as in
            :func:`index_from_assignments`.
        clustering: ``"kmeans"`` (default) or ``"agglomerative"``.
        linkage, distance_threshold, max_points_per_class: agglomerative options, see
            :func:`magnet_jax.clustering.cluster_per_class`.
        clusterer: a :class:`magnet_jax.clustering.KMeans` or
            :class:`~magnet_jax.clustering.Agglomerative` value; when given, it replaces
            ``clustering`` and the seven options above (which must then be left alone).
        initial_centroids, initial_valid: k-means only: ``[C, K, d]`` centroids and
            ``[C, K]`` valid slots that Lloyd starts from instead of k-means++ (a warm
            start; ``num_restarts`` must be 1), see
            :func:`magnet_jax.kmeans.kmeans_per_class`.

    Returns:
        The :class:`ClusterIndex`.

    Raises:
        ValueError: as :func:`index_from_assignments`, and when ``num_classes`` is None
            for traced labels.
    """
    # Imported here so that the index (and sampling from it) does not depend on k-means.
    from magnet_jax.clustering import KMeans, clusterer_from_options

    if clusterer is None:
        clusterer = clusterer_from_options(
            clustering,
            max_iterations=max_iterations,
            tolerance=tolerance,
            num_restarts=num_restarts,
            linkage=linkage,
            distance_threshold=distance_threshold,
            max_points_per_class=max_points_per_class,
        )
    _check_embeddings(embeddings)
    check_integer_vector("labels", labels, np.shape(embeddings)[0])
    if clusters_per_class < 1:
        raise ValueError(f"clusters_per_class must be >= 1, got {clusters_per_class}")
    if num_classes is None:
        concrete_labels = concrete(labels)
        if concrete_labels is None:
            raise ValueError("num_classes must be given when labels are traced")
        num_classes = int(concrete_labels.max()) + 1
    # A clustering that may leave slots empty (agglomerative) must still give every class
    # enough clusters for every cluster to have its impostors; k-means ignores this.
    min_clusters = 1
    concrete_labels = concrete(labels)
    if concrete_labels is not None:
        present = int(np.count_nonzero(np.bincount(concrete_labels, minlength=num_classes)))
        if present > 1:
            min_clusters = max(1, min(clusters_per_class, -(-num_impostors // (present - 1))))
    warm_start = {}
    if initial_centroids is not None or initial_valid is not None:
        if not isinstance(clusterer, KMeans):
            raise ValueError(
                f"a warm start (initial centroids) applies to k-means only, not to the "
                f"{clusterer.name} clustering"
            )
        warm_start = {"initial_centroids": initial_centroids, "initial_valid": initial_valid}
    result = clusterer(
        embeddings,
        labels,
        clusters_per_class=clusters_per_class,
        key=key,
        num_classes=num_classes,
        min_clusters=min_clusters,
        **warm_start,
    )
    return index_from_assignments(
        embeddings,
        labels,
        result.assignments,
        num_classes=num_classes,
        clusters_per_class=clusters_per_class,
        num_impostors=num_impostors,
        initial_loss=initial_loss,
        variance=variance,
        impostor_chunk_size=impostor_chunk_size,
    )


def refresh_index(
    index: ClusterIndex,
    embeddings: jax.typing.ArrayLike,
    *,
    key: jax.Array,
    max_iterations: int = 100,
    tolerance: float = 1e-4,
    num_restarts: int = 1,
    initial_loss: float | jax.typing.ArrayLike | None = None,
    inherit_cluster_loss: bool = False,
    impostor_chunk_size: int | None = None,
    clustering: str = "kmeans",
    linkage: str = "ward",
    distance_threshold: float | None = None,
    max_points_per_class: int = 1000,
    clusterer=None,
    warm_start: bool = False,
) -> ClusterIndex:
    """Re-clusters the training set from new embeddings (the periodic refresh).

    Carried over: ``labels``, the shapes (C, K, I), and the running σ² with its batch
    count (``variance``, ``num_batches``), which describe the training, not a
    clustering. New: centroids, assignments, valid mask (the number of valid clusters per
    class may change), cluster table and impostors.

    Cluster losses start afresh, because cluster identities do not survive a
    re-clustering: by default every valid cluster starts at ``initial_loss``, which
    defaults to the mean tracked loss of the old valid clusters (so new clusters are
    as likely seeds as an average old one, and the scale stays that of the recorded
    losses). With ``inherit_cluster_loss=True`` a new cluster instead starts at the mean,
    over its members, of their old clusters' tracked losses, which keeps the sampler
    focused on the regions that were hard.

    Args:
        index: the current :class:`ClusterIndex`.
        embeddings: [N, d] float, the new embeddings of the training set (row i is
            example i of ``index.labels``).
        key: PRNG key for k-means.
        max_iterations, tolerance, num_restarts: as in :func:`build_index`.
        initial_loss: the starting tracked loss (> 0), or None for the old mean.
        inherit_cluster_loss: start each cluster at its members' old mean loss instead.
        impostor_chunk_size: as in :func:`index_from_assignments`.
        clustering, linkage, distance_threshold, max_points_per_class, clusterer: as in
            :func:`build_index`.
        warm_start: k-means only: Lloyd starts from the index's centroids (its valid
            slots) instead of k-means++, so a slowly moving embedding needs few
            iterations; ``key`` is then unused and ``num_restarts`` must be 1.

    Returns:
        The refreshed :class:`ClusterIndex`.

    Raises:
        ValueError: if ``embeddings`` has not N rows, or as :func:`build_index` (e.g. the
            new clustering leaves too few valid clusters for ``num_impostors``).
    """
    _check_embeddings(embeddings, index.num_examples)
    if initial_loss is None:
        valid = index.valid
        old_mean = jnp.sum(jnp.where(valid, index.cluster_loss, 0.0)) / jnp.maximum(
            jnp.sum(valid), 1
        )
        # A run whose every recorded loss was 0 has no scale to keep.
        initial_loss = jnp.where(jnp.isfinite(old_mean) & (old_mean > 0), old_mean, 1.0)
    refreshed = build_index(
        embeddings,
        index.labels,
        clusters_per_class=index.clusters_per_class,
        num_impostors=index.num_impostors,
        key=key,
        num_classes=index.num_classes,
        max_iterations=max_iterations,
        tolerance=tolerance,
        num_restarts=num_restarts,
        initial_loss=initial_loss,
        variance=index.variance,
        impostor_chunk_size=impostor_chunk_size,
        clustering=clustering,
        linkage=linkage,
        distance_threshold=distance_threshold,
        max_points_per_class=max_points_per_class,
        clusterer=clusterer,
        initial_centroids=index.centroids if warm_start else None,
        initial_valid=index.valid if warm_start else None,
    )
    refreshed = refreshed.replace(num_batches=index.num_batches)
    if inherit_cluster_loss:
        refreshed = refreshed.replace(cluster_loss=_inherited_loss(index, refreshed))
    return refreshed


@jax.jit
def _inherited_loss(old: ClusterIndex, new: ClusterIndex) -> jax.Array:
    example_loss = old.cluster_loss.reshape(-1)[old.cluster_ids]
    sums = jax.ops.segment_sum(example_loss, new.cluster_ids, num_segments=new.num_clusters)
    counts = new.cluster_table.counts
    mean = sums / jnp.maximum(counts, 1).astype(jnp.float32)
    return jnp.where(counts > 0, mean, 0.0).reshape(new.valid.shape)


def recompute_centroids(
    index: ClusterIndex,
    embeddings: jax.typing.ArrayLike,
    *,
    impostor_chunk_size: int | None = None,
) -> ClusterIndex:
    """Moves the centroids to the current embeddings, keeping the assignments.

    Evaluation (kNC) should use this (or a refresh) rather than the centroids of the
    last refresh: stale centroids err more. The impostor table is recomputed for the new
    centroids; the valid mask, assignments, tracked losses and σ² are unchanged.
    Jittable.

    Args:
        index: a :class:`ClusterIndex`.
        embeddings: [N, d] float, the current embeddings of the training set.
        impostor_chunk_size: as in :func:`index_from_assignments`.

    Returns:
        The :class:`ClusterIndex` with new ``centroids`` [C, K, d] and ``impostors``.

    Raises:
        ValueError: if ``embeddings`` is not [N, d] with the index's N.
    """
    _check_embeddings(embeddings, index.num_examples)
    chunk_size = _default_chunk_size(index.num_clusters, impostor_chunk_size)
    return _recompute_centroids_jit(index, jnp.asarray(embeddings), chunk_size=chunk_size)


def _recompute_centroids(
    index: ClusterIndex, embeddings: jax.Array, *, chunk_size: int
) -> ClusterIndex:
    centroids, _ = _centroids_and_counts(embeddings, index.cluster_ids, index.num_clusters)
    centroids = centroids.reshape(index.centroids.shape[:2] + centroids.shape[1:])
    return index.replace(
        centroids=centroids, impostors=_impostor_table(index, centroids, chunk_size)
    )


_recompute_centroids_jit = jax.jit(_recompute_centroids, static_argnames=("chunk_size",))


def record_batch(
    index: ClusterIndex,
    cluster_ids: jax.typing.ArrayLike,
    losses: jax.typing.ArrayLike,
    variance: jax.typing.ArrayLike,
    *,
    momentum: float = 0.5,
    variance_momentum: float = 0.99,
) -> ClusterIndex:
    r"""Folds one batch's per-example losses and σ̂² into the index.

    For every valid cluster with examples in the batch, with :math:`\bar\ell` the mean
    loss of those examples (zero losses count as 0):

    .. math::
        L_{ck} \leftarrow m L_{ck} + (1 - m)\,\bar\ell_{ck}

    Clusters absent from the batch keep their loss. The running σ² is the plain mean of
    the recorded σ̂² over the first ``1 / (1 - variance_momentum)`` batches, then an
    exponential moving average with that momentum (a mean over the whole run would be
    dominated by the early embedding's scale). A non-finite σ̂² is ignored.
    Jittable; ids outside ``[0, C*K)`` (e.g. padding) and invalid clusters are ignored.

    Args:
        index: a :class:`ClusterIndex`.
        cluster_ids: [B] int, the flat cluster id ``c * K + k`` of every batch example.
        losses: [B] float, the per-example Magnet losses ℓ_i.
        variance: [] float, the batch σ̂².
        momentum: m in ``[0, 1)``, the weight of a cluster's old loss; 0 keeps only the
            latest batch (as the public implementations do).
        variance_momentum: in ``[0, 1)``, the momentum of the running σ².

    Returns:
        The :class:`ClusterIndex` with updated ``cluster_loss``, ``variance`` and
        ``num_batches``.

    Raises:
        ValueError: if ``cluster_ids`` and ``losses`` are not vectors of one length,
            ``variance`` is not a scalar, or a momentum is outside ``[0, 1)``.
    """
    id_shape, loss_shape = np.shape(cluster_ids), np.shape(losses)
    if len(id_shape) != 1 or id_shape != loss_shape:
        raise ValueError(
            f"cluster_ids and losses must be vectors of one length [B], got shapes "
            f"{id_shape} and {loss_shape}"
        )
    check_integer_dtype("cluster_ids", cluster_ids)
    if np.shape(variance) != ():
        raise ValueError(f"variance must be a scalar, got shape {np.shape(variance)}")
    for name, value in (("momentum", momentum), ("variance_momentum", variance_momentum)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {value}")
    return _record_batch_jit(
        index,
        jnp.asarray(cluster_ids),
        jnp.asarray(losses),
        jnp.asarray(variance),
        momentum=float(momentum),
        variance_momentum=float(variance_momentum),
    )


def _record_batch(
    index: ClusterIndex,
    cluster_ids: jax.Array,
    losses: jax.Array,
    variance: jax.Array,
    *,
    momentum: float,
    variance_momentum: float,
) -> ClusterIndex:
    num_clusters = index.num_clusters
    in_range = (cluster_ids >= 0) & (cluster_ids < num_clusters)
    safe_ids = jnp.where(in_range, cluster_ids, num_clusters)  # an extra, dropped segment
    losses = jnp.where(in_range, losses.astype(jnp.float32), 0.0)
    loss_sums = jax.ops.segment_sum(losses, safe_ids, num_segments=num_clusters + 1)
    seen_counts = jax.ops.segment_sum(
        in_range.astype(jnp.float32), safe_ids, num_segments=num_clusters + 1
    )
    loss_sums, seen_counts = loss_sums[:num_clusters], seen_counts[:num_clusters]
    seen = (seen_counts > 0) & index.valid.reshape(-1)
    batch_mean = loss_sums / jnp.maximum(seen_counts, 1.0)
    old_loss = index.cluster_loss.reshape(-1)
    new_loss = jnp.where(seen, momentum * old_loss + (1.0 - momentum) * batch_mean, old_loss)

    variance = variance.astype(jnp.float32)
    usable = jnp.isfinite(variance)
    weight = jnp.maximum(1.0 / (index.num_batches + 1).astype(jnp.float32), 1.0 - variance_momentum)
    running_variance = jnp.where(
        usable, index.variance + weight * (variance - index.variance), index.variance
    )
    return index.replace(
        cluster_loss=new_loss.reshape(index.cluster_loss.shape),
        variance=running_variance,
        num_batches=index.num_batches + usable.astype(jnp.int32),
    )


_record_batch_jit = jax.jit(_record_batch, static_argnames=("momentum", "variance_momentum"))


def seed_probabilities(index: ClusterIndex, *, seed_floor: float = 0.01) -> jax.Array:
    """[C*K] float32, the probability of every flat cluster to be the seed.

    Proportional to ``max(cluster_loss, seed_floor * mean valid cluster_loss)`` over
    valid clusters, 0 for invalid ones; uniform over the valid clusters when every
    tracked loss is 0. The floor keeps a cluster whose loss fell to 0 a seed with
    probability about ``seed_floor / num_valid``: clusters far from every other class
    are never drawn as impostors, so without it their loss would never be re-measured
    as the embedding moves. ``seed_floor=0`` gives the paper's rule exactly.

    Args:
        index: a :class:`ClusterIndex`.
        seed_floor: >= 0, the floor relative to the mean valid tracked loss.

    Returns:
        [C*K] float32 probabilities summing to 1.
    """
    return jax.nn.softmax(_seed_logits(index, seed_floor))


def _seed_logits(index: ClusterIndex, seed_floor: float) -> jax.Array:
    valid = index.valid.reshape(-1)
    loss = jnp.where(valid, jnp.maximum(index.cluster_loss.reshape(-1), 0.0), 0.0)
    mean_loss = jnp.sum(loss) / jnp.maximum(jnp.sum(valid), 1)
    weights = jnp.where(valid, jnp.maximum(loss, seed_floor * mean_loss), 0.0)
    weights = jnp.where(jnp.sum(weights) > 0, weights, valid.astype(jnp.float32))
    return jnp.where(weights > 0, jnp.log(jnp.where(weights > 0, weights, 1.0)), -jnp.inf)


def sample_neighbourhood(
    index: ClusterIndex,
    key: jax.Array,
    *,
    clusters_per_batch: int,
    examples_per_cluster: int,
    seed_floor: float = 0.01,
) -> NeighbourhoodBatch:
    """Draws a Magnet-loss batch: a seed cluster, its impostors, D examples of each.

    1. The seed cluster is drawn from the valid clusters with probability
       :func:`seed_probabilities` (∝ tracked loss, with a small floor).
    2. Its M − 1 nearest valid clusters of other classes (the first M − 1 columns of
       ``index.impostors``).
    3. D examples uniformly from each of the M clusters, without replacement when the
       cluster has at least D members, with replacement otherwise.

    Jittable and vmappable (M, D static); no host round trip.

    Args:
        index: a :class:`ClusterIndex`.
        key: a PRNG key.
        clusters_per_batch: M >= 1 (static), at most ``index.num_impostors + 1``.
        examples_per_cluster: D >= 1 (static).
        seed_floor: see :func:`seed_probabilities`.

    Returns:
        A :class:`NeighbourhoodBatch` of M * D examples, the seed's first.

    Raises:
        ValueError: if ``clusters_per_batch < 1``, ``clusters_per_batch - 1`` exceeds
            ``index.impostors.shape[1]``, ``examples_per_cluster < 1`` or
            ``seed_floor < 0``.

    Example:
        >>> batch = jax.jit(
        ...     sample_neighbourhood, static_argnames=("clusters_per_batch",
        ...     "examples_per_cluster"))(index, key, clusters_per_batch=12,
        ...     examples_per_cluster=4)
        >>> x, y = images[batch.indices], batch.labels
    """
    if clusters_per_batch < 1:
        raise ValueError(f"clusters_per_batch must be >= 1, got {clusters_per_batch}")
    if clusters_per_batch - 1 > index.num_impostors:
        raise ValueError(
            f"clusters_per_batch - 1 = {clusters_per_batch - 1} exceeds the impostors "
            f"stored per cluster, index.impostors.shape = {index.impostors.shape}; "
            f"build the index with num_impostors >= {clusters_per_batch - 1}"
        )
    if examples_per_cluster < 1:
        raise ValueError(f"examples_per_cluster must be >= 1, got {examples_per_cluster}")
    if not seed_floor >= 0:
        raise ValueError(f"seed_floor must be >= 0, got {seed_floor}")
    return _sample_neighbourhood(
        index,
        key,
        clusters_per_batch=clusters_per_batch,
        examples_per_cluster=examples_per_cluster,
        seed_floor=float(seed_floor),
    )


@partial(jax.jit, static_argnames=("clusters_per_batch", "examples_per_cluster", "seed_floor"))
def _sample_neighbourhood(
    index: ClusterIndex,
    key: jax.Array,
    *,
    clusters_per_batch: int,
    examples_per_cluster: int,
    seed_floor: float,
) -> NeighbourhoodBatch:
    seed_key, example_key = jax.random.split(key)
    seed = jax.random.categorical(seed_key, _seed_logits(index, seed_floor))
    clusters = jnp.concatenate(
        [seed[None].astype(jnp.int32), index.impostors[seed, : clusters_per_batch - 1]]
    )
    examples = sample_from_groups(
        index.cluster_table, clusters, example_key, per_group=examples_per_cluster
    )
    cluster_ids = jnp.repeat(clusters, examples_per_cluster, total_repeat_length=examples.size)
    return NeighbourhoodBatch(
        indices=examples.reshape(-1),
        labels=cluster_ids // index.clusters_per_class,
        cluster_ids=cluster_ids,
    )
