"""What each ``--loss`` needs from the trainer: how a batch is drawn and how it is scored.

An :class:`Objective` pairs a batch sampler (neighbourhoods of clusters for the Magnet
Loss, P classes × K examples for pair and triplet losses, uniform for classification
losses) with a loss of the batch's embeddings. Both are pure and run inside the jitted
train step; the trainer never branches on the loss name anywhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from magnet_jax import index as index_lib
from magnet_jax import sampling
from magnet_jax.config import TrainConfig
from magnet_jax.losses import magnet as magnet_losses
from magnet_jax.losses import pairs, proxies, triplet


class Batch(NamedTuple):
    """A sampled batch, by index into the training set.

    Attributes:
        indices: [B] int32 training-set rows.
        labels: [B] int32 class of each row.
        cluster_ids: [B] int32 flat cluster id ``c·K + k`` (Magnet Loss), else the label.
    """

    indices: jax.Array
    labels: jax.Array
    cluster_ids: jax.Array


class TrainingData(NamedTuple):
    """The training set as the jitted step sees it (replicated on every device).

    Attributes:
        x: [N, ...] inputs.
        labels: [N] int32 classes.
        class_table: examples grouped by class, for class-balanced batches.
    """

    x: jax.Array
    labels: jax.Array
    class_table: sampling.GroupTable


class LossOutput(NamedTuple):
    loss: jax.Array  # [] the global-batch loss that is differentiated
    example_losses: jax.Array  # [B] per-example losses where the loss has them, else zeros
    variance: jax.Array  # [] batch σ̂² (Magnet Loss), else 0


Sampler = Callable[[jax.Array, Any, TrainingData, TrainConfig], Batch]
LossFn = Callable[[Any, jax.Array, Batch, TrainConfig], LossOutput]


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    batch: str  # "neighbourhood" (M clusters × D), "classes" (M classes × D), "uniform" (M·D)
    sample: Sampler  # (key, index, data, config) -> Batch
    loss: LossFn  # (model, embeddings [B, d], batch, config) -> LossOutput
    uses_index: bool = False
    classifier: bool = False
    proxies: bool = False


def _neighbourhood_batch(key, index, data: TrainingData, config: TrainConfig) -> Batch:
    batch = index_lib.sample_neighbourhood(
        index,
        key,
        clusters_per_batch=config.clusters_per_batch,
        examples_per_cluster=config.examples_per_cluster,
    )
    return Batch(batch.indices, batch.labels, batch.cluster_ids)


def _class_balanced_batch(key, index, data: TrainingData, config: TrainConfig) -> Batch:
    indices, labels = sampling.class_balanced_batch(
        data.class_table,
        key,
        classes_per_batch=config.clusters_per_batch,
        examples_per_class=config.examples_per_cluster,
    )
    return Batch(indices, labels, labels)


def _uniform_batch(key, index, data: TrainingData, config: TrainConfig) -> Batch:
    indices = sampling.uniform_batch(key, data.labels.shape[0], batch_size=config.batch_size)
    labels = data.labels[indices]
    return Batch(indices, labels, labels)


def _zeros_like_batch(embeddings: jax.Array) -> jax.Array:
    return jnp.zeros((embeddings.shape[0],), jnp.float32)


def _magnet(model, embeddings, batch: Batch, config: TrainConfig) -> LossOutput:
    terms = magnet_losses.magnet_terms(
        embeddings, batch.labels, batch.cluster_ids, alpha=config.alpha
    )
    return LossOutput(jnp.mean(terms.losses), terms.losses, terms.variance)


def _triplet(model, embeddings, batch: Batch, config: TrainConfig) -> LossOutput:
    loss = triplet.triplet_loss(
        embeddings, batch.labels, margin=config.margin, mining=config.mining
    )
    return LossOutput(loss, _zeros_like_batch(embeddings), jnp.zeros(()))


def _contrastive(model, embeddings, batch: Batch, config: TrainConfig) -> LossOutput:
    loss = pairs.contrastive_loss(embeddings, batch.labels, neg_margin=config.margin)
    return LossOutput(loss, _zeros_like_batch(embeddings), jnp.zeros(()))


def _multi_similarity(model, embeddings, batch: Batch, config: TrainConfig) -> LossOutput:
    loss = pairs.multi_similarity_loss(embeddings, batch.labels)
    return LossOutput(loss, _zeros_like_batch(embeddings), jnp.zeros(()))


def _proxy_nca(model, embeddings, batch: Batch, config: TrainConfig) -> LossOutput:
    loss = proxies.proxy_nca_loss(embeddings, batch.labels, model.proxies[...])
    return LossOutput(loss, _zeros_like_batch(embeddings), jnp.zeros(()))


def _normalized_softmax(model, embeddings, batch: Batch, config: TrainConfig) -> LossOutput:
    loss = proxies.normalized_softmax_loss(embeddings, batch.labels, model.proxies[...])
    return LossOutput(loss, _zeros_like_batch(embeddings), jnp.zeros(()))


def _arcface(model, embeddings, batch: Batch, config: TrainConfig) -> LossOutput:
    loss = proxies.arcface_loss(embeddings, batch.labels, model.proxies[...])
    return LossOutput(loss, _zeros_like_batch(embeddings), jnp.zeros(()))


def _softmax(model, embeddings, batch: Batch, config: TrainConfig) -> LossOutput:
    logits = model.logits(embeddings)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
    return LossOutput(jnp.mean(losses), losses, jnp.zeros(()))


OBJECTIVES: dict[str, Objective] = {
    "magnet": Objective("magnet", "neighbourhood", _neighbourhood_batch, _magnet, uses_index=True),
    "triplet": Objective("triplet", "classes", _class_balanced_batch, _triplet),
    "contrastive": Objective("contrastive", "classes", _class_balanced_batch, _contrastive),
    "multi_similarity": Objective(
        "multi_similarity", "classes", _class_balanced_batch, _multi_similarity
    ),
    "proxy_nca": Objective("proxy_nca", "uniform", _uniform_batch, _proxy_nca, proxies=True),
    "normalized_softmax": Objective(
        "normalized_softmax", "uniform", _uniform_batch, _normalized_softmax, proxies=True
    ),
    "arcface": Objective("arcface", "uniform", _uniform_batch, _arcface, proxies=True),
    "softmax": Objective("softmax", "uniform", _uniform_batch, _softmax, classifier=True),
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
