"""Training methods: one per ``--loss``, each owning its batch sampler, loss and state.

:data:`METHODS` maps every name of :data:`magnet_jax.names.LOSSES` to its class;
:func:`from_config` builds the method a :class:`~magnet_jax.config.TrainConfig` describes.
See :mod:`magnet_jax.methods.base` for the interface the trainer calls.
"""

from __future__ import annotations

from magnet_jax.clustering import clusterer_from_options
from magnet_jax.config import TrainConfig
from magnet_jax.methods.base import (
    DataInfo,
    LabelledBatch,
    Method,
    TrainingData,
    active_share,
    has_state,
)
from magnet_jax.methods.classification import ArcFace, NormalizedSoftmax, ProxyNCA, Softmax
from magnet_jax.methods.magnet import Magnet, MagnetStats
from magnet_jax.methods.pairs import Contrastive, HingeStats, MultiSimilarity, Triplet
from magnet_jax.methods.plm import PLM, PLMState
from magnet_jax.names import LOSSES

__all__ = [
    "METHODS",
    "DataInfo",
    "LabelledBatch",
    "Method",
    "TrainingData",
    "Magnet",
    "MagnetStats",
    "Triplet",
    "Contrastive",
    "MultiSimilarity",
    "Softmax",
    "ProxyNCA",
    "NormalizedSoftmax",
    "ArcFace",
    "HingeStats",
    "active_share",
    "PLM",
    "PLMState",
    "from_config",
    "get_method_class",
    "has_state",
]

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        Magnet,
        Triplet,
        Contrastive,
        MultiSimilarity,
        ProxyNCA,
        NormalizedSoftmax,
        ArcFace,
        Softmax,
        PLM,
    )
}
assert tuple(METHODS) == LOSSES, "magnet_jax.names.LOSSES and magnet_jax.methods.METHODS differ"


def get_method_class(name: str) -> type[Method]:
    """The method class registered as ``name``; ValueError naming ``--loss`` otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def from_config(config: TrainConfig, info: DataInfo | None = None, *, fine_labels=None) -> Method:
    """The method ``config.loss`` with the hyperparameters of ``config``.

    ``info`` supplies what the data decides (the Magnet index's number of classes);
    ``fine_labels`` [N] feed the Magnet refresh diagnostics.
    """
    cls = get_method_class(config.loss)
    common = {"batch_size": config.batch_size}
    if cls is Magnet:
        clusterer = clusterer_from_options(
            config.clustering,
            max_iterations=config.kmeans_iterations,
            num_restarts=config.kmeans_restarts,
            linkage=config.linkage,
            distance_threshold=config.distance_threshold,
            max_points_per_class=config.cluster_subsample,
        )
        return Magnet(
            **common,
            clusters_per_class=config.clusters_per_class,
            clusters_per_batch=config.clusters_per_batch,
            examples_per_cluster=config.examples_per_cluster,
            alpha=config.alpha,
            clusterer=clusterer,
            warm_start=config.kmeans_warm_start,
            num_classes=None if info is None else info.num_classes,
            num_nearest_clusters=config.num_nearest_clusters,
            fine_labels=fine_labels,
        )
    balanced = {
        "classes_per_batch": config.clusters_per_batch,
        "examples_per_class": config.examples_per_cluster,
    }
    if cls is Triplet:
        return Triplet(**common, **balanced, margin=config.margin, mining=config.mining)
    if cls is Contrastive:
        return Contrastive(**common, **balanced, margin=config.margin)
    if cls is MultiSimilarity:
        return MultiSimilarity(**common, **balanced)
    if cls is PLM:
        return PLM(
            **common,
            anchors_per_batch=config.clusters_per_batch,
            neighbours_per_anchor=config.examples_per_cluster - 1,
            num_neighbours=config.plm_neighbours,
            max_rank=config.plm_max_rank,
            error_threshold=config.plm_error_threshold,
            subset_selection=config.plm_subset_selection,
            similarity=config.plm_similarity,
            orthogonal_exponent=config.plm_orthogonal_exponent,
            inplane_exponent=config.plm_inplane_exponent,
            num_proxies=config.plm_proxies,
            delta=config.plm_delta,
            proxy_weight=config.plm_proxy_weight,
            neighbourhood_weight=config.plm_neighbourhood_weight,
            momentum=config.plm_momentum,
        )
    return cls(**common)
