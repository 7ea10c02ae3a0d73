"""Clustering inside every class for the Magnet index: k-means or agglomerative.

The Magnet Loss is only as good as the clusters it pulls examples towards (measured in
benchmarks/README.md: from scratch, k-means clusters of an embedding match the true modes
of a class poorly, and the loss then destroys those modes). This module makes the clustering a choice:

- :class:`KMeans` and :class:`Agglomerative` are the clusterings as frozen values, which
  the index and the Magnet method take (``clusterer=``); calling one clusters every class.
- :func:`cluster_per_class` dispatches to k-means (:func:`magnet_jax.kmeans.kmeans_per_class`,
  on device, optionally best of n restarts by inertia) or to
  :func:`agglomerative_per_class`.
- :func:`agglomerative_per_class`: hierarchical clustering (Ward, average or single
  linkage) inside every class, cut either at a *relative* threshold (one setting works
  for every class and all along training, whatever the embedding's scale) or at a target
  count, with at most ``K`` clusters per class. The number of clusters may differ per
  class; the result keeps the static shape ``[C, K]`` with a valid mask.
- :func:`clustering_diagnostics`: valid clusters per class, inertia, and the purity of
  the clusters against a second labelling (the fine labels of a coarse-label dataset).

**The relative threshold** (``distance_threshold = τ``), per class:

- Ward: a merge is refused when it would add more than ``τ · SS`` to the within-cluster
  sum of squares, ``SS`` being the sum of squared distances of the class's clustered
  points to their mean; i.e. the cut is at the Ward height ``h = sqrt(2 τ SS)`` (scipy's
  Ward height is ``sqrt(2 ΔSS)``). τ is the share of the class's total variance that a
  split must explain: independent of the scale of the embedding, of the class size and
  of the subsample size. For orientation: the best split of one isotropic Gaussian
  explains ``2 / (π d)`` of its variance (0.32 in 2-D, 0.04 in 16-D), the split of two
  well separated equal modes nearly 1, the last split of m equal modes about 1/m.
- average / single linkage: the cut is at ``h = τ · median merge height`` of the class,
  i.e. a gap τ times the typical one (for single linkage the median edge of the minimum
  spanning tree). Scale-free too, but how the typical gap relates to the gaps between
  modes depends on the dimension and the density, so τ needs more tuning than Ward's.
  (A cut relative to the class's RMS radius cannot work for these linkages: in high
  dimension every pairwise distance is about √2 times the RMS radius, modes or not.)

The number of clusters of a class is ``1 + #{merges with height > h}``, capped at K
(linkage heights of Ward, average and single are monotone, so this is a cut of the tree).

**Cost.** Each class is clustered on a random subsample of at most
``max_points_per_class`` (S) of its members, on the host with SciPy
(``scipy.cluster.hierarchy.linkage``, O(S²) memory and O(S² d) time per class for the
distances, the Ward/average nearest-neighbour chain and the single-linkage MST).
Every example, in the subsample or not, then joins the cluster of its nearest subsampled
example of the same class (``assignment="neighbour"``, keeps elongated and spiral-shaped
clusters whole; O(N·S·d) in total) or of the nearest resulting centroid
(``assignment="centroid"``, O(N·K·d)). It runs once per refresh, never per step
(benchmarks/README.md has its timings against :func:`kmeans_per_class`).

Results are deterministic functions of the inputs and the key (exact resume).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.names import CLUSTERINGS, LINKAGES

__all__ = [
    "METHODS",
    "LINKAGES",
    "ClusteringResult",
    "Clusterer",
    "KMeans",
    "Agglomerative",
    "CLUSTERERS",
    "clusterer_from_options",
    "agglomerative_per_class",
    "cluster_per_class",
    "clustering_diagnostics",
    "cluster_purity",
]

METHODS = CLUSTERINGS  # the names of magnet_jax.names, one list
ASSIGNMENTS = ("neighbour", "centroid")


class ClusteringResult(NamedTuple):
    """A clustering inside every class, in the static shape of the index.

    Attributes:
        assignments: [N] int32, the cluster of every example within its class, in
            ``[0, K)``; always a valid slot of its class.
        valid: [C, K] bool, the non-empty slots (slots ``0 .. n_c - 1`` of class c).
        counts: [C, K] int32, members per cluster.
    """

    assignments: jax.Array
    valid: jax.Array
    counts: jax.Array


def _check_inputs(embeddings, labels, num_classes):
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or embeddings.shape[0] < 1:
        raise ValueError(f"embeddings must have shape [N, d] with N >= 1, got {embeddings.shape}")
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(
            f"labels must have shape [N] = ({embeddings.shape[0]},), got {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got a minimum of {labels.min()}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if labels.max() >= num_classes:
        raise ValueError(f"labels must be < num_classes={num_classes}, got {labels.max()}")
    return embeddings, labels.astype(np.int64), int(num_classes)


def _subsample(labels: np.ndarray, key: jax.Array, max_points: int) -> np.ndarray:
    """Indices of a uniform random subsample of at most ``max_points`` per class, grouped by
    class (ascending), in one vectorised pass: a random permutation, stably sorted by label,
    keeps the first ``max_points`` of each class."""
    order = np.asarray(jax.random.permutation(key, labels.shape[0]))
    order = order[np.argsort(labels[order], kind="stable")]
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(order.size) - starts
    return order[rank < max_points]


def _cut_count(heights: np.ndarray, threshold: float, min_clusters: int, max_clusters: int) -> int:
    return int(min(max_clusters, max(min_clusters, 1 + np.count_nonzero(heights > threshold))))


def _cluster_one_class(
    points: np.ndarray,
    *,
    max_clusters: int,
    linkage: str,
    distance_threshold: float | None,
    min_clusters: int,
) -> np.ndarray:
    """Labels in [0, n_clusters) of ``points`` [n, d] (float64), a cut of the hierarchy."""
    from scipy.cluster.hierarchy import fcluster
    from scipy.cluster.hierarchy import linkage as scipy_linkage

    num_points = points.shape[0]
    num_distinct = np.unique(points, axis=0).shape[0]
    limit = min(max_clusters, num_distinct)
    if num_points < 2 or limit < 2:
        return np.zeros(num_points, np.int64)
    tree = scipy_linkage(points, method=linkage, metric="euclidean")
    heights = tree[:, 2]
    if distance_threshold is None:
        count = limit
    else:
        if linkage == "ward":
            squares = float(np.sum((points - points.mean(axis=0)) ** 2))
            cut = math.sqrt(2.0 * distance_threshold * squares)
        else:
            cut = distance_threshold * float(np.median(heights))
        count = _cut_count(heights, cut, min_clusters, limit)
    if count < 2:
        return np.zeros(num_points, np.int64)
    return fcluster(tree, t=count, criterion="maxclust").astype(np.int64) - 1


def _relabel_by_size(labels: np.ndarray, num_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Renumbers clusters 0.. by decreasing size (ties: first occurrence); drops empties."""
    counts = np.bincount(labels, minlength=num_clusters)
    order = np.lexsort((np.arange(num_clusters), -counts))
    order = order[counts[order] > 0]
    new_id = np.full(num_clusters, -1, np.int64)
    new_id[order] = np.arange(order.size)
    return new_id[labels], counts[order]


def agglomerative_per_class(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    max_clusters: int,
    key: jax.Array,
    num_classes: int | None = None,
    linkage: str = "ward",
    distance_threshold: float | None = None,
    max_points_per_class: int = 1000,
    min_cluster_size: int = 1,
    assignment: str = "neighbour",
    min_clusters: int = 1,
) -> ClusteringResult:
    """Agglomerative clustering inside every class, at most ``max_clusters`` per class.

    See the module docstring for the exact meaning of ``distance_threshold`` and the cost.
    Runs on the host (SciPy); not jittable.

    Args:
        embeddings: [N, d] float, the embeddings.
        labels: [N] int, classes in ``[0, num_classes)``.
        max_clusters: K >= 1, the most clusters a class gets (the static slot count).
        key: PRNG key for the per-class subsample.
        num_classes: C; None takes ``max(labels) + 1``.
        linkage: ``"ward"`` (default), ``"average"`` or ``"single"``.
        distance_threshold: τ > 0, the relative cut (module docstring); None cuts every
            class into ``min(K, distinct points)`` clusters (a target count).
        max_points_per_class: S >= 2, the largest subsample clustered per class.
        min_cluster_size: clusters of the subsample with fewer members are dissolved and
            their points join the remaining clusters (useful with single linkage, which
            splits off outliers); the largest cluster of a class always stays.
        assignment: how every example joins a cluster: ``"neighbour"`` (the cluster of its
            nearest subsampled example of its class) or ``"centroid"`` (nearest centroid
            of the subsample's clusters).
        min_clusters: with a threshold, the fewest clusters a class is cut into (when it
            has that many distinct points); the index uses it so that every class has
            enough other-class clusters to fill a batch's impostors.

    Returns:
        A :class:`ClusteringResult`; cluster 0 of a class is its largest.

    Raises:
        ValueError: on bad shapes, labels, or options.

    Example:
        >>> result = agglomerative_per_class(
        ...     embeddings, labels, max_clusters=8, key=jax.random.key(0),
        ...     distance_threshold=0.1)
        >>> result.valid.sum(axis=1)  # clusters found in every class
    """
    embeddings, labels, num_classes = _check_inputs(embeddings, labels, num_classes)
    if max_clusters < 1:
        raise ValueError(f"max_clusters must be >= 1, got {max_clusters}")
    if linkage not in LINKAGES:
        raise ValueError(f"unknown linkage {linkage!r}; choose one of {', '.join(LINKAGES)}")
    if distance_threshold is not None and not (
        distance_threshold > 0 and math.isfinite(distance_threshold)
    ):
        raise ValueError(
            f"distance_threshold must be positive and finite, got {distance_threshold}"
        )
    if max_points_per_class < 2:
        raise ValueError(f"max_points_per_class must be >= 2, got {max_points_per_class}")
    if not 1 <= min_clusters <= max_clusters:
        raise ValueError(
            f"min_clusters must lie in [1, max_clusters={max_clusters}], got {min_clusters}"
        )
    if min_cluster_size < 1:
        raise ValueError(f"min_cluster_size must be >= 1, got {min_cluster_size}")
    if assignment not in ASSIGNMENTS:
        raise ValueError(
            f"unknown assignment {assignment!r}; choose one of {', '.join(ASSIGNMENTS)}"
        )

    points = embeddings.astype(np.float64)
    chosen = _subsample(labels, key, max_points_per_class)
    chosen_labels = labels[chosen]
    assignments = np.zeros(labels.shape[0], np.int64)
    counts = np.zeros((num_classes, max_clusters), np.int64)
    for c in np.unique(chosen_labels):
        sample = chosen[chosen_labels == c]
        members = np.flatnonzero(labels == c)
        sample_points = points[sample]
        sample_clusters = _cluster_one_class(
            sample_points,
            max_clusters=max_clusters,
            linkage=linkage,
            distance_threshold=distance_threshold,
            min_clusters=min_clusters,
        )
        sample_clusters, sizes = _relabel_by_size(sample_clusters, max_clusters)
        keep = (sizes >= min_cluster_size) | (np.arange(sizes.size) == 0)
        if not keep.all():
            kept = np.isin(sample_clusters, np.flatnonzero(keep))
            sample_points, sample_clusters = sample_points[kept], sample_clusters[kept]
        num_kept = int(keep.sum())
        centroids = np.stack(
            [sample_points[sample_clusters == j].mean(axis=0) for j in range(num_kept)]
        )
        references, reference_clusters = (
            (sample_points, sample_clusters)
            if assignment == "neighbour"
            else (centroids, np.arange(num_kept))
        )
        member_clusters = _nearest(points[members], references, reference_clusters)
        member_clusters, sizes = _relabel_by_size(member_clusters, max_clusters)
        assignments[members] = member_clusters
        counts[c, : sizes.size] = sizes
    return ClusteringResult(
        assignments=jnp.asarray(assignments, jnp.int32),
        valid=jnp.asarray(counts > 0),
        counts=jnp.asarray(counts, jnp.int32),
    )


def _nearest(
    queries: np.ndarray, references: np.ndarray, reference_labels: np.ndarray
) -> np.ndarray:
    """The label of the nearest reference row of every query row, in chunks of queries."""
    reference_norms = np.sum(references * references, axis=1)
    chunk = max(1, 2**22 // max(references.shape[0], 1))
    out = np.empty(queries.shape[0], np.int64)
    for start in range(0, queries.shape[0], chunk):
        block = queries[start : start + chunk]
        scores = reference_norms[None, :] - 2.0 * block @ references.T
        out[start : start + chunk] = reference_labels[np.argmin(scores, axis=1)]
    return out


def cluster_per_class(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    clusters_per_class: int,
    key: jax.Array,
    method: str = "kmeans",
    num_classes: int | None = None,
    max_iterations: int = 100,
    tolerance: float = 1e-4,
    num_restarts: int = 1,
    linkage: str = "ward",
    distance_threshold: float | None = None,
    max_points_per_class: int = 1000,
    min_cluster_size: int = 1,
    assignment: str = "neighbour",
    min_clusters: int = 1,
    initial_centroids: jax.typing.ArrayLike | None = None,
    initial_valid: jax.typing.ArrayLike | None = None,
) -> ClusteringResult:
    """Clusters every class into at most K clusters with the chosen method.

    Args:
        embeddings: [N, d] float.
        labels: [N] int, classes in ``[0, num_classes)``.
        clusters_per_class: K, the slots per class (the most clusters a class gets).
        key: PRNG key (k-means++ draws, or the agglomerative subsample).
        method: ``"kmeans"`` (exactly ``min(K, distinct points)`` clusters per class) or
            ``"agglomerative"`` (at most K, see :func:`agglomerative_per_class`).
        num_classes: C; None takes ``max(labels) + 1`` (concrete labels).
        max_iterations, tolerance, num_restarts: k-means only, see
            :func:`magnet_jax.kmeans.kmeans_per_class` (restarts: best of n by inertia,
            per class).
        linkage, distance_threshold, max_points_per_class, min_cluster_size, assignment,
            min_clusters: agglomerative only.
        initial_centroids, initial_valid: k-means only: ``[C, K, d]`` centroids and
            ``[C, K]`` valid slots to start Lloyd from instead of k-means++ (a warm start,
            e.g. the previous refresh's clusters), see
            :func:`magnet_jax.kmeans.kmeans_per_class`.

    Returns:
        A :class:`ClusteringResult` (assignments [N], valid [C, K], counts [C, K]).

    Raises:
        ValueError: on an unknown method, initial centroids for a method other than
            k-means, or as the chosen method does.
    """
    if method == "kmeans":
        from magnet_jax.kmeans import kmeans_per_class

        result = kmeans_per_class(
            embeddings,
            labels,
            clusters_per_class,
            key=key,
            num_classes=num_classes,
            max_iterations=max_iterations,
            tolerance=tolerance,
            num_restarts=num_restarts,
            initial_centroids=initial_centroids,
            initial_valid=initial_valid,
        )
        return ClusteringResult(result.assignments, result.counts > 0, result.counts)
    if initial_centroids is not None or initial_valid is not None:
        raise ValueError(
            f"initial centroids (a warm start) apply to k-means only, not to method {method!r}"
        )
    if method == "agglomerative":
        return agglomerative_per_class(
            embeddings,
            labels,
            max_clusters=clusters_per_class,
            key=key,
            num_classes=num_classes,
            linkage=linkage,
            distance_threshold=distance_threshold,
            max_points_per_class=max_points_per_class,
            min_cluster_size=min_cluster_size,
            assignment=assignment,
            min_clusters=min_clusters,
        )
    raise ValueError(f"unknown clustering method {method!r}; choose one of {', '.join(METHODS)}")


@dataclasses.dataclass(frozen=True)
class KMeans:
    """k-means (k-means++ initialisation) inside every class, as a value.

    Calling it clusters every class into ``min(K, distinct points)`` clusters; see
    :func:`magnet_jax.kmeans.kmeans_per_class`.

    Attributes:
        max_iterations: Lloyd iterations at most.
        tolerance: stop when no centroid moves more than this (relative).
        num_restarts: keep the best of n k-means++ runs by inertia, per class.
    """

    max_iterations: int = 100
    tolerance: float = 1e-4
    num_restarts: int = 1

    name = "kmeans"

    def __call__(
        self,
        embeddings: jax.typing.ArrayLike,
        labels: jax.typing.ArrayLike,
        *,
        clusters_per_class: int,
        key: jax.Array,
        num_classes: int | None = None,
        min_clusters: int = 1,
        initial_centroids: jax.typing.ArrayLike | None = None,
        initial_valid: jax.typing.ArrayLike | None = None,
    ) -> ClusteringResult:
        """Clusters ``embeddings`` [N, d] inside each class of ``labels`` [N] into K slots.

        ``min_clusters`` is accepted for the common signature; k-means always fills
        ``min(K, distinct points)`` slots. ``initial_centroids`` [C, K, d] and
        ``initial_valid`` [C, K] start Lloyd there instead of k-means++ (a warm start;
        needs ``num_restarts == 1``).
        """
        return cluster_per_class(
            embeddings,
            labels,
            clusters_per_class=clusters_per_class,
            key=key,
            method="kmeans",
            num_classes=num_classes,
            max_iterations=self.max_iterations,
            tolerance=self.tolerance,
            num_restarts=self.num_restarts,
            initial_centroids=initial_centroids,
            initial_valid=initial_valid,
        )


@dataclasses.dataclass(frozen=True)
class Agglomerative:
    """Agglomerative clustering inside every class, as a value.

    Calling it gives at most K clusters per class; see :func:`agglomerative_per_class`
    for the relative ``distance_threshold`` and the subsample.

    Attributes:
        linkage: one of :data:`magnet_jax.names.LINKAGES`.
        distance_threshold: the relative cut τ; None cuts at K clusters per class.
        max_points_per_class: the subsample clustered per class.
        min_cluster_size: smaller clusters are merged into their nearest.
        assignment: ``"neighbour"`` or ``"centroid"``, how the rest join a cluster.
    """

    linkage: str = "ward"
    distance_threshold: float | None = None
    max_points_per_class: int = 1000
    min_cluster_size: int = 1
    assignment: str = "neighbour"

    name = "agglomerative"

    def __post_init__(self):
        if self.linkage not in LINKAGES:
            raise ValueError(
                f"unknown linkage {self.linkage!r}; choose one of {', '.join(LINKAGES)}"
            )

    def __call__(
        self,
        embeddings: jax.typing.ArrayLike,
        labels: jax.typing.ArrayLike,
        *,
        clusters_per_class: int,
        key: jax.Array,
        num_classes: int | None = None,
        min_clusters: int = 1,
    ) -> ClusteringResult:
        """Clusters ``embeddings`` [N, d] inside each class of ``labels`` [N] into at most
        K slots, at least ``min_clusters`` where the class has that many points."""
        return cluster_per_class(
            embeddings,
            labels,
            clusters_per_class=clusters_per_class,
            key=key,
            method="agglomerative",
            num_classes=num_classes,
            linkage=self.linkage,
            distance_threshold=self.distance_threshold,
            max_points_per_class=self.max_points_per_class,
            min_cluster_size=self.min_cluster_size,
            assignment=self.assignment,
            min_clusters=min_clusters,
        )


# A clusterer: called as clusterer(embeddings, labels, *, clusters_per_class, key,
# num_classes, min_clusters) -> ClusteringResult.
Clusterer = KMeans | Agglomerative

# Name (magnet_jax.names.CLUSTERINGS) -> clusterer class.
CLUSTERERS = {cls.name: cls for cls in (KMeans, Agglomerative)}
assert tuple(CLUSTERERS) == CLUSTERINGS, "magnet_jax.names.CLUSTERINGS and CLUSTERERS differ"


def clusterer_from_options(
    clustering: str = "kmeans",
    *,
    max_iterations: int = 100,
    tolerance: float = 1e-4,
    num_restarts: int = 1,
    linkage: str = "ward",
    distance_threshold: float | None = None,
    max_points_per_class: int = 1000,
) -> Clusterer:
    """The clusterer that the flat keyword options of :func:`cluster_per_class` name."""
    if clustering == "kmeans":
        return KMeans(max_iterations=max_iterations, tolerance=tolerance, num_restarts=num_restarts)
    if clustering == "agglomerative":
        return Agglomerative(
            linkage=linkage,
            distance_threshold=distance_threshold,
            max_points_per_class=max_points_per_class,
        )
    raise ValueError(
        f"unknown clustering method {clustering!r}; choose one of {', '.join(CLUSTERINGS)}"
    )


def clustering_diagnostics(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    assignments: jax.typing.ArrayLike,
    *,
    num_classes: int,
    clusters_per_class: int,
    fine_labels: jax.typing.ArrayLike | None = None,
) -> dict[str, float]:
    """How good a clustering is: what the trainer logs at every refresh.

    Returns a dict of floats:

    - ``valid_clusters``: the total number of non-empty clusters;
      ``clusters_per_class_mean/_min/_max`` over the classes that have examples.
    - ``inertia``: the within-cluster sum of squares divided by N,
      ``Σ_i ‖r_i − μ(r_i)‖² / N``.
    - ``purity`` (only with ``fine_labels``): the share of examples whose cluster's
      majority fine label equals their own. 1 when every cluster lies inside one fine
      class; a class with several modes kept as one cluster scores low.

    Args:
        embeddings: [N, d] float.
        labels: [N] int classes; assignments: [N] int within-class clusters in ``[0, K)``.
        num_classes: C; clusters_per_class: K.
        fine_labels: optional [N] int, a second labelling.
    """
    points = np.asarray(embeddings, np.float64)
    flat = np.asarray(labels, np.int64) * clusters_per_class + np.asarray(assignments, np.int64)
    num_clusters = num_classes * clusters_per_class
    counts = np.bincount(flat, minlength=num_clusters)
    sums = np.zeros((num_clusters, points.shape[1]))
    np.add.at(sums, flat, points)
    centroids = sums / np.maximum(counts, 1)[:, None]
    residuals = points - centroids[flat]
    per_class = (counts.reshape(num_classes, clusters_per_class) > 0).sum(axis=1)
    present = per_class[per_class > 0]
    diagnostics = {
        "valid_clusters": float(per_class.sum()),
        "clusters_per_class_mean": float(present.mean()),
        "clusters_per_class_min": float(present.min()),
        "clusters_per_class_max": float(present.max()),
        "inertia": float(np.sum(residuals * residuals) / points.shape[0]),
    }
    if fine_labels is not None:
        diagnostics["purity"] = cluster_purity(flat, fine_labels, num_clusters=num_clusters)
    return diagnostics


def cluster_purity(
    cluster_ids: np.ndarray, fine_labels: np.ndarray, *, num_clusters: int | None = None
) -> float:
    """Share of examples whose cluster's majority fine label is their own.

    Args:
        cluster_ids: [N] int, the (flat) cluster of every example.
        fine_labels: [N] int, the second labelling.
        num_clusters: the number of cluster ids (default: ``max(cluster_ids) + 1``).
    """
    clusters = np.asarray(cluster_ids, np.int64)
    fine = np.asarray(fine_labels, np.int64)
    num_fine = int(fine.max()) + 1
    num_clusters = int(clusters.max()) + 1 if num_clusters is None else num_clusters
    table = np.bincount(clusters * num_fine + fine, minlength=num_clusters * num_fine)
    return float(table.reshape(num_clusters, num_fine).max(axis=1).sum() / fine.size)
