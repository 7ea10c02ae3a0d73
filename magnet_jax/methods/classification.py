"""Classification losses as training methods: uniform batches and a learned head.

Softmax cross-entropy trains the model's classifier head; the proxy losses (Proxy-NCA,
normalised softmax, ArcFace) train one proxy per class held by the model. Neither keeps
state between steps, and neither reports step metrics: a cross-entropy is positive for
every example, so there is no share of active examples to show.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from magnet_jax import sampling
from magnet_jax.evaluators import ClassifierError
from magnet_jax.losses import proxies
from magnet_jax.methods.base import LabelledBatch, Method, TrainingData


@dataclasses.dataclass(frozen=True)
class Uniform(Method):
    """Base of the methods that draw ``batch_size`` examples uniformly per batch."""

    def sample(self, state, key: jax.Array, data: TrainingData) -> LabelledBatch:
        indices = sampling.uniform_batch(key, data.labels.shape[0], batch_size=self.batch_size)
        return LabelledBatch(indices, data.labels[indices])


@dataclasses.dataclass(frozen=True)
class Softmax(Uniform):
    """Softmax cross-entropy of the model's linear classifier on the embedding."""

    name = "softmax"
    classifier = True

    def loss(self, model, params, embeddings, batch):
        logits = model.logits(embeddings)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
        return jnp.mean(losses), ()

    def evaluators(self) -> tuple:
        return (ClassifierError(),)


@dataclasses.dataclass(frozen=True)
class ProxyNCA(Uniform):
    """Proxy-NCA (:func:`magnet_jax.losses.proxy_nca_loss`) against the model's proxies."""

    name = "proxy_nca"
    proxies = True

    def loss(self, model, params, embeddings, batch):
        return proxies.proxy_nca_loss(embeddings, batch.labels, model.proxies[...]), ()


@dataclasses.dataclass(frozen=True)
class NormalizedSoftmax(Uniform):
    """Normalised softmax (:func:`magnet_jax.losses.normalized_softmax_loss`)."""

    name = "normalized_softmax"
    proxies = True

    def loss(self, model, params, embeddings, batch):
        return proxies.normalized_softmax_loss(embeddings, batch.labels, model.proxies[...]), ()


@dataclasses.dataclass(frozen=True)
class ArcFace(Uniform):
    """ArcFace (:func:`magnet_jax.losses.arcface_loss`) against the model's proxies."""

    name = "arcface"
    proxies = True

    def loss(self, model, params, embeddings, batch):
        return proxies.arcface_loss(embeddings, batch.labels, model.proxies[...]), ()
