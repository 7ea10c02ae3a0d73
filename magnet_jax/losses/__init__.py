"""Losses for deep metric learning, optax style: arrays first, hyperparameters keyword-only."""

from magnet_jax.losses.distances import pairwise_distances
from magnet_jax.losses.magnet import (
    MagnetTerms,
    magnet_full_objective,
    magnet_loss,
    magnet_terms,
    validate_cluster_labels,
)
from magnet_jax.losses.pairs import contrastive_loss, multi_similarity_loss, multi_similarity_miner
from magnet_jax.losses.plm import (
    PLMTargets,
    PLMTerms,
    plm_loss,
    plm_neighbourhood_loss,
    plm_point_loss,
    plm_proxy_loss,
    plm_targets,
)
from magnet_jax.losses.proxies import arcface_loss, normalized_softmax_loss, proxy_nca_loss
from magnet_jax.losses.triplet import triplet_loss

__all__ = [
    "MagnetTerms",
    "PLMTargets",
    "PLMTerms",
    "arcface_loss",
    "contrastive_loss",
    "magnet_full_objective",
    "magnet_loss",
    "magnet_terms",
    "multi_similarity_loss",
    "multi_similarity_miner",
    "normalized_softmax_loss",
    "pairwise_distances",
    "plm_loss",
    "plm_neighbourhood_loss",
    "plm_point_loss",
    "plm_proxy_loss",
    "plm_targets",
    "proxy_nca_loss",
    "triplet_loss",
    "validate_cluster_labels",
]
