"""magnet-jax: deep metric learning with the Magnet Loss in JAX/Flax.

The numerical core is pure, jittable functions of explicit pytrees:

- losses: :func:`magnet_loss` (paper eq. 5), :func:`magnet_full_objective` (eq. 4) and the
  baselines (:func:`triplet_loss`, ...), in :mod:`magnet_jax.losses`;
- clustering: :func:`kmeans_per_class`, k-means inside every class in one call, and the
  clusterer values :class:`KMeans` and :class:`Agglomerative` that the index takes;
- the cluster index: :class:`ClusterIndex`, :func:`build_index`, :func:`refresh_index`,
  :func:`record_batch`, :func:`sample_neighbourhood`;
- evaluation: :func:`knc_predict`, :func:`knn_predict`, :func:`retrieval_metrics`.

The trainer (:mod:`magnet_jax.training`) and the ``magnet-jax`` command are built on them.
"""

from magnet_jax.augment import random_shift
from magnet_jax.clustering import Agglomerative, KMeans
from magnet_jax.evaluation import (
    knc_error,
    knc_predict,
    knn_error,
    knn_predict,
    nearest_neighbours,
    retrieval_metrics,
)
from magnet_jax.index import (
    ClusterIndex,
    NeighbourhoodBatch,
    build_index,
    index_from_assignments,
    recompute_centroids,
    record_batch,
    refresh_index,
    sample_neighbourhood,
    seed_probabilities,
)
from magnet_jax.kmeans import (
    KMeansResult,
    assign_to_centroids,
    centroids_from_assignments,
    kmeans_per_class,
)
from magnet_jax.losses import (
    MagnetTerms,
    arcface_loss,
    contrastive_loss,
    magnet_full_objective,
    magnet_loss,
    magnet_terms,
    multi_similarity_loss,
    normalized_softmax_loss,
    pairwise_distances,
    proxy_nca_loss,
    triplet_loss,
)
from magnet_jax.sampling import (
    GroupTable,
    class_balanced_batch,
    group_table,
    sample_from_groups,
    uniform_batch,
)
from magnet_jax.warm_start import graft_params

__version__ = "0.1.0"

__all__ = [
    "Agglomerative",
    "ClusterIndex",
    "GroupTable",
    "KMeans",
    "KMeansResult",
    "MagnetTerms",
    "NeighbourhoodBatch",
    "arcface_loss",
    "assign_to_centroids",
    "build_index",
    "centroids_from_assignments",
    "class_balanced_batch",
    "contrastive_loss",
    "graft_params",
    "group_table",
    "index_from_assignments",
    "kmeans_per_class",
    "knc_error",
    "knc_predict",
    "knn_error",
    "knn_predict",
    "magnet_full_objective",
    "magnet_loss",
    "magnet_terms",
    "multi_similarity_loss",
    "nearest_neighbours",
    "normalized_softmax_loss",
    "pairwise_distances",
    "proxy_nca_loss",
    "random_shift",
    "recompute_centroids",
    "record_batch",
    "refresh_index",
    "retrieval_metrics",
    "sample_from_groups",
    "sample_neighbourhood",
    "seed_probabilities",
    "triplet_loss",
    "uniform_batch",
]
