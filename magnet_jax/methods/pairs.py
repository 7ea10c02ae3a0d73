"""Pair and triplet losses as training methods: class-balanced batches, no state.

A batch is M classes × D examples (:func:`magnet_jax.sampling.class_balanced_batch`), so
every anchor has positives; the loss is computed on the batch's embeddings and labels. Each
reports ``active``, the share of the batch's examples with a non-zero loss as an anchor:
the mean over the non-zero terms (batch-all triplets, contrastive pairs) hides how many
terms are left.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import numpy as np

from magnet_jax import sampling
from magnet_jax.losses import pairs, triplet
from magnet_jax.methods.base import DataInfo, LabelledBatch, Method, TrainingData, active_share


class HingeStats(NamedTuple):
    """A class-balanced loss's step statistics.

    Attributes:
        active: [] the share of the batch's examples with a non-zero loss.
    """

    active: jax.Array


@dataclasses.dataclass(frozen=True)
class ClassBalanced(Method):
    """Base of the methods that draw M classes × D examples per batch.

    Attributes:
        classes_per_batch: M.
        examples_per_class: D.
    """

    classes_per_batch: int = 8
    examples_per_class: int = 8

    def check_data(self, info: DataInfo) -> None:
        num_classes = int(np.count_nonzero(info.class_sizes()))
        if self.classes_per_batch > num_classes:
            raise ValueError(
                f"--clusters-per-batch M={self.classes_per_batch} classes per batch but the "
                f"dataset has only {num_classes} classes"
            )

    def sample(self, state, key: jax.Array, data: TrainingData) -> LabelledBatch:
        indices, labels = sampling.class_balanced_batch(
            data.class_table,
            key,
            classes_per_batch=self.classes_per_batch,
            examples_per_class=self.examples_per_class,
        )
        return LabelledBatch(indices, labels)

    def step_metrics(self, stats: HingeStats) -> dict[str, jax.Array]:
        return {"active": stats.active}


@dataclasses.dataclass(frozen=True)
class Triplet(ClassBalanced):
    """Triplet margin loss with in-batch mining (:func:`magnet_jax.losses.triplet_loss`)."""

    name = "triplet"
    margin: float = 0.2
    mining: str = "batch_all"

    def loss(self, model, params, embeddings, batch):
        options = {"margin": self.margin, "mining": self.mining}
        loss = triplet.triplet_loss(embeddings, batch.labels, **options)
        # Per anchor, [B, B, B] / [B] / [B, B] by mining; no gradient flows into the stats.
        terms = triplet.triplet_loss(
            jax.lax.stop_gradient(embeddings), batch.labels, reduction="none", **options
        )
        return loss, HingeStats(active_share(terms))


@dataclasses.dataclass(frozen=True)
class Contrastive(ClassBalanced):
    """Contrastive loss (:func:`magnet_jax.losses.contrastive_loss`), negative margin."""

    name = "contrastive"
    margin: float = 0.2

    def loss(self, model, params, embeddings, batch):
        loss = pairs.contrastive_loss(embeddings, batch.labels, neg_margin=self.margin)
        # [B, B] pair terms: with the positive margin 0, any positive pair apart counts.
        terms = pairs.contrastive_loss(
            jax.lax.stop_gradient(embeddings),
            batch.labels,
            neg_margin=self.margin,
            reduction="none",
        )
        return loss, HingeStats(active_share(terms))


@dataclasses.dataclass(frozen=True)
class MultiSimilarity(ClassBalanced):
    """Multi-similarity loss (:func:`magnet_jax.losses.multi_similarity_loss`)."""

    name = "multi_similarity"

    def loss(self, model, params, embeddings, batch):
        loss = pairs.multi_similarity_loss(embeddings, batch.labels)
        # [B] per anchor: non-zero exactly when the miner kept one of its pairs.
        terms = pairs.multi_similarity_loss(
            jax.lax.stop_gradient(embeddings), batch.labels, reduction="none"
        )
        return loss, HingeStats(active_share(terms))
